//! A partition's link to its Raft group: what lets [`Partition`](super::partition::Partition)
//! run as one replica of a replicated partition (decision 0010).
//!
//! The leader applies each command to its delivery state as it proposes it (speculatively, so
//! dispatch decisions such as "this message is in flight" take effect at once) at the next
//! position of the open entry of its [`Outbox`](super::outbox::Outbox); a proposer task takes
//! whole entries and submits them to openraft in order, and a confirm waits until its entry is
//! committed and applied. Followers apply committed entries through the state
//! machine. When a replica stops leading, its speculative state may hold entries the new leader
//! will truncate, so it is rebuilt from the committed log.

use std::sync::Arc;

use std::future::Future;
use std::pin::Pin;

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};

use super::partition::SharedState;

use crate::replication::{QueueStateMachine, Raft};

/// Leadership and progress of one replica, as the queue layer needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Current Raft term.
    pub term: u64,
    /// The known leader.
    pub leader: Option<u64>,
    /// This replica leads in `term` and its state is in step with its log: it may serve.
    pub ready: bool,
    /// Partition-log index of the last applied (hence committed) entry.
    pub applied: u64,
    /// Counts the times this replica started serving as leader; a confirm waits within the
    /// epoch its commands were proposed in.
    pub epoch: u64,
    /// In the current epoch, every command up to this index was committed at exactly the
    /// index the leader applied it at.
    pub confirmed: u64,
}

/// Entries submitted to openraft and not yet committed, per partition (see [`run_proposer`]).
/// Few on purpose: while they are written and replicated, the next entry fills up with
/// everything that arrives meanwhile, so one fsync carries many commands. openraft 0.9's core
/// fsyncs each entry before it replicates it or does anything else, so every entry in flight
/// is one more fsync a confirm may queue behind: 2 halved p50 and p99 confirm latency at
/// 75,000 msgs/s against 8 (decision 0015; 8 had been best for throughput before the flush
/// callback lost a hop).
pub const ENTRIES_IN_FLIGHT: usize = 2;

/// Maps a node id to the client address a redirected client should use.
pub type Addresses = Arc<dyn Fn(u64) -> Option<String> + Send + Sync>;

/// The Raft side of a replicated partition.
pub struct ReplicaLink {
    /// This agent's node id.
    pub node_id: u64,
    /// The group's name (`<queue>/<partition>`).
    pub group: String,
    /// The group's Raft.
    pub raft: Raft,
    /// Its state machine (shares the partition's delivery state).
    pub machine: QueueStateMachine,
    /// Status, written by the role task and the state machine.
    pub status: watch::Sender<ReplicaStatus>,
    /// Wakes the proposer task: the outbox has commands (a pending wake-up is kept once).
    pub wake: mpsc::Sender<()>,
    /// Membership changes for the proposer to run between two entries.
    barriers: mpsc::Sender<Barrier>,
    /// Client addresses of the agents, for redirects.
    pub addresses: Addresses,
}

impl std::fmt::Debug for ReplicaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaLink")
            .field("node_id", &self.node_id)
            .field("group", &self.group)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl ReplicaLink {
    /// The current status.
    pub fn status(&self) -> ReplicaStatus {
        *self.status.borrow()
    }

    /// Client address of the current leader, if known and not this agent.
    pub fn leader_address(&self) -> Option<String> {
        let status = self.status();
        status
            .leader
            .filter(|l| *l != self.node_id)
            .and_then(|l| (self.addresses)(l))
    }
}

impl ReplicaLink {
    /// Stops serving for good (Raft stopped, or the replica was removed): confirms still
    /// waiting fail at once (ABORTED, resend) instead of waiting for a commit that cannot come.
    pub fn stop_serving(&self) {
        self.status.send_modify(|s| s.ready = false);
    }

    /// Tells the proposer that the outbox has commands.
    pub fn wake_proposer(&self) {
        // Full means a wake-up is already pending; closed means the proposer is gone.
        let _ = self.wake.try_send(());
    }

    /// Runs `change`, a membership change of this group appending at most `entries` log
    /// entries, as its leader, between two of the proposer's entries: the leader's state has
    /// the change's indices reserved, so confirms waiting meanwhile are not aborted by a resync
    /// (publishes wait for the change instead). Gives up waiting after `timeout` (the change
    /// itself still runs to its end).
    pub async fn change_membership(
        &self,
        entries: u64,
        change: MembershipChange,
        timeout: std::time::Duration,
    ) -> Result<(), MembershipChangeError> {
        let (done, outcome) = oneshot::channel();
        let barrier = Barrier {
            entries,
            change,
            done,
        };
        let wait = async {
            self.barriers
                .send(barrier)
                .await
                .map_err(|_| MembershipChangeError::ProposerStopped)?;
            outcome
                .await
                .map_err(|_| MembershipChangeError::ProposerStopped)?
                .map_err(MembershipChangeError::Failed)
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| MembershipChangeError::TimedOut(timeout))?
    }

    /// Stops this replica: it stops serving (waiting confirms fail at once) and its Raft
    /// group stops within `timeout`. Everything acknowledged is on disk already, so a Raft
    /// that does not stop in time is left behind as a crash would leave it.
    pub async fn stop(&self, timeout: std::time::Duration) {
        self.stop_serving();
        match tokio::time::timeout(timeout, self.raft.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(group = %self.group, error = %e, "raft did not stop cleanly")
            }
            Err(_) => tracing::warn!(group = %self.group, "raft did not stop in time"),
        }
    }
}

/// Why [`ReplicaLink::change_membership`] did not see its change through.
#[derive(Debug, thiserror::Error)]
pub enum MembershipChangeError {
    /// The partition's proposer stopped (the replica is closing).
    #[error("the partition's proposer stopped")]
    ProposerStopped,
    /// No outcome within the timeout; the change still runs to its end.
    #[error("no outcome within {0:?}")]
    TimedOut(std::time::Duration),
    /// The change itself failed.
    #[error(transparent)]
    Failed(ChangeFailure),
}

/// Why a membership change failed, as the change reports it.
pub type ChangeFailure = Box<dyn std::error::Error + Send + Sync>;

/// Takes the leader's staged entries whole and submits them to openraft in order, at most
/// [`ENTRIES_IN_FLIGHT`] at a time, and checks, in order, that each entry was committed at the
/// index the leader applied it at. A failure (leadership lost, an unexpected entry in between)
/// stops the epoch: the partition stops serving until the role task resyncs it. Membership
/// changes run between two entries ([`ReplicaLink::change_membership`]).
async fn run_proposer(
    raft: Raft,
    state: SharedState,
    mut wake: mpsc::Receiver<()>,
    mut barriers: mpsc::Receiver<Barrier>,
    status: watch::Sender<ReplicaStatus>,
) {
    let (checks, pending) = mpsc::unbounded_channel();
    // openraft 0.9 writes (and fsyncs) each entry before taking the next, and sends heartbeats
    // from the same loop: a deep queue in front of it delays heartbeats past the followers'
    // election timeout and costs the leadership. Commands wait in the outbox instead, where
    // they pack into the next entry.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(ENTRIES_IN_FLIGHT));
    let checker = tokio::spawn(check_landings(pending, status.clone()));
    let proposer = Proposer {
        raft,
        state,
        status,
        in_flight,
        checks,
    };
    'entries: loop {
        let Ok(permit) = proposer.in_flight.clone().acquire_owned().await else {
            break;
        };
        let next = loop {
            if let Ok(barrier) = barriers.try_recv() {
                break Next::Barrier(barrier);
            }
            if let Some(staged) = super::partition::lock_state(&proposer.state).take_staged() {
                break Next::Entry(staged);
            }
            tokio::select! {
                barrier = barriers.recv() => match barrier {
                    Some(barrier) => break Next::Barrier(barrier),
                    // The link is gone, and with it the partition.
                    None => break 'entries,
                },
                woken = wake.recv() => if woken.is_none() {
                    break 'entries;
                },
            }
        };
        let submitted = match next {
            Next::Entry(staged) => proposer.submit(staged, permit).await,
            Next::Barrier(barrier) => {
                drop(permit);
                proposer.run_barrier(barrier).await
            }
        };
        if !submitted {
            break;
        }
    }
    drop(proposer);
    let _ = checker.await;
}

/// What the proposer does next.
enum Next {
    Entry(super::outbox::Staged),
    Barrier(Barrier),
}

/// A membership change waiting for its turn between two entries (see
/// [`ReplicaLink::change_membership`]).
struct Barrier {
    /// Most entries the change appends; the leader reserves that many indices for it.
    entries: u64,
    /// The change, run on this group's Raft once every entry before it has landed.
    change: MembershipChange,
    /// Its outcome, for the caller.
    done: oneshot::Sender<Result<(), ChangeFailure>>,
}

/// A membership change of a partition's group, as [`ReplicaLink::change_membership`] runs it.
pub type MembershipChange = Pin<Box<dyn Future<Output = Result<(), ChangeFailure>> + Send>>;

/// Submits entries and runs membership changes between them; one per partition, owned by
/// [`run_proposer`].
struct Proposer {
    raft: Raft,
    state: SharedState,
    status: watch::Sender<ReplicaStatus>,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Submitted entries for [`check_landings`]: epoch, expected index, the landing, and the
    /// in-flight permit it holds until checked.
    checks: mpsc::UnboundedSender<Landing>,
}

/// One submitted entry the checker waits for.
type Landing = (
    u64,
    u64,
    std::time::Instant,
    <<crate::replication::TypeConfig as openraft::RaftTypeConfig>::Responder as openraft::raft::responder::Responder<crate::replication::TypeConfig>>::Receiver,
    tokio::sync::OwnedSemaphorePermit,
);

impl Proposer {
    /// Hands `staged` to openraft (unless its epoch ended); false once Raft or the checker
    /// is gone.
    async fn submit(&self, staged: super::outbox::Staged, permit: OwnedSemaphorePermit) -> bool {
        let current = *self.status.borrow();
        if staged.epoch != current.epoch || !current.ready {
            // Applied in an epoch that ended: the role task rebuilds that state.
            return true;
        }
        let submitted = std::time::Instant::now();
        match self
            .raft
            .client_write_ff(super::entry::encode(staged.commands))
            .await
        {
            Ok(rx) => self
                .checks
                .send((staged.epoch, staged.index, submitted, rx, permit))
                .is_ok(),
            Err(_) => {
                // Raft stopped: nothing more can be confirmed.
                self.status.send_modify(|s| s.ready = false);
                true
            }
        }
    }

    /// Runs a membership change so that the leader's state stays in step with the log: every
    /// staged entry is submitted, the next `entries` indices are applied as empty (what a
    /// membership entry is to the delivery state), the change runs once everything before it
    /// has landed, and indices it did not use are filled with empty entries. Only a change
    /// that appended more than it reserved costs a resync.
    async fn run_barrier(&self, barrier: Barrier) -> bool {
        let Barrier {
            entries,
            change,
            done,
        } = barrier;
        let current = *self.status.borrow();
        if !current.ready {
            // Not serving: the role task rebuilds the state from the log before serving again.
            let _ = done.send(change.await);
            return true;
        }
        let (drained, reserved) = {
            let mut st = super::partition::lock_state(&self.state);
            let drained: Vec<_> = std::iter::from_fn(|| st.take_staged()).collect();
            (drained, st.reserve_entries(entries))
        };
        for staged in drained {
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                return false;
            };
            if !self.submit(staged, permit).await {
                return false;
            }
        }
        // Every permit back: every entry before the reserved ones has landed and was checked.
        let Ok(all) = self.in_flight.acquire_many(ENTRIES_IN_FLIGHT as u32).await else {
            return false;
        };
        let result = change.await;
        let last_membership = self
            .raft
            .with_raft_state(|st| st.membership_state.effective().log_id().map(|l| l.index))
            .await
            .ok()
            .flatten()
            .map(crate::replication::codec::log_index);
        drop(all);
        let used_until = last_membership
            .filter(|i| i >= reserved.start())
            .unwrap_or(reserved.start() - 1);
        if used_until > *reserved.end() {
            tracing::error!(
                reserved = ?reserved,
                landed = used_until,
                "a membership change used more entries than reserved; resynchronising"
            );
            self.status.send_modify(|s| s.ready = false);
        } else {
            for index in used_until + 1..=*reserved.end() {
                let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                    return false;
                };
                let empty = super::outbox::Staged::empty(index, current.epoch);
                if !self.submit(empty, permit).await {
                    return false;
                }
            }
        }
        let _ = done.send(result);
        true
    }
}

/// Checks, in submission order, that each entry landed where the leader applied it; anything
/// else ends the epoch.
async fn check_landings(
    mut pending: mpsc::UnboundedReceiver<Landing>,
    status: watch::Sender<ReplicaStatus>,
) {
    while let Some((epoch, index, submitted, rx, _permit)) = pending.recv().await {
        let result: Result<Result<crate::replication::types::WriteResponse, _>, _> = rx.await;
        crate::replication::timing::record("submit_to_applied", submitted.elapsed());
        let landed = match result {
            Ok(Ok(response)) => Some(crate::replication::codec::log_index(response.log_id.index)),
            Ok(Err(_)) | Err(_) => None,
        };
        status.send_if_modified(|s| {
            if s.epoch != epoch || !s.ready {
                return false;
            }
            if landed == Some(index) {
                s.confirmed = s.confirmed.max(index);
            } else {
                if let Some(at) = landed {
                    tracing::error!(
                        expected = index,
                        landed = at,
                        "a proposal landed at an unexpected index; resynchronising"
                    );
                }
                s.ready = false;
            }
            true
        });
    }
}

/// Follows the group's leadership: when this replica becomes leader it waits until its whole
/// log is committed and applied, then makes the partition serve (a new epoch); when it stops
/// leading (or an epoch failed), the partition stops serving and its state is rebuilt from
/// the committed log.
pub async fn run_role(
    partition: std::sync::Weak<super::partition::Partition>,
    link: Arc<ReplicaLink>,
) {
    follow_role(partition, link.clone()).await;
    link.stop_serving();
}

/// The body of [`run_role`]; returns when Raft stopped or the partition is gone.
async fn follow_role(
    partition: std::sync::Weak<super::partition::Partition>,
    link: Arc<ReplicaLink>,
) {
    let mut metrics = link.raft.metrics();
    let mut status_rx = link.status.subscribe();
    loop {
        let m = metrics.borrow_and_update().clone();
        let Some(partition) = partition.upgrade() else {
            return;
        };
        let leading =
            m.current_leader == Some(link.node_id) && m.state == openraft::ServerState::Leader;
        let current = link.status();
        link.status.send_if_modified(|s| {
            let changed = s.term != m.current_term || s.leader != m.current_leader;
            s.term = m.current_term;
            s.leader = m.current_leader;
            changed
        });
        if current.ready && (!leading || current.term != m.current_term) {
            link.status.send_modify(|s| s.ready = false);
        }
        let current = link.status();
        if !current.ready {
            // Everything in a leader's log is committed once its own first entry of the term is
            // applied: then the state equals the log and serving can start.
            let last_log = m
                .last_log_index
                .map_or(0, crate::replication::codec::log_index);
            let caught_up = m.last_applied.is_some_and(|a| {
                a.leader_id.term == m.current_term
                    && crate::replication::codec::log_index(a.index) >= last_log
            });
            let start = leading && caught_up;
            if !start && !partition.is_speculative() {
                drop(partition);
                if !wait_change(&mut metrics, &mut status_rx).await {
                    return;
                }
                continue;
            }
            let result = link
                .machine
                .while_paused(|applied| {
                    if start {
                        partition.start_leading(applied).map(|()| Some(applied))
                    } else {
                        partition.stop_leading(applied).map(|()| None)
                    }
                })
                .await;
            match result {
                Ok(Some(applied)) => {
                    link.status.send_modify(|s| {
                        s.epoch += 1;
                        s.confirmed = applied;
                        s.ready = true;
                    });
                    tracing::info!(group = %link.group, term = m.current_term, "leading");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(group = %link.group, error = %e, "cannot rebuild the partition state; stepping out");
                    return;
                }
            }
        }
        drop(partition);
        if !wait_change(&mut metrics, &mut status_rx).await {
            return;
        }
    }
}

/// Waits for a change of the Raft metrics or the status; false once either is closed.
async fn wait_change(
    metrics: &mut watch::Receiver<openraft::RaftMetrics<u64, openraft::BasicNode>>,
    status: &mut watch::Receiver<ReplicaStatus>,
) -> bool {
    tokio::select! {
        changed = metrics.changed() => changed.is_ok(),
        changed = status.changed() => changed.is_ok(),
    }
}

/// What a replicated partition is opened with.
pub struct Setup {
    /// This agent's node id.
    pub node_id: u64,
    /// The group's name on every replica (`<queue>/<partition>`).
    pub group: String,
    /// The initial voters with their peer addresses; empty on a joining agent, whose replica
    /// initialises nothing and waits for the group's leader to add it (decision 0011).
    pub voters: std::collections::BTreeMap<u64, openraft::BasicNode>,
    /// Raft settings.
    pub raft_config: Arc<openraft::Config>,
    /// Where the group is registered for the peer service.
    pub groups: crate::replication::RaftGroups,
    /// Client addresses for redirects.
    pub addresses: Addresses,
    /// Directory of the Raft metadata (vote, purge point).
    pub meta_dir: std::path::PathBuf,
}

/// Why a replicated partition could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenReplicaError {
    /// The Raft metadata could not be read.
    #[error(transparent)]
    Meta(#[from] crate::replication::meta::ReplicaMetaError),
    /// The state could not be rebuilt from the log.
    #[error(transparent)]
    Recover(#[from] crate::replication::state_machine::RecoverError),
    /// openraft refused to start.
    #[error("raft: {0}")]
    Raft(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Opens this agent's replica of a partition over `log`: starts its Raft group (initialising
/// it with `setup.voters` the first time), the proposer and the role task.
pub async fn open(
    queue: &str,
    id: u32,
    log: Arc<dyn crate::log::LogStore>,
    config: super::state::StateConfig,
    clock: Arc<dyn super::clock::Clock>,
    setup: Setup,
) -> Result<Arc<super::partition::Partition>, OpenReplicaError> {
    let state = Arc::new(std::sync::Mutex::new(super::state::PartitionState::new(
        config,
        log.first_index(),
    )));
    let status = watch::Sender::new(ReplicaStatus::default());
    let machine = QueueStateMachine::shared(
        config,
        log.clone(),
        state.clone(),
        Some(status.clone()),
        Some(setup.meta_dir.clone()),
    );
    let mut store = crate::replication::ReplicatedLog::open(
        log.clone(),
        crate::replication::meta::MetaFile::new(&setup.meta_dir),
        machine.purge_floor(),
    )?;
    // Everything up to the saved commit hint (or the purge point, which is committed too) is
    // replayed here; openraft re-applies only what follows.
    let purged = openraft::storage::RaftLogStorage::get_log_state(&mut store)
        .await
        .map_err(|e| OpenReplicaError::Raft(Box::new(e)))?
        .last_purged_log_id;
    machine.recover(store.committed_hint().max(purged)).await?;
    let raft = Raft::new(
        setup.node_id,
        setup.raft_config.clone(),
        crate::replication::PeerNetwork::new(setup.group.clone()),
        store,
        machine.clone(),
    )
    .await
    .map_err(|e| OpenReplicaError::Raft(Box::new(e)))?;
    setup.groups.insert(setup.group.clone(), raft.clone());
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| OpenReplicaError::Raft(Box::new(e)))?;
    if !initialized && !setup.voters.is_empty() {
        // Every replica initialises with the same voters; openraft accepts that, and whichever
        // initialisation a replica's log already holds wins.
        if let Err(e) = raft.initialize(setup.voters.clone()).await {
            tracing::debug!(group = %setup.group, error = %e, "initialize skipped");
        }
    }
    let (wake, woken) = mpsc::channel(1);
    let (barriers, barriers_rx) = mpsc::channel(1);
    let link = Arc::new(ReplicaLink {
        node_id: setup.node_id,
        group: setup.group,
        raft: raft.clone(),
        machine,
        status: status.clone(),
        wake,
        barriers,
        addresses: setup.addresses,
    });
    let partition = Arc::new(super::partition::Partition::replicated(
        queue,
        id,
        log,
        state.clone(),
        config,
        clock,
        link.clone(),
    ));
    tokio::spawn(run_proposer(raft, state, woken, barriers_rx, status));
    tokio::spawn(run_role(Arc::downgrade(&partition), link));
    Ok(partition)
}

impl ReplicaLink {
    /// The follower that holds the most of this leader's log, with how far it got
    /// (partition-log index); `None` when not leading or no follower reported yet.
    pub fn best_follower(&self) -> Option<(u64, u64)> {
        let metrics = self.raft.metrics().borrow().clone();
        metrics
            .replication
            .as_ref()?
            .iter()
            .filter(|(node, _)| **node != self.node_id)
            .map(|(node, matched)| {
                let index = matched.map_or(0, |m| crate::replication::codec::log_index(m.index));
                (*node, index)
            })
            .max_by_key(|(_, index)| *index)
    }

    /// How far `node` has replicated this leader's log, and the leader's last index.
    pub fn progress_of(&self, node: u64) -> Option<(u64, u64)> {
        let metrics = self.raft.metrics().borrow().clone();
        let matched = *metrics.replication.as_ref()?.get(&node)?;
        let last = metrics
            .last_log_index
            .map_or(0, crate::replication::codec::log_index);
        Some((
            matched.map_or(0, |m| crate::replication::codec::log_index(m.index)),
            last,
        ))
    }
}
