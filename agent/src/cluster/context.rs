//! [`ClusterContext`]: what a broker in cluster mode is given to reach its peers and groups.

use std::sync::Arc;

use super::{BalanceHolds, ClusterConfig, MetaGroup};
use crate::replication::RaftGroups;

/// The cluster side of a broker: who this agent is among its peers, the Raft groups it hosts
/// (served on the peer port) and the replicated catalog of queues.
#[derive(Clone)]
pub struct ClusterContext {
    /// Identity, peers, replication factor.
    pub config: ClusterConfig,
    /// Every Raft group of this agent, by name, for the peer service.
    pub groups: RaftGroups,
    /// Settings of every partition group.
    pub raft_config: Arc<openraft::Config>,
    /// The meta group: queue declarations and agents' client addresses.
    pub meta: Arc<MetaGroup>,
    /// Groups the balancer leaves alone for now, shared with the peer `Cluster` service.
    pub holds: BalanceHolds,
}
