//! [`ReplicaStatus`]: what the queue layer and the state machine share about one replica.

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
