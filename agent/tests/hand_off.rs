//! `sluice-agent hand-off` (the StatefulSet's `preStop`) against real agent processes on
//! loopback: it empties a cluster agent of its leaderships and exits 0, exits 0 on a single
//! agent saying there is nothing to hand off, and refuses bad flags naming them.
//!
//! Run: `cargo test -p sluice-agent --test hand_off -- --nocapture`.

#[path = "support/cluster.rs"]
mod cluster;
mod common;
#[path = "support/netns.rs"]
mod netns;

use std::process::{Command, Output};
use std::time::Duration;

use cluster::{Cluster, Net, queue_spec};
use common::AgentProcess;
use sluice_proto::v1::GetClusterResponse;
use tokio::time::Instant;

/// How long the first elections and the queue's groups may take on a shared 2-core machine.
const FORM: Duration = Duration::from_secs(60);
/// Partitions of the test queue: more than one group for the agent to hand away.
const PARTITIONS: u32 = 3;

/// Runs `sluice-agent hand-off` with `env` as the pod's environment (and nothing else of the
/// test's, so only what the pod sets counts).
fn hand_off(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(common::agent_bin())
        .arg("hand-off")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("the agent binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Agent `i`'s `GetCluster` answer; fails the test naming the agent when it has none.
async fn view_of(cluster: &Cluster, i: usize) -> GetClusterResponse {
    cluster
        .get_cluster(i)
        .await
        .unwrap_or_else(|status| panic!("GetCluster on agent {i}: {status}"))
}

/// Partitions of `queue` that `view` says `node` leads.
fn led_by(view: &GetClusterResponse, queue: &str, node: u64) -> Vec<u32> {
    view.partitions
        .iter()
        .filter(|p| p.queue == queue && p.leader == Some(node))
        .map(|p| p.partition)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_off_with_the_leaders_pod_env_moves_every_leadership_away_and_exits_zero() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = Cluster::start(dir.path(), Net::Loopback).expect("cluster starts");
    cluster
        .declare(queue_spec("orders", PARTITIONS), FORM)
        .await;
    let x = cluster
        .settled_leader("orders", Duration::from_secs(3), FORM)
        .await;
    let node = x as u64;
    let before = view_of(&cluster, x).await;
    assert!(
        !led_by(&before, "orders", node).is_empty(),
        "agent {x} leads partition 0 of orders: {before:?}"
    );

    // The pod's env, as the StatefulSet sets it (the broker's --listen is the test's port).
    let pod_name = format!("local-{x}");
    let listen = cluster.nodes[x].client.to_string();
    let output = hand_off(
        &[("SLUICE_POD_NAME", &pod_name), ("SLUICE_LISTEN", &listen)],
        &[],
    );
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    println!("hand-off of agent {x}: {stdout}{stderr}");
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {stdout} stderr: {stderr}"
    );
    assert!(stdout.contains("leads nothing"), "{stdout}");
    // A follower's view takes a heartbeat or so to learn the new leader.
    let deadline = Instant::now() + Duration::from_millis(1500);
    loop {
        let view = view_of(&cluster, x).await;
        let led = led_by(&view, "orders", node);
        let counted = view
            .agents
            .iter()
            .find(|a| a.node_id == node)
            .map(|a| a.leaders);
        if led.is_empty() && counted == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent {x} still leads partitions {led:?} of orders: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agents that took the leaderships hold them: their balancers run every 2 s and would
    // otherwise hand each partition straight back to its preferred leader, agent x, before
    // the pod that asked to be relieved has stopped.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let view = view_of(&cluster, x).await;
    let led = led_by(&view, "orders", node);
    assert!(led.is_empty(), "agent {x} leads {led:?} again: {view:?}");

    // An ordinal that is not a member: the agent's NOT_FOUND, passed on, naming the field.
    let output = hand_off(
        &[("SLUICE_POD_NAME", "local-7"), ("SLUICE_LISTEN", &listen)],
        &[],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("NotFound") && stderr.contains("node_id"),
        "{stderr}"
    );
}

#[tokio::test]
async fn on_a_single_agent_hand_off_exits_zero_saying_there_is_nothing_to_hand_off() {
    let dir = tempfile::tempdir().expect("temp dir");
    let agent = AgentProcess::spawn(&dir.path().join("data"));
    let listen = agent.grpc.to_string();
    let output = hand_off(&[("SLUICE_POD_NAME", "solo-0")], &["--listen", &listen]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {stdout} stderr: {stderr}"
    );
    assert!(stdout.contains("nothing to hand off"), "{stdout}");
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    for (env, args, flag) in [
        (vec![("SLUICE_POD_NAME", "solo")], vec![], "--pod-name"),
        (vec![], vec!["--pod-name", "orders-x"], "--pod-name"),
        (vec![], vec![], "--pod-name"),
        (
            vec![("SLUICE_POD_NAME", "solo-0")],
            vec!["--listen", "localhost"],
            "--listen",
        ),
        (
            vec![("SLUICE_POD_NAME", "solo-0")],
            vec!["--timeout", "0"],
            "--timeout",
        ),
    ] {
        let output = hand_off(&env, &args);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

#[test]
fn no_agent_listening_exits_1_naming_the_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let listen = format!("0.0.0.0:{port}");
    let output = hand_off(
        &[("SLUICE_POD_NAME", "solo-0"), ("SLUICE_LISTEN", &listen)],
        &["--timeout", "2"],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}
