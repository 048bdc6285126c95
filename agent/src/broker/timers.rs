//! Time-driven work of a broker: the timer task of each queue (ack deadlines, delays, TTL,
//! dead-lettering, purging) and the loops of cluster mode, which share one helper
//! ([`spawn_loop`]) that holds the broker only while a pass runs.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Broker, lock};
use crate::cluster::{Catalog, ClusterContext};
use crate::queue::queue::Queue;

/// Longest the timer task sleeps without a known deadline: bounds how late a TTL head sweep or
/// segment purge runs on an idle queue.
const TIMER_IDLE_MS: u64 = 250;
/// Longest a queue with nothing to time sleeps between passes: one led by another agent (it
/// wakes when a partition starts serving here) or one holding no message (a publish or settle
/// wakes it). Only a backstop.
const TIMER_BACKSTOP_MS: u64 = 5_000;
/// Shortest pause between timer passes, so a busy queue is not ticked on every delivery.
const TIMER_MIN_MS: u64 = 5;

/// When a loop of [`spawn_loop`] runs its next pass.
pub(super) enum Trigger {
    /// After every period.
    Every(Duration),
    /// At once, then on every change of the replicated catalog.
    CatalogChange(watch::Receiver<Arc<Catalog>>),
}

impl Trigger {
    /// Waits until the next pass is due; `false` when its source is gone.
    async fn fired(&mut self, first: bool) -> bool {
        match self {
            Self::Every(period) => {
                tokio::time::sleep(*period).await;
                true
            }
            Self::CatalogChange(catalog) => {
                let fired = first || catalog.changed().await.is_ok();
                catalog.borrow_and_update();
                fired
            }
        }
    }
}

/// Runs `pass` each time `trigger` fires, for the broker's life (cluster mode): the loop ends
/// when the broker is dropped or starts shutting down. The broker is held only during a pass,
/// so a loop never keeps it alive.
pub(super) fn spawn_loop<F, Fut>(me: Weak<Broker>, mut trigger: Trigger, pass: F) -> JoinHandle<()>
where
    F: Fn(Arc<Broker>, ClusterContext) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut first = true;
        while trigger.fired(first).await {
            first = false;
            let Some(broker) = me.upgrade() else { return };
            if broker.shutting_down.load(Ordering::Acquire) {
                return;
            }
            let Some(cluster) = broker.options.cluster.clone() else {
                return;
            };
            pass(broker, cluster).await;
        }
    })
}

impl Broker {
    /// Starts the timer task of `queue` (unless timers are off or the queue is offline); it
    /// ends when the queue closes or the broker is dropped.
    pub(super) fn start_timer(&self, queue: Arc<Queue>) {
        if !self.options.timers || queue.check_online().is_err() {
            return;
        }
        let me = self.me.clone();
        let clock = self.options.clock.clone();
        let handle = tokio::spawn(async move {
            loop {
                if queue.is_closed() {
                    break;
                }
                let next = {
                    let Some(broker) = me.upgrade() else { break };
                    broker.maintain(&queue).await
                };
                let now = clock.now_ms();
                if queue.check_serving().is_err() {
                    // Led elsewhere: a pass has nothing to do (only a serving partition has
                    // deadlines here), so sleep until one starts serving. Thousands of
                    // follower replicas would otherwise wake four times a second each.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(TIMER_BACKSTOP_MS)) => {}
                        _ = queue.timer().notified() => {}
                        _ = queue.until_serving() => {}
                    }
                    continue;
                }
                // An empty queue has no TTL to expire and no deadline or delay to keep.
                let wait = if next.is_none() && queue.backlog().0 == 0 {
                    TIMER_BACKSTOP_MS
                } else {
                    next.map_or(TIMER_IDLE_MS, |t| t.saturating_sub(now))
                        .clamp(TIMER_MIN_MS, TIMER_IDLE_MS)
                };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    _ = queue.timer().notified() => {}
                }
                // Coalesce bursts of wake-ups (every delivery batch notifies).
                tokio::time::sleep(Duration::from_millis(TIMER_MIN_MS)).await;
            }
        });
        let mut timers = lock(&self.timers);
        timers.retain(|h| !h.is_finished());
        timers.push(handle);
    }

    /// One timer pass of one queue: deadlines, delays, TTL, dead-lettering, purging. Returns
    /// when the next pass is due.
    async fn maintain(&self, queue: &Arc<Queue>) -> Option<u64> {
        match queue.tick() {
            Ok((disposals, next)) => {
                for (partition, items) in disposals {
                    if let Err(e) = self.dead_letter(queue, &partition, items).await {
                        tracing::warn!(queue = %queue.spec().name, partition = partition.id(), error = %e, "dead-lettering failed; will retry");
                    }
                }
                next
            }
            Err(e) => {
                tracing::warn!(queue = %queue.spec().name, error = %e, "timer pass failed");
                None
            }
        }
    }

    /// Runs one timer pass over every queue now (tests with a manual clock call this instead
    /// of waiting for the timer tasks).
    pub async fn tick(&self) {
        let all: Vec<Arc<Queue>> = self.read_queues().values().cloned().collect();
        for queue in all {
            if queue.check_online().is_ok() {
                self.maintain(&queue).await;
            }
        }
    }
}
