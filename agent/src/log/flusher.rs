//! The group commit: takes everything pending, writes it with one positional write per touched
//! segment, fsyncs once, and only then advances the durable index that confirms wait on. The
//! threads of the [`FlushPool`](super::flush_pool::FlushPool) run it for every log.
//!
//! Appenders never touch the disk: they copy into the pending queue under the short state lock.
//! While the flusher waits for one fsync (~2 ms here) the next group accumulates, so the fsync
//! rate stays bounded by the disk while the entry rate grows with the load.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use crate::config::FsyncPolicy;

use super::file_log::Shared;
use super::record;
use super::recovery::{create_segment, io};
use super::segment::{Segment, needs_point};
use super::{Entry, LogError};

/// Most bytes one group commit writes, so the write buffer stays bounded under a burst.
pub const MAX_GROUP_BYTES: usize = 8 * 1024 * 1024;

/// The write side of a log, owned by whoever holds its mutex (a flusher thread, `sync`,
/// `truncate_from` or `purge_before`). The encoding buffer belongs to the flusher thread, not
/// to the log, so an idle log holds no buffer.
#[derive(Debug)]
pub struct Writer {
    /// Read-write handle of the active (last) segment.
    pub active: File,
}

impl Writer {
    /// A writer appending to `active`.
    pub fn new(active: File) -> Self {
        Self { active }
    }
}

/// The active segment's end as the writer advances it, before the state sees it.
struct Tail {
    base: u64,
    /// Bytes already in the file.
    file_len: u64,
    /// End including buffered, unwritten bytes.
    len: u64,
    next: u64,
    last_point: Option<u64>,
    points: Vec<(u64, u64)>,
}

impl Tail {
    fn of(segment: &Segment) -> Self {
        Self {
            base: segment.base,
            file_len: segment.len,
            len: segment.len,
            next: segment.next,
            last_point: segment.last_point(),
            points: Vec::new(),
        }
    }

    fn push(&mut self, index: u64, len: u64) {
        if needs_point(self.last_point, self.len) {
            self.points.push((index, self.len));
            self.last_point = Some(self.len);
        }
        self.len += len;
        self.next = index + 1;
    }

    /// Publishes what was written into the shared segment list.
    fn commit(&mut self, segments: &mut [Segment]) {
        if let Some(segment) = segments.last_mut()
            && segment.base == self.base
        {
            segment.extend(self.file_len, self.next, self.points.drain(..));
        }
    }
}

/// Writes one group of pending entries (at most [`MAX_GROUP_BYTES`]) through `buf`, fsyncs it
/// as the policy says (always when `force_sync`), and publishes durability. Returns how many
/// entries were written. Any I/O failure marks the log failed: after a failed fsync the kernel may have
/// dropped the dirty pages, so a retry could report lost data as durable.
pub fn flush(
    shared: &Shared,
    writer: &mut Writer,
    buf: &mut Vec<u8>,
    force_sync: bool,
) -> Result<u64, LogError> {
    match write_group(shared, writer, buf, force_sync) {
        Ok(written) => Ok(written),
        Err(err) => {
            shared.fail(&err);
            Err(err)
        }
    }
}

fn write_group(
    shared: &Shared,
    writer: &mut Writer,
    buf: &mut Vec<u8>,
    force_sync: bool,
) -> Result<u64, LogError> {
    let policy = shared.config.fsync;
    let sync_rolls = policy != FsyncPolicy::Never;
    let (group, mut tail) = {
        let state = shared.lock_state();
        if let Some(failure) = &state.failure {
            return Err(LogError::Failed(Arc::clone(failure)));
        }
        let mut bytes = 0usize;
        let group: Vec<Entry> = state
            .pending
            .iter()
            .take_while(|entry| {
                let fits = bytes < MAX_GROUP_BYTES;
                bytes += record::encoded_len(entry.data.len());
                fits
            })
            .cloned()
            .collect();
        let Some(active) = state.segments.last() else {
            return Err(io(
                "write",
                shared.files.dir(),
                std::io::ErrorKind::NotFound.into(),
            ));
        };
        (group, Tail::of(active))
    };

    let mut group_bytes = 0u64;
    buf.clear();
    for entry in &group {
        if tail.len >= shared.config.segment_bytes && tail.next > tail.base {
            // Roll: finish the full segment (durably, so recovery may treat any bad record in
            // a non-last segment as corruption), then start the next one at this entry.
            let path = shared.files.path(tail.base);
            write_at(&writer.active, buf, tail.file_len, &path)?;
            tail.file_len = tail.len;
            if sync_rolls {
                writer
                    .active
                    .sync_data()
                    .map_err(|source| io("fsync", &path, source))?;
            }
            writer.active = create_segment(shared.files.dir(), entry.index, sync_rolls)?;
            buf.clear();
            let mut state = shared.lock_state();
            tail.commit(&mut state.segments);
            state.segments.push(Segment::new(entry.index));
            drop(state);
            tail = Tail::of(&Segment::new(entry.index));
        }
        let len = record::encoded_len(entry.data.len()) as u64;
        record::encode(buf, entry.index, entry.term, &entry.data);
        tail.push(entry.index, len);
        group_bytes += len;
    }
    let path = shared.files.path(tail.base);
    write_at(&writer.active, buf, tail.file_len, &path)?;
    tail.file_len = tail.len;
    let synced = force_sync || policy == FsyncPolicy::Always;
    if synced && (!group.is_empty() || force_sync) {
        writer
            .active
            .sync_data()
            .map_err(|source| io("fsync", &path, source))?;
    }

    let written = group.len() as u64;
    let durable_next = {
        let mut state = shared.lock_state();
        tail.commit(&mut state.segments);
        state.pending.drain(..group.len());
        state.pending_bytes -= group_bytes;
        state.disk_bytes += group_bytes;
        state.written_next += written;
        if synced {
            state.unsynced_since = None;
        } else if written > 0 && state.unsynced_since.is_none() {
            state.unsynced_since = Some(Instant::now());
        }
        state.written_next
    };
    if written > 0 || force_sync {
        shared.publish_durable(|d| {
            let changed = d.durable_next != durable_next;
            d.durable_next = durable_next;
            changed
        });
    }
    Ok(written)
}

/// fsyncs the active segment (the `Interval` policy's deferred sync).
pub fn sync_active(shared: &Shared, writer: &Writer) -> Result<(), LogError> {
    let base = shared.lock_state().segments.last().map_or(0, |s| s.base);
    let result = writer
        .active
        .sync_data()
        .map_err(|source| io("fsync", &shared.files.path(base), source));
    match result {
        Ok(()) => {
            shared.lock_state().unsynced_since = None;
            Ok(())
        }
        Err(err) => {
            shared.fail(&err);
            Err(err)
        }
    }
}

fn write_at(file: &File, buf: &[u8], pos: u64, path: &std::path::Path) -> Result<(), LogError> {
    if buf.is_empty() {
        return Ok(());
    }
    file.write_all_at(buf, pos)
        .map_err(|source| io("write", path, source))
}
