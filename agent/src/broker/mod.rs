//! The agent's queues and the operations the gRPC services call.
//!
//! [`Broker`] owns every queue on this agent: it validates declarations, routes publishes to
//! partitions and hands out [`Subscription`]s. It speaks in `sluice.v1` protobuf types so the
//! gRPC layer is a thin translation; failures are [`BrokerError`]s, whose gRPC code is chosen
//! at the edge (`grpc/status.rs`).
//!
//! # Layout
//! - `mod.rs` (here): [`Broker`], its options, opening, the registry of queues and the request
//!   API (declare, delete, list, stats, publish, subscribe, settle, shutdown).
//! - [`store`]: spec files, opening queues and partitions from disk, quarantine, log openers.
//! - [`subscription`]: a consumer's open [`Subscription`].
//! - [`timers`]: the per-queue timer task and the broker's periodic loops.
//! - [`dead_letter`]: moving messages to a dead-letter queue, here or on another agent.
//! - [`replicas`]: cluster mode's catalog follower and replicated queues (open, declare, close).
//! - [`leadership`]: the leader balancer and handing leaderships away.
//! - [`membership`]: the membership reconcile loop and dropping replicas a group removed.

pub mod dead_letter;
mod leadership;
mod membership;
mod replicas;
pub mod store;
mod subscription;
mod timers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use sluice_proto::peer::v1::{DeleteQueue, MetaCommand, meta_command};
use sluice_proto::v1::{GetQueueStatsResponse, Message, QueueSpec, Settle};
use tokio::task::JoinHandle;

pub use self::leadership::Relinquished;
pub use self::store::{FileLogOpener, LogOpener};
pub use self::subscription::Subscription;
use crate::cluster::ClusterContext;
pub use crate::error::BrokerError;
use crate::error::{Confirmation, SettleFailure};
use crate::layout::Layout;
use crate::log::LogError;
use crate::queue::clock::{Clock, SystemClock};
use crate::queue::consumer::ConsumerSlot;
use crate::queue::queue::Queue;
use crate::queue::spec::{difference, effective_spec, validate_name};

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
/// Longest a stopping agent waits for one Raft group to stop.
const RAFT_STOP_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// Set by the first [`Broker::relinquish_before_stop`]: the stop hands off once, so a
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
    /// The catalog the last reconcile round looked at every group against, and what it found.
    reconciled: Mutex<membership::Reconciled>,
    /// Redirects answered for queues hosted elsewhere; picks the replica the next one names.
    redirects: AtomicU64,
    /// Handed to subscriptions and timer tasks.
    me: Weak<Broker>,
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
                return Err(BrokerError::DataDirLocked {
                    dir: layout.root().to_owned(),
                    lock: lock_path,
                });
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
            if let Some(queue) = store::open_queue(&layout, &options, &name) {
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
            reconciled: Mutex::new(membership::Reconciled::default()),
            me: me.clone(),
        });
        let all: Vec<Arc<Queue>> = broker.read_queues().values().cloned().collect();
        for queue in all {
            broker.start_timer(queue);
        }
        if let Some(cluster) = &broker.options.cluster {
            let tasks = [
                replicas::follow_catalog(broker.me.clone(), cluster.meta.catalog()),
                leadership::balance_leaders(broker.me.clone()),
                membership::reconcile_membership(broker.me.clone()),
            ];
            lock(&broker.cluster_tasks).extend(tasks);
        }
        Ok(broker)
    }

    /// The cluster side of this broker, `None` for a single agent.
    pub fn cluster(&self) -> Option<&ClusterContext> {
        self.options.cluster.as_ref()
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

    fn check_running(&self) -> Result<(), BrokerError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(BrokerError::ShuttingDown);
        }
        Ok(())
    }

    /// The queue named by request field `field`: a malformed name is refused naming the field
    /// (as declare does), a well-formed one is looked up with [`Broker::queue`].
    fn named_queue(&self, field: &str, name: &str) -> Result<Arc<Queue>, BrokerError> {
        validate_name(field, name)?;
        self.queue(name)
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

    /// Deletes a queue; returns how many messages were discarded.
    pub async fn delete(&self, queue: &str, if_empty: bool) -> Result<u64, BrokerError> {
        validate_name("name", queue)?;
        let admin = self.admin.lock().await;
        let q = self.queue(queue)?;
        let (messages, _) = q.backlog();
        if if_empty {
            q.check_online()?;
            if messages > 0 {
                return Err(BrokerError::QueueNotEmpty {
                    queue: queue.to_owned(),
                    messages,
                });
            }
        }
        if let Some(cluster) = &self.options.cluster {
            drop(admin);
            let command = MetaCommand {
                command: Some(meta_command::Command::DeleteQueue(DeleteQueue {
                    name: queue.to_owned(),
                })),
            };
            cluster
                .meta
                .propose(command)
                .await
                .map_err(replicas::catalog_error)?;
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

    /// Counters of one queue as this agent's replicas see them (a follower's lag the
    /// leader; its in-flight and consumer counts are the leader's business). For this agent's
    /// metrics and for [`Broker::leader_stats`] of another agent.
    pub fn stats(&self, queue: &str) -> Result<GetQueueStatsResponse, BrokerError> {
        self.named_queue("name", queue)?.stats()
    }

    /// Counters of one queue as each partition's leader sees them (what `GetQueueStats`
    /// answers): partitions led elsewhere are asked of their leaders. While a partition has no
    /// leader (an election) the answer is UNAVAILABLE, never a follower's numbers.
    pub async fn leader_stats(&self, queue: &str) -> Result<GetQueueStatsResponse, BrokerError> {
        let q = self.named_queue("name", queue)?;
        let mut stats = q.stats()?;
        if self.options.cluster.is_none() {
            return Ok(stats);
        }
        // Partitions led by other agents, by leader. Consumers are counted where they
        // subscribed, which is at a leader: this agent's own count plus each leader's.
        let mut elsewhere: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for partition in q.partitions() {
            if partition.is_serving() {
                continue;
            }
            match partition.replica().and_then(|link| link.leader_address()) {
                Some(leader) => elsewhere.entry(leader).or_default().push(partition.id()),
                None => return Err(partition.not_leader()),
            }
        }
        if elsewhere.is_empty() {
            return Ok(stats);
        }
        for (leader, ids) in elsewhere {
            let theirs = crate::cluster::client::local_stats(&leader, queue)
                .await
                .map_err(|_| BrokerError::NotLeader {
                    what: format!("the counters of queue {queue:?}"),
                    leader: Some(leader.clone()),
                })?;
            for id in ids {
                let Some(found) = theirs.partitions.iter().find(|p| p.partition == id) else {
                    continue;
                };
                if let Some(own) = stats.partitions.iter_mut().find(|p| p.partition == id) {
                    *own = found.clone();
                }
            }
            stats.consumers += theirs.consumers;
        }
        stats.total = Some(crate::queue::queue::totals(&stats.partitions));
        Ok(stats)
    }

    /// Publishes messages; returns once every accepted message is durable, one confirmation
    /// per message in order (a refused message is an `Err`). Fails as a whole only for
    /// queue-level problems (unknown queue, shutting down).
    pub async fn publish(
        &self,
        queue: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Confirmation>, BrokerError> {
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
        let marks = dead_letter::take_marks(&mut messages)?;
        let marks = marks.as_ref().map(|(s, r)| (s.as_str(), r.as_str()));
        self.named_queue("queue", queue)?
            .publish(messages, marks)
            .await
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
        let q = self.named_queue("subscribe.queue", queue)?;
        q.check_online()?;
        q.check_serving()?;
        let broker = self.me.upgrade().ok_or(BrokerError::BrokerClosed)?;
        let id = self.next_consumer.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(queue, consumer = consumer_name, id, prefetch, "subscribed");
        q.consumer_joined();
        let slot = Arc::new(ConsumerSlot::new(id, prefetch as usize));
        Ok(Subscription::new(broker, q, slot))
    }

    /// Settles deliveries of `queue` by tag, from any holder; returns once durable, listing
    /// the tags that failed.
    pub async fn settle(
        &self,
        queue: &str,
        settle: Settle,
    ) -> Result<Vec<SettleFailure>, BrokerError> {
        let q = self.named_queue("queue", queue)?;
        self.settle_on(&q, settle).await
    }

    /// [`Broker::settle`] on a queue already looked up (a subscription's own).
    async fn settle_on(
        &self,
        q: &Arc<Queue>,
        settle: Settle,
    ) -> Result<Vec<SettleFailure>, BrokerError> {
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

    /// Stops accepting work and makes everything durable. Hands leaderships away first, unless
    /// the server did already.
    pub async fn shutdown(&self) {
        self.relinquish_before_stop().await;
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
            crate::replication::stop_within(
                crate::cluster::META_GROUP,
                RAFT_STOP_TIMEOUT,
                cluster.meta.shutdown(),
            )
            .await;
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
