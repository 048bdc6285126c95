//! Tests of the log adapter over an in-memory log and a real meta file. Appends through
//! openraft's flush callback are covered by `tests/replication_cluster.rs` (the callback type
//! cannot be built outside openraft).

use openraft::RaftLogReader;
use prost::Message as _;
use sluice_proto::storage::v1::{LogCommand, PublishCommand, log_command::Command};
use sluice_proto::v1::Message;

use super::*;
use crate::log::MemLog;

fn open(dir: &std::path::Path, log: Arc<dyn LogStore>, floor: u64) -> ReplicatedLog {
    ReplicatedLog::open(log, MetaFile::new(dir), Arc::new(AtomicU64::new(floor))).expect("open")
}

#[tokio::test]
async fn the_vote_survives_reopening_the_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn LogStore> = Arc::new(MemLog::new());
    let mut store = open(dir.path(), log.clone(), 1);
    assert_eq!(store.read_vote().await.expect("read"), None);
    let vote = Vote::new(3, 2);
    store.save_vote(&vote).await.expect("save");
    let mut reopened = open(dir.path(), log, 1);
    assert_eq!(reopened.read_vote().await.expect("read"), Some(vote));
}

#[tokio::test]
async fn log_state_and_reads_use_raft_indices_one_below_the_partition_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn LogStore> = Arc::new(MemLog::new());
    let mut store = open(dir.path(), log.clone(), 1);
    let empty = store.get_log_state().await.expect("state");
    assert_eq!((empty.last_purged_log_id, empty.last_log_id), (None, None));

    log.append(1, &[Bytes::new(), Bytes::new()])
        .expect("append");
    log.append(2, &[Bytes::new()]).expect("append");
    let state = store.get_log_state().await.expect("state");
    assert_eq!(state.last_log_id, Some(codec::log_id(2, 2)));
    let entries = store.try_get_log_entries(1..=2).await.expect("read");
    let ids: Vec<_> = entries.iter().map(|e| e.log_id).collect();
    assert_eq!(ids, vec![codec::log_id(1, 1), codec::log_id(2, 2)]);

    store.truncate(codec::log_id(1, 1)).await.expect("truncate");
    assert_eq!(log.next_index(), 2);
    let state = store.get_log_state().await.expect("state");
    assert_eq!(state.last_log_id, Some(codec::log_id(1, 0)));
}

#[tokio::test]
async fn purge_is_recorded_at_once_but_deletes_only_below_the_settled_floor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn LogStore> = Arc::new(MemLog::new());
    let data: Vec<Bytes> = (0..6).map(|_| Bytes::new()).collect();
    log.append(1, &data).expect("append");
    // Partition-log entries 1..=6; the lowest unsettled message is at 3.
    let mut store = open(dir.path(), log.clone(), 3);
    store.purge(codec::log_id(1, 4)).await.expect("purge");
    assert_eq!(
        log.first_index(),
        3,
        "entries 3.. still hold unsettled bodies"
    );
    let state = store.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id, Some(codec::log_id(1, 4)));
    assert_eq!(state.last_log_id, Some(codec::log_id(1, 5)));

    // The purge point is durable like the vote.
    let mut reopened = open(dir.path(), log, 3);
    let state = reopened.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id, Some(codec::log_id(1, 4)));
}

/// Reopens the meta in `dir` until its committed hint is `want` (the saver writes it in the
/// background) or 5 s pass; returns the last hint seen.
async fn saved_hint(dir: &std::path::Path, log: &Arc<dyn LogStore>, want: u64) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut reopened = open(dir, log.clone(), 1);
        let hint = reopened
            .read_committed()
            .await
            .expect("read")
            .map(|l| l.index);
        assert_eq!(hint, reopened.committed_hint().map(|l| l.index));
        if hint == Some(want) || tokio::time::Instant::now() >= deadline {
            return hint;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_committed_hint_is_saved_in_the_background_and_read_back_after_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn LogStore> = Arc::new(MemLog::new());
    log.append(1, &vec![Bytes::new(); 10]).expect("append");
    let mut store = open(dir.path(), log.clone(), 1);
    assert_eq!(store.read_committed().await.expect("read"), None);

    // Phase 1: the first report is saved at once.
    store
        .save_committed(Some(codec::log_id(1, 3)))
        .await
        .expect("save");
    assert_eq!(saved_hint(dir.path(), &log, 3).await, Some(3));

    // Phase 2: a later one within the save interval is saved at the latest when the replica's
    // Raft lets go of its log store, and a lower report never moves the hint back.
    store
        .save_committed(Some(codec::log_id(1, 8)))
        .await
        .expect("save");
    store
        .save_committed(Some(codec::log_id(1, 5)))
        .await
        .expect("save");
    drop(store);
    assert_eq!(saved_hint(dir.path(), &log, 8).await, Some(8));
}

#[tokio::test]
async fn a_committed_entry_not_yet_in_the_local_log_is_not_saved_until_it_is_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn LogStore> = Arc::new(MemLog::new());
    log.append(1, &vec![Bytes::new(); 2]).expect("append");
    let mut store = open(dir.path(), log.clone(), 1);

    // Raft index 4 is partition-log index 5; the log holds only 1..=2.
    store
        .save_committed(Some(codec::log_id(1, 4)))
        .await
        .expect("save");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        open(dir.path(), log.clone(), 1).committed_hint(),
        None,
        "a hint must name an entry a restarted replica has"
    );

    log.append(1, &vec![Bytes::new(); 3]).expect("append");
    assert_eq!(saved_hint(dir.path(), &log, 4).await, Some(4));
}

#[tokio::test]
async fn reporting_commits_costs_no_fsync_per_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn LogStore> = Arc::new(MemLog::new());
    log.append(1, &vec![Bytes::new(); 20_001]).expect("append");
    let mut store = open(dir.path(), log.clone(), 1);
    // Each meta save is two fsyncs (file and directory), milliseconds on any disk: 20,000
    // saved commits would take many seconds. Reporting them must not wait for any.
    let started = std::time::Instant::now();
    for index in 0..20_000 {
        store
            .save_committed(Some(codec::log_id(1, index)))
            .await
            .expect("save");
    }
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
    drop(store);
    assert_eq!(saved_hint(dir.path(), &log, 19_999).await, Some(19_999));
}

#[tokio::test]
async fn a_limited_read_stops_at_the_byte_budget_of_one_append_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log: Arc<dyn LogStore> = Arc::new(MemLog::new());
    // A queue command of about 1 MiB (a publish of that size).
    let entry = Bytes::from(
        LogCommand {
            command: Some(Command::Publish(PublishCommand {
                message: Some(Message {
                    payload: vec![7u8; 1 << 20],
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
        .encode_to_vec(),
    );
    log.append(1, &vec![entry.clone(); 10]).expect("append");
    let mut store = open(dir.path(), log, 1);
    // Raft indices 0..10 are 10 MiB; one request takes entries until 4 MiB is reached.
    let first = store.limited_get_log_entries(0, 10).await.expect("read");
    assert_eq!(first.len(), MAX_APPEND_BYTES.div_ceil(entry.len()));
    assert_eq!(first[0].log_id, codec::log_id(1, 0));
    let rest = store.limited_get_log_entries(8, 10).await.expect("read");
    assert_eq!(
        rest.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        vec![8, 9]
    );
}
