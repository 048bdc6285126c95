//! The client against fake agents on loopback gRPC: it follows leader redirects, waits out
//! elections, moves to another endpoint when one goes away, and gives up after its bound.

mod support;

use std::time::{Duration, Instant};

use sluice_client::proto::{Message, QueueSpec, SettleAction};
use sluice_client::{Client, Error, RetryPolicy, tag};
use support::{Behaviour, reserve, start, start_on};

fn message(payload: &str) -> Message {
    Message {
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn spec(name: &str) -> QueueSpec {
    QueueSpec {
        name: name.to_owned(),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_unary_call_sent_to_a_follower_ends_at_the_leader() {
    let leader = start("leader", Behaviour::Lead).await;
    let follower = start("follower", Behaviour::Redirect(leader.addr.to_string())).await;
    let client = Client::connect(follower.endpoint()).await.expect("connect");

    let declared = client.declare_queue(spec("orders")).await.expect("declare");
    assert_eq!(declared.queue.map(|q| q.name).as_deref(), Some("orders"));
    let confirms = client
        .publish("orders", vec![message("one"), message("two")])
        .await
        .expect("publish");
    assert_eq!(confirms.len(), 2);
    assert_eq!(client.stats("orders").await.expect("stats").name, "leader");
    let failures = client
        .settle("orders", SettleAction::Ack, vec![Default::default()], 0)
        .await
        .expect("settle");
    assert!(failures.is_empty());
    assert_eq!(
        client.delete_queue("orders", false).await.expect("delete"),
        0
    );
    assert_eq!(leader.published(), ["one", "two"]);

    // Only the first call for the queue went to the follower: the leader is remembered.
    assert_eq!(follower.calls(), 1, "later calls go straight to the leader");
    assert_eq!(leader.calls(), 5);

    // A call about no queue goes to the configured endpoint and is redirected too.
    let queues = client.list_queues().await.expect("list");
    assert_eq!(queues[0].name, "leader");
    assert_eq!(follower.calls(), 2);
}

#[tokio::test]
async fn a_chain_of_redirects_is_followed_to_the_end() {
    let leader = start("leader", Behaviour::Lead).await;
    let stale = start("stale", Behaviour::Redirect(leader.addr.to_string())).await;
    let follower = start("follower", Behaviour::Redirect(stale.addr.to_string())).await;
    let client = Client::connect(follower.endpoint()).await.expect("connect");

    client
        .publish("orders", vec![message("hop")])
        .await
        .expect("publish reaches the leader through two redirects");
    assert_eq!(leader.published(), ["hop"]);
    assert_eq!((follower.calls(), stale.calls(), leader.calls()), (1, 1, 1));
}

#[tokio::test]
async fn publishes_refused_during_an_election_are_resent_after_backoff() {
    let electing = start("electing", Behaviour::Elect(3.into())).await;
    let client = Client::connect(electing.endpoint()).await.expect("connect");

    let started = Instant::now();
    client
        .publish("orders", vec![message("patient")])
        .await
        .expect("served once elected");
    let waited = started.elapsed();

    assert_eq!(electing.calls(), 4, "three refusals, then the publish");
    assert_eq!(electing.published(), ["patient"], "enqueued once");
    // Backoff 25 ms, 50 ms, 100 ms, each jittered into its upper half: at least 87.5 ms.
    assert!(waited >= Duration::from_micros(87_500), "{waited:?}");
}

#[tokio::test]
async fn the_client_gives_up_after_its_attempt_bound_with_the_last_error() {
    let electing = start("electing", Behaviour::Elect(u32::MAX.into())).await;
    let client = Client::connect(electing.endpoint()).await.expect("connect");

    let err = client
        .publish("orders", vec![message("never")])
        .await
        .expect_err("no leader ever");

    assert_eq!(electing.calls(), sluice_client::retry::MAX_ATTEMPTS_DEFAULT);
    assert_eq!(err.code(), Some(tonic::Code::Unavailable));
    assert_eq!(err.to_string(), "election under way (UNAVAILABLE)");
    assert!(electing.published().is_empty());
}

#[tokio::test]
async fn agents_redirecting_to_each_other_cost_bounded_attempts() {
    // Two agents each naming the other as leader (leadership moving): the client stops.
    let b_listener = reserve().await;
    let b_addr = b_listener.local_addr().expect("addr");
    let a = start("a", Behaviour::Redirect(b_addr.to_string())).await;
    let b = start_on(
        b_listener,
        "b",
        Behaviour::Redirect(a.addr.to_string()),
        b_addr,
    )
    .await;
    let policy = RetryPolicy {
        max_attempts: 5,
        ..RetryPolicy::default()
    };
    let client = Client::connect_with(&[a.endpoint()], policy)
        .await
        .expect("connect");

    let err = client.stats("orders").await.expect_err("no agent leads");

    assert_eq!(a.calls() + b.calls(), 5);
    assert_eq!(err.code(), Some(tonic::Code::Unavailable));
}

#[tokio::test]
async fn a_client_of_several_agents_moves_on_when_one_goes_away() {
    let first = start("first", Behaviour::Lead).await;
    let second = start("second", Behaviour::Lead).await;
    let client = Client::connect_any(&[first.endpoint(), second.endpoint()])
        .await
        .expect("connect");
    assert_eq!(client.list_queues().await.expect("list")[0].name, "first");

    first.stop().await;

    // No idempotency key: still resent, since the dead agent could not even be reached.
    client
        .publish("orders", vec![message("after")])
        .await
        .expect("served by the second agent");
    assert_eq!(second.published(), ["after"]);
    assert_eq!(client.list_queues().await.expect("list")[0].name, "second");
}

#[tokio::test]
async fn connecting_skips_endpoints_that_are_down() {
    let dead = reserve().await;
    let dead_endpoint = format!("http://{}", dead.local_addr().expect("addr"));
    drop(dead);
    let live = start("live", Behaviour::Lead).await;

    let client = Client::connect_any(&[dead_endpoint.clone(), live.endpoint()])
        .await
        .expect("the live agent is found");
    assert_eq!(client.list_queues().await.expect("list")[0].name, "live");

    let err = Client::connect_any(std::slice::from_ref(&dead_endpoint))
        .await
        .expect_err("nothing is up");
    assert!(
        err.to_string()
            .starts_with(&format!("cannot connect to {dead_endpoint}")),
        "{err}"
    );
    assert!(matches!(
        Client::connect_any(&[] as &[String]).await,
        Err(Error::NoEndpoints)
    ));
}

#[tokio::test]
async fn a_subscription_opened_at_a_follower_consumes_from_the_leader() {
    let leader = start("leader", Behaviour::Lead).await;
    let follower = start("follower", Behaviour::Redirect(leader.addr.to_string())).await;
    let client = Client::connect(follower.endpoint()).await.expect("connect");

    let mut consumer = client.subscribe("orders", 10).await.expect("subscribe");
    let delivery = consumer
        .next()
        .await
        .expect("stream healthy")
        .expect("one delivery");

    let payload = delivery.message.as_ref().map(|m| m.payload.clone());
    assert_eq!(payload.as_deref(), Some(&b"leader"[..]));
    consumer.ack(tag(&delivery)).expect("ack queued");
    consumer
        .flush()
        .await
        .expect("settled on the leader's stream");
    assert_eq!(follower.calls(), 1);
}

#[tokio::test]
async fn a_publisher_opened_at_a_follower_publishes_at_the_leader() {
    let leader = start("leader", Behaviour::Lead).await;
    let follower = start("follower", Behaviour::Redirect(leader.addr.to_string())).await;
    let client = Client::connect(follower.endpoint()).await.expect("connect");

    let mut publisher = client.publisher(4).await.expect("publisher");
    let mut pending = Vec::new();
    for n in 0..10 {
        let frame = vec![message(&format!("m{n}"))];
        pending.push(publisher.send("orders", frame).await.expect("send"));
    }
    for confirm in pending {
        assert_eq!(confirm.await.expect("confirmed").len(), 1);
    }
    publisher.close().await.expect("clean close");

    assert_eq!(leader.published().len(), 10);
    assert_eq!(follower.calls(), 1, "redirected once, then the lane stays");
}

#[tokio::test]
async fn a_publish_stream_ended_by_a_redirect_resends_its_unconfirmed_frames_at_the_leader() {
    let leader = start("leader", Behaviour::Lead).await;
    let moving = start(
        "moving",
        Behaviour::RedirectStreamAfter(3, leader.addr.to_string()),
    )
    .await;
    let client = Client::connect(moving.endpoint()).await.expect("connect");

    let mut publisher = client.publisher(16).await.expect("publisher");
    let mut pending = Vec::new();
    for n in 0..8 {
        let frame = vec![message(&format!("m{n}"))];
        pending.push(publisher.send("orders", frame).await.expect("send"));
    }
    for confirm in pending {
        confirm
            .await
            .expect("every frame confirmed, by one agent or the other");
    }
    publisher.close().await.expect("clean close");

    let mut all = moving.published();
    all.extend(leader.published());
    assert_eq!(all.len(), 8, "each frame accepted exactly once: {all:?}");
    assert_eq!(moving.published(), ["m0", "m1", "m2"]);
}

#[tokio::test]
async fn a_subscription_whose_stream_is_redirected_goes_on_at_the_leader_and_reports_unanswered_acks()
 {
    let leader = start("leader", Behaviour::Lead).await;
    let moved = start(
        "moved",
        Behaviour::RedirectConsumeAfterDelivery(leader.addr.to_string()),
    )
    .await;
    let client = Client::connect(moved.endpoint()).await.expect("connect");
    let mut consumer = client.subscribe("orders", 10).await.expect("subscribe");

    let first = consumer
        .next()
        .await
        .expect("first delivery")
        .expect("open");
    assert_eq!(
        first.message.as_ref().map(|m| &m.payload[..]),
        Some(&b"moved"[..])
    );
    consumer.ack(tag(&first)).expect("ack queued");

    // The stream ends with a redirect: `next` subscribes again at the leader by itself.
    let second = consumer
        .next()
        .await
        .expect("no error surfaces")
        .expect("open");
    assert_eq!(
        second.message.as_ref().map(|m| &m.payload[..]),
        Some(&b"leader"[..])
    );
    assert_eq!(leader.calls(), 1, "one subscription at the leader");

    // The first ack was never answered: the next flush says its outcome is unknown...
    let unknown = consumer
        .flush()
        .await
        .expect_err("the unanswered ack is reported");
    assert!(
        matches!(&unknown, Error::Status(s) if s.code() == tonic::Code::Unavailable),
        "{unknown:?}"
    );
    // ...and settles on the new stream are answered as usual.
    consumer.ack(tag(&second)).expect("ack queued");
    assert!(
        consumer
            .flush()
            .await
            .expect("flush at the leader")
            .is_empty()
    );
}
