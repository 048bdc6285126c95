//! `Broker` against the real `FileLog` on temporary directories: restarts, corruption, the
//! directory lock, bad input, deep backlogs and segment purging.

use std::sync::Arc;

use sluice_agent::broker::{
    Broker, BrokerConfig, BrokerError, BrokerOptions, FileLogOpener, Subscription,
};
use sluice_agent::config::{FsyncPolicy, LogConfig};
// Per-message outcomes are checked as a client sees them, through the gRPC edge.
use sluice_agent::grpc::status;
use sluice_agent::queue::clock::ManualClock;
use sluice_proto::v1::{Delivery, DeliveryTag, Message, QueueSpec, Settle, SettleAction, Stats};

const T0: u64 = 1_700_000_000_000;

fn log_config() -> LogConfig {
    // Small segments so purging is observable; fsync on, as in production.
    LogConfig {
        segment_bytes: 64 * 1024,
        fsync: FsyncPolicy::Always,
    }
}

async fn open(dir: &std::path::Path, clock: &Arc<ManualClock>) -> Result<Arc<Broker>, BrokerError> {
    let config = BrokerConfig {
        data_dir: dir.to_path_buf(),
        log: log_config(),
    };
    let options = BrokerOptions {
        clock: clock.clone(),
        logs: Arc::new(FileLogOpener {
            config: log_config(),
        }),
        timers: false,
        cluster: None,
    };
    Broker::open_with(config, options).await
}

fn spec(name: &str, partitions: u32) -> QueueSpec {
    QueueSpec {
        name: name.into(),
        partitions,
        ack_timeout_ms: 1_000,
        ..QueueSpec::default()
    }
}

fn text(s: &str) -> Message {
    Message {
        payload: s.as_bytes().to_vec(),
        ..Message::default()
    }
}

fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.message.as_ref().expect("message").payload).into_owned()
}

fn tag(d: &Delivery) -> DeliveryTag {
    d.tag.expect("tag")
}

/// The queue's summed counters.
fn totals(broker: &Broker, queue: &str) -> Stats {
    broker.stats(queue).expect("stats").total.expect("total")
}

fn drain(sub: &mut Subscription) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Some(d) = sub.try_next().expect("take") {
        out.push(d);
    }
    out
}

fn ack(tags: Vec<DeliveryTag>) -> Settle {
    Settle {
        action: SettleAction::Ack as i32,
        tags,
        delay_ms: 0,
    }
}

#[tokio::test]
async fn after_a_restart_acked_messages_stay_gone_and_unacked_ones_come_back_with_their_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    {
        let broker = open(dir.path(), &clock).await.expect("open");
        broker.declare(spec("orders", 1)).await.expect("declare");
        let msgs = ["a", "b", "c", "d"].map(text).to_vec();
        let confirms = broker
            .publish("orders", msgs)
            .await
            .map(status::confirms)
            .expect("publish");
        assert!(confirms.iter().all(|c| c.code == 0));
        let mut sub = broker
            .subscribe("orders", 10, "t")
            .await
            .expect("subscribe");
        let got = drain(&mut sub);
        assert_eq!(
            got.iter().map(body).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
        let failures = sub
            .settle(ack(vec![tag(&got[0]), tag(&got[2])]))
            .await
            .expect("ack");
        assert!(failures.is_empty());
        drop(sub);
        broker.shutdown().await;
    }
    let broker = open(dir.path(), &clock).await.expect("reopen");
    let mut sub = broker
        .subscribe("orders", 10, "t")
        .await
        .expect("subscribe");
    let got = drain(&mut sub);
    let seen: Vec<(String, u32)> = got.iter().map(|d| (body(d), d.attempt)).collect();
    assert_eq!(seen, [("b".to_owned(), 2), ("d".to_owned(), 2)]);
}

#[tokio::test]
async fn a_corrupted_segment_takes_only_its_queue_offline_naming_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    {
        let broker = open(dir.path(), &clock).await.expect("open");
        broker.declare(spec("bad", 1)).await.expect("declare");
        broker.declare(spec("good", 1)).await.expect("declare");
        for q in ["bad", "good"] {
            let msgs = (0..20)
                .map(|i| text(&format!("message number {i}")))
                .collect();
            broker.publish(q, msgs).await.expect("publish");
        }
        broker.shutdown().await;
    }
    let segment_dir = dir.path().join("queues/bad/p-0000");
    let segment = std::fs::read_dir(&segment_dir)
        .expect("partition dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read segment");
    // Flip a bit inside an early record (not the tail, which recovery may legally cut).
    bytes[40] ^= 0x10;
    std::fs::write(&segment, bytes).expect("write segment");

    let broker = open(dir.path(), &clock)
        .await
        .expect("the agent still starts");
    let err = broker
        .publish("bad", vec![text("x")])
        .await
        .expect_err("offline");
    assert_eq!(status::code(&err), tonic::Code::FailedPrecondition);
    let message = err.to_string();
    assert!(
        message.contains(
            &segment
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned()
        ),
        "{message}"
    );
    assert!(message.contains("offset"), "{message}");
    assert!(broker.subscribe("bad", 1, "t").await.is_err());
    let confirms = broker
        .publish("good", vec![text("y")])
        .await
        .map(status::confirms)
        .expect("the other queue works");
    assert_eq!(confirms[0].code, 0);
    assert_eq!(totals(&broker, "good").ready, 21);
}

#[tokio::test]
async fn a_second_broker_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let _first = open(dir.path(), &clock).await.expect("open");
    let err = open(dir.path(), &clock).await.err().expect("locked");
    assert_eq!(status::code(&err), tonic::Code::FailedPrecondition);
    assert!(err.to_string().contains("LOCK"), "{err}");
}

#[tokio::test]
async fn bad_specs_and_messages_are_refused_by_field_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let broker = open(dir.path(), &clock).await.expect("open");
    let bad = QueueSpec {
        name: "q".into(),
        ack_timeout_ms: 5,
        ..QueueSpec::default()
    };
    match broker.declare(bad).await {
        Err(BrokerError::InvalidArgument { field, .. }) => {
            assert_eq!(field, "queue.ack_timeout_ms")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert!(broker.list().is_empty(), "nothing was created");

    let (effective, created) = broker.declare(spec("q", 2)).await.expect("declare");
    assert!(created);
    assert_eq!(
        effective.max_payload_bytes,
        1024 * 1024,
        "defaults are filled in"
    );
    let again = broker
        .declare(spec("q", 2))
        .await
        .expect("identical re-declare");
    assert!(!again.1);
    let err = broker.declare(spec("q", 3)).await.expect_err("different");
    assert!(err.to_string().contains("queue.partitions"), "{err}");

    let msgs = vec![
        text("ok"),
        Message {
            priority: 3,
            ..text("p")
        },
        Message {
            payload: vec![0; 2 << 20],
            ..text("")
        },
    ];
    let confirms = broker
        .publish("q", msgs)
        .await
        .map(status::confirms)
        .expect("publish");
    assert_eq!(confirms[0].code, 0);
    assert_eq!(confirms[1].code, tonic::Code::InvalidArgument as i32);
    assert!(
        confirms[1].error.starts_with("messages[1].priority"),
        "{}",
        confirms[1].error
    );
    assert_eq!(confirms[2].code, tonic::Code::ResourceExhausted as i32);
    assert_eq!(totals(&broker, "q").ready, 1, "only the good one");

    let err = broker
        .publish("nope", vec![text("x")])
        .await
        .expect_err("unknown");
    assert_eq!(status::code(&err), tonic::Code::NotFound);
    let bogus = DeliveryTag {
        partition: 0,
        offset: 999,
        attempt: 1,
    };
    let failures = broker
        .settle("q", ack(vec![bogus]))
        .await
        .map(status::settle_outcomes)
        .expect("settle");
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].code, tonic::Code::FailedPrecondition as i32);
}

#[tokio::test]
async fn idempotency_keys_confirm_duplicates_with_the_first_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let broker = open(dir.path(), &clock).await.expect("open");
    broker.declare(spec("q", 3)).await.expect("declare");
    let keyed = |k: &str| Message {
        idempotency_key: k.into(),
        ..text(k)
    };
    let first = broker
        .publish("q", vec![keyed("k1"), keyed("k1")])
        .await
        .map(status::confirms)
        .expect("publish");
    assert!(!first[0].duplicate && first[1].duplicate);
    assert_eq!(first[0].id, first[1].id);
    let again = broker
        .publish("q", vec![keyed("k1")])
        .await
        .map(status::confirms)
        .expect("publish");
    assert!(again[0].duplicate);
    assert_eq!(again[0].id, first[0].id);
    assert_eq!(totals(&broker, "q").ready, 1);
}

#[tokio::test]
async fn max_deliveries_moves_the_message_to_a_consumable_dead_letter_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let broker = open(dir.path(), &clock).await.expect("open");
    let spec = QueueSpec {
        max_deliveries: 2,
        dead_letter_queue: "dlq".into(),
        ..spec("work", 1)
    };
    broker.declare(spec).await.expect("declare");
    assert!(
        broker.list().iter().any(|s| s.name == "dlq"),
        "the DLQ was created"
    );
    broker
        .publish("work", vec![text("poison")])
        .await
        .expect("publish");
    let mut sub = broker.subscribe("work", 10, "t").await.expect("subscribe");
    for attempt in 1..=2 {
        let d = sub.try_next().expect("take").expect("a delivery");
        assert_eq!(d.attempt, attempt);
        let nack = Settle {
            action: SettleAction::Nack as i32,
            tags: vec![tag(&d)],
            delay_ms: 0,
        };
        assert!(sub.settle(nack).await.expect("nack").is_empty());
    }
    assert!(sub.try_next().expect("take").is_none(), "no third delivery");
    let mut dlq = broker
        .subscribe("dlq", 10, "t")
        .await
        .expect("subscribe dlq");
    let d = dlq.try_next().expect("take").expect("dead-lettered copy");
    assert_eq!(body(&d), "poison");
    assert_eq!(
        (d.dead_letter_source.as_str(), d.dead_letter_reason.as_str()),
        ("work", "max-deliveries")
    );
    let stats = totals(&broker, "work");
    assert_eq!(
        (stats.dead_lettered, stats.ready, stats.in_flight),
        (1, 0, 0)
    );
}

#[tokio::test]
async fn a_5000_message_backlog_survives_a_restart_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    {
        let broker = open(dir.path(), &clock).await.expect("open");
        broker.declare(spec("deep", 1)).await.expect("declare");
        for batch in 0..5 {
            let msgs = (0..1000)
                .map(|i| text(&format!("{:05}", batch * 1000 + i)))
                .collect();
            broker.publish("deep", msgs).await.expect("publish");
        }
        broker.shutdown().await;
    }
    let broker = open(dir.path(), &clock).await.expect("reopen");
    assert_eq!(totals(&broker, "deep").ready, 5000);
    let mut sub = broker
        .subscribe("deep", 10_000, "t")
        .await
        .expect("subscribe");
    let got = drain(&mut sub);
    let bodies: Vec<String> = got.iter().map(body).collect();
    let expected: Vec<String> = (0..5000).map(|i| format!("{i:05}")).collect();
    assert_eq!(bodies, expected);
}

#[tokio::test]
async fn segments_are_deleted_once_their_messages_are_acked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let broker = open(dir.path(), &clock).await.expect("open");
    broker.declare(spec("q", 1)).await.expect("declare");
    let payload = "x".repeat(1000);
    for _ in 0..4 {
        broker
            .publish("q", (0..100).map(|_| text(&payload)).collect())
            .await
            .expect("publish");
    }
    let segments = || {
        std::fs::read_dir(dir.path().join("queues/q/p-0000"))
            .expect("dir")
            .count()
    };
    let before = segments();
    assert!(before > 3, "400 KB in 64 KiB segments: {before}");
    let mut sub = broker.subscribe("q", 1000, "t").await.expect("subscribe");
    let got = drain(&mut sub);
    assert_eq!(got.len(), 400);
    sub.settle(ack(got.iter().map(tag).collect()))
        .await
        .expect("ack");
    broker.tick().await;
    let after = segments();
    assert!(
        after < before && after <= 2,
        "before {before}, after {after}"
    );
    assert_eq!(totals(&broker, "q").bytes, 0);
}

#[tokio::test]
async fn an_unacked_delivery_is_redelivered_after_the_ack_timeout_and_on_disconnect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let broker = open(dir.path(), &clock).await.expect("open");
    broker.declare(spec("q", 1)).await.expect("declare");
    broker.publish("q", vec![text("a")]).await.expect("publish");
    let mut one = broker.subscribe("q", 10, "one").await.expect("subscribe");
    let first = one.try_next().expect("take").expect("delivery");
    clock.advance(1_000);
    broker.tick().await;
    let mut two = broker.subscribe("q", 10, "two").await.expect("subscribe");
    let second = two.try_next().expect("take").expect("redelivery");
    assert_eq!((body(&second), second.attempt), ("a".to_owned(), 2));
    let stale = one.settle(ack(vec![tag(&first)])).await.expect("settle");
    assert_eq!(stale.len(), 1, "the first attempt's tag is stale");
    drop(two);
    let third = one
        .try_next()
        .expect("take")
        .expect("redelivered on disconnect");
    assert_eq!(third.attempt, 3);
}
