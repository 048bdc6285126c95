//! The day-2 decision: from what the operator observed (StatefulSet, pods, the agents'
//! membership) to the one next step. Pure, so every rule is unit-tested, and the same function
//! drives both reconcile and the end-to-end harness that plays the kubelet.
//!
//! One step per pass, and only one disruption at a time: a restart or a drain starts only while
//! every pod is ready and (for restarts) every partition has all its voters in sync. A step
//! that is under way (an agent draining or joining, a restarted pod coming back) is waited for
//! before anything else starts.

use crate::cluster_view::{AgentState, ClusterView};

/// One agent pod as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    /// StatefulSet ordinal (= node id).
    pub ordinal: i32,
    /// Its Ready condition is true (and it is not being deleted).
    pub ready: bool,
    /// The StatefulSet revision it runs (`controller-revision-hash` label).
    pub revision: Option<String>,
}

/// What the agents' membership looks like, or why it could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// `GetCluster` answered.
    Known(ClusterView),
    /// `GetCluster` failed; the message says why.
    Unreadable(String),
}

/// Everything the decision looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// `spec.replicas` of the MessageQueue: where the operator is going.
    pub desired: i32,
    /// `spec.replicas` of the StatefulSet: where it is.
    pub current: i32,
    /// The replication factor the agents run with.
    pub replication_factor: i32,
    /// The StatefulSet's `status.updateRevision`, once its controller has computed it.
    pub update_revision: Option<String>,
    /// The agent pods that exist.
    pub pods: Vec<PodState>,
    /// The agents' membership.
    pub membership: Membership,
}

/// Why the operator is (or is not) moving, for the Progressing condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Condition reason (one of [`reasons`]).
    pub reason: &'static str,
    /// Human-readable detail.
    pub message: String,
}

/// Progressing reasons of the day-2 operations.
pub mod reasons {
    /// Agents are being added.
    pub const SCALING_OUT: &str = "ScalingOut";
    /// Agents are being drained and removed.
    pub const SCALING_IN: &str = "ScalingIn";
    /// The scale-in would leave fewer agents than the replication factor; nothing is done.
    pub const SCALE_IN_REFUSED: &str = "ScaleInRefused";
    /// Pods are being restarted one at a time onto a new revision.
    pub const ROLLING_UPDATE: &str = "RollingUpdate";
}

/// The one next action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Steady,
    /// Something is under way or a precondition is not met yet; check again soon.
    Wait(Progress),
    /// Set the StatefulSet's replicas.
    Scale {
        /// The new `spec.replicas`.
        replicas: i32,
        /// Why.
        progress: Progress,
    },
    /// `AddAgent` this ordinal.
    Add(i32),
    /// `DrainAgent` this ordinal.
    Drain(i32),
    /// `RemoveAgent` this (drained) ordinal.
    Remove(i32),
    /// Hand leadership off this ordinal, then delete its pod.
    Restart(i32),
    /// Refuse the scale-in (condition and event); the StatefulSet keeps its size.
    RefuseScaleIn(Progress),
}

impl Step {
    /// The Progressing condition this step implies: `(is_progressing, progress)`; `None` when
    /// steady (the StatefulSet's own counts decide).
    pub fn progress(&self) -> Option<(bool, Progress)> {
        let p = |reason: &'static str, message: String| Progress { reason, message };
        match self {
            Step::Steady => None,
            Step::Wait(progress) | Step::Scale { progress, .. } => Some((true, progress.clone())),
            Step::Add(i) => Some((
                true,
                p(
                    reasons::SCALING_OUT,
                    format!("adding agent {i} to the cluster"),
                ),
            )),
            Step::Drain(i) => Some((
                true,
                p(
                    reasons::SCALING_IN,
                    format!("draining agent {i} before it is removed"),
                ),
            )),
            Step::Remove(i) => Some((
                true,
                p(
                    reasons::SCALING_IN,
                    format!("removing drained agent {i} from the cluster"),
                ),
            )),
            Step::Restart(i) => Some((
                true,
                p(
                    reasons::ROLLING_UPDATE,
                    format!("restarting agent {i} onto the new revision"),
                ),
            )),
            Step::RefuseScaleIn(progress) => Some((false, progress.clone())),
        }
    }
}

fn wait(reason: &'static str, message: String) -> Step {
    Step::Wait(Progress { reason, message })
}

fn node(ordinal: i32) -> u64 {
    u64::try_from(ordinal).unwrap_or(0)
}

impl Snapshot {
    fn pod(&self, ordinal: i32) -> Option<&PodState> {
        self.pods.iter().find(|p| p.ordinal == ordinal)
    }

    /// Ordinals `0..current` whose pod is missing or not ready.
    fn unready(&self) -> Vec<i32> {
        (0..self.current)
            .filter(|&i| !self.pod(i).is_some_and(|p| p.ready))
            .collect()
    }

    /// Ordinals whose pod runs an older revision than the StatefulSet's, highest first (the
    /// order the StatefulSet controller itself would use).
    fn outdated(&self) -> Vec<i32> {
        let Some(update) = &self.update_revision else {
            return Vec::new();
        };
        let mut out: Vec<i32> = self
            .pods
            .iter()
            .filter(|p| p.ordinal < self.current && p.revision.as_ref() != Some(update))
            .map(|p| p.ordinal)
            .collect();
        out.sort_unstable_by(|a, b| b.cmp(a));
        out
    }
}

fn unready_message(unready: &[i32]) -> String {
    let list: Vec<String> = unready.iter().map(i32::to_string).collect();
    format!("waiting for agent pods {} to be ready", list.join(", "))
}

/// The next step from `s`.
pub fn decide(s: &Snapshot) -> Step {
    if s.desired < s.current {
        return scale_in(s);
    }
    if s.desired > s.current {
        return Step::Scale {
            replicas: s.desired,
            progress: Progress {
                reason: reasons::SCALING_OUT,
                message: format!(
                    "growing the StatefulSet from {} to {} agents",
                    s.current, s.desired
                ),
            },
        };
    }
    let outdated = s.outdated();
    let cluster = match &s.membership {
        Membership::Known(c) => c,
        Membership::Unreadable(why) => {
            // Without the membership nothing can be added or restarted safely; a cluster
            // with nothing to do stays steady (the status reports the agents as unreadable).
            return if outdated.is_empty() {
                Step::Steady
            } else {
                wait(
                    reasons::ROLLING_UPDATE,
                    format!("cannot read the agents' membership: {why}"),
                )
            };
        }
    };
    if let Some(step) = scale_out(s, cluster) {
        return step;
    }
    if outdated.is_empty() {
        return Step::Steady;
    }
    let unready = s.unready();
    if !unready.is_empty() {
        return wait(reasons::ROLLING_UPDATE, unready_message(&unready));
    }
    let lagging = cluster.lagging_partitions();
    if !lagging.is_empty() {
        return wait(
            reasons::ROLLING_UPDATE,
            format!(
                "waiting for partitions {} to have all voters in sync",
                lagging.join(", ")
            ),
        );
    }
    Step::Restart(outdated[0])
}

/// Adds every pod the cluster does not know yet, then waits for the joining ones.
fn scale_out(s: &Snapshot, cluster: &ClusterView) -> Option<Step> {
    if cluster.agents.is_empty() {
        // Bootstrapping agents have not formed the cluster yet; adding now would race them.
        return Some(wait(
            reasons::SCALING_OUT,
            "the agents have not formed their cluster yet".to_owned(),
        ))
        .filter(|_| s.current > 0);
    }
    if let Some(missing) = (0..s.current).find(|&i| cluster.agent(node(i)).is_none()) {
        return Some(Step::Add(missing));
    }
    let joining: Vec<String> = cluster
        .agents
        .iter()
        .filter(|a| a.state == AgentState::Joining && a.node_id < node(s.current))
        .map(|a| a.node_id.to_string())
        .collect();
    (!joining.is_empty()).then(|| {
        wait(
            reasons::SCALING_OUT,
            format!(
                "waiting for agents {} to catch up and become active",
                joining.join(", ")
            ),
        )
    })
}

/// Drains, removes, then shrinks past the highest leaving ordinal, one agent at a time.
fn scale_in(s: &Snapshot) -> Step {
    if s.desired < s.replication_factor {
        return Step::RefuseScaleIn(Progress {
            reason: reasons::SCALE_IN_REFUSED,
            message: format!(
                "spec.replicas {} is below the replication factor {}: the remaining agents could not hold every partition's replicas; keeping {} agents",
                s.desired, s.replication_factor, s.current
            ),
        });
    }
    let leaving = s.current - 1;
    let cluster = match &s.membership {
        Membership::Known(c) => c,
        Membership::Unreadable(why) => {
            return wait(
                reasons::SCALING_IN,
                format!("cannot read the agents' membership: {why}"),
            );
        }
    };
    let shrink = Step::Scale {
        replicas: leaving,
        progress: Progress {
            reason: reasons::SCALING_IN,
            message: format!("agent {leaving} was removed; shrinking the StatefulSet"),
        },
    };
    let Some(agent) = cluster.agent(node(leaving)) else {
        return shrink;
    };
    match agent.state {
        AgentState::Drained => Step::Remove(leaving),
        AgentState::Draining => wait(
            reasons::SCALING_IN,
            format!(
                "agent {leaving} is draining: {} replicas and {} leaderships left",
                agent.replicas, agent.leaders
            ),
        ),
        AgentState::Joining | AgentState::Active | AgentState::Unknown => {
            // A drain moves replicas onto the survivors: start it only when none is down.
            let unready: Vec<i32> = s.unready().into_iter().filter(|&i| i != leaving).collect();
            if unready.is_empty() {
                Step::Drain(leaving)
            } else {
                wait(reasons::SCALING_IN, unready_message(&unready))
            }
        }
    }
}

#[cfg(test)]
#[path = "plan_test.rs"]
mod tests;
