//! [`Subscription`]: one consumer's open subscription to every partition of a queue.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sluice_proto::v1::{Delivery, Settle};

use super::Broker;
use crate::error::{BrokerError, SettleFailure};
use crate::queue::clock::Clock;
use crate::queue::consumer::ConsumerSlot;
use crate::queue::queue::Queue;

/// Most deliveries a subscription takes from a partition at once (one `Deliver` command).
const TAKE_BATCH_MAX: usize = 256;

/// A consumer's open subscription. Dropping it ends the consumer: its unsettled deliveries are
/// made ready again (redelivered to other consumers).
pub struct Subscription {
    broker: Arc<Broker>,
    queue: Arc<Queue>,
    slot: Arc<ConsumerSlot>,
    /// Deliveries taken in one batch and not yet returned by `next` (already in flight), with
    /// their ack deadlines: one whose deadline passed while buffered was made ready again by
    /// the partition and is skipped, never handed out stale.
    buffer: VecDeque<(Delivery, u64)>,
    /// The broker's clock, for those deadlines.
    clock: Arc<dyn Clock>,
    /// Partition to try first (round-robin across partitions).
    next_partition: usize,
}

impl Subscription {
    /// A subscription of `slot` (already counted as a consumer of `queue`).
    pub(super) fn new(broker: Arc<Broker>, queue: Arc<Queue>, slot: Arc<ConsumerSlot>) -> Self {
        let clock = broker.options.clock.clone();
        Self {
            broker,
            queue,
            slot,
            buffer: VecDeque::new(),
            clock,
            next_partition: 0,
        }
    }

    /// The next delivery; `None` when the broker shuts down or the queue is deleted. Waits
    /// while the consumer holds `prefetch` unsettled deliveries.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(delivery) = self.pop_buffered() {
                return Some(delivery);
            }
            if self.queue.is_closed()
                || self.broker.shutting_down.load(Ordering::Acquire)
                || self.queue.check_serving().is_err()
            {
                return None;
            }
            // Register for wake-ups before looking, so a publish or settle between the look
            // and the wait is not missed.
            let queue = self.queue.clone();
            let notified = queue.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let free = self.slot.free();
            if free > 0 {
                match self.take(free) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(queue = %self.queue.spec().name, error = %e, "delivery failed");
                    }
                }
            }
            if self.broker.options.cluster.is_some() {
                // Leadership can move away without a wake-up: look again now and then.
                let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
            } else {
                notified.await;
            }
        }
    }

    /// Why [`Subscription::next`] ended, when this agent stopped leading the queue (the
    /// consumer should re-subscribe where the error points).
    pub fn ended_by(&self) -> Option<BrokerError> {
        if self.queue.is_closed() {
            // Closed because the queue moved to other agents (placement changed), not deleted:
            // point the consumer at its hosts, as a new request would be.
            return match self.broker.queue(&self.queue.spec().name) {
                Err(moved @ BrokerError::NotLeader { .. }) => Some(moved),
                _ => None,
            };
        }
        self.queue.check_serving().err()
    }

    /// The next delivery if one can be made now, without waiting (`None`: nothing ready, no
    /// credit, or the queue closed).
    pub fn try_next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        if let Some(delivery) = self.pop_buffered() {
            return Ok(Some(delivery));
        }
        let free = self.slot.free();
        if free == 0 || self.queue.is_closed() {
            return Ok(None);
        }
        self.take(free)?;
        Ok(self.pop_buffered())
    }

    /// Takes a batch into the buffer; whether anything came.
    fn take(&mut self, free: usize) -> Result<bool, BrokerError> {
        let deliveries = self.queue.take(
            &self.slot,
            free.min(TAKE_BATCH_MAX),
            &mut self.next_partition,
        )?;
        let deadline = self
            .clock
            .now_ms()
            .saturating_add(self.queue.spec().ack_timeout_ms);
        let any = !deliveries.is_empty();
        self.buffer
            .extend(deliveries.into_iter().map(|d| (d, deadline)));
        Ok(any)
    }

    fn pop_buffered(&mut self) -> Option<Delivery> {
        let now = self.clock.now_ms();
        while let Some((delivery, deadline)) = self.buffer.pop_front() {
            if now < deadline {
                return Some(delivery);
            }
        }
        None
    }

    /// Settles deliveries made to this subscription; returns once durable, listing failures.
    pub async fn settle(&self, settle: Settle) -> Result<Vec<SettleFailure>, BrokerError> {
        self.broker.settle_on(&self.queue, settle).await
    }

    /// Deliveries this consumer holds unsettled (including ones taken but not yet returned).
    pub fn unsettled(&self) -> usize {
        self.slot.unsettled()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.queue.consumer_left(self.slot.id);
    }
}
