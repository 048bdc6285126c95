//! Membership of the groups this agent hosts (decision 0011): the reconcile loop that moves
//! each group it leads towards the catalog one step at a time (and, as meta leader, moves
//! agents on in their life cycle), and dropping the replicas a group removed this agent from.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sluice_proto::peer::v1::{MetaCommand, meta_command};
use sluice_proto::v1::AgentState;
use tokio::task::JoinHandle;

use super::timers::{Trigger, spawn_loop};
use super::{Broker, RAFT_STOP_TIMEOUT, lock};
use crate::cluster::reconcile::{self, GroupView};
use crate::cluster::{Catalog, ClusterContext, META_GROUP};
use crate::queue::replica_link::{ChangeFailure, ReplicaLink};
use crate::replication::{Raft, left_out};

/// How often an agent moves the groups it leads towards the catalog's membership. Each round
/// makes at most one change per group and waits for it to commit.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// Longest a reconcile round waits for one membership step of a partition group (it goes on
/// in the background past that).
const MEMBERSHIP_STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an agent asks its peers about replicas placement no longer wants here that still
/// count themselves members (usually they are about to be removed; once in a while the group
/// removed them already and they never heard).
const LEFT_OUT_ASK_INTERVAL: Duration = Duration::from_secs(2);

/// What the reconcile rounds found against the catalog they last looked at, so a quiescent
/// group is not looked at again for nothing.
#[derive(Debug, Default)]
pub(super) struct Reconciled {
    /// That catalog.
    catalog: Option<Arc<Catalog>>,
    /// Groups led here whose last look against it found a membership step to make, or a
    /// membership not settled enough to tell.
    unsettled: HashSet<String>,
    /// When peers were last asked which replicas were left out.
    asked: Option<std::time::Instant>,
}

impl Reconciled {
    /// Whether peers may be asked again (and, if so, that they are being asked now).
    fn ask_due(&mut self) -> bool {
        let due = self
            .asked
            .is_none_or(|at| at.elapsed() >= LEFT_OUT_ASK_INTERVAL);
        if due {
            self.asked = Some(std::time::Instant::now());
        }
        due
    }

    fn looked_at(&mut self, group: &str, unsettled: bool) {
        if unsettled {
            self.unsettled.insert(group.to_owned());
        } else {
            self.unsettled.remove(group);
        }
    }
}

/// Runs [`Broker::reconcile_once`] every [`RECONCILE_INTERVAL`] for the broker's life.
pub(super) fn reconcile_membership(me: Weak<Broker>) -> JoinHandle<()> {
    spawn_loop(
        me,
        Trigger::Every(RECONCILE_INTERVAL),
        |broker, cluster| async move { broker.reconcile_once(&cluster).await },
    )
}

impl Broker {
    /// Every partition this agent hosts a replica of, with that replica's view of its group,
    /// by queue then partition (for `Membership.GetCluster`).
    pub fn replica_views(&self) -> Vec<(String, u32, GroupView)> {
        let mut out = Vec::new();
        for queue in self.read_queues().values() {
            for partition in queue.partitions() {
                if let Some(link) = partition.replica() {
                    if lock(&self.dropped).contains(&link.group) {
                        continue;
                    }
                    let view = GroupView::of(&link.raft.metrics().borrow());
                    out.push((queue.spec().name.clone(), partition.id(), view));
                }
            }
        }
        out
    }

    /// One round of membership reconciliation (decision 0011): every group this agent leads
    /// gets at most one change towards the catalog; as meta leader, agents whose groups all
    /// agree move on in their life cycle; replicas the groups removed this agent from are
    /// dropped.
    async fn reconcile_once(&self, cluster: &ClusterContext) {
        let catalog = cluster.meta.current();
        let me = cluster.config.node_id;
        let rf = cluster.config.replication_factor;
        let nothing = BTreeSet::new();
        let moving = catalog
            .agents
            .values()
            .any(|a| matches!(a.state, AgentState::Joining | AgentState::Draining));
        // A quiescent group is settled (one configuration, every voter caught up); if its
        // last look, against this same catalog, found no step for it, it needs none now, and
        // with no agent joining or draining nobody needs its view. Thousands of idle groups
        // then cost nothing here. (A group can quiesce short of its catalog membership: a
        // leader change mid-step leaves it so. Its last look found a step, so it is looked at.)
        let (unchanged, unsettled) = {
            let mut reconciled = lock(&self.reconciled);
            let same = reconciled
                .catalog
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, &catalog));
            if !same {
                reconciled.catalog = Some(catalog.clone());
                reconciled.unsettled.clear();
            }
            (same && !moving, reconciled.unsettled.clone())
        };
        let mut quiet_leaders = Vec::new();
        let links: Vec<(String, Arc<ReplicaLink>)> = self
            .read_queues()
            .values()
            .flat_map(|q| {
                let name = q.spec().name.clone();
                q.partitions()
                    .iter()
                    .filter_map(move |p| Some((name.clone(), p.replica()?.clone())))
                    .collect::<Vec<_>>()
            })
            .filter(|(_, link)| !lock(&self.dropped).contains(&link.group))
            .collect();
        let mut views = Vec::with_capacity(links.len() + 1);
        let mut questions = Vec::new();
        for (queue, link) in &links {
            if unchanged
                && link.quiet.is_quiet()
                && !unsettled.contains(&link.group)
                && self.reversions.of(&link.group).is_empty()
            {
                quiet_leaders.extend(link.raft.metrics().borrow().current_leader);
                continue;
            }
            let view = GroupView::of(&link.raft.metrics().borrow());
            if view.is_leader {
                self.reversions.watch(&link.group, &link.raft);
            }
            let wanted: BTreeSet<u64> = catalog.replica_set(queue, rf).into_iter().collect();
            let reverted = self.reversions.of(&link.group);
            let step = reconcile::next_step(&view, &catalog, &wanted, &nothing, &reverted);
            // A leader with an uncommitted or joint membership cannot tell yet: looked at again.
            lock(&self.reconciled).looked_at(
                &link.group,
                view.is_leader && (!view.settled || step.is_some()),
            );
            if let Some(step) = step {
                self.apply_step(&link.group, &link.raft, Some(link), step)
                    .await;
            }
            // `target`, not the settled membership: the final configuration without this
            // agent may never reach it (its leader stops replicating to it); then its peers
            // are asked below. A replica still placed here is kept (it is about to be added
            // again).
            let placed_here = wanted.contains(&me)
                && !matches!(
                    catalog.state_of(me),
                    Some(AgentState::Draining | AgentState::Drained)
                );
            if !placed_here && !view.target.is_empty() && !view.target.contains(&me) {
                self.drop_replica(cluster, link).await;
                continue;
            }
            if !placed_here && !view.is_leader {
                questions.push(left_out::Question {
                    group: link.group.clone(),
                    last_index: (view.last_index > 0).then_some(view.last_index),
                    peers: view
                        .addresses
                        .iter()
                        .filter(|(node, _)| **node != me)
                        .map(|(_, address)| address.clone())
                        .collect(),
                });
            }
            views.push((queue.clone(), link.group.clone(), view, wanted));
        }
        if !questions.is_empty() && lock(&self.reconciled).ask_due() {
            let left_out = left_out::ask(me, &questions).await;
            for (_, link) in links.iter().filter(|(_, l)| left_out.contains(&l.group)) {
                tracing::info!(group = %link.group, "the group removed this replica while it was not listening");
                self.drop_replica(cluster, link).await;
            }
            views.retain(|(_, group, _, _)| !left_out.contains(group));
        }
        let meta_view = GroupView::of(&cluster.meta.raft().metrics().borrow());
        if meta_view.is_leader {
            self.reversions.watch(META_GROUP, cluster.meta.raft());
        }
        // Groups this agent does not host are seen through their hosts, asked only while an
        // agent joins or drains (the only time the meta leader needs them).
        let own = views
            .iter()
            .map(|(_, group, view, _)| (group.clone(), view.clone()));
        let remote = if meta_view.is_leader && moving {
            crate::cluster::client::remote_views(cluster, &catalog)
                .await
                .into_iter()
                .map(|(queue, partition, view)| (format!("{queue}/{partition}"), view))
                .collect()
        } else {
            Vec::new()
        };
        // Each group as its leader sees it (a follower's or a not-yet-added replica's view lags).
        let leaders = reconcile::leaders_views(own, remote);
        let mut groups: Vec<(GroupView, BTreeSet<u64>)> = leaders
            .iter()
            .map(|(group, view)| {
                let queue = group.rsplit_once('/').map_or(group.as_str(), |(q, _)| q);
                let wanted = catalog.replica_set(queue, rf).into_iter().collect();
                (view.clone(), wanted)
            })
            .collect();
        // The meta group keeps a draining agent while it leads a partition, so it learns the
        // catalog (that it is draining) until it has removed itself from its groups.
        let keep = groups
            .iter()
            .map(|(v, _)| v.leader)
            .chain(views.iter().map(|(_, _, v, _)| v.leader))
            .flatten()
            .chain(quiet_leaders)
            .collect();
        let everyone: BTreeSet<u64> = catalog
            .agents
            .iter()
            .filter(|(_, a)| matches!(a.state, AgentState::Joining | AgentState::Active))
            .map(|(id, _)| *id)
            .collect();
        let reverted = self.reversions.of(META_GROUP);
        if let Some(step) = reconcile::next_step(&meta_view, &catalog, &everyone, &keep, &reverted)
        {
            self.apply_step(META_GROUP, cluster.meta.raft(), None, step)
                .await;
        }
        if !meta_view.is_leader || !moving {
            return;
        }
        // Only a complete view decides: every partition of every declared queue, each as its
        // leader sees it.
        let complete = catalog
            .queues
            .values()
            .all(|q| (0..q.partitions).all(|p| leaders.contains_key(&format!("{}/{p}", q.name))));
        if !complete {
            return;
        }
        groups.push((meta_view, everyone));
        for (node, from, to) in reconcile::agent_moves(&catalog, &groups) {
            let command = MetaCommand {
                command: Some(meta_command::Command::SetAgentState(
                    sluice_proto::peer::v1::SetAgentState {
                        node_id: node,
                        state: to as i32,
                        from: from as i32,
                    },
                )),
            };
            match cluster.meta.propose(command).await {
                Ok(()) => tracing::info!(
                    node,
                    from = from.as_str_name(),
                    to = to.as_str_name(),
                    "agent membership state changed"
                ),
                Err(e) => tracing::warn!(node, error = %e, "recording an agent state failed"),
            }
        }
    }

    /// Applies one membership step to `group`; a partition's (with its `link`) runs between
    /// two of its proposer's entries, so waiting confirms survive it.
    async fn apply_step(
        &self,
        group: &str,
        raft: &Raft,
        link: Option<&Arc<ReplicaLink>>,
        step: reconcile::Step,
    ) {
        let outcome: Result<(), ChangeFailure> = match link {
            Some(link) => {
                let change = {
                    let (group, raft, step) = (group.to_owned(), raft.clone(), step.clone());
                    Box::pin(async move {
                        reconcile::execute(&group, &raft, &step)
                            .await
                            .map_err(Into::into)
                    })
                };
                link.change_membership(step.max_entries(), change, MEMBERSHIP_STEP_TIMEOUT)
                    .await
                    .map_err(Into::into)
            }
            None => reconcile::execute(group, raft, &step)
                .await
                .map_err(Into::into),
        };
        match outcome {
            Ok(()) => {
                if let reconcile::Step::Demote { node } = step {
                    self.reversions.clear(group, node);
                }
                tracing::info!(%group, ?step, "membership step")
            }
            Err(e) => tracing::debug!(error = %e, "membership step failed; retrying next round"),
        }
    }

    /// Stops this agent's replica of a group that no longer counts it, and deletes its data.
    async fn drop_replica(&self, cluster: &ClusterContext, link: &Arc<ReplicaLink>) {
        if !lock(&self.dropped).insert(link.group.clone()) {
            return;
        }
        cluster.groups.remove(&link.group);
        link.stop(RAFT_STOP_TIMEOUT).await;
        let Some((queue, partition)) = link
            .group
            .rsplit_once('/')
            .and_then(|(q, p)| Some((q, p.parse::<u32>().ok()?)))
        else {
            return;
        };
        let raft_dir = self.layout.partition_raft_dir(queue, partition);
        for path in [raft_dir, self.layout.partition_dir(queue, partition)] {
            if let Err(e) = std::fs::remove_dir_all(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), error = %e, "deleting a removed replica failed");
            }
        }
        tracing::info!(group = %link.group, "removed from the group: replica stopped and deleted");
        self.forget_if_emptied(queue).await;
    }

    /// Forgets a queue whose every replica here was dropped (it moved to other agents): closes
    /// it, deletes its directory, so requests for it are redirected and a later placement back
    /// onto this agent opens it afresh (decision 0014).
    async fn forget_if_emptied(&self, queue: &str) {
        let _admin = self.admin.lock().await;
        let Some(q) = self.read_queues().get(queue).cloned() else {
            return;
        };
        let groups: Vec<String> = q
            .partitions()
            .iter()
            .filter_map(|p| Some(p.replica()?.group.clone()))
            .collect();
        {
            let dropped = lock(&self.dropped);
            if !groups.iter().all(|g| dropped.contains(g)) {
                return;
            }
        }
        self.write_queues().remove(queue);
        q.close();
        let dir = self.layout.queue_dir(queue);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "deleting a moved queue's directory failed");
        }
        let mut dropped = lock(&self.dropped);
        for g in &groups {
            dropped.remove(g);
        }
        drop(dropped);
        self.queues_changed.send_modify(|n| *n += 1);
        tracing::info!(queue, "queue moved to other agents: no replica left here");
    }
}
