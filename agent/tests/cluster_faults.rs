//! Fault tests of a replicated cluster: three real `sluice-agent` processes with real data
//! directories, talking real gRPC, under publish and consume load while the leader of the
//! queue's partition is killed, paused, cut off its peers, and while a replica loses its disk or
//! has a segment corrupted (issue 3, "Show").
//!
//! After each fault every test checks the same guarantees with [`workload::Summary`]: every
//! confirmed key is consumed, no message whose ack was durable comes back, no payload differs
//! from what was published, and the cluster serves new publishes again. Redelivery counts are
//! printed (`--nocapture`).
//!
//! Run: `cargo test -p sluice-agent --test cluster_faults -- --nocapture --test-threads=1`.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/workload.rs"]
mod workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cluster::{Cluster, Net};
use sluice_proto::v1::admin_client::AdminClient;
use sluice_proto::v1::{DeclareQueueRequest, QueueSpec};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use workload::{ConsumerReport, Ledger, PublisherReport, Summary, Until};

/// The queue every test uses: one partition, so one Raft group with one leader.
const QUEUE: &str = "orders";
/// How long an election may take before a test fails (the budget is ~2 s; slack for 2 cores).
const ELECTION: Duration = Duration::from_secs(15);
/// How long a restarted or rebuilt replica may take to catch up.
const CATCH_UP: Duration = Duration::from_secs(30);
/// Messages per publish batch.
const BATCH: usize = 20;

/// Publishers and a consumer running against the cluster.
struct Load {
    stop: Arc<AtomicBool>,
    stop_consumer: Arc<AtomicBool>,
    publishers: Vec<JoinHandle<PublisherReport>>,
    consumer: JoinHandle<ConsumerReport>,
}

impl Load {
    /// Starts `publishers` publishers (keys `<prefix><n>-<seq>`) and one consumer.
    fn start(cluster: &Cluster, ledger: &Arc<Ledger>, publishers: usize, prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_consumer = Arc::new(AtomicBool::new(false));
        let publishers = (0..publishers)
            .map(|n| {
                tokio::spawn(workload::publish(
                    cluster.endpoints(),
                    QUEUE.into(),
                    format!("{prefix}{n}"),
                    BATCH,
                    ledger.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        let consumer = tokio::spawn(workload::consume(
            cluster.endpoints(),
            QUEUE.into(),
            ledger.clone(),
            Until::Stopped(stop_consumer.clone()),
        ));
        Load {
            stop,
            stop_consumer,
            publishers,
            consumer,
        }
    }

    /// Stops consuming while publishing goes on (a backlog builds up).
    fn stop_consumer(&self) {
        self.stop_consumer.store(true, Ordering::Release);
    }

    /// Stops the load and prints what each part did.
    async fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.stop_consumer.store(true, Ordering::Release);
        for (n, p) in self.publishers.into_iter().enumerate() {
            let report = p.await.expect("publisher task");
            eprintln!("publisher {n}: {report:?}");
        }
        let report = self.consumer.await.expect("consumer task");
        eprintln!("consumer under load: {report:?}");
    }
}

/// Starts a loopback cluster and declares [`QUEUE`]; returns it with the partition's leader.
async fn cluster_with_queue(root: &std::path::Path, net: Net) -> Result<(Cluster, usize), String> {
    let cluster = Cluster::start(root, net)?;
    declare(&cluster).await;
    let leader = cluster.leader(QUEUE, ELECTION).await;
    Ok((cluster, leader))
}

/// Declares [`QUEUE`] through agent 0 (forwarded to the meta leader), retrying while the
/// cluster elects its first meta leader.
async fn declare(cluster: &Cluster) {
    let deadline = Instant::now() + ELECTION;
    loop {
        let request = DeclareQueueRequest {
            queue: Some(QueueSpec {
                name: QUEUE.into(),
                partitions: 1,
                ..Default::default()
            }),
        };
        match AdminClient::new(cluster.channel(0))
            .declare_queue(request)
            .await
        {
            Ok(_) => return,
            Err(status) => assert!(
                Instant::now() < deadline,
                "declare {QUEUE} failed until the deadline: {status}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ends a test: a fresh batch must be confirmed (the cluster serves again), then everything is
/// drained and the ledger checked. Keys starting with `forbidden` must never be delivered.
async fn finish(cluster: &Cluster, ledger: &Arc<Ledger>, forbidden: Option<&str>) -> Summary {
    let stop = Arc::new(AtomicBool::new(false));
    let after = tokio::spawn(workload::publish(
        cluster.endpoints(),
        QUEUE.into(),
        "after".into(),
        BATCH,
        ledger.clone(),
        stop.clone(),
    ));
    let confirmed_before = ledger.confirmed();
    let served = cluster::wait_until("a confirmed publish after the fault", ELECTION, || async {
        (ledger.confirmed() > confirmed_before).then_some(())
    })
    .await;
    stop.store(true, Ordering::Release);
    let report = after.await.expect("publisher task");
    assert!(
        served.is_some(),
        "the cluster does not confirm publishes after the fault: {report:?}"
    );

    let drained = workload::consume(
        cluster.endpoints(),
        QUEUE.into(),
        ledger.clone(),
        Until::Quiet(Duration::from_secs(3), Duration::from_secs(30)),
    )
    .await;
    eprintln!("drain: {drained:?}");
    let summary = ledger.summary(forbidden);
    eprintln!(
        "confirmed {} keys; consumed {} keys in {} deliveries ({} redeliveries); {} acks durable; \
         missing {}, acked-then-redelivered {}, corrupted {}, enqueued twice {}",
        summary.confirmed,
        summary.consumed,
        summary.deliveries,
        summary.redeliveries,
        summary.acked,
        summary.missing.len(),
        summary.resurrected.len(),
        summary.corrupted.len(),
        summary.id_conflicts.len(),
    );
    summary.assert_guarantees();
    summary
}

/// Waits until every running agent reports the same backlog and bytes for [`QUEUE`]; returns
/// the agreed `(backlog, bytes)`.
async fn replicas_agree(cluster: &Cluster, among: &[usize]) -> (u64, u64) {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let probes = among.iter().map(|&i| cluster.stats(i, QUEUE));
        let stats: Vec<Result<(u64, u64), String>> = futures::future::join_all(probes)
            .await
            .into_iter()
            .map(|s| {
                s.map(|s| {
                    let t = s.total.unwrap_or_default();
                    (t.ready + t.in_flight + t.delayed, t.bytes)
                })
            })
            .collect();
        if let Some(Ok(first)) = stats.first()
            && stats.iter().all(|s| s.as_ref() == Ok(first))
        {
            return *first;
        }
        assert!(
            Instant::now() < deadline,
            "replicas {among:?} disagree after {CATCH_UP:?}: (backlog, bytes) {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_loses_no_confirmed_message_and_catches_up_after_restart() {
    let root = tempfile::tempdir().expect("temp dir");
    let (mut cluster, leader) = cluster_with_queue(root.path(), Net::Loopback)
        .await
        .expect("cluster starts");
    let ledger = Arc::new(Ledger::default());

    // Phase 1: load, then SIGKILL the leader while publishes and acks are in flight.
    let load = Load::start(&cluster, &ledger, 2, "k");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = ledger.confirmed();
    cluster.kill9(leader);
    let killed = Instant::now();
    eprintln!("killed leader agent {leader} after {before} confirms");

    // Phase 2: the others elect a successor, which confirms new publishes.
    let successor = cluster.leader(QUEUE, ELECTION).await;
    assert_ne!(successor, leader);
    cluster::wait_until("a confirm on the successor", ELECTION, || async {
        (ledger.confirmed() > before + BATCH).then_some(())
    })
    .await
    .expect("the successor confirms publishes");
    eprintln!(
        "agent {successor} leads; first confirms {:?} after the kill",
        killed.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Phase 3: the killed agent restarts on its ports and data directory while publishing
    // goes on without a consumer, so a backlog builds up.
    load.stop_consumer();
    cluster.restart(leader);
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.stop().await;

    // Phase 4: it catches up: all three report the same non-empty backlog.
    let (backlog, bytes) = replicas_agree(&cluster, &[0, 1, 2]).await;
    eprintln!("after restart all replicas hold backlog {backlog} ({bytes} bytes)");
    assert!(backlog > 0, "the restarted replica was compared on an empty queue");

    finish(&cluster, &ledger, None).await;
    assert_eq!(replicas_agree(&cluster, &[0, 1, 2]).await, (0, 0));
}
