//! Tests of the log adapter over an in-memory log and a real meta file. Appends through
//! openraft's flush callback are covered by `tests/replication_cluster.rs` (the callback type
//! cannot be built outside openraft).

use openraft::RaftLogReader;

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
