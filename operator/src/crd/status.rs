//! Observed state of a MessageQueue, written by the operator through the status subresource.

use serde::{Deserialize, Serialize};

/// The `metav1.Condition` shape, reused as is so that `kubectl describe` and generic tooling
/// (e.g. `kubectl wait --for=condition=Ready`) understand it.
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Condition types the operator maintains.
pub mod condition_types {
    /// Every agent is ready and every partition has a quorum: the queue serves.
    pub const READY: &str = "Ready";
    /// The cluster is moving towards the spec (rollout, scaling, first start).
    pub const PROGRESSING: &str = "Progressing";
    /// Something needs attention: partitions below quorum or under-replicated.
    pub const DEGRADED: &str = "Degraded";
}

/// Reasons of the conditions, constant so that alerts and tests can match on them.
pub mod condition_reasons {
    /// Every agent is ready.
    pub const ALL_REPLICAS_READY: &str = "AllReplicasReady";
    /// The StatefulSet has fewer ready pods than desired.
    pub const STATEFULSET_NOT_READY: &str = "StatefulSetNotReady";
    /// The StatefulSet does not exist yet or has not been observed by its controller.
    pub const STATEFULSET_PENDING: &str = "StatefulSetPending";
    /// The StatefulSet is rolling out a new revision.
    pub const ROLLING_UPDATE: &str = "RollingUpdate";
    /// Nothing is changing.
    pub const STABLE: &str = "Stable";
    /// Fewer ready agents than a majority of the largest replication factor: some partitions
    /// cannot confirm publishes.
    pub const QUORUM_LOST: &str = "QuorumLost";
    /// A quorum is ready but not every replica: a further loss would stop partitions.
    pub const UNDER_REPLICATED: &str = "UnderReplicated";
    /// Every replica of every partition is ready.
    pub const FULLY_REPLICATED: &str = "FullyReplicated";
}

/// Observed state of a MessageQueue.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MessageQueueStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready, Progressing and Degraded, each with a reason and a message.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// Agent pods that exist (the scale subresource's `statusReplicasPath`).
    #[serde(default)]
    pub replicas: i32,

    /// Agent pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,

    /// `ready/desired`, for the REPLICAS printer column.
    #[serde(default)]
    pub replicas_summary: String,

    /// Label selector of the agent pods (the scale subresource's `labelSelectorPath`).
    #[serde(default)]
    pub selector: String,

    /// Messages not yet acknowledged over all queues, when the agents could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,

    /// Consumers subscribed over all queues, when the agents could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_count: Option<i64>,

    /// Per-queue counters read from the agents.
    #[serde(default)]
    pub queues: Vec<QueueStatus>,

    /// Per-consumer autoscaling state.
    #[serde(default)]
    pub consumers: Vec<ConsumerStatus>,
}

/// Counters of one queue.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// Queue name.
    pub name: String,
    /// Messages ready, delayed or in flight.
    pub backlog: i64,
    /// Messages delivered and not yet acknowledged.
    pub in_flight: i64,
    /// Confirmed publishes per second over the last minute.
    pub publish_rate: f64,
    /// Consumers subscribed.
    pub consumers: i64,
    /// One entry per partition.
    #[serde(default)]
    pub partitions: Vec<PartitionStatus>,
}

/// Placement of one partition.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStatus {
    /// Partition number, 0-based.
    pub id: i32,
    /// Agent that leads the partition, when one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Replicas caught up with the leader, when the agents report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_sync: Option<i32>,
}

/// Autoscaling state of one consumer workload.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStatus {
    /// Queue whose backlog drives the scaling.
    pub queue: String,
    /// Replicas the target has.
    pub current_replicas: i32,
    /// Replicas the autoscaler wants.
    pub desired_replicas: i32,
    /// When the target was last scaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
}
