//! A consumer's settles are answered when its queue moves between agents (issue 3): real
//! `sluice-agent` processes on loopback, `--replication-factor 3`, a consumer subscribed at
//! the queue's leader that keeps acking while that agent is drained, so the queue moves to
//! the other agents under it.
//!
//! The contract held here: every settle frame sent on a `Consume` stream is answered, with
//! its `SettleResult` or by the stream ending with a status, within [`ANSWER_BOUND`]; nothing
//! confirmed is lost and no message whose ack was answered durable comes back.
//!
//! Run: `cargo test -p sluice-agent --test settle_after_move -- --nocapture`.
//! `SLUICE_FAULT_TEST_LOGS=1` prints every agent's stderr at the end.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/ledger.rs"]
mod ledger;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/workload.rs"]
mod workload;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cluster::{Cluster, Net, queue_spec};
use ledger::Ledger;
use sluice_proto::v1::consume_request::Request as Frame;
use sluice_proto::v1::consume_response::Response as In;
use sluice_proto::v1::consumer_client::ConsumerClient;
use sluice_proto::v1::{
    ConsumeRequest, DeliveryTag, DrainAgentRequest, Settle, SettleAction, Subscribe,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use workload::Until;

/// Agents in the test cluster: one more than the replication factor, so a drain can move
/// the queue.
const AGENTS: usize = 4;
/// Replicas of the test queue.
const RF: &str = "3";
/// The queue under test.
const QUEUE: &str = "moving";
/// Longest a settle frame may wait for its answer (its result, or the stream's end).
/// Generous for two shared cores; a settle that is never answered waits forever.
const ANSWER_BOUND: Duration = Duration::from_secs(15);
/// How long an election or the groups' forming may take.
const FORM: Duration = Duration::from_secs(60);
/// How long the drain (and so the move) may take under load.
const DRAIN: Duration = Duration::from_secs(90);
/// Messages per publish batch.
const BATCH: usize = 10;

/// What one watched subscription saw.
#[derive(Debug, Default)]
struct Watched {
    /// Settle frames sent.
    sent: u64,
    /// Settle frames answered with their result.
    answered: u64,
    /// Acks answered durable.
    acks: usize,
    /// How the stream ended: `None` for a clean end, else the status.
    end: Option<Option<tonic::Status>>,
    /// Settle frames open when the stream ended (answered by that end).
    open_at_end: usize,
}

/// One tag of a settle frame: the tag, its message's key and the attempt acked.
type Acked = (DeliveryTag, String, u32);

/// Subscribes at `channel` (no redirects followed: the consumer stays on its agent) and
/// acks every delivery in small frames until the stream ends or `stop` is set; fails the
/// test when a settle frame goes unanswered for [`ANSWER_BOUND`] while the stream is open.
async fn watched_consumer(
    channel: tonic::transport::Channel,
    at: String,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
) -> Watched {
    let (requests, rx) = mpsc::channel(64);
    requests
        .send(ConsumeRequest {
            sequence: 0,
            request: Some(Frame::Subscribe(Subscribe {
                queue: QUEUE.into(),
                prefetch: 64,
                consumer_name: "watched".into(),
            })),
        })
        .await
        .expect("request channel");
    let mut stream = ConsumerClient::new(channel)
        .consume(ReceiverStream::new(rx))
        .await
        .expect("subscribe at the leader")
        .into_inner();
    let sub = ledger.next_subscription();
    let mut watched = Watched::default();
    // Sequence -> (when sent, what it acks).
    let mut open: BTreeMap<u64, (Instant, Vec<Acked>)> = BTreeMap::new();
    let mut batch: Vec<Acked> = Vec::new();
    loop {
        if let Some((sequence, (sent, _))) = open.first_key_value() {
            assert!(
                sent.elapsed() < ANSWER_BOUND,
                "settle frame {sequence} at {at} unanswered for {:?} while its stream is open \
                 ({} frames open, {} sent, {} answered)",
                sent.elapsed(),
                open.len(),
                watched.sent,
                watched.answered
            );
        }
        if stop.load(Ordering::Acquire) && open.is_empty() && batch.is_empty() {
            return watched;
        }
        match tokio::time::timeout(Duration::from_millis(5), stream.message()).await {
            Ok(Ok(Some(frame))) => match frame.response {
                Some(In::Delivery(d)) => {
                    let key = ledger.deliver(&d, &at, sub);
                    // Once told to stop, deliveries are left unacked (they come back after
                    // the stream ends): acking them would free credit for more, and with the
                    // publisher still running the loop would never see nothing open.
                    if let (Some(key), Some(tag), false) =
                        (key, d.tag, stop.load(Ordering::Acquire))
                    {
                        batch.push((tag, key, d.attempt));
                    }
                }
                Some(In::Settled(result)) => {
                    watched.answered += 1;
                    let failed = workload::failed_tags(&result);
                    let acked = open
                        .remove(&result.sequence)
                        .map(|(_, acked)| acked)
                        .unwrap_or_default();
                    for (tag, key, attempt) in acked {
                        if !failed.contains(&workload::tag_key(&tag)) {
                            ledger.ack(&key, attempt, &at, sub);
                            watched.acks += 1;
                        }
                    }
                }
                None => {}
            },
            Ok(Ok(None)) => {
                watched.open_at_end = open.len();
                watched.end = Some(None);
                return watched;
            }
            Ok(Err(status)) => {
                watched.open_at_end = open.len();
                watched.end = Some(Some(status));
                return watched;
            }
            Err(_) => {
                if batch.is_empty() {
                    continue;
                }
                watched.sent += 1;
                let frame = ConsumeRequest {
                    sequence: watched.sent,
                    request: Some(Frame::Settle(Settle {
                        action: SettleAction::Ack as i32,
                        tags: batch.iter().map(|(t, _, _)| *t).collect(),
                        delay_ms: 0,
                    })),
                };
                open.insert(watched.sent, (Instant::now(), std::mem::take(&mut batch)));
                // Sent without waiting on a full request buffer (an agent that stopped
                // reading): a stuck agent must show up as an unanswered frame, not as a
                // blocked test; a closed one ends the stream, which answers the frame.
                let _ = requests.try_send(frame);
            }
        }
    }
}

/// Which agent of the queue's group the test drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// The leader the consumer is subscribed at: the queue moves away from the stream's
    /// agent, which removes itself from the group.
    Leader,
    /// A follower: the leader (and the stream) stays while the group adds the fourth agent
    /// and removes the drained one, each change a resynchronisation at the leader.
    Follower,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_settle_is_answered_when_the_consumers_agent_is_drained_and_the_queue_moves_away() {
    settles_are_answered_while_the_queue_moves(Drained::Leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_settle_is_answered_when_the_queue_moves_between_other_agents_under_its_leader() {
    settles_are_answered_while_the_queue_moves(Drained::Follower).await;
}

/// One cluster at a time: two clusters of four agents at once on a 2-core machine would turn
/// election timeouts into test failures.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn settles_are_answered_while_the_queue_moves(drained: Drained) {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start_with(
        root.path(),
        Net::Loopback,
        AGENTS,
        &["--replication-factor", RF],
    )
    .expect("cluster starts");
    cluster.declare(queue_spec(QUEUE, 1), FORM).await;
    let leader = cluster
        .settled_leader(QUEUE, Duration::from_secs(3), FORM)
        .await;
    let others: Vec<usize> = (0..AGENTS).filter(|i| *i != leader).collect();
    let hosts: Vec<usize> = others
        .iter()
        .copied()
        .filter(|i| {
            cluster.nodes[*i]
                .data_dir
                .join("queues")
                .join(QUEUE)
                .exists()
        })
        .collect();
    let target = match drained {
        Drained::Leader => leader,
        Drained::Follower => *hosts.first().expect("a follower hosting the queue"),
    };
    let entry: Vec<String> = (0..AGENTS)
        .filter(|i| *i != target)
        .map(|i| format!("http://{}", cluster.nodes[i].client))
        .collect();
    eprintln!("agent {leader} leads {QUEUE}, followers {hosts:?}; draining agent {target}");

    // Phase 1: a publisher (through the agents that stay) and a consumer at the leader,
    // acking in small frames.
    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let stop_consumer = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(workload::publish(
        entry.clone(),
        QUEUE.into(),
        "k".into(),
        BATCH,
        ledger.clone(),
        stop.clone(),
    ));
    let consumer = tokio::spawn(watched_consumer(
        cluster.channel(leader),
        cluster.nodes[leader].client.to_string(),
        ledger.clone(),
        stop_consumer.clone(),
    ));
    cluster::wait_until("acks at the leader", FORM, || async {
        (ledger.acked() >= 200).then_some(())
    })
    .await
    .expect("the consumer acks at the leader");

    // Phase 2: the target is drained; the queue's group moves to the other agents while the
    // consumer keeps acking at the leader. Every settle frame must be answered meanwhile (the
    // watched consumer fails the test otherwise).
    let response = cluster
        .membership(entry_index(&cluster, &entry))
        .drain_agent(DrainAgentRequest {
            node_id: target as u64,
        })
        .await
        .expect("DrainAgent")
        .into_inner();
    eprintln!("drain of agent {target}: {response:?}");
    // Moved once the drained agent deleted its replica (it does so once the group's target
    // configuration excludes it); the stream at the leader then runs on for a while.
    let replica_dir = cluster.nodes[target].data_dir.join("queues").join(QUEUE);
    cluster::wait_until("the drained agent dropped its replica", DRAIN, || async {
        (!replica_dir.exists()).then_some(())
    })
    .await
    .unwrap_or_else(|| {
        cluster.dump_logs(60);
        panic!(
            "agent {target} still holds {} after {DRAIN:?}",
            replica_dir.display()
        )
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_consumer.store(true, Ordering::Release);
    let watched = match tokio::time::timeout(ANSWER_BOUND * 2, consumer).await {
        Ok(joined) => joined.unwrap_or_else(|e| {
            cluster.dump_logs(60);
            std::panic::resume_unwind(e.into_panic())
        }),
        Err(_) => {
            cluster.dump_logs(60);
            panic!("the watched consumer at agent {leader} did not finish");
        }
    };
    eprintln!("watched subscription at agent {leader}: {watched:?}");
    assert!(watched.answered > 0, "{watched:?}");
    if drained == Drained::Leader {
        // The queue left the stream's agent: the stream ended with a status saying why
        // (UNAVAILABLE: not led or not hosted here; ABORTED: a settle's outcome became
        // ambiguous as leadership moved), never cleanly as if the queue were deleted.
        let end = watched
            .end
            .as_ref()
            .expect("the stream at the drained agent ended");
        let status = end.as_ref().expect("with a status");
        assert!(
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Aborted
            ),
            "{status:?}"
        );
    }

    // Phase 3: publishing stops; what is left is consumed at the queue's hosts.
    cluster::wait_until("confirms after the move", FORM, || async {
        let before = ledger.confirmed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        (ledger.confirmed() > before).then_some(())
    })
    .await
    .expect("publishing goes on after the move");
    stop.store(true, Ordering::Release);
    eprintln!("publisher: {:?}", publisher.await.expect("publisher"));
    let rest = workload::consume(
        entry,
        QUEUE.into(),
        ledger.clone(),
        Until::Quiet(Duration::from_secs(3), FORM),
    )
    .await;
    eprintln!("consumer of the rest: {rest:?}");
    let summary = ledger.summary(None);
    eprintln!("{summary:?}");
    if std::env::var_os(cluster::DUMP_LOGS_ENV).is_some() {
        cluster.dump_logs(usize::MAX);
    }
    summary.assert_guarantees();
}

/// The ordinal of the first agent in `entry`.
fn entry_index(cluster: &Cluster, entry: &[String]) -> usize {
    cluster
        .nodes
        .iter()
        .position(|n| entry.first() == Some(&format!("http://{}", n.client)))
        .expect("an entry agent")
}
