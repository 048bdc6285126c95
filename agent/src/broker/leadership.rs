//! Who leads what: the balancer that moves each partition this agent leads to its preferred
//! leader, and handing every leadership away before this agent stops (or is drained). Both
//! respect the holds ([`crate::cluster::BalanceHolds`]) so a relieved agent is not handed its
//! leaderships straight back.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::Broker;
use super::timers::{Trigger, spawn_loop};
use crate::cluster::reconcile::GroupView;
use crate::cluster::{ClusterContext, META_GROUP, placement, transfer_leadership};
use crate::queue::partition::Partition;
use crate::queue::replica_link::ReplicaLink;

/// How often an agent checks that the partitions it leads are led by their preferred agent.
const BALANCE_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a stopping agent spends handing its leaderships away.
const STOP_HAND_OFF_TIMEOUT: Duration = Duration::from_secs(5);

/// Who should lead `queue`'s partitions, most preferred first: its replica set in placement
/// order over the ACTIVE agents (a joining one is not a voter everywhere yet, a draining one
/// is giving its leaderships away).
pub(super) fn leader_candidates(cluster: &ClusterContext, queue: &str) -> Vec<u64> {
    let catalog = cluster.meta.current();
    let mut nodes: Vec<u64> = catalog.active_members().into_keys().collect();
    if nodes.is_empty() {
        nodes = cluster.config.node_ids();
    }
    placement::replica_set(queue, cluster.config.replication_factor, &nodes)
}

/// Runs [`Broker::balance_once`] every [`BALANCE_INTERVAL`] for the broker's life.
pub(super) fn balance_leaders(me: Weak<Broker>) -> JoinHandle<()> {
    spawn_loop(
        me,
        Trigger::Every(BALANCE_INTERVAL),
        |broker, cluster| async move { broker.balance_once(&cluster).await },
    )
}

impl Broker {
    /// Leader placement: hands each partition this agent leads to its preferred leader (the
    /// same agent for all partitions of a queue, so one agent serves a queue's consumers)
    /// once that agent has caught up. When the preferred leader cannot take it (down, behind,
    /// a hand-off to it just failed), the next agent of the queue's replica set in placement
    /// order that can is the target, so a queue whose preferred agent died does not stay
    /// split between leaders: a publish whose messages hash to several partitions needs one
    /// agent that leads them all.
    pub(super) async fn balance_once(&self, cluster: &ClusterContext) {
        let me = cluster.config.node_id;
        for (queue, _, link) in self.led_partitions() {
            if cluster.holds.is_held(&link.group) {
                continue;
            }
            let view = GroupView::of(&link.raft.metrics().borrow());
            for candidate in leader_candidates(cluster, &queue) {
                if candidate == me {
                    break;
                }
                if !view.voters.contains(&candidate)
                    || cluster.holds.is_held_for(&link.group, candidate)
                {
                    continue;
                }
                let caught_up = link
                    .progress_of(candidate)
                    .is_some_and(|(matched, last)| matched >= last);
                if !caught_up {
                    continue;
                }
                let Some(peer) = self.peer_address(cluster, &view, candidate) else {
                    continue;
                };
                let moved = match transfer_leadership(&peer, &link.group, false).await {
                    Ok(outcome) => outcome.is_leader || outcome.leader == Some(candidate),
                    Err(e) => {
                        tracing::debug!(group = %link.group, to = candidate, error = %e, "leadership hand-off failed");
                        false
                    }
                };
                if moved {
                    tracing::info!(group = %link.group, to = candidate, "leadership moved to the preferred leader");
                    break;
                }
                cluster.holds.hold_for(&link.group, candidate);
            }
        }
    }

    /// Every partition this agent serves as leader: (queue name, partition, its Raft side).
    pub(super) fn led_partitions(&self) -> Vec<(String, Arc<Partition>, Arc<ReplicaLink>)> {
        let mut out = Vec::new();
        for queue in self.read_queues().values() {
            for partition in queue.partitions() {
                if let Some(link) = partition.replica()
                    && link.status().ready
                {
                    out.push((queue.spec().name.clone(), partition.clone(), link.clone()));
                }
            }
        }
        out
    }

    /// Hands every Raft leadership this agent holds (its partitions', then the meta group's)
    /// to the most caught-up other voter, preferring agents that are not leaving, so clients
    /// see one short election instead of an election timeout: before stopping, and for
    /// `Membership.HandOffLeadership`. Returns how many moved and the groups still led here.
    pub async fn relinquish_leaderships(&self, cluster: &ClusterContext) -> Relinquished {
        let catalog = cluster.meta.current();
        let mut groups: Vec<(String, openraft::Raft<crate::replication::TypeConfig>)> = self
            .led_partitions()
            .into_iter()
            .map(|(_, _, link)| (link.group.clone(), link.raft.clone()))
            .collect();
        groups.push((META_GROUP.to_owned(), cluster.meta.raft().clone()));
        let mut report = Relinquished::default();
        for (group, raft) in groups {
            let view = GroupView::of(&raft.metrics().borrow());
            if !view.is_leader {
                continue;
            }
            let moved = match view.successor(&catalog) {
                Some(node) => match self.peer_address(cluster, &view, node) {
                    Some(peer) => match transfer_leadership(&peer, &group, true).await {
                        Ok(outcome) => {
                            let moved = outcome.is_leader || outcome.leader == Some(node);
                            tracing::info!(%group, to = node, moved, "handed leadership away");
                            moved
                        }
                        Err(e) => {
                            tracing::warn!(%group, error = %e, "leadership hand-off failed");
                            false
                        }
                    },
                    None => false,
                },
                None => false,
            };
            if moved {
                report.moved += 1;
            } else {
                report.remaining.push(group);
            }
        }
        report
    }

    /// The peer address of `node`: from the group's membership, else the meta group's
    /// knowledge (its membership, the catalog, `--peers`).
    fn peer_address(
        &self,
        cluster: &ClusterContext,
        view: &GroupView,
        node: u64,
    ) -> Option<String> {
        view.addresses
            .get(&node)
            .cloned()
            .or_else(|| cluster.meta.peer_address(node))
    }

    /// Hands this agent's leaderships away before it stops, within [`STOP_HAND_OFF_TIMEOUT`]; does
    /// nothing on a single agent or when it already ran. The server calls it while its streams
    /// are still open, so a subscription on a moved partition ends with a redirect that its
    /// client follows, rather than with the server's drain.
    pub async fn relinquish_before_stop(&self) {
        if self.handed_off.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(cluster) = &self.options.cluster
            && tokio::time::timeout(STOP_HAND_OFF_TIMEOUT, self.relinquish_leaderships(cluster))
                .await
                .is_err()
        {
            tracing::warn!(timeout = ?STOP_HAND_OFF_TIMEOUT, "leadership hand-off before stopping timed out");
        }
    }
}

/// What [`Broker::relinquish_leaderships`] achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relinquished {
    /// Groups whose leadership moved.
    pub moved: u32,
    /// Groups still led here (`<queue>/<partition>` or `meta`): no caught-up voter took them.
    pub remaining: Vec<String>,
}
