//! The MessageQueue controller: backoff, `reconcile`, `error_policy` and `run`; the state
//! they share is [`crate::context::Context`].
//!
//! Reconcile is level-based and idempotent: every pass server-side-applies all children from
//! the spec ([`crate::apply`], so drift is repaired at the next pass), reads the StatefulSet and
//! the agents, and writes the status only when it says something new. The controller watches
//! MessageQueues and the StatefulSets they own (whose status drives readiness); other children
//! are re-applied on the periodic requeue rather than watched, which keeps the operator's RBAC
//! and memory small. What a pass did or saw is published as events ([`crate::events`]).
//!
//! Day-2 operations (rolling update, scale-out, scale-in, PVC expansion) take one step per
//! pass, decided by [`crate::day2::decide`] from the StatefulSet, its pods and the agents'
//! membership and executed by [`crate::day2::execute`]; the StatefulSet's replicas are whatever
//! that step says, not `spec.replicas` directly, so a scale-in shrinks it only after the
//! leaving agent was drained and removed.
//!
//! Deletion: there is no finalizer, because nothing outside Kubernetes needs cleaning up.
//! Every child carries a controller owner reference and is garbage-collected with the
//! MessageQueue; the agents' PersistentVolumeClaims are retained (decision 0005).

use std::{sync::Arc, time::Duration};

use futures::{Future, StreamExt};
use k8s_openapi::{api::apps::v1::StatefulSet, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api,
    runtime::{Controller, controller::Action, events::EventType, reflector::ObjectRef, watcher},
};
use tracing::{info, warn};

use crate::{
    Error, Result,
    agent_admin::{ADMIN_TIMEOUT, QueueStats},
    apply,
    builders::{self, statefulset::Shape},
    context::Context,
    crd::{MessageQueue, condition_types},
    day2::{
        self, Step,
        agents::ServiceAddresses,
        execute::{execute_step, expand_claims, observe},
    },
    events::{self, event_reasons},
    names::{Names, display_name},
    status::{self, Observed},
};

/// Requeue interval while everything is ready: refreshes backlog counters and repairs drift.
pub const REQUEUE_READY: Duration = Duration::from_secs(30);
/// Requeue interval while the cluster is converging.
pub const REQUEUE_CONVERGING: Duration = Duration::from_secs(10);
/// First retry delay after a failed reconcile; doubles per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay after failures.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Retry delay after `failures` consecutive failures: 5 s, 10 s, 20 s ... at most 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

/// The counters of every queue, or `None` (after a Warning event) as soon as one cannot be read:
/// the status then shows no counters rather than a partial sum.
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
                events::publish(
                    &ctx.recorder,
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
                events::publish(
                    &ctx.recorder,
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
        events::publish_failure(&ctx.recorder, &mq, e).await;
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
    let applied = apply::apply_children(&ctx.client, &names.namespace, &children).await?;
    events::publish_applied(&ctx.recorder, mq, names, existing.as_ref(), &applied).await;

    let day2_progress = execute_step(mq, names, ctx, &addresses, &step).await?;
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
        apply::apply_status(&ctx.client, &names.namespace, &names.instance, &new_status).await?;
        events::publish_transitions(&ctx.recorder, mq, &new_status).await;
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
