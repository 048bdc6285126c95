//! The executor beside the pure [`decide`](crate::day2::decide): it observes the StatefulSet,
//! its pods and the agents' membership into a [`Snapshot`], executes the step `decide` chose
//! (the agents' half and a restart's pod deletion; reconcile applies the StatefulSet's replicas
//! with the other children), and grows the agents' claims, publishing an event for each.

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::runtime::events::EventType;

use super::{
    Membership, Progress, Snapshot, Step,
    agents::{self, AgentAddresses, Outcome, ServiceAddresses},
    claims, kube_ops, plan,
};
use crate::{
    Error, Result,
    agent_admin::{ADMIN_TIMEOUT, AdminError},
    builders::statefulset as sts_builder,
    context::Context,
    crd::MessageQueue,
    events::{self, event_reasons},
    names::Names,
};

/// What the day-2 decision looks at: the StatefulSet, its pods and (once an agent is ready)
/// the agents' membership.
pub(crate) async fn observe(
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

/// The agents' membership, or why it could not be read: not an error, since `decide` answers
/// an unreadable membership by waiting, and the pass goes on to apply and report.
async fn read_membership(ctx: &Context, addresses: &ServiceAddresses) -> Membership {
    let endpoint = addresses.cluster();
    match tokio::time::timeout(ADMIN_TIMEOUT, ctx.admin.cluster(&endpoint)).await {
        Ok(Ok(view)) => Membership::Known(view),
        Ok(Err(e)) => Membership::Unreadable(e.to_string()),
        Err(_) => Membership::Unreadable(format!(
            "GetCluster at {endpoint} took longer than {ADMIN_TIMEOUT:?}"
        )),
    }
}

/// Executes `step` (the StatefulSet's replicas were already applied): the agents' calls, and
/// for a restart the pod deletion. Publishes its event and returns what the Progressing
/// condition should say.
pub(crate) async fn execute_step(
    mq: &MessageQueue,
    names: &Names,
    ctx: &Context,
    addresses: &ServiceAddresses,
    step: &Step,
) -> Result<Option<(bool, Progress)>> {
    let progress = step.progress();
    let outcome = match tokio::time::timeout(
        ADMIN_TIMEOUT,
        agents::perform(ctx.admin.as_ref(), addresses, step),
    )
    .await
    {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) if matches!(step, Step::Drain(_)) && e.is_precondition() => {
            // The agents' own check (fewer ACTIVE agents would remain than the factor) is
            // the last word: report it as a refused scale-in, not as a failure to retry.
            let progress = Progress {
                reason: plan::reasons::SCALE_IN_REFUSED,
                message: format!("the agents refused the drain: {e}"),
            };
            events::publish(
                &ctx.recorder,
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
                source: AdminError::Unreachable {
                    endpoint: addresses.cluster(),
                    reason: format!("no answer within {ADMIN_TIMEOUT:?}"),
                },
            });
        }
    };
    let (type_, reason, action, note) = match (step, outcome) {
        (Step::Scale { replicas, progress }, _) => {
            let reason = if progress.reason == plan::reasons::SCALING_OUT {
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
    events::publish(&ctx.recorder, mq, type_, reason, action, note).await;
    Ok(progress)
}

/// The step as the subject of an [`Error::AgentCallFailed`] message.
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
pub(crate) async fn expand_claims(
    mq: &MessageQueue,
    names: &Names,
    ctx: &Context,
    replicas: i32,
) -> Result<()> {
    let existing = kube_ops::claims(&ctx.client, names, replicas).await?;
    for name in claims::to_expand(&existing, &mq.spec.storage.size)? {
        kube_ops::expand_claim(&ctx.client, names, &name, &mq.spec.storage.size).await?;
        let note = format!(
            "requested {} for claim {name} (the storage class must allow volume expansion)",
            mq.spec.storage.size
        );
        events::publish(
            &ctx.recorder,
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
