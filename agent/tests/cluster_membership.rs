//! Membership changes of a running cluster (issue 3, "placement and membership"; decision
//! 0011): real `sluice-agent` processes on loopback, under publish and consume load, scale out
//! by one agent and scale in by another through `sluice.v1.Membership`, with nothing lost.
//!
//! Also: a replica that lost its disk rejoins as a learner and votes again once caught up.
//!
//! Run: `cargo test -p sluice-agent --test cluster_membership -- --nocapture`
//! (about 30 s; the cluster tests take turns). `SLUICE_FAULT_TEST_LOGS=1` prints every agent's stderr at the end.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/ledger.rs"]
mod ledger;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/workload.rs"]
mod workload;

use std::sync::Arc;
use std::time::Duration;

use cluster::{Cluster, Net, queue_spec, state_of};
use ledger::Ledger;
use sluice_proto::v1::membership_client::MembershipClient;
use sluice_proto::v1::{
    AddAgentRequest, AgentState, DrainAgentRequest, GetClusterRequest, HandOffLeadershipRequest,
    RemoveAgentRequest,
};
use workload::{Load, Until};

/// Partitions of the test queue: more than one group whose membership must change.
const PARTITIONS: u32 = 2;
/// How long an election (or the first meta leader) may take before a test fails.
const ELECTION: Duration = Duration::from_secs(15);
/// How long a membership change (join to ACTIVE, drain to DRAINED) may take under load.
const CHANGE: Duration = Duration::from_secs(90);
/// Messages per publish batch.
const BATCH: usize = 20;

/// One cluster at a time: two clusters of three or four agents at once on a 2-core machine
/// would turn election timeouts into test failures.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A queue name whose preferred leader is agent 0 both among the three bootstrap agents and
/// among four: agent 0 then leads the queue's partitions when it is drained.
fn queue_led_by_agent_0() -> String {
    (0..1_000)
        .map(|n| format!("orders-{n}"))
        .find(|name| {
            sluice_agent::cluster::placement(name, 0, 3, &[0, 1, 2])[0] == 0
                && sluice_agent::cluster::placement(name, 0, 4, &[0, 1, 2, 3])[0] == 0
                // Placed on the joining agent 3 too (replication factor 3 of 4 agents).
                && sluice_agent::cluster::placement(name, 0, 3, &[0, 1, 2, 3]).contains(&3)
        })
        .expect("some name prefers agent 0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joins_and_another_drains_under_load_without_losing_a_message() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(root.path(), Net::Loopback).expect("cluster starts");
    let queue = queue_led_by_agent_0();
    cluster
        .declare(queue_spec(&queue, PARTITIONS), ELECTION)
        .await;
    let leader = cluster
        .settled_leader(&queue, Duration::from_secs(3), ELECTION * 2)
        .await;
    eprintln!("queue {queue} led by agent {leader}");

    // Phase 1: the bootstrap agents are ACTIVE members from the start.
    let view = cluster
        .wait_view(1, "three ACTIVE agents", ELECTION, |v| {
            v.agents.len() == 3
                && v.agents.iter().all(|a| a.state() == AgentState::Active)
                && v.agents.iter().all(|a| !a.client_address.is_empty())
        })
        .await;
    assert_eq!(view.replication_factor, 3);
    assert_eq!(view.partitions.len(), PARTITIONS as usize);
    let ledger = Arc::new(Ledger::default());
    let load = Load::start(cluster.endpoints(), &queue, &ledger, 2, "k", BATCH);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Phase 2: a fourth agent starts beyond --peers and is added through agent 1.
    let new = cluster
        .start_joining(root.path())
        .expect("joining agent starts");
    let add = AddAgentRequest {
        node_id: new as u64,
        peer_address: cluster.nodes[new].peer.to_string(),
        client_address: cluster.nodes[new].client.to_string(),
    };
    let added = cluster
        .membership(1)
        .add_agent(add.clone())
        .await
        .expect("AddAgent")
        .into_inner()
        .agent
        .expect("the agent as recorded");
    assert!(
        matches!(added.state(), AgentState::Joining | AgentState::Active),
        "{added:?}"
    );
    // Idempotent: the same request again (at another agent) changes nothing.
    let again = cluster
        .membership(2)
        .add_agent(add.clone())
        .await
        .expect("AddAgent again")
        .into_inner()
        .agent
        .expect("agent");
    assert_eq!(again.peer_address, add.peer_address);
    // Conflicting addresses are refused.
    let conflict = cluster
        .membership(0)
        .add_agent(AddAgentRequest {
            client_address: "127.0.0.1:1".into(),
            ..add.clone()
        })
        .await
        .expect_err("other addresses for a known agent");
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists, "{conflict:?}");
    let malformed = cluster
        .membership(0)
        .add_agent(AddAgentRequest {
            node_id: 9,
            peer_address: "no-port".into(),
            ..add.clone()
        })
        .await
        .expect_err("a malformed address");
    assert_eq!(
        malformed.code(),
        tonic::Code::InvalidArgument,
        "{malformed:?}"
    );
    assert!(
        malformed.message().starts_with("peer_address: "),
        "{malformed:?}"
    );
    let taken = cluster
        .membership(0)
        .add_agent(AddAgentRequest {
            node_id: 9,
            ..add.clone()
        })
        .await
        .expect_err("another agent's addresses");
    assert_eq!(taken.code(), tonic::Code::AlreadyExists, "{taken:?}");

    let new_id = new as u64;
    let view = cluster
        .wait_view(
            new,
            "the new agent is ACTIVE and votes in every partition",
            CHANGE,
            |v| {
                state_of(v, new_id) == Some(AgentState::Active)
                    && v.partitions.len() == PARTITIONS as usize
                    && v.partitions.iter().all(|p| p.voters.contains(&new_id))
            },
        )
        .await;
    eprintln!("after the join: {:?}", view.agents);

    // Phase 3: agent 0, which leads the queue, is drained.
    let drained = cluster
        .membership(new)
        .drain_agent(DrainAgentRequest { node_id: 0 })
        .await
        .expect("DrainAgent")
        .into_inner()
        .agent
        .expect("agent");
    assert!(
        matches!(drained.state(), AgentState::Draining | AgentState::Drained),
        "{drained:?}"
    );
    // Removing it before it is drained is refused.
    let early = cluster
        .membership(1)
        .remove_agent(RemoveAgentRequest { node_id: 1 })
        .await
        .expect_err("remove an ACTIVE agent");
    assert_eq!(early.code(), tonic::Code::FailedPrecondition, "{early:?}");
    let view = cluster
        .wait_view(1, "agent 0 is DRAINED and holds no replica", CHANGE, |v| {
            state_of(v, 0) == Some(AgentState::Drained)
                && v.partitions
                    .iter()
                    .all(|p| !p.voters.contains(&0) && !p.learners.contains(&0))
                && v.partitions
                    .iter()
                    .all(|p| p.leader.is_some_and(|l| l != 0))
        })
        .await;
    eprintln!("after the drain: {:?}", view.partitions);
    // Each membership change ran between two of its leader's entries, at indices the leader
    // had reserved: no leader found an entry it did not expect (which would have aborted the
    // confirms it was waiting for and rebuilt its state).
    for node in &cluster.nodes {
        let resyncs = node.log_lines("landed at an unexpected index");
        assert!(
            resyncs.is_empty(),
            "agent {} resynchronised {} times: {:?}",
            node.index,
            resyncs.len(),
            resyncs.first()
        );
    }
    // Draining again is idempotent.
    let again = cluster
        .membership(2)
        .drain_agent(DrainAgentRequest { node_id: 0 })
        .await
        .expect("DrainAgent again")
        .into_inner()
        .agent
        .expect("agent");
    assert_eq!(again.state(), AgentState::Drained);

    // Phase 4: three ACTIVE agents remain, the replication factor: no further drain.
    let refused = cluster
        .membership(2)
        .drain_agent(DrainAgentRequest { node_id: 1 })
        .await
        .expect_err("drain below the replication factor");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("replication factor"),
        "{refused:?}"
    );
    let view = cluster.get_cluster(2).await.expect("GetCluster");
    assert_eq!(
        state_of(&view, 1),
        Some(AgentState::Active),
        "nothing changed"
    );

    // Phase 5: agent 0 is forgotten and stopped; the load goes on.
    cluster
        .membership(1)
        .remove_agent(RemoveAgentRequest { node_id: 0 })
        .await
        .expect("RemoveAgent");
    cluster
        .membership(2)
        .remove_agent(RemoveAgentRequest { node_id: 0 })
        .await
        .expect("RemoveAgent of a removed agent");
    let view = cluster
        .wait_view(2, "agent 0 is forgotten", ELECTION, |v| {
            state_of(v, 0).is_none()
        })
        .await;
    assert_eq!(view.agents.len(), 3);
    cluster.kill9(0);
    let before = ledger.confirmed();
    cluster::wait_until("confirms after agent 0 stopped", ELECTION, || async {
        (ledger.confirmed() > before + BATCH).then_some(())
    })
    .await
    .expect("the cluster confirms publishes without agent 0");
    load.stop().await;

    // Phase 6: everything confirmed is consumed, nothing acked comes back.
    let survivors: Vec<String> = [1, 2, new]
        .iter()
        .map(|&i| format!("http://{}", cluster.nodes[i].client))
        .collect();
    let drained = workload::consume(
        survivors,
        queue.clone(),
        ledger.clone(),
        Until::Quiet(Duration::from_secs(3), Duration::from_secs(30)),
    )
    .await;
    eprintln!("drain: {drained:?}");
    let summary = ledger.summary(None);
    eprintln!(
        "confirmed {} keys; consumed {} in {} deliveries ({} redeliveries); missing {}, \
         acked-then-redelivered {}, corrupted {}",
        summary.confirmed,
        summary.consumed,
        summary.deliveries,
        summary.redeliveries,
        summary.missing.len(),
        summary.resurrected.len(),
        summary.corrupted.len(),
    );
    assert!(summary.confirmed > 0, "the load confirmed nothing");
    summary.assert_guarantees();

    // Phase 7: a hand-off asked at another agent moves the queue leader's leaderships away
    // (three voters remain, for which a transfer is exact).
    let view = cluster.get_cluster(2).await.expect("GetCluster");
    let leader = view.partitions[0].leader.expect("partition 0 has a leader");
    let asked = [1, 2, new]
        .into_iter()
        .find(|&i| i as u64 != leader)
        .expect("another agent");
    let handed = cluster
        .membership(asked)
        .hand_off_leadership(HandOffLeadershipRequest { node_id: leader })
        .await
        .expect("HandOffLeadership")
        .into_inner();
    eprintln!("hand-off of agent {leader}, asked at agent {asked}: {handed:?}");
    assert!(handed.moved >= 1, "{handed:?}");
    assert!(handed.remaining.is_empty(), "{handed:?}");
    // The asked agent learns each new leader from its first heartbeat; the new leaders hold
    // the partitions rather than handing them back to their preferred leader.
    cluster
        .wait_view(
            asked,
            "no partition led by the relieved agent",
            ELECTION,
            |v| v.partitions.iter().all(|p| p.leader != Some(leader)),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let view = cluster.get_cluster(asked).await.expect("GetCluster");
    assert!(
        view.partitions.iter().all(|p| p.leader != Some(leader)),
        "leadership came back to agent {leader}: {:?}",
        view.partitions
    );
}

#[tokio::test]
async fn a_single_agent_answers_membership_calls_with_failed_precondition() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = sluice_agent::server::Agent::start(
        dir.path().to_owned(),
        sluice_agent::config::LogConfig::default(),
        "127.0.0.1:0".parse().expect("address"),
        "127.0.0.1:0".parse().expect("address"),
    )
    .await
    .expect("agent starts");
    let addr = agent.grpc_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(agent.run(async {
        let _ = stopped.await;
    }));
    let mut client = MembershipClient::new(cluster::channel_to(&format!("http://{addr}")));
    let status = client
        .get_cluster(GetClusterRequest {})
        .await
        .expect_err("no cluster");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let status = client
        .drain_agent(DrainAgentRequest { node_id: 0 })
        .await
        .expect_err("no cluster");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let _ = stop.send(());
    server.await.expect("server task").expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_disk_rejoins_as_a_learner_and_votes_again_once_caught_up() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let mut cluster = Cluster::start(root.path(), Net::Loopback).expect("cluster starts");
    let queue = queue_led_by_agent_0();
    cluster
        .declare(queue_spec(&queue, PARTITIONS), ELECTION)
        .await;
    let leader = cluster
        .settled_leader(&queue, Duration::from_secs(3), ELECTION * 2)
        .await;
    let follower = (leader + 1) % 3;
    let ledger = Arc::new(Ledger::default());
    let load = Load::start(cluster.endpoints(), &queue, &ledger, 2, "k", BATCH);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Phase 1: a follower loses its whole data directory and starts again, empty.
    cluster.kill9(follower);
    cluster.wipe(follower);
    cluster.restart(follower);
    eprintln!("agent {follower} restarted with an empty data directory; leader {leader}");

    // Phase 2: the leader notices that it lost acknowledged entries and demotes it ...
    let needle = format!("Demote {{ node: {follower} }}");
    cluster::wait_until("the leader demotes the emptied replica", CHANGE, || async {
        let lines = cluster.nodes[leader].log_lines(&needle);
        lines
            .iter()
            .any(|l| l.contains(&format!("{queue}/")))
            .then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("agent {leader} never demoted agent {follower}"));

    // ... and promotes it once it has caught up: it votes in every partition again.
    let follower_id = follower as u64;
    cluster
        .wait_view(
            leader,
            "the rebuilt replica is a voter of every partition again",
            CHANGE,
            |v| {
                v.partitions.len() == PARTITIONS as usize
                    && v.partitions
                        .iter()
                        .all(|p| p.voters.contains(&follower_id) && p.learners.is_empty())
            },
        )
        .await;
    let before = ledger.confirmed();
    cluster::wait_until("confirms after the rebuild", ELECTION, || async {
        (ledger.confirmed() > before + BATCH).then_some(())
    })
    .await
    .expect("the cluster confirms publishes");
    load.stop().await;

    // Phase 3: nothing confirmed is lost, nothing acked comes back.
    let drained = workload::consume(
        cluster.endpoints(),
        queue.clone(),
        ledger.clone(),
        Until::Quiet(Duration::from_secs(3), Duration::from_secs(30)),
    )
    .await;
    eprintln!("drain: {drained:?}");
    let summary = ledger.summary(None);
    eprintln!(
        "confirmed {} keys; consumed {} in {} deliveries ({} redeliveries); missing {}",
        summary.confirmed,
        summary.consumed,
        summary.deliveries,
        summary.redeliveries,
        summary.missing.len(),
    );
    summary.assert_guarantees();
}

/// Pods of a StatefulSet may start minutes apart (one lands on a node still pulling the
/// image). The first agent, given the operator's queues file, waits for its peers to form the
/// catalog instead of exiting when one proposal timeout (10 s) passes with no leader; once
/// they come, every agent starts and serves the file's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_peers_start_late_waits_for_them_to_declare_the_queues_file() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().expect("temp dir");
    let file = root.path().join("queues.json");
    std::fs::write(
        &file,
        r#"[{"name": "late", "partitions": 1, "replicationFactor": 3}]"#,
    )
    .expect("write queues file");
    let file = file.to_str().expect("utf-8 path").to_owned();
    let alone = Duration::from_secs(12);
    let cluster = tokio::task::block_in_place(|| {
        Cluster::start_apart(root.path(), 3, &["--queues-file", &file], alone)
    })
    .unwrap_or_else(|e| panic!("the cluster did not start: {e}"));
    let waited = cluster.nodes[0].log_lines("waiting for the cluster catalog");
    assert!(
        !waited.is_empty(),
        "agent 0 was alone for {alone:?}, longer than a proposal timeout, yet never waited"
    );
    for i in 0..3 {
        let stats = cluster
            .stats(i, "late")
            .await
            .unwrap_or_else(|e| panic!("the queues file's queue on agent {i}: {e}"));
        assert_eq!(stats.partitions.len(), 1, "agent {i}: {stats:?}");
    }
}
