//! The `MessageQueue` custom resource (`sluice.dev/v1alpha1`): spec, status and the validation
//! rules the API server enforces at `kubectl apply` time.
//!
//! Validation lives in the schema so that a bad spec is refused before it is stored, never
//! discovered later in a crash loop: bounds and patterns through schemars attributes, and the
//! rules a schema alone cannot say as CEL (`x-kubernetes-validations`). Every message names the
//! field it is about, because that is what `kubectl apply` prints.

mod status;

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

pub use status::{
    Condition, ConsumerStatus, MessageQueueStatus, PartitionStatus, QueueStatus, condition_reasons,
    condition_types,
};

/// Agent pods when `spec.replicas` is left out.
pub const REPLICAS_DEFAULT: i32 = 3;
/// Replication factor when a queue leaves it out: three copies, or fewer on smaller clusters.
pub const REPLICATION_FACTOR_DEFAULT: i32 = 3;
/// Volume size per agent when `spec.storage.size` is left out.
pub const STORAGE_SIZE_DEFAULT: &str = "10Gi";

/// Pattern of a queue name, the same rule the agent's API applies (`QueueSpec.name`).
const QUEUE_NAME_PATTERN: &str = r"^[a-z0-9][a-z0-9._-]{0,63}$";
/// Pattern of a duration: one or more `<integer><unit>` groups, units `ms`, `s`, `m`, `h`.
const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";
/// Pattern of a byte quantity in Kubernetes notation restricted to whole bytes: an integer with
/// an optional binary or decimal suffix.
const BYTES_PATTERN: &str = r"^[0-9]+(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// Desired state of a Sluice queue cluster.
///
/// The operator turns it into a StatefulSet of `sluice-agent broker` pods with their Services,
/// PodDisruptionBudget, ConfigMap, ServiceAccount and NetworkPolicy.
// Clippy reads the repeated `type_ = ...` of separate `printcolumn(...)` entries as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "MessageQueue",
    plural = "messagequeues",
    shortname = "mq",
    namespaced,
    status = "MessageQueueStatus",
    derive = "PartialEq",
    doc = "A durable, replicated message queue cluster run by the Sluice operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Whether the queue cluster serves with every partition at quorum",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        description = "Ready agents out of desired agents",
        json_path = ".status.replicasSummary"
    ),
    printcolumn(
        name = "Backlog",
        type_ = "integer",
        description = "Messages not yet acknowledged, over all queues",
        json_path = ".status.backlog"
    ),
    printcolumn(
        name = "Consumers",
        type_ = "integer",
        description = "Consumers subscribed, over all queues",
        json_path = ".status.consumerCount"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.queues.all(q, !has(q.replicationFactor) || q.replicationFactor <= self.replicas)")
        .message("spec.queues[].replicationFactor must not exceed spec.replicas")
        .field_path(".queues"),
    validation = Rule::new("self.queues.all(q, self.queues.exists_one(p, p.name == q.name))")
        .message("spec.queues[].name must be unique")
        .field_path(".queues")
)]
#[serde(rename_all = "camelCase")]
pub struct MessageQueueSpec {
    /// Agent pods in the StatefulSet. Every partition keeps `replicationFactor` copies spread
    /// over them.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: i32,

    /// Agent container image. Defaults to the image the operator was built for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Persistent volume of each agent (messages live on disk, never only in memory).
    #[serde(default)]
    pub storage: StorageSpec,

    /// CPU and memory of each agent container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Queues the agents declare. Empty means one queue named after the resource.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub queues: Vec<QueueSpec>,

    /// Workloads whose replica count follows a queue's backlog.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub consumers: Vec<ConsumerSpec>,
}

fn default_replicas() -> i32 {
    REPLICAS_DEFAULT
}

/// The persistent volume each agent gets through the StatefulSet's claim template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)")
        .message("spec.storage.storageClassName is immutable")
        .field_path(".storageClassName")
)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Volume size, e.g. `10Gi`. It may grow (the claims are expanded) but never shrink.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = BYTES_PATTERN), length(max = 32))]
    #[x_kube(
        validation = Rule::new("quantity(self).compareTo(quantity(oldSelf)) >= 0")
            .message("spec.storage.size may grow but never shrink")
    )]
    pub size: String,

    /// Storage class of the claims; the cluster default when left out. Fixed at creation,
    /// because a StatefulSet cannot move existing claims to another class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

fn default_storage_size() -> String {
    STORAGE_SIZE_DEFAULT.to_owned()
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// One queue the agents declare, with its delivery and retention settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("!has(self.maxDeliveries) || self.maxDeliveries == 0 || has(self.deadLetterQueue)")
        .message("spec.queues[].maxDeliveries requires spec.queues[].deadLetterQueue")
        .field_path(".maxDeliveries"),
    validation = Rule::new("!has(self.deadLetterQueue) || self.deadLetterQueue != self.name")
        .message("spec.queues[].deadLetterQueue must differ from spec.queues[].name")
        .field_path(".deadLetterQueue")
)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Queue name: 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or digit.
    #[schemars(regex(pattern = QUEUE_NAME_PATTERN), length(max = 64))]
    pub name: String,

    /// Partitions, each an independent log with its own order and its own leader. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub partitions: Option<i32>,

    /// Copies of each partition; a publish is confirmed once a majority has it. Default
    /// `min(3, spec.replicas)`; never more than `spec.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 7))]
    pub replication_factor: Option<i32>,

    /// How long a delivery may stay unacknowledged before it is redelivered, e.g. `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub ack_timeout: Option<String>,

    /// Deliveries without an ack after which a message moves to the dead-letter queue; 0 or
    /// unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_deliveries: Option<i32>,

    /// Queue that receives rejected, expired and over-delivered messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUEUE_NAME_PATTERN), length(max = 64))]
    pub dead_letter_queue: Option<String>,

    /// Default time-to-live of messages, e.g. `24h`; unset means they never expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub message_ttl: Option<String>,

    /// Backlog limits and what happens when they are reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backlog: Option<MaxBacklog>,

    /// Whether per-message priorities (0..=9, higher first) are honoured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priorities: Option<bool>,
}

/// Limits on a queue's backlog (ready + delayed + in flight).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MaxBacklog {
    /// Most messages the queue holds; unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub messages: Option<i64>,

    /// Most payload bytes the queue holds, e.g. `50Gi`; unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = BYTES_PATTERN), length(max = 32))]
    pub bytes: Option<String>,

    /// What a publish meets once a limit is reached. Default `reject-publish`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overflow: Option<Overflow>,
}

/// Overflow policy of a full queue.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// New publishes fail with `RESOURCE_EXHAUSTED` until the backlog drains below the limit.
    RejectPublish,
}

/// Backlog-driven autoscaling of an existing workload that consumes a queue.
///
/// Only the types exist so far; the autoscaler that acts on them comes with the day-2 work.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!has(self.minReplicas) || self.minReplicas <= self.maxReplicas")
        .message("spec.consumers[].minReplicas must not exceed spec.consumers[].maxReplicas")
        .field_path(".minReplicas")
)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerSpec {
    /// Queue whose backlog drives the scaling.
    #[schemars(regex(pattern = QUEUE_NAME_PATTERN), length(max = 64))]
    pub queue: String,

    /// The workload to scale through its `/scale` subresource.
    pub scale_target_ref: ScaleTargetRef,

    /// Fewest replicas; 0 allows scale-to-zero when nothing is in flight. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub min_replicas: Option<i32>,

    /// Most replicas.
    #[schemars(range(min = 1, max = 10000))]
    pub max_replicas: i32,

    /// Backlog one replica is expected to handle. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_backlog_per_replica: Option<i64>,

    /// When set, also size for the publish rate so the backlog drains within this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub target_drain_seconds: Option<i32>,
}

/// Reference to a workload with a `/scale` subresource.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTargetRef {
    /// API version of the target, e.g. `apps/v1`.
    #[schemars(length(min = 1, max = 253))]
    pub api_version: String,
    /// Kind of the target, e.g. `Deployment`.
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    /// Name of the target in the MessageQueue's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl MessageQueueSpec {
    /// The queues the agents serve: the declared ones, or one named `default_name` (the
    /// resource's name) when none are declared.
    pub fn effective_queues(&self, default_name: &str) -> Vec<QueueSpec> {
        if self.queues.is_empty() {
            vec![QueueSpec {
                name: default_name.to_owned(),
                ..QueueSpec::default()
            }]
        } else {
            self.queues.clone()
        }
    }
}

impl QueueSpec {
    /// Partitions, with the default applied.
    pub fn effective_partitions(&self) -> i32 {
        self.partitions.unwrap_or(1)
    }

    /// Replication factor, with the default applied for a cluster of `replicas` agents.
    pub fn effective_replication_factor(&self, replicas: i32) -> i32 {
        self.replication_factor
            .unwrap_or_else(|| REPLICATION_FACTOR_DEFAULT.min(replicas))
            .max(1)
    }
}

#[cfg(test)]
mod tests;

/// The CRD as the YAML committed under `crds/`, with a header saying how to regenerate it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&MessageQueue::crd())?;
    Ok(format!(
        "# Generated by `cargo run -p sluice-operator --bin crdgen > crds/messagequeue.yaml`; do not edit.\n{body}"
    ))
}
