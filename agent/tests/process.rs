//! The agent as a process: crashes, graceful shutdown, flags and unusable data directories.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{AgentProcess, next_within, payload, queue, run_agent, text};
use sluice_client::proto::MessageId;
use sluice_client::{Client, tag};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

/// Confirmed message ids and their payloads, shared by the publisher tasks.
type Ledger = Arc<Mutex<BTreeMap<(u32, u64), String>>>;

/// Publishes up to `frames` frames of 100 from one pipelined publisher, recording every
/// confirmed id; returns the first error (the crash or shutdown ending the stream).
async fn publish_load(
    client: Client,
    name: usize,
    ledger: Ledger,
    frames: usize,
) -> Option<String> {
    use futures::StreamExt;
    let mut publisher = match client.publisher(8).await {
        Ok(p) => p,
        Err(err) => return Some(err.to_string()),
    };
    let mut pending = futures::stream::FuturesOrdered::new();
    let mut error = None;
    for frame in 0..frames {
        let payloads: Vec<String> = (0..100)
            .map(|i| format!("p{name}-{frame:05}-{i:03}"))
            .collect();
        let messages = payloads.iter().map(|p| text(p)).collect();
        match publisher.send("load", messages).await {
            Ok(confirm) => pending.push_back(async move { (payloads, confirm.await) }),
            Err(err) => {
                error = Some(err.to_string());
                break;
            }
        }
        // Collect whatever is already confirmed without waiting for the rest.
        while let Some(Some((payloads, result))) = futures::FutureExt::now_or_never(pending.next())
        {
            if let Err(err) = record(&ledger, payloads, result) {
                error.get_or_insert(err);
            }
        }
    }
    while let Some((payloads, result)) = pending.next().await {
        if let Err(err) = record(&ledger, payloads, result) {
            error.get_or_insert(err);
        }
    }
    error
}

fn record(
    ledger: &Ledger,
    payloads: Vec<String>,
    result: sluice_client::Result<Vec<sluice_client::proto::Confirm>>,
) -> Result<(), String> {
    let confirms = result.map_err(|e| e.to_string())?;
    let mut ledger = ledger.lock().expect("ledger");
    for (confirm, payload) in confirms.into_iter().zip(payloads) {
        if let Some(MessageId { partition, offset }) = confirm.id.filter(|_| confirm.code == 0) {
            ledger.insert((partition, offset), payload);
        }
    }
    Ok(())
}

/// Consumes and acks until the queue is quiet for a while; returns id → payload and counts
/// how often each id was delivered.
async fn drain(client: &Client, queue: &str) -> (BTreeMap<(u32, u64), String>, usize) {
    let mut consumer = client.subscribe(queue, 1000).await.expect("subscribe");
    let mut seen = BTreeMap::new();
    let mut duplicates = 0;
    while let Some(d) = next_within(&mut consumer, Duration::from_secs(3)).await {
        let id = d.id.expect("id");
        if seen
            .insert((id.partition, id.offset), payload(&d))
            .is_some()
        {
            duplicates += 1;
        }
        consumer.ack(tag(&d)).expect("ack");
    }
    assert!(consumer.flush().await.expect("flush").is_empty());
    (seen, duplicates)
}

#[tokio::test]
async fn confirmed_messages_survive_kill_9_under_publish_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut agent = AgentProcess::spawn(&data);
    let client = agent.client().await;
    client
        .declare_queue(queue("load", 2))
        .await
        .expect("declare");

    // Phase 1: some messages consumed and acked before the crash must never come back.
    let acked: Vec<_> = (0..50).map(|i| text(&format!("acked-{i}"))).collect();
    client.publish("load", acked).await.expect("publish");
    let (before, _) = drain(&client, "load").await;
    assert_eq!(before.len(), 50);

    // Phase 2: three pipelined publishers, then SIGKILL mid-flight.
    let ledger: Ledger = Arc::default();
    let publishers: Vec<_> = (0..3)
        .map(|n| tokio::spawn(publish_load(client.clone(), n, ledger.clone(), 100_000)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.kill9();
    let mut errors = Vec::new();
    for p in publishers {
        errors.extend(p.await.expect("publisher task"));
    }
    let confirmed = ledger.lock().expect("ledger").clone();
    assert!(
        !confirmed.is_empty(),
        "some messages were confirmed before the kill"
    );
    assert_eq!(errors.len(), 3, "every publisher saw the crash");

    // Phase 3: restart on the same directory; every confirmed id is there with its payload.
    let agent = AgentProcess::spawn(&data);
    let client = agent.client().await;
    let (after, duplicates) = drain(&client, "load").await;
    let mut missing = 0;
    for (id, body) in &confirmed {
        match after.get(id) {
            Some(found) => assert_eq!(found, body, "id {id:?} holds another message"),
            None => missing += 1,
        }
    }
    let resurrected = after.values().filter(|b| b.starts_with("acked-")).count();
    println!(
        "kill -9: {} confirmed before the crash, {} consumed after restart ({} unconfirmed but \
         durable), {missing} missing, {duplicates} duplicates, {resurrected} acked reappeared",
        confirmed.len(),
        after.len(),
        after.len().saturating_sub(confirmed.len()),
    );
    assert_eq!(missing, 0, "confirmed messages lost");
    assert_eq!(
        duplicates, 0,
        "an id was delivered twice to one draining consumer"
    );
    assert_eq!(resurrected, 0, "acked messages came back");
}

#[tokio::test]
async fn sigterm_drains_in_flight_publishes_and_exits_zero() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut agent = AgentProcess::spawn(&data);
    let client = agent.client().await;
    client
        .declare_queue(queue("load", 2))
        .await
        .expect("declare");

    let ledger: Ledger = Arc::default();
    let publishers: Vec<_> = (0..2)
        .map(|n| tokio::spawn(publish_load(client.clone(), n, ledger.clone(), 100_000)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    agent.sigterm();
    let status = agent.wait_exit(Duration::from_secs(30)).await;
    drop(agent);
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
    for p in publishers {
        // A clean end: the stream closed or the agent said it is unavailable; never a
        // half-written or internal failure.
        if let Some(err) = p.await.expect("publisher task") {
            assert!(
                err.contains("closed") || err.contains("UNAVAILABLE") || err.contains("CANCELLED"),
                "unclean publisher error: {err}"
            );
        }
    }

    let confirmed = ledger.lock().expect("ledger").clone();
    let agent = AgentProcess::spawn(&data);
    let (after, _) = drain(&agent.client().await, "load").await;
    let missing = confirmed
        .keys()
        .filter(|id| !after.contains_key(id))
        .count();
    println!(
        "SIGTERM: {} confirmed, {} after restart, {missing} missing",
        confirmed.len(),
        after.len()
    );
    assert_eq!(missing, 0);
}

#[test]
fn invalid_flags_exit_2_naming_the_flag() {
    for (flag, value) in [
        ("--fsync", "sometimes"),
        ("--listen", "nowhere"),
        ("--segment-bytes", "tiny"),
    ] {
        let output = run_agent(&["broker", "--data-dir", "/tmp/unused", flag, value]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains(flag), "{flag} not named: {stderr}");
    }
    let output = run_agent(&["serve"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn an_unusable_data_dir_fails_with_one_line_naming_the_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A regular file where the directory should be: unusable even for root.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    for data_dir in [file.clone(), file.join("below")] {
        let err = AgentProcess::try_spawn(&data_dir)
            .err()
            .expect("must not start");
        assert!(
            err.contains(&*data_dir.to_string_lossy()),
            "path not named: {err}"
        );
        assert!(!err.contains("panicked"), "panicked: {err}");
        assert!(
            !err.contains("status Some(0)"),
            "exit code must be non-zero: {err}"
        );
    }
}

#[tokio::test]
async fn a_corrupted_segment_is_reported_precisely_and_nothing_panics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut agent = AgentProcess::spawn(&data);
    let client = agent.client().await;
    client
        .declare_queue(queue("fragile", 1))
        .await
        .expect("declare");
    let messages = (0..200)
        .map(|i| text(&format!("message number {i:04} with some padding")))
        .collect();
    client.publish("fragile", messages).await.expect("publish");
    agent.sigterm();
    assert_eq!(agent.wait_exit(WAIT).await.code(), Some(0));
    drop(agent);

    // Flip a byte in the middle of the partition's first segment (not a torn tail).
    let partition = data.join("queues/fragile/p-0000");
    let segment = std::fs::read_dir(&partition)
        .expect("partition dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .min()
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read segment");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&segment, bytes).expect("write segment");
    let name = segment
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();

    match AgentProcess::try_spawn(&data) {
        // Either the agent refuses to start, naming the file...
        Err(err) => {
            assert!(err.contains(&name), "segment not named: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
        // ...or it keeps the partition offline and says so on use.
        Ok(agent) => {
            let client = agent.client().await;
            let err = client
                .publish("fragile", vec![text("more")])
                .await
                .expect_err("offline");
            assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
            assert!(err.to_string().contains(&name), "segment not named: {err}");
        }
    }
}

#[test]
fn cluster_flags_that_do_not_fit_together_exit_2_naming_the_flag() {
    for (flag, args) in [
        (
            "--peers",
            &["--pod-name", "s-0", "--peers", "a:7071,nohost"][..],
        ),
        (
            "--pod-name",
            &["--pod-name", "sluice", "--peers", "a:7071"][..],
        ),
        ("--pod-name", &["--peers", "a:7071"][..]),
        (
            "--replication-factor",
            &[
                "--pod-name",
                "s-0",
                "--peers",
                "a:7071,b:7071",
                "--replication-factor",
                "3",
            ][..],
        ),
    ] {
        let output = run_agent(&[&["broker", "--data-dir", "/tmp/unused"][..], args].concat());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?}: {flag} not named: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn cluster_flags_from_the_environment_are_checked_like_flags() {
    let output = std::process::Command::new(common::agent_bin())
        .args(["broker", "--data-dir", "/tmp/unused"])
        .env("SLUICE_POD_NAME", "sluice-0")
        .env("SLUICE_PEERS", "sluice-0.peers:7071,sluice-1.peers")
        .output()
        .expect("the agent binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--peers[1]"), "{stderr}");
    assert!(stderr.contains("sluice-1.peers"), "{stderr}");
}

/// Writes a queue definitions file as the operator's ConfigMap holds it.
fn queues_file(dir: &std::path::Path, json: &str) -> std::path::PathBuf {
    let path = dir.join("queues.json");
    std::fs::write(&path, json).expect("write queues file");
    path
}

const OPERATOR_QUEUES: &str = r#"[
  {
    "name": "orders",
    "partitions": 3,
    "replicationFactor": 1,
    "ackTimeoutMs": 30000,
    "maxDeliveries": 5,
    "deadLetterQueue": "orders-dlq",
    "messageTtlMs": 86400000,
    "maxBacklogMessages": 1000,
    "maxBacklogBytes": 1048576,
    "overflow": "reject-publish",
    "priorities": true
  },
  {
    "name": "orders-dlq",
    "partitions": 1,
    "replicationFactor": 1,
    "ackTimeoutMs": 0,
    "maxDeliveries": 0,
    "deadLetterQueue": "",
    "messageTtlMs": 0,
    "maxBacklogMessages": 0,
    "maxBacklogBytes": 0,
    "overflow": "reject-publish",
    "priorities": false
  }
]"#;

#[tokio::test]
async fn queues_of_the_queues_file_exist_when_the_agent_starts_and_after_restarts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let file = queues_file(dir.path(), OPERATOR_QUEUES);
    let env = [("SLUICE_QUEUES_FILE", file.as_os_str())];

    // The queues are created before the agent announces itself, and declared again (a no-op)
    // on a restart.
    for start in ["first", "restart"] {
        let agent = AgentProcess::try_spawn_with_env(&data, &env)
            .unwrap_or_else(|e| panic!("{start}: agent did not start: {e}"));
        let queues = agent.client().await.list_queues().await.expect("list");
        let orders = queues
            .iter()
            .find(|q| q.name == "orders")
            .unwrap_or_else(|| panic!("{start}: no orders queue in {queues:?}"));
        assert_eq!(orders.partitions, 3, "{start}");
        assert_eq!(orders.ack_timeout_ms, 30_000, "{start}");
        assert_eq!(orders.max_deliveries, 5, "{start}");
        assert_eq!(orders.dead_letter_queue, "orders-dlq", "{start}");
        assert_eq!(orders.message_ttl_ms, 86_400_000, "{start}");
        assert_eq!(orders.max_backlog_messages, 1000, "{start}");
        assert_eq!(orders.max_backlog_bytes, 1 << 20, "{start}");
        assert!(orders.priorities, "{start}");
        assert!(queues.iter().any(|q| q.name == "orders-dlq"), "{start}");
        // A kill, not SIGTERM: the agent installs its SIGTERM handler only once it serves,
        // a moment after its listening line, and this test is faster than that.
        drop(agent);
    }

    // A changed definition of an existing queue does not take the agent down: the queue
    // keeps the settings it has.
    queues_file(
        dir.path(),
        &OPERATOR_QUEUES.replace("\"partitions\": 3", "\"partitions\": 4"),
    );
    let agent = AgentProcess::try_spawn_with_env(&data, &env).expect("starts with a changed file");
    let queues = agent.client().await.list_queues().await.expect("list");
    let orders = queues.iter().find(|q| q.name == "orders").expect("orders");
    assert_eq!(orders.partitions, 3);
}

#[test]
fn a_bad_queues_file_stops_startup_naming_the_file_the_queue_and_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let cases = [
        // A field the agent does not know: the operator and agent disagree.
        (
            r#"[{"name": "orders"}, {"name": "billing", "ackTimeout": "30s"}]"#,
            "queue [1] \"billing\"",
            "ackTimeout",
        ),
        // A value the broker refuses when it declares the queue.
        (
            r#"[{"name": "orders", "partitions": 100000}]"#,
            "queue \"orders\"",
            "partitions",
        ),
    ];
    for (json, queue, field) in cases {
        let file = queues_file(dir.path(), json);
        let err =
            AgentProcess::try_spawn_with_env(&data, &[("SLUICE_QUEUES_FILE", file.as_os_str())])
                .err()
                .expect("must not start");
        assert!(
            err.contains(&*file.to_string_lossy()),
            "file not named: {err}"
        );
        assert!(err.contains(queue), "queue not named: {err}");
        assert!(err.contains(field), "field not named: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("status Some(0)"), "{err}");
    }
    let missing = dir.path().join("absent.json");
    let err =
        AgentProcess::try_spawn_with_env(&data, &[("SLUICE_QUEUES_FILE", missing.as_os_str())])
            .err()
            .expect("must not start");
    assert!(
        err.contains(&*missing.to_string_lossy()),
        "file not named: {err}"
    );
}

/// The soft and hard open-files limits of process `pid`, from `/proc/<pid>/limits`.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open-files line");
    let mut fields = line.split_whitespace().skip(3);
    let soft = fields.next().expect("soft").to_owned();
    let hard = fields.next().expect("hard").to_owned();
    (soft, hard)
}

#[test]
fn the_agent_raises_its_open_files_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Started from a shell whose soft limit is low, as many hosts' login shells are.
    let script = format!(
        "ulimit -Sn 256 && exec {} broker --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
         --data-dir {} --log-level warn",
        common::agent_bin(),
        dir.path().join("data").display()
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut first,
    )
    .expect("listening line");
    assert!(first.starts_with("sluice-agent listening"), "{first:?}");
    let (soft, hard) = open_files_limits(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_ne!(soft, "256", "the soft limit was left low");
    assert_eq!(soft, hard);
}
