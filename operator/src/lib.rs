//! The Sluice operator: reconciles `MessageQueue` resources into StatefulSets of queue agents
//! with their Services, PodDisruptionBudget, ConfigMap, ServiceAccount and NetworkPolicy, and
//! reports what it sees in the resource's status, conditions and events.
//!
//! # Layout
//! - [`crd`]: the `MessageQueue` spec and status types (the CRD is generated from them).
//! - [`controller`]: backoff, `reconcile`, `error_policy` and `run`.
//! - [`context`]: `Context`, what every reconcile shares.
//! - [`apply`]: server-side apply of the children and the status, under [`FIELD_MANAGER`].
//! - [`events`]: the Kubernetes events about MessageQueues and their reasons.
//! - [`field_conflicts`]: whose fields stand in an apply's way, and whether to take them back.
//! - [`builders`]: pure functions from a MessageQueue to each desired child object.
//! - [`status`]: the observed status and conditions, computed without any API call.
//! - [`agent_admin`]: the operator's calls into the agents (stats and membership).
//! - [`cluster_view`]: the agents' membership as the operator sees it.
//! - [`day2`]: rolling updates, scale-out, scale-in and PVC expansion.
//! - [`rbac`]: every Kubernetes API call the operator makes, for the chart's RBAC.
//! - [`args`]: the operator's flags.
//! - [`metrics`], [`telemetry`], [`http`], [`leader`]: the operator process around the controller.

pub mod agent_admin;
/// Server-side apply of a MessageQueue's children and status, under [`FIELD_MANAGER`].
pub mod apply;
pub mod args;
pub mod builders;
pub mod cluster_view;
pub mod context;
pub mod controller;
pub mod crd;
pub mod day2;
/// The Kubernetes events about MessageQueues: reasons, publishing, status transitions.
pub mod events;
pub mod field_conflicts;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod rbac;
pub mod settings;
pub mod status;
pub mod telemetry;
pub mod units;

/// The one field manager of every server-side apply the operator makes, so that it owns exactly
/// the fields it sets and `kubectl` edits of other fields survive.
pub const FIELD_MANAGER: &str = "sluice-operator";

/// Everything that can make a reconcile fail. Variants are named for the outcome; each maps to a
/// short label for the failure metric and to the reason of the event reporting it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object lacks a field the API server always sets (a corrupt cache, not user input).
    #[error("MessageQueue has no {0}")]
    MissingObjectKey(&'static str),

    /// A spec value that the schema should have refused (e.g. stored before a schema change).
    #[error("invalid {field}: {reason}")]
    InvalidSpec {
        /// Path of the offending field, e.g. `spec.queues[0].ackTimeout`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Server-side apply of a child object was refused or failed.
    #[error("applying {kind} {name} failed: {source}")]
    ApplyFailed {
        /// Kind of the child.
        kind: &'static str,
        /// Name of the child.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// Reading a child object failed (other than "not found").
    #[error("reading {kind} {name} failed: {source}")]
    ReadFailed {
        /// Kind of the object.
        kind: &'static str,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// Deleting an object (an agent pod, for a restart) failed.
    #[error("deleting {kind} {name} failed: {source}")]
    DeleteFailed {
        /// Kind of the object.
        kind: &'static str,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// Another manager applied fields the operator sets on a child; the operator does not take
    /// them (it would flap with that manager) until the other manager lets them go.
    #[error(
        "{kind} {name}: {fields} applied by {} (server-side apply); the operator does not take fields another manager applied: remove them from that manager's configuration or delete its field ownership",
        managers.join(", ")
    )]
    FieldConflict {
        /// Kind of the child.
        kind: &'static str,
        /// Name of the child.
        name: String,
        /// The other managers that applied the fields.
        managers: Vec<String>,
        /// The fields, comma-separated.
        fields: String,
    },

    /// Patching an object the operator does not own (a claim, for expansion) failed.
    #[error("patching {kind} {name} failed: {source}")]
    PatchFailed {
        /// Kind of the object.
        kind: &'static str,
        /// Name of the object.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// A day-2 call into the agents failed.
    #[error("{step} failed: {source}")]
    AgentCallFailed {
        /// The step, e.g. `drain agent 3`.
        step: String,
        /// The agents' error.
        #[source]
        source: agent_admin::AdminError,
    },

    /// Writing the MessageQueue status failed.
    #[error("updating the status of {name} failed: {source}")]
    StatusPatchFailed {
        /// Name of the MessageQueue.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },

    /// A desired object could not be serialized (a bug, reported rather than panicking).
    #[error("serializing {what} failed: {source}")]
    Serialization {
        /// What was being serialized.
        what: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// Short, stable label of the failure for the `reconcile_failures_total` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::InvalidSpec { .. } => "invalid_spec",
            Error::ApplyFailed { .. } => "apply_failed",
            Error::FieldConflict { .. } => "field_conflict",
            Error::ReadFailed { .. } => "read_failed",
            Error::StatusPatchFailed { .. } => "status_patch_failed",
            Error::DeleteFailed { .. } => "delete_failed",
            Error::PatchFailed { .. } => "patch_failed",
            Error::AgentCallFailed { .. } => "agent_call_failed",
            Error::Serialization { .. } => "serialization",
        }
    }

    /// Reason of the Warning event that reports this failure on the MessageQueue, one of
    /// [`events::event_reasons`].
    pub fn event_reason(&self) -> &'static str {
        use events::event_reasons;
        match self {
            Error::ApplyFailed { .. } => event_reasons::APPLY_FAILED,
            Error::FieldConflict { .. } => event_reasons::FIELD_CONFLICT,
            Error::InvalidSpec { .. } => event_reasons::INVALID_SPEC,
            Error::StatusPatchFailed { .. } => event_reasons::STATUS_UPDATE_FAILED,
            Error::AgentCallFailed { .. } | Error::DeleteFailed { .. } => {
                event_reasons::DAY2_FAILED
            }
            // Only a claim's size is ever patched.
            Error::PatchFailed { .. } => event_reasons::STORAGE_EXPANSION_FAILED,
            // No reason of their own: events have always reported these as ApplyFailed, and
            // alerts match on reasons, so a new one would be a change of behaviour.
            Error::ReadFailed { .. } | Error::MissingObjectKey(_) | Error::Serialization { .. } => {
                event_reasons::APPLY_FAILED
            }
        }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
