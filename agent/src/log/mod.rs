//! The storage engine: one append-only log per partition.
//!
//! A log is a sequence of [`Entry`]s with consecutive indices starting at 1. Each entry carries a
//! Raft-style `term` (always 1 on a single agent) and opaque `data` (an encoded queue command,
//! see `queue`). Appends are buffered in memory and made durable by a background flusher that
//! group-commits: it writes everything pending, fsyncs once, then advances the durable index that
//! callers wait on. Nothing may be confirmed to a client before its index is durable.
//!
//! Two backends implement [`LogStore`]: [`FileLog`] (segments on disk, the real one) and
//! [`MemLog`] (in memory, for fast tests of the layers above). One conformance suite runs
//! against both.

mod file_cache;
mod file_log;
pub mod flush_pool;
mod flusher;
mod mem_log;
pub mod record;
mod recovery;
mod replace;
mod segment;
#[cfg(test)]
mod suite;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

pub use file_log::FileLog;
pub use mem_log::MemLog;
pub use replace::replace_file;

/// One log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log, starting at 1, consecutive.
    pub index: u64,
    /// Raft term that wrote the entry; 1 on a single agent.
    pub term: u64,
    /// Opaque payload (an encoded queue command).
    pub data: Bytes,
}

/// How far the log is durable, published by the flusher after each group commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durability {
    /// Every entry with `index < durable_next` is durable (fsynced under the default policy).
    pub durable_next: u64,
    /// Set once a write or fsync failed. The log then refuses further appends: after a failed
    /// fsync the page cache state is unknown, so retrying could confirm lost data.
    pub failure: Option<Arc<str>>,
}

/// What [`LogStore::on_durable`] calls: `Ok` once durable, `Err` with the log's failure.
pub type DurableCallback = Box<dyn FnOnce(Result<(), Arc<str>>) + Send>;

/// The failure a durable callback sees when the log is dropped before its entries are durable.
pub const LOG_CLOSED: &str = "the log was closed before the entries were durable";

/// The outcome for a waiter on entries below `next` at durability `d`; `None` while it waits.
pub fn durable_outcome(d: &Durability, next: u64) -> Option<Result<(), Arc<str>>> {
    if d.durable_next >= next {
        Some(Ok(()))
    } else {
        d.failure.clone().map(Err)
    }
}

/// Errors of the storage engine. Corruption always names the file and byte offset.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O operation failed on a named path.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("open", "write", "fsync", "read", ...).
        op: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A record failed its checksum or framing somewhere other than a torn tail.
    #[error("corrupted record in {path} at byte offset {offset}: {reason}")]
    Corrupted {
        /// The segment file.
        path: std::path::PathBuf,
        /// Byte offset of the bad record within the file.
        offset: u64,
        /// What was wrong (checksum mismatch, bad length, index out of sequence...).
        reason: String,
    },
    /// The log failed earlier (see [`Durability::failure`]) and accepts no more writes.
    #[error("log is failed: {0}")]
    Failed(Arc<str>),
    /// An appended entry is larger than one record may be ([`record::MAX_DATA_BYTES`]); the
    /// whole batch was refused.
    #[error("entry of {len} bytes exceeds the maximum of {max} bytes per log entry")]
    EntryTooLarge {
        /// Size of the offending entry's data.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A log cannot restart at index 0 (indices start at 1).
    #[error("cannot reset the log to index 0: indices start at 1")]
    ResetToZero,
    /// An index outside `first_index()..next_index()` was asked for where it must exist.
    #[error("index {index} out of range {first}..{next}")]
    OutOfRange {
        /// Asked index.
        index: u64,
        /// First retained index.
        first: u64,
        /// Next index to be written.
        next: u64,
    },
}

/// What recovery found when opening a log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segment files found.
    pub segments: usize,
    /// Entries found valid.
    pub entries: u64,
    /// Bytes cut from a torn tail of the last segment (an unfinished, never-confirmed write).
    pub truncated_bytes: u64,
}

/// A partition's log. Methods take `&self` and are safe to call from many threads: the queue
/// layer appends under its own lock and reads message bodies outside it.
pub trait LogStore: Send + Sync + 'static {
    /// Appends entries with the given term at `next_index()`, in order, and returns the index
    /// of the first. The entries are readable at once but durable only once
    /// [`Durability::durable_next`] passes them.
    fn append(&self, term: u64, data: &[Bytes]) -> Result<u64, LogError>;
    /// Watch of the durable position; wait with `rx.wait_for(|d| d.durable_next > idx)`.
    fn durability(&self) -> watch::Receiver<Durability>;
    /// Calls `done` once every entry below `next` is durable (`Ok`), or with the reason the
    /// log failed or closed before that (`Err`). `done` runs on whichever thread makes the
    /// entries durable (the flusher thread for [`FileLog`]), so it must not block: it exists
    /// so that a waiter (openraft's flush callback) costs no task of its own to wake up.
    /// The default waits on [`durability`](Self::durability) in a task (or a thread outside
    /// a runtime).
    fn on_durable(&self, next: u64, done: DurableCallback) {
        let mut durability = self.durability();
        if let Some(outcome) = durable_outcome(&durability.borrow(), next) {
            done(outcome);
            return;
        }
        let wait = async move {
            let outcome = match durability
                .wait_for(|d| durable_outcome(d, next).is_some())
                .await
            {
                Ok(d) => durable_outcome(&d, next).unwrap_or(Ok(())),
                Err(_) => Err(Arc::from(LOG_CLOSED)),
            };
            done(outcome);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(wait)),
            Err(_) => drop(std::thread::spawn(move || {
                futures::executor::block_on(wait)
            })),
        }
    }
    /// Reads one entry, verifying its checksum. `Ok(None)` when the index was purged or is not
    /// yet written.
    fn read(&self, index: u64) -> Result<Option<Entry>, LogError>;
    /// Reads consecutive entries from `from`, stopping after `max_entries` entries or once
    /// `max_bytes` of data is reached (at least one entry if any exists).
    fn read_range(
        &self,
        from: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, LogError>;
    /// First retained index (1 for a new log; moves up as segments are purged).
    fn first_index(&self) -> u64;
    /// Index the next append will get.
    fn next_index(&self) -> u64;
    /// Deletes whole segments whose entries are all below `index`; never the active segment.
    /// Returns the new `first_index()`.
    fn purge_before(&self, index: u64) -> Result<u64, LogError>;
    /// Removes every entry with index `>= index` (Raft log conflict resolution); a no-op when
    /// `index >= next_index()`, [`LogError::OutOfRange`] when `index < first_index()` (purged
    /// entries cannot be rewritten). Durable before it returns.
    fn truncate_from(&self, index: u64) -> Result<(), LogError>;
    /// Drops every entry, retained or pending, and restarts the log empty at `first_index`:
    /// afterwards `first_index() == next_index() == first_index` and the next append gets that
    /// index. Used when a replica installs a snapshot past the end of its log. Durable before
    /// it returns: a crash at any point leaves either the old log or the new empty one. The
    /// durable position becomes `first_index`; waiters for dropped entries at or above it see
    /// them durable only once new entries fill those indices.
    fn reset(&self, first_index: u64) -> Result<(), LogError>;
    /// Writes and fsyncs everything pending, then returns (used at shutdown and by tests).
    fn sync(&self) -> Result<(), LogError>;
    /// Total bytes the log occupies on disk (or in memory).
    fn size_bytes(&self) -> u64;
}

/// Refuses a batch holding an entry too large for one record, before anything is appended.
fn check_entry_sizes(data: &[Bytes]) -> Result<(), LogError> {
    match data.iter().find(|d| d.len() > record::MAX_DATA_BYTES) {
        Some(too_large) => Err(LogError::EntryTooLarge {
            len: too_large.len(),
            max: record::MAX_DATA_BYTES,
        }),
        None => Ok(()),
    }
}
