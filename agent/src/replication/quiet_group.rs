//! [`QuietGroup`]: whether one partition group is ticking or quiescent, and the switches that
//! move it between the two (decision 0025).
//!
//! A quiescent group has openraft's ticker off: no heartbeats from its leader, no election
//! timer on its followers. Raft's safety does not rest on timers, only its liveness does, so
//! turning them off can delay an election but never let a replica confirm what it could lose:
//! a commit still needs a majority's acknowledgement of the entry, however long the group was
//! quiet. The liveness the timers gave is kept by [`Quiescence`](super::quiescence::Quiescence):
//! one exchange per agent pair, and a wake-up of exactly the groups an agent that went silent
//! was leading.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use openraft::Vote;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::runtime::TickGate;
use super::types::{NodeId, Raft};

/// A group's quiescence, shared by its replica's tasks, the peer service and the agent's
/// [`Quiescence`](super::quiescence::Quiescence) loop.
pub struct QuietGroup {
    /// The group's name (`<queue>/<partition>`).
    pub name: String,
    /// Its Raft.
    pub raft: Raft,
    /// Parks its ticker while quiet (openraft's own flag only skips the ticks).
    gate: Arc<TickGate>,
    /// Fast path of [`Self::is_quiet`]: read on every write and every AppendEntries.
    quiet: AtomicBool,
    /// Writes proposed as leader; the idle check compares it across sweeps.
    writes: AtomicU64,
    /// The role it is quiet in, with what the wake-up checks need.
    state: Mutex<Quiet>,
}

/// What a quiet group is waiting in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Quiet {
    /// Ticking as openraft normally does.
    Active,
    /// Leading without heartbeats; `voters` are the other voters it quiesced.
    Leader {
        /// The followers (node id, peer address).
        voters: Vec<(NodeId, String)>,
    },
    /// Following `vote`'s leader without an election timer.
    Follower {
        /// The leader's vote it quiesced under.
        vote: Vote<NodeId>,
        /// The index of the leader's last entry it quiesced at (committed).
        at: Option<u64>,
        /// The group's other voters, besides the leader and this node.
        others: Vec<NodeId>,
    },
}

impl std::fmt::Debug for QuietGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuietGroup")
            .field("name", &self.name)
            .field("quiet", &self.is_quiet())
            .finish_non_exhaustive()
    }
}

impl QuietGroup {
    /// An active group; `gate` is the one its Raft was built in (`TickGate::scope`).
    pub fn new(name: impl Into<String>, raft: Raft, gate: Arc<TickGate>) -> Self {
        moved(None, Some(GroupState::Active));
        Self {
            name: name.into(),
            raft,
            gate,
            quiet: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            state: Mutex::new(Quiet::Active),
        }
    }

    /// Whether the group is quiescent now.
    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::SeqCst)
    }

    /// The state it is in.
    pub fn state(&self) -> Quiet {
        self.lock().clone()
    }

    /// Writes proposed so far, for the idle check.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// A write is about to be proposed as leader: counted, and a quiescent group wakes (its
    /// followers wake when the entry reaches them). One atomic add and one load when active.
    pub fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if self.is_quiet() {
            self.wake(Wake::Write);
        }
    }

    /// Turns the ticker back on (openraft's heartbeats and election timer resume at its next
    /// tick) and counts why; nothing when already active.
    pub fn wake(&self, cause: Wake) -> bool {
        let mut state = self.lock();
        if *state == Quiet::Active {
            return false;
        }
        *state = Quiet::Active;
        self.quiet.store(false, Ordering::SeqCst);
        self.raft.runtime_config().tick(true);
        self.gate.open();
        moved(Some(GroupState::Quiescent), Some(GroupState::Active));
        cause.count();
        true
    }

    /// Stops the ticker as leader, once every follower in `voters` quiesced. Returns false —
    /// and stays active — when a write was proposed since `writes_seen` (counted before the
    /// followers were asked): the check of the counter after the flag is set and the writer's
    /// check of the flag after counting cannot both miss each other.
    pub fn quiesce_leader(&self, voters: Vec<(NodeId, String)>, writes_seen: u64) -> bool {
        {
            let mut state = self.lock();
            if *state != Quiet::Active {
                return false;
            }
            *state = Quiet::Leader { voters };
            self.quiet.store(true, Ordering::SeqCst);
            self.raft.runtime_config().tick(false);
            self.gate.close();
            moved(Some(GroupState::Active), Some(GroupState::Quiescent));
        }
        if self.writes() != writes_seen {
            self.wake(Wake::Write);
            return false;
        }
        true
    }

    /// Stops the ticker as a follower of `vote`'s leader.
    pub fn quiesce_follower(&self, vote: Vote<NodeId>, at: Option<u64>, others: Vec<NodeId>) {
        let mut state = self.lock();
        if *state != Quiet::Active {
            // Already quiet under this leader's earlier request; take the newer vote.
            if let Quiet::Follower { .. } = *state {
                *state = Quiet::Follower { vote, at, others };
            }
            return;
        }
        *state = Quiet::Follower { vote, at, others };
        self.quiet.store(true, Ordering::SeqCst);
        self.raft.runtime_config().tick(false);
        self.gate.close();
        moved(Some(GroupState::Active), Some(GroupState::Quiescent));
    }

    /// An AppendEntries arrived: a quiescent follower wakes when it carries entries, comes
    /// under another vote than the one it quiesced under, or names another position than the
    /// one it quiesced at (the leader went on writing: its heartbeats then carry the new
    /// position, so a follower that took the offer on metrics that lagged its own log wakes at
    /// the next heartbeat). A heartbeat the leader sent just before it stopped ticking, at the
    /// quiesced position, leaves it quiet.
    pub fn appended(
        &self,
        vote: &Vote<NodeId>,
        entries: usize,
        prev: Option<u64>,
        commit: Option<u64>,
    ) {
        if !self.is_quiet() {
            return;
        }
        let wake = match &*self.lock() {
            Quiet::Follower {
                vote: quiet, at, ..
            } => entries > 0 || quiet != vote || prev != *at || commit != *at,
            Quiet::Leader { .. } => true,
            Quiet::Active => false,
        };
        if wake {
            self.wake(Wake::Append);
        }
    }

    /// The group's metrics changed: a quiet group whose role or vote is no longer the one it
    /// quiesced in wakes (a leader that saw a higher vote, a follower under a new leader).
    pub fn observe(&self, metrics: &openraft::RaftMetrics<NodeId, openraft::BasicNode>) {
        if !self.is_quiet() {
            return;
        }
        let changed = match &*self.lock() {
            Quiet::Leader { .. } => metrics.state != openraft::ServerState::Leader,
            Quiet::Follower { vote, .. } => metrics.vote != *vote,
            Quiet::Active => false,
        };
        if changed {
            self.wake(Wake::RoleChange);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Quiet> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for QuietGroup {
    fn drop(&mut self) {
        let state = if self.is_quiet() {
            GroupState::Quiescent
        } else {
            GroupState::Active
        };
        moved(Some(state), None);
    }
}

/// What a group is doing, for the `sluice_raft_groups` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// Ticking.
    Active,
    /// Quiescent.
    Quiescent,
}

/// Why a quiet group woke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A write (or membership change) proposed at its leader.
    Write,
    /// An AppendEntries with entries, or from another leader, at a follower.
    Append,
    /// A vote request.
    Vote,
    /// A snapshot chunk.
    Snapshot,
    /// The group's own metrics show another role or vote than it quiesced under.
    RoleChange,
    /// Its leader's agent went silent.
    LeaderSilent,
    /// A follower's agent answered again, or restarted.
    FollowerBack,
    /// Its leader's agent restarted.
    LeaderRestarted,
    /// This agent is asked to take the leadership.
    Transfer,
}

impl Wake {
    fn label(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Append => "append",
            Self::Vote => "vote",
            Self::Snapshot => "snapshot",
            Self::RoleChange => "role_change",
            Self::LeaderSilent => "leader_silent",
            Self::FollowerBack => "follower_back",
            Self::LeaderRestarted => "leader_restarted",
            Self::Transfer => "transfer",
        }
    }

    /// Counts one wake-up of this cause.
    fn count(self) {
        WAKEUPS
            .get_or_create(&CauseLabels {
                cause: self.label(),
            })
            .inc();
    }
}

/// Labels of [`GROUPS`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `active` or `quiescent`.
    pub state: &'static str,
}

/// Labels of [`WAKEUPS`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    /// Why the group woke.
    pub cause: &'static str,
}

/// Partition groups of this agent by state.
pub static GROUPS: LazyLock<Family<StateLabels, Gauge>> = LazyLock::new(Default::default);
/// Wake-ups of quiet groups by cause.
pub static WAKEUPS: LazyLock<Family<CauseLabels, Counter>> = LazyLock::new(Default::default);
/// Groups this agent quiesced (as leader or follower).
pub static QUIESCED: LazyLock<Counter> = LazyLock::new(Default::default);

/// Moves one group between the states of [`GROUPS`] (`None`: registered or gone).
pub(super) fn moved(from: Option<GroupState>, to: Option<GroupState>) {
    let label = |state| StateLabels {
        state: match state {
            GroupState::Active => "active",
            GroupState::Quiescent => "quiescent",
        },
    };
    if let Some(from) = from {
        GROUPS.get_or_create(&label(from)).dec();
    }
    if let Some(to) = to {
        if to == GroupState::Quiescent {
            QUIESCED.inc();
        }
        GROUPS.get_or_create(&label(to)).inc();
    }
}
