//! The public gRPC API of a real `sluice-agent` process, through `sluice-client`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use common::{AgentProcess, http_get, next_within, payload, queue, text};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sluice_client::proto::consume_request::Request as Frame;
use sluice_client::proto::{ConsumeRequest, DeliveryTag, Message, QueueSpec, Settle, SettleAction};
use sluice_client::tag;
use tonic::Code;

const QUIET: Duration = Duration::from_millis(300);
const WAIT: Duration = Duration::from_secs(10);

fn agent() -> (tempfile::TempDir, AgentProcess) {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = AgentProcess::spawn(&dir.path().join("data"));
    (dir, agent)
}

#[tokio::test]
async fn published_messages_are_delivered_and_acked_exactly_once() {
    let (_dir, agent) = agent();
    let client = agent.client().await;
    client
        .declare_queue(queue("orders", 1))
        .await
        .expect("declare");

    let confirms = client
        .publish("orders", vec![text("a"), text("b"), text("c")])
        .await
        .expect("publish");
    assert_eq!(confirms.len(), 3);
    assert!(confirms.iter().all(|c| c.id.is_some() && c.code == 0));

    let mut consumer = client.subscribe("orders", 10).await.expect("subscribe");
    let mut got = Vec::new();
    for _ in 0..3 {
        let delivery = next_within(&mut consumer, WAIT).await.expect("a delivery");
        assert_eq!(delivery.attempt, 1);
        got.push(payload(&delivery));
        consumer.ack(tag(&delivery)).expect("ack queued");
    }
    assert_eq!(got, ["a", "b", "c"]);
    assert!(
        consumer.flush().await.expect("flush").is_empty(),
        "no ack failed"
    );
    drop(consumer);

    // Acked messages are gone: a new consumer gets nothing and the counters are zero.
    let mut again = client
        .subscribe("orders", 10)
        .await
        .expect("subscribe again");
    assert!(next_within(&mut again, QUIET).await.is_none());
    let stats = client
        .stats("orders")
        .await
        .expect("stats")
        .total
        .unwrap_or_default();
    assert_eq!((stats.ready, stats.in_flight), (0, 0));
}

#[tokio::test]
async fn a_pipelined_stream_of_100k_messages_is_confirmed_and_consumed_fifo_per_partition() {
    const FRAMES: usize = 100;
    const PER_FRAME: usize = 1000;
    let (_dir, agent) = agent();
    let client = agent.client().await;
    client
        .declare_queue(queue("bulk", 4))
        .await
        .expect("declare");

    // Publish: 100 frames of 1000 pipelined through a window of 16.
    let started = Instant::now();
    let mut publisher = client.publisher(16).await.expect("publisher");
    let mut pending = FuturesOrdered::new();
    for frame in 0..FRAMES {
        let messages = (0..PER_FRAME)
            .map(|i| text(&format!("{:06}", frame * PER_FRAME + i)))
            .collect::<Vec<_>>();
        pending.push_back(publisher.send("bulk", messages).await.expect("send frame"));
    }
    let mut confirmed = 0;
    while let Some(confirms) = pending.next().await {
        let confirms = confirms.expect("frame confirmed");
        sluice_client::client::check_confirms(&confirms).expect("every message confirmed");
        confirmed += confirms.len();
    }
    publisher.close().await.expect("clean close");
    assert_eq!(confirmed, FRAMES * PER_FRAME);
    println!("published {confirmed} messages in {:?}", started.elapsed());

    // Consume everything: per partition, offsets and publish order only ever increase.
    let mut consumer = client.subscribe("bulk", 2000).await.expect("subscribe");
    let mut last: BTreeMap<u32, (u64, String)> = BTreeMap::new();
    let mut seen = HashSet::new();
    while seen.len() < FRAMES * PER_FRAME {
        let delivery = next_within(&mut consumer, WAIT)
            .await
            .expect("more deliveries");
        let id = delivery.id.expect("id");
        let body = payload(&delivery);
        if let Some((offset, previous)) = last.get(&id.partition) {
            assert!(
                id.offset > *offset,
                "partition {} went back to {}",
                id.partition,
                id.offset
            );
            assert!(
                body > *previous,
                "partition {} reordered {body} after {previous}",
                id.partition
            );
        }
        last.insert(id.partition, (id.offset, body.clone()));
        assert!(seen.insert(body), "first deliveries are not duplicated");
        consumer.ack(tag(&delivery)).expect("ack");
    }
    assert!(consumer.flush().await.expect("flush").is_empty());
    assert_eq!(last.len(), 4, "round-robin used every partition");
}

#[tokio::test]
async fn competing_consumers_share_the_load() {
    let (_dir, agent) = agent();
    let client = agent.client().await;
    client
        .declare_queue(queue("shared", 2))
        .await
        .expect("declare");
    let messages = (0..200).map(|i| text(&i.to_string())).collect();
    client.publish("shared", messages).await.expect("publish");

    let total = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let mut consumer = client.subscribe("shared", 5).await.expect("subscribe");
        let total = total.clone();
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while total.load(std::sync::atomic::Ordering::SeqCst) < 200 {
                let Some(delivery) = next_within(&mut consumer, QUIET).await else {
                    continue;
                };
                tokio::time::sleep(Duration::from_millis(2)).await; // "work"
                mine.push(payload(&delivery));
                consumer.ack(tag(&delivery)).expect("ack");
                total.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            consumer.flush().await.expect("flush");
            mine
        }));
    }
    let mut all = HashSet::new();
    for worker in workers {
        let mine = tokio::time::timeout(Duration::from_secs(60), worker)
            .await
            .expect("workers finish")
            .expect("worker ok");
        assert!(!mine.is_empty(), "each consumer got a share");
        all.extend(mine);
    }
    assert_eq!(all.len(), 200, "every message consumed once");
}

#[tokio::test]
async fn a_disconnected_consumers_deliveries_are_redelivered_to_another() {
    let (_dir, agent) = agent();
    let client = agent.client().await;
    client
        .declare_queue(queue("handoff", 1))
        .await
        .expect("declare");
    client
        .publish("handoff", vec![text("x"), text("y")])
        .await
        .expect("publish");

    let mut first = client.subscribe("handoff", 10).await.expect("subscribe");
    for _ in 0..2 {
        next_within(&mut first, WAIT)
            .await
            .expect("delivered to the first consumer");
    }
    drop(first); // Gone without acking.

    let mut second = client.subscribe("handoff", 10).await.expect("subscribe");
    let mut got = Vec::new();
    for _ in 0..2 {
        let delivery = next_within(&mut second, WAIT).await.expect("redelivered");
        assert_eq!(delivery.attempt, 2);
        got.push(payload(&delivery));
        second.ack(tag(&delivery)).expect("ack");
    }
    got.sort();
    assert_eq!(got, ["x", "y"]);
    assert!(second.flush().await.expect("flush").is_empty());
}

#[tokio::test]
async fn nack_delay_reject_and_max_deliveries_route_messages_as_asked() {
    let (_dir, agent) = agent();
    let client = agent.client().await;
    let spec = QueueSpec {
        max_deliveries: 2,
        dead_letter_queue: "work-dlq".into(),
        ..queue("work", 1)
    };
    client.declare_queue(spec).await.expect("declare");
    let mut consumer = client.subscribe("work", 10).await.expect("subscribe");

    // Nack: redelivered at once as attempt 2.
    client
        .publish("work", vec![text("nacked")])
        .await
        .expect("publish");
    let d = next_within(&mut consumer, WAIT).await.expect("delivery");
    consumer.nack(tag(&d), Duration::ZERO).expect("nack");
    let d = next_within(&mut consumer, WAIT).await.expect("redelivery");
    assert_eq!((payload(&d).as_str(), d.attempt), ("nacked", 2));
    consumer.ack(tag(&d)).expect("ack");

    // Nack with a delay: nothing until the delay has passed.
    client
        .publish("work", vec![text("later")])
        .await
        .expect("publish");
    let d = next_within(&mut consumer, WAIT).await.expect("delivery");
    let nacked_at = Instant::now();
    consumer
        .nack(tag(&d), Duration::from_millis(700))
        .expect("nack");
    consumer.flush().await.expect("flush");
    let d = next_within(&mut consumer, WAIT)
        .await
        .expect("delayed redelivery");
    assert!(
        nacked_at.elapsed() >= Duration::from_millis(600),
        "came back too early"
    );
    assert_eq!(payload(&d), "later");
    consumer.ack(tag(&d)).expect("ack");

    // A publish delay holds the first delivery back too.
    let delayed = Message {
        delay_ms: 500,
        ..text("delayed")
    };
    let published_at = Instant::now();
    client
        .publish("work", vec![delayed])
        .await
        .expect("publish");
    let d = next_within(&mut consumer, WAIT)
        .await
        .expect("delayed delivery");
    assert!(published_at.elapsed() >= Duration::from_millis(400));
    consumer.ack(tag(&d)).expect("ack");

    // Reject: straight to the dead-letter queue.
    client
        .publish("work", vec![text("bad")])
        .await
        .expect("publish");
    let d = next_within(&mut consumer, WAIT).await.expect("delivery");
    consumer.reject(tag(&d)).expect("reject");

    // Over max deliveries: dead-lettered after the second nack.
    client
        .publish("work", vec![text("poison")])
        .await
        .expect("publish");
    for attempt in 1..=2 {
        let d = next_within(&mut consumer, WAIT).await.expect("delivery");
        assert_eq!((payload(&d).as_str(), d.attempt), ("poison", attempt));
        consumer.nack(tag(&d), Duration::ZERO).expect("nack");
    }
    assert!(consumer.flush().await.expect("flush").is_empty());
    assert!(
        next_within(&mut consumer, QUIET).await.is_none(),
        "poison is not delivered again"
    );

    let mut dlq = client
        .subscribe("work-dlq", 10)
        .await
        .expect("the DLQ is a queue");
    let mut reasons = BTreeMap::new();
    for _ in 0..2 {
        let d = next_within(&mut dlq, WAIT).await.expect("dead letter");
        assert_eq!(d.dead_letter_source, "work");
        reasons.insert(payload(&d), d.dead_letter_reason.clone());
        dlq.ack(tag(&d)).expect("ack");
    }
    assert_eq!(reasons.get("bad").map(String::as_str), Some("rejected"));
    assert_eq!(
        reasons.get("poison").map(String::as_str),
        Some("max-deliveries")
    );
    assert!(dlq.flush().await.expect("flush").is_empty());
}

#[tokio::test]
async fn health_is_serving_and_reflection_lists_the_services() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (_dir, agent) = agent();
    let channel = tonic::transport::Endpoint::from_shared(agent.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");

    let mut health = HealthClient::new(channel.clone());
    for service in [
        "",
        "sluice.v1.Publisher",
        "sluice.v1.Consumer",
        "sluice.v1.Admin",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: HashSet<_> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "sluice.v1.Admin",
        "sluice.v1.Publisher",
        "sluice.v1.Consumer",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(service), "{service} missing from {names:?}");
    }
}

#[tokio::test]
async fn metrics_and_healthz_are_served_over_http() {
    let (_dir, agent) = agent();
    let client = agent.client().await;
    client
        .declare_queue(queue("metered", 1))
        .await
        .expect("declare");
    client
        .publish("metered", vec![text("1"), text("2")])
        .await
        .expect("publish");

    let (status, body) = http_get(agent.metrics, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = http_get(agent.metrics, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("sluice_published_messages_total 2"), "{body}");
    assert!(
        body.contains("sluice_queue_ready_messages{queue=\"metered\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("sluice_rpc_duration_seconds_bucket{"),
        "{body}"
    );
}

#[tokio::test]
async fn bad_requests_get_precise_statuses_and_change_nothing() {
    let (_dir, agent) = agent();
    let client = agent.client().await;
    let spec = QueueSpec {
        max_payload_bytes: 1024,
        ..queue("strict", 1)
    };
    client.declare_queue(spec).await.expect("declare");

    // Queue names.
    for name in ["", "Bad Name!"] {
        let err = client
            .declare_queue(queue(name, 1))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{name:?}: {err}");
        assert!(err.to_string().contains("queue.name"), "{err}");
    }
    // Unknown queue.
    let err = client
        .publish("nope", vec![text("x")])
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    let err = client.subscribe("nope", 1).await.expect_err("refused");
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    // Oversize payload: that message fails, its neighbour is confirmed.
    let big = Message {
        payload: vec![7u8; 2048],
        ..Default::default()
    };
    let confirms = client
        .publish_confirms("strict", vec![big])
        .await
        .expect("answered");
    assert_eq!(
        confirms[0].code,
        Code::ResourceExhausted as i32,
        "{:?}",
        confirms[0]
    );
    // Too many messages in one batch.
    let many = (0..10_001).map(|_| text("m")).collect();
    let err = client.publish("strict", many).await.expect_err("refused");
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("messages"), "{err}");
    // Unknown tag.
    let unknown = DeliveryTag {
        partition: 0,
        offset: 999,
        attempt: 1,
    };
    let failures = client
        .settle("strict", SettleAction::Ack, vec![unknown], 0)
        .await
        .expect("answered");
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].code, Code::FailedPrecondition as i32);
    // Consume without subscribing first.
    let (_, _, mut raw) = client.raw();
    let settle_first = ConsumeRequest {
        sequence: 1,
        request: Some(Frame::Settle(Settle {
            action: SettleAction::Ack as i32,
            tags: vec![],
            delay_ms: 0,
        })),
    };
    let status = raw
        .consume(tokio_stream::iter([settle_first]))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("request.subscribe"),
        "{}",
        status.message()
    );

    // Nothing changed: one queue, empty.
    let names: Vec<_> = client
        .list_queues()
        .await
        .expect("list")
        .into_iter()
        .map(|q| q.name)
        .collect();
    assert_eq!(names, ["strict"]);
    let total = client
        .stats("strict")
        .await
        .expect("stats")
        .total
        .unwrap_or_default();
    assert_eq!((total.ready, total.in_flight, total.bytes), (0, 0, 0));

    // A stale tag: the first attempt's tag after a redelivery.
    client
        .publish("strict", vec![text("once")])
        .await
        .expect("publish");
    let mut consumer = client.subscribe("strict", 10).await.expect("subscribe");
    let first = next_within(&mut consumer, WAIT).await.expect("delivery");
    consumer.nack(tag(&first), Duration::ZERO).expect("nack");
    let second = next_within(&mut consumer, WAIT).await.expect("redelivery");
    consumer.ack(tag(&first)).expect("queued");
    let failures = consumer.flush().await.expect("flush");
    assert_eq!(failures.len(), 1, "the stale ack fails");
    assert_eq!(failures[0].code, Code::FailedPrecondition as i32);
    consumer.ack(tag(&second)).expect("ack");
    assert!(
        consumer.flush().await.expect("flush").is_empty(),
        "the current tag still acks"
    );
}

#[tokio::test]
async fn reflection_answers_the_v1alpha_protocol_too() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    let (_dir, agent) = agent();
    let channel = tonic::transport::Endpoint::from_shared(agent.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha reflection is served")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: HashSet<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains("sluice.v1.Publisher"), "{names:?}");
}

#[tokio::test]
async fn malformed_queue_names_are_refused_on_every_call_naming_the_field() {
    let (_dir, agent) = agent();
    let client = agent.client().await;
    for name in ["", "Bad Name"] {
        let checks = [
            (
                "publish",
                "queue",
                client.publish(name, vec![text("x")]).await.err(),
            ),
            ("stats", "name", client.stats(name).await.err()),
            (
                "delete",
                "name",
                client.delete_queue(name, false).await.err(),
            ),
            (
                "settle",
                "queue",
                client
                    .settle(name, SettleAction::Ack, vec![DeliveryTag::default()], 0)
                    .await
                    .err(),
            ),
            (
                "subscribe",
                "subscribe.queue",
                client.subscribe(name, 1).await.err(),
            ),
        ];
        for (call, field, err) in checks {
            let err = err.unwrap_or_else(|| panic!("{call} of {name:?} was accepted"));
            assert_eq!(
                err.code(),
                Some(Code::InvalidArgument),
                "{call} {name:?}: {err}"
            );
            assert!(
                err.to_string().contains(&format!("{field}: ")),
                "{call} {name:?} names the field {field}: {err}"
            );
        }
    }
}

#[tokio::test]
async fn a_subscription_in_place_is_told_by_its_response_headers_before_any_delivery() {
    use sluice_client::proto::consumer_client::ConsumerClient;
    use sluice_client::proto::{ConsumeRequest, Subscribe};
    let (_dir, agent) = agent();
    let client = agent.client().await;
    client
        .declare_queue(queue("empty", 1))
        .await
        .expect("declare");
    let channel = tonic::transport::Endpoint::from_shared(agent.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ConsumeRequest {
        sequence: 0,
        request: Some(Frame::Subscribe(Subscribe {
            queue: "empty".into(),
            prefetch: 1,
            ..Subscribe::default()
        })),
    })
    .await
    .expect("subscribe frame");
    let response = tokio::time::timeout(
        WAIT,
        ConsumerClient::new(channel).consume(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("headers arrive without any delivery")
    .expect("subscribed");
    let subscribed = response
        .metadata()
        .get("sluice-subscribed")
        .and_then(|v| v.to_str().ok());
    assert_eq!(subscribed, Some("1"));
    drop(tx);
}
