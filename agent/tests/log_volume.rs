//! What three idle agents write to their logs with the default filter: Sluice's own lines, no
//! dependency chatter. openraft logs vote handling and leader leases at INFO for every group;
//! at 900 partitions that was ~100 MB per agent in five minutes (issue 12, item 8).
//!
//! Run: `cargo test -p sluice-agent --test log_volume -- --nocapture`.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/netns.rs"]
mod netns;

use std::time::Duration;

use cluster::{Cluster, Net, queue_spec};
use sluice_agent::config::LOG_LEVEL_DEFAULT;

/// Queues declared (3 partitions each): enough groups that per-group chatter would show.
const QUEUES: usize = 30;
/// How long the idle cluster is watched.
const IDLE: Duration = Duration::from_secs(10);
/// Most lines one idle agent may write in [`IDLE`] (a few of Sluice's own are fine).
const IDLE_LINES_MAX: usize = 10;

#[tokio::test]
async fn idle_agents_with_the_default_filter_write_no_dependency_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start_with(
        dir.path(),
        Net::Loopback,
        cluster::NODES,
        &["--log-level", LOG_LEVEL_DEFAULT],
    )
    .expect("cluster");
    for q in 0..QUEUES {
        cluster
            .declare(queue_spec(&format!("idle-{q}"), 3), Duration::from_secs(30))
            .await;
    }
    // Let elections, the balancer's moves and the catalog settle, then watch an idle cluster.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let before: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| n.log_lines("").len())
        .collect();
    tokio::time::sleep(IDLE).await;
    for (i, node) in cluster.nodes.iter().enumerate() {
        let lines = node.log_lines("");
        let dependency: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("openraft") && !(l.contains("WARN") || l.contains("ERROR")))
            .collect();
        assert!(
            dependency.is_empty(),
            "agent {i} wrote {} openraft lines below WARN, e.g. {:?}",
            dependency.len(),
            dependency.first()
        );
        let idle = lines.len() - before[i];
        assert!(
            idle <= IDLE_LINES_MAX,
            "agent {i} wrote {idle} lines in {IDLE:?} idle: {:?}",
            &lines[before[i]..]
        );
    }
}
