//! The Sluice operator: reconciles `MessageQueue` resources into StatefulSets of queue agents
//! with their Services, PodDisruptionBudget, ConfigMap, ServiceAccount and NetworkPolicy, and
//! reports what it sees in the resource's status, conditions and events.
//!
//! # Layout
//! - [`crd`]: the `MessageQueue` spec and status types (the CRD is generated from them).
//! - [`controller`]: `Context`, `reconcile`, `error_policy` and `run`.
//! - [`builders`]: pure functions from a MessageQueue to each desired child object.
//! - [`status`]: the observed status and conditions, computed without any API call.
//! - [`agent_admin`]: the operator's calls into the agents (stats and membership).
//! - [`cluster_view`]: the agents' membership as the operator sees it.
//! - [`day2`]: rolling updates, scale-out, scale-in and PVC expansion.
//! - [`rbac`]: every Kubernetes API call the operator makes, for the chart's RBAC.
//! - [`args`]: the operator's flags.
//! - [`metrics`], [`telemetry`], [`http`], [`leader`]: the operator process around the controller.

pub mod agent_admin;
pub mod args;
pub mod builders;
pub mod cluster_view;
pub mod controller;
pub mod crd;
pub mod day2;
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
/// short label for the failure metric.
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
            Error::ReadFailed { .. } => "read_failed",
            Error::StatusPatchFailed { .. } => "status_patch_failed",
            Error::DeleteFailed { .. } => "delete_failed",
            Error::PatchFailed { .. } => "patch_failed",
            Error::AgentCallFailed { .. } => "agent_call_failed",
            Error::Serialization { .. } => "serialization",
        }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
