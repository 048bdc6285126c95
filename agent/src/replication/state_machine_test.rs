//! Tests of the state machine over an in-memory log: apply, snapshot, install.

use std::sync::Arc;

use bytes::Bytes;
use openraft::RaftSnapshotBuilder;
use openraft::storage::RaftStateMachine;
use prost::Message;
use sluice_proto::storage::v1::{
    LogCommand, MessageRef, PublishCommand, SettleCommand, SettleKind, log_command::Command,
};
use sluice_proto::v1::Message as ClientMessage;

use super::*;
use crate::log::MemLog;

fn config() -> StateConfig {
    StateConfig {
        ack_timeout_ms: 30_000,
        max_deliveries: 0,
        has_dead_letter_queue: false,
        dedup_window_ms: 0,
    }
}

fn publish(payload: &str) -> Bytes {
    Bytes::from(
        LogCommand {
            command: Some(Command::Publish(PublishCommand {
                message: Some(ClientMessage {
                    payload: payload.as_bytes().to_vec(),
                    ..Default::default()
                }),
                publish_time_ms: 1,
                ..Default::default()
            })),
        }
        .encode_to_vec(),
    )
}

fn ack(entry: u64, size: u32) -> Bytes {
    Bytes::from(
        LogCommand {
            command: Some(Command::Settle(SettleCommand {
                time_ms: 2,
                kind: SettleKind::Ack as i32,
                messages: vec![MessageRef {
                    offset: crate::queue::entry::offset(entry, 0),
                    size,
                    ..Default::default()
                }],
                ..Default::default()
            })),
        }
        .encode_to_vec(),
    )
}

/// Appends `commands` to `log` as term-1 records and returns them as Raft entries.
fn append(log: &Arc<dyn LogStore>, commands: &[Bytes]) -> Vec<RaftEntry> {
    let first = log.append(1, commands).expect("append");
    (first..first + commands.len() as u64)
        .map(|i| {
            let record = log.read(i).expect("read").expect("present");
            codec::entry_from_record(record).expect("decodes")
        })
        .collect()
}

#[tokio::test]
async fn a_snapshot_holds_only_unsettled_history_and_rebuilds_the_same_state() {
    // Phase 1: three messages, the first acked; the low-water mark moves past it.
    let log: Arc<dyn LogStore> = Arc::new(MemLog::new());
    let mut machine = QueueStateMachine::new(config(), log.clone());
    let entries = append(
        &log,
        &[publish("a"), publish("bb"), publish("ccc"), ack(1, 1)],
    );
    let applied = machine.apply(entries).await.expect("apply");
    assert_eq!(
        applied.iter().map(|a| a.index).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(machine.applied_index().await, 4);
    assert_eq!(machine.purge_floor().load(Ordering::Acquire), 2);

    // Phase 2: the snapshot carries entries 2..=4 only (the acked message's body is not needed).
    let snapshot = machine.build_snapshot().await.expect("snapshot");
    let decoded = pb::Snapshot::decode(snapshot.snapshot.get_ref().as_slice()).expect("decodes");
    let carried: Vec<u64> = decoded
        .entries
        .iter()
        .map(|e| codec::log_index(e.index))
        .collect();
    assert_eq!(carried, vec![2, 3, 4]);

    // Phase 3: a fresh replica installing it has the same delivery state.
    let mut fresh = QueueStateMachine::new(config(), Arc::new(MemLog::new()));
    fresh
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .expect("install");
    assert_eq!(fresh.applied_index().await, 4);
    let want = machine.with_state(|s| s.backlog()).await;
    assert_eq!(fresh.with_state(|s| s.backlog()).await, want);
    assert_eq!(want, (2, 5));
    let current = fresh.get_current_snapshot().await.expect("current");
    assert_eq!(current.map(|s| s.meta), Some(snapshot.meta));
}

#[tokio::test]
async fn a_committed_entry_that_is_not_a_log_command_stops_apply_with_its_log_id() {
    let log: Arc<dyn LogStore> = Arc::new(MemLog::new());
    let mut machine = QueueStateMachine::new(config(), log);
    let bad = openraft::Entry {
        log_id: codec::log_id(1, 0),
        // A LogCommand field 1 with a length running past the end.
        payload: EntryPayload::Normal(Bytes::from_static(&[0x0a, 0x05, 0x01])),
    };
    let err = machine.apply(vec![bad]).await.unwrap_err();
    assert!(err.to_string().contains("Apply(LogId"), "{err}");
    assert!(err.to_string().contains("LogCommand.command"), "{err}");
    assert_eq!(machine.applied_index().await, 0);
}

#[tokio::test]
async fn a_snapshot_that_does_not_decode_is_refused_naming_it() {
    let mut machine = QueueStateMachine::new(config(), Arc::new(MemLog::new()));
    let meta = SnapshotMeta {
        last_log_id: Some(codec::log_id(1, 3)),
        last_membership: StoredMembership::default(),
        snapshot_id: "1-4-0".into(),
    };
    let err = machine
        .install_snapshot(&meta, Box::new(Cursor::new(vec![0xff, 0xff])))
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("1-4-0"), "{err:?}");
    assert_eq!(machine.applied_index().await, 0);
}
