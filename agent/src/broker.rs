//! The agent's queues and the operations the gRPC services call.
//!
//! [`Broker`] owns every queue on this agent: it validates and persists queue specs, routes
//! publishes to partitions, and hands out [`Subscription`]s. It speaks in `sluice.v1` protobuf
//! types so the gRPC layer is a thin translation; [`BrokerError`] carries the gRPC code.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use prost::Message as _;
use sluice_proto::peer::v1::{DeclareQueue, DeleteQueue, MetaCommand, meta_command};
use sluice_proto::v1::{
    Confirm, Delivery, GetQueueStatsResponse, Message, QueueSpec, Settle, SettleOutcome,
};
use tokio::task::JoinHandle;

use crate::layout::Layout;
use crate::log::{LogError, LogStore};
use crate::queue::clock::{Clock, SystemClock};
use crate::queue::consumer::ConsumerSlot;
use crate::queue::partition::Partition;
use crate::queue::queue::Queue;
use crate::queue::replica::ReplicaLink;
use crate::queue::spec::{difference, effective_spec, validate_name};
use crate::queue::state::DisposalItem;

/// Errors of broker operations, each mapping to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A request field is invalid; `field` is its path as in the proto (`queue.name`).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Proto field path, e.g. `messages[3].payload`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The named queue does not exist.
    #[error("queue {queue:?} not found")]
    QueueNotFound {
        /// The queue name asked for.
        queue: String,
    },
    /// A queue exists with different settings.
    #[error("queue {queue:?} already exists with different settings: {difference}")]
    QueueExists {
        /// Queue name.
        queue: String,
        /// Which setting differs.
        difference: String,
    },
    /// Size or backlog limit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Stale/unknown delivery tag, non-empty queue on `if_empty` delete, corrupted partition.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Shutting down (retry elsewhere or later).
    #[error("{0}")]
    Unavailable(String),
    /// Another agent leads what the request needs, or an election is under way: retry at
    /// `leader` when known (sent to clients as `sluice-leader` metadata), else later.
    #[error("{what} is not led by this agent{}", leader.as_ref().map(|l| format!("; its leader is {l}")).unwrap_or_else(|| "; an election is under way, retry".to_owned()))]
    NotLeader {
        /// What was asked for (`partition 0 of queue "orders"`).
        what: String,
        /// Client address of the leader, when known.
        leader: Option<String>,
    },
    /// Leadership moved after the request was taken and before it was confirmed: it may or
    /// may not have been stored. Not retried by clients on their own (a resend could store it
    /// twice); a resend with the same idempotency keys is safe.
    #[error("{0}")]
    Ambiguous(String),
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] LogError),
}

impl BrokerError {
    /// The gRPC status code this error is reported with.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            Self::QueueNotFound { .. } => tonic::Code::NotFound,
            Self::QueueExists { .. } => tonic::Code::AlreadyExists,
            Self::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Self::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Self::Unavailable(_) | Self::NotLeader { .. } => tonic::Code::Unavailable,
            Self::Ambiguous(_) => tonic::Code::Aborted,
            Self::Storage(LogError::Corrupted { .. }) => tonic::Code::FailedPrecondition,
            Self::Storage(_) => tonic::Code::Internal,
        }
    }
}

/// Settings of a broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Data directory (see `layout`).
    pub data_dir: PathBuf,
    /// Storage knobs (segment size, fsync policy).
    pub log: crate::config::LogConfig,
}

/// Most messages in one publish call.
pub const PUBLISH_BATCH_MAX: usize = 10_000;
/// Prefetch when a subscription asks for 0.
pub const PREFETCH_DEFAULT: u32 = 100;
/// Largest prefetch.
pub const PREFETCH_MAX: u32 = 10_000;
/// Most deliveries a subscription takes from a partition at once (one `Deliver` command).
const TAKE_BATCH_MAX: usize = 256;
/// Longest the timer task sleeps without a known deadline: bounds how late a TTL head sweep or
/// segment purge runs on an idle queue.
const TIMER_IDLE_MS: u64 = 250;
/// How often an agent checks that the partitions it leads are led by their preferred agent.
const BALANCE_INTERVAL: Duration = Duration::from_secs(2);
/// How often an agent moves the groups it leads towards the catalog's membership (decision
/// 0011). Each round makes at most one change per group and waits for it to commit.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// Longest a reconcile round waits for one membership step of a partition group (it goes on
/// in the background past that).
const MEMBERSHIP_STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a stopping agent waits for one Raft group to stop.
const RAFT_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a stopping agent spends handing its leaderships away.
const HAND_OFF_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest pause between timer passes, so a busy queue is not ticked on every delivery.
const TIMER_MIN_MS: u64 = 5;

/// Opens the log of one partition directory. The broker uses `FileLog`; tests substitute
/// in-memory logs that survive a "restart" of the broker.
pub trait LogOpener: Send + Sync + 'static {
    /// Opens (recovering) or creates the log in `dir`.
    fn open(&self, dir: &Path) -> Result<Arc<dyn LogStore>, LogError>;
}

/// The cluster side of a broker: who this agent is among its peers, the Raft groups it hosts
/// (served on the peer port) and the replicated catalog of queues.
#[derive(Clone)]
pub struct ClusterContext {
    /// Identity, peers, replication factor.
    pub config: crate::cluster::ClusterConfig,
    /// Every Raft group of this agent, by name, for the peer service.
    pub groups: crate::replication::RaftGroups,
    /// Settings of every partition group.
    pub raft_config: Arc<openraft::Config>,
    /// The meta group: queue declarations and agents' client addresses.
    pub meta: Arc<crate::cluster::MetaGroup>,
    /// Groups the balancer leaves alone for now, shared with the peer `Cluster` service.
    pub holds: crate::cluster::BalanceHolds,
}

/// What a broker is built from besides its config; [`Broker::open`] uses the defaults.
#[derive(Clone)]
pub struct BrokerOptions {
    /// Time source of every queue.
    pub clock: Arc<dyn Clock>,
    /// How partition logs are opened.
    pub logs: Arc<dyn LogOpener>,
    /// Run one timer task per queue (ack deadlines, delays, TTL, dead-lettering, purging).
    /// Tests driving time by hand turn it off and call [`Broker::tick`].
    pub timers: bool,
    /// Set when this agent is one of several replicating each partition (issue 3); queues
    /// then come from the replicated catalog, not from this agent's directory alone.
    pub cluster: Option<ClusterContext>,
}

impl BrokerOptions {
    /// The production set-up of a single agent: system clock, `FileLog`s with `log`'s knobs,
    /// timer tasks, no cluster.
    pub fn files(log: crate::config::LogConfig) -> Self {
        Self {
            clock: Arc::new(SystemClock),
            logs: Arc::new(FileLogOpener { config: log }),
            timers: true,
            cluster: None,
        }
    }
}

/// All queues of this agent.
pub struct Broker {
    layout: Layout,
    options: BrokerOptions,
    /// Held for the broker's life: the OS lock keeps other agents off the directory.
    _lock: std::fs::File,
    /// Queues by name; the map is only changed under `admin`.
    queues: RwLock<BTreeMap<String, Arc<Queue>>>,
    /// Serialises declare and delete (they touch the disk and the DLQ relation).
    admin: tokio::sync::Mutex<()>,
    /// Bumped whenever the catalog was applied to `queues` (cluster mode).
    queues_changed: tokio::sync::watch::Sender<u64>,
    shutting_down: AtomicBool,
    /// Set by the first [`Broker::hand_off_before_stop`]: the stop hands off once, so a
    /// hand-off that timed out does not add its timeout twice to the pod's grace period.
    handed_off: AtomicBool,
    next_consumer: AtomicU64,
    /// Timer task per queue.
    timers: Mutex<Vec<JoinHandle<()>>>,
    /// Catalog follower, leader balancer and membership reconciler (cluster mode); aborted
    /// at shutdown.
    cluster_tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Groups whose replica this agent dropped after the group removed it (a drain).
    dropped: Mutex<std::collections::BTreeSet<String>>,
    /// Followers found to have lost acknowledged entries, per group this agent leads.
    reversions: crate::cluster::reversions::Reversions,
    /// Redirects answered for queues hosted elsewhere; picks the replica the next one names.
    redirects: AtomicU64,
    /// Handed to subscriptions and timer tasks.
    me: Weak<Broker>,
}

/// A consumer's open subscription. Dropping it ends the consumer: its unsettled deliveries are
/// made ready again (redelivered to other consumers).
pub struct Subscription {
    broker: Arc<Broker>,
    queue: Arc<Queue>,
    slot: Arc<ConsumerSlot>,
    /// Deliveries taken in one batch and not yet returned by `next` (already in flight), with
    /// their ack deadlines: one whose deadline passed while buffered was made ready again by
    /// the partition and is skipped, never handed out stale.
    buffer: VecDeque<(Delivery, u64)>,
    /// The broker's clock, for those deadlines.
    clock: Arc<dyn Clock>,
    /// Partition to try first (round-robin across partitions).
    next_partition: usize,
}

/// Where a queue's dead-letter copies go.
enum DeadLetterTarget {
    /// The DLQ is hosted by this agent (which may or may not lead it).
    Here(Arc<Queue>),
    /// The DLQ is placed on other agents only (its spec from the catalog).
    Elsewhere(QueueSpec),
}

impl DeadLetterTarget {
    /// Whether the DLQ keeps priorities (otherwise a copy's priority is dropped).
    fn priorities(&self) -> bool {
        match self {
            Self::Here(queue) => queue.spec().priorities,
            Self::Elsewhere(spec) => spec.priorities,
        }
    }
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> BrokerError {
    BrokerError::Storage(LogError::Io {
        op,
        path: path.to_owned(),
        source,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values (task handles) stay consistent whatever panicked while holding them.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Broker {
    /// Opens (recovering) every queue under `config.data_dir`, creating the directory if
    /// needed. Fails when the directory is unusable or locked by another agent; a partition
    /// whose log is corrupted is kept offline and its queue answers FAILED_PRECONDITION.
    pub async fn open(config: BrokerConfig) -> Result<Arc<Broker>, BrokerError> {
        let options = BrokerOptions::files(config.log);
        Self::open_with(config, options).await
    }

    /// [`Broker::open`] with a chosen clock, log backend and timer mode.
    pub async fn open_with(
        config: BrokerConfig,
        options: BrokerOptions,
    ) -> Result<Arc<Broker>, BrokerError> {
        let layout = Layout::new(&config.data_dir);
        std::fs::create_dir_all(layout.queues_dir())
            .map_err(|e| io_error("create", &layout.queues_dir(), e))?;
        let lock_path = layout.lock_file();
        let lock_file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_error("open", &lock_path, e))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(BrokerError::FailedPrecondition(format!(
                    "data directory {} is in use by another agent (lock {} is held)",
                    layout.root().display(),
                    lock_path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error("lock", &lock_path, e)),
        }
        let mut queues = BTreeMap::new();
        let dir = layout.queues_dir();
        let entries = std::fs::read_dir(&dir).map_err(|e| io_error("list", &dir, e))?;
        // In a cluster the catalog says which queues exist; they are opened as it is followed.
        let entries = entries.filter(|_| options.cluster.is_none());
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", &dir, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !entry.path().is_dir() {
                continue;
            }
            if let Some(queue) = open_queue(&layout, &options, &name) {
                queues.insert(name, Arc::new(queue));
            }
        }
        let broker = Arc::new_cyclic(|me| Broker {
            layout,
            options,
            _lock: lock_file,
            queues: RwLock::new(queues),
            admin: tokio::sync::Mutex::new(()),
            queues_changed: tokio::sync::watch::Sender::new(0),
            shutting_down: AtomicBool::new(false),
            handed_off: AtomicBool::new(false),
            next_consumer: AtomicU64::new(1),
            timers: Mutex::new(Vec::new()),
            cluster_tasks: Mutex::new(Vec::new()),
            dropped: Mutex::new(std::collections::BTreeSet::new()),
            redirects: AtomicU64::new(0),
            reversions: crate::cluster::reversions::Reversions::default(),
            me: me.clone(),
        });
        let all: Vec<Arc<Queue>> = broker.read_queues().values().cloned().collect();
        for queue in all {
            broker.start_timer(queue);
        }
        if let Some(cluster) = &broker.options.cluster {
            let catalog = cluster.meta.catalog();
            let mut tasks = lock(&broker.cluster_tasks);
            tasks.push(tokio::spawn(follow_catalog(broker.me.clone(), catalog)));
            tasks.push(tokio::spawn(balance_leaders(broker.me.clone())));
            tasks.push(tokio::spawn(reconcile_membership(broker.me.clone())));
        }
        Ok(broker)
    }

    /// Makes this agent's queues match the replicated catalog: opens (or creates) the
    /// replicas of every declared queue, removes those of deleted ones.
    async fn sync_catalog(&self, catalog: &crate::cluster::Catalog) {
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
    ) -> Result<Queue, String> {
        let dir = self.layout.queue_dir(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        write_spec(&self.layout, &spec).map_err(|e| e.to_string())?;
        let config = Queue::state_config(&spec);
        let me = cluster.config.node_id;
        let voters: BTreeMap<u64, openraft::BasicNode> =
            if cluster.config.is_joining() || (!voters.is_empty() && !voters.contains_key(&me)) {
                // Not an initial voter: the group's leader adds this replica as a learner.
                BTreeMap::new()
            } else if voters.is_empty() {
                let bootstrap = cluster.config.node_ids();
                let placed = crate::cluster::placement::replica_set(
                    &spec.name,
                    cluster.config.replication_factor,
                    &bootstrap,
                );
                if !placed.contains(&me) {
                    return Err(format!(
                        "agent {me} is not among the initial voters {placed:?} of queue {:?}",
                        spec.name
                    ));
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
        let mut partitions = Vec::with_capacity(spec.partitions as usize);
        for id in 0..spec.partitions {
            let dir = self.layout.partition_dir(&spec.name, id);
            let log = match self.options.logs.open(&dir) {
                Ok(log) => log,
                Err(e @ LogError::Corrupted { .. }) => {
                    // The other replicas hold every committed entry: set the damaged log aside
                    // (for inspection) and let the leader rebuild this replica, as if its disk
                    // had been replaced. The vote file stays, so it never votes twice in a term.
                    let aside = quarantine(&dir).map_err(|io| {
                        format!("partition {id}: {e}; moving it aside failed: {io}")
                    })?;
                    tracing::error!(queue = %spec.name, partition = id, error = %e, moved_to = %aside.display(), "corrupted replica set aside; rebuilding it from its peers");
                    forget_log_positions(&dir.with_extension("raft"))
                        .map_err(|m| format!("partition {id}: {m}"))?;
                    self.options
                        .logs
                        .open(&dir)
                        .map_err(|e| format!("partition {id}: {e}"))?
                }
                Err(e) => return Err(format!("partition {id}: {e}")),
            };
            let setup = crate::queue::replica::Setup {
                node_id: cluster.config.node_id,
                group: format!("{}/{id}", spec.name),
                voters: voters.clone(),
                raft_config: cluster.raft_config.clone(),
                groups: cluster.groups.clone(),
                addresses: addresses(&cluster.meta),
                meta_dir: dir.with_extension("raft"),
            };
            let partition = crate::queue::replica::open(
                &spec.name,
                id,
                log,
                config,
                self.options.clock.clone(),
                setup,
            )
            .await
            .map_err(|e| format!("partition {id}: {e}"))?;
            partitions.push(partition);
        }
        Ok(Queue::new(spec, partitions))
    }

    /// Leader placement: hands each partition this agent leads to its preferred leader (the
    /// same agent for all partitions of a queue, so one agent serves a queue's consumers)
    /// once that agent has caught up. When the preferred leader cannot take it (down, behind,
    /// a hand-off to it just failed), the next agent of the queue's replica set in placement
    /// order that can is the target, so a queue whose preferred agent died does not stay
    /// split between leaders: a publish whose messages hash to several partitions needs one
    /// agent that leads them all.
    async fn balance_once(&self, cluster: &ClusterContext) {
        // Only ACTIVE agents are preferred: a joining one is not a voter everywhere yet, a
        // draining one is giving its leaderships away.
        let catalog = cluster.meta.current();
        let mut nodes: Vec<u64> = catalog.active_members().into_keys().collect();
        if nodes.is_empty() {
            nodes = cluster.config.node_ids();
        }
        let me = cluster.config.node_id;
        let rf = cluster.config.replication_factor;
        for (queue, _, link) in self.led_partitions() {
            if cluster.holds.is_held(&link.group) {
                continue;
            }
            let view = crate::cluster::reconcile::GroupView::of(&link.raft.metrics().borrow());
            for candidate in crate::cluster::placement::replica_set(&queue, rf, &nodes) {
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
                let moved = match link.hand_off(candidate, &peer).await {
                    Ok(moved) => moved,
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
    fn led_partitions(&self) -> Vec<(String, Arc<Partition>, Arc<ReplicaLink>)> {
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
    pub async fn hand_off_all(&self, cluster: &ClusterContext) -> HandOff {
        let catalog = cluster.meta.current();
        let mut groups: Vec<(String, openraft::Raft<crate::replication::TypeConfig>)> = self
            .led_partitions()
            .into_iter()
            .map(|(_, _, link)| (link.group.clone(), link.raft.clone()))
            .collect();
        groups.push((
            crate::cluster::META_GROUP.to_owned(),
            cluster.meta.raft().clone(),
        ));
        let mut report = HandOff::default();
        for (group, raft) in groups {
            let view = crate::cluster::reconcile::GroupView::of(&raft.metrics().borrow());
            if !view.is_leader {
                continue;
            }
            let moved = match view.successor(&catalog) {
                Some(node) => match self.peer_address(cluster, &view, node) {
                    Some(peer) => {
                        match crate::cluster::transfer_leadership(&peer, &group, true).await {
                            Ok(outcome) => {
                                let moved = outcome.is_leader || outcome.leader == Some(node);
                                tracing::info!(%group, to = node, moved, "handed leadership away");
                                moved
                            }
                            Err(e) => {
                                tracing::warn!(%group, error = %e, "leadership hand-off failed");
                                false
                            }
                        }
                    }
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
        view: &crate::cluster::reconcile::GroupView,
        node: u64,
    ) -> Option<String> {
        view.addresses
            .get(&node)
            .cloned()
            .or_else(|| cluster.meta.peer_address(node))
    }

    /// The cluster side of this broker, `None` for a single agent.
    pub fn cluster(&self) -> Option<&ClusterContext> {
        self.options.cluster.as_ref()
    }

    /// Every partition this agent hosts a replica of, with that replica's view of its group,
    /// by queue then partition (for `Membership.GetCluster`).
    pub fn replica_views(&self) -> Vec<(String, u32, crate::cluster::reconcile::GroupView)> {
        let mut out = Vec::new();
        for queue in self.read_queues().values() {
            for partition in queue.partitions() {
                if let Some(link) = partition.replica() {
                    if lock(&self.dropped).contains(&link.group) {
                        continue;
                    }
                    let view =
                        crate::cluster::reconcile::GroupView::of(&link.raft.metrics().borrow());
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
        use crate::cluster::reconcile::{self, GroupView};
        use sluice_proto::v1::AgentState;
        use std::collections::BTreeSet;
        let catalog = cluster.meta.current();
        let me = cluster.config.node_id;
        let rf = cluster.config.replication_factor;
        let nothing = BTreeSet::new();
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
        for (queue, link) in &links {
            let view = GroupView::of(&link.raft.metrics().borrow());
            if view.is_leader {
                self.reversions.watch(&link.group, &link.raft);
            }
            let wanted: BTreeSet<u64> = catalog.replica_set(queue, rf).into_iter().collect();
            let reverted = self.reversions.of(&link.group);
            if let Some(step) = reconcile::next_step(&view, &catalog, &wanted, &nothing, &reverted)
            {
                self.carry_out(&link.group, &link.raft, Some(link), step)
                    .await;
            }
            // `target`, not the settled membership: the final configuration without this
            // agent may never reach it (its leader stops replicating to it). A replica still
            // placed here is kept (it is about to be added again).
            let placed_here = wanted.contains(&me)
                && !matches!(
                    catalog.state_of(me),
                    Some(AgentState::Draining | AgentState::Drained)
                );
            if !placed_here && !view.target.is_empty() && !view.target.contains(&me) {
                self.drop_replica(cluster, link).await;
                continue;
            }
            views.push((queue.clone(), link.group.clone(), view, wanted));
        }
        let meta_view = GroupView::of(&cluster.meta.raft().metrics().borrow());
        if meta_view.is_leader {
            self.reversions
                .watch(crate::cluster::META_GROUP, cluster.meta.raft());
        }
        // Groups this agent does not host are seen through their hosts, asked only while an
        // agent joins or drains (the only time the meta leader needs them).
        let moving = catalog
            .agents
            .values()
            .any(|a| matches!(a.state, AgentState::Joining | AgentState::Draining));
        let own = views
            .iter()
            .map(|(_, group, view, _)| (group.clone(), view.clone()));
        let remote = if meta_view.is_leader && moving {
            crate::grpc::membership::remote_views(cluster, &catalog)
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
            .collect();
        let everyone: BTreeSet<u64> = catalog
            .agents
            .iter()
            .filter(|(_, a)| matches!(a.state, AgentState::Joining | AgentState::Active))
            .map(|(id, _)| *id)
            .collect();
        let reverted = self.reversions.of(crate::cluster::META_GROUP);
        if let Some(step) = reconcile::next_step(&meta_view, &catalog, &everyone, &keep, &reverted)
        {
            self.carry_out(crate::cluster::META_GROUP, cluster.meta.raft(), None, step)
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

    /// Carries out one membership step of `group`; a partition's (with its `link`) runs
    /// between two of its proposer's entries, so waiting confirms survive it.
    async fn carry_out(
        &self,
        group: &str,
        raft: &openraft::Raft<crate::replication::TypeConfig>,
        link: Option<&Arc<ReplicaLink>>,
        step: crate::cluster::reconcile::Step,
    ) {
        let outcome = match link {
            Some(link) => {
                let change = {
                    let (group, raft, step) = (group.to_owned(), raft.clone(), step.clone());
                    Box::pin(async move {
                        crate::cluster::reconcile::execute(&group, &raft, &step)
                            .await
                            .map_err(|e| e.to_string())
                    })
                };
                link.change_membership(step.max_entries(), change, MEMBERSHIP_STEP_TIMEOUT)
                    .await
            }
            None => crate::cluster::reconcile::execute(group, raft, &step)
                .await
                .map_err(|e| e.to_string()),
        };
        match outcome {
            Ok(()) => {
                if let crate::cluster::reconcile::Step::Demote { node } = step {
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
        link.stop_serving();
        match tokio::time::timeout(RAFT_STOP_TIMEOUT, link.raft.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(group = %link.group, error = %e, "raft did not stop cleanly")
            }
            Err(_) => tracing::warn!(group = %link.group, "raft did not stop in time"),
        }
        let Some((queue, partition)) = link
            .group
            .rsplit_once('/')
            .and_then(|(q, p)| Some((q, p.parse::<u32>().ok()?)))
        else {
            return;
        };
        let dir = self.layout.partition_dir(queue, partition);
        for path in [dir.with_extension("raft"), dir] {
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

    /// Closes a queue and stops its replicas' Raft groups.
    async fn close_queue(&self, queue: &Queue) {
        queue.close();
        for partition in queue.partitions() {
            if let Some(link) = partition.replica() {
                if let Some(cluster) = &self.options.cluster {
                    cluster.groups.remove(&link.group);
                }
                link.stop_serving();
                // Everything acknowledged is on disk already; a Raft that does not stop in time
                // is left behind like a crash would leave it.
                match tokio::time::timeout(RAFT_STOP_TIMEOUT, link.raft.shutdown()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(group = %link.group, error = %e, "raft did not stop cleanly")
                    }
                    Err(_) => tracing::warn!(group = %link.group, "raft did not stop in time"),
                }
            }
        }
    }

    /// Waits until the queue set satisfies `done` (after a catalog change this agent follows).
    async fn wait_queues(&self, done: impl Fn(&BTreeMap<String, Arc<Queue>>) -> bool) {
        let mut changed = self.queues_changed.subscribe();
        while !done(&self.read_queues()) {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    fn read_queues(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Queue>>> {
        // Map updates are single insert/remove calls; a panic elsewhere cannot half-apply one.
        self.queues.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_queues(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Queue>>> {
        self.queues.write().unwrap_or_else(|p| p.into_inner())
    }

    fn start_timer(&self, queue: Arc<Queue>) {
        if !self.options.timers || queue.check_online().is_err() {
            return;
        }
        let me = self.me.clone();
        let clock = self.options.clock.clone();
        let handle = tokio::spawn(async move {
            loop {
                if queue.is_closed() {
                    break;
                }
                let next = {
                    let Some(broker) = me.upgrade() else { break };
                    broker.maintain(&queue).await
                };
                let now = clock.now_ms();
                let wait = next
                    .map_or(TIMER_IDLE_MS, |t| t.saturating_sub(now))
                    .clamp(TIMER_MIN_MS, TIMER_IDLE_MS);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    _ = queue.timer().notified() => {}
                }
                // Coalesce bursts of wake-ups (every delivery batch notifies).
                tokio::time::sleep(Duration::from_millis(TIMER_MIN_MS)).await;
            }
        });
        let mut timers = lock(&self.timers);
        timers.retain(|h| !h.is_finished());
        timers.push(handle);
    }

    /// One timer pass of one queue: deadlines, delays, TTL, dead-lettering, purging. Returns
    /// when the next pass is due.
    async fn maintain(&self, queue: &Arc<Queue>) -> Option<u64> {
        match queue.tick() {
            Ok((disposals, next)) => {
                for (partition, items) in disposals {
                    if let Err(e) = self.dead_letter(queue, &partition, items).await {
                        tracing::warn!(queue = %queue.spec().name, partition = partition.id(), error = %e, "dead-lettering failed; will retry");
                    }
                }
                next
            }
            Err(e) => {
                tracing::warn!(queue = %queue.spec().name, error = %e, "timer pass failed");
                None
            }
        }
    }

    /// Runs one timer pass over every queue now (tests with a manual clock call this instead
    /// of waiting for the timer tasks).
    pub async fn tick(&self) {
        let all: Vec<Arc<Queue>> = self.read_queues().values().cloned().collect();
        for queue in all {
            if queue.check_online().is_ok() {
                self.maintain(&queue).await;
            }
        }
    }

    /// Copies messages to the source queue's dead-letter queue durably, then settles them in
    /// the source. A crash between the two duplicates a message in the DLQ, never loses it.
    async fn dead_letter(
        &self,
        source: &Queue,
        partition: &Arc<Partition>,
        items: Vec<DisposalItem>,
    ) -> Result<(), BrokerError> {
        if items.is_empty() {
            return Ok(());
        }
        let result = self.dead_letter_inner(source, partition, &items).await;
        match result {
            Ok(failed) => {
                if !failed.is_empty() {
                    partition.retry_disposals(failed);
                }
                Ok(())
            }
            Err(e) => {
                partition.retry_disposals(items);
                Err(e)
            }
        }
    }

    /// Returns the items the DLQ refused (to retry).
    async fn dead_letter_inner(
        &self,
        source: &Queue,
        partition: &Arc<Partition>,
        items: &[DisposalItem],
    ) -> Result<Vec<DisposalItem>, BrokerError> {
        let dlq = source.spec().dead_letter_queue.clone();
        let source_name = source.spec().name.clone();
        let target = self.dead_letter_target(&dlq).await?;
        let mut refused = Vec::new();
        let mut reasons: Vec<&'static str> = items.iter().map(|i| i.disposal.reason()).collect();
        reasons.sort_unstable();
        reasons.dedup();
        for reason in reasons {
            let group: Vec<DisposalItem> = items
                .iter()
                .filter(|i| i.disposal.reason() == reason)
                .cloned()
                .collect();
            let mut messages = Vec::with_capacity(group.len());
            for item in &group {
                let mut message = partition
                    .read_publish(item.message.offset)?
                    .message
                    .unwrap_or_default();
                // The copy is a fresh message of the DLQ: its delay and TTL belonged to the
                // source (the DLQ's own TTL applies), and its priority only counts if the DLQ
                // has priorities. Its idempotency key names this move, so a resend after an
                // ambiguous outcome (a crash, a lost answer) is not enqueued twice.
                message.delay_ms = 0;
                message.ttl_ms = 0;
                message.idempotency_key = crate::cluster::dead_letter::copy_key(
                    &source_name,
                    partition.id(),
                    item.message.offset,
                    reason,
                );
                if !target.priorities() {
                    message.priority = 0;
                }
                messages.push(message);
            }
            let confirms = self
                .publish_dead_letters(&target, &dlq, &source_name, reason, messages)
                .await?;
            let mut done = Vec::with_capacity(group.len());
            for (item, confirm) in group.into_iter().zip(confirms) {
                if confirm.code == 0 {
                    done.push(item);
                } else {
                    tracing::warn!(queue = %source_name, dlq = %dlq, offset = item.message.offset, error = %confirm.error, "dead-letter queue refused a message");
                    refused.push(item);
                }
            }
            let index = partition.settle_dead_lettered(&done)?;
            partition.wait_durable(index).await?;
        }
        source.wake_consumers();
        Ok(refused)
    }

    /// Publishes dead-letter copies where the DLQ is led: here when this agent leads it,
    /// otherwise over the public API to the agents hosting it (following redirects). A local
    /// publish refused for leadership takes nothing, so it is safely sent on.
    async fn publish_dead_letters(
        &self,
        target: &DeadLetterTarget,
        dlq: &str,
        source: &str,
        reason: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Confirm>, BrokerError> {
        let mut messages = messages;
        if let DeadLetterTarget::Here(queue) = target {
            let local = if self.options.cluster.is_some() {
                queue
                    .publish(messages.clone(), Some((source, reason)))
                    .await
            } else {
                return queue.publish(messages, Some((source, reason))).await;
            };
            match local {
                Err(BrokerError::NotLeader { .. }) => {}
                other => return other,
            }
        }
        let endpoints = self.dead_letter_endpoints(dlq);
        if endpoints.is_empty() {
            return Err(BrokerError::Unavailable(format!(
                "dead-letter queue {dlq:?}: no other agent with a client address hosts it"
            )));
        }
        for message in &mut messages {
            crate::cluster::dead_letter::mark(message, source, reason);
        }
        crate::cluster::dead_letter::forward(&endpoints, dlq, messages).await
    }

    /// Client addresses of the other agents placed to host `dlq`, preferred leader first.
    fn dead_letter_endpoints(&self, dlq: &str) -> Vec<String> {
        let Some(cluster) = &self.options.cluster else {
            return Vec::new();
        };
        let catalog = cluster.meta.current();
        catalog
            .replica_set(dlq, cluster.config.replication_factor)
            .into_iter()
            .filter(|n| *n != cluster.config.node_id)
            .filter_map(|n| catalog.client_address(n))
            .collect()
    }

    /// The dead-letter queue, created with default settings if missing: hosted here, or (in a
    /// cluster) declared and placed on other agents.
    async fn dead_letter_target(&self, name: &str) -> Result<DeadLetterTarget, BrokerError> {
        if let Some(target) = self.find_dead_letter_target(name) {
            return Ok(target);
        }
        self.declare(QueueSpec {
            name: name.to_owned(),
            ..QueueSpec::default()
        })
        .await?;
        self.find_dead_letter_target(name)
            .ok_or_else(|| BrokerError::QueueNotFound {
                queue: name.to_owned(),
            })
    }

    fn find_dead_letter_target(&self, name: &str) -> Option<DeadLetterTarget> {
        if let Some(queue) = self.read_queues().get(name) {
            return Some(DeadLetterTarget::Here(queue.clone()));
        }
        let cluster = self.options.cluster.as_ref()?;
        let spec = cluster.meta.current().queues.get(name)?.clone();
        Some(DeadLetterTarget::Elsewhere(spec))
    }

    fn check_running(&self) -> Result<(), BrokerError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(BrokerError::Unavailable(
                "the agent is shutting down".into(),
            ));
        }
        Ok(())
    }

    /// The queue this agent hosts. In a cluster a declared queue placed on other agents is
    /// answered UNAVAILABLE with its preferred leader's client address (decision 0014), which
    /// redirects again if it does not lead.
    fn queue(&self, name: &str) -> Result<Arc<Queue>, BrokerError> {
        if let Some(queue) = self.read_queues().get(name) {
            return Ok(queue.clone());
        }
        if let Some(cluster) = &self.options.cluster {
            let catalog = cluster.meta.current();
            if catalog.queues.contains_key(name) {
                // This agent is in none of the queue's groups, so it cannot know which
                // replica leads. Naming always the preferred leader would strand a client
                // whose only entry point is this agent while that replica is down; every
                // second redirect names another replica instead (in turn), which redirects
                // to the actual leader. Balanced leaders make the preferred one right.
                let others: Vec<u64> = catalog
                    .replica_set(name, cluster.config.replication_factor)
                    .into_iter()
                    .filter(|n| *n != cluster.config.node_id)
                    .collect();
                let turn = self.redirects.fetch_add(1, Ordering::Relaxed);
                let pick = if turn.is_multiple_of(2) || others.len() < 2 {
                    0
                } else {
                    1 + (turn / 2) as usize % (others.len() - 1)
                };
                return Err(BrokerError::NotLeader {
                    what: format!("queue {name:?} (not hosted by this agent)"),
                    leader: others.get(pick).and_then(|n| catalog.client_address(*n)),
                });
            }
        }
        Err(BrokerError::QueueNotFound {
            queue: name.to_owned(),
        })
    }

    /// Creates a queue or confirms an identical one; returns the spec with defaults filled in
    /// and whether it was created.
    pub async fn declare(&self, spec: QueueSpec) -> Result<(QueueSpec, bool), BrokerError> {
        let spec = effective_spec(&spec)?;
        self.check_running()?;
        if let Some(cluster) = &self.options.cluster {
            return self.declare_replicated(cluster, spec).await;
        }
        let _admin = self.admin.lock().await;
        if let Some(existing) = self.read_queues().get(&spec.name) {
            return match difference(existing.spec(), &spec) {
                Some(difference) => Err(BrokerError::QueueExists {
                    queue: spec.name.clone(),
                    difference,
                }),
                None => Ok((spec, false)),
            };
        }
        let dlq = spec.dead_letter_queue.clone();
        if !dlq.is_empty() && !self.read_queues().contains_key(&dlq) {
            let dlq_spec = effective_spec(&QueueSpec {
                name: dlq,
                ..QueueSpec::default()
            })?;
            self.create_queue(dlq_spec)?;
        }
        self.create_queue(spec.clone())?;
        Ok((spec, true))
    }

    /// Declares through the meta group (from any agent), then waits until this agent has
    /// opened its replicas.
    async fn declare_replicated(
        &self,
        cluster: &ClusterContext,
        spec: QueueSpec,
    ) -> Result<(QueueSpec, bool), BrokerError> {
        let catalog = cluster.meta.current();
        if cluster.config.is_joining() && catalog.state_of(cluster.config.node_id).is_none() {
            return Err(BrokerError::Unavailable(format!(
                "agent {} joins the cluster and has not been added yet (Membership.AddAgent); declare queues at a member",
                cluster.config.node_id
            )));
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
        Ok((spec, true))
    }

    fn create_queue(&self, spec: QueueSpec) -> Result<(), BrokerError> {
        let dir = self.layout.queue_dir(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
        write_spec(&self.layout, &spec)?;
        let queue =
            open_partitions(&self.layout, &self.options, spec.clone()).map_err(|reason| {
                BrokerError::FailedPrecondition(format!(
                    "queue {:?} could not be created: {reason}",
                    spec.name
                ))
            })?;
        let queue = Arc::new(queue);
        self.write_queues().insert(spec.name.clone(), queue.clone());
        self.start_timer(queue);
        Ok(())
    }

    /// Deletes a queue; returns how many messages were discarded.
    pub async fn delete(&self, queue: &str, if_empty: bool) -> Result<u64, BrokerError> {
        validate_name("name", queue)?;
        let admin = self.admin.lock().await;
        let q = self.queue(queue)?;
        let (messages, _) = q.backlog();
        if if_empty {
            q.check_online()?;
            if messages > 0 {
                return Err(BrokerError::FailedPrecondition(format!(
                    "queue {queue:?} still holds {messages} messages"
                )));
            }
        }
        if let Some(cluster) = &self.options.cluster {
            drop(admin);
            let command = MetaCommand {
                command: Some(meta_command::Command::DeleteQueue(DeleteQueue {
                    name: queue.to_owned(),
                })),
            };
            cluster.meta.propose(command).await.map_err(meta_error)?;
            self.wait_queues(|q| !q.contains_key(queue)).await;
            return Ok(messages);
        }
        self.write_queues().remove(queue);
        q.close();
        let dir = self.layout.queue_dir(queue);
        std::fs::remove_dir_all(&dir).map_err(|e| io_error("remove", &dir, e))?;
        Ok(messages)
    }

    /// Every queue's spec, sorted by name.
    pub fn list(&self) -> Vec<QueueSpec> {
        if let Some(cluster) = &self.options.cluster {
            // Every declared queue, hosted here or not.
            return cluster.meta.current().queues.values().cloned().collect();
        }
        self.read_queues()
            .values()
            .map(|q| q.spec().clone())
            .collect()
    }

    /// Counters of one queue.
    pub fn stats(&self, queue: &str) -> Result<GetQueueStatsResponse, BrokerError> {
        self.queue(queue)?.stats()
    }

    /// Publishes messages; returns once every accepted message is durable, one confirm per
    /// message in order (a rejected message has a non-zero `code`). Fails as a whole only for
    /// queue-level problems (unknown queue, shutting down).
    pub async fn publish(
        &self,
        queue: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Confirm>, BrokerError> {
        self.check_running()?;
        if messages.len() > PUBLISH_BATCH_MAX {
            return Err(BrokerError::InvalidArgument {
                field: "messages".into(),
                reason: format!(
                    "{} messages, at most {PUBLISH_BATCH_MAX} per request",
                    messages.len()
                ),
            });
        }
        let mut messages = messages;
        // Copies another agent dead-lettered into a queue led here carry their mark as
        // reserved headers (the public message has no field for it).
        let marks = crate::cluster::dead_letter::take_marks(&mut messages)?;
        let marks = marks.as_ref().map(|(s, r)| (s.as_str(), r.as_str()));
        self.queue(queue)?.publish(messages, marks).await
    }

    /// Opens a subscription to all partitions of `queue` with at most `prefetch` unsettled
    /// deliveries (0 = 100).
    pub async fn subscribe(
        &self,
        queue: &str,
        prefetch: u32,
        consumer_name: &str,
    ) -> Result<Subscription, BrokerError> {
        self.check_running()?;
        let prefetch = if prefetch == 0 {
            PREFETCH_DEFAULT
        } else {
            prefetch
        };
        if prefetch > PREFETCH_MAX {
            return Err(BrokerError::InvalidArgument {
                field: "subscribe.prefetch".into(),
                reason: format!("{prefetch} is more than {PREFETCH_MAX}"),
            });
        }
        let q = self.queue(queue)?;
        q.check_online()?;
        q.check_serving()?;
        let broker = self
            .me
            .upgrade()
            .ok_or_else(|| BrokerError::Unavailable("the broker is closed".into()))?;
        let id = self.next_consumer.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(queue, consumer = consumer_name, id, prefetch, "subscribed");
        q.consumer_joined();
        Ok(Subscription {
            broker,
            queue: q,
            slot: Arc::new(ConsumerSlot::new(id, prefetch as usize)),
            buffer: VecDeque::new(),
            clock: self.options.clock.clone(),
            next_partition: 0,
        })
    }

    /// Settles deliveries of `queue` by tag, from any holder; returns once durable, listing
    /// the tags that failed.
    pub async fn settle(
        &self,
        queue: &str,
        settle: Settle,
    ) -> Result<Vec<SettleOutcome>, BrokerError> {
        let q = self.queue(queue)?;
        self.settle_on(&q, settle).await
    }

    async fn settle_on(
        &self,
        q: &Arc<Queue>,
        settle: Settle,
    ) -> Result<Vec<SettleOutcome>, BrokerError> {
        self.check_running()?;
        let settled = q.settle(&settle)?;
        for (partition, items) in settled.disposals {
            // The settle stands whether or not its messages reached the dead-letter queue yet:
            // a failed move put them back for the queue's timer to retry, and failing the
            // settle would only make the consumer resend what is already recorded.
            if let Err(e) = self.dead_letter(q, &partition, items).await {
                tracing::warn!(queue = %q.spec().name, partition = partition.id(), error = %e, "dead-lettering failed; will retry");
            }
        }
        for (partition, index) in settled.waits {
            partition.wait_durable(index).await?;
        }
        Ok(settled.failures)
    }

    /// Hands this agent's leaderships away before it stops, within [`HAND_OFF_TIMEOUT`]; does
    /// nothing on a single agent or when it already ran. The server calls it while its streams
    /// are still open, so a subscription on a moved partition ends with a redirect that its
    /// client follows, rather than with the server's drain.
    pub async fn hand_off_before_stop(&self) {
        if self.handed_off.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(cluster) = &self.options.cluster
            && tokio::time::timeout(HAND_OFF_TIMEOUT, self.hand_off_all(cluster))
                .await
                .is_err()
        {
            tracing::warn!(timeout = ?HAND_OFF_TIMEOUT, "leadership hand-off before stopping timed out");
        }
    }

    /// Stops accepting work and makes everything durable. Hands leaderships away first, unless
    /// the server did already.
    pub async fn shutdown(&self) {
        self.hand_off_before_stop().await;
        self.shutting_down.store(true, Ordering::Release);
        for task in lock(&self.cluster_tasks).drain(..) {
            task.abort();
        }
        self.reversions.stop();
        let queues: Vec<Arc<Queue>> = self.read_queues().values().cloned().collect();
        for queue in &queues {
            self.close_queue(queue).await;
        }
        if let Some(cluster) = &self.options.cluster {
            match tokio::time::timeout(RAFT_STOP_TIMEOUT, cluster.meta.shutdown()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "the meta group did not stop cleanly"),
                Err(_) => tracing::warn!("the meta group did not stop in time"),
            }
        }
        let timers: Vec<JoinHandle<()>> = lock(&self.timers).drain(..).collect();
        for timer in timers {
            // A timer task only ends by itself; an error here means it panicked, which it
            // reported already.
            let _ = timer.await;
        }
        for queue in &queues {
            for partition in queue.partitions() {
                if let Err(e) = partition.log().sync() {
                    tracing::error!(queue = %queue.spec().name, partition = partition.id(), error = %e, "final sync failed");
                }
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        for queue in self.read_queues().values() {
            queue.close();
        }
    }
}

impl Subscription {
    /// The next delivery; `None` when the broker shuts down or the queue is deleted. Waits
    /// while the consumer holds `prefetch` unsettled deliveries.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(delivery) = self.pop_buffered() {
                return Some(delivery);
            }
            if self.queue.is_closed()
                || self.broker.shutting_down.load(Ordering::Acquire)
                || self.queue.check_serving().is_err()
            {
                return None;
            }
            // Register for wake-ups before looking, so a publish or settle between the look
            // and the wait is not missed.
            let queue = self.queue.clone();
            let notified = queue.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let free = self.slot.free();
            if free > 0 {
                match self.take(free) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(queue = %self.queue.spec().name, error = %e, "delivery failed");
                    }
                }
            }
            if self.broker.options.cluster.is_some() {
                // Leadership can move away without a wake-up: look again now and then.
                let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
            } else {
                notified.await;
            }
        }
    }

    /// Why [`Subscription::next`] ended, when this agent stopped leading the queue (the
    /// consumer should re-subscribe where the error points).
    pub fn ended_by(&self) -> Option<BrokerError> {
        if self.queue.is_closed() {
            // Closed because the queue moved to other agents (placement changed), not deleted:
            // point the consumer at its hosts, as a new request would be.
            return match self.broker.queue(&self.queue.spec().name) {
                Err(moved @ BrokerError::NotLeader { .. }) => Some(moved),
                _ => None,
            };
        }
        self.queue.check_serving().err()
    }

    /// The next delivery if one can be made now, without waiting (`None`: nothing ready, no
    /// credit, or the queue closed).
    pub fn try_next(&mut self) -> Result<Option<Delivery>, BrokerError> {
        if let Some(delivery) = self.pop_buffered() {
            return Ok(Some(delivery));
        }
        let free = self.slot.free();
        if free == 0 || self.queue.is_closed() {
            return Ok(None);
        }
        self.take(free)?;
        Ok(self.pop_buffered())
    }

    /// Takes a batch into the buffer; whether anything came.
    fn take(&mut self, free: usize) -> Result<bool, BrokerError> {
        let deliveries = self.queue.take(
            &self.slot,
            free.min(TAKE_BATCH_MAX),
            &mut self.next_partition,
        )?;
        let deadline = self
            .clock
            .now_ms()
            .saturating_add(self.queue.spec().ack_timeout_ms);
        let any = !deliveries.is_empty();
        self.buffer
            .extend(deliveries.into_iter().map(|d| (d, deadline)));
        Ok(any)
    }

    fn pop_buffered(&mut self) -> Option<Delivery> {
        let now = self.clock.now_ms();
        while let Some((delivery, deadline)) = self.buffer.pop_front() {
            if now < deadline {
                return Some(delivery);
            }
        }
        None
    }

    /// Settles deliveries made to this subscription; returns once durable, listing failures.
    pub async fn settle(&self, settle: Settle) -> Result<Vec<SettleOutcome>, BrokerError> {
        self.broker.settle_on(&self.queue, settle).await
    }

    /// Deliveries this consumer holds unsettled (including ones taken but not yet returned).
    pub fn unsettled(&self) -> usize {
        self.slot.unsettled()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.queue.consumer_left(self.slot.id);
    }
}

/// Writes the spec atomically: temp file, fsync, rename, fsync the directory.
fn write_spec(layout: &Layout, spec: &QueueSpec) -> Result<(), BrokerError> {
    let path = layout.queue_spec(&spec.name);
    let tmp = path.with_extension("pb.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| io_error("create", &tmp, e))?;
    file.write_all(&spec.encode_to_vec())
        .map_err(|e| io_error("write", &tmp, e))?;
    file.sync_all().map_err(|e| io_error("fsync", &tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_error("rename", &path, e))?;
    let dir = layout.queue_dir(&spec.name);
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("fsync", &dir, e))?;
    Ok(())
}

/// Loads one queue directory; `None` for a directory without a spec (a create that crashed
/// before its spec was written holds no messages).
fn open_queue(layout: &Layout, options: &BrokerOptions, name: &str) -> Option<Queue> {
    let path = layout.queue_spec(name);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(dir = %layout.queue_dir(name).display(), "queue directory without spec.pb ignored");
            return None;
        }
        Err(e) => {
            let spec = QueueSpec {
                name: name.to_owned(),
                ..QueueSpec::default()
            };
            return Some(Queue::offline(
                spec,
                format!("read {}: {e}", path.display()),
            ));
        }
    };
    let stored = match QueueSpec::decode(bytes.as_slice()) {
        Ok(spec) => spec,
        Err(e) => {
            let spec = QueueSpec {
                name: name.to_owned(),
                ..QueueSpec::default()
            };
            return Some(Queue::offline(
                spec,
                format!("{} is not a valid QueueSpec: {e}", path.display()),
            ));
        }
    };
    let spec = match effective_spec(&stored) {
        Ok(spec) if spec.name == name => spec,
        Ok(spec) => {
            return Some(Queue::offline(
                spec.clone(),
                format!("{} names queue {:?}", path.display(), spec.name),
            ));
        }
        Err(e) => return Some(Queue::offline(stored, format!("{}: {e}", path.display()))),
    };
    Some(match open_partitions(layout, options, spec.clone()) {
        Ok(queue) => queue,
        Err(reason) => {
            tracing::error!(queue = name, %reason, "queue kept offline");
            Queue::offline(spec, reason)
        }
    })
}

/// Opens every partition of a queue, replaying its log; the error names the partition and,
/// for corruption, the file and offset.
fn open_partitions(
    layout: &Layout,
    options: &BrokerOptions,
    spec: QueueSpec,
) -> Result<Queue, String> {
    let config = Queue::state_config(&spec);
    let mut partitions = Vec::with_capacity(spec.partitions as usize);
    for id in 0..spec.partitions {
        let dir = layout.partition_dir(&spec.name, id);
        let log = options
            .logs
            .open(&dir)
            .map_err(|e| format!("partition {id}: {e}"))?;
        let partition = Partition::open(&spec.name, id, log, config, options.clock.clone())
            .map_err(|e| format!("partition {id}: {e}"))?;
        partitions.push(Arc::new(partition));
    }
    Ok(Queue::new(spec, partitions))
}

/// Runs [`Broker::balance_once`] every [`BALANCE_INTERVAL`] for the broker's life.
async fn balance_leaders(me: Weak<Broker>) {
    loop {
        tokio::time::sleep(BALANCE_INTERVAL).await;
        let Some(broker) = me.upgrade() else { return };
        if broker.shutting_down.load(Ordering::Acquire) {
            return;
        }
        if let Some(cluster) = broker.options.cluster.clone() {
            broker.balance_once(&cluster).await;
        }
    }
}

/// Keeps only the vote of a replica whose log was set aside: its commit hint and purge point
/// described entries it no longer has.
fn forget_log_positions(meta_dir: &Path) -> Result<(), crate::replication::meta::MetaError> {
    let file = crate::replication::meta::MetaFile::new(meta_dir);
    let saved = file.load()?;
    file.save(&sluice_proto::peer::v1::ReplicaMeta {
        vote: saved.vote,
        ..Default::default()
    })
}

/// Renames a damaged partition log directory to `<dir>.corrupt-<unix seconds>`; returns the
/// new path.
fn quarantine(dir: &Path) -> std::io::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = dir.with_extension(format!("corrupt-{stamp}"));
    std::fs::rename(dir, &aside)?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(aside)
}

/// Runs [`Broker::reconcile_once`] every [`RECONCILE_INTERVAL`] for the broker's life.
async fn reconcile_membership(me: Weak<Broker>) {
    loop {
        tokio::time::sleep(RECONCILE_INTERVAL).await;
        let Some(broker) = me.upgrade() else { return };
        if broker.shutting_down.load(Ordering::Acquire) {
            return;
        }
        if let Some(cluster) = broker.options.cluster.clone() {
            broker.reconcile_once(&cluster).await;
        }
    }
}

/// What [`Broker::hand_off_all`] achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandOff {
    /// Groups whose leadership moved.
    pub moved: u32,
    /// Groups still led here (`<queue>/<partition>` or `meta`): no caught-up voter took them.
    pub remaining: Vec<String>,
}

/// Follows the meta group's catalog for the broker's life.
async fn follow_catalog(
    me: Weak<Broker>,
    mut catalog: tokio::sync::watch::Receiver<Arc<crate::cluster::Catalog>>,
) {
    loop {
        let current = catalog.borrow_and_update().clone();
        {
            let Some(broker) = me.upgrade() else { return };
            if broker.shutting_down.load(Ordering::Acquire) {
                return;
            }
            broker.sync_catalog(&current).await;
        }
        if catalog.changed().await.is_err() {
            return;
        }
    }
}

/// Client addresses of the agents, as registered in the catalog.
fn addresses(meta: &Arc<crate::cluster::MetaGroup>) -> crate::queue::replica::Addresses {
    let catalog = meta.catalog();
    Arc::new(move |node| catalog.borrow().client_address(node))
}

async fn propose_declare(cluster: &ClusterContext, spec: QueueSpec) -> Result<(), BrokerError> {
    let command = MetaCommand {
        command: Some(meta_command::Command::DeclareQueue(DeclareQueue {
            spec: Some(spec),
        })),
    };
    cluster.meta.propose(command).await.map_err(meta_error)
}

fn meta_error(e: crate::cluster::MetaError) -> BrokerError {
    use crate::cluster::MetaError;
    match e {
        MetaError::Invalid(e) => e,
        MetaError::QueueConflict { queue, difference } => {
            BrokerError::QueueExists { queue, difference }
        }
        MetaError::UnknownQueue { queue } => BrokerError::QueueNotFound { queue },
        other => BrokerError::Unavailable(format!("cluster catalog: {other}")),
    }
}

/// Opens `FileLog`s with the broker's storage knobs.
#[derive(Debug)]
pub struct FileLogOpener {
    /// Segment size and fsync policy.
    pub config: crate::config::LogConfig,
}

impl LogOpener for FileLogOpener {
    fn open(&self, dir: &Path) -> Result<Arc<dyn LogStore>, LogError> {
        let (log, recovery) = crate::log::FileLog::open(dir, self.config)?;
        if recovery.truncated_bytes > 0 {
            tracing::warn!(dir = %dir.display(), bytes = recovery.truncated_bytes, "cut a torn tail (never confirmed)");
        }
        Ok(Arc::new(log))
    }
}
