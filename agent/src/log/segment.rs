//! [`Segment`]: what the log keeps in memory about one segment file, and positional reads of
//! its records.
//!
//! The in-memory index is sparse: one `(index, byte position)` point per
//! [`SPARSE_INTERVAL_BYTES`] of records, so memory grows with log bytes / 16 KiB, never with the
//! number of entries (a 5,000,000 × 300 B backlog needs ~90,000 points, ~1.4 MiB). A read
//! starts at the nearest point at or below its index and decodes forward, at most ~16 KiB.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::record::{self, DecodeError};
use super::{Entry, LogError};

/// Bytes of records between two points of the sparse index.
pub const SPARSE_INTERVAL_BYTES: u64 = 16 * 1024;
/// Size of one positional read when scanning records.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// One segment file's extent in the log.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Index of the segment's first entry (its file name).
    pub base: u64,
    /// Bytes of complete records written to the file.
    pub len: u64,
    /// Index after the segment's last record (`base` when empty).
    pub next: u64,
    /// Sparse `(index, position)` points, ascending; the first record always has one.
    sparse: Vec<(u64, u64)>,
}

impl Segment {
    /// An empty segment starting at `base`.
    pub fn new(base: u64) -> Self {
        Self {
            base,
            len: 0,
            next: base,
            sparse: Vec::new(),
        }
    }

    /// Records that a record of `len` bytes with `index` (== `self.next`) was written at
    /// position `self.len`.
    pub fn push_record(&mut self, index: u64, len: u64) {
        debug_assert_eq!(index, self.next);
        let pos = self.len;
        if needs_point(self.last_point(), pos) {
            self.sparse.push((index, pos));
        }
        self.len += len;
        self.next = index + 1;
    }

    /// The closest known `(index, position)` at or before `index`.
    pub fn hint(&self, index: u64) -> (u64, u64) {
        let at = self.sparse.partition_point(|&(i, _)| i <= index);
        match at.checked_sub(1) {
            Some(at) => self.sparse[at],
            None => (self.base, 0),
        }
    }

    /// Cuts the segment back so that `index` (at byte `pos`) is the next record.
    pub fn truncate(&mut self, index: u64, pos: u64) {
        self.sparse.retain(|&(i, _)| i < index);
        self.len = pos;
        self.next = index;
    }

    /// Adds records written after the segment's current end: the segment now ends at byte
    /// `len` before index `next`, with these new sparse `points`.
    pub fn extend(&mut self, len: u64, next: u64, points: impl IntoIterator<Item = (u64, u64)>) {
        self.sparse.extend(points);
        self.len = len;
        self.next = next;
    }

    /// Position of the last sparse point, where the writer continues the interval count.
    pub fn last_point(&self) -> Option<u64> {
        self.sparse.last().map(|&(_, pos)| pos)
    }

    /// Memory held by the sparse index, for tests of the memory bound.
    #[cfg(test)]
    pub fn sparse_points(&self) -> usize {
        self.sparse.len()
    }
}

/// Whether a record at `pos` gets a sparse point, given the position of the last point.
pub fn needs_point(last_point: Option<u64>, pos: u64) -> bool {
    last_point.is_none_or(|last| pos - last >= SPARSE_INTERVAL_BYTES)
}

/// Limits of a range read and what has been collected so far.
#[derive(Debug)]
pub struct Budget {
    entries_left: usize,
    max_bytes: usize,
    bytes: usize,
    taken: bool,
}

impl Budget {
    /// At most `max_entries` entries, stopping once `max_bytes` of data is reached (after at
    /// least one entry).
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            entries_left: max_entries,
            max_bytes,
            bytes: 0,
            taken: false,
        }
    }

    /// Entries still wanted.
    pub fn entries_left(&self) -> usize {
        self.entries_left
    }

    /// The byte limit.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Whether nothing more is wanted.
    pub fn is_spent(&self) -> bool {
        self.entries_left == 0 || (self.taken && self.bytes >= self.max_bytes)
    }

    /// Charges one entry.
    pub fn take(&mut self, entry: &Entry) {
        self.entries_left = self.entries_left.saturating_sub(1);
        self.bytes = self.bytes.saturating_add(entry.data.len());
        self.taken = true;
    }
}

/// Where a read of one segment starts and stops.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    /// Byte position of a record boundary at or before the first wanted record.
    pub pos: u64,
    /// Index of the record at `pos`.
    pub index: u64,
    /// First index wanted.
    pub from: u64,
    /// Index to stop before (records at and after it are not read).
    pub until: u64,
    /// Byte length of the segment's complete records.
    pub end: u64,
}

/// Reads records of one segment file sequentially through `span`, appending those with index
/// `>= span.from` to `out` until the budget is spent. Every record is checksum-verified and
/// must carry the expected index.
pub fn read_records(
    file: &File,
    path: &Path,
    span: Span,
    budget: &mut Budget,
    out: &mut Vec<Entry>,
) -> Result<(), LogError> {
    let Span {
        mut pos,
        mut index,
        from,
        until,
        end,
    } = span;
    let mut buf = Vec::new();
    let mut buf_start = pos;
    while pos < end && index < until && !budget.is_spent() {
        let offset = (pos - buf_start) as usize;
        match record::decode(buf.get(offset..).unwrap_or_default()) {
            Ok(rec) => {
                if rec.index != index {
                    return Err(corrupted(
                        path,
                        pos,
                        format!(
                            "index out of sequence: expected {index}, found {}",
                            rec.index
                        ),
                    ));
                }
                let len = rec.encoded_len() as u64;
                if pos + len > end {
                    return Err(corrupted(
                        path,
                        pos,
                        "record extends past the segment's end".into(),
                    ));
                }
                if index >= from {
                    let entry = rec.to_entry();
                    budget.take(&entry);
                    out.push(entry);
                }
                pos += len;
                index += 1;
            }
            Err(DecodeError::Incomplete { needed }) => {
                let want = (needed as u64).max(READ_CHUNK_BYTES as u64).min(end - pos);
                if want < needed as u64 {
                    return Err(corrupted(
                        path,
                        pos,
                        format!("record of {needed} bytes extends past the segment's end at {end}"),
                    ));
                }
                buf.resize(want as usize, 0);
                file.read_exact_at(&mut buf, pos)
                    .map_err(|source| LogError::Io {
                        op: "read",
                        path: path.to_path_buf(),
                        source,
                    })?;
                buf_start = pos;
            }
            Err(DecodeError::Invalid(reason)) => return Err(corrupted(path, pos, reason)),
        }
    }
    Ok(())
}

/// Finds the byte position of the record with `target` in a segment, reading forward from the
/// hint `(index, pos)`; `end` is the segment's length.
pub fn position_of(
    file: &File,
    path: &Path,
    (mut index, mut pos): (u64, u64),
    end: u64,
    target: u64,
) -> Result<u64, LogError> {
    let mut header = [0u8; record::HEADER_BYTES];
    while index < target {
        if pos + record::HEADER_BYTES as u64 > end {
            return Err(corrupted(
                path,
                pos,
                format!("index {target} not found in segment"),
            ));
        }
        file.read_exact_at(&mut header, pos)
            .map_err(|source| LogError::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            })?;
        // Only the header is needed to step over a record; the record was verified when it
        // was recovered or written, and truncation only needs its boundary.
        match record::decode(&header) {
            Ok(rec) => pos += rec.encoded_len() as u64,
            Err(DecodeError::Incomplete { needed }) => pos += needed as u64,
            Err(DecodeError::Invalid(reason)) => return Err(corrupted(path, pos, reason)),
        }
        index += 1;
    }
    Ok(pos)
}

/// A [`LogError::Corrupted`] for `path` at `offset`.
pub fn corrupted(path: &Path, offset: u64, reason: String) -> LogError {
    LogError::Corrupted {
        path: path.to_path_buf(),
        offset,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sparse_index_keeps_one_point_per_interval_not_per_entry() {
        let mut segment = Segment::new(10);
        for index in 10..10_010 {
            segment.push_record(index, 300);
        }
        // 3,000,000 bytes / 16 KiB = 183 intervals; one point each (rounded up by record size).
        assert!(
            segment.sparse_points() <= 184,
            "{} points",
            segment.sparse_points()
        );
        assert_eq!(segment.hint(10), (10, 0));
        let (index, pos) = segment.hint(5_000);
        assert!(index <= 5_000 && 5_000 - index <= SPARSE_INTERVAL_BYTES / 300 + 1);
        assert_eq!(pos, (index - 10) * 300);
        assert_eq!(
            segment.hint(3),
            (10, 0),
            "below the base falls back to the start"
        );

        segment.truncate(5_000, (5_000 - 10) * 300);
        assert_eq!(segment.next, 5_000);
        assert!(segment.hint(4_999).0 < 5_000);
    }
}
