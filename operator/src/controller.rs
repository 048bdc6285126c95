//! The MessageQueue controller: `Context`, `reconcile`, `error_policy` and `run`.
//!
//! Reconcile is level-based and idempotent: every pass server-side-applies all children from
//! the spec (so drift is repaired at the next pass), reads the StatefulSet and the agents, and
//! writes the status only when it says something new. The controller watches MessageQueues and
//! the StatefulSets they own (whose status drives readiness); other children are re-applied on
//! the periodic requeue rather than watched, which keeps the operator's RBAC and memory small.
//!
//! Day-2 operations (rolling update, scale-out, scale-in, PVC expansion) take one step per
//! pass, decided by [`crate::day2::decide`] from the StatefulSet, its pods and the agents'
//! membership; the StatefulSet's replicas are whatever that step says, not `spec.replicas`
//! directly, so a scale-in shrinks it only after the leaving agent was drained and removed.
//!
//! Deletion: there is no finalizer, because nothing outside Kubernetes needs cleaning up.
//! Every child carries a controller owner reference and is garbage-collected with the
//! MessageQueue; the agents' PersistentVolumeClaims are retained (decision 0005).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Future, StreamExt};
use k8s_openapi::{api::apps::v1::StatefulSet, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::ObjectRef,
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::{info, warn};

use crate::{
    Error, FIELD_MANAGER, Result,
    agent_admin::{ADMIN_TIMEOUT, AgentAdmin, QueueStats},
    builders::{
        self, Children,
        statefulset::{self as sts_builder, Shape},
    },
    crd::{MessageQueue, condition_types},
    day2::{
        self, Membership, Progress, Snapshot, Step,
        agents::{Outcome, ServiceAddresses},
        kube_ops,
    },
    metrics::Metrics,
    names::{Names, display_name},
    settings::Settings,
    status::{self, Observed},
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

/// Requeue interval while everything is ready: refreshes backlog counters and repairs drift.
pub const REQUEUE_READY: Duration = Duration::from_secs(30);
/// Requeue interval while the cluster is converging.
pub const REQUEUE_CONVERGING: Duration = Duration::from_secs(10);
/// First retry delay after a failed reconcile; doubles per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay after failures.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Shared state of all reconciles.
pub struct Context {
    /// Client of the Kubernetes API.
    pub client: Client,
    /// Publishes Kubernetes events about MessageQueues.
    pub recorder: Recorder,
    /// Operator-wide settings of the builders.
    pub settings: Settings,
    /// Calls into the agents (stats now; day-2 operations later).
    pub admin: Arc<dyn AgentAdmin>,
    /// Prometheus metrics of the controller.
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per MessageQueue, for `error_policy`'s exponential backoff; an
    /// entry is removed by the next successful reconcile.
    pub failures: Mutex<HashMap<ObjectRef<MessageQueue>, u32>>,
}

impl Context {
    /// A context with an empty failure table.
    pub fn new(
        client: Client,
        settings: Settings,
        admin: Arc<dyn AgentAdmin>,
        metrics: Arc<Metrics>,
        reporter: Reporter,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        Self {
            client,
            recorder,
            settings,
            admin,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failure_count(&self, key: &ObjectRef<MessageQueue>) -> u32 {
        self.failures
            .lock()
            .map(|f| f.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn record_failure(&self, key: ObjectRef<MessageQueue>) -> u32 {
        match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(key).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        }
    }

    fn clear_failures(&self, key: &ObjectRef<MessageQueue>) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    async fn publish(
        &self,
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
        if let Err(e) = self.recorder.publish(&event, &mq.object_ref(&())).await {
            warn!(mq = %display_name(mq), reason, error = %e, "publishing event failed");
        }
    }
}

/// Retry delay after `failures` consecutive failures: 5 s, 10 s, 20 s ... at most 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

async fn apply<K>(client: &Client, namespace: &str, obj: &K, kind: &'static str) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::ApplyFailed { kind, name, source })
}

async fn apply_children(client: &Client, namespace: &str, c: &Children) -> Result<StatefulSet> {
    apply(client, namespace, &c.service_account, "ServiceAccount").await?;
    apply(client, namespace, &c.configmap, "ConfigMap").await?;
    apply(client, namespace, &c.headless_service, "Service").await?;
    apply(client, namespace, &c.client_service, "Service").await?;
    apply(client, namespace, &c.pdb, "PodDisruptionBudget").await?;
    apply(client, namespace, &c.network_policy, "NetworkPolicy").await?;
    apply(client, namespace, &c.statefulset, "StatefulSet").await
}

async fn read_stats(
    mq: &MessageQueue,
    names: &Names,
    ctx: &Context,
) -> Option<Vec<(String, QueueStats)>> {
    let endpoint = names.client_endpoint(&ctx.settings.cluster_domain);
    let mut all = Vec::new();
    for queue in mq.spec.effective_queues(&names.instance) {
        let result =
            tokio::time::timeout(ADMIN_TIMEOUT, ctx.admin.queue_stats(&endpoint, &queue.name))
                .await;
        match result {
            Ok(Ok(stats)) => all.push((queue.name, stats)),
            Ok(Err(e)) => {
                ctx.publish(
                    mq,
                    EventType::Warning,
                    event_reasons::AGENT_STATS_UNAVAILABLE,
                    "ReadStats",
                    e.to_string(),
                )
                .await;
                return None;
            }
            Err(_) => {
                let note = format!(
                    "reading stats of queue {} from {endpoint} took longer than {ADMIN_TIMEOUT:?}",
                    queue.name
                );
                ctx.publish(
                    mq,
                    EventType::Warning,
                    event_reasons::AGENT_STATS_UNAVAILABLE,
                    "ReadStats",
                    note,
                )
                .await;
                return None;
            }
        }
    }
    Some(all)
}

fn condition_status<'a>(
    s: Option<&'a crate::crd::MessageQueueStatus>,
    type_: &str,
) -> Option<(&'a str, &'a str)> {
    s?.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

async fn publish_transitions(
    mq: &MessageQueue,
    new: &crate::crd::MessageQueueStatus,
    ctx: &Context,
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
        ctx.publish(mq, type_, event, "Observe", note).await;
    }
    let new_degraded = condition_status(Some(new), condition_types::DEGRADED);
    if new_degraded != condition_status(old, condition_types::DEGRADED)
        && let Some(("True", reason)) = new_degraded
    {
        let event = if reason == crate::crd::condition_reasons::QUORUM_LOST {
            event_reasons::QUORUM_LOST
        } else {
            event_reasons::UNDER_REPLICATED
        };
        ctx.publish(
            mq,
            EventType::Warning,
            event,
            "Observe",
            message_of(new, condition_types::DEGRADED),
        )
        .await;
    }
}

fn message_of(s: &crate::crd::MessageQueueStatus, type_: &str) -> String {
    s.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Brings one MessageQueue's children and status in line with its spec.
pub async fn reconcile(mq: Arc<MessageQueue>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer();
    let names = Names::of(&mq)?;
    if mq.metadata.deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove the children; nothing to do.
        return Ok(Action::await_change());
    }
    let result = reconcile_inner(&mq, &names, &ctx).await;
    if let Err(e) = &result {
        let reason = match e {
            Error::ApplyFailed { .. } => event_reasons::APPLY_FAILED,
            Error::InvalidSpec { .. } => event_reasons::INVALID_SPEC,
            Error::StatusPatchFailed { .. } => event_reasons::STATUS_UPDATE_FAILED,
            Error::AgentCallFailed { .. } | Error::DeleteFailed { .. } => {
                event_reasons::DAY2_FAILED
            }
            Error::PatchFailed { .. } => event_reasons::STORAGE_EXPANSION_FAILED,
            _ => event_reasons::APPLY_FAILED,
        };
        ctx.publish(&mq, EventType::Warning, reason, "Reconcile", e.to_string())
            .await;
    } else {
        ctx.clear_failures(&ObjectRef::from_obj(mq.as_ref()));
    }
    result
}

async fn reconcile_inner(mq: &MessageQueue, names: &Names, ctx: &Context) -> Result<Action> {
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let existing = sts_api
        .get_opt(&names.statefulset())
        .await
        .map_err(|source| Error::ReadFailed {
            kind: "StatefulSet",
            name: names.statefulset(),
            source,
        })?;
    let addresses = ServiceAddresses {
        names: names.clone(),
        cluster_domain: ctx.settings.cluster_domain.clone(),
    };

    // The StatefulSet's replicas move one day-2 step at a time; its peer env and claim
    // template stay as created.
    let (shape, step) = match &existing {
        None => (Shape::initial(mq), Step::Steady),
        Some(sts) => {
            let snapshot = observe(mq, names, sts, ctx, &addresses).await?;
            let step = day2::decide(&snapshot);
            let replicas = match &step {
                Step::Scale { replicas, .. } => *replicas,
                _ => snapshot.current,
            };
            (Shape::of_existing(mq, sts, replicas), step)
        }
    };

    let children = builders::build_all(mq, &ctx.settings, &shape)?;
    let applied = apply_children(&ctx.client, &names.namespace, &children).await?;
    match &existing {
        None => {
            let note = format!(
                "created StatefulSet {} with {} agents",
                names.statefulset(),
                mq.spec.replicas
            );
            ctx.publish(mq, EventType::Normal, event_reasons::CREATED, "Apply", note)
                .await;
        }
        Some(old) if old.metadata.generation != applied.metadata.generation => {
            let note = format!(
                "applied spec generation {} to StatefulSet {}",
                mq.metadata.generation.unwrap_or(0),
                names.statefulset()
            );
            ctx.publish(mq, EventType::Normal, event_reasons::UPDATED, "Apply", note)
                .await;
        }
        Some(_) => {}
    }

    let day2_progress = carry_out(mq, names, ctx, &addresses, &step).await?;
    if existing.is_some() {
        expand_claims(mq, names, ctx, shape.replicas).await?;
    }

    let ready_replicas = applied
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let queue_stats = if ready_replicas > 0 {
        read_stats(mq, names, ctx).await
    } else {
        None
    };
    let observed = Observed {
        statefulset: Some(applied),
        queue_stats,
        day2: day2_progress.clone(),
    };
    let new_status = status::desired_status(mq, names, &observed, Time(jiff_now()));

    if status::is_material_change(mq.status.as_ref(), &new_status) {
        let api: Api<MessageQueue> = Api::namespaced(ctx.client.clone(), &names.namespace);
        let patch = serde_json::json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "MessageQueue",
            "status": new_status,
        });
        api.patch_status(
            &names.instance,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|source| Error::StatusPatchFailed {
            name: names.instance.clone(),
            source,
        })?;
        publish_transitions(mq, &new_status, ctx).await;
    }

    let all_ready = new_status
        .conditions
        .iter()
        .any(|c| c.type_ == condition_types::READY && c.status == "True");
    Ok(Action::requeue(
        if matches!(day2_progress, Some((true, _))) {
            day2::REQUEUE_DAY2
        } else if all_ready {
            REQUEUE_READY
        } else {
            REQUEUE_CONVERGING
        },
    ))
}

/// What the day-2 decision looks at: the StatefulSet, its pods and (once an agent is ready)
/// the agents' membership.
async fn observe(
    mq: &MessageQueue,
    names: &Names,
    sts: &StatefulSet,
    ctx: &Context,
    addresses: &ServiceAddresses,
) -> Result<Snapshot> {
    let current = sts
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(mq.spec.replicas);
    let status = sts.status.clone().unwrap_or_default();
    let pods = kube_ops::pods(&ctx.client, names).await?;
    let membership = if status.ready_replicas.unwrap_or(0) == 0 {
        Membership::Unreadable("no agent is ready".to_owned())
    } else {
        read_membership(ctx, addresses).await
    };
    // The agents' own factor is the one their drains are checked against; the spec's may
    // differ when the spec changed after the cluster bootstrapped.
    let agents_factor = match &membership {
        Membership::Known(view) => i32::try_from(view.replication_factor).unwrap_or(i32::MAX),
        Membership::Unreadable(_) => 0,
    };
    Ok(Snapshot {
        desired: mq.spec.replicas,
        current,
        replication_factor: sts_builder::replication_factor(mq, names).max(agents_factor),
        update_revision: status.update_revision,
        pods,
        membership,
    })
}

async fn read_membership(ctx: &Context, addresses: &ServiceAddresses) -> Membership {
    use day2::agents::AgentAddresses as _;
    let endpoint = addresses.cluster();
    match tokio::time::timeout(ADMIN_TIMEOUT, ctx.admin.cluster(&endpoint)).await {
        Ok(Ok(view)) => Membership::Known(view),
        Ok(Err(e)) => Membership::Unreadable(e.to_string()),
        Err(_) => Membership::Unreadable(format!(
            "GetCluster at {endpoint} took longer than {ADMIN_TIMEOUT:?}"
        )),
    }
}

/// Carries out `step` (the StatefulSet's replicas were already applied) and publishes its
/// event; returns what the Progressing condition should say.
async fn carry_out(
    mq: &MessageQueue,
    names: &Names,
    ctx: &Context,
    addresses: &ServiceAddresses,
    step: &Step,
) -> Result<Option<(bool, Progress)>> {
    let progress = step.progress();
    let outcome = match tokio::time::timeout(
        ADMIN_TIMEOUT,
        day2::agents::perform(ctx.admin.as_ref(), addresses, step),
    )
    .await
    {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) if matches!(step, Step::Drain(_)) && e.is_precondition() => {
            // The agents' own check (fewer ACTIVE agents would remain than the factor) is
            // the last word: report it as a refused scale-in, not as a failure to retry.
            let progress = Progress {
                reason: day2::plan::reasons::SCALE_IN_REFUSED,
                message: format!("the agents refused the drain: {e}"),
            };
            ctx.publish(
                mq,
                EventType::Warning,
                event_reasons::SCALE_IN_REFUSED,
                "Drain",
                progress.message.clone(),
            )
            .await;
            return Ok(Some((false, progress)));
        }
        Ok(Err(source)) => {
            return Err(Error::AgentCallFailed {
                step: describe(step),
                source,
            });
        }
        Err(_) => {
            return Err(Error::AgentCallFailed {
                step: describe(step),
                source: crate::agent_admin::AdminError::Unreachable {
                    endpoint: day2::agents::AgentAddresses::cluster(addresses),
                    reason: format!("no answer within {ADMIN_TIMEOUT:?}"),
                },
            });
        }
    };
    let (type_, reason, action, note) = match (step, outcome) {
        (Step::Scale { replicas, progress }, _) => {
            let reason = if progress.reason == day2::plan::reasons::SCALING_OUT {
                event_reasons::SCALING_OUT
            } else {
                event_reasons::SCALING_IN
            };
            let note = format!(
                "StatefulSet replicas set to {replicas}: {}",
                progress.message
            );
            (EventType::Normal, reason, "Scale", note)
        }
        (Step::RefuseScaleIn(p), _) => (
            EventType::Warning,
            event_reasons::SCALE_IN_REFUSED,
            "Scale",
            p.message.clone(),
        ),
        (Step::Add(_), Outcome::Done(note)) => (
            EventType::Normal,
            event_reasons::AGENT_ADDED,
            "AddAgent",
            note,
        ),
        (Step::Drain(_), Outcome::Done(note)) => (
            EventType::Normal,
            event_reasons::AGENT_DRAINING,
            "DrainAgent",
            note,
        ),
        (Step::Remove(_), Outcome::Done(note)) => (
            EventType::Normal,
            event_reasons::AGENT_REMOVED,
            "RemoveAgent",
            note,
        ),
        (Step::Restart(i), Outcome::Done(note)) => {
            kube_ops::delete_pod(&ctx.client, names, *i).await?;
            (
                EventType::Normal,
                event_reasons::AGENT_RESTARTED,
                "Restart",
                format!(
                    "{note}; deleted pod {}-{i} to restart it on the new revision",
                    names.statefulset()
                ),
            )
        }
        (Step::Restart(i), Outcome::HandOffIncomplete(remaining)) => (
            EventType::Warning,
            event_reasons::HAND_OFF_INCOMPLETE,
            "Restart",
            format!(
                "agent {i} still leads {} (no caught-up replica yet); its restart waits",
                remaining.join(", ")
            ),
        ),
        _ => return Ok(progress),
    };
    ctx.publish(mq, type_, reason, action, note).await;
    Ok(progress)
}

fn describe(step: &Step) -> String {
    match step {
        Step::Add(i) => format!("adding agent {i}"),
        Step::Drain(i) => format!("draining agent {i}"),
        Step::Remove(i) => format!("removing agent {i}"),
        Step::Restart(i) => format!("handing off agent {i}'s leaderships"),
        other => format!("{other:?}"),
    }
}

/// Grows every agent claim smaller than `spec.storage.size` (the claim template itself is
/// immutable and keeps its size; a claim created later from it is grown by the next pass).
async fn expand_claims(
    mq: &MessageQueue,
    names: &Names,
    ctx: &Context,
    replicas: i32,
) -> Result<()> {
    let claims = kube_ops::claims(&ctx.client, names, replicas).await?;
    for name in day2::claims::to_expand(&claims, &mq.spec.storage.size)? {
        kube_ops::expand_claim(&ctx.client, names, &name, &mq.spec.storage.size).await?;
        let note = format!(
            "requested {} for claim {name} (the storage class must allow volume expansion)",
            mq.spec.storage.size
        );
        ctx.publish(
            mq,
            EventType::Normal,
            event_reasons::STORAGE_EXPANDED,
            "ExpandStorage",
            note,
        )
        .await;
    }
    Ok(())
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

/// Logs the failure, counts it by [`Error::metric_label`], and retries with exponential backoff
/// per MessageQueue.
pub fn error_policy(mq: Arc<MessageQueue>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.record_failure(ObjectRef::from_obj(mq.as_ref()));
    let delay = backoff(failures);
    warn!(mq = %display_name(&mq), error = %error, failures, retry_in = ?delay, "reconcile failed");
    ctx.metrics.reconcile_failure(error.metric_label());
    Action::requeue(delay)
}

/// How many failures `mq` has had in a row (for tests and diagnostics).
pub fn failures_of(ctx: &Context, mq: &MessageQueue) -> u32 {
    ctx.failure_count(&ObjectRef::from_obj(mq))
}

/// Runs the controller until `shutdown` resolves; `namespace` limits it to one namespace.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (mqs, statefulsets): (Api<MessageQueue>, Api<StatefulSet>) = match &namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    info!(
        namespace = namespace.as_deref().unwrap_or("<all>"),
        "starting MessageQueue controller"
    );
    Controller::new(mqs, watcher::Config::default().any_semantic())
        .owns(statefulsets, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(mq = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile loop reported an error"),
            }
        })
        .await;
    info!("MessageQueue controller stopped");
}
