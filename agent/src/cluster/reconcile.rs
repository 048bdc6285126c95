//! Membership reconciliation: what a Raft group's leader changes so that the group's members
//! match the catalog, one change at a time (decision 0011).
//!
//! The catalog says which agents should hold replicas (JOINING and ACTIVE agents) and which
//! should give them up (DRAINING and DRAINED ones); each group's leader moves its group towards
//! that, and the meta leader moves agents along their life cycle (JOINING → ACTIVE once every
//! group counts them as voters, DRAINING → DRAINED once none counts them). Every decision here
//! is a pure function of a [`GroupView`] and the [`Catalog`], so it is unit-tested without a
//! Raft; [`execute`] applies one step to the group's Raft. The broker's reconcile loop
//! (`broker/membership.rs`) decides when to ask, runs the step and simply asks again next
//! round, which makes the whole thing idempotent and tolerant of lost leaderships and failed
//! calls.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, ChangeMembers, RaftMetrics, ServerState};
use sluice_proto::v1::AgentState;

use super::catalog::Catalog;
use crate::replication::{NodeId, Raft};

/// A learner whose log is at most this many entries behind its leader's is caught up enough
/// to vote: the next heartbeat round closes the gap, and a voter that is slightly behind
/// cannot be elected anyway.
pub const PROMOTE_LAG_ENTRIES: u64 = 256;

/// One replica's view of its group's membership and, on the leader, of its followers'
/// progress. Indices are openraft's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupView {
    /// The agent holding this replica.
    pub me: NodeId,
    /// Whether this replica leads the group.
    pub is_leader: bool,
    /// The current leader, if known.
    pub leader: Option<NodeId>,
    /// Voters of the latest membership this replica holds.
    pub voters: BTreeSet<NodeId>,
    /// Non-voting members of it.
    pub learners: BTreeSet<NodeId>,
    /// The members the group is moving to: the last configuration of a joint membership (or
    /// the only one) and the learners. A replica that is not among them is being removed,
    /// even when the final membership never reaches it (its leader stops replicating to it).
    pub target: BTreeSet<NodeId>,
    /// Peer addresses of every member.
    pub addresses: BTreeMap<NodeId, String>,
    /// Whether that membership is committed and not a joint configuration: only then may the
    /// next change start (openraft changes one configuration at a time).
    pub settled: bool,
    /// Whether it is a committed joint configuration: a change whose second half its leader
    /// never appended (it lost the leadership in between; openraft 0.9 does not finish it).
    pub stalled_joint: bool,
    /// On the leader: how far each follower and learner has replicated its log.
    pub matched: BTreeMap<NodeId, u64>,
    /// Index of this replica's last log entry.
    pub last_index: u64,
}

impl GroupView {
    /// The view of a replica from its Raft metrics.
    pub fn of(metrics: &RaftMetrics<NodeId, BasicNode>) -> Self {
        let stored = &metrics.membership_config;
        let membership = stored.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let target = membership
            .get_joint_config()
            .last()
            .into_iter()
            .flatten()
            .chain(learners.iter())
            .copied()
            .collect();
        let addresses = membership
            .nodes()
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect();
        let applied = metrics.last_applied.map(|l| l.index);
        let committed = match stored.log_id() {
            Some(log_id) => applied.is_some_and(|a| a >= log_id.index),
            None => true,
        };
        let is_leader =
            metrics.state == ServerState::Leader && metrics.current_leader == Some(metrics.id);
        let matched = metrics
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, m)| (*id, m.map_or(0, |m| m.index)))
                    .collect()
            })
            .unwrap_or_default();
        GroupView {
            me: metrics.id,
            is_leader,
            leader: metrics.current_leader,
            voters,
            learners,
            target,
            addresses,
            settled: committed && membership.get_joint_config().len() <= 1,
            stalled_joint: committed && membership.get_joint_config().len() > 1,
            matched,
            last_index: metrics.last_log_index.unwrap_or(0),
        }
    }

    /// Whether `node` is a voter or learner of the group.
    pub fn counts(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }

    /// The voter best placed to take over from this leader: not `me`, not leaving (DRAINING or
    /// DRAINED in the catalog) when another one is, furthest along in the log.
    pub fn successor(&self, catalog: &Catalog) -> Option<NodeId> {
        let leaving = |n: NodeId| {
            matches!(
                catalog.state_of(n),
                Some(AgentState::Draining | AgentState::Drained)
            )
        };
        self.voters
            .iter()
            .copied()
            .filter(|n| *n != self.me)
            .max_by_key(|n| (!leaving(*n), self.matched.get(n).copied().unwrap_or(0)))
    }
}

/// One membership change of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Start replicating to `node` as a learner.
    AddLearner {
        /// The agent.
        node: NodeId,
        /// Its peer address.
        address: String,
    },
    /// Make a voter that lost acknowledged entries (an emptied disk) a learner until it has
    /// caught up, so it cannot help elect a leader that misses committed entries.
    Demote {
        /// The agent.
        node: NodeId,
    },
    /// Make a caught-up learner a voter.
    Promote {
        /// The agent.
        node: NodeId,
    },
    /// Finish a membership change its leader was interrupted in: the committed joint
    /// configuration becomes its last configuration alone; voters that leave stay learners
    /// (a later step removes those that are leaving the group).
    LeaveJoint,
    /// Take a leaving agent out of the group altogether (voter or learner). When it is the
    /// leader itself, openraft commits the change and then steps down, and the remaining
    /// voters elect a successor.
    Remove {
        /// The agent.
        node: NodeId,
    },
}

impl Step {
    /// Most log entries the step appends: openraft adds a learner in one entry and changes
    /// voters in two (the joint configuration, then the new one).
    pub fn max_entries(&self) -> u64 {
        match self {
            Step::AddLearner { .. } | Step::LeaveJoint => 1,
            Step::Demote { .. } | Step::Promote { .. } | Step::Remove { .. } => 2,
        }
    }
}

/// The next change the leader of a group makes, if any. `wanted` lists the agents that should
/// hold the group's replicas: a queue's [`replica_set`](super::Catalog::replica_set) for a
/// partition group, every JOINING and ACTIVE agent for the meta group. `keep` lists agents
/// that must stay members for now although they are leaving (the meta group keeps a draining
/// agent while it still leads partitions, so it goes on learning the catalog until it has left
/// them).
///
/// Order: leaving agents (DRAINING, DRAINED, removed) and unwanted learners go first, so a
/// drain finishes even while a join waits for a slow learner; then a wanted agent the group
/// lacks is added as a learner and a caught-up one promoted; an agent that is merely no longer
/// placed here leaves only once every wanted agent votes, so the group never drops below its
/// replication factor while replicas move. Others go before the leader itself.
///
/// A leaving leader removes itself: openraft 0.9 has no leadership transfer, and the
/// campaign-based hand-off (decision 0009) is exact only with three voters, while a drain
/// always starts with more (the remaining ACTIVE agents must hold the replication factor).
/// openraft keeps it leading until the change is committed, then it steps down; the others
/// elect a successor within an election timeout.
///
/// `reverted` lists voters that lost entries they had acknowledged (see
/// [`Reversions`](super::reversions::Reversions)); they are demoted first, while at least two
/// other voters remain. An empty `wanted` (a catalog without agents) changes nothing.
pub fn next_step(
    view: &GroupView,
    catalog: &Catalog,
    wanted: &BTreeSet<NodeId>,
    keep: &BTreeSet<NodeId>,
    reverted: &BTreeSet<NodeId>,
) -> Option<Step> {
    if view.is_leader && view.stalled_joint {
        return Some(Step::LeaveJoint);
    }
    if !view.is_leader || !view.settled || wanted.is_empty() {
        return None;
    }
    let state = |n: NodeId| catalog.state_of(n);
    let leaving = |n: NodeId| matches!(state(n), Some(AgentState::Draining | AgentState::Drained));
    if view.voters.len() >= 3
        && let Some(&node) = reverted
            .iter()
            .find(|n| **n != view.me && view.voters.contains(n))
    {
        return Some(Step::Demote { node });
    }
    // A removed agent (RemoveAgent after DRAINED) that still counts is taken out too; an agent
    // the catalog does not know yet (not registered) is left alone.
    let gone = |n: NodeId| leaving(n) || (state(n).is_none() && catalog.removed.contains(&n));
    let displaced = |n: NodeId| {
        matches!(state(n), Some(AgentState::Joining | AgentState::Active)) && !wanted.contains(&n)
    };
    let removal = |candidates: Vec<NodeId>| -> Option<Step> {
        let mut candidates = candidates;
        candidates.sort_by_key(|n| *n == view.me);
        let node = *candidates.first()?;
        // The last voter never removes itself or leaves a group without voters.
        (!view.voters.contains(&node) || view.voters.len() > 1).then_some(Step::Remove { node })
    };
    let early: Vec<NodeId> = view
        .learners
        .iter()
        .copied()
        .filter(|n| gone(*n) || displaced(*n))
        .chain(view.voters.iter().copied().filter(|n| gone(*n)))
        .filter(|n| !keep.contains(n))
        .collect();
    if let Some(step) = removal(early) {
        return Some(step);
    }
    let eligible = |n: NodeId| matches!(state(n), Some(AgentState::Joining | AgentState::Active));
    if let Some(&node) = wanted.iter().find(|n| eligible(**n) && !view.counts(**n))
        && let Some(agent) = catalog.agents.get(&node)
    {
        return Some(Step::AddLearner {
            node,
            address: agent.peer_address.clone(),
        });
    }
    if let Some(node) = view.learners.iter().copied().find(|n| {
        wanted.contains(n)
            && eligible(*n)
            && view.matched.get(n).copied().unwrap_or(0) + PROMOTE_LAG_ENTRIES >= view.last_index
    }) {
        return Some(Step::Promote { node });
    }
    if wanted.iter().all(|n| view.voters.contains(n)) {
        let late: Vec<NodeId> = view
            .voters
            .iter()
            .copied()
            .filter(|n| displaced(*n) && !keep.contains(n))
            .collect();
        return removal(late);
    }
    None
}

/// Life-cycle moves the meta leader records, from views of every group (`groups`: the meta
/// group and every partition of every queue, each with the agents wanted in it): a JOINING
/// agent becomes ACTIVE once it votes in every group that wants it (possibly none), a DRAINING
/// one DRAINED once no group counts it. Views of unsettled memberships decide nothing (a
/// change may still be rolled back).
pub fn agent_moves(
    catalog: &Catalog,
    groups: &[(GroupView, BTreeSet<NodeId>)],
) -> Vec<(NodeId, AgentState, AgentState)> {
    if groups.iter().any(|(g, _)| !g.settled) {
        return Vec::new();
    }
    let mut moves = Vec::new();
    for (node, agent) in &catalog.agents {
        match agent.state {
            AgentState::Joining
                if groups
                    .iter()
                    .all(|(g, wanted)| !wanted.contains(node) || g.voters.contains(node)) =>
            {
                moves.push((*node, AgentState::Joining, AgentState::Active));
            }
            AgentState::Draining if groups.iter().all(|(g, _)| !g.counts(*node)) => {
                moves.push((*node, AgentState::Draining, AgentState::Drained));
            }
            _ => {}
        }
    }
    moves
}

/// The view of each group (`<queue>/<partition>`) the meta leader decides life-cycle moves on:
/// the group leader's. `own` are this agent's replicas' views, `remote` those other agents
/// reported (decision 0014). Only a leader's view is current: a follower's membership lags,
/// and a replica that is not a member yet (an agent newly placed on the queue, waiting to be
/// added as a learner) sees an empty group, which would count a draining agent out of it
/// before its leader has removed it. So a remote leader's view replaces this agent's own
/// follower view, and a group no leader's view was had for is left out: the caller then holds
/// an incomplete picture and decides nothing this round.
pub fn leaders_views(
    own: impl IntoIterator<Item = (String, GroupView)>,
    remote: impl IntoIterator<Item = (String, GroupView)>,
) -> BTreeMap<String, GroupView> {
    let mut out: BTreeMap<String, GroupView> = own.into_iter().collect();
    for (group, view) in remote {
        if !out.get(&group).is_some_and(|v| v.is_leader) && view.is_leader {
            out.insert(group, view);
        }
    }
    out.retain(|_, v| v.is_leader);
    out
}

/// Why a step could not be carried out (logged; the next round tries again).
#[derive(Debug, thiserror::Error)]
#[error("{step:?} in group {group:?}: {reason}")]
pub struct StepError {
    /// The group.
    pub group: String,
    /// The step.
    pub step: Step,
    /// What openraft or the peer said.
    pub reason: String,
}

/// Carries out a membership step of `group` on its leader `raft`, waiting until openraft
/// committed it.
pub async fn execute(group: &str, raft: &Raft, step: &Step) -> Result<(), StepError> {
    let failed = |reason: String| StepError {
        group: group.to_owned(),
        step: step.clone(),
        reason,
    };
    match step {
        Step::AddLearner { node, address } => {
            raft.add_learner(*node, BasicNode::new(address), false)
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok(())
        }
        Step::Demote { node } => {
            // retain = true: out of the voters, kept as a learner that goes on catching up.
            raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([*node])), true)
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok(())
        }
        Step::Promote { node } => {
            raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([*node])), true)
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok(())
        }
        Step::LeaveJoint => {
            let last = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_joint_config()
                .last()
                .cloned()
                .unwrap_or_default();
            // From a joint [old, new], openraft's next configuration towards `new` is `new`.
            raft.change_membership(ChangeMembers::ReplaceAllVoters(last), true)
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok(())
        }
        Step::Remove { node } => {
            let metrics = raft.metrics().borrow().clone();
            let is_voter = metrics
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == *node);
            let change = if is_voter {
                // retain = false: out of the voters and out of the group in one change.
                ChangeMembers::RemoveVoters(BTreeSet::from([*node]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([*node]))
            };
            raft.change_membership(change, false)
                .await
                .map_err(|e| failed(e.to_string()))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_proto::peer::v1 as pb;
    use sluice_proto::peer::v1::meta_command::Command;

    use super::*;
    use crate::cluster::catalog::AgentEntry;

    fn catalog(states: &[(NodeId, AgentState)]) -> Catalog {
        let mut c = Catalog::default();
        for (id, state) in states {
            c.agents.insert(
                *id,
                AgentEntry {
                    peer_address: format!("n{id}:1"),
                    client_address: format!("n{id}:2"),
                    state: *state,
                },
            );
        }
        c
    }

    /// Every JOINING and ACTIVE agent: the wanted set when the factor covers them all.
    fn all(c: &Catalog) -> BTreeSet<NodeId> {
        c.agents
            .iter()
            .filter(|(_, a)| matches!(a.state, Joining | Active))
            .map(|(id, _)| *id)
            .collect()
    }

    fn leader_view(voters: &[NodeId], learners: &[NodeId]) -> GroupView {
        GroupView {
            me: voters[0],
            is_leader: true,
            leader: Some(voters[0]),
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            target: voters.iter().chain(learners).copied().collect(),
            addresses: BTreeMap::new(),
            settled: true,
            stalled_joint: false,
            matched: voters.iter().chain(learners).map(|n| (*n, 1_000)).collect(),
            last_index: 1_000,
        }
    }

    use AgentState::{Active, Drained, Draining, Joining};

    #[test]
    fn a_change_left_in_a_committed_joint_configuration_is_finished_by_its_new_leader() {
        let c = catalog(&[(0, Draining), (1, Active), (2, Active), (3, Active)]);
        let mut view = leader_view(&[1, 2, 3], &[]);
        view.settled = false;
        view.stalled_joint = true;
        let wanted = BTreeSet::from([1, 2, 3]);
        let none = BTreeSet::new();
        assert_eq!(
            next_step(&view, &c, &wanted, &none, &none),
            Some(Step::LeaveJoint)
        );
        view.is_leader = false;
        assert_eq!(next_step(&view, &c, &wanted, &none, &none), None);
    }

    #[test]
    fn a_joining_agent_is_added_as_a_learner_then_promoted_once_caught_up() {
        let c = catalog(&[(0, Active), (1, Active), (2, Active), (3, Joining)]);
        let view = leader_view(&[0, 1, 2], &[]);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            Some(Step::AddLearner {
                node: 3,
                address: "n3:1".into()
            })
        );
        let mut view = leader_view(&[0, 1, 2], &[3]);
        view.matched.insert(3, 10);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            None,
            "far behind"
        );
        view.matched.insert(3, 1_000 - PROMOTE_LAG_ENTRIES);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            Some(Step::Promote { node: 3 })
        );
        let view = leader_view(&[0, 1, 2, 3], &[]);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            None,
            "done"
        );
    }

    #[test]
    fn nothing_changes_while_a_membership_change_is_under_way_or_on_a_follower() {
        let c = catalog(&[(0, Active), (1, Active), (2, Active), (3, Joining)]);
        let mut view = leader_view(&[0, 1, 2], &[]);
        view.settled = false;
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            None
        );
        let mut view = leader_view(&[0, 1, 2], &[]);
        view.is_leader = false;
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            None
        );
    }

    #[test]
    fn a_draining_leader_removes_the_other_leaving_agents_then_itself_unless_kept() {
        let c = catalog(&[(0, Draining), (1, Draining), (2, Active), (3, Active)]);
        let view = leader_view(&[0, 1, 2, 3], &[]);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            Some(Step::Remove { node: 1 })
        );
        let view = leader_view(&[0, 2, 3], &[]);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            Some(Step::Remove { node: 0 })
        );
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::from([0]), &BTreeSet::new()),
            None
        );
    }

    #[test]
    fn a_group_moves_to_its_placement_adding_first_and_removing_the_displaced_leader_last() {
        let c = catalog(&[(0, Active), (1, Active), (2, Active), (3, Active)]);
        let wanted = BTreeSet::from([1, 2, 3]);
        let none = BTreeSet::new();
        let view = leader_view(&[0, 1, 2], &[]);
        assert_eq!(
            next_step(&view, &c, &wanted, &none, &none),
            Some(Step::AddLearner {
                node: 3,
                address: "n3:1".into()
            }),
            "the missing replica comes first"
        );
        let view = leader_view(&[0, 1, 2], &[3]);
        assert_eq!(
            next_step(&view, &c, &wanted, &none, &none),
            Some(Step::Promote { node: 3 })
        );
        let view = leader_view(&[0, 1, 2, 3], &[]);
        assert_eq!(
            next_step(&view, &c, &wanted, &none, &none),
            Some(Step::Remove { node: 0 }),
            "the displaced leader leaves once every wanted agent votes"
        );
        let mut view = leader_view(&[1, 0, 2, 3], &[]);
        view.me = 1;
        assert_eq!(
            next_step(&view, &c, &wanted, &none, &none),
            Some(Step::Remove { node: 0 })
        );
        let view = leader_view(&[1, 2, 3], &[]);
        assert_eq!(next_step(&view, &c, &wanted, &none, &none), None, "placed");
        // A displaced voter stays while a wanted learner catches up.
        let mut view = leader_view(&[0, 1, 2], &[3]);
        view.matched.insert(3, 0);
        assert_eq!(next_step(&view, &c, &wanted, &none, &none), None);
        // A displaced learner leaves at once.
        let view = leader_view(&[1, 2, 3], &[0]);
        assert_eq!(
            next_step(&view, &c, &wanted, &none, &none),
            Some(Step::Remove { node: 0 })
        );
    }

    #[test]
    fn the_successor_of_a_leader_is_the_most_caught_up_voter_not_leaving() {
        let c = catalog(&[(0, Draining), (1, Draining), (2, Active), (3, Active)]);
        let mut view = leader_view(&[0, 1, 2, 3], &[]);
        view.matched.insert(2, 900);
        view.matched.insert(1, 1_000);
        assert_eq!(view.successor(&c), Some(3));
    }

    #[test]
    fn a_draining_agent_is_removed_unless_it_must_be_kept_and_never_the_last_voter() {
        let c = catalog(&[(0, Active), (1, Active), (2, Active), (3, Draining)]);
        let view = leader_view(&[0, 1, 2, 3], &[]);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            Some(Step::Remove { node: 3 })
        );
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::from([3]), &BTreeSet::new()),
            None
        );
        let c = catalog(&[(0, Active), (3, Drained)]);
        let view = leader_view(&[0], &[3]);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            Some(Step::Remove { node: 3 }),
            "a leaving learner"
        );
    }

    #[test]
    fn a_removed_agent_still_counted_is_taken_out_and_an_unknown_one_is_left_alone() {
        let mut c = catalog(&[(0, Active), (1, Active), (5, Drained)]);
        c.apply(&pb::MetaCommand {
            command: Some(Command::RemoveAgent(pb::RemoveAgent { node_id: 5 })),
        });
        assert_eq!(c.state_of(5), None);
        let view = leader_view(&[0, 1, 2, 5], &[]);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            Some(Step::Remove { node: 5 })
        );
        let view = leader_view(&[0, 1, 2], &[]);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            None,
            "agent 2 is not registered yet, not leaving"
        );
    }

    #[test]
    fn a_voter_that_lost_its_log_is_demoted_then_promoted_once_caught_up() {
        let c = catalog(&[(0, Active), (1, Active), (2, Active)]);
        let mut view = leader_view(&[0, 1, 2], &[]);
        view.matched.insert(2, 0);
        let reverted = BTreeSet::from([2]);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &reverted),
            Some(Step::Demote { node: 2 })
        );
        let mut view = leader_view(&[0, 1], &[2]);
        view.matched.insert(2, 0);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            None,
            "still catching up"
        );
        view.matched.insert(2, 1_000);
        assert_eq!(
            next_step(&view, &c, &all(&c), &BTreeSet::new(), &BTreeSet::new()),
            Some(Step::Promote { node: 2 })
        );
        // Two voters: demoting one would leave a single copy deciding; it stays a voter.
        let view = leader_view(&[0, 2], &[]);
        assert_eq!(
            next_step(
                &view,
                &c,
                &BTreeSet::from([0, 2]),
                &BTreeSet::new(),
                &reverted
            ),
            None
        );
    }

    #[test]
    fn agents_move_to_active_and_drained_only_when_every_settled_group_agrees() {
        let c = catalog(&[(0, Active), (1, Active), (2, Draining), (3, Joining)]);
        let done = leader_view(&[0, 1, 3], &[]);
        let partial = leader_view(&[0, 1, 2], &[3]);
        let w = all(&c);
        assert_eq!(
            agent_moves(&c, &[(done.clone(), w.clone()), (done.clone(), w.clone())]),
            vec![(2, Draining, Drained), (3, Joining, Active)]
        );
        assert_eq!(
            agent_moves(
                &c,
                &[(done.clone(), w.clone()), (partial.clone(), w.clone())]
            ),
            vec![]
        );
        let mut unsettled = done.clone();
        unsettled.settled = false;
        assert_eq!(
            agent_moves(&c, &[(done.clone(), w.clone()), (unsettled, w.clone())]),
            vec![]
        );
        // A group that does not want agent 3 does not hold its join back.
        let elsewhere = leader_view(&[0, 1], &[]);
        assert_eq!(
            agent_moves(&c, &[(done, w), (elsewhere, BTreeSet::from([0, 1]))]),
            vec![(2, Draining, Drained), (3, Joining, Active)]
        );
    }

    #[test]
    fn life_cycle_moves_are_decided_on_each_groups_leaders_view_only() {
        let g = |name: &str| name.to_owned();
        // This agent (3) was just placed on q/0 and waits to be added: its own replica sees an
        // empty group. The leader (1) still counts the draining agent 0.
        let unadded = GroupView {
            me: 3,
            ..GroupView::default()
        };
        let mut leader = leader_view(&[1, 0, 2], &[]);
        leader.me = 1;
        leader.leader = Some(1);
        let merged = leaders_views([(g("q/0"), unadded.clone())], [(g("q/0"), leader.clone())]);
        assert_eq!(merged.get("q/0"), Some(&leader), "the leader's view wins");
        let c = catalog(&[(0, Draining), (1, Active), (2, Active), (3, Active)]);
        let groups: Vec<_> = merged.into_values().map(|v| (v, all(&c))).collect();
        assert_eq!(agent_moves(&c, &groups), vec![], "agent 0 still counts");

        // No leader's view of a group: it is left out (the picture is incomplete).
        let merged = leaders_views([(g("q/0"), unadded)], []);
        assert!(merged.is_empty(), "{merged:?}");

        // This agent's own leader view (with its real commit state) beats a remote claim.
        let mut own = leader_view(&[3, 1, 2], &[]);
        own.me = 3;
        own.leader = Some(3);
        own.settled = false;
        let merged = leaders_views([(g("q/0"), own.clone())], [(g("q/0"), leader)]);
        assert_eq!(merged.get("q/0"), Some(&own));
    }
}
