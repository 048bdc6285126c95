//! [`ReplicaLink`]: the handle a replicated [`Partition`](super::partition::Partition) holds on
//! its Raft group: status, waking the proposer, membership changes between entries, the
//! progress of followers and stopping. The tasks behind it live in [`super::replica`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

pub use super::replica_status::ReplicaStatus;
use crate::replication::{QueueStateMachine, Raft};

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
    pub(super) barriers: mpsc::Sender<Barrier>,
    /// Client addresses of the agents, for redirects.
    pub addresses: Addresses,
    /// Whether the group ticks or is quiescent.
    pub quiet: Arc<crate::replication::QuietGroup>,
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
    /// group stops within `timeout` ([`crate::replication::stop_within`]).
    pub async fn stop(&self, timeout: std::time::Duration) {
        self.stop_serving();
        crate::replication::stop_within(&self.group, timeout, self.raft.shutdown()).await;
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

/// A membership change waiting for its turn between two entries (see
/// [`ReplicaLink::change_membership`]).
pub(super) struct Barrier {
    /// Most entries the change appends; the leader reserves that many indices for it.
    pub(super) entries: u64,
    /// The change, run on this group's Raft once every entry before it has landed.
    pub(super) change: MembershipChange,
    /// Its outcome, for the caller.
    pub(super) done: oneshot::Sender<Result<(), ChangeFailure>>,
}

/// A membership change of a partition's group, as [`ReplicaLink::change_membership`] runs it.
pub type MembershipChange = Pin<Box<dyn Future<Output = Result<(), ChangeFailure>> + Send>>;

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
