//! Applies committed Raft entries to a partition's delivery state, and snapshots it.
//!
//! The state machine is the queue layer's own [`PartitionState`]: the deterministic function
//! of the log that a single agent replays on restart is what every replica applies as entries
//! commit, so a new leader holds the same ready/in-flight/settled view as the old one.
//!
//! A snapshot is not a serialisation of `PartitionState` (which has none): it is the committed
//! entries from the settled low-water mark to the last applied one. Those rebuild the delivery
//! state exactly and carry the body of every unsettled message, which a follower installing the
//! snapshot needs because the leader's log below the snapshot may be purged (decision 0008).

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::queue::entry::BadEntry;
use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use prost::Message;
use sluice_proto::peer::v1 as pb;
use sluice_proto::storage::v1::LogCommand;
use tokio::sync::Mutex;

use super::codec::{self, RaftEntry};
use super::types::{Applied, NodeId, TypeConfig};
use crate::layout::MEMBERSHIP_FILE;
use crate::log::{LogError, LogStore};
use crate::queue::replica_status::ReplicaStatus;
use crate::queue::state::{PartitionState, SharedState, StateConfig};

/// Upper bound of data bytes per log read while building a snapshot.
const SNAPSHOT_READ_BYTES: usize = 4 << 20;

/// Why a snapshot could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An entry the snapshot must contain is no longer in the log.
    #[error("entry {index} needed by the snapshot is missing from the partition log")]
    Missing {
        /// Its index.
        index: u64,
    },
    /// A received snapshot does not decode.
    #[error("snapshot {id} does not decode: {source}")]
    Decode {
        /// The snapshot id.
        id: String,
        /// The decoder's error.
        #[source]
        source: prost::DecodeError,
    },
    /// A snapshot entry is not a valid log entry.
    #[error("snapshot {id}: {source}")]
    Entry {
        /// The snapshot id.
        id: String,
        /// What was wrong.
        #[source]
        source: codec::CodecError,
    },
}

/// Why a replica's state could not be recovered from its log at startup.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The log could not be read.
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    /// An entry is not a valid Raft entry.
    #[error("log entry {index}: {source}")]
    Entry {
        /// Its index.
        index: u64,
        /// What was wrong.
        #[source]
        source: codec::CodecError,
    },
    /// An entry is not a valid command or batch (the error names the entry).
    #[error(transparent)]
    Command(#[from] crate::queue::entry::BadEntry),
    /// The membership file does not decode.
    #[error("{} is damaged: {source}", path.display())]
    Membership {
        /// The file.
        path: std::path::PathBuf,
        /// The decoder's error.
        #[source]
        source: prost::DecodeError,
    },
    /// The membership file could not be read.
    #[error("read {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What the state machine holds; one lock, since openraft applies from one task. The delivery
/// state itself is behind its own lock, shared with the partition; this one is taken first.
struct Inner {
    /// Last applied entry.
    last_applied: Option<LogId<NodeId>>,
    /// Membership as of `last_applied`.
    membership: StoredMembership<NodeId, BasicNode>,
    /// The latest snapshot built or installed (kept in memory for now, see decision 0008).
    snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
}

/// The state machine of one partition's Raft group. Clones share the state.
#[derive(Clone)]
pub struct QueueStateMachine {
    inner: Arc<Mutex<Inner>>,
    /// The delivery state, shared with the partition that serves it as leader.
    state: SharedState,
    /// Where the applied index is published for the partition (confirms, read bounds).
    status: Option<tokio::sync::watch::Sender<ReplicaStatus>>,
    /// Settings to build a fresh `PartitionState` when a snapshot replaces the state.
    config: StateConfig,
    /// Read by snapshots for the entries they carry.
    log: Arc<dyn LogStore>,
    /// The lowest unsettled offset, published after each apply for the log's physical purge.
    purge_floor: Arc<AtomicU64>,
    /// Counter to make snapshot ids unique within this process.
    snapshots_built: Arc<AtomicU64>,
    /// Whether an installed snapshot's entries are written into `log` (a replica's own log;
    /// off for state machines reading a log someone else writes, as in unit tests).
    write_log: bool,
    /// Where the last applied membership is kept, so a restart whose log was purged past
    /// the membership entry still knows its group.
    membership_dir: Option<std::path::PathBuf>,
}

impl QueueStateMachine {
    /// A state machine with nothing applied, over the partition log it snapshots from.
    pub fn new(config: StateConfig, log: Arc<dyn LogStore>) -> Self {
        let state = Arc::new(std::sync::Mutex::new(PartitionState::new(
            config,
            log.first_index(),
        )));
        Self::shared(config, log, state, None, None)
    }

    /// A state machine applying to `state` (shared with the partition), publishing the
    /// applied index through `status`.
    pub fn shared(
        config: StateConfig,
        log: Arc<dyn LogStore>,
        state: SharedState,
        status: Option<tokio::sync::watch::Sender<ReplicaStatus>>,
        membership_dir: Option<std::path::PathBuf>,
    ) -> Self {
        let first = log.first_index();
        Self {
            inner: Arc::new(Mutex::new(Inner {
                last_applied: None,
                membership: StoredMembership::default(),
                snapshot: None,
            })),
            state,
            status,
            config,
            log,
            purge_floor: Arc::new(AtomicU64::new(first)),
            snapshots_built: Arc::new(AtomicU64::new(0)),
            write_log: membership_dir.is_some(),
            membership_dir,
        }
    }

    fn append_run(&self, (term, data): &(u64, Vec<bytes::Bytes>)) -> Result<(), LogError> {
        self.log.append(*term, data).map(|_| ())
    }

    fn save_membership(
        &self,
        membership: &StoredMembership<NodeId, BasicNode>,
    ) -> Result<(), super::meta::ReplicaMetaError> {
        match &self.membership_dir {
            Some(dir) => super::meta::replace_file(
                dir,
                MEMBERSHIP_FILE,
                &codec::stored_membership_to_pb(membership).encode_to_vec(),
            ),
            None => Ok(()),
        }
    }

    fn load_membership(&self) -> Result<StoredMembership<NodeId, BasicNode>, RecoverError> {
        let Some(dir) = &self.membership_dir else {
            return Ok(StoredMembership::default());
        };
        let path = dir.join(MEMBERSHIP_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let stored = pb::StoredMembership::decode(bytes.as_slice())
                    .map_err(|source| RecoverError::Membership { path, source })?;
                Ok(codec::stored_membership_from_pb(&Some(stored)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoredMembership::default()),
            Err(source) => Err(RecoverError::Read { path, source }),
        }
    }

    /// Rebuilds the state after a restart by replaying this replica's log up to `upto`, an
    /// entry known committed (the saved commit hint, or the purge point): openraft then only
    /// re-applies what follows, and never needs entries the log no longer holds.
    pub async fn recover(&self, upto: Option<LogId<NodeId>>) -> Result<(), RecoverError> {
        let Some(upto) = upto else {
            return Ok(());
        };
        let mut inner = self.inner.lock().await;
        let mut membership = self.load_membership()?;
        let end = codec::log_index(upto.index);
        let first = self.log.first_index();
        let mut state = PartitionState::new(self.config, first);
        let mut next = first;
        while next <= end {
            let batch =
                self.log
                    .read_range(next, (end + 1 - next) as usize, SNAPSHOT_READ_BYTES)?;
            if batch.is_empty() {
                break;
            }
            for record in batch.into_iter().take_while(|r| r.index <= end) {
                next = record.index + 1;
                let index = record.index;
                let entry = codec::entry_from_record(record)
                    .map_err(|source| RecoverError::Entry { index, source })?;
                apply_one(&mut inner, &mut state, &entry)?;
                if let Some(m) =
                    Some(&inner.membership).filter(|m| m.log_id() > membership.log_id())
                {
                    membership = m.clone();
                }
            }
        }
        inner.last_applied = Some(upto);
        inner.membership = membership;
        let purge_point = state.purge_point();
        *self.lock_state() = state;
        self.purge_floor.store(purge_point, Ordering::Release);
        if let Some(status) = &self.status {
            status.send_modify(|s| s.applied = end);
        }
        Ok(())
    }

    /// The purge floor to share with [`ReplicatedLog`](super::ReplicatedLog).
    pub fn purge_floor(&self) -> Arc<AtomicU64> {
        self.purge_floor.clone()
    }

    /// Partition-log index of the last applied entry (0 when none).
    pub async fn applied_index(&self) -> u64 {
        let inner = self.inner.lock().await;
        inner.last_applied.map_or(0, |l| codec::log_index(l.index))
    }

    /// Runs `f` on the delivery state (for the queue layer and tests).
    pub async fn with_state<R>(&self, f: impl FnOnce(&PartitionState) -> R) -> R {
        let _inner = self.inner.lock().await;
        f(&self.lock_state())
    }

    /// Holds the apply lock while `f` runs with the applied index: nothing is applied
    /// meanwhile (the partition rebuilds its state under it when leadership changes).
    pub async fn while_paused<R>(&self, f: impl FnOnce(u64) -> R) -> R {
        let inner = self.inner.lock().await;
        f(inner.last_applied.map_or(0, |l| codec::log_index(l.index)))
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, PartitionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn apply_one(
    inner: &mut Inner,
    state: &mut PartitionState,
    entry: &RaftEntry,
) -> Result<Applied, BadEntry> {
    let fresh = codec::log_index(entry.log_id.index) >= state.next_entry();
    let commands = decode_fresh(entry, fresh)?;
    apply_decoded(inner, state, entry, commands)
}

/// The commands of a normal entry that still has to be applied (`fresh`), decoded; `None`
/// for any other entry. [`QueueStateMachine::apply`] calls this before it takes the state
/// lock, so decoding a follower's entries never holds up the queue layer, and a leader,
/// which applied its own commands when it staged them, decodes nothing.
fn decode_fresh(entry: &RaftEntry, fresh: bool) -> Result<Option<Vec<LogCommand>>, BadEntry> {
    match &entry.payload {
        // The leader validates commands before proposing them, so a committed entry that does
        // not decode is damage, not input: stop rather than diverge.
        EntryPayload::Normal(data) if fresh => {
            crate::queue::entry::decode(codec::log_index(entry.log_id.index), data.as_ref())
                .map(Some)
        }
        _ => Ok(None),
    }
}

/// Applies `entry` to the state (under its lock) with the commands [`decode_fresh`] gave.
fn apply_decoded(
    inner: &mut Inner,
    state: &mut PartitionState,
    entry: &RaftEntry,
    commands: Option<Vec<LogCommand>>,
) -> Result<Applied, BadEntry> {
    // The delivery state is keyed by partition-log index (offsets name entries).
    let index = codec::log_index(entry.log_id.index);
    // A leader applied its own commands when it staged them: below the state's next entry an
    // entry is already in the state.
    let fresh = index >= state.next_entry();
    match &entry.payload {
        EntryPayload::Normal(_) => {
            if fresh {
                // Decoded before the lock unless the entry looked applied then; the state's
                // next entry only grows while the apply lock is held, but decode anyway.
                let commands = match commands {
                    Some(commands) => commands,
                    None => decode_fresh(entry, true)?.unwrap_or_default(),
                };
                state.apply_commands(index, &commands);
            }
        }
        EntryPayload::Blank => {
            if fresh {
                state.apply_commands(index, &[]);
            }
        }
        EntryPayload::Membership(m) => {
            if fresh {
                state.apply_commands(index, &[]);
            }
            inner.membership = StoredMembership::new(Some(entry.log_id), m.clone());
        }
    }
    inner.last_applied = Some(entry.log_id);
    Ok(Applied { index })
}

impl RaftSnapshotBuilder<TypeConfig> for QueueStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut inner = self.inner.lock().await;
        let last = inner.last_applied;
        // Partition-log indices: from the lowest unsettled offset to the last applied entry.
        let from = self.lock_state().purge_point().max(self.log.first_index());
        let upto = last.map_or(0, |l| codec::log_index(l.index));
        let mut entries = Vec::new();
        let mut next = from;
        while next <= upto {
            let want = (upto + 1 - next) as usize;
            let batch = self
                .log
                .read_range(next, want, SNAPSHOT_READ_BYTES)
                .map_err(|e| StorageIOError::read_state_machine(&e))?;
            if batch.is_empty() {
                let e = SnapshotError::Missing { index: next };
                return Err(StorageIOError::read_state_machine(&e).into());
            }
            for record in batch.into_iter().take_while(|r| r.index <= upto) {
                next = record.index + 1;
                // Snapshot entries carry Raft indices, like entries on the wire.
                entries.push(pb::Entry {
                    term: record.term,
                    index: codec::raft_index(record.index),
                    data: record.data.to_vec(),
                });
            }
        }
        let data = pb::Snapshot {
            last_log_id: codec::opt_log_id_to_pb(&last),
            last_membership: Some(codec::stored_membership_to_pb(&inner.membership)),
            entries,
        }
        .encode_to_vec();
        let seq = self.snapshots_built.fetch_add(1, Ordering::Relaxed);
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: inner.membership.clone(),
            snapshot_id: format!("{}-{upto}-{seq}", last.map_or(0, |l| l.leader_id.term)),
        };
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for QueueStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let inner = self.inner.lock().await;
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = RaftEntry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        let membership_before = *inner.membership.log_id();
        let mut out = Vec::new();
        // Decoded outside the state lock (see `decode_fresh`). The state's next entry only
        // grows while `inner` is held, so an entry below it now is still applied below.
        let applied_until = self.lock_state().next_entry();
        let mut decoded = Vec::new();
        for entry in entries {
            let fresh = codec::log_index(entry.log_id.index) >= applied_until;
            let commands =
                decode_fresh(&entry, fresh).map_err(|e| StorageIOError::apply(entry.log_id, &e))?;
            decoded.push((entry, commands));
        }
        let low_water = {
            let mut state = self.lock_state();
            for (entry, commands) in decoded {
                let applied = apply_decoded(&mut inner, &mut state, &entry, commands)
                    .map_err(|e| StorageIOError::apply(entry.log_id, &e))?;
                out.push(applied);
            }
            state.purge_point()
        };
        self.purge_floor.store(low_water, Ordering::Release);
        if inner.membership.log_id() != &membership_before {
            let membership = inner.membership.clone();
            self.save_membership(&membership)
                .map_err(|e| StorageIOError::write_state_machine(&e))?;
        }
        if let (Some(status), Some(last)) = (&self.status, out.last()) {
            status.send_if_modified(|s| {
                let changed = s.applied < last.index;
                s.applied = s.applied.max(last.index);
                changed
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let invalid = |e: &SnapshotError| StorageIOError::read_snapshot(Some(meta.signature()), e);
        let decoded = pb::Snapshot::decode(data.as_slice()).map_err(|source| {
            invalid(&SnapshotError::Decode {
                id: meta.snapshot_id.clone(),
                source,
            })
        })?;
        let first = decoded.entries.first().map_or(
            meta.last_log_id
                .map_or(1, |l| codec::log_index(l.index + 1)),
            |e| codec::log_index(e.index),
        );
        let mut state = PartitionState::new(self.config, first);
        let mut inner = self.inner.lock().await;
        // The snapshot's entries become this replica's log: the bodies of unsettled messages
        // live there, and Raft appends after them (decision 0008).
        if self.write_log {
            self.log
                .reset(first)
                .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        }
        let mut run: (u64, Vec<bytes::Bytes>) = (0, Vec::new());
        for entry in decoded.entries {
            let term = entry.term;
            let stored = bytes::Bytes::from(entry.data.clone());
            let entry = codec::entry_from_pb(entry).map_err(|source| {
                invalid(&SnapshotError::Entry {
                    id: meta.snapshot_id.clone(),
                    source,
                })
            })?;
            let index = codec::log_index(entry.log_id.index);
            let commands = match &entry.payload {
                EntryPayload::Normal(data) => crate::queue::entry::decode(index, data.as_ref())
                    .map_err(|e| StorageIOError::apply(entry.log_id, &e))?,
                _ => Vec::new(),
            };
            state.apply_commands(index, &commands);
            if self.write_log {
                if !run.1.is_empty() && run.0 != term {
                    self.append_run(&run)
                        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
                    run.1.clear();
                }
                run.0 = term;
                run.1.push(stored);
            }
        }
        if self.write_log {
            if !run.1.is_empty() {
                self.append_run(&run)
                    .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
            }
            self.log
                .sync()
                .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        }
        self.save_membership(&meta.last_membership)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let low_water = state.purge_point();
        *self.lock_state() = state;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), data));
        self.purge_floor.store(low_water, Ordering::Release);
        if let Some(status) = &self.status {
            let applied = meta.last_log_id.map_or(0, |l| codec::log_index(l.index));
            status.send_modify(|s| s.applied = applied);
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.inner.lock().await;
        Ok(inner.snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(data.clone())),
        }))
    }
}

#[cfg(test)]
#[path = "state_machine_test.rs"]
mod tests;
