//! [`ConsumerSlot`]: the shared view of one subscription's unsettled deliveries.

use std::sync::atomic::{AtomicUsize, Ordering};

/// One consumer's credit, shared between its `Subscription` and the partitions holding its
/// deliveries. A partition decrements `unsettled` whenever one of the consumer's deliveries
/// leaves flight (ack, nack, reject, timeout, dead-letter), wherever the settle came from.
#[derive(Debug)]
pub struct ConsumerSlot {
    /// Unique within the agent's lifetime.
    pub id: u64,
    /// Most unsettled deliveries the consumer may hold.
    pub prefetch: usize,
    /// Deliveries currently held (in flight) by this consumer.
    unsettled: AtomicUsize,
}

impl ConsumerSlot {
    /// A consumer holding nothing yet.
    pub fn new(id: u64, prefetch: usize) -> Self {
        Self {
            id,
            prefetch,
            unsettled: AtomicUsize::new(0),
        }
    }

    /// Deliveries it may still receive.
    pub fn free(&self) -> usize {
        self.prefetch
            .saturating_sub(self.unsettled.load(Ordering::Acquire))
    }

    /// Deliveries it holds.
    pub fn unsettled(&self) -> usize {
        self.unsettled.load(Ordering::Acquire)
    }

    /// Counts `n` new deliveries.
    pub fn acquire(&self, n: usize) {
        self.unsettled.fetch_add(n, Ordering::AcqRel);
    }

    /// Counts one delivery that left flight.
    pub fn release(&self) {
        // Saturating: a release can never outnumber acquires, but a wrap would wedge the
        // consumer forever, so be defensive.
        let _ = self
            .unsettled
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
    }
}
