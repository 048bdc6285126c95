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

use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

pub use super::replica_link::{Addresses, ChangeFailure, MembershipChange, MembershipChangeError};
use super::replica_link::{Barrier, ReplicaLink, ReplicaStatus};
use super::state::SharedState;
use crate::replication::{QueueStateMachine, QuietGroup, Raft};

/// Entries submitted to openraft and not yet committed, per partition (see [`run_proposer`]).
/// Few on purpose: while they are written and replicated, the next entry fills up with
/// everything that arrives meanwhile, so one fsync carries many commands. openraft 0.9's core
/// fsyncs each entry before it replicates it or does anything else, so every entry in flight
/// is one more fsync a confirm may queue behind: 2 halved p50 and p99 confirm latency at
/// 75,000 msgs/s against 8 (decision 0015; 8 had been best for throughput before the flush
/// callback lost a hop).
pub const ENTRIES_IN_FLIGHT: usize = 2;

/// Takes the leader's staged entries whole and submits them to openraft in order, at most
/// [`ENTRIES_IN_FLIGHT`] at a time, and checks, in order, that each entry was committed at the
/// index the leader applied it at. A failure (leadership lost, an unexpected entry in between)
/// stops the epoch: the partition stops serving until the role task resyncs it. Membership
/// changes run between two entries ([`ReplicaLink::change_membership`]).
async fn run_proposer(
    raft: Raft,
    quiet: Arc<QuietGroup>,
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
        quiet,
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

/// Submits entries and runs membership changes between them; one per partition, owned by
/// [`run_proposer`].
struct Proposer {
    raft: Raft,
    /// Told of every write, so an idle group that quiesced wakes first.
    quiet: Arc<QuietGroup>,
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
        self.quiet.wrote();
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
        // A membership change replicates and needs the leader's ticks (a removed leader
        // steps down on one): the group wakes for it like for a write.
        self.quiet.wrote();
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
        link.quiet.observe(&m);
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
    pub raft_dir: std::path::PathBuf,
    /// Whether this agent is the group's preferred leader: a new group's first election is
    /// its, so the leader a client finds right after declaring is the one the balancer keeps.
    pub preferred: bool,
}

/// How long the other replicas of a new group leave the first election to the preferred
/// leader before campaigning themselves (it may be down).
const FIRST_ELECTION_DEFERRAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Shortest wait of a reopened replica before its election timer runs.
const REOPENED_ELECTION_DEFERRAL_MIN: std::time::Duration = std::time::Duration::from_secs(1);
/// Width of the window reopened replicas' first election timers are spread over.
const REOPENED_ELECTION_SPREAD_MS: u64 = 2_000;

/// When the election timer of reopened `group` starts: in a window spread by a hash of its
/// name, the same on every run.
fn reopened_election_deferral(group: &str) -> std::time::Duration {
    let hash = crate::replication::group_hash(group);
    REOPENED_ELECTION_DEFERRAL_MIN
        + std::time::Duration::from_millis(hash % REOPENED_ELECTION_SPREAD_MS)
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
    let meta = crate::replication::meta::MetaFile::new(&setup.raft_dir);
    meta.create_dir()?;
    let status = watch::Sender::new(ReplicaStatus::default());
    let machine = QueueStateMachine::shared(
        config,
        log.clone(),
        state.clone(),
        Some(status.clone()),
        Some(setup.raft_dir.clone()),
    );
    let mut store =
        crate::replication::ReplicatedLog::open(log.clone(), meta, machine.purge_floor())?;
    // Everything up to the saved commit hint (or the purge point, which is committed too) is
    // replayed here; openraft re-applies only what follows.
    let purged = openraft::storage::RaftLogStorage::get_log_state(&mut store)
        .await
        .map_err(|e| OpenReplicaError::Raft(Box::new(e)))?
        .last_purged_log_id;
    machine.recover(store.committed_hint().max(purged)).await?;
    // Built inside its tick gate, so its ticker parks while the group is quiescent.
    let gate = Arc::new(crate::replication::runtime::TickGate::default());
    let raft = gate
        .scope(Raft::new(
            setup.node_id,
            setup.raft_config.clone(),
            crate::replication::PeerNetwork::new(setup.group.clone()),
            store,
            machine.clone(),
        ))
        .await
        .map_err(|e| OpenReplicaError::Raft(Box::new(e)))?;
    let quiet = Arc::new(crate::replication::QuietGroup::new(
        setup.group.clone(),
        raft.clone(),
        gate,
    ));
    setup.groups.insert_quiet(quiet.clone());
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| OpenReplicaError::Raft(Box::new(e)))?;
    if initialized {
        // Reopened (the agent restarted). Its leader, if alive, wakes for the new boot id and
        // heartbeats; every reopened group campaigning at its first timeout would be a herd of
        // thousands. Election timers start after a spread by the group's name instead.
        raft.runtime_config().elect(false);
        let raft = raft.clone();
        let delay = reopened_election_deferral(&setup.group);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            raft.runtime_config().elect(true);
        });
    } else if !setup.voters.is_empty() {
        // Every replica initialises with the same voters; openraft accepts that, and whichever
        // initialisation a replica's log already holds wins.
        if let Err(e) = raft.initialize(setup.voters.clone()).await {
            tracing::debug!(group = %setup.group, error = %e, "initialize skipped");
        }
        // The first leader is the preferred one: it campaigns at once, the others hold their
        // election timers for a while. Otherwise whoever timed out first would lead, and the
        // balancer would move the leadership (ending fresh subscriptions) seconds later.
        if setup.preferred {
            if let Err(e) = raft.trigger().elect().await {
                tracing::debug!(group = %setup.group, error = %e, "first election not started");
            }
        } else {
            raft.runtime_config().elect(false);
            let raft = raft.clone();
            tokio::spawn(async move {
                tokio::time::sleep(FIRST_ELECTION_DEFERRAL).await;
                raft.runtime_config().elect(true);
            });
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
        quiet: quiet.clone(),
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
    tokio::spawn(run_proposer(raft, quiet, state, woken, barriers_rx, status));
    tokio::spawn(run_role(Arc::downgrade(&partition), link));
    Ok(partition)
}
