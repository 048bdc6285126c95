//! Recovery on open: scan every segment, verify every record and the index sequence, cut a torn
//! tail of the last segment, and refuse anything else that is invalid.
//!
//! The rule that separates a torn tail from corruption: in the last segment, a bad record (an
//! incomplete one, or one failing its checksum or framing) after which no valid record follows
//! to the end of the file is an unfinished write. Nothing in it was ever confirmed (confirming
//! needs its fsync, and a fsync covers the whole write), so it is cut. A bad record followed by
//! a valid one, or a bad record in an earlier segment (which was fsynced before the next segment
//! was created), is damage to confirmed data: open fails with the file and offset, and nothing
//! is deleted, so an operator (or a replica) can still repair it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::layout::{
    RESET_SUFFIX, parse_segment_file_name, segment_file_name, staged_segment_file_name,
};

use super::file_cache::FileCache;
use super::record::{self, DecodeError};
use super::segment::{READ_CHUNK_BYTES, Segment, corrupted};
use super::{LogError, Recovery};

/// The state of a log directory after recovery.
#[derive(Debug)]
pub struct Recovered {
    /// Every segment, in index order; never empty (the last is the active one).
    pub segments: Vec<Segment>,
    /// Read-write handle of the last segment.
    pub active: File,
    /// What was found.
    pub report: Recovery,
}

/// Recovers (or creates) the log in `dir`. `sync` is false only under `FsyncPolicy::Never`.
pub fn recover(dir: &Path, sync: bool) -> Result<Recovered, LogError> {
    std::fs::create_dir_all(dir).map_err(|source| io("create directory", dir, source))?;
    finish_reset(dir, sync)?;
    let mut bases = list_segments(dir)?;
    if bases.is_empty() {
        create_segment(dir, 1, sync)?;
        bases.push(1);
    }

    let mut segments: Vec<Segment> = Vec::with_capacity(bases.len());
    let mut report = Recovery {
        segments: bases.len(),
        ..Recovery::default()
    };
    let mut active = None;
    for (at, &base) in bases.iter().enumerate() {
        let path = dir.join(segment_file_name(base));
        let is_last = at + 1 == bases.len();
        if base == 0 {
            return Err(corrupted(
                &path,
                0,
                "segment base index 0 (indices start at 1)".into(),
            ));
        }
        if let Some(prev) = segments.last()
            && prev.next != base
        {
            return Err(corrupted(
                &path,
                0,
                format!(
                    "segment starts at index {base} but the previous segment {} ends before \
                 index {} ({})",
                    segment_file_name(prev.base),
                    prev.next,
                    if prev.next < base {
                        "entries missing"
                    } else {
                        "entries overlap"
                    },
                ),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(is_last)
            .open(&path)
            .map_err(|source| io("open", &path, source))?;
        let scan = scan(&file, &path, base)?;
        report.entries += scan.segment.next - base;
        if let Some(bad) = scan.bad {
            if !is_last {
                return Err(corrupted(&path, bad.offset, bad.reason));
            }
            if let Some(valid_at) = find_valid_record(&file, &path, bad.offset + 1, scan.file_len)?
            {
                return Err(corrupted(
                    &path,
                    bad.offset,
                    format!(
                        "{}, followed by a valid record at offset {valid_at}",
                        bad.reason
                    ),
                ));
            }
            // Torn tail: cut it and make the cut durable before anything is appended after it.
            file.set_len(bad.offset)
                .map_err(|source| io("truncate", &path, source))?;
            if sync {
                file.sync_all()
                    .map_err(|source| io("fsync", &path, source))?;
            }
            report.truncated_bytes = scan.file_len - bad.offset;
            tracing::warn!(
                path = %path.display(),
                offset = bad.offset,
                bytes = report.truncated_bytes,
                reason = %bad.reason,
                "cut torn tail of the log (an unconfirmed write)"
            );
        }
        segments.push(scan.segment);
        if is_last {
            active = Some(file);
        }
    }
    let active = active.ok_or_else(|| io("open", dir, std::io::ErrorKind::NotFound.into()))?;
    Ok(Recovered {
        segments,
        active,
        report,
    })
}

// The staged first segment of a reset (`layout::staged_segment_file_name`): its durable
// existence is the commit point of the reset, and recovery then completes it.

/// The file side of `LogStore::reset`: replaces every segment in `doomed` by one empty segment
/// starting at `base`, and returns the writable handle of that segment.
///
/// Crash safety comes from the order: (1) the new empty segment is created under a staged name
/// and made durable, which commits the reset; (2) the old segments are removed; (3) the staged
/// file is renamed to its segment name and the rename made durable. Whenever recovery finds the
/// stage it finishes (2) and (3); without it the old segments are untouched. So a reopened log
/// is either entirely old or the new empty one, never a mix.
pub fn reset_files(
    dir: &Path,
    files: &FileCache,
    doomed: &[u64],
    base: u64,
    sync: bool,
) -> Result<File, LogError> {
    let staged = dir.join(staged_segment_file_name(base));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&staged)
        .map_err(|source| io("create", &staged, source))?;
    if sync {
        sync_dir(dir)?;
    }
    files.evict_from(0);
    for &old in doomed {
        let path = dir.join(segment_file_name(old));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(io("remove", &path, source)),
        }
    }
    let path = dir.join(segment_file_name(base));
    std::fs::rename(&staged, &path).map_err(|source| io("rename", &staged, source))?;
    if sync {
        sync_dir(dir)?;
    }
    Ok(file)
}

/// Completes a reset that a crash interrupted after its commit point (see [`reset_files`]):
/// every segment goes and the staged empty segment takes its name.
fn finish_reset(dir: &Path, sync: bool) -> Result<(), LogError> {
    let mut staged = Vec::new();
    for item in std::fs::read_dir(dir).map_err(|source| io("list directory", dir, source))? {
        let item = item.map_err(|source| io("list directory", dir, source))?;
        if let Some(base) = item
            .file_name()
            .to_str()
            .and_then(|name| name.strip_suffix(RESET_SUFFIX))
            .and_then(parse_segment_file_name)
        {
            staged.push(base);
        }
    }
    let base = match staged[..] {
        [] => return Ok(()),
        [base] => base,
        _ => {
            // One reset completes before the log opens, so two stages are never ours.
            return Err(corrupted(
                dir,
                0,
                format!(
                    "{} staged log resets found ({staged:?}); expected at most one",
                    staged.len()
                ),
            ));
        }
    };
    let doomed = list_segments(dir)?;
    tracing::warn!(
        dir = %dir.display(),
        base,
        dropped_segments = doomed.len(),
        "completing a log reset interrupted by a crash"
    );
    let files = FileCache::new(dir.to_path_buf());
    reset_files(dir, &files, &doomed, base, sync).map(drop)
}

/// Base indices of the segment files in `dir`, ascending. Other files are ignored.
fn list_segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut bases = Vec::new();
    for item in std::fs::read_dir(dir).map_err(|source| io("list directory", dir, source))? {
        let item = item.map_err(|source| io("list directory", dir, source))?;
        if let Some(base) = item.file_name().to_str().and_then(parse_segment_file_name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Creates the empty segment file with `base` and makes its directory entry durable.
pub fn create_segment(dir: &Path, base: u64, sync: bool) -> Result<File, LogError> {
    let path = dir.join(segment_file_name(base));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| io("create", &path, source))?;
    if sync {
        sync_dir(dir)?;
    }
    Ok(file)
}

/// fsyncs a directory, so that files created, removed or renamed in it stay so after a crash.
pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| io("fsync directory", dir, source))
}

/// An [`LogError::Io`] for `path`.
pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> LogError {
    LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

struct Scan {
    segment: Segment,
    file_len: u64,
    bad: Option<BadRecord>,
}

struct BadRecord {
    offset: u64,
    reason: String,
}

/// Reads a whole segment, verifying each record and the index sequence from `base`.
fn scan(file: &File, path: &Path, base: u64) -> Result<Scan, LogError> {
    let file_len = file
        .metadata()
        .map_err(|source| io("stat", path, source))?
        .len();
    let mut segment = Segment::new(base);
    let mut buf = Vec::new();
    let mut buf_start = 0u64;
    let mut pos = 0u64;
    let bad = loop {
        if pos == file_len {
            break None;
        }
        let offset = (pos - buf_start) as usize;
        match record::decode(buf.get(offset..).unwrap_or_default()) {
            Ok(rec) => {
                if rec.index != segment.next {
                    // A checksum-valid record with the wrong index is never a torn write.
                    return Err(corrupted(
                        path,
                        pos,
                        format!(
                            "index out of sequence: expected {}, found {}",
                            segment.next, rec.index
                        ),
                    ));
                }
                let len = rec.encoded_len() as u64;
                segment.push_record(rec.index, len);
                pos += len;
            }
            Err(DecodeError::Incomplete { needed }) => {
                let left = file_len - pos;
                if (needed as u64) > left {
                    break Some(BadRecord {
                        offset: pos,
                        reason: format!(
                            "incomplete record: needs {needed} bytes, the file has {left} left"
                        ),
                    });
                }
                let want = left.min((needed.max(READ_CHUNK_BYTES * 16)) as u64);
                buf.resize(want as usize, 0);
                file.read_exact_at(&mut buf, pos)
                    .map_err(|source| io("read", path, source))?;
                buf_start = pos;
            }
            Err(DecodeError::Invalid(reason)) => {
                break Some(BadRecord {
                    offset: pos,
                    reason,
                });
            }
        }
    };
    Ok(Scan {
        segment,
        file_len,
        bad,
    })
}

/// The offset of the first checksum-valid record starting anywhere in `from..end`, if any.
fn find_valid_record(
    file: &File,
    path: &Path,
    from: u64,
    end: u64,
) -> Result<Option<u64>, LogError> {
    let window = READ_CHUNK_BYTES * 16;
    let mut buf = vec![0u8; 0];
    let mut start = from;
    while start < end {
        let len = (end - start).min(window as u64) as usize;
        buf.resize(len, 0);
        file.read_exact_at(&mut buf, start)
            .map_err(|source| io("read", path, source))?;
        for at in 0..len {
            let candidate = &buf[at..];
            if record::is_valid_record_at(candidate) {
                return Ok(Some(start + at as u64));
            }
            if candidate.starts_with(&record::MAGIC)
                && let Err(DecodeError::Incomplete { needed }) = record::decode(candidate)
            {
                // The candidate runs past this window: read it whole if the file holds it.
                let offset = start + at as u64;
                if offset + needed as u64 <= end {
                    let mut whole = vec![0u8; needed];
                    file.read_exact_at(&mut whole, offset)
                        .map_err(|source| io("read", path, source))?;
                    if record::decode(&whole).is_ok() {
                        return Ok(Some(offset));
                    }
                }
            }
        }
        start += len as u64;
    }
    Ok(None)
}
