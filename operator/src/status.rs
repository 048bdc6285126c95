//! The status the operator reports, computed from what it observed without any API call, so
//! every condition can be tested directly.

use k8s_openapi::{
    api::apps::v1::StatefulSet,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use crate::{
    agent_admin::QueueStats,
    crd::{
        MessageQueue, MessageQueueStatus, PartitionStatus, QueueStatus,
        condition_reasons as reasons, condition_types as types,
    },
    names::Names,
};

/// What reconcile saw of the world.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The StatefulSet as the API returned it after apply (with its status), if it exists.
    pub statefulset: Option<StatefulSet>,
    /// Per-queue counters from the agents, in queue order; `None` when they could not be read.
    pub queue_stats: Option<Vec<(String, QueueStats)>>,
    /// The day-2 operation under way (`true`) or refused (`false`), which then decides the
    /// Progressing condition; `None` when none is.
    pub day2: Option<(bool, crate::day2::Progress)>,
}

/// Replicas of a group of `factor` that must be up for it to confirm writes.
pub fn quorum(factor: i32) -> i32 {
    factor / 2 + 1
}

struct Counts {
    desired: i32,
    existing: i32,
    ready: i32,
    updated: i32,
    observed: bool,
    rolling: bool,
}

fn counts(mq: &MessageQueue, sts: Option<&StatefulSet>) -> Counts {
    let desired = mq.spec.replicas;
    let Some(sts) = sts else {
        return Counts {
            desired,
            existing: 0,
            ready: 0,
            updated: 0,
            observed: false,
            rolling: false,
        };
    };
    let status = sts.status.clone().unwrap_or_default();
    let generation = sts.metadata.generation.unwrap_or(0);
    Counts {
        desired,
        existing: status.replicas,
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        observed: status.observed_generation.unwrap_or(0) >= generation && generation > 0,
        rolling: status.update_revision.is_some()
            && status.current_revision != status.update_revision,
    }
}

fn condition(
    type_: &str,
    is_true: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if is_true { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// The worst case for partitions when `down` of the agents are not ready: a partition whose
/// replicas all sit on down agents loses `min(down, factor)` of its `factor` replicas.
fn degraded(
    mq: &MessageQueue,
    names: &Names,
    c: &Counts,
    observed: &Observed,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let down = (c.desired - c.ready).max(0);
    // Leaderless partitions reported by the agents are certain; counts are only a bound.
    if let Some(stats) = &observed.queue_stats {
        let leaderless: Vec<String> = stats
            .iter()
            .flat_map(|(q, s)| {
                s.partitions
                    .iter()
                    .filter(|p| p.leader.is_none())
                    .map(move |p| format!("{q}/{}", p.id))
            })
            .collect();
        if !leaderless.is_empty() {
            return condition(
                types::DEGRADED,
                true,
                reasons::QUORUM_LOST,
                format!(
                    "partitions without a leader (no quorum): {}",
                    leaderless.join(", ")
                ),
                generation,
                now,
            );
        }
    }
    let queues = mq.spec.effective_queues(&names.instance);
    let worst = queues
        .iter()
        .map(|q| {
            let factor = q.effective_replication_factor(mq.spec.replicas);
            (q.name.clone(), factor, down.min(factor))
        })
        .find(|(_, factor, lost)| factor - lost < quorum(*factor));
    if let Some((queue, factor, lost)) = worst {
        return condition(
            types::DEGRADED,
            true,
            reasons::QUORUM_LOST,
            format!(
                "{} of {} agents ready: partitions of queue {queue} may have {lost} of {factor} replicas down and need {} to confirm publishes",
                c.ready,
                c.desired,
                quorum(factor)
            ),
            generation,
            now,
        );
    }
    if down > 0 {
        return condition(
            types::DEGRADED,
            true,
            reasons::UNDER_REPLICATED,
            format!(
                "{} of {} agents ready: partitions keep quorum but some replicas are down",
                c.ready, c.desired
            ),
            generation,
            now,
        );
    }
    condition(
        types::DEGRADED,
        false,
        reasons::FULLY_REPLICATED,
        "every agent is ready".to_owned(),
        generation,
        now,
    )
}

/// The status `mq` should have given what was observed. Conditions keep their previous
/// `lastTransitionTime` when their status did not change.
pub fn desired_status(
    mq: &MessageQueue,
    names: &Names,
    observed: &Observed,
    now: Time,
) -> MessageQueueStatus {
    let generation = mq.metadata.generation;
    let c = counts(mq, observed.statefulset.as_ref());

    let ready = if observed.statefulset.is_none() || !c.observed {
        condition(
            types::READY,
            false,
            reasons::STATEFULSET_PENDING,
            "the StatefulSet has not been rolled out yet".to_owned(),
            generation,
            &now,
        )
    } else if c.ready >= c.desired && c.updated >= c.desired {
        condition(
            types::READY,
            true,
            reasons::ALL_REPLICAS_READY,
            format!("{} of {} agents ready", c.ready, c.desired),
            generation,
            &now,
        )
    } else {
        condition(
            types::READY,
            false,
            reasons::STATEFULSET_NOT_READY,
            format!("{} of {} agents ready", c.ready, c.desired),
            generation,
            &now,
        )
    };

    let progressing = if let Some((on, progress)) = &observed.day2 {
        condition(
            types::PROGRESSING,
            *on,
            progress.reason,
            progress.message.clone(),
            generation,
            &now,
        )
    } else if observed.statefulset.is_none() || !c.observed {
        condition(
            types::PROGRESSING,
            true,
            reasons::STATEFULSET_PENDING,
            "waiting for the StatefulSet controller".to_owned(),
            generation,
            &now,
        )
    } else if c.rolling || c.updated < c.desired {
        condition(
            types::PROGRESSING,
            true,
            reasons::ROLLING_UPDATE,
            format!("{} of {} agents updated", c.updated, c.desired),
            generation,
            &now,
        )
    } else if c.ready < c.desired || c.existing != c.desired {
        condition(
            types::PROGRESSING,
            true,
            reasons::STATEFULSET_NOT_READY,
            format!("{} of {} agents ready", c.ready, c.desired),
            generation,
            &now,
        )
    } else {
        condition(
            types::PROGRESSING,
            false,
            reasons::STABLE,
            "the agents match the spec".to_owned(),
            generation,
            &now,
        )
    };

    // Before the first rollout no agent is expected to be up, so nothing is degraded yet.
    let degraded = if observed.statefulset.is_none() || !c.observed {
        condition(
            types::DEGRADED,
            false,
            reasons::STATEFULSET_PENDING,
            "no agents are expected to run yet".to_owned(),
            generation,
            &now,
        )
    } else {
        degraded(mq, names, &c, observed, generation, &now)
    };

    let previous = mq
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let conditions = [ready, progressing, degraded]
        .into_iter()
        .map(|mut cond| {
            if let Some(old) = previous
                .iter()
                .find(|o| o.type_ == cond.type_ && o.status == cond.status)
            {
                cond.last_transition_time = old.last_transition_time.clone();
            }
            cond
        })
        .collect();

    let queues: Vec<QueueStatus> = observed
        .queue_stats
        .iter()
        .flatten()
        .map(|(name, s)| QueueStatus {
            name: name.clone(),
            backlog: saturating_i64(s.backlog),
            in_flight: saturating_i64(s.in_flight),
            publish_rate: s.publish_rate,
            consumers: i64::from(s.consumers),
            partitions: s
                .partitions
                .iter()
                .map(|p| PartitionStatus {
                    id: i32::try_from(p.id).unwrap_or(i32::MAX),
                    leader: p.leader.clone(),
                    in_sync: p.in_sync.map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
                })
                .collect(),
        })
        .collect();

    MessageQueueStatus {
        observed_generation: generation,
        conditions,
        replicas: c.existing,
        ready_replicas: c.ready,
        replicas_summary: format!("{}/{}", c.ready, c.desired),
        selector: names.selector_string(),
        backlog: observed
            .queue_stats
            .as_ref()
            .map(|_| queues.iter().map(|q| q.backlog).sum()),
        consumer_count: observed
            .queue_stats
            .as_ref()
            .map(|_| queues.iter().map(|q| q.consumers).sum()),
        queues,
        consumers: mq
            .status
            .as_ref()
            .map(|s| s.consumers.clone())
            .unwrap_or_default(),
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Whether two statuses differ in anything but condition timestamps, i.e. whether a status
/// patch would tell the reader something new.
pub fn is_material_change(old: Option<&MessageQueueStatus>, new: &MessageQueueStatus) -> bool {
    let Some(old) = old else { return true };
    let strip = |s: &MessageQueueStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Default::default());
        }
        s
    };
    strip(old) != strip(new)
}

#[cfg(test)]
mod tests;
