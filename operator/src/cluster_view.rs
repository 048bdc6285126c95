//! The agents' membership as `Membership.GetCluster` reports it, in the operator's own types so
//! that the day-2 decisions are pure functions tested without gRPC.

/// Where an agent is in its membership life cycle (`sluice.v1.AgentState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Added; catching up as a learner of the groups it is placed on.
    Joining,
    /// A voter of every group it is placed on.
    Active,
    /// Its replicas and leaderships are moving elsewhere.
    Draining,
    /// Holds no replica; may be removed.
    Drained,
    /// A value this operator version does not know (a newer agent); treated as "not settled".
    Unknown,
}

/// One agent of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentView {
    /// Node id: the StatefulSet ordinal.
    pub node_id: u64,
    /// Address clients are redirected to.
    pub client_address: String,
    /// Address of its peers-only service.
    pub peer_address: String,
    /// Membership state.
    pub state: AgentState,
    /// Partition groups that count it as a voter.
    pub replicas: u32,
    /// Partition groups it leads.
    pub leaders: u32,
}

/// Placement of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementView {
    /// Queue name.
    pub queue: String,
    /// Partition number.
    pub partition: u32,
    /// The leader's node id; `None` during an election.
    pub leader: Option<u64>,
    /// Voting replicas.
    pub voters: Vec<u64>,
    /// Non-voting replicas catching up.
    pub learners: Vec<u64>,
    /// Voters whose log matches the leader's.
    pub in_sync: Vec<u64>,
}

impl PlacementView {
    /// Whether the partition has a leader and every voter is caught up with it: the state in
    /// which one more agent may restart without the partition losing its quorum.
    pub fn is_in_sync(&self) -> bool {
        self.leader.is_some() && self.voters.iter().all(|v| self.in_sync.contains(v))
    }
}

/// The whole cluster as one agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    /// Every agent, by node id.
    pub agents: Vec<AgentView>,
    /// Every partition of every queue.
    pub partitions: Vec<PlacementView>,
    /// The cluster's replication factor.
    pub replication_factor: u32,
}

impl ClusterView {
    /// The agent with `node_id`, if the cluster knows it.
    pub fn agent(&self, node_id: u64) -> Option<&AgentView> {
        self.agents.iter().find(|a| a.node_id == node_id)
    }

    /// Partitions not fully in sync, as `queue/partition`, for conditions and events.
    pub fn lagging_partitions(&self) -> Vec<String> {
        self.partitions
            .iter()
            .filter(|p| !p.is_in_sync())
            .map(|p| format!("{}/{}", p.queue, p.partition))
            .collect()
    }

    /// Whether every partition has a leader and all its voters in sync.
    pub fn is_in_sync(&self) -> bool {
        self.partitions.iter().all(PlacementView::is_in_sync)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(leader: Option<u64>, voters: &[u64], in_sync: &[u64]) -> PlacementView {
        PlacementView {
            queue: "orders".into(),
            partition: 0,
            leader,
            voters: voters.to_vec(),
            learners: vec![],
            in_sync: in_sync.to_vec(),
        }
    }

    #[test]
    fn a_partition_is_in_sync_only_with_a_leader_and_every_voter_caught_up() {
        assert!(placement(Some(0), &[0, 1, 2], &[0, 1, 2]).is_in_sync());
        assert!(!placement(Some(0), &[0, 1, 2], &[0, 1]).is_in_sync());
        assert!(!placement(None, &[0, 1, 2], &[0, 1, 2]).is_in_sync());
    }

    #[test]
    fn lagging_partitions_are_named_queue_slash_partition() {
        let mut lagging = placement(Some(1), &[0, 1], &[1]);
        lagging.partition = 3;
        let view = ClusterView {
            agents: vec![],
            partitions: vec![placement(Some(0), &[0], &[0]), lagging],
            replication_factor: 2,
        };
        assert_eq!(view.lagging_partitions(), vec!["orders/3".to_owned()]);
        assert!(!view.is_in_sync());
    }
}
