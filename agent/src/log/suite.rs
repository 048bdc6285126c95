//! The storage conformance suite: one set of behaviours every [`LogStore`] backend must show,
//! run against each backend through a [`Factory`] (the shape of openraft's `Suite::test_all`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{LogError, LogStore};

/// Makes logs for the suite.
pub(crate) trait Factory {
    /// The backend under test.
    type Log: LogStore;
    /// A fresh, empty log (a new directory for file backends). Its segments should be small
    /// (a few KiB) so that the suite's few hundred entries span several of them.
    fn create(&mut self) -> Self::Log;
    /// Reopens the log last created, after the caller dropped it; `None` for backends that do
    /// not persist, which skips the restart checks for them only.
    fn reopen(&mut self) -> Option<Self::Log>;
}

/// Runs every check of the suite against logs from `factory`.
pub(crate) fn test_all<F: Factory>(mut factory: F) {
    a_new_log_is_empty_and_starts_at_index_one(&mut factory);
    appended_entries_read_back_with_their_index_and_term(&mut factory);
    read_range_honours_entry_and_byte_limits(&mut factory);
    durability_watch_passes_every_appended_entry(&mut factory);
    durable_callbacks_run_once_their_entries_are_durable(&mut factory);
    purge_drops_a_prefix_and_keeps_everything_asked_for(&mut factory);
    truncate_removes_a_suffix_and_appends_continue_there(&mut factory);
    reopen_recovers_every_entry_and_the_bounds(&mut factory);
    readers_run_concurrently_with_an_appender(&mut factory);
    reset_drops_everything_and_appends_continue_at_the_new_index(&mut factory);
    reset_survives_a_reopen(&mut factory);
}

/// Payload for entry number `i` of a test: distinct content and varying length.
fn payload(i: u64) -> Bytes {
    let len = 20 + (i as usize * 37) % 300;
    Bytes::from(
        (0..len)
            .map(|b| (b as u64 ^ i.wrapping_mul(31)) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn append_n<L: LogStore>(log: &L, term: u64, from: u64, n: u64) -> u64 {
    let data: Vec<Bytes> = (from..from + n).map(payload).collect();
    log.append(term, &data).expect("append")
}

fn assert_entry<L: LogStore>(log: &L, index: u64, term: u64) {
    let entry = log
        .read(index)
        .expect("read")
        .unwrap_or_else(|| panic!("entry {index} missing"));
    assert_eq!(entry.index, index);
    assert_eq!(entry.term, term, "term of entry {index}");
    assert_eq!(entry.data, payload(index), "data of entry {index}");
}

fn wait_durable<L: LogStore>(log: &L, index: u64) {
    let mut rx = log.durability();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("rt");
    runtime
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                rx.wait_for(|d| d.durable_next > index || d.failure.is_some()),
            )
            .await
            .map(|seen| seen.map(|_| ()))
        })
        .expect("durable within 10 s")
        .expect("log alive");
    assert_eq!(log.durability().borrow().failure, None);
}

fn a_new_log_is_empty_and_starts_at_index_one<F: Factory>(factory: &mut F) {
    let log = factory.create();
    assert_eq!(log.first_index(), 1);
    assert_eq!(log.next_index(), 1);
    assert_eq!(log.read(0).expect("read 0"), None);
    assert_eq!(log.read(1).expect("read 1"), None);
    assert!(log.read_range(1, 10, 1 << 20).expect("range").is_empty());
    assert_eq!(log.durability().borrow().durable_next, 1);
    assert_eq!(log.durability().borrow().failure, None);
    log.sync().expect("sync of an empty log");
}

fn appended_entries_read_back_with_their_index_and_term<F: Factory>(factory: &mut F) {
    let log = factory.create();

    // Phase 1: batches get consecutive indices, the call returns the first of each.
    assert_eq!(append_n(&log, 1, 1, 3), 1);
    assert_eq!(append_n(&log, 2, 4, 5), 4);
    assert_eq!(
        log.append(2, &[]).expect("empty batch"),
        9,
        "an empty batch takes no index"
    );
    assert_eq!(log.append(2, &[Bytes::new()]).expect("empty entry"), 9);
    assert_eq!(log.next_index(), 10);

    // Phase 2: readable at once (before any sync), then again after sync.
    for round in 0..2 {
        for i in 1..=3 {
            assert_entry(&log, i, 1);
        }
        for i in 4..=8 {
            assert_entry(&log, i, 2);
        }
        let empty = log.read(9).expect("read 9").expect("entry 9");
        assert!(empty.data.is_empty());
        assert_eq!(log.read(10).expect("read past end"), None);
        assert_eq!(log.read(u64::MAX).expect("read far past end"), None);
        if round == 0 {
            log.sync().expect("sync");
        }
    }
    assert!(log.size_bytes() > 0);
}

fn read_range_honours_entry_and_byte_limits<F: Factory>(factory: &mut F) {
    let log = factory.create();
    append_n(&log, 1, 1, 100);
    log.sync().expect("sync");
    append_n(&log, 1, 101, 50); // some still pending, some on disk: the range spans both

    let all = log.read_range(1, usize::MAX, usize::MAX).expect("all");
    assert_eq!(all.len(), 150);
    for (entry, index) in all.iter().zip(1..) {
        assert_eq!(entry.index, index);
        assert_eq!(entry.data, payload(index));
    }

    let ten = log.read_range(95, 10, usize::MAX).expect("ten");
    assert_eq!(
        ten.iter().map(|e| e.index).collect::<Vec<_>>(),
        (95..105).collect::<Vec<_>>()
    );

    // The byte limit stops once reached, including the entry that reaches it.
    let first_two = payload(20).len() + payload(21).len();
    let by_bytes = log.read_range(20, usize::MAX, first_two).expect("bytes");
    assert_eq!(
        by_bytes.iter().map(|e| e.index).collect::<Vec<_>>(),
        vec![20, 21]
    );
    let one_more = log
        .read_range(20, usize::MAX, first_two + 1)
        .expect("bytes+1");
    assert_eq!(one_more.len(), 3);

    // At least one entry even when it alone exceeds the byte limit.
    assert_eq!(log.read_range(7, usize::MAX, 1).expect("tiny").len(), 1);
    assert_eq!(
        log.read_range(7, usize::MAX, 0).expect("zero bytes").len(),
        1
    );
    assert!(
        log.read_range(7, 0, usize::MAX)
            .expect("zero entries")
            .is_empty()
    );

    // Past the end: nothing; at the end edge: the tail only.
    assert!(
        log.read_range(151, 10, usize::MAX)
            .expect("past end")
            .is_empty()
    );
    assert_eq!(log.read_range(149, 10, usize::MAX).expect("tail").len(), 2);
}

fn durability_watch_passes_every_appended_entry<F: Factory>(factory: &mut F) {
    let log = factory.create();
    let mut last = 0;
    for batch in 0..20 {
        last = append_n(&log, 1, batch * 10 + 1, 10) + 9;
    }
    wait_durable(&log, last);
    assert!(log.durability().borrow().durable_next >= 201);

    append_n(&log, 1, 201, 1);
    log.sync().expect("sync");
    assert_eq!(
        log.durability().borrow().durable_next,
        202,
        "sync makes everything durable"
    );
}

fn durable_callbacks_run_once_their_entries_are_durable<F: Factory>(factory: &mut F) {
    let log = factory.create();
    let (tx, rx) = std::sync::mpsc::channel();
    // Phase 1: a callback per batch, registered before the flusher got to it.
    for batch in 0..20u64 {
        let last = append_n(&log, 1, batch * 10 + 1, 10) + 9;
        let tx = tx.clone();
        log.on_durable(
            last + 1,
            Box::new(move |outcome| drop(tx.send((last, outcome)))),
        );
    }
    for _ in 0..20 {
        let (last, outcome) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every callback runs within 10 s");
        assert_eq!(outcome, Ok(()), "batch ending at {last}");
        assert!(
            log.durability().borrow().durable_next > last,
            "called back only once entry {last} is durable"
        );
    }
    // Phase 2: entries already durable call back at once, on the caller's thread.
    let called = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = called.clone();
    log.on_durable(
        200,
        Box::new(move |outcome| {
            assert_eq!(outcome, Ok(()));
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
        }),
    );
    assert!(called.load(std::sync::atomic::Ordering::SeqCst));
}

fn purge_drops_a_prefix_and_keeps_everything_asked_for<F: Factory>(factory: &mut F) {
    let log = factory.create();
    append_n(&log, 1, 1, 300);
    log.sync().expect("sync");
    let size_before = log.size_bytes();

    // Phase 1: purge below 150; whatever backend granularity, nothing >= 150 goes.
    let first = log.purge_before(150).expect("purge");
    assert!(
        first > 1,
        "a backend with small segments must free something"
    );
    assert!(first <= 150);
    assert_eq!(log.first_index(), first);
    assert!(log.size_bytes() < size_before);
    assert_eq!(log.read(first - 1).expect("read purged"), None);
    for i in first..=300 {
        assert_entry(&log, i, 1);
    }
    let range = log
        .read_range(1, usize::MAX, usize::MAX)
        .expect("range from purged");
    assert!(
        range.is_empty() || range[0].index == first,
        "a range never invents purged entries"
    );

    // Phase 2: purging everything and more keeps the log usable and consecutive.
    let first = log.purge_before(u64::MAX).expect("purge all");
    assert!(first <= log.next_index());
    assert_eq!(
        log.purge_before(1).expect("purge below first is a no-op"),
        first
    );
    assert_eq!(append_n(&log, 1, 301, 5), 301);
    for i in first.max(301)..=305 {
        assert_entry(&log, i, 1);
    }
}

fn truncate_removes_a_suffix_and_appends_continue_there<F: Factory>(factory: &mut F) {
    let log = factory.create();
    append_n(&log, 1, 1, 200);
    log.sync().expect("sync");
    append_n(&log, 1, 201, 20); // partly pending

    // Phase 1: truncate in the middle of the on-disk part.
    log.truncate_from(120).expect("truncate");
    assert_eq!(log.next_index(), 120);
    assert_eq!(log.read(120).expect("read truncated"), None);
    assert_entry(&log, 119, 1);
    assert!(log.durability().borrow().durable_next <= 120);

    // Phase 2: new entries take the freed indices with their new term.
    assert_eq!(append_n(&log, 2, 120, 10), 120);
    log.sync().expect("sync");
    assert_eq!(log.durability().borrow().durable_next, 130);
    for i in 120..130 {
        assert_entry(&log, i, 2);
    }

    // Phase 3: edges: at next_index a no-op, below first an error naming the range.
    log.truncate_from(130).expect("truncate at end");
    log.truncate_from(10_000).expect("truncate past end");
    assert_eq!(log.next_index(), 130);
    let first = log.purge_before(100).expect("purge");
    if first > 1 {
        match log.truncate_from(first - 1) {
            Err(LogError::OutOfRange {
                index,
                first: f,
                next,
            }) => {
                assert_eq!((index, f, next), (first - 1, first, 130));
            }
            other => panic!("expected OutOfRange, got {other:?}"),
        }
    }

    // Phase 4: truncating everything retained leaves an empty log at `first`.
    log.truncate_from(first).expect("truncate all");
    assert_eq!(log.next_index(), first);
    assert_eq!(append_n(&log, 3, first, 1), first);
    assert_entry(&log, first, 3);
}

fn reopen_recovers_every_entry_and_the_bounds<F: Factory>(factory: &mut F) {
    // Phase 1: a log with a purged prefix, a truncated and rewritten suffix, pending entries.
    let log = factory.create();
    append_n(&log, 1, 1, 250);
    log.sync().expect("sync");
    let first = log.purge_before(100).expect("purge");
    log.truncate_from(200).expect("truncate");
    append_n(&log, 2, 200, 30);
    let next = log.next_index();
    drop(log);

    // Phase 2: everything is back, unchanged; appends continue.
    let Some(log) = factory.reopen() else { return };
    assert_eq!(log.first_index(), first);
    assert_eq!(log.next_index(), next);
    assert_eq!(
        log.durability().borrow().durable_next,
        next,
        "recovered entries are durable"
    );
    for i in first..200 {
        assert_entry(&log, i, 1);
    }
    for i in 200..230 {
        assert_entry(&log, i, 2);
    }
    assert_eq!(append_n(&log, 3, 230, 1), 230);
    drop(log);

    // Phase 3: a second reopen sees the entry appended after the first.
    let log = factory.reopen().expect("reopen again");
    assert_entry(&log, 230, 3);
}

fn readers_run_concurrently_with_an_appender<F: Factory>(factory: &mut F) {
    let log = Arc::new(factory.create());
    std::thread::scope(|scope| {
        let writer = {
            let log = Arc::clone(&log);
            scope.spawn(move || {
                for batch in 0..50 {
                    append_n(&*log, 1, batch * 8 + 1, 8);
                }
            })
        };
        for _ in 0..2 {
            let log = Arc::clone(&log);
            scope.spawn(move || {
                let mut seen = 0;
                while seen < 400 {
                    // Whatever exists must read back intact, pending or written.
                    for entry in log.read_range(seen + 1, 64, usize::MAX).expect("range") {
                        assert_eq!(entry.index, seen + 1, "ranges are consecutive");
                        assert_eq!(entry.data, payload(entry.index));
                        seen = entry.index;
                    }
                    std::thread::yield_now();
                }
            });
        }
        writer.join().expect("writer thread");
    });
    log.sync().expect("sync");
    assert_eq!(log.next_index(), 401);
}

fn reset_drops_everything_and_appends_continue_at_the_new_index<F: Factory>(factory: &mut F) {
    // Phase 1: a log with a purged prefix, entries on disk and entries still pending.
    let log = factory.create();
    append_n(&log, 1, 1, 200);
    log.sync().expect("sync");
    log.purge_before(50).expect("purge");
    append_n(&log, 1, 201, 20);
    let mut durability = log.durability();

    // Phase 2: reset past the end; nothing of the old log is readable any more.
    log.reset(1_000).expect("reset");
    assert_eq!(log.first_index(), 1_000);
    assert_eq!(log.next_index(), 1_000);
    assert_eq!(log.size_bytes(), 0);
    for index in [1, 100, 219, 220, 999, 1_000] {
        assert_eq!(log.read(index).expect("read"), None, "entry {index}");
    }
    assert!(log.read_range(1, 10, usize::MAX).expect("range").is_empty());
    assert!(durability.borrow_and_update().durable_next >= 1_000);

    // Phase 3: the next append lands at the new index and becomes durable there.
    let data: Vec<Bytes> = (1_000..1_010).map(payload).collect();
    assert_eq!(log.append(4, &data).expect("append"), 1_000);
    wait_durable(&log, 1_009);
    for i in 1_000..1_010 {
        assert_entry(&log, i, 4);
    }
    assert_eq!(log.read(999).expect("read"), None);

    // Phase 4: reset backwards and to the same index work too; index 0 is refused.
    log.reset(5).expect("reset backwards");
    assert_eq!((log.first_index(), log.next_index()), (5, 5));
    assert!(log.durability().borrow().durable_next >= 5);
    assert_eq!(append_n(&log, 5, 5, 3), 5);
    log.reset(5).expect("reset to the same first index");
    assert_eq!((log.first_index(), log.next_index()), (5, 5));
    assert_eq!(log.read(5).expect("read"), None);
    assert!(matches!(log.reset(0), Err(LogError::ResetToZero)));
    assert_eq!(append_n(&log, 6, 5, 1), 5);
    assert_entry(&log, 5, 6);
    // Purge and truncate keep working on the reset log.
    log.truncate_from(5).expect("truncate all");
    assert_eq!(log.next_index(), 5);
    log.sync().expect("sync");
}

fn reset_survives_a_reopen<F: Factory>(factory: &mut F) {
    let log = factory.create();
    append_n(&log, 1, 1, 120);
    log.sync().expect("sync");
    log.reset(500).expect("reset");
    append_n(&log, 2, 500, 5);
    drop(log);

    let Some(log) = factory.reopen() else { return };
    assert_eq!((log.first_index(), log.next_index()), (500, 505));
    assert_eq!(log.durability().borrow().durable_next, 505);
    assert_eq!(log.read(100).expect("read"), None);
    for i in 500..505 {
        assert_entry(&log, i, 2);
    }
    // A reset with nothing appended after it is durable too.
    log.reset(9_000).expect("reset");
    drop(log);
    let log = factory.reopen().expect("reopen again");
    assert_eq!((log.first_index(), log.next_index()), (9_000, 9_000));
    assert_eq!(append_n(&log, 3, 9_000, 1), 9_000);
    assert_entry(&log, 9_000, 3);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::MemLog;

    struct MemFactory;

    impl Factory for MemFactory {
        type Log = MemLog;
        fn create(&mut self) -> MemLog {
            MemLog::new()
        }
        fn reopen(&mut self) -> Option<MemLog> {
            None
        }
    }

    #[test]
    fn mem_log_passes_the_conformance_suite() {
        test_all(MemFactory);
    }
}
