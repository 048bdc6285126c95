//! Routing in a three-agent cluster (real agent processes on loopback): a client that knows only
//! a follower publishes (unary and pipelined streams) and consumes through it, following the
//! `sluice-leader` redirects to the queue's leader; nothing is refused, lost or stored twice.
//!
//! Run: `cargo test -p sluice-agent --test cluster_routing -- --nocapture`.

#[path = "support/cluster.rs"]
mod cluster;
#[allow(dead_code)] // The harness's isolation helpers are unused here.
#[path = "support/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::time::Duration;

use cluster::{Cluster, Net, queue_spec};
use sluice_client::Client;
use sluice_proto::v1::Message;
use tokio::time::Instant;

const QUEUE: &str = "routed";
/// Longest the cluster may take to elect and settle its leaders.
const ELECTION: Duration = Duration::from_secs(20);

fn text(payload: &str) -> Message {
    Message {
        payload: payload.as_bytes().to_vec(),
        ..Message::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_follower_publishes_and_consumes_at_the_leader_without_loss_or_duplicates() {
    let root = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(root.path(), Net::Loopback).expect("cluster starts");
    cluster.declare(queue_spec(QUEUE, 2), ELECTION).await;
    let leader = cluster
        .settled_leader(QUEUE, Duration::from_secs(3), ELECTION)
        .await;
    let follower = (leader + 1) % 3;
    let endpoints = cluster.endpoints();
    let client = Client::connect(endpoints[follower].clone())
        .await
        .expect("connect to the follower");

    // Unary publishes through the follower.
    let mut sent: Vec<String> = Vec::new();
    for i in 0..20 {
        let payload = format!("unary-{i:03}");
        let confirms = client
            .publish(QUEUE, vec![text(&payload)])
            .await
            .expect("a unary publish is redirected to the leader");
        assert!(confirms.iter().all(|c| c.code == 0), "{confirms:?}");
        sent.push(payload);
    }

    // A pipelined stream opened at the follower: its frames are redirected as a whole.
    let mut publisher = client.publisher(8).await.expect("publisher");
    let mut pending = Vec::new();
    for frame in 0..50 {
        let payloads: Vec<String> = (0..20)
            .map(|i| format!("stream-{frame:03}-{i:02}"))
            .collect();
        let messages = payloads.iter().map(|p| text(p)).collect();
        pending.push((
            payloads,
            publisher.send(QUEUE, messages).await.expect("send"),
        ));
    }
    for (payloads, confirm) in pending {
        let confirms = confirm.await.expect("the frame is confirmed at the leader");
        assert!(
            confirms.iter().all(|c| c.code == 0 && c.id.is_some()),
            "a frame was refused: {confirms:?}"
        );
        sent.extend(payloads);
    }
    publisher.close().await.expect("publisher closes cleanly");

    // Consume everything through the follower, acking.
    let mut consumer = client.subscribe(QUEUE, 200).await.expect("subscribe");
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < sent.len() {
        assert!(
            Instant::now() < deadline,
            "consumed {} of {}",
            seen.len(),
            sent.len()
        );
        let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("a delivery within 5 s")
        else {
            panic!("the subscription ended early");
        };
        let payload =
            String::from_utf8(delivery.message.as_ref().expect("message").payload.clone())
                .expect("utf-8");
        *seen.entry(payload).or_default() += 1;
        consumer.ack(delivery.tag.expect("tag")).expect("ack");
    }
    consumer.flush().await.expect("acks flushed");
    let mut expected = sent.clone();
    expected.sort();
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), expected);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    let stats = cluster.stats(leader, QUEUE).await.expect("stats");
    let total = stats.total.expect("total");
    assert_eq!(total.ready + total.in_flight, 0, "{total:?}");
}
