//! [`FileLog`]: the segmented, checksummed, group-committed log on disk.
//!
//! Concurrency: three locks, always taken in this order when nested.
//! - `writer` (the write side) is held by a flusher thread of the
//!   [`FlushPool`](super::flush_pool::FlushPool) for a whole group (write + fsync) and by
//!   `sync`, `truncate_from` and `purge_before`, so file contents change under one owner.
//! - `reshape` is taken shared by readers for the duration of their file reads and exclusively
//!   by `truncate_from`/`purge_before`, so no reader has a file cut or deleted under it.
//! - `state` is short: appenders push to `pending`, readers snapshot positions, the writer
//!   publishes what it wrote. No I/O happens under it.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::watch;

use crate::config::{FsyncPolicy, LogConfig};

use super::file_cache::FileCache;
use super::flush_pool::FlushPool;
use super::flusher::{self, Writer};
use super::recovery::{self, io};
use super::segment::{self, Budget, Segment, Span};
use super::{
    Durability, DurableCallback, Entry, LOG_CLOSED, LogError, LogStore, Recovery,
    check_entry_sizes, durable_outcome, record,
};

/// A partition log in a directory of segment files. See the module docs of `log`.
///
/// Dropping it writes and (per policy) fsyncs whatever is pending on the dropping thread.
#[derive(Debug)]
pub struct FileLog {
    shared: Arc<Shared>,
}

/// State shared by the log handle and the flusher threads.
#[derive(Debug)]
pub struct Shared {
    /// Segment size and fsync policy.
    pub config: LogConfig,
    /// Read handles and segment paths.
    pub files: FileCache,
    /// Positions, pending entries, failure; see [`State`].
    state: Mutex<State>,
    /// Whether the log is queued in the [`FlushPool`] or being served by one of its threads;
    /// cleared under the state lock when a thread finds nothing more to write.
    pub scheduled: AtomicBool,
    /// The write side (see the module docs for the lock order).
    writer: Mutex<Writer>,
    /// Readers shared, truncate/purge exclusive.
    reshape: RwLock<()>,
    /// Published durable position.
    pub durability: watch::Sender<Durability>,
    /// Callbacks waiting for durability ([`LogStore::on_durable`]): entries below the index.
    waiters: Mutex<Waiters>,
}

/// Durable callbacks with the index each waits below (callbacks have no `Debug`).
#[derive(Default)]
struct Waiters(Vec<(u64, DurableCallback)>);

impl std::fmt::Debug for Waiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} durable callbacks", self.0.len())
    }
}

/// The log's positions. Invariant: `pending` holds exactly the entries
/// `written_next..next`; entries below `written_next` are in the segment files.
#[derive(Debug)]
pub struct State {
    /// Every segment in index order; never empty, the last is the active one.
    pub segments: Vec<Segment>,
    /// Index after the last entry written to a file.
    pub written_next: u64,
    /// Index the next append gets.
    pub next: u64,
    /// Appended entries not yet written.
    pub pending: VecDeque<Entry>,
    /// Encoded size of `pending`.
    pub pending_bytes: u64,
    /// Bytes of complete records in all segment files.
    pub disk_bytes: u64,
    /// Set by the first failed write or fsync; the log is then read-only.
    pub failure: Option<Arc<str>>,
    /// Since when written data waits for its fsync (`FsyncPolicy::Interval` only).
    pub unsynced_since: Option<Instant>,
}

impl Shared {
    /// Locks the state. Every mutation keeps the invariants before it can panic, so a poisoned
    /// lock is still consistent and is used rather than turning one panic into many.
    pub fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Locks the write side.
    pub fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read_shape(&self) -> RwLockReadGuard<'_, ()> {
        self.reshape
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_shape(&self) -> RwLockWriteGuard<'_, ()> {
        self.reshape
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the log failed by `err`: no more appends, and waiters see the failure.
    pub fn fail(&self, err: &LogError) {
        let reason: Arc<str> = err.to_string().into();
        let mut state = self.lock_state();
        if state.failure.is_none() {
            state.failure = Some(Arc::clone(&reason));
        }
        drop(state);
        self.durability.send_modify(|d| {
            d.failure.get_or_insert(reason);
        });
        self.wake_waiters();
    }

    /// Publishes a durable position (`change` returns whether it changed anything) and runs
    /// the callbacks it satisfies.
    pub fn publish_durable(&self, change: impl FnOnce(&mut Durability) -> bool) {
        if self.durability.send_if_modified(change) {
            self.wake_waiters();
        }
    }

    /// Runs, outside every lock, the waiting callbacks the published durability decides.
    /// Registration checks the published value under the same lock, so a callback is either
    /// decided at registration or found here.
    fn wake_waiters(&self) {
        let durability = self.durability.borrow().clone();
        let decided: Vec<_> = {
            let mut guard = self.lock_waiters();
            let waiters = &mut guard.0;
            let mut decided = Vec::new();
            let mut i = 0;
            while i < waiters.len() {
                match durable_outcome(&durability, waiters[i].0) {
                    Some(outcome) => decided.push((waiters.swap_remove(i).1, outcome)),
                    None => i += 1,
                }
            }
            decided
        };
        for (done, outcome) in decided {
            done(outcome);
        }
    }

    fn lock_waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lower_durable(&self, next: u64) {
        self.durability.send_if_modified(|d| {
            let lowered = d.durable_next > next;
            d.durable_next = d.durable_next.min(next);
            lowered
        });
    }
}

impl FileLog {
    /// Opens (creating if missing) the log in `dir`, recovering what is there: every record
    /// is verified, a torn tail of the last segment is cut, any other damage is
    /// [`LogError::Corrupted`] naming the file and offset.
    pub fn open(dir: &Path, config: LogConfig) -> Result<(FileLog, Recovery), LogError> {
        let recovered = recovery::recover(dir, config.fsync != FsyncPolicy::Never)?;
        let next = recovered.segments.last().map_or(1, |s| s.next);
        let disk_bytes = recovered.segments.iter().map(|s| s.len).sum();
        let (durability, _) = watch::channel(Durability {
            durable_next: next,
            failure: None,
        });
        let shared = Arc::new(Shared {
            config,
            files: FileCache::new(dir.to_path_buf()),
            state: Mutex::new(State {
                segments: recovered.segments,
                written_next: next,
                next,
                pending: VecDeque::new(),
                pending_bytes: 0,
                disk_bytes,
                failure: None,
                unsynced_since: None,
            }),
            scheduled: AtomicBool::new(false),
            writer: Mutex::new(Writer::new(recovered.active)),
            reshape: RwLock::new(()),
            durability,
            waiters: Mutex::new(Waiters::default()),
        });
        Ok((FileLog { shared }, recovered.report))
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        self.shared.files.dir()
    }

    /// Reads entries through the segment files and then the pending queue; `read` and
    /// `read_range` are this with different budgets.
    fn collect(&self, from: u64, mut budget: Budget) -> Result<Vec<Entry>, LogError> {
        let mut out = Vec::new();
        if budget.is_spent() {
            return Ok(out);
        }
        let _shape = self.shared.read_shape();
        let (spans, pending) = {
            let state = self.shared.lock_state();
            let first = state.segments.first().map_or(state.next, |s| s.base);
            if from < first || from >= state.next {
                return Ok(out);
            }
            let mut spans = Vec::new();
            if from < state.written_next {
                let at = state
                    .segments
                    .partition_point(|s| s.base <= from)
                    .saturating_sub(1);
                for (n, segment) in state.segments[at..].iter().enumerate() {
                    if segment.base >= state.written_next {
                        break;
                    }
                    let (index, pos) = if n == 0 {
                        segment.hint(from)
                    } else {
                        (segment.base, 0)
                    };
                    let until = segment.next.min(state.written_next);
                    spans.push((
                        segment.base,
                        Span {
                            pos,
                            index,
                            from,
                            until,
                            end: segment.len,
                        },
                    ));
                }
            }
            // Clone (cheaply: `Bytes`) only as many pending entries as the budget could take.
            let skip =
                usize::try_from(from.saturating_sub(state.written_next)).unwrap_or(usize::MAX);
            let mut pending_budget = Budget::new(budget.entries_left(), budget.max_bytes());
            let mut pending = Vec::new();
            for entry in state.pending.iter().skip(skip) {
                if pending_budget.is_spent() {
                    break;
                }
                pending_budget.take(entry);
                pending.push(entry.clone());
            }
            (spans, pending)
        };
        for (base, span) in spans {
            if budget.is_spent() {
                return Ok(out);
            }
            let file = self.shared.files.get(base)?;
            segment::read_records(
                &file,
                &self.shared.files.path(base),
                span,
                &mut budget,
                &mut out,
            )?;
        }
        for entry in pending {
            if budget.is_spent() {
                break;
            }
            budget.take(&entry);
            out.push(entry);
        }
        Ok(out)
    }
}

impl Drop for FileLog {
    fn drop(&mut self) {
        // Write what is pending and make it durable here rather than leave it to the pool: the
        // log is closed when the drop returns (a reopen of the directory may follow at once).
        let mut writer = self.shared.lock_writer();
        let mut buf = Vec::new();
        let result = loop {
            if self.shared.lock_state().pending.is_empty() {
                break Ok(());
            }
            if let Err(e) = flusher::flush(&self.shared, &mut writer, &mut buf, false) {
                break Err(e);
            }
        };
        let unsynced = self.shared.lock_state().unsynced_since.is_some();
        let result = result.and_then(|()| {
            if unsynced {
                flusher::sync_active(&self.shared, &writer)
            } else {
                Ok(())
            }
        });
        drop(writer);
        if let Err(e) = result {
            tracing::error!(dir = %self.dir().display(), error = %e, "closing a log left entries unwritten");
        }
        // Everything writable was written: whoever still waits never gets durability.
        let left = std::mem::take(&mut self.shared.lock_waiters().0);
        for (_, done) in left {
            done(Err(Arc::from(LOG_CLOSED)));
        }
    }
}

impl LogStore for FileLog {
    fn append(&self, term: u64, data: &[Bytes]) -> Result<u64, LogError> {
        check_entry_sizes(data)?;
        let mut state = self.shared.lock_state();
        if let Some(failure) = &state.failure {
            return Err(LogError::Failed(Arc::clone(failure)));
        }
        let first = state.next;
        let was_idle = state.pending.is_empty();
        for item in data {
            let index = state.next;
            state.pending_bytes += record::encoded_len(item.len()) as u64;
            state.pending.push_back(Entry {
                index,
                term,
                data: item.clone(),
            });
            state.next += 1;
        }
        drop(state);
        // A log being served re-checks `pending` before it is let go, so only an idle one
        // needs queueing.
        if was_idle && !data.is_empty() {
            FlushPool::shared().schedule(&self.shared);
        }
        Ok(first)
    }

    fn durability(&self) -> watch::Receiver<Durability> {
        self.shared.durability.subscribe()
    }

    fn on_durable(&self, next: u64, done: DurableCallback) {
        let mut waiters = self.shared.lock_waiters();
        match durable_outcome(&self.shared.durability.borrow(), next) {
            Some(outcome) => {
                drop(waiters);
                done(outcome);
            }
            None => waiters.0.push((next, done)),
        }
    }

    fn read(&self, index: u64) -> Result<Option<Entry>, LogError> {
        Ok(self.collect(index, Budget::new(1, usize::MAX))?.pop())
    }

    fn read_range(
        &self,
        from: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, LogError> {
        self.collect(from, Budget::new(max_entries, max_bytes))
    }

    fn first_index(&self) -> u64 {
        let state = self.shared.lock_state();
        state.segments.first().map_or(state.next, |s| s.base)
    }

    fn next_index(&self) -> u64 {
        self.shared.lock_state().next
    }

    fn purge_before(&self, index: u64) -> Result<u64, LogError> {
        let _writer = self.shared.lock_writer();
        let _shape = self.shared.write_shape();
        let doomed: Vec<u64> = {
            let state = self.shared.lock_state();
            let sealed = &state.segments[..state.segments.len().saturating_sub(1)];
            sealed
                .iter()
                .take_while(|s| s.next <= index)
                .map(|s| s.base)
                .collect()
        };
        // Oldest first: a crash part-way leaves a shorter but still contiguous log.
        let mut removed = 0;
        let mut result = Ok(());
        for &base in &doomed {
            self.shared.files.evict(base);
            let path = self.shared.files.path(base);
            if let Err(source) = std::fs::remove_file(&path) {
                result = Err(io("remove", &path, source));
                break;
            }
            removed += 1;
        }
        if removed > 0 && self.shared.config.fsync != FsyncPolicy::Never {
            result = result.and(recovery::sync_dir(self.dir()));
        }
        let mut state = self.shared.lock_state();
        let freed: u64 = state.segments.drain(..removed).map(|s| s.len).sum();
        state.disk_bytes -= freed;
        let first = state.segments.first().map_or(state.next, |s| s.base);
        result.map(|()| first)
    }

    fn truncate_from(&self, index: u64) -> Result<(), LogError> {
        let mut writer = self.shared.lock_writer();
        let _shape = self.shared.write_shape();
        let (keep_at, doomed, cut) = {
            let mut state = self.shared.lock_state();
            if let Some(failure) = &state.failure {
                return Err(LogError::Failed(Arc::clone(failure)));
            }
            let first = state.segments.first().map_or(state.next, |s| s.base);
            if index < first {
                return Err(LogError::OutOfRange {
                    index,
                    first,
                    next: state.next,
                });
            }
            if index >= state.next {
                return Ok(());
            }
            if index >= state.written_next {
                // Only unwritten entries go: no file changes.
                let keep = usize::try_from(index - state.written_next).unwrap_or(usize::MAX);
                let dropped: u64 = state
                    .pending
                    .drain(keep..)
                    .map(|e| record::encoded_len(e.data.len()) as u64)
                    .sum();
                state.pending_bytes -= dropped;
                state.next = index;
                drop(state);
                self.shared.lower_durable(index);
                return Ok(());
            }
            // Everything pending is above `index`; readers now stop at `index` at once.
            state.pending.clear();
            state.pending_bytes = 0;
            state.written_next = index;
            state.next = index;
            let keep_at = state
                .segments
                .partition_point(|s| s.base <= index)
                .saturating_sub(1);
            let doomed: Vec<u64> = state.segments[keep_at + 1..]
                .iter()
                .map(|s| s.base)
                .collect();
            let keep = &state.segments[keep_at];
            (keep_at, doomed, (keep.base, keep.hint(index), keep.len))
        };
        self.shared.lower_durable(index);

        let result = self.cut_files(&mut writer, &doomed, cut, index);
        match result {
            Ok(pos) => {
                let mut state = self.shared.lock_state();
                state.segments.truncate(keep_at + 1);
                if let Some(segment) = state.segments.last_mut() {
                    segment.truncate(index, pos);
                }
                state.disk_bytes = state.segments.iter().map(|s| s.len).sum();
                Ok(())
            }
            Err(err) => {
                // The files are now in an unknown shape relative to the state; stop writing.
                self.shared.fail(&err);
                Err(err)
            }
        }
    }

    fn reset(&self, first_index: u64) -> Result<(), LogError> {
        if first_index == 0 {
            return Err(LogError::ResetToZero);
        }
        let mut writer = self.shared.lock_writer();
        let _shape = self.shared.write_shape();
        let doomed: Vec<u64> = {
            let mut state = self.shared.lock_state();
            if let Some(failure) = &state.failure {
                return Err(LogError::Failed(Arc::clone(failure)));
            }
            // The flusher is shut out by the writer lock and readers by the shape lock, so the
            // new shape can be published before the files change; appends made meanwhile queue
            // up at `first_index` and go to the new segment once the writer lock is released.
            let doomed = state.segments.iter().map(|s| s.base).collect();
            state.segments = vec![Segment::new(first_index)];
            state.pending.clear();
            state.pending_bytes = 0;
            state.written_next = first_index;
            state.next = first_index;
            state.disk_bytes = 0;
            state.unsynced_since = None;
            doomed
        };
        self.shared.publish_durable(|d| {
            let changed = d.durable_next != first_index;
            d.durable_next = first_index;
            changed
        });
        match recovery::reset_files(
            self.dir(),
            &self.shared.files,
            &doomed,
            first_index,
            self.shared.config.fsync != FsyncPolicy::Never,
        ) {
            Ok(active) => {
                writer.active = active;
                Ok(())
            }
            Err(err) => {
                // The files are in an unknown shape relative to the state; stop writing. A
                // reopen finds either the old log or the completed reset.
                self.shared.fail(&err);
                Err(err)
            }
        }
    }

    fn sync(&self) -> Result<(), LogError> {
        let mut writer = self.shared.lock_writer();
        let mut buf = Vec::new();
        let target = self.shared.lock_state().next;
        loop {
            flusher::flush(&self.shared, &mut writer, &mut buf, true)?;
            if self.shared.lock_state().written_next >= target {
                return Ok(());
            }
        }
    }

    fn size_bytes(&self) -> u64 {
        let state = self.shared.lock_state();
        state.disk_bytes + state.pending_bytes
    }
}

impl FileLog {
    /// The file side of `truncate_from`: deletes the `doomed` later segments (newest first, so
    /// a crash part-way leaves a contiguous log), cuts the segment `(base, hint, len)` that
    /// holds `index` at that record, makes both durable, and makes that segment the active
    /// one. Returns the cut position.
    fn cut_files(
        &self,
        writer: &mut Writer,
        doomed: &[u64],
        (base, hint, len): (u64, (u64, u64), u64),
        index: u64,
    ) -> Result<u64, LogError> {
        let sync = self.shared.config.fsync != FsyncPolicy::Never;
        let files = &self.shared.files;
        if let Some(&oldest) = doomed.first() {
            files.evict_from(oldest);
        }
        for &doomed_base in doomed.iter().rev() {
            let path = files.path(doomed_base);
            std::fs::remove_file(&path).map_err(|source| io("remove", &path, source))?;
        }
        let path = files.path(base);
        if !doomed.is_empty() {
            // The kept segment becomes the active one: the writer needs a writable handle.
            writer.active = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|source| io("open", &path, source))?;
        }
        let pos = segment::position_of(&writer.active, &path, hint, len, index)?;
        writer
            .active
            .set_len(pos)
            .map_err(|source| io("truncate", &path, source))?;
        if sync {
            writer
                .active
                .sync_all()
                .map_err(|source| io("fsync", &path, source))?;
            if !doomed.is_empty() {
                recovery::sync_dir(files.dir())?;
            }
        }
        Ok(pos)
    }
}

#[cfg(test)]
#[path = "file_log_test.rs"]
mod tests;
