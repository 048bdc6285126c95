//! Placement with a replication factor below the agent count (issue 3 part 5; decision 0014):
//! five real `sluice-agent` processes on loopback with `--replication-factor 3`.
//!
//! - Every queue's partition groups have exactly the voters the placement function names, the
//!   agents not placed keep no directory for it, and the per-agent replica counts are the
//!   placement's; a load driven through an agent that hosts none of the queue's replicas
//!   (so every request is redirected) survives a SIGKILL and restart of the queue's leader.
//! - Dead-lettering into a DLQ placed on other agents: the source leader forwards the copy over
//!   the public API, and each message lands in the DLQ exactly once.
//!
//! Run: `cargo test -p sluice-agent --test cluster_placement -- --nocapture` (the tests take
//! turns). `SLUICE_FAULT_TEST_LOGS=1` prints every agent's stderr at the end.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/ledger.rs"]
mod ledger;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/workload.rs"]
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cluster::{Cluster, Net, queue_spec};
use ledger::Ledger;
use sluice_agent::cluster::placement::replica_set;
use sluice_proto::v1::{GetClusterResponse, QueueSpec};
use tokio::time::Instant;
use workload::{Load, Until};

/// Agents in the test cluster.
const AGENTS: usize = 5;
/// Replicas per queue: below the agent count, so every queue has agents that do not host it.
const RF: u32 = 3;
/// Partitions of every test queue.
const PARTITIONS: u32 = 2;
/// How long an election (or the first meta leader) may take before a test fails.
const ELECTION: Duration = Duration::from_secs(20);
/// How long the groups may take to form on five agents sharing two cores.
const FORM: Duration = Duration::from_secs(60);
/// Messages per publish batch.
const BATCH: usize = 20;

/// One cluster at a time: two clusters of five agents at once on a 2-core machine would turn
/// election timeouts into test failures.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn all_nodes() -> Vec<u64> {
    (0..AGENTS as u64).collect()
}

fn start(root: &std::path::Path) -> Cluster {
    Cluster::start_with(
        root,
        Net::Loopback,
        AGENTS,
        &["--replication-factor", &RF.to_string()],
    )
    .expect("cluster starts")
}

/// Whether every partition group of every queue in `expected` has exactly its placed voters,
/// no learner, and a leader among them.
fn placed_as_expected(view: &GetClusterResponse, expected: &BTreeMap<String, Vec<u64>>) -> bool {
    let groups = expected.len() * PARTITIONS as usize;
    let ours: Vec<_> = view
        .partitions
        .iter()
        .filter(|p| expected.contains_key(&p.queue))
        .collect();
    ours.len() == groups
        && ours.iter().all(|p| {
            let want: BTreeSet<u64> = expected[&p.queue].iter().copied().collect();
            let voters: BTreeSet<u64> = p.voters.iter().copied().collect();
            voters == want && p.learners.is_empty() && p.leader.is_some_and(|l| want.contains(&l))
        })
}

async fn confirms_advance(ledger: &Ledger, what: &str) {
    let before = ledger.confirmed();
    cluster::wait_until(what, ELECTION, || async {
        (ledger.confirmed() > before + BATCH).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{what}: no confirms within {ELECTION:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_agents_place_each_queue_on_its_three_replicas_and_a_redirected_load_survives_a_leader_kill()
 {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let mut cluster = start(root.path());
    let nodes = all_nodes();
    let queues = ["alpha", "bravo", "charlie", "delta"];
    let expected: BTreeMap<String, Vec<u64>> = queues
        .iter()
        .map(|q| ((*q).to_owned(), replica_set(q, RF, &nodes)))
        .collect();
    eprintln!("placement: {expected:?}");
    for q in queues {
        cluster.declare(queue_spec(q, PARTITIONS), ELECTION).await;
    }

    // Every group has exactly the voters the placement names (asked at every agent: each
    // merges the views of the agents hosting the groups).
    let mut view = None;
    for i in 0..AGENTS {
        view = Some(
            cluster
                .wait_view(i, "every group has its placed voters", FORM, |v| {
                    placed_as_expected(v, &expected)
                })
                .await,
        );
    }
    let view = view.expect("a view");
    assert_eq!(view.replication_factor, RF);

    // Replicas per agent are the placement's (groups: partitions of the queues placed there),
    // and no agent holds more queues than an even spread allows plus one.
    let mut placed_queues: BTreeMap<u64, usize> = nodes.iter().map(|n| (*n, 0)).collect();
    for set in expected.values() {
        for n in set {
            *placed_queues.entry(*n).or_default() += 1;
        }
    }
    eprintln!("queues per agent: {placed_queues:?}");
    for agent in &view.agents {
        assert_eq!(
            agent.replicas as usize,
            placed_queues[&agent.node_id] * PARTITIONS as usize,
            "replicas of agent {}: {view:#?}",
            agent.node_id
        );
    }
    let spread_bound = (queues.len() * RF as usize).div_ceil(AGENTS) + 1;
    assert!(
        placed_queues.values().all(|&n| n <= spread_bound),
        "{placed_queues:?} exceeds {spread_bound} queues on one agent"
    );

    // An agent not placed keeps no directory for the queue; a placed one does.
    for node in &cluster.nodes {
        for (q, set) in &expected {
            let dir = node.data_dir.join("queues").join(q);
            assert_eq!(
                dir.exists(),
                set.contains(&(node.index as u64)),
                "{}: placed on {set:?}",
                dir.display()
            );
        }
    }

    // A load through an agent that hosts none of the load queue's replicas: every publish and
    // subscription starts with a redirect.
    let load_queue = queues[0];
    let replicas: Vec<usize> = expected[load_queue].iter().map(|n| *n as usize).collect();
    let outsider = (0..AGENTS)
        .find(|i| !replicas.contains(i))
        .expect("an agent outside the replica set");
    let entry = vec![format!("http://{}", cluster.nodes[outsider].client)];
    eprintln!("load on {load_queue} (replicas {replicas:?}) through agent {outsider}");
    let ledger = Arc::new(Ledger::default());
    let load = Load::start(entry.clone(), load_queue, &ledger, 2, "k", BATCH);
    confirms_advance(&ledger, "confirms through the outsider").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // SIGKILL the load queue's leader; the load goes on (redirects reach the survivors).
    let leader = cluster.leader_among(load_queue, &replicas, ELECTION).await;
    eprintln!("SIGKILL agent {leader}, leader of {load_queue}");
    cluster.kill9(leader);
    confirms_advance(&ledger, "confirms after the leader was killed").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(leader);
    eprintln!("agent {leader} restarted");
    let survivor = *replicas.iter().find(|i| **i != leader).expect("a survivor");
    let restarted = leader as u64;
    cluster
        .wait_view(
            survivor,
            "the restarted replica is in sync in every group of the load queue again",
            FORM,
            |v| {
                placed_as_expected(v, &expected)
                    && v.partitions
                        .iter()
                        .filter(|p| p.queue == load_queue)
                        .all(|p| p.in_sync.contains(&restarted))
            },
        )
        .await;
    confirms_advance(&ledger, "confirms after the restart").await;
    load.stop().await;

    // Everything confirmed is consumed, nothing acked comes back, nothing is corrupted.
    let drained = workload::consume(
        entry,
        load_queue.to_owned(),
        ledger.clone(),
        Until::Quiet(Duration::from_secs(3), Duration::from_secs(30)),
    )
    .await;
    eprintln!("drain: {drained:?}");
    let summary = ledger.summary(None);
    eprintln!(
        "confirmed {} keys; consumed {} in {} deliveries ({} redeliveries, {} raced acks); \
         missing {}, acked-then-redelivered {}, corrupted {}",
        summary.confirmed,
        summary.consumed,
        summary.deliveries,
        summary.redeliveries,
        summary.raced,
        summary.missing.len(),
        summary.resurrected.len(),
        summary.corrupted.len(),
    );
    if std::env::var_os(cluster::DUMP_LOGS_ENV).is_some() {
        cluster.dump_logs(usize::MAX);
    }
    summary.assert_guarantees();
}

/// A source queue and a DLQ name whose replica sets differ such that the source's preferred
/// leader does not host the DLQ.
fn names_placed_apart() -> (String, String) {
    let nodes = all_nodes();
    (0..1_000)
        .map(|n| (format!("jobs-{n}"), format!("jobs-{n}-dead")))
        .find(|(src, dlq)| {
            let leader = replica_set(src, RF, &nodes)[0];
            !replica_set(dlq, RF, &nodes).contains(&leader)
        })
        .expect("some pair placed apart")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_nacked_past_max_deliveries_lands_exactly_once_in_a_dead_letter_queue_hosted_elsewhere()
 {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let cluster = start(root.path());
    let nodes = all_nodes();
    let (src, dlq) = names_placed_apart();
    let src_set = replica_set(&src, RF, &nodes);
    let dlq_set = replica_set(&dlq, RF, &nodes);
    eprintln!("{src} on {src_set:?}, {dlq} on {dlq_set:?}");
    cluster
        .declare(queue_spec(&dlq, PARTITIONS), ELECTION)
        .await;
    cluster
        .declare(
            QueueSpec {
                max_deliveries: 1,
                dead_letter_queue: dlq.clone(),
                ..queue_spec(&src, PARTITIONS)
            },
            ELECTION,
        )
        .await;
    let expected: BTreeMap<String, Vec<u64>> = [
        (src.clone(), src_set.clone()),
        (dlq.clone(), dlq_set.clone()),
    ]
    .into_iter()
    .collect();
    cluster
        .wait_view(0, "both queues have their placed voters", FORM, |v| {
            placed_as_expected(v, &expected)
        })
        .await;

    // The source is led by its preferred leader (the balancer moves it there), which does
    // not host the DLQ: dead-lettering must cross agents.
    let preferred = src_set[0] as usize;
    let src_replicas: Vec<usize> = src_set.iter().map(|n| *n as usize).collect();
    // The balancer moves one partition at a time: wait until it moved every one (a publish
    // of many keys needs every partition led where it is sent), then until the leader serves.
    cluster
        .wait_view(
            preferred,
            "every partition of the source led by its preferred agent",
            FORM,
            |v| {
                v.partitions
                    .iter()
                    .filter(|p| p.queue == src)
                    .all(|p| p.leader == Some(preferred as u64))
            },
        )
        .await;
    let deadline = Instant::now() + FORM;
    loop {
        if cluster.leader_among(&src, &src_replicas, ELECTION).await == preferred {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{src} is not led by its preferred agent {preferred} within {FORM:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(!dlq_set.contains(&(preferred as u64)));

    // Publish keyed messages to the source, then nack every delivery: with max_deliveries 1
    // each moves to the DLQ.
    let keys: Vec<String> = (0..60).map(|n| format!("job-{n}")).collect();
    let confirms = workload::publish_keys(
        cluster.channel(preferred),
        &src,
        &keys,
        Duration::from_secs(10),
    )
    .await
    .expect("publish to the source's leader");
    assert!(
        confirms.iter().all(|c| c.code == 0 && c.id.is_some()),
        "{confirms:?}"
    );
    let client =
        sluice_client::Client::connect(format!("http://{}", cluster.nodes[preferred].client))
            .await
            .expect("client");
    let mut consumer = client
        .subscribe(&src, 64)
        .await
        .expect("subscribe to source");
    let mut nacked = BTreeSet::new();
    while nacked.len() < keys.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a source delivery within 10 s")
            .expect("source stream")
            .expect("source subscription open");
        let bytes = delivery
            .message
            .as_ref()
            .map(|m| m.payload.clone())
            .unwrap_or_default();
        let key = ledger::check_payload(&bytes).expect("source payload");
        consumer
            .nack(sluice_client::tag(&delivery), Duration::ZERO)
            .expect("nack");
        nacked.insert(key);
    }
    consumer.flush().await.expect("nacks settled");
    drop(consumer);

    // Every message is in the DLQ exactly once, marked with its source and reason. The DLQ is
    // read once it is led by its preferred agent: a leadership move (the balancer's, while
    // the DLQ's first leaders settle) ends a subscription, which would then have to be opened
    // again.
    let dlq_preferred = dlq_set[0];
    cluster
        .wait_view(
            dlq_preferred as usize,
            "the DLQ is led by its preferred agent",
            FORM,
            |v| {
                v.partitions
                    .iter()
                    .filter(|p| p.queue == dlq)
                    .all(|p| p.leader == Some(dlq_preferred))
            },
        )
        .await;
    let dlq_client = sluice_client::Client::connect_any(&cluster.endpoints())
        .await
        .expect("client");
    let mut dead = dlq_client
        .subscribe(&dlq, 64)
        .await
        .expect("subscribe to DLQ");
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let quiet = if seen.len() < keys.len() {
            Duration::from_secs(30)
        } else {
            // All arrived: wait a little longer for duplicates that must not come.
            Duration::from_secs(3)
        };
        let next = match tokio::time::timeout(quiet, dead.next()).await {
            Ok(next) => next.expect("DLQ stream").expect("DLQ subscription open"),
            Err(_) => break,
        };
        let bytes = next
            .message
            .as_ref()
            .map(|m| m.payload.clone())
            .unwrap_or_default();
        let key = ledger::check_payload(&bytes).expect("DLQ payload");
        assert_eq!(next.dead_letter_source, src, "{next:?}");
        assert_eq!(next.dead_letter_reason, "max-deliveries", "{next:?}");
        let headers = next.message.as_ref().map(|m| m.headers.len()).unwrap_or(0);
        assert_eq!(headers, 0, "reserved headers are taken off: {next:?}");
        dead.ack(sluice_client::tag(&next)).expect("ack");
        *seen.entry(key).or_default() += 1;
    }
    dead.flush().await.expect("acks settled");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "dead-lettered more than once: {twice:?}");
    let got: BTreeSet<String> = seen.keys().cloned().collect();
    let want: BTreeSet<String> = keys.iter().cloned().collect();
    assert_eq!(got, want, "every nacked message is in the DLQ");

    // The source is empty: every message was settled as dead-lettered after its copy.
    let stats = cluster.stats(preferred, &src).await.expect("source stats");
    eprintln!("source stats at its leader: {stats:?}");
    let total = stats.total.expect("source totals");
    assert_eq!(total.dead_lettered, keys.len() as u64, "{stats:?}");
    assert_eq!((total.ready, total.in_flight), (0, 0), "{stats:?}");
    if std::env::var_os(cluster::DUMP_LOGS_ENV).is_some() {
        cluster.dump_logs(usize::MAX);
    }
}
