//! [`Queue`]: the partitions of one queue, routing of publishes, and competing consumers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use sluice_proto::v1::{
    Delivery, DeliveryTag, GetQueueStatsResponse, Message, PartitionStats, QueueSpec, Settle,
    SettleAction, Stats,
};
use tokio::sync::Notify;

use super::consumer::ConsumerSlot;
use super::partition::{Partition, PublishContext, WaitPoint};
use super::spec::validate_message;
use super::state::{DisposalItem, StateConfig};
use crate::error::{BrokerError, Confirmation, QueueOpenError, SettleFailure};

/// One queue on this agent.
#[derive(Debug)]
pub struct Queue {
    /// The effective spec.
    spec: QueueSpec,
    /// Partitions in order; empty when the queue is offline.
    partitions: Vec<Arc<Partition>>,
    /// Why the queue is offline (a partition failed recovery), naming file and offset.
    offline: Option<Arc<QueueOpenError>>,
    /// Round-robin position for messages without a routing key.
    next_partition: AtomicUsize,
    /// Woken when something may have become deliverable or a consumer's credit freed.
    notify: Notify,
    /// Woken to make the timer task re-plan (new deadlines) or stop.
    timer: Notify,
    /// Subscriptions open on the queue.
    consumers: AtomicU32,
    /// Set on delete or shutdown: subscriptions end, the timer task stops.
    closed: AtomicBool,
}

/// Messages of one partition to dead-letter.
pub type PartitionDisposals = (Arc<Partition>, Vec<DisposalItem>);

/// What [`Queue::settle`] produced before dead-lettering.
#[derive(Debug, Default)]
pub struct QueueSettled {
    /// Tags that failed.
    pub failures: Vec<SettleFailure>,
    /// (partition, index) to wait for durability on.
    pub waits: Vec<(Arc<Partition>, WaitPoint)>,
    /// Messages to dead-letter before answering.
    pub disposals: Vec<PartitionDisposals>,
}

impl Queue {
    /// A queue over opened partitions.
    pub fn new(spec: QueueSpec, partitions: Vec<Arc<Partition>>) -> Self {
        Self::build(spec, partitions, None)
    }

    /// A queue whose data could not be recovered: every operation fails with
    /// [`BrokerError::QueueOffline`] carrying `reason`.
    pub fn offline(spec: QueueSpec, reason: QueueOpenError) -> Self {
        Self::build(spec, Vec::new(), Some(Arc::new(reason)))
    }

    fn build(
        spec: QueueSpec,
        partitions: Vec<Arc<Partition>>,
        offline: Option<Arc<QueueOpenError>>,
    ) -> Self {
        Self {
            spec,
            partitions,
            offline,
            next_partition: AtomicUsize::new(0),
            notify: Notify::new(),
            timer: Notify::new(),
            consumers: AtomicU32::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// The state-machine settings derived from a spec.
    pub fn state_config(spec: &QueueSpec) -> StateConfig {
        StateConfig {
            ack_timeout_ms: spec.ack_timeout_ms,
            max_deliveries: spec.max_deliveries,
            has_dead_letter_queue: !spec.dead_letter_queue.is_empty(),
            dedup_window_ms: spec.dedup_window_ms,
        }
    }

    /// The effective spec.
    pub fn spec(&self) -> &QueueSpec {
        &self.spec
    }

    /// The partitions (empty when offline).
    pub fn partitions(&self) -> &[Arc<Partition>] {
        &self.partitions
    }

    /// Fails when the queue is offline.
    pub fn check_online(&self) -> Result<(), BrokerError> {
        match &self.offline {
            Some(reason) => Err(BrokerError::QueueOffline {
                queue: self.spec.name.clone(),
                cause: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Whether the queue was closed (deleted or shutting down).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the queue: subscriptions end and the timer task stops.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_waiters();
        self.timer.notify_waiters();
        self.timer.notify_one();
    }

    /// Wakes consumers waiting for deliveries or credit.
    pub fn wake_consumers(&self) {
        self.notify.notify_waiters();
    }

    /// Consumers' wake-up signal.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }

    /// The timer task's wake-up signal.
    pub fn timer(&self) -> &Notify {
        &self.timer
    }

    /// Counts a subscription opening (+) or ending (-).
    pub fn consumer_joined(&self) {
        self.consumers.fetch_add(1, Ordering::AcqRel);
    }

    /// Ends a subscription: its deliveries become ready for the others.
    pub fn consumer_left(&self, id: u64) {
        self.consumers.fetch_sub(1, Ordering::AcqRel);
        let released: usize = self.partitions.iter().map(|p| p.release_consumer(id)).sum();
        if released > 0 {
            self.wake_consumers();
            // Released messages past max_deliveries need the timer task to dead-letter them.
            self.timer.notify_one();
        }
    }

    /// Unsettled messages in the whole queue.
    pub fn backlog(&self) -> (u64, u64) {
        self.partitions
            .iter()
            .map(|p| p.backlog())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Resolves once one of the partitions serves here (at once if one does; a partition that
    /// is not replicated always does). Never resolves for a queue without partitions.
    pub async fn until_serving(&self) {
        let mut watches = Vec::with_capacity(self.partitions.len());
        for partition in &self.partitions {
            match partition.replica() {
                Some(link) => watches.push(link.status.subscribe()),
                None => return,
            }
        }
        if watches.is_empty() {
            return std::future::pending().await;
        }
        let waits = watches.iter_mut().map(|status| {
            Box::pin(async move {
                if status.wait_for(|s| s.ready).await.is_err() {
                    // The replica stopped: it will not serve again; the caller's other
                    // wake-ups (and the queue closing) take over.
                    std::future::pending::<()>().await;
                }
            })
        });
        futures::future::select_all(waits).await;
    }

    /// Fails with a redirect when this agent serves none of the queue's partitions (it is
    /// not their Raft leader).
    pub fn check_serving(&self) -> Result<(), BrokerError> {
        match self.partitions.iter().find(|p| p.is_serving()) {
            Some(_) => Ok(()),
            None => match self.partitions.first() {
                Some(p) => Err(p.not_leader()),
                None => Ok(()),
            },
        }
    }

    /// The partition for a message: by ordering key, else by idempotency key (so duplicates
    /// meet their first copy's partition), else round-robin over the partitions this agent
    /// serves.
    fn route(&self, message: &Message) -> usize {
        let n = self.partitions.len();
        let key = if !message.ordering_key.is_empty() {
            &message.ordering_key
        } else {
            &message.idempotency_key
        };
        if key.is_empty() {
            let start = self.next_partition.fetch_add(1, Ordering::Relaxed);
            (0..n)
                .map(|i| (start + i) % n)
                .find(|p| self.partitions[*p].is_serving())
                .unwrap_or(start % n)
        } else {
            (stable_hash(key.as_bytes()) % n as u64) as usize
        }
    }

    /// Validates, routes and enqueues messages, then waits until they are durable. One
    /// confirm per message in order; `dead_letter` marks copies moved from another queue.
    pub async fn publish(
        &self,
        messages: Vec<Message>,
        dead_letter: Option<(&str, &str)>,
    ) -> Result<Vec<Confirmation>, BrokerError> {
        self.check_online()?;
        let n = self.partitions.len();
        let mut confirms: Vec<Option<Confirmation>> = Vec::with_capacity(messages.len());
        confirms.resize_with(messages.len(), || None);
        let mut groups: Vec<Vec<(usize, Message)>> = vec![Vec::new(); n];
        for (i, message) in messages.into_iter().enumerate() {
            if let Err(e) = validate_message(&self.spec, i, &message) {
                confirms[i] = Some(Err(e));
                continue;
            }
            let p = self.route(&message);
            groups[p].push((i, message));
        }
        // Refuse the whole batch (nothing taken) when a partition it needs is led elsewhere,
        // so a redirected producer can resend it without duplicating the rest.
        for (p, items) in groups.iter().enumerate() {
            if !items.is_empty() && !self.partitions[p].is_serving() {
                return Err(self.partitions[p].not_leader());
            }
        }
        let limited = self.spec.max_backlog_messages > 0 || self.spec.max_backlog_bytes > 0;
        let totals = if limited { self.backlog() } else { (0, 0) };
        let mut waits = Vec::new();
        let mut enqueued = false;
        for (p, items) in groups.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let partition = &self.partitions[p];
            let others_backlog = if limited {
                let own = partition.backlog();
                (
                    totals.0.saturating_sub(own.0),
                    totals.1.saturating_sub(own.1),
                )
            } else {
                (0, 0)
            };
            let ctx = PublishContext {
                message_ttl_ms: self.spec.message_ttl_ms,
                max_backlog_messages: self.spec.max_backlog_messages,
                max_backlog_bytes: self.spec.max_backlog_bytes,
                others_backlog,
                dead_letter_source: dead_letter.map(|d| d.0.to_owned()).unwrap_or_default(),
                dead_letter_reason: dead_letter.map(|d| d.1.to_owned()).unwrap_or_default(),
            };
            let published = partition.publish(items, &ctx)?;
            enqueued |= published.enqueued;
            for (i, confirm) in published.confirms {
                confirms[i] = Some(confirm);
            }
            waits.push((partition.clone(), published.wait));
        }
        if enqueued {
            self.wake_consumers();
            self.timer.notify_one();
        }
        for (partition, index) in waits {
            partition.wait_durable(index).await?;
        }
        // Each message was refused by validation or routed to exactly one partition, which
        // answered for every message it was given.
        Ok(confirms
            .into_iter()
            .map(|c| c.expect("a confirmation per message"))
            .collect())
    }

    /// Takes up to `free` deliveries for `consumer`, trying partitions round-robin from
    /// `*start` and moving `*start` past the partition that served.
    pub fn take(
        &self,
        consumer: &Arc<ConsumerSlot>,
        max: usize,
        start: &mut usize,
    ) -> Result<Vec<Delivery>, BrokerError> {
        self.check_online()?;
        let n = self.partitions.len();
        for i in 0..n {
            let p = (*start + i) % n;
            let deliveries = self.partitions[p].take(max, consumer)?;
            if !deliveries.is_empty() {
                *start = (p + 1) % n;
                // New deadlines: let the timer task re-plan.
                self.timer.notify_one();
                return Ok(deliveries);
            }
        }
        Ok(Vec::new())
    }

    /// Applies a settle to every tag; dead-lettering and durability are left to the caller.
    pub fn settle(&self, settle: &Settle) -> Result<QueueSettled, BrokerError> {
        self.check_online()?;
        let action = match SettleAction::try_from(settle.action) {
            Ok(SettleAction::Unspecified) | Err(_) => {
                return Err(BrokerError::InvalidArgument {
                    field: "settle.action".into(),
                    reason: format!("{} is not a settle action", settle.action),
                });
            }
            Ok(action) => action,
        };
        let mut out = QueueSettled::default();
        let mut by_partition: Vec<Vec<DeliveryTag>> = vec![Vec::new(); self.partitions.len()];
        for tag in &settle.tags {
            match by_partition.get_mut(tag.partition as usize) {
                Some(tags) => tags.push(*tag),
                None => out.failures.push(SettleFailure {
                    tag: *tag,
                    error: BrokerError::NoSuchPartition {
                        queue: self.spec.name.clone(),
                        tag: *tag,
                    },
                }),
            }
        }
        for (partition, tags) in self.partitions.iter().zip(by_partition) {
            if tags.is_empty() {
                continue;
            }
            let settled = partition.settle(action, &tags, settle.delay_ms)?;
            out.failures.extend(settled.failures);
            out.waits.push((partition.clone(), settled.wait));
            if !settled.disposals.is_empty() {
                out.disposals.push((partition.clone(), settled.disposals));
            }
        }
        // Credit freed and maybe messages ready again (nack, extend changes the timer).
        self.wake_consumers();
        self.timer.notify_one();
        Ok(out)
    }

    /// One timer pass over every partition; returns the disposals to dead-letter and when the
    /// next pass is due (Unix ms).
    pub fn tick(&self) -> Result<(Vec<PartitionDisposals>, Option<u64>), BrokerError> {
        let mut disposals = Vec::new();
        let mut next: Option<u64> = None;
        let mut ready = false;
        for partition in &self.partitions {
            let ticked = partition.tick()?;
            ready |= ticked.became_ready;
            if let Some(t) = ticked.next_timer_ms {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
            if !ticked.disposals.is_empty() {
                disposals.push((partition.clone(), ticked.disposals));
            }
        }
        if ready {
            self.wake_consumers();
        }
        Ok((disposals, next))
    }

    /// Counters per partition and in total.
    pub fn stats(&self) -> Result<GetQueueStatsResponse, BrokerError> {
        self.check_online()?;
        let mut partitions = Vec::with_capacity(self.partitions.len());
        for partition in &self.partitions {
            let (c, oldest_age) = partition.stats();
            let stats = Stats {
                ready: c.ready,
                in_flight: c.in_flight,
                delayed: c.delayed,
                dead_lettered: c.dead_lettered,
                bytes: c.bytes,
                publish_rate: c.publish_rate,
                ack_rate: c.ack_rate,
                oldest_message_age_ms: oldest_age,
                expired: c.expired,
            };
            partitions.push(PartitionStats {
                partition: partition.id(),
                stats: Some(stats),
                leader: partition.leader_label(),
            });
        }
        Ok(GetQueueStatsResponse {
            name: self.spec.name.clone(),
            total: Some(totals(&partitions)),
            partitions,
            consumers: self.consumers.load(Ordering::Acquire),
        })
    }
}

/// FNV-1a: stable across processes and versions (unlike `DefaultHasher`), so a key keeps its
/// partition after a restart.
fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A queue's totals over its partitions' counters (ages: the maximum; the rest: the sum).
pub fn totals(partitions: &[PartitionStats]) -> Stats {
    let mut total = Stats::default();
    for stats in partitions.iter().filter_map(|p| p.stats.as_ref()) {
        total.ready += stats.ready;
        total.in_flight += stats.in_flight;
        total.delayed += stats.delayed;
        total.dead_lettered += stats.dead_lettered;
        total.bytes += stats.bytes;
        total.publish_rate += stats.publish_rate;
        total.ack_rate += stats.ack_rate;
        total.oldest_message_age_ms = total.oldest_message_age_ms.max(stats.oldest_message_age_ms);
        total.expired += stats.expired;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routing_hash_is_stable() {
        // Known FNV-1a 64 values: a change here would move keys to other partitions.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
