//! openraft's log storage over a partition's [`LogStore`].
//!
//! Each Raft entry is one record of the partition log (term = Raft term, data = the stored
//! encoding from [`codec`](super::codec)), so the Raft log and the message store are the same
//! bytes on disk. The vote, the purge point and a committed hint live in the [`MetaFile`] beside
//! it.
//!
//! The committed hint is saved off the commit path: openraft calls `save_committed` inline for
//! every commit, so it only publishes the value to a background saver that writes the meta file
//! at most once per [`COMMITTED_SAVE_INTERVAL`], and only for entries already durable in the
//! log. A stale hint is safe (the committed prefix only grows); it lets a restarted replica
//! re-apply its log before a leader tells it the commit point.
//!
//! Purging is split in two: openraft's purge point is recorded in the meta file at once, but
//! segments are deleted only below the *purge floor*, the state machine's settled low-water mark,
//! because the log still holds the bodies of unsettled messages that consumers will read.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use sluice_proto::peer::v1::ReplicaMeta;
use tokio::sync::watch;

use super::codec::{self, RaftEntry};
use super::meta::MetaFile;
use super::types::{NodeId, TypeConfig};
use crate::log::{Durability, LogError, LogStore};

/// Upper bound of data bytes read per `read_range` call while serving openraft reads.
const READ_BATCH_BYTES: usize = 4 << 20;
/// Upper bound of entries read per `read_range` call.
const READ_BATCH_ENTRIES: usize = 4096;
/// Data bytes after which one AppendEntries stops taking more entries (it holds at least one).
/// openraft 0.9 bounds a request by entry count only; this keeps requests well inside the peer
/// server's decoding limit ([`super::service::MAX_REQUEST_BYTES`]) and the follower's write
/// group ([`crate::log`]'s 8 MiB), while large enough that one round trip carries everything a
/// busy leader appended during the previous one.
pub const MAX_APPEND_BYTES: usize = 4 << 20;
/// The committed hint is written to the meta file at most this often (each write is two
/// fsyncs). Replay on restart covers at most this much more of the log from the hint.
pub const COMMITTED_SAVE_INTERVAL: Duration = Duration::from_millis(500);

/// Errors of the log adapter, converted to openraft's `StorageError` at the trait boundary.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatedLogError {
    /// openraft asked to append at an index other than the log's next one (both in
    /// partition-log indices). The log cannot have
    /// holes; this is the case of a snapshot installed past the end of the local log, which needs
    /// the log to restart at a later index (see decision 0008).
    #[error("append of index {index} but the partition log's next index is {next}")]
    NotContiguous {
        /// First index of the batch.
        index: u64,
        /// The log's next index.
        next: u64,
    },
    /// An entry read back from the log was missing although inside the retained range.
    #[error("entry {index} is missing from the partition log")]
    Missing {
        /// Its index.
        index: u64,
    },
}

/// The Raft view of one partition log. Clones share the log, meta file and purge floor.
#[derive(Clone)]
pub struct ReplicatedLog {
    /// The partition log: the one copy of every entry on this replica.
    log: Arc<dyn LogStore>,
    /// Vote and purge point; the mutex serialises meta writes (openraft issues them in order).
    meta: Arc<Mutex<(MetaFile, ReplicaMeta)>>,
    /// Segments below this index may be deleted: the lowest unsettled offset, published by the
    /// state machine after each apply.
    purge_floor: Arc<AtomicU64>,
    /// The latest committed log id openraft reported, for the background saver.
    committed: Arc<CommittedHint>,
}

/// The committed position as openraft reports it, shared with the task that saves it.
struct CommittedHint {
    /// Latest value; dropping the last `ReplicatedLog` clone closes it, which ends the saver.
    latest: watch::Sender<Option<LogId<NodeId>>>,
    /// Whether the saver task runs (it starts on the first report, inside the runtime).
    saver_started: AtomicBool,
}

impl Debug for ReplicatedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedLog")
            .field("first_index", &self.log.first_index())
            .field("next_index", &self.log.next_index())
            .finish()
    }
}

impl ReplicatedLog {
    /// Wraps a partition log whose Raft metadata is kept in `meta`. `purge_floor` is shared
    /// with the state machine ([`QueueStateMachine::purge_floor`](super::QueueStateMachine::purge_floor)).
    pub fn open(
        log: Arc<dyn LogStore>,
        meta: MetaFile,
        purge_floor: Arc<AtomicU64>,
    ) -> Result<Self, super::meta::ReplicaMetaError> {
        let saved = meta.load()?;
        let (latest, _) = watch::channel(codec::opt_log_id_from_pb(&saved.committed));
        Ok(Self {
            log,
            meta: Arc::new(Mutex::new((meta, saved))),
            purge_floor,
            committed: Arc::new(CommittedHint {
                latest,
                saver_started: AtomicBool::new(false),
            }),
        })
    }

    /// The committed entry saved in the meta file (a lower bound of the real commit point; see
    /// the module docs). At startup the state machine may re-apply the log up to it.
    pub fn committed_hint(&self) -> Option<LogId<NodeId>> {
        codec::opt_log_id_from_pb(&self.saved().committed)
    }

    /// Starts the task that saves committed hints, once.
    fn start_committed_saver(&self) {
        if self.committed.saver_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut latest = self.committed.latest.subscribe();
        // The report that starts the saver was sent before it subscribed: save it too.
        latest.mark_changed();
        let saver = CommittedSaver {
            latest,
            durability: self.log.durability(),
            meta: self.meta.clone(),
        };
        tokio::spawn(saver.run());
    }

    /// The underlying partition log.
    pub fn log(&self) -> &Arc<dyn LogStore> {
        &self.log
    }

    fn saved(&self) -> ReplicaMeta {
        match self.meta.lock() {
            Ok(guard) => guard.1,
            Err(poisoned) => poisoned.into_inner().1,
        }
    }

    /// Applies `change` to the meta and saves it durably, off the async threads.
    async fn update_meta(
        &self,
        change: impl FnOnce(&mut ReplicaMeta) + Send + 'static,
    ) -> Result<(), StorageIOError<NodeId>> {
        let meta = self.meta.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut guard = match meta.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let mut next = guard.1;
            change(&mut next);
            guard.0.save(&next)?;
            guard.1 = next;
            Ok::<_, super::meta::ReplicaMetaError>(())
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StorageIOError::write_vote(&e)),
            Err(join) => Err(StorageIOError::write_vote(&join)),
        }
    }

    fn purged(&self) -> Option<LogId<NodeId>> {
        codec::opt_log_id_from_pb(&self.saved().purged)
    }
}

/// Saves committed hints in the background. Holds no handle that keeps the partition log open,
/// so a replica can be reopened as soon as its Raft stopped.
struct CommittedSaver {
    latest: watch::Receiver<Option<LogId<NodeId>>>,
    durability: watch::Receiver<Durability>,
    meta: Arc<Mutex<(MetaFile, ReplicaMeta)>>,
}

impl CommittedSaver {
    async fn run(mut self) {
        loop {
            let closed = self.latest.changed().await.is_err();
            let Some(committed) = *self.latest.borrow_and_update() else {
                if closed {
                    return;
                }
                continue;
            };
            let index = codec::log_index(committed.index);
            if closed {
                // Final save at shutdown, only if already durable: the log may be closing.
                if self.durability.borrow().durable_next > index {
                    self.save(committed).await;
                }
                return;
            }
            // Only a durable entry may be named: after a crash the hint must be in the log. A
            // follower's commit point can run ahead of its own flush for a moment.
            let durable = self
                .durability
                .wait_for(|d| d.durable_next > index || d.failure.is_some())
                .await
                .is_ok_and(|d| d.failure.is_none());
            if !durable {
                return;
            }
            self.save(committed).await;
            tokio::time::sleep(COMMITTED_SAVE_INTERVAL).await;
        }
    }

    async fn save(&self, committed: LogId<NodeId>) {
        let meta = self.meta.clone();
        let saved = tokio::task::spawn_blocking(move || {
            let mut guard = match meta.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let newer = codec::opt_log_id_from_pb(&guard.1.committed) < Some(committed);
            if !newer {
                return Ok(());
            }
            let mut next = guard.1;
            next.committed = Some(codec::log_id_to_pb(&committed));
            guard.0.save(&next)?;
            guard.1 = next;
            Ok::<_, super::meta::ReplicaMetaError>(())
        })
        .await;
        match saved {
            Ok(Ok(())) => {}
            // A hint: a failed save leaves an older one, which is still correct.
            Ok(Err(e)) => tracing::warn!(error = %e, "could not save the committed hint"),
            Err(e) => tracing::warn!(error = %e, "committed hint saver failed"),
        }
    }
}

fn read_err(e: &LogError) -> StorageError<NodeId> {
    StorageIOError::read_logs(e).into()
}

impl RaftLogReader<TypeConfig> for ReplicatedLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<RaftEntry>, StorageError<NodeId>> {
        // In partition-log indices from here on.
        let start = match range.start_bound() {
            Bound::Included(i) => codec::log_index(*i),
            Bound::Excluded(i) => codec::log_index(i + 1),
            Bound::Unbounded => 0,
        }
        .max(self.log.first_index());
        let end = match range.end_bound() {
            Bound::Included(i) => codec::log_index(i + 1),
            Bound::Excluded(i) => codec::log_index(*i),
            Bound::Unbounded => u64::MAX,
        }
        .min(self.log.next_index());
        let mut out = Vec::with_capacity(end.saturating_sub(start).min(4096) as usize);
        let mut next = start;
        while next < end {
            let want = ((end - next) as usize).min(READ_BATCH_ENTRIES);
            let batch = self
                .log
                .read_range(next, want, READ_BATCH_BYTES)
                .map_err(|e| read_err(&e))?;
            if batch.is_empty() {
                let e = ReplicatedLogError::Missing { index: next };
                return Err(StorageIOError::read_logs(&e).into());
            }
            for record in batch {
                if record.index >= end {
                    break;
                }
                next = record.index + 1;
                let at = codec::raft_index(record.index);
                let entry = codec::entry_from_record(record)
                    .map_err(|e| StorageIOError::read_log_at_index(at, &e))?;
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// One AppendEntries worth: entries from `start` until [`MAX_APPEND_BYTES`] of data (at
    /// least one entry), so a large backlog is sent in requests of bounded size.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<RaftEntry>, StorageError<NodeId>> {
        let from = codec::log_index(start);
        let want = usize::try_from(end.saturating_sub(start))
            .unwrap_or(usize::MAX)
            .min(READ_BATCH_ENTRIES);
        let batch = self
            .log
            .read_range(from, want, MAX_APPEND_BYTES)
            .map_err(|e| read_err(&e))?;
        if batch.is_empty() && start < end {
            let e = ReplicatedLogError::Missing { index: from };
            return Err(StorageIOError::read_logs(&e).into());
        }
        let mut out = Vec::with_capacity(batch.len());
        for record in batch {
            let at = codec::raft_index(record.index);
            let entry = codec::entry_from_record(record)
                .map_err(|e| StorageIOError::read_log_at_index(at, &e))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for ReplicatedLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let purged = self.purged();
        // The last entry, in partition-log indices; none when the log is empty.
        let last_index = self.log.next_index().saturating_sub(1);
        let purged_log_index = purged.map_or(0, |p| codec::log_index(p.index));
        let last = if last_index >= self.log.first_index().max(1) && last_index > purged_log_index {
            let record = self
                .log
                .read(last_index)
                .map_err(|e| read_err(&e))?
                .ok_or_else(|| {
                    StorageIOError::read_logs(&ReplicatedLogError::Missing { index: last_index })
                })?;
            Some(codec::log_id(record.term, codec::raft_index(record.index)))
        } else {
            purged
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = codec::vote_to_pb(vote);
        self.update_meta(move |m| m.vote = Some(vote)).await?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.saved().vote.as_ref().map(codec::vote_from_pb))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Called inline for every commit: only publish; the saver writes the file lazily.
        if committed.is_some() {
            self.committed.latest.send_if_modified(|latest| {
                let newer = *latest < committed;
                if newer {
                    *latest = committed;
                }
                newer
            });
            self.start_committed_saver();
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.committed_hint())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = RaftEntry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // The log takes one term per call, so runs of equal term become one append each.
        let mut last_index = None;
        let mut run: Vec<Bytes> = Vec::new();
        let mut run_term = 0;
        for entry in entries {
            let expected = self.log.next_index() + run.len() as u64;
            let index = codec::log_index(entry.log_id.index);
            if index != expected {
                let e = ReplicatedLogError::NotContiguous {
                    index,
                    next: expected,
                };
                return Err(StorageIOError::write_log_entry(entry.log_id, &e).into());
            }
            if !run.is_empty() && entry.log_id.leader_id.term != run_term {
                self.log
                    .append(run_term, &run)
                    .map_err(|e| StorageIOError::write_logs(&e))?;
                run.clear();
            }
            run_term = entry.log_id.leader_id.term;
            last_index = Some(index);
            run.push(codec::entry_data(&entry));
        }
        if !run.is_empty() {
            self.log
                .append(run_term, &run)
                .map_err(|e| StorageIOError::write_logs(&e))?;
        }
        let Some(last_index) = last_index else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        // openraft may count these entries toward a quorum only once they are durable; the
        // flusher group-commits them with everything else pending and calls back from its own
        // thread (openraft's core waits for this, so no task sits in between).
        let appended = std::time::Instant::now();
        self.log.on_durable(
            last_index + 1,
            Box::new(move |outcome| {
                super::timing::record("append_to_durable", appended.elapsed());
                callback.log_io_completed(
                    outcome.map_err(|reason| std::io::Error::other(reason.to_string())),
                );
            }),
        );
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.log
            .truncate_from(codec::log_index(log_id.index))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let purged = codec::log_id_to_pb(&log_id);
        self.update_meta(move |m| m.purged = Some(purged)).await?;
        // Physically, only what is both purged by Raft and settled may go.
        let floor = self.purge_floor.load(Ordering::Acquire);
        let upto = codec::log_index(log_id.index + 1).min(floor);
        self.log
            .purge_before(upto)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "log_store_test.rs"]
mod tests;
