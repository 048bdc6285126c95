//! Cluster mode's queues: following the replicated catalog (opening the replicas of declared
//! queues placed here, closing deleted ones), declaring through the meta group, and opening
//! one queue's replicas with their Raft groups.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use sluice_proto::peer::v1::{DeclareQueue, MetaCommand, meta_command};
use sluice_proto::v1::QueueSpec;
use tokio::task::JoinHandle;

use super::timers::{Trigger, spawn_loop};
use super::{Broker, RAFT_STOP_TIMEOUT, leadership, store};
use crate::cluster::{Catalog, ClusterContext, MetaGroup, MetaGroupError, placement};
use crate::error::{BrokerError, PartitionOpenError, QueueOpenError};
use crate::log::LogError;
use crate::queue::queue::Queue;
use crate::queue::replica::{self, Addresses};
use crate::queue::spec::{difference, effective_spec};

/// Follows the meta group's catalog for the broker's life: a pass at once, then one per change.
pub(super) fn follow_catalog(
    me: Weak<Broker>,
    catalog: tokio::sync::watch::Receiver<Arc<Catalog>>,
) -> JoinHandle<()> {
    spawn_loop(
        me,
        Trigger::CatalogChange(catalog),
        |broker, cluster| async move { broker.sync_catalog(&cluster.meta.current()).await },
    )
}

impl Broker {
    /// Makes this agent's queues match the replicated catalog: opens (or creates) the
    /// replicas of every declared queue, removes those of deleted ones.
    async fn sync_catalog(&self, catalog: &Catalog) {
        let Some(cluster) = &self.options.cluster else {
            return;
        };
        let _admin = self.admin.lock().await;
        // A drained (or removed) agent holds no replicas: it opens none of a new queue.
        let me = cluster.config.node_id;
        let leaving = match catalog.state_of(me) {
            Some(state) => state == sluice_proto::v1::AgentState::Drained,
            None => catalog.removed.contains(&me),
        };
        let rf = cluster.config.replication_factor;
        for (name, spec) in &catalog.queues {
            if self.read_queues().contains_key(name)
                || self.shutting_down.load(Ordering::Acquire)
                || leaving
            {
                continue;
            }
            // Hosted here: placed here now, or still holding replica data from before (a
            // member in transition, which stays until its groups remove it). Decision 0014.
            let placed = catalog.replica_set(name, rf).contains(&me);
            if !placed && !self.layout.queue_dir(name).exists() {
                continue;
            }
            let voters = catalog.initial_voters(name, rf);
            let queue = match self
                .open_replicated_queue(cluster, spec.clone(), voters)
                .await
            {
                Ok(queue) => queue,
                Err(reason) => {
                    tracing::error!(queue = %name, %reason, "queue kept offline");
                    Queue::offline(spec.clone(), reason)
                }
            };
            let queue = Arc::new(queue);
            self.write_queues().insert(name.clone(), queue.clone());
            self.start_timer(queue);
        }
        let gone: Vec<String> = self
            .read_queues()
            .keys()
            .filter(|n| !catalog.queues.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            let removed = self.write_queues().remove(&name);
            if let Some(queue) = removed {
                self.close_queue(&queue).await;
            }
            let dir = self.layout.queue_dir(&name);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::error!(queue = %name, dir = %dir.display(), error = %e, "removing a deleted queue's directory failed");
            }
        }
        self.queues_changed.send_modify(|n| *n += 1);
    }

    /// Opens this agent's replica of every partition of `spec` (creating its directories).
    /// A bootstrap agent initialises a new replica's group with `voters` (the catalog's
    /// initial voters of the queue; the bootstrap agents when the catalog has none, as for a
    /// queue declared before the catalog recorded agents); a joining agent initialises
    /// nothing and waits for the leaders to add it.
    async fn open_replicated_queue(
        &self,
        cluster: &ClusterContext,
        spec: QueueSpec,
        voters: BTreeMap<u64, String>,
    ) -> Result<Queue, QueueOpenError> {
        let dir = self.layout.queue_dir(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|source| LogError::Io {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        store::write_spec(&self.layout, &spec)?;
        let config = Queue::state_config(&spec);
        let me = cluster.config.node_id;
        let voters: BTreeMap<u64, openraft::BasicNode> = if cluster.config.is_joining()
            || (!voters.is_empty() && !voters.contains_key(&me))
        {
            // Not an initial voter: the group's leader adds this replica as a learner.
            BTreeMap::new()
        } else if voters.is_empty() {
            let bootstrap = cluster.config.node_ids();
            let placed =
                placement::replica_set(&spec.name, cluster.config.replication_factor, &bootstrap);
            if !placed.contains(&me) {
                return Err(QueueOpenError::NotInitialVoter {
                    node: me,
                    voters: placed,
                    queue: spec.name.clone(),
                });
            }
            placed
                .into_iter()
                .filter_map(|n| {
                    let addr = cluster.config.peer(n)?;
                    Some((n, openraft::BasicNode::new(addr)))
                })
                .collect()
        } else {
            voters
                .into_iter()
                .map(|(n, addr)| (n, openraft::BasicNode::new(addr)))
                .collect()
        };
        let preferred = leadership::leader_candidates(cluster, &spec.name).first() == Some(&me);
        let mut partitions = Vec::with_capacity(spec.partitions as usize);
        for id in 0..spec.partitions {
            let in_partition = |source: PartitionOpenError| QueueOpenError::Partition {
                partition: id,
                source,
            };
            let log = store::open_replica_log(&self.layout, &self.options, &spec.name, id)
                .map_err(in_partition)?;
            let setup = replica::Setup {
                node_id: cluster.config.node_id,
                group: format!("{}/{id}", spec.name),
                voters: voters.clone(),
                raft_config: cluster.raft_config.clone(),
                groups: cluster.groups.clone(),
                addresses: addresses(&cluster.meta),
                raft_dir: self.layout.partition_raft_dir(&spec.name, id),
                preferred,
            };
            let partition = replica::open(
                &spec.name,
                id,
                log,
                config,
                self.options.clock.clone(),
                setup,
            )
            .await
            .map_err(|e| in_partition(PartitionOpenError::Replica(Box::new(e))))?;
            partitions.push(partition);
        }
        Ok(Queue::new(spec, partitions))
    }

    /// Closes a queue and stops its replicas' Raft groups.
    pub(super) async fn close_queue(&self, queue: &Queue) {
        queue.close();
        for partition in queue.partitions() {
            if let Some(link) = partition.replica() {
                if let Some(cluster) = &self.options.cluster {
                    cluster.groups.remove(&link.group);
                }
                link.stop(RAFT_STOP_TIMEOUT).await;
            }
        }
    }

    /// Declares through the meta group (from any agent), then waits until this agent has
    /// opened its replicas.
    pub(super) async fn declare_replicated(
        &self,
        cluster: &ClusterContext,
        spec: QueueSpec,
    ) -> Result<(QueueSpec, bool), BrokerError> {
        let catalog = cluster.meta.current();
        if cluster.config.is_joining() && catalog.state_of(cluster.config.node_id).is_none() {
            return Err(BrokerError::NotYetMember {
                node: cluster.config.node_id,
            });
        }
        let existing = catalog.queues.get(&spec.name).cloned();
        if let Some(existing) = existing {
            return match difference(&existing, &spec) {
                Some(difference) => Err(BrokerError::QueueExists {
                    queue: spec.name.clone(),
                    difference,
                }),
                None => Ok((spec, false)),
            };
        }
        let mut names = vec![spec.name.clone()];
        let dlq = spec.dead_letter_queue.clone();
        if !dlq.is_empty() && !cluster.meta.catalog().borrow().queues.contains_key(&dlq) {
            let dlq_spec = effective_spec(&QueueSpec {
                name: dlq.clone(),
                ..QueueSpec::default()
            })?;
            propose_declare(cluster, dlq_spec).await?;
            names.push(dlq);
        }
        propose_declare(cluster, spec.clone()).await?;
        // Wait until this agent applied the declares: opened the queues placed here, knows
        // the others (requests for them are redirected to their hosts).
        let me = cluster.config.node_id;
        let rf = cluster.config.replication_factor;
        let catalog = cluster.meta.catalog();
        self.wait_queues(|q| {
            let catalog = catalog.borrow();
            names.iter().all(|n| {
                q.contains_key(n)
                    || (catalog.queues.contains_key(n) && !catalog.replica_set(n, rf).contains(&me))
            })
        })
        .await;
        for name in &names {
            self.wait_preferred_leaders(cluster, name).await;
        }
        Ok((spec, true))
    }

    /// Waits (at most [`DECLARE_LEADER_WAIT`]) until every partition of `queue` hosted here is
    /// led by its preferred leader, which campaigns first (`replica::Setup::preferred`), so a
    /// client that subscribes right after declaring is not moved by the balancer. A leader that
    /// is not elected in time (its agent is down) leaves the answer to come anyway.
    async fn wait_preferred_leaders(&self, cluster: &ClusterContext, queue: &str) {
        let Some(preferred) = leadership::leader_candidates(cluster, queue)
            .first()
            .copied()
        else {
            return;
        };
        let Some(q) = self.read_queues().get(queue).cloned() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + DECLARE_LEADER_WAIT;
        for partition in q.partitions() {
            let Some(link) = partition.replica() else {
                continue;
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let led = link
                .raft
                .wait(Some(left))
                .current_leader(preferred, "the preferred leader")
                .await;
            if led.is_err() {
                tracing::debug!(group = %link.group, preferred, "declared before the preferred leader was elected");
                return;
            }
        }
    }
}

/// Longest a declare waits for the new queue's preferred leaders to be elected.
const DECLARE_LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Client addresses of the agents, as registered in the catalog.
fn addresses(meta: &Arc<MetaGroup>) -> Addresses {
    let catalog = meta.catalog();
    Arc::new(move |node| catalog.borrow().client_address(node))
}

async fn propose_declare(cluster: &ClusterContext, spec: QueueSpec) -> Result<(), BrokerError> {
    let command = MetaCommand {
        command: Some(meta_command::Command::DeclareQueue(DeclareQueue {
            spec: Some(spec),
        })),
    };
    cluster.meta.propose(command).await.map_err(catalog_error)
}

/// A refused catalog proposal as the broker reports it: the outcomes a caller can act on keep
/// their own variant, the rest is the catalog being unavailable.
pub(super) fn catalog_error(e: MetaGroupError) -> BrokerError {
    match e {
        MetaGroupError::Invalid(e) => e,
        MetaGroupError::QueueConflict { queue, difference } => {
            BrokerError::QueueExists { queue, difference }
        }
        MetaGroupError::UnknownQueue { queue } => BrokerError::QueueNotFound { queue },
        other => BrokerError::Catalog(Box::new(other)),
    }
}
