//! The cluster catalog: which queues exist (with their settings), which agents make up the
//! cluster (addresses and membership state), and which agents each queue's partition groups
//! start with. It is the state of the meta group, a pure function of its committed log.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, Membership};
use sluice_proto::peer::v1 as pb;
use sluice_proto::v1::{AgentState, QueueSpec};

use crate::replication::NodeId;

/// One agent as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEntry {
    /// Where its peers reach it (`host:port`).
    pub peer_address: String,
    /// Where clients are redirected to it (`host:port`); empty until a bootstrap agent
    /// registers.
    pub client_address: String,
    /// Its membership state.
    pub state: AgentState,
}

/// What every agent agrees on about the cluster, as of some committed meta-log position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    /// Declared queues by name, with every default filled in.
    pub queues: BTreeMap<String, QueueSpec>,
    /// The agents by node id.
    pub agents: BTreeMap<NodeId, AgentEntry>,
    /// Initial voters (node id to peer address) of each queue's partition groups: the agents
    /// ACTIVE when its declare was applied. Every agent opening a new replica initialises the
    /// group with exactly these, whenever it opens it.
    pub voters: BTreeMap<String, BTreeMap<NodeId, String>>,
    /// Agents removed since they were last added: a removed bootstrap agent that starts again
    /// must not register itself back.
    pub removed: BTreeSet<NodeId>,
    /// Whether the bootstrap agents were recorded (from the first membership entry).
    pub bootstrapped: bool,
}

impl Catalog {
    /// Applies one committed command. Deterministic, and total: every replica reaches the same
    /// catalog from the same log. A declare of an existing queue with other settings is a no-op
    /// (the first declare wins); the proposer detects that after the commit and reports the
    /// conflict, so a race of two different declares cannot leave replicas disagreeing. The
    /// membership commands are checked by the leader before they are proposed; here they only
    /// do what cannot hurt (an add of a known agent, a state change of an unknown one, are
    /// no-ops).
    pub fn apply(&mut self, command: &pb::MetaCommand) {
        use pb::meta_command::Command;
        match &command.command {
            Some(Command::DeclareQueue(pb::DeclareQueue { spec: Some(spec) })) => {
                if !self.queues.contains_key(&spec.name) {
                    self.queues.insert(spec.name.clone(), spec.clone());
                    let voters = self.active_members();
                    self.voters.insert(spec.name.clone(), voters);
                }
            }
            Some(Command::DeleteQueue(d)) => {
                self.queues.remove(&d.name);
                self.voters.remove(&d.name);
            }
            Some(Command::RegisterNode(r)) => {
                // Only known agents: a bootstrap agent is recorded by the first membership
                // entry, a removed one stays removed.
                if let Some(agent) = self.agents.get_mut(&r.node_id) {
                    agent.client_address = r.client_address.clone();
                }
            }
            Some(Command::AddAgent(a)) => {
                if !self.agents.contains_key(&a.node_id) {
                    self.removed.remove(&a.node_id);
                    self.agents.insert(
                        a.node_id,
                        AgentEntry {
                            peer_address: a.peer_address.clone(),
                            client_address: a.client_address.clone(),
                            state: AgentState::Joining,
                        },
                    );
                }
            }
            Some(Command::SetAgentState(s)) => {
                let to = AgentState::try_from(s.state).unwrap_or(AgentState::Unspecified);
                let from = AgentState::try_from(s.from).unwrap_or(AgentState::Unspecified);
                // A drain of a drained agent leaves it drained (DrainAgent is idempotent).
                if let Some(agent) = self.agents.get_mut(&s.node_id)
                    && to != AgentState::Unspecified
                    && (from == AgentState::Unspecified || agent.state == from)
                    && !(to == AgentState::Draining && agent.state == AgentState::Drained)
                {
                    agent.state = to;
                }
            }
            Some(Command::RemoveAgent(r)) => {
                if self.agents.remove(&r.node_id).is_some() {
                    self.removed.insert(r.node_id);
                }
            }
            // Proposals are validated first; an empty one changes nothing.
            Some(Command::DeclareQueue(pb::DeclareQueue { spec: None })) | None => {}
        }
    }

    /// Records the voters of the meta group's first membership entry (the `--peers` it was
    /// formed with) as ACTIVE agents: the bootstrap agents are members from the start. Later
    /// membership entries are the reconcilers' doing and change nothing here.
    pub fn apply_membership(&mut self, membership: &Membership<NodeId, BasicNode>) {
        if self.bootstrapped {
            return;
        }
        self.bootstrapped = true;
        for (id, node) in membership.nodes() {
            if membership.voter_ids().any(|v| v == *id) {
                self.agents.entry(*id).or_insert_with(|| AgentEntry {
                    peer_address: node.addr.clone(),
                    client_address: String::new(),
                    state: AgentState::Active,
                });
            }
        }
    }

    /// ACTIVE agents with their peer addresses.
    pub fn active_members(&self) -> BTreeMap<NodeId, String> {
        self.agents
            .iter()
            .filter(|(_, a)| a.state == AgentState::Active)
            .map(|(id, a)| (*id, a.peer_address.clone()))
            .collect()
    }

    /// Where `queue`'s replicas belong now (decision 0014): the top-`replication_factor`
    /// agents by rendezvous hashing among those that take replicas (JOINING and ACTIVE; a
    /// joining agent takes its share before it is announced ACTIVE), preferred leader first.
    pub fn replica_set(&self, queue: &str, replication_factor: u32) -> Vec<NodeId> {
        let nodes: Vec<NodeId> = self
            .agents
            .iter()
            .filter(|(_, a)| matches!(a.state, AgentState::Joining | AgentState::Active))
            .map(|(id, _)| *id)
            .collect();
        super::placement::replica_set(queue, replication_factor, &nodes)
    }

    /// The voters `queue`'s groups are initialised with: the replica set chosen among the
    /// agents ACTIVE when its declare was applied (recorded in `voters`), so every agent
    /// computes the same set whenever it opens the queue, also after the cluster changed.
    /// Empty when the catalog recorded none.
    pub fn initial_voters(&self, queue: &str, replication_factor: u32) -> BTreeMap<NodeId, String> {
        let Some(recorded) = self.voters.get(queue) else {
            return BTreeMap::new();
        };
        let nodes: Vec<NodeId> = recorded.keys().copied().collect();
        super::placement::replica_set(queue, replication_factor, &nodes)
            .into_iter()
            .filter_map(|n| Some((n, recorded.get(&n)?.clone())))
            .collect()
    }

    /// The state of `node`, `None` when the catalog does not know it.
    pub fn state_of(&self, node: NodeId) -> Option<AgentState> {
        self.agents.get(&node).map(|a| a.state)
    }

    /// The client address of `node`, when known and registered.
    pub fn client_address(&self, node: NodeId) -> Option<String> {
        self.agents
            .get(&node)
            .map(|a| a.client_address.clone())
            .filter(|a| !a.is_empty())
    }

    /// The client address of every agent that has one, by node id.
    pub fn client_addresses(&self) -> BTreeMap<NodeId, String> {
        self.agents
            .iter()
            .filter(|(_, a)| !a.client_address.is_empty())
            .map(|(id, a)| (*id, a.client_address.clone()))
            .collect()
    }

    /// The catalog as a snapshot message.
    pub fn to_pb(&self) -> pb::CatalogSnapshot {
        pb::CatalogSnapshot {
            queues: self.queues.values().cloned().collect(),
            agents: self
                .agents
                .iter()
                .map(|(id, a)| pb::AgentRecord {
                    node_id: *id,
                    peer_address: a.peer_address.clone(),
                    client_address: a.client_address.clone(),
                    state: a.state as i32,
                })
                .collect(),
            voters: self
                .voters
                .iter()
                .map(|(queue, voters)| pb::QueueVoters {
                    queue: queue.clone(),
                    voters: voters
                        .iter()
                        .map(|(id, addr)| pb::Member {
                            node_id: *id,
                            peer_address: addr.clone(),
                        })
                        .collect(),
                })
                .collect(),
            removed: self.removed.iter().copied().collect(),
            bootstrapped: self.bootstrapped,
        }
    }

    /// The catalog a snapshot message holds.
    pub fn from_pb(snapshot: pb::CatalogSnapshot) -> Self {
        Self {
            queues: snapshot
                .queues
                .into_iter()
                .map(|q| (q.name.clone(), q))
                .collect(),
            agents: snapshot
                .agents
                .into_iter()
                .map(|a| {
                    let state = AgentState::try_from(a.state).unwrap_or(AgentState::Unspecified);
                    (
                        a.node_id,
                        AgentEntry {
                            peer_address: a.peer_address,
                            client_address: a.client_address,
                            state,
                        },
                    )
                })
                .collect(),
            voters: snapshot
                .voters
                .into_iter()
                .map(|v| {
                    let voters = v
                        .voters
                        .into_iter()
                        .map(|m| (m.node_id, m.peer_address))
                        .collect();
                    (v.queue, voters)
                })
                .collect(),
            removed: snapshot.removed.into_iter().collect(),
            bootstrapped: snapshot.bootstrapped,
        }
    }
}

#[cfg(test)]
mod tests {
    use pb::meta_command::Command;

    use super::*;

    fn declare(name: &str, partitions: u32) -> pb::MetaCommand {
        pb::MetaCommand {
            command: Some(Command::DeclareQueue(pb::DeclareQueue {
                spec: Some(QueueSpec {
                    name: name.into(),
                    partitions,
                    ..Default::default()
                }),
            })),
        }
    }

    fn command(c: Command) -> pb::MetaCommand {
        pb::MetaCommand { command: Some(c) }
    }

    fn set_state(node_id: u64, state: AgentState, from: AgentState) -> pb::MetaCommand {
        command(Command::SetAgentState(pb::SetAgentState {
            node_id,
            state: state as i32,
            from: from as i32,
        }))
    }

    /// A catalog formed by three bootstrap agents `a:1`, `b:1`, `c:1`.
    fn bootstrapped() -> Catalog {
        let mut c = Catalog::default();
        let nodes: BTreeMap<u64, BasicNode> = [(0, "a:1"), (1, "b:1"), (2, "c:1")]
            .into_iter()
            .map(|(id, addr)| (id, BasicNode::new(addr)))
            .collect();
        let voters: BTreeSet<u64> = nodes.keys().copied().collect();
        c.apply_membership(&Membership::new(vec![voters], nodes));
        c
    }

    #[test]
    fn the_first_declare_of_a_queue_wins_and_delete_removes_it() {
        let mut c = Catalog::default();
        c.apply(&declare("orders", 3));
        c.apply(&declare("orders", 5));
        assert_eq!(c.queues["orders"].partitions, 3);
        c.apply(&command(Command::DeleteQueue(pb::DeleteQueue {
            name: "orders".into(),
        })));
        assert!(c.queues.is_empty());
        assert!(c.voters.is_empty());
        c.apply(&declare("orders", 5));
        assert_eq!(c.queues["orders"].partitions, 5);
    }

    #[test]
    fn the_first_membership_records_the_bootstrap_agents_as_active_and_later_ones_do_not() {
        let mut c = bootstrapped();
        assert_eq!(c.agents.len(), 3);
        assert!(c.agents.values().all(|a| a.state == AgentState::Active));
        assert_eq!(c.agents[&1].peer_address, "b:1");
        let later = Membership::new(
            vec![BTreeSet::from([0])],
            BTreeMap::from([(0, BasicNode::new("a:1"))]),
        );
        c.apply_membership(&later);
        assert_eq!(c.agents.len(), 3);
    }

    #[test]
    fn registering_a_known_agent_updates_its_client_address_and_an_unknown_one_is_ignored() {
        let mut c = bootstrapped();
        for (node_id, address) in [(1, "x:1"), (1, "y:2"), (7, "z:3")] {
            c.apply(&command(Command::RegisterNode(pb::RegisterNode {
                node_id,
                client_address: address.into(),
            })));
        }
        assert_eq!(c.client_address(1).as_deref(), Some("y:2"));
        assert_eq!(c.client_address(0), None);
        assert!(!c.agents.contains_key(&7));
    }

    #[test]
    fn a_declared_queue_records_the_agents_active_at_that_point_as_its_voters() {
        let mut c = bootstrapped();
        c.apply(&command(Command::AddAgent(pb::AddAgent {
            node_id: 3,
            peer_address: "d:1".into(),
            client_address: "d:2".into(),
        })));
        c.apply(&declare("a", 1));
        assert_eq!(c.voters["a"].keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
        c.apply(&set_state(3, AgentState::Active, AgentState::Joining));
        c.apply(&set_state(0, AgentState::Draining, AgentState::Unspecified));
        c.apply(&declare("b", 1));
        assert_eq!(c.voters["b"].keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(c.voters["b"][&3], "d:1");
    }

    #[test]
    fn an_agent_goes_from_joining_to_removed_and_a_stale_state_change_is_ignored() {
        let mut c = bootstrapped();
        let add = command(Command::AddAgent(pb::AddAgent {
            node_id: 3,
            peer_address: "d:1".into(),
            client_address: "d:2".into(),
        }));
        c.apply(&add);
        assert_eq!(c.state_of(3), Some(AgentState::Joining));
        c.apply(&set_state(3, AgentState::Draining, AgentState::Unspecified));
        // A reconciler that saw it JOINING and caught up must not make it ACTIVE again.
        c.apply(&set_state(3, AgentState::Active, AgentState::Joining));
        assert_eq!(c.state_of(3), Some(AgentState::Draining));
        c.apply(&set_state(3, AgentState::Drained, AgentState::Draining));
        c.apply(&set_state(3, AgentState::Draining, AgentState::Unspecified));
        assert_eq!(
            c.state_of(3),
            Some(AgentState::Drained),
            "a drain again changes nothing"
        );
        c.apply(&command(Command::RemoveAgent(pb::RemoveAgent {
            node_id: 3,
        })));
        assert_eq!(c.state_of(3), None);
        assert!(c.removed.contains(&3));
        c.apply(&add);
        assert_eq!(c.state_of(3), Some(AgentState::Joining));
        assert!(!c.removed.contains(&3));
    }

    #[test]
    fn a_catalog_survives_its_snapshot_encoding() {
        let mut c = bootstrapped();
        c.apply(&declare("a", 1));
        c.apply(&declare("b", 2));
        c.apply(&set_state(2, AgentState::Draining, AgentState::Active));
        c.apply(&command(Command::RemoveAgent(pb::RemoveAgent {
            node_id: 1,
        })));
        assert_eq!(Catalog::from_pb(c.to_pb()), c);
    }

    #[test]
    fn empty_commands_change_nothing() {
        let mut c = Catalog::default();
        c.apply(&pb::MetaCommand { command: None });
        c.apply(&command(Command::DeclareQueue(pb::DeclareQueue {
            spec: None,
        })));
        assert_eq!(c, Catalog::default());
    }
}
