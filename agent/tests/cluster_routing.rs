//! Routing in a three-agent cluster (real agent processes on loopback): a client that knows only
//! a follower publishes (unary and pipelined streams) and consumes through it, following the
//! `sluice-leader` redirects to the queue's leader; nothing is refused, lost or stored twice.
//! A subscription whose leader is killed goes on at the successor without the application
//! subscribing again.
//!
//! Run: `cargo test -p sluice-agent --test cluster_routing -- --nocapture`.

#[path = "support/cluster.rs"]
mod cluster;
#[allow(dead_code)] // The harness's isolation helpers are unused here.
#[path = "support/netns.rs"]
mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cluster::{Cluster, Net, queue_spec};
use sluice_client::Client;
use sluice_proto::v1::{Message, QueueSpec};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_goes_on_at_the_new_leader_when_its_leader_is_killed() {
    // A kill loses what the dead leader had delivered but not yet replicated, and the acks it
    // had not made durable: those come back (counted and printed, not bounded).
    follow_the_leadership_while(Cluster::kill9).await;
}

/// A graceful stop (SIGTERM, as a rolling update without a `preStop` hook sends) hands the
/// leadership away while the agent still serves, so the subscription is redirected and goes
/// on; it does not just end with the agent's drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_goes_on_at_the_new_leader_when_its_leader_stops_gracefully() {
    // The stop hands the leadership over with every delivery replicated, and the consumer
    // sends the settles it could not send on the old stream to the new leader: a move costs
    // no redelivery at all (decision 0018).
    let redelivered = follow_the_leadership_while(Cluster::stop).await;
    assert_eq!(redelivered, 0, "a graceful move redelivered messages");
}

/// Consumes a queue through one `Consumer` while its partition's leader is stopped by
/// `stop_leader` a third of the way in: every message arrives, none whose ack was flushed
/// comes back, and the consumer never sees an error or an end.
async fn follow_the_leadership_while(stop_leader: fn(&mut Cluster, usize)) -> usize {
    const QUEUE: &str = "followed";
    const MESSAGES: usize = 300;
    // Short, so that whatever the move left unacked comes back within the test.
    const ACK_TIMEOUT: Duration = Duration::from_secs(3);
    let root = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(root.path(), Net::Loopback).expect("cluster starts");
    let spec = QueueSpec {
        ack_timeout_ms: ACK_TIMEOUT.as_millis() as u64,
        ..queue_spec(QUEUE, 1)
    };
    cluster.declare(spec, ELECTION).await;
    let leader = cluster
        .settled_leader(QUEUE, Duration::from_secs(3), ELECTION)
        .await;
    let client = Client::connect_any(&cluster.endpoints())
        .await
        .expect("connect");
    let sent: Vec<String> = (0..MESSAGES).map(|i| format!("m-{i:04}")).collect();
    for chunk in sent.chunks(50) {
        let confirms = client
            .publish(QUEUE, chunk.iter().map(|p| text(p)).collect())
            .await
            .expect("publish");
        assert!(confirms.iter().all(|c| c.code == 0), "{confirms:?}");
    }

    let mut consumer = client.subscribe(QUEUE, 50).await.expect("subscribe");
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    // Keys whose ack a flush reported durable: these must never come back.
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut pending: Vec<String> = Vec::new();
    let mut killed = false;
    let mut resurrected = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < sent.len() {
        assert!(
            Instant::now() < deadline,
            "consumed {} of {} (killed: {killed})",
            seen.len(),
            sent.len()
        );
        if !killed && acked.len() >= MESSAGES / 3 {
            stop_leader(&mut cluster, leader);
            killed = true;
        }
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .expect("the subscription follows the leadership without an error")
            .expect("the subscription does not end");
        let payload = tally(&delivery, &consumer, &acked, &mut seen, &mut resurrected);
        pending.push(payload);
        if pending.len() >= 25 {
            // A flush that fails leaves its acks unknown: those messages may come back.
            if consumer.flush().await.is_ok() {
                acked.extend(pending.drain(..));
            } else {
                pending.clear();
            }
        }
    }
    assert!(killed, "the leader was stopped mid-consumption");
    // Whatever is still unacked at the new leader comes back once its ack timeout passes:
    // wait that long and count it too, so the figure below is every redelivery the move cost.
    consumer.flush().await.ok();
    let quiet_until = Instant::now() + ACK_TIMEOUT * 2;
    while let Ok(next) = tokio::time::timeout_at(quiet_until, consumer.next()).await {
        let delivery = next
            .expect("the subscription goes on without an error")
            .expect("the subscription does not end");
        tally(&delivery, &consumer, &acked, &mut seen, &mut resurrected);
    }
    consumer.flush().await.expect("the last acks flushed");
    let mut expected = sent.clone();
    expected.sort();
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), expected);
    assert!(
        resurrected.is_empty(),
        "acked and delivered again: {resurrected:?}"
    );
    let redelivered: u32 = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "{redelivered} redeliveries of {MESSAGES} messages (prefetch 50, ack timeout {ACK_TIMEOUT:?})"
    );
    redelivered as usize
}

/// Counts `delivery` in `seen` (and in `resurrected` when its ack was already flushed), queues
/// its ack, and returns its payload.
fn tally(
    delivery: &sluice_proto::v1::Delivery,
    consumer: &sluice_client::Consumer,
    acked: &BTreeSet<String>,
    seen: &mut BTreeMap<String, u32>,
    resurrected: &mut Vec<String>,
) -> String {
    let payload = String::from_utf8(delivery.message.as_ref().expect("message").payload.clone())
        .expect("utf-8");
    if acked.contains(&payload) {
        resurrected.push(payload.clone());
    }
    *seen.entry(payload.clone()).or_default() += 1;
    consumer
        .ack(delivery.tag.expect("tag"))
        .expect("ack queued");
    payload
}

/// Issue 12, item 1: a leadership move is the cluster's doing, not the consumer's. A delivery
/// held through a hand-off of `max_deliveries: 1` is still the consumer's at the new leader:
/// its tag acks it there, nothing is dead-lettered and nothing is redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_held_through_a_hand_off_is_acked_at_the_new_leader_not_dead_lettered() {
    use sluice_proto::v1::{HandOffLeadershipRequest, SettleAction};
    const HELD: &str = "held";
    const DLQ: &str = "held-dlq";
    let root = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(root.path(), Net::Loopback).expect("cluster starts");
    let spec = QueueSpec {
        max_deliveries: 1,
        dead_letter_queue: DLQ.into(),
        ack_timeout_ms: 60_000,
        ..queue_spec(HELD, 1)
    };
    cluster.declare(spec, ELECTION).await;
    let leader = cluster
        .settled_leader(HELD, Duration::from_secs(3), ELECTION)
        .await;
    let client = Client::connect_any(&cluster.endpoints())
        .await
        .expect("connect");
    let confirms = client
        .publish(HELD, vec![text("only")])
        .await
        .expect("publish");
    assert!(confirms.iter().all(|c| c.code == 0), "{confirms:?}");
    let mut consumer = client.subscribe(HELD, 10).await.expect("subscribe");
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("delivery")
        .expect("the subscription does not end");
    let tag = delivery.tag.expect("tag");
    assert_eq!(tag.attempt, 1);

    // The leader hands its leaderships away (what a preStop hook or a drain does).
    let answer = cluster
        .membership(leader)
        .hand_off_leadership(HandOffLeadershipRequest {
            node_id: leader as u64,
        })
        .await
        .expect("hand-off")
        .into_inner();
    assert!(answer.moved >= 1, "{answer:?}");
    let others: Vec<usize> = (0..cluster.nodes.len()).filter(|i| *i != leader).collect();
    let successor = cluster.leader_among(HELD, &others, ELECTION).await;

    // The consumer acks what it holds; the new leader takes the tag.
    let failures = client
        .settle(HELD, SettleAction::Ack, vec![tag], 0)
        .await
        .expect("settle");
    assert!(
        failures.is_empty(),
        "the tag is valid at the new leader: {failures:?}"
    );
    let stats = cluster.stats(successor, HELD).await.expect("stats");
    let total = stats.total.expect("totals");
    assert_eq!(
        (total.ready, total.in_flight, total.dead_lettered),
        (0, 0, 0),
        "{total:?}"
    );
    // Any agent's replica of the DLQ would hold a copy by now (every agent hosts it).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..cluster.nodes.len() {
        let dlq = cluster.stats(i, DLQ).await.expect("dlq stats");
        let dlq = dlq.total.expect("totals");
        assert_eq!(
            dlq.ready + dlq.in_flight,
            0,
            "agent {i}: dead-lettered: {dlq:?}"
        );
    }
    // Nothing comes back, to this consumer (which follows the move) or a new one.
    drop(consumer);
    let mut again = client.subscribe(HELD, 10).await.expect("subscribe again");
    let redelivered = tokio::time::timeout(Duration::from_secs(3), again.next()).await;
    assert!(
        redelivered.is_err(),
        "redelivered after it was acked: {redelivered:?}"
    );
}

/// Issue 12, item 6: whichever agent is asked, `GetQueueStats` answers with the partition
/// leader's numbers (a follower's replica lags, and only the leader knows what is in flight
/// and who consumes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_answers_stats_with_the_leaders_numbers() {
    const COUNTED: &str = "counted";
    let root = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(root.path(), Net::Loopback).expect("cluster starts");
    cluster.declare(queue_spec(COUNTED, 1), ELECTION).await;
    let leader = cluster
        .settled_leader(COUNTED, Duration::from_secs(3), ELECTION)
        .await;
    let client = Client::connect_any(&cluster.endpoints())
        .await
        .expect("connect");
    let mut messages: Vec<Message> = (0..4).map(|i| text(&format!("m-{i}"))).collect();
    messages.push(Message {
        delay_ms: 600_000,
        ..text("later")
    });
    let confirms = client.publish(COUNTED, messages).await.expect("publish");
    assert!(confirms.iter().all(|c| c.code == 0), "{confirms:?}");
    let mut consumer = client.subscribe(COUNTED, 2).await.expect("subscribe");
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .expect("delivery")
            .expect("the subscription does not end");
    }
    let leaders = cluster
        .stats(leader, COUNTED)
        .await
        .expect("leader's stats");
    let expected = |s: &sluice_proto::v1::GetQueueStatsResponse| {
        let t = s.total.expect("totals");
        (t.ready, t.in_flight, t.delayed, s.consumers)
    };
    assert_eq!(expected(&leaders), (2, 2, 1, 1), "{leaders:?}");
    for i in (0..cluster.nodes.len()).filter(|i| *i != leader) {
        let stats = cluster.client_stats(i, COUNTED).await.expect("stats");
        assert_eq!(
            expected(&stats),
            expected(&leaders),
            "agent {i} answers with the leader's numbers: {stats:?}"
        );
        assert_eq!(stats.partitions[0].leader, leaders.partitions[0].leader);
    }
}

/// Issue 12, item 7: `Declare` returns once the new queue is led by the agent that will keep
/// leading it, so a consumer that subscribes at once is not moved by the balancer seconds
/// later (the first leader used to be whichever replica's election timer fired first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_made_right_after_declaring_is_not_moved_by_placement() {
    use sluice_proto::v1::consume_request::Request as Frame;
    use sluice_proto::v1::consumer_client::ConsumerClient;
    use sluice_proto::v1::{ConsumeRequest, Subscribe};
    const FRESH: usize = 5;
    let root = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(root.path(), Net::Loopback).expect("cluster starts");
    // The meta group's first leader and the catalog settle first.
    cluster.declare(queue_spec("warm-up", 1), ELECTION).await;
    let mut streams = Vec::new();
    for q in 0..FRESH {
        let name = format!("fresh-{q}");
        cluster.declare(queue_spec(&name, 2), ELECTION).await;
        let leader = cluster.leader(&name, ELECTION).await;
        let subscribe = ConsumeRequest {
            sequence: 0,
            request: Some(Frame::Subscribe(Subscribe {
                queue: name.clone(),
                prefetch: 10,
                ..Subscribe::default()
            })),
        };
        // The request stream stays open (the sender is kept) so the subscription lasts.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(subscribe).await.expect("subscribe frame");
        let responses = ConsumerClient::new(cluster.channel(leader))
            .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap_or_else(|s| panic!("{name}: subscribe at agent {leader}: {s}"))
            .into_inner();
        streams.push((name, leader, tx, responses));
    }
    // The balancer looks every 2 s: a queue led by another than its preferred agent moves
    // within a few seconds, ending its subscription with a redirect.
    let watched = streams
        .into_iter()
        .map(|(name, leader, tx, mut responses)| async move {
            let next = tokio::time::timeout(Duration::from_secs(8), responses.message()).await;
            drop(tx);
            (name, leader, next)
        });
    for (name, leader, next) in futures::future::join_all(watched).await {
        assert!(
            next.is_err(),
            "{name}: the subscription at agent {leader} was ended or answered: {next:?}"
        );
    }
}
