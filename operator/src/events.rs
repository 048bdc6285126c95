//! Kubernetes events about MessageQueues: the constant reasons, publishing one event, and
//! which events a pass is worth (a failure, a create or update of the StatefulSet, readiness
//! and degradation transitions of the status; the day-2 executor publishes its steps' own).
//!
//! Events are best-effort: one that cannot be written is logged and never fails the reconcile
//! it describes. Which reason a failed reconcile is reported under is decided by the error
//! itself, [`Error::event_reason`].

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::{
    Resource,
    runtime::events::{Event, EventType, Recorder},
};
use tracing::warn;

use crate::{
    Error,
    crd::{MessageQueue, MessageQueueStatus, condition_reasons, condition_types},
    names::{Names, display_name},
};

/// Event reasons, constant so that `kubectl get events --field-selector reason=...` and alerts
/// can rely on them.
pub mod event_reasons {
    /// The agents' StatefulSet was created.
    pub const CREATED: &str = "Created";
    /// A spec change was applied to the agents' StatefulSet.
    pub const UPDATED: &str = "Updated";
    /// Applying a child object failed.
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// Another field manager applied fields the operator sets on a child; left to it.
    pub const FIELD_CONFLICT: &str = "FieldConflict";
    /// The spec holds a value the operator cannot use.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// Writing the status failed.
    pub const STATUS_UPDATE_FAILED: &str = "StatusUpdateFailed";
    /// The agents could not be asked for their counters.
    pub const AGENT_STATS_UNAVAILABLE: &str = "AgentStatsUnavailable";
    /// `spec.storage.size` grew and an agent's claim was patched to the new size.
    pub const STORAGE_EXPANDED: &str = "StorageExpanded";
    /// Patching a claim's size was refused (e.g. its storage class does not allow expansion).
    pub const STORAGE_EXPANSION_FAILED: &str = "StorageExpansionFailed";
    /// The StatefulSet grows; new agents are added to the cluster.
    pub const SCALING_OUT: &str = "ScalingOut";
    /// Agents are drained and removed, then the StatefulSet shrinks.
    pub const SCALING_IN: &str = "ScalingIn";
    /// A scale-in would leave fewer agents than the replication factor; the spec is left as is.
    pub const SCALE_IN_REFUSED: &str = "ScaleInRefused";
    /// An agent was added to the cluster.
    pub const AGENT_ADDED: &str = "AgentAdded";
    /// An agent is being drained.
    pub const AGENT_DRAINING: &str = "AgentDraining";
    /// A drained agent was removed from the cluster.
    pub const AGENT_REMOVED: &str = "AgentRemoved";
    /// An agent handed off its leaderships and its pod was deleted to restart on the new
    /// revision.
    pub const AGENT_RESTARTED: &str = "AgentRestarted";
    /// An agent could not hand off every leadership; its restart waits.
    pub const HAND_OFF_INCOMPLETE: &str = "HandOffIncomplete";
    /// A day-2 call into the agents, or deleting a pod, failed; retried with backoff.
    pub const DAY2_FAILED: &str = "Day2Failed";
    /// Every agent became ready.
    pub const READY: &str = "Ready";
    /// The cluster stopped being ready.
    pub const NOT_READY: &str = "NotReady";
    /// Partitions may be unable to confirm publishes.
    pub const QUORUM_LOST: &str = "QuorumLost";
    /// Partitions run with fewer replicas than configured.
    pub const UNDER_REPLICATED: &str = "UnderReplicated";
}

/// Publishes one event about `mq` with `reason` (one of [`event_reasons`]).
pub(crate) async fn publish(
    recorder: &Recorder,
    mq: &MessageQueue,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    // An event that cannot be written must not fail the reconcile it describes.
    if let Err(e) = recorder.publish(&event, &mq.object_ref(&())).await {
        warn!(mq = %display_name(mq), reason, error = %e, "publishing event failed");
    }
}

/// Publishes the Warning event of a failed reconcile, under [`Error::event_reason`].
pub(crate) async fn publish_failure(recorder: &Recorder, mq: &MessageQueue, error: &Error) {
    let note = error.to_string();
    publish(
        recorder,
        mq,
        EventType::Warning,
        error.event_reason(),
        "Reconcile",
        note,
    )
    .await;
}

/// Publishes what applying the children did to the StatefulSet: Created when `existing` is
/// `None`, Updated when its generation moved. Every pass applies, so an apply that changed
/// nothing is not worth an event.
pub(crate) async fn publish_applied(
    recorder: &Recorder,
    mq: &MessageQueue,
    names: &Names,
    existing: Option<&StatefulSet>,
    applied: &StatefulSet,
) {
    let (reason, note) = match existing {
        None => (
            event_reasons::CREATED,
            format!(
                "created StatefulSet {} with {} agents",
                names.statefulset(),
                mq.spec.replicas
            ),
        ),
        Some(old) if old.metadata.generation != applied.metadata.generation => (
            event_reasons::UPDATED,
            format!(
                "applied spec generation {} to StatefulSet {}",
                mq.metadata.generation.unwrap_or(0),
                names.statefulset()
            ),
        ),
        Some(_) => return,
    };
    publish(recorder, mq, EventType::Normal, reason, "Apply", note).await;
}

/// Publishes the changes from `mq`'s stored status to `new` that someone should hear of: Ready
/// turning on or off, and Degraded turning on.
pub(crate) async fn publish_transitions(
    recorder: &Recorder,
    mq: &MessageQueue,
    new: &MessageQueueStatus,
) {
    let old = mq.status.as_ref();
    let new_ready = condition_status(Some(new), condition_types::READY);
    if new_ready != condition_status(old, condition_types::READY)
        && let Some((status, reason)) = new_ready
        // The first "not ready" while the StatefulSet is still being created is expected.
        && (status == "True" || old.is_some())
    {
        let (type_, event) = if status == "True" {
            (EventType::Normal, event_reasons::READY)
        } else {
            (EventType::Warning, event_reasons::NOT_READY)
        };
        let note = format!("{reason}: {}", message_of(new, condition_types::READY));
        publish(recorder, mq, type_, event, "Observe", note).await;
    }
    let new_degraded = condition_status(Some(new), condition_types::DEGRADED);
    if new_degraded != condition_status(old, condition_types::DEGRADED)
        && let Some(("True", reason)) = new_degraded
    {
        let event = if reason == condition_reasons::QUORUM_LOST {
            event_reasons::QUORUM_LOST
        } else {
            event_reasons::UNDER_REPLICATED
        };
        publish(
            recorder,
            mq,
            EventType::Warning,
            event,
            "Observe",
            message_of(new, condition_types::DEGRADED),
        )
        .await;
    }
}

/// The status and reason of condition `type_`, if `s` has it.
fn condition_status<'a>(
    s: Option<&'a MessageQueueStatus>,
    type_: &str,
) -> Option<(&'a str, &'a str)> {
    s?.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// The message of condition `type_`, empty when `s` lacks it.
fn message_of(s: &MessageQueueStatus, type_: &str) -> String {
    s.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}
