//! The agent's queues and the operations the gRPC services call.
//!
//! [`Broker`] owns every queue on this agent: it validates and persists queue specs, routes
//! publishes to partitions, and hands out [`Subscription`]s. It speaks in `sluice.v1` protobuf
//! types so the gRPC layer is a thin translation; [`BrokerError`] carries the gRPC code.

use std::path::PathBuf;
use std::sync::Arc;

use sluice_proto::v1::{
    Confirm, Delivery, GetQueueStatsResponse, Message, QueueSpec, Settle, SettleOutcome,
};

use crate::log::LogError;

/// Errors of broker operations, each mapping to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A request field is invalid; `field` is its path as in the proto (`queue.name`).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Proto field path, e.g. `messages[3].payload`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The named queue does not exist.
    #[error("queue {queue:?} not found")]
    QueueNotFound {
        /// The queue name asked for.
        queue: String,
    },
    /// A queue exists with different settings.
    #[error("queue {queue:?} already exists with different settings: {difference}")]
    QueueExists {
        /// Queue name.
        queue: String,
        /// Which setting differs.
        difference: String,
    },
    /// Size or backlog limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Stale/unknown delivery tag, non-empty queue on `if_empty` delete, corrupted partition.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Shutting down (retry elsewhere or later).
    #[error("{0}")]
    Unavailable(String),
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] LogError),
}

impl BrokerError {
    /// The gRPC status code this error is reported with.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            Self::QueueNotFound { .. } => tonic::Code::NotFound,
            Self::QueueExists { .. } => tonic::Code::AlreadyExists,
            Self::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Self::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::Storage(LogError::Corrupted { .. }) => tonic::Code::FailedPrecondition,
            Self::Storage(_) => tonic::Code::Internal,
        }
    }
}

/// Settings of a broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Data directory (see `layout`).
    pub data_dir: PathBuf,
    /// Storage knobs (segment size, fsync policy).
    pub log: crate::config::LogConfig,
}

/// All queues of this agent.
pub struct Broker {
    // Owned by the queue work.
}

/// A consumer's open subscription. Dropping it ends the consumer: its unsettled deliveries are
/// made ready again (redelivered to other consumers).
pub struct Subscription {
    // Owned by the queue work.
}

impl Broker {
    /// Opens (recovering) every queue under `config.data_dir`, creating the directory if
    /// needed. Fails when the directory is unusable or locked by another agent; a partition
    /// whose log is corrupted is kept offline and its queue answers FAILED_PRECONDITION.
    pub async fn open(config: BrokerConfig) -> Result<Arc<Broker>, BrokerError> {
        let _ = config;
        todo!()
    }

    /// Creates a queue or confirms an identical one; returns the spec with defaults filled in
    /// and whether it was created.
    pub async fn declare(&self, spec: QueueSpec) -> Result<(QueueSpec, bool), BrokerError> {
        let _ = spec;
        todo!()
    }

    /// Deletes a queue; returns how many messages were discarded.
    pub async fn delete(&self, queue: &str, if_empty: bool) -> Result<u64, BrokerError> {
        let _ = (queue, if_empty);
        todo!()
    }

    /// Every queue's spec, sorted by name.
    pub fn list(&self) -> Vec<QueueSpec> {
        todo!()
    }

    /// Counters of one queue.
    pub fn stats(&self, queue: &str) -> Result<GetQueueStatsResponse, BrokerError> {
        let _ = queue;
        todo!()
    }

    /// Publishes messages; returns once every accepted message is durable, one confirm per
    /// message in order (a rejected message has a non-zero `code`). Fails as a whole only for
    /// queue-level problems (unknown queue, shutting down).
    pub async fn publish(
        &self,
        queue: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Confirm>, BrokerError> {
        let _ = (queue, messages);
        todo!()
    }

    /// Opens a subscription to all partitions of `queue` with at most `prefetch` unsettled
    /// deliveries (0 = 100).
    pub async fn subscribe(
        &self,
        queue: &str,
        prefetch: u32,
        consumer_name: &str,
    ) -> Result<Subscription, BrokerError> {
        let _ = (queue, prefetch, consumer_name);
        todo!()
    }

    /// Settles deliveries of `queue` by tag, from any holder; returns once durable, listing
    /// the tags that failed.
    pub async fn settle(
        &self,
        queue: &str,
        settle: Settle,
    ) -> Result<Vec<SettleOutcome>, BrokerError> {
        let _ = (queue, settle);
        todo!()
    }

    /// Stops accepting work and makes everything durable.
    pub async fn shutdown(&self) {
        todo!()
    }
}

impl Subscription {
    /// The next delivery; `None` when the broker shuts down or the queue is deleted. Waits
    /// while the consumer holds `prefetch` unsettled deliveries.
    pub async fn next(&mut self) -> Option<Delivery> {
        todo!()
    }

    /// Settles deliveries made to this subscription; returns once durable, listing failures.
    pub async fn settle(&self, settle: Settle) -> Result<Vec<SettleOutcome>, BrokerError> {
        let _ = settle;
        todo!()
    }
}
