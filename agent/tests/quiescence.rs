//! Idle partition groups quiesce and wake (issue 16, decision 0025): real `sluice-agent`
//! processes, `--replication-factor 3`, many small queues left idle.
//!
//! - idle groups stop ticking: the AppendEntries the agents send per second no longer grow
//!   with the number of groups (read from `/metrics`), and the liveness exchanges are per
//!   agent pair;
//! - a quiescent group wakes on a write (the publish is confirmed), on a membership change
//!   (a drained agent's groups move away) and when its leader's agent is killed (every group it
//!   led gets a new leader, and nothing confirmed is lost); with that agent still down the
//!   groups quiesce again, and wake when it is back;
//! - a quiescent leader cut off from its followers confirms nothing.
//!
//! Run: `cargo test -p sluice-agent --test quiescence -- --nocapture`.

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
use std::time::Duration;

use cluster::{Cluster, Net, Role, queue_spec};
use ledger::Ledger;
use sluice_proto::v1::DrainAgentRequest;
use tokio::time::Instant;
use workload::Until;

/// Queues (one partition each) left idle.
const QUEUES: usize = 24;
/// Replicas of each.
const RF: &str = "3";
/// How long elections, declares and quiescing may take on two shared cores.
const FORM: Duration = Duration::from_secs(60);
/// The window the AppendEntries rate is read over.
const WINDOW: Duration = Duration::from_secs(4);

/// One cluster at a time: several clusters at once on a 2-core machine turn election
/// timeouts into test failures.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn queue_name(i: usize) -> String {
    format!("idle-{i}")
}

/// Declares the idle queues and waits until every running agent reports `hosted` of its
/// groups quiescent.
async fn declare_and_quiesce(cluster: &Cluster, queues: usize, hosted: &[(usize, f64)]) {
    for i in 0..queues {
        cluster.declare(queue_spec(&queue_name(i), 1), FORM).await;
    }
    wait_quiescent(cluster, hosted).await;
}

/// Waits until agent `i` reports `n` quiescent groups, for every `(i, n)`.
async fn wait_quiescent(cluster: &Cluster, hosted: &[(usize, f64)]) {
    let reached = cluster::wait_until("idle groups quiescent", FORM, || async {
        for &(i, n) in hosted {
            let quiet = cluster
                .metric(i, "sluice_raft_groups{state=\"quiescent\"}")
                .await
                .unwrap_or(0.0);
            if quiet < n {
                return None;
            }
        }
        Some(())
    })
    .await;
    if reached.is_none() {
        for &(i, n) in hosted {
            let quiet = cluster
                .metric(i, "sluice_raft_groups{state=\"quiescent\"}")
                .await;
            let active = cluster
                .metric(i, "sluice_raft_groups{state=\"active\"}")
                .await;
            eprintln!("agent {i}: quiescent {quiet:?} active {active:?}, expected {n}");
        }
        cluster.dump_logs(40);
        panic!("the idle groups did not all quiesce within {FORM:?}");
    }
}

/// AppendEntries (heartbeats and entries) and `Alive` exchanges all `agents` sent.
async fn sent(cluster: &Cluster, agents: &[usize]) -> (f64, f64) {
    let mut appends = 0.0;
    let mut alive = 0.0;
    for &i in agents {
        for kind in ["heartbeat", "entries"] {
            appends += cluster
                .metric(
                    i,
                    &format!("sluice_raft_append_entries_sent_total{{kind=\"{kind}\"}}"),
                )
                .await
                .unwrap_or(0.0);
        }
        alive += cluster
            .metric(i, "sluice_peer_alive_exchanges_total")
            .await
            .unwrap_or(0.0);
    }
    (appends, alive)
}

/// The agent serving (leading) each queue, by queue.
async fn leaders(cluster: &Cluster, queues: usize, among: &[usize]) -> BTreeMap<String, usize> {
    let mut leaders = BTreeMap::new();
    for q in 0..queues {
        let name = queue_name(q);
        let leader = cluster.leader_among(&name, among, FORM).await;
        leaders.insert(name, leader);
    }
    leaders
}

/// Publishes `keys` to `queue` at its leader among `among` and records their confirms in
/// `ledger`; returns the leader.
async fn publish_confirmed(
    cluster: &Cluster,
    among: &[usize],
    queue: &str,
    keys: &[String],
    ledger: &Ledger,
) -> usize {
    let leader = cluster.leader_among(queue, among, FORM).await;
    let confirms = workload::publish_keys(
        cluster.channel(leader),
        queue,
        keys,
        Duration::from_secs(10),
    )
    .await
    .expect("publish");
    for (key, confirm) in keys.iter().zip(confirms) {
        ledger.confirm(key, confirm.id.expect("confirmed"));
    }
    leader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_stop_sending_heartbeats_and_a_write_wakes_one() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start_with(root.path(), Net::Loopback, 3, &["--replication-factor", RF])
        .expect("cluster starts");
    let all = [0, 1, 2];
    let hosted: Vec<(usize, f64)> = all.iter().map(|&i| (i, QUEUES as f64)).collect();
    declare_and_quiesce(&cluster, QUEUES, &hosted).await;

    let (appends_before, alive_before) = sent(&cluster, &all).await;
    tokio::time::sleep(WINDOW).await;
    let (appends_after, alive_after) = sent(&cluster, &all).await;
    let per_second = |a: f64, b: f64| (b - a) / WINDOW.as_secs_f64();
    let appends = per_second(appends_before, appends_after);
    let alive = per_second(alive_before, alive_after);
    // Ticking, the partition groups alone would send QUEUES × 2 followers × 10 heartbeats/s
    // (480/s); what is left is the meta group's (2 followers × 10/s) and its odd entry.
    eprintln!(
        "{QUEUES} idle groups on 3 agents: {appends:.1} AppendEntries/s, {alive:.1} Alive/s (all agents)"
    );
    assert!(
        appends < 40.0,
        "{appends:.1} AppendEntries/s with every partition group quiescent: they grow with the groups"
    );
    assert!(
        alive <= 3.0 * 2.0 * 6.0,
        "{alive:.1} Alive/s: liveness must be per agent pair"
    );

    // What the groups share is per agent: one replication connection per peer, a bounded
    // pool of log flusher threads (not one connection per group and peer, one thread per log).
    for &i in &all {
        let connections = cluster.metric(i, "sluice_peer_connections").await;
        let flushers = cluster.metric(i, "sluice_log_flusher_threads").await;
        eprintln!("agent {i}: {connections:?} peer connections, {flushers:?} flusher threads");
        assert_eq!(connections, Some(2.0), "agent {i}: one connection per peer");
        assert!(
            flushers.is_some_and(|n| (1.0..=32.0).contains(&n)),
            "agent {i}: {flushers:?} flusher threads for {} logs",
            QUEUES + 1
        );
    }

    // A write wakes its group: the publish is confirmed, by a majority as always.
    let leaders = leaders(&cluster, QUEUES, &all).await;
    let queue = queue_name(QUEUES / 2);
    let leader = leaders[&queue];
    let woken_before = cluster
        .metric(leader, "sluice_raft_group_wakeups_total{cause=\"write\"}")
        .await
        .unwrap_or(0.0);
    let sent_at = Instant::now();
    let confirms = workload::publish_keys(
        cluster.channel(leader),
        &queue,
        &["after-the-quiet".to_string()],
        Duration::from_secs(10),
    )
    .await
    .expect("publish to a quiescent group");
    eprintln!(
        "publish to quiescent {queue} at agent {leader} confirmed in {:?}",
        sent_at.elapsed()
    );
    assert_eq!(confirms.len(), 1);
    assert_eq!(confirms[0].code, 0, "{confirms:?}");
    let woken_after = cluster
        .metric(leader, "sluice_raft_group_wakeups_total{cause=\"write\"}")
        .await
        .unwrap_or(0.0);
    assert!(
        woken_after > woken_before,
        "the write did not wake the group ({woken_before} -> {woken_after})"
    );
    // And it goes quiet again once idle.
    wait_quiescent(&cluster, &hosted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_agent_leading_quiet_groups_is_killed_they_elect_and_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let mut cluster =
        Cluster::start_with(root.path(), Net::Loopback, 3, &["--replication-factor", RF])
            .expect("cluster starts");
    let all = [0, 1, 2];
    for i in 0..QUEUES {
        cluster.declare(queue_spec(&queue_name(i), 1), FORM).await;
    }
    // Some confirmed messages in every queue, then idle until quiescent.
    let ledger = Arc::new(Ledger::default());
    for q in 0..QUEUES {
        let queue = queue_name(q);
        let keys: Vec<String> = (0..5).map(|n| format!("{queue}-m{n}")).collect();
        publish_confirmed(&cluster, &all, &queue, &keys, &ledger).await;
    }
    let hosted: Vec<(usize, f64)> = all.iter().map(|&i| (i, QUEUES as f64)).collect();
    wait_quiescent(&cluster, &hosted).await;

    let before = leaders(&cluster, QUEUES, &all).await;
    let mut led: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (queue, leader) in &before {
        led.entry(*leader).or_default().push(queue.clone());
    }
    let (&victim, orphans) = led
        .iter()
        .max_by_key(|(_, queues)| queues.len())
        .expect("leaders");
    let orphans = orphans.clone();
    let survivors: Vec<usize> = all.iter().copied().filter(|i| *i != victim).collect();
    eprintln!(
        "agent {victim} leads {} of {QUEUES} quiescent groups; kill -9",
        orphans.len()
    );
    let killed_at = Instant::now();
    cluster.kill9(victim);

    // Every group it led gets a leader among the survivors, which confirms a publish.
    let mut recovered = Vec::new();
    let mut new_leaders = BTreeMap::<usize, usize>::new();
    let mut pending = orphans.clone();
    while !pending.is_empty() {
        assert!(
            killed_at.elapsed() < FORM,
            "no leader after {FORM:?} for {pending:?}"
        );
        let mut still = Vec::new();
        for queue in pending {
            let mut served = None;
            for &i in &survivors {
                if cluster.role(i, &queue).await == Role::Leader {
                    served = Some(i);
                    break;
                }
            }
            match served {
                Some(i) => {
                    recovered.push(killed_at.elapsed());
                    *new_leaders.entry(i).or_default() += 1;
                    let key = format!("{queue}-after-kill");
                    let confirms = workload::publish_keys(
                        cluster.channel(i),
                        &queue,
                        std::slice::from_ref(&key),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("publish at the new leader");
                    let id = confirms[0].id.expect("confirmed at the new leader");
                    ledger.confirm(&key, id);
                }
                None => still.push(queue),
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    recovered.sort();
    eprintln!(
        "new leaders of the {} orphaned groups by survivor: {new_leaders:?}; serving after \
         (first/median/last) {:?} / {:?} / {:?}",
        orphans.len(),
        recovered.first(),
        recovered.get(recovered.len() / 2),
        recovered.last()
    );

    // With the victim still down, the groups quiesce again (a silent voter keeps none of them
    // ticking), and a write still wakes one and is confirmed by the two that are left.
    let degraded: Vec<(usize, f64)> = survivors.iter().map(|&i| (i, QUEUES as f64)).collect();
    let quiet_from = Instant::now();
    wait_quiescent(&cluster, &degraded).await;
    eprintln!(
        "with agent {victim} down, all {QUEUES} groups quiescent again at the survivors after {:?}",
        quiet_from.elapsed()
    );
    let queue = orphans[0].clone();
    let key = format!("{queue}-while-degraded-and-quiet");
    let leader = publish_confirmed(
        &cluster,
        &survivors,
        &queue,
        std::slice::from_ref(&key),
        &ledger,
    )
    .await;
    eprintln!("a write to quiet, degraded {queue} at agent {leader} was confirmed");

    // The victim comes back: its quiet leaders wake for it, and everything settles quiet on
    // all three again.
    cluster.restart(victim);
    wait_quiescent(&cluster, &hosted).await;

    // Nothing confirmed is lost: every queue is drained at the survivors.
    let endpoints: Vec<String> = survivors
        .iter()
        .map(|&i| format!("http://{}", cluster.nodes[i].client))
        .collect();
    for q in 0..QUEUES {
        workload::consume(
            endpoints.clone(),
            queue_name(q),
            ledger.clone(),
            Until::Quiet(Duration::from_secs(1), Duration::from_secs(30)),
        )
        .await;
    }
    let summary = ledger.summary(None);
    eprintln!(
        "confirmed {} keys; consumed {}; missing {}",
        summary.confirmed,
        summary.consumed,
        summary.missing.len()
    );
    summary.assert_guarantees();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_moves_quiet_groups_away_from_the_drained_agent() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start_with(root.path(), Net::Loopback, 4, &["--replication-factor", RF])
        .expect("cluster starts");
    let queues = 8;
    for i in 0..queues {
        cluster.declare(queue_spec(&queue_name(i), 1), FORM).await;
    }
    // Each agent hosts 3 of 4 replicas' worth: wait until every agent quiesced what it hosts.
    let mut hosted = Vec::new();
    for i in 0..4 {
        let n = (0..queues)
            .filter(|q| {
                cluster.nodes[i]
                    .data_dir
                    .join("queues")
                    .join(queue_name(*q))
                    .exists()
            })
            .count();
        hosted.push((i, n as f64));
    }
    wait_quiescent(&cluster, &hosted).await;
    // Drain the agent hosting the most replicas, through another agent.
    let (target, _) = *hosted
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("agents");
    let entry = (target + 1) % 4;
    cluster
        .membership(entry)
        .drain_agent(DrainAgentRequest {
            node_id: target as u64,
        })
        .await
        .expect("DrainAgent");
    let dir = cluster.nodes[target].data_dir.join("queues");
    let emptied = cluster::wait_until("the drained agent hosts nothing", FORM, || async {
        let left = (0..queues)
            .filter(|q| dir.join(queue_name(*q)).exists())
            .count();
        (left == 0).then_some(())
    })
    .await;
    if emptied.is_none() {
        cluster.dump_logs(40);
        panic!("agent {target} still hosts quiet groups after a drain");
    }
    // Every queue still serves a publish at its (possibly new) leader. The balancer may still
    // move a leadership: an answer that the entry's fate is unknown is resent with its key.
    let rest: Vec<usize> = (0..4).filter(|i| *i != target).collect();
    for q in 0..queues {
        let queue = queue_name(q);
        let deadline = tokio::time::Instant::now() + FORM;
        let confirms = loop {
            let leader = cluster.leader_among(&queue, &rest, FORM).await;
            match workload::publish_keys(
                cluster.channel(leader),
                &queue,
                &[format!("{queue}-after-drain")],
                Duration::from_secs(10),
            )
            .await
            {
                Ok(confirms) => break confirms,
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::Aborted | tonic::Code::Unavailable
                    ) && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(status) => panic!("publish to {queue} after the drain: {status:?}"),
            }
        };
        assert_eq!(confirms[0].code, 0, "{queue}: {confirms:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_leader_cut_off_from_its_followers_confirms_nothing() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let mut cluster = match Cluster::start_with(
        root.path(),
        Net::Namespaces,
        3,
        &["--replication-factor", RF],
    ) {
        Ok(c) => c,
        Err(e) => panic!("network namespaces are required (run as root): {e}"),
    };
    let all = [0, 1, 2];
    let queues = 4;
    let hosted: Vec<(usize, f64)> = all.iter().map(|&i| (i, queues as f64)).collect();
    declare_and_quiesce(&cluster, queues, &hosted).await;
    let queue = queue_name(0);
    let leader = cluster.leader_among(&queue, &all, FORM).await;
    eprintln!("agent {leader} leads quiescent {queue}; cutting it off its peers");
    cluster.isolate(leader);

    // At the cut-off leader a publish is never confirmed.
    let at_old = workload::publish_keys(
        cluster.channel(leader),
        &queue,
        &["cut-off".to_string()],
        Duration::from_secs(4),
    )
    .await;
    let confirmed = at_old
        .as_ref()
        .is_ok_and(|c| c.iter().any(|c| c.code == 0 && c.id.is_some()));
    eprintln!("publish at the cut-off leader: {at_old:?}");
    assert!(!confirmed, "a cut-off quiescent leader confirmed a write");

    // The others elect a leader of their own, which confirms.
    let rest: Vec<usize> = all.iter().copied().filter(|i| *i != leader).collect();
    let new_leader = cluster.leader_among(&queue, &rest, FORM).await;
    let confirms = workload::publish_keys(
        cluster.channel(new_leader),
        &queue,
        &["majority".to_string()],
        Duration::from_secs(10),
    )
    .await
    .expect("publish at the majority's leader");
    assert_eq!(confirms[0].code, 0, "{confirms:?}");
    cluster.heal(leader);

    // Healed, the old leader follows; the unconfirmed write is never delivered.
    let ledger = Arc::new(Ledger::default());
    ledger.confirm("majority", confirms[0].id.expect("id"));
    workload::consume(
        cluster.endpoints(),
        queue.clone(),
        ledger.clone(),
        Until::Quiet(Duration::from_secs(2), Duration::from_secs(30)),
    )
    .await;
    let summary = ledger.summary(Some("cut-off"));
    summary.assert_guarantees();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_leader_stopped_and_resumed_steps_down_and_brings_back_nothing_acked() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let mut cluster =
        Cluster::start_with(root.path(), Net::Loopback, 3, &["--replication-factor", RF])
            .expect("cluster starts");
    let all = [0, 1, 2];
    let queue = queue_name(0);
    cluster.declare(queue_spec(&queue, 1), FORM).await;
    let ledger = Arc::new(Ledger::default());
    let keys: Vec<String> = (0..20).map(|n| format!("m{n}")).collect();
    let leader = publish_confirmed(&cluster, &all, &queue, &keys, &ledger).await;
    wait_quiescent(&cluster, &[(0, 1.0), (1, 1.0), (2, 1.0)]).await;

    // SIGSTOP the quiet leader: the others elect, and everything is consumed and acked there.
    eprintln!("agent {leader} leads quiescent {queue}; SIGSTOP");
    cluster.pause(leader);
    let rest: Vec<usize> = all.iter().copied().filter(|i| *i != leader).collect();
    let new_leader = cluster.leader_among(&queue, &rest, FORM).await;
    eprintln!("agent {new_leader} leads {queue} now");
    let endpoints: Vec<String> = rest
        .iter()
        .map(|&i| format!("http://{}", cluster.nodes[i].client))
        .collect();
    let drained = workload::consume(
        endpoints,
        queue.clone(),
        ledger.clone(),
        Until::Quiet(Duration::from_secs(2), Duration::from_secs(30)),
    )
    .await;
    eprintln!("consumed at the others: {drained:?}");
    assert_eq!(
        ledger.acked(),
        keys.len(),
        "every message acked at the new leader"
    );

    // Resumed, the old leader learns of the new one at once and steps down.
    cluster.resume(leader);
    let resumed = Instant::now();
    let stepped_down = cluster::wait_until("the resumed leader steps down", FORM, || async {
        (cluster.role(leader, &queue).await != Role::Leader).then_some(())
    })
    .await;
    eprintln!("resumed leader stepped down after {:?}", resumed.elapsed());
    assert!(stepped_down.is_some(), "agent {leader} still leads {queue}");
    workload::consume(
        cluster.endpoints(),
        queue.clone(),
        ledger.clone(),
        Until::Quiet(Duration::from_secs(2), Duration::from_secs(30)),
    )
    .await;
    ledger.summary(None).assert_guarantees();
}
