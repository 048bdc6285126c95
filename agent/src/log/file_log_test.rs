//! FileLog on real files: the conformance suite, then recovery, corruption, rolling and purge
//! against what is actually on disk.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::layout::{parse_segment_file_name, segment_file_name};
use crate::log::suite::{self, Factory};

/// Small segments so a few hundred entries span many files.
const SMALL_SEGMENT_BYTES: u64 = 4096;

fn config(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        fsync: FsyncPolicy::Always,
    }
}

struct FileFactory {
    dirs: Vec<tempfile::TempDir>,
    config: LogConfig,
}

impl Factory for FileFactory {
    type Log = FileLog;

    fn create(&mut self) -> FileLog {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, recovery) = FileLog::open(dir.path(), self.config).expect("open new log");
        assert_eq!(
            recovery,
            Recovery {
                segments: 1,
                entries: 0,
                truncated_bytes: 0
            }
        );
        self.dirs.push(dir);
        log
    }

    fn reopen(&mut self) -> Option<FileLog> {
        let dir = self.dirs.last()?.path();
        let (log, recovery) = FileLog::open(dir, self.config).expect("reopen");
        assert_eq!(
            recovery.truncated_bytes, 0,
            "a clean shutdown leaves no torn tail"
        );
        Some(log)
    }
}

#[test]
fn file_log_passes_the_conformance_suite_with_every_fsync_policy() {
    for fsync in [
        FsyncPolicy::Always,
        FsyncPolicy::Interval(Duration::from_millis(5)),
        FsyncPolicy::Never,
    ] {
        suite::test_all(FileFactory {
            dirs: Vec::new(),
            config: LogConfig {
                segment_bytes: SMALL_SEGMENT_BYTES,
                fsync,
            },
        });
    }
}

fn data(i: u64) -> Bytes {
    Bytes::from(format!("entry {i:06} ").repeat(20))
}

/// Opens a log in `dir`, appends entries `1..=n` and closes it cleanly.
fn write_log(dir: &Path, segment_bytes: u64, n: u64) {
    let (log, _) = FileLog::open(dir, config(segment_bytes)).expect("open");
    let batch: Vec<Bytes> = (1..=n).map(data).collect();
    log.append(1, &batch).expect("append");
    log.sync().expect("sync");
}

fn segment_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| {
            let e = e.expect("entry");
            let base = parse_segment_file_name(e.file_name().to_str()?)?;
            Some((base, e.path()))
        })
        .collect();
    files.sort();
    files
}

/// Byte offset of entry `index` in a segment starting at `base` (all entries from `data`).
fn offset_of(base: u64, index: u64) -> u64 {
    (base..index)
        .map(|i| record::encoded_len(data(i).len()) as u64)
        .sum()
}

fn flip_bit(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open segment");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).expect("read byte");
    byte[0] ^= 0x10;
    file.write_all_at(&byte, offset).expect("write byte");
}

fn expect_corrupted<T: std::fmt::Debug>(result: Result<T, LogError>) -> (PathBuf, u64, String) {
    match result {
        Err(LogError::Corrupted {
            path,
            offset,
            reason,
        }) => (path, offset, reason),
        other => panic!("expected Corrupted, got {other:?}"),
    }
}

#[test]
fn a_record_cut_mid_way_is_truncated_on_open_and_earlier_entries_survive() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 1 << 20, 50);

    // Phase 1: cut the last record short, as a crash during its write would.
    let (base, path) = segment_files(dir.path()).pop().expect("a segment");
    let full = std::fs::metadata(&path).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(full - 10)
        .expect("cut");

    // Phase 2: recovery cuts the torn record and keeps the rest.
    let (log, recovery) = FileLog::open(dir.path(), config(1 << 20)).expect("reopen");
    let last_len = record::encoded_len(data(50).len()) as u64;
    assert_eq!(recovery.truncated_bytes, last_len - 10);
    assert_eq!(recovery.entries, 49);
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        offset_of(base, 50)
    );
    assert_eq!(log.next_index(), 50);
    for i in 1..50 {
        assert_eq!(log.read(i).expect("read").expect("entry").data, data(i));
    }

    // Phase 3: the freed index is reused, and the next open finds a clean log.
    assert_eq!(
        log.append(2, &[Bytes::from_static(b"again")])
            .expect("append"),
        50
    );
    drop(log);
    let (log, recovery) = FileLog::open(dir.path(), config(1 << 20)).expect("reopen again");
    assert_eq!(recovery.truncated_bytes, 0);
    assert_eq!(
        log.read(50).expect("read").expect("entry").data,
        Bytes::from_static(b"again")
    );
}

#[test]
fn garbage_or_zeros_after_the_last_record_are_truncated() {
    for tail in [
        b"\x53\x4c\x01\x00garbage that looks like a header".to_vec(),
        vec![0u8; 4096],
        vec![0xA5; 7],
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        write_log(dir.path(), 1 << 20, 20);
        let (_, path) = segment_files(dir.path()).pop().expect("a segment");
        let len = std::fs::metadata(&path).expect("stat").len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .write_all_at(&tail, len)
            .expect("append garbage");

        let (log, recovery) = FileLog::open(dir.path(), config(1 << 20)).expect("reopen");
        assert_eq!(recovery.truncated_bytes, tail.len() as u64);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), len);
        assert_eq!(log.next_index(), 21);
        assert_eq!(log.read(20).expect("read").expect("entry").data, data(20));
    }
}

#[test]
fn a_flipped_bit_mid_segment_is_detected_on_open_and_on_read_naming_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), 1 << 20, 120);
    let (base, path) = segment_files(dir.path()).pop().expect("a segment");

    // Phase 1: a reader of the open log hits the flipped bit and gets no data from it.
    let (log, _) = FileLog::open(dir.path(), config(1 << 20)).expect("open");
    let damaged = 17;
    let offset = offset_of(base, damaged);
    flip_bit(&path, offset + record::HEADER_BYTES as u64 + 5);
    let (bad_path, bad_offset, reason) = expect_corrupted(log.read(damaged));
    assert_eq!((bad_path.as_path(), bad_offset), (path.as_path(), offset));
    assert!(reason.contains("checksum"), "{reason}");
    expect_corrupted(log.read_range(10, 100, usize::MAX));
    assert_eq!(
        log.read(16).expect("neighbour before").expect("entry").data,
        data(16)
    );
    // Later records in the same sparse-index interval are reached only by decoding through the
    // damaged one, so they fail too; past the next index point reads work again.
    expect_corrupted(log.read(18));
    assert_eq!(
        log.read(120)
            .expect("a later interval")
            .expect("entry")
            .data,
        data(120)
    );
    drop(log);

    // Phase 2: open refuses the log (valid records follow), and deletes nothing.
    let size = std::fs::metadata(&path).expect("stat").len();
    let err = FileLog::open(dir.path(), config(1 << 20)).map(|(log, _)| log.next_index());
    let (bad_path, bad_offset, reason) = expect_corrupted(err);
    assert_eq!((bad_path.as_path(), bad_offset), (path.as_path(), offset));
    assert!(reason.contains("followed by a valid record"), "{reason}");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), size);
    let message = LogError::Corrupted {
        path: bad_path,
        offset: bad_offset,
        reason,
    }
    .to_string();
    assert!(message.contains(&segment_file_name(base)) && message.contains(&offset.to_string()));
}

#[test]
fn a_bad_last_record_of_a_sealed_segment_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), SMALL_SEGMENT_BYTES, 60);
    let files = segment_files(dir.path());
    assert!(files.len() >= 3);
    let (base, path) = &files[0];
    let (next_base, _) = &files[1];
    let last = next_base - 1;
    let offset = offset_of(*base, last);
    flip_bit(path, offset + 3 * record::HEADER_BYTES as u64);

    let err =
        FileLog::open(dir.path(), config(SMALL_SEGMENT_BYTES)).map(|(log, _)| log.next_index());
    let (bad_path, bad_offset, _) = expect_corrupted(err);
    assert_eq!((bad_path, bad_offset), (path.clone(), offset));
}

#[test]
fn a_missing_segment_between_two_others_is_reported_as_a_gap() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), SMALL_SEGMENT_BYTES, 60);
    let files = segment_files(dir.path());
    std::fs::remove_file(&files[1].1).expect("remove middle segment");

    let err =
        FileLog::open(dir.path(), config(SMALL_SEGMENT_BYTES)).map(|(log, _)| log.next_index());
    let (path, offset, reason) = expect_corrupted(err);
    assert_eq!((path, offset), (files[2].1.clone(), 0));
    assert!(reason.contains("entries missing"), "{reason}");
}

#[test]
fn segments_roll_at_the_configured_size_and_are_named_by_base_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), SMALL_SEGMENT_BYTES, 100);
    let files = segment_files(dir.path());
    let record_len = record::encoded_len(data(1).len()) as u64;
    assert!(files.len() >= (100 * record_len / SMALL_SEGMENT_BYTES) as usize);
    assert_eq!(files[0].0, 1);
    for pair in files.windows(2) {
        let (base, path) = &pair[0];
        let size = std::fs::metadata(path).expect("stat").len();
        // A segment closes at the first record that reaches the size, so it ends below
        // size + one record, and holds exactly the indices up to the next base.
        assert!(size >= SMALL_SEGMENT_BYTES && size < SMALL_SEGMENT_BYTES + record_len);
        assert_eq!(size, offset_of(*base, pair[1].0));
    }
    let (log, recovery) = FileLog::open(dir.path(), config(SMALL_SEGMENT_BYTES)).expect("reopen");
    assert_eq!(recovery.segments, files.len());
    assert_eq!(recovery.entries, 100);
    assert_eq!(log.size_bytes(), 100 * record_len);
}

#[test]
fn purge_deletes_segment_files_and_a_reopen_starts_after_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), SMALL_SEGMENT_BYTES, 100);
    let before = segment_files(dir.path());

    let (log, _) = FileLog::open(dir.path(), config(SMALL_SEGMENT_BYTES)).expect("open");
    let first = log.purge_before(before[3].0 + 1).expect("purge");
    assert_eq!(
        first, before[3].0,
        "segments wholly below the index go, the one holding it stays"
    );
    let after = segment_files(dir.path());
    assert_eq!(after, before[3..].to_vec());
    assert_eq!(
        log.purge_before(u64::MAX).expect("purge all"),
        before.last().expect("last").0,
        "never the active segment"
    );
    drop(log);

    let (log, recovery) = FileLog::open(dir.path(), config(SMALL_SEGMENT_BYTES)).expect("reopen");
    assert_eq!(recovery.segments, 1);
    assert_eq!(log.first_index(), before.last().expect("last").0);
    assert_eq!(log.next_index(), 101);
    assert_eq!(log.read(100).expect("read").expect("entry").data, data(100));
}

#[test]
fn an_unusable_directory_is_an_io_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").expect("write");
    match FileLog::open(&not_a_dir, LogConfig::default()) {
        Err(LogError::Io { path, .. }) => assert_eq!(path, not_a_dir),
        other => panic!("expected Io, got {:?}", other.map(|(_, r)| r)),
    }
}

#[test]
fn a_failed_write_fails_the_log_and_refuses_further_appends() {
    // The active segment is a link to /dev/full: every write fails with ENOSPC, for real.
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink("/dev/full", dir.path().join(segment_file_name(1))).expect("link");
    let (log, _) = FileLog::open(dir.path(), LogConfig::default()).expect("open");

    log.append(1, &[data(1)]).expect("append is only buffered");
    let mut durability = log.durability();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("rt");
    let seen = runtime
        .block_on(async {
            let wait = durability.wait_for(|d| d.failure.is_some());
            tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .map(|seen| seen.map(|d| d.clone()))
        })
        .expect("failure within 10 s")
        .expect("watch open");
    assert_eq!(seen.durable_next, 1, "nothing was confirmed");
    assert!(
        seen.failure.as_deref().is_some_and(|f| f.contains("write")),
        "{seen:?}"
    );
    assert!(matches!(
        log.append(1, &[data(2)]),
        Err(LogError::Failed(_))
    ));
    assert!(matches!(log.sync(), Err(LogError::Failed(_))));
}

#[test]
fn a_failed_write_calls_waiting_durable_callbacks_with_the_failure() {
    // As above: the active segment is /dev/full, so the flusher's write fails.
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink("/dev/full", dir.path().join(segment_file_name(1))).expect("link");
    let (log, _) = FileLog::open(dir.path(), LogConfig::default()).expect("open");
    let (tx, rx) = std::sync::mpsc::channel();

    log.append(1, &[data(1)]).expect("append is only buffered");
    log.on_durable(2, Box::new(move |outcome| drop(tx.send(outcome))));

    let outcome = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("called back within 10 s");
    let reason = outcome.expect_err("never durable");
    assert!(reason.contains("write"), "{reason}");
    assert_eq!(log.durability().borrow().durable_next, 1);
}

#[test]
fn dropping_the_log_calls_callbacks_it_can_no_longer_satisfy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = FileLog::open(dir.path(), LogConfig::default()).expect("open");
    let (tx, rx) = std::sync::mpsc::channel();

    // Waits for an entry nobody appends: only the drop can answer it.
    log.on_durable(5, Box::new(move |outcome| drop(tx.send(outcome))));
    assert!(rx.try_recv().is_err(), "not decided while the log is open");
    drop(log);

    let outcome = rx.try_recv().expect("called back by the drop");
    assert_eq!(outcome, Err(Arc::from(crate::log::LOG_CLOSED)));
}

#[test]
fn an_oversized_entry_is_refused_and_nothing_is_appended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = FileLog::open(dir.path(), LogConfig::default()).expect("open");
    let huge = Bytes::from(vec![0u8; record::MAX_DATA_BYTES + 1]);
    match log.append(1, &[data(1), huge]) {
        Err(LogError::EntryTooLarge { len, max }) => assert_eq!(
            (len, max),
            (record::MAX_DATA_BYTES + 1, record::MAX_DATA_BYTES)
        ),
        other => panic!("expected EntryTooLarge, got {other:?}"),
    }
    assert_eq!(log.next_index(), 1);
}

#[test]
fn dropping_the_log_writes_what_is_pending_and_the_pool_lets_it_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = FileLog::open(dir.path(), LogConfig::default()).expect("open");
    log.append(1, &[data(1)]).expect("append");
    let shared = Arc::downgrade(&log.shared);
    drop(log);
    // A flusher thread may still hold the log for the moment it takes to find nothing to do.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shared.upgrade().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "a flusher thread kept the dropped log"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (log, _) = FileLog::open(dir.path(), LogConfig::default()).expect("reopen");
    assert_eq!(log.next_index(), 2, "drop wrote what was pending");
}

#[test]
fn many_logs_share_a_bounded_number_of_flusher_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs: Vec<FileLog> = (0..300)
        .map(|i| {
            FileLog::open(&dir.path().join(i.to_string()), LogConfig::default())
                .expect("open")
                .0
        })
        .collect();
    let waits: Vec<_> = logs
        .iter()
        .map(|log| {
            let next = log.append(1, &[data(7)]).expect("append") + 1;
            let (tx, rx) = std::sync::mpsc::channel();
            log.on_durable(
                next,
                Box::new(move |outcome| {
                    let _ = tx.send(outcome);
                }),
            );
            rx
        })
        .collect();
    for rx in waits {
        let outcome = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("every log became durable");
        assert!(outcome.is_ok(), "{outcome:?}");
    }
    let threads = crate::log::flush_pool::THREADS.get();
    assert!(
        (1..=crate::log::flush_pool::MAX_THREADS as i64).contains(&threads),
        "{threads} flusher threads for 300 logs"
    );
}

#[test]
fn the_sparse_index_stays_small_for_many_small_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_bytes: 1 << 20,
        fsync: FsyncPolicy::Never,
    };
    let (log, _) = FileLog::open(dir.path(), config).expect("open");
    let batch: Vec<Bytes> = (0..256).map(|_| Bytes::from(vec![7u8; 100])).collect();
    for _ in 0..400 {
        log.append(1, &batch).expect("append");
    }
    log.sync().expect("sync");
    let state = log.shared.lock_state();
    let points: usize = state.segments.iter().map(Segment::sparse_points).sum();
    // 102,400 entries in ~13 MB: about one point per 16 KiB, not one per entry.
    assert!(
        points < 1_000,
        "{points} sparse points for {} bytes",
        state.disk_bytes
    );
}

#[test]
fn reset_leaves_one_empty_segment_named_by_the_new_index_and_reopens_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), SMALL_SEGMENT_BYTES, 100);
    assert!(segment_files(dir.path()).len() > 3);

    let (log, _) = FileLog::open(dir.path(), config(SMALL_SEGMENT_BYTES)).expect("open");
    log.reset(777).expect("reset");
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].0, 777);
    assert_eq!(std::fs::metadata(&files[0].1).expect("stat").len(), 0);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec![segment_file_name(777)],
        "no staged file is left"
    );
    drop(log);

    let (log, recovery) = FileLog::open(dir.path(), config(SMALL_SEGMENT_BYTES)).expect("reopen");
    assert_eq!((recovery.segments, recovery.entries), (1, 0));
    assert_eq!((log.first_index(), log.next_index()), (777, 777));
    assert_eq!(log.append(2, &[data(777)]).expect("append"), 777);
}

#[test]
fn a_crash_after_the_reset_was_staged_is_completed_on_open() {
    // The state a crash leaves right after the reset's commit point: the staged empty segment
    // is durable, and removing the old segments got part-way (the newest one is gone).
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), SMALL_SEGMENT_BYTES, 100);
    let old = segment_files(dir.path());
    let staged = dir.path().join(format!(
        "{}{}",
        segment_file_name(5_000),
        crate::layout::RESET_SUFFIX
    ));
    std::fs::write(&staged, b"").expect("stage");
    std::fs::remove_file(&old.last().expect("a segment").1).expect("remove newest");

    let (log, recovery) = FileLog::open(dir.path(), config(SMALL_SEGMENT_BYTES)).expect("open");
    assert_eq!((recovery.segments, recovery.entries), (1, 0));
    assert_eq!((log.first_index(), log.next_index()), (5_000, 5_000));
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert!(!staged.exists());
    assert_eq!(log.read(50).expect("read"), None, "nothing old survives");
}

#[test]
fn two_staged_resets_are_refused_naming_the_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), SMALL_SEGMENT_BYTES, 10);
    for base in [20, 30] {
        let name = format!("{}{}", segment_file_name(base), crate::layout::RESET_SUFFIX);
        std::fs::write(dir.path().join(name), b"").expect("stage");
    }
    let (path, _, reason) = expect_corrupted(FileLog::open(dir.path(), config(4096)));
    assert_eq!(path, dir.path());
    assert!(reason.contains("2 staged log resets"), "{reason}");
    assert_eq!(segment_files(dir.path()).len(), 1, "nothing was deleted");
}
