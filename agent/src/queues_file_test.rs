//! Reading queue definitions files from real files on disk.

use super::*;

/// Writes `json` to a file in a fresh directory; the directory lives as long as the guard.
fn file(json: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("queues.json");
    std::fs::write(&path, json).expect("write queues file");
    (dir, path)
}

/// The error with its causes, as the binary prints it.
fn chain(err: QueuesFileError) -> String {
    format!("{:#}", anyhow::Error::new(err))
}

fn error_of(json: &str) -> (String, PathBuf, tempfile::TempDir) {
    let (dir, path) = file(json);
    let err = load(&path).expect_err("must be refused");
    (chain(err), path, dir)
}

#[test]
fn the_operators_full_definition_becomes_the_same_queue_spec() {
    let (_dir, path) = file(
        r#"[{
          "name": "orders", "partitions": 3, "replicationFactor": 3, "ackTimeoutMs": 30000,
          "maxDeliveries": 5, "deadLetterQueue": "orders-dlq", "messageTtlMs": 86400000,
          "maxBacklogMessages": 10000000, "maxBacklogBytes": 53687091200,
          "overflow": "reject-publish", "priorities": true
        }]"#,
    );
    let definitions = read(&path).expect("reads");
    assert_eq!(definitions[0].replication_factor, 3);
    let specs = load(&path).expect("loads");
    assert_eq!(
        specs,
        vec![QueueSpec {
            name: "orders".into(),
            partitions: 3,
            ack_timeout_ms: 30_000,
            max_deliveries: 5,
            dead_letter_queue: "orders-dlq".into(),
            message_ttl_ms: 86_400_000,
            max_backlog_messages: 10_000_000,
            max_backlog_bytes: 50 << 30,
            overflow: OverflowPolicy::RejectPublish as i32,
            priorities: true,
            dedup_window_ms: 0,
            max_payload_bytes: 0,
        }]
    );
}

#[test]
fn a_hand_written_file_may_leave_out_everything_but_names() {
    let (_dir, path) = file(r#"[{"name": "a"}, {"name": "b", "partitions": 2}]"#);
    let specs = load(&path).expect("loads");
    let names: Vec<_> = specs
        .iter()
        .map(|s| (s.name.as_str(), s.partitions))
        .collect();
    assert_eq!(names, [("a", 0), ("b", 2)]);
    let (_dir, path) = file("[]");
    assert!(load(&path).expect("an empty list is fine").is_empty());
}

#[test]
fn an_unknown_field_is_refused_naming_the_file_queue_and_field() {
    let (err, path, _dir) =
        error_of(r#"[{"name": "ok"}, {"name": "orders", "ackTimeout": "30s"}]"#);
    assert!(err.contains(&*path.to_string_lossy()), "{err}");
    assert!(err.contains("queue [1] \"orders\""), "{err}");
    assert!(err.contains("ackTimeout"), "{err}");
}

#[test]
fn a_mistyped_field_is_refused_naming_the_queue_and_field() {
    let (err, _path, _dir) = error_of(r#"[{"name": "orders", "partitions": -1}]"#);
    assert!(err.contains("queue [0] \"orders\""), "{err}");
    assert!(err.contains("-1"), "{err}");
    let (err, _path, _dir) = error_of(r#"[{"partitions": 2}]"#);
    assert!(err.contains("queue [0]"), "{err}");
    assert!(err.contains("missing field `name`"), "{err}");
}

#[test]
fn bad_values_are_refused_naming_the_queue_and_field() {
    let (err, _path, _dir) = error_of(r#"[{"name": "a", "overflow": "drop-oldest"}]"#);
    assert!(err.contains("queue [0] \"a\": overflow"), "{err}");
    assert!(err.contains("drop-oldest"), "{err}");
    let (err, _path, _dir) = error_of(r#"[{"name": "a"}, {"name": "a"}]"#);
    assert!(err.contains("queue [1] \"a\": name"), "{err}");
    let (err, _path, _dir) = error_of(r#"[{"name": ""}]"#);
    assert!(
        err.contains("queue [0] \"\": name: must not be empty"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_an_array_is_refused_with_its_position() {
    let (err, path, _dir) = error_of("{\"name\": \"orders\"}");
    assert!(err.contains(&*path.to_string_lossy()), "{err}");
    assert!(err.contains("not a JSON array"), "{err}");
    let (err, _path, _dir) = error_of("[{\"name\": \"a\"},\n  oops]");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn a_missing_file_is_refused_naming_the_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("absent.json");
    let err = chain(load(&path).expect_err("absent"));
    assert!(err.contains(&*path.to_string_lossy()), "{err}");
}
