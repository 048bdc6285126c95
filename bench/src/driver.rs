//! The small trait every system's client side implements, so that the workload (and so the
//! measuring) is written once.
//!
//! A publish is split in two steps to allow pipelining the way each client does it: [`Producer::send`]
//! puts a batch on the wire and returns a [`Producer::Confirm`] future that resolves once the
//! server has confirmed every message of the batch. The workload keeps several such futures
//! in flight per producer.

use std::future::Future;

use crate::Result;

/// One system under test, connected.
pub trait Driver: Send + Sync + 'static {
    /// A publishing connection (channel, stream).
    type Producer: Producer;
    /// A consuming connection.
    type Consumer: Consumer;

    /// Opens a new producer on its own connection.
    fn producer(&self) -> impl Future<Output = Result<Self::Producer>> + Send;

    /// Opens a new consumer on its own connection, holding at most `prefetch` unacked
    /// deliveries.
    fn consumer(&self, prefetch: u32) -> impl Future<Output = Result<Self::Consumer>> + Send;
}

/// Publishes batches of the benchmark payload with confirms.
pub trait Producer: Send + 'static {
    /// Resolves when every message of one batch is confirmed (durable by the system's rules).
    type Confirm: Future<Output = Result<()>> + Send + 'static;

    /// Sends `count` messages and returns their confirm. The confirm must make progress
    /// without being polled (it is awaited later, possibly after further sends).
    fn send(&mut self, count: usize) -> impl Future<Output = Result<Self::Confirm>> + Send;
}

/// Receives and acknowledges messages.
pub trait Consumer: Send + 'static {
    /// Waits for at least one delivery, takes whatever else is already there up to `max`,
    /// acknowledges them all (batched the client's idiomatic way) and returns how many.
    /// Returns 0 after waiting a while with nothing delivered.
    fn receive_and_ack(&mut self, max: usize) -> impl Future<Output = Result<usize>> + Send;
}
