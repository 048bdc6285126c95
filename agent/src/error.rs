//! What a request to the agent can come to besides success, for every layer to share.
//!
//! [`BrokerError`] lives on the ground floor so that `queue/`, `cluster/`, `broker/` and
//! `grpc/` can all name the same outcomes without importing each other. Variants are named for
//! what happened (`QueueNotFound`, `BacklogFull`, `NotLeader`), never for a status code: the
//! gRPC code of each is chosen in one place, `grpc/status.rs`. Causes travel as `#[source]`.

use std::path::PathBuf;
use std::sync::Arc;

use sluice_proto::v1::{DeliveryTag, MessageId};

use crate::log::LogError;

/// Errors of broker operations (a request as a whole, or one message or tag of it).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A request field is invalid; `field` is its path as in the proto (`queue.name`).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Proto field path, e.g. `messages[3].headers`.
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
    /// A message's payload is larger than its queue allows.
    #[error("{field}: {bytes} bytes is more than the queue's max_payload_bytes {max}")]
    PayloadTooLarge {
        /// Proto field path, `messages[3].payload`.
        field: String,
        /// The payload's size.
        bytes: usize,
        /// The queue's limit.
        max: u32,
    },
    /// The queue's backlog limit is reached (`overflow: reject-publish`).
    #[error("queue {queue:?} backlog limit reached ({messages} messages, {bytes} bytes)")]
    BacklogFull {
        /// The queue.
        queue: String,
        /// Messages already held by the queue.
        messages: u64,
        /// Payload bytes already held by the queue.
        bytes: u64,
    },
    /// Another agent holds the data directory's lock.
    #[error("data directory {} is in use by another agent (lock {} is held)", dir.display(), lock.display())]
    DataDirLocked {
        /// The data directory.
        dir: PathBuf,
        /// Its lock file.
        lock: PathBuf,
    },
    /// A delete with `if_empty` found messages.
    #[error("queue {queue:?} still holds {messages} messages")]
    QueueNotEmpty {
        /// The queue.
        queue: String,
        /// Messages it holds.
        messages: u64,
    },
    /// A new queue's files could not be made or opened.
    #[error("queue {queue:?} could not be created: {cause}")]
    QueueNotCreated {
        /// The queue.
        queue: String,
        /// Why.
        #[source]
        cause: QueueOpenError,
    },
    /// The queue's data could not be recovered: it is kept offline.
    #[error("queue {queue:?} is offline: {cause}")]
    QueueOffline {
        /// The queue.
        queue: String,
        /// Why it is offline, naming the file (and offset for corruption).
        #[source]
        cause: Arc<QueueOpenError>,
    },
    /// A partition's stored data contradicts itself (checksums passed, content did not).
    #[error("partition {partition} of queue {queue:?}: {reason}")]
    PartitionCorrupted {
        /// The queue.
        queue: String,
        /// The partition.
        partition: u32,
        /// What was found.
        reason: String,
    },
    /// A settle named a delivery that is not (or no longer) in flight with that attempt.
    #[error("{reason}")]
    StaleDelivery {
        /// The tag as sent.
        tag: DeliveryTag,
        /// Why it is stale (acked already, redelivered since, never delivered, ...).
        reason: String,
    },
    /// A settle named a partition the queue does not have.
    #[error("queue {queue:?} has no partition {}", tag.partition)]
    NoSuchPartition {
        /// The queue.
        queue: String,
        /// The tag as sent.
        tag: DeliveryTag,
    },
    /// The agent is shutting down (retry elsewhere or later).
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// The broker was dropped while a request was being taken.
    #[error("the broker is closed")]
    BrokerClosed,
    /// A joining agent was asked to declare before the cluster added it.
    #[error(
        "agent {node} joins the cluster and has not been added yet (Membership.AddAgent); declare queues at a member"
    )]
    NotYetMember {
        /// This agent's node id.
        node: u64,
    },
    /// A partition was closed (deleted, moved away, shutting down) while a request waited.
    #[error("partition {partition} of {queue:?} is closed")]
    PartitionClosed {
        /// The queue.
        queue: String,
        /// The partition.
        partition: u32,
    },
    /// No other agent with a client address hosts the dead-letter queue.
    #[error("dead-letter queue {dlq:?}: no other agent with a client address hosts it")]
    NoDeadLetterHost {
        /// The dead-letter queue.
        dlq: String,
    },
    /// The agents hosting the dead-letter queue could not be reached or did not confirm.
    #[error("dead-letter queue {dlq:?}: {source}")]
    DeadLetterUnreachable {
        /// The dead-letter queue.
        dlq: String,
        /// What the client saw.
        #[source]
        source: sluice_client::Error,
    },
    /// The agent leading the dead-letter queue refused one copy.
    #[error("dead-letter queue {dlq:?} refused the copy: {reason}")]
    DeadLetterRefused {
        /// The dead-letter queue.
        dlq: String,
        /// The refusal as the leader sent it.
        reason: String,
    },
    /// The cluster catalog (meta group) could not take the change. The cause is the meta
    /// group's error, kept as a source (naming its type here would import `cluster/`, which
    /// imports this module).
    #[error("cluster catalog: {0}")]
    Catalog(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Another agent leads what the request needs, or an election is under way: retry at
    /// `leader` when known (sent to clients as `sluice-leader` metadata), else later.
    #[error("{what} is not led by this agent{}", leader.as_ref().map(|l| format!("; its leader is {l}")).unwrap_or_else(|| "; an election is under way, retry".to_owned()))]
    NotLeader {
        /// What was asked for (`partition 0 of queue "orders"`).
        what: String,
        /// Client address of the leader, when known.
        leader: Option<String>,
    },
    /// Leadership moved after the request was taken and before it was confirmed: it may or
    /// may not have been stored. Not retried by clients on their own (a resend could store it
    /// twice); a resend with the same idempotency keys is safe.
    #[error(
        "partition {partition} of queue {queue:?} changed leader before entry {index} was confirmed: it may or may not be stored; resend with the same idempotency keys"
    )]
    LeaderChanged {
        /// The queue.
        queue: String,
        /// The partition.
        partition: u32,
        /// The log index that was waited for.
        index: u64,
    },
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] LogError),
}

/// Why a queue could not be opened or created; kept by an offline queue and reported with
/// every request to it.
#[derive(Debug, thiserror::Error)]
pub enum QueueOpenError {
    /// The spec file could not be read.
    #[error("read {}: {source}", path.display())]
    ReadSpec {
        /// The spec file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The spec file does not decode.
    #[error("{} is not a valid QueueSpec: {source}", path.display())]
    DecodeSpec {
        /// The spec file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: prost::DecodeError,
    },
    /// The spec file decodes but is not a valid spec.
    #[error("{}: {source}", path.display())]
    InvalidSpec {
        /// The spec file.
        path: PathBuf,
        /// What is invalid.
        #[source]
        source: Box<BrokerError>,
    },
    /// The spec file names another queue than its directory.
    #[error("{} names queue {named:?}", path.display())]
    SpecNamesOther {
        /// The spec file.
        path: PathBuf,
        /// The name inside it.
        named: String,
    },
    /// The queue's directory or spec file could not be written.
    #[error(transparent)]
    Files(#[from] LogError),
    /// A partition's log could not be opened or replayed.
    #[error("partition {partition}: {source}")]
    Partition {
        /// The partition.
        partition: u32,
        /// Why.
        #[source]
        source: PartitionOpenError,
    },
    /// This agent is not an initial voter of a queue it was told to bootstrap.
    #[error("agent {node} is not among the initial voters {voters:?} of queue {queue:?}")]
    NotInitialVoter {
        /// This agent.
        node: u64,
        /// The voters placement picked.
        voters: Vec<u64>,
        /// The queue.
        queue: String,
    },
}

/// Why one partition of a queue could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PartitionOpenError {
    /// The log could not be opened.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Replaying the log into the delivery state failed (a bad command, a failed read). The
    /// cause is the partition's own error type, kept as a source: naming it here would make
    /// this ground-floor module import `queue/`.
    #[error(transparent)]
    Replay(Box<dyn std::error::Error + Send + Sync>),
    /// The replica (its Raft group) could not be started; the cause as for `Replay`.
    #[error(transparent)]
    Replica(Box<dyn std::error::Error + Send + Sync>),
    /// A corrupted log could not be set aside for the rebuild from peers.
    #[error("{cause}; moving it aside failed: {source}")]
    Quarantine {
        /// The corruption found.
        cause: LogError,
        /// Why the rename failed.
        #[source]
        source: std::io::Error,
    },
    /// The replica's positions could not be reset after its log was set aside.
    #[error(transparent)]
    ForgetPositions(#[from] crate::replication::meta::ReplicaMetaError),
}

/// What became of one published message: stored (at its id; `duplicate` when an earlier
/// message with the same idempotency key was confirmed instead), or refused.
pub type Confirmation = Result<Stored, BrokerError>;

/// A stored message of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Where the message is (or the first message with its idempotency key).
    pub id: MessageId,
    /// Whether the idempotency key was seen before (nothing new was enqueued).
    pub duplicate: bool,
}

/// A tag of a settle that failed, and why; the other tags of the settle stand.
#[derive(Debug)]
pub struct SettleFailure {
    /// The tag as sent.
    pub tag: DeliveryTag,
    /// Why it failed.
    pub error: BrokerError,
}
