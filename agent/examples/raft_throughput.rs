//! Confirmed-write throughput of one three-replica Raft group: each replica has a real
//! `FileLog` (`FsyncPolicy::Always`) in a temporary directory and its own peer server on
//! loopback gRPC, all in this process; `writers` tasks call `Raft::client_write` on the leader
//! back to back with a 256-byte publish each, for `seconds`. Prints writes/s, the latency
//! distribution, the process CPU time per second and the replication round trips observed.
//!
//! ```text
//! cargo run --release -p sluice-agent --example raft_throughput -- [writers] [seconds] [tuned|untuned] [always|never] [messages-per-entry]
//! ```
//!
//! `always|never` is the fsync policy (default `always`); `never` shows what the disk costs.
//! `messages-per-entry` (default 1) sizes each entry as that many 256-byte messages packed
//! together, the way a proposer that packs a publish batch into one entry would; the rate is
//! then also printed in messages per second.
//!
//! `untuned` runs the openraft settings the replication tests used before tuning (decision 0008,
//! "Tuning"), for before/after figures.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use prost::Message as _;
use sluice_agent::config::{FsyncPolicy, LogConfig};
use sluice_agent::log::{FileLog, LogStore};
use sluice_agent::queue::state::StateConfig;
use sluice_agent::replication::meta::MetaFile;
use sluice_agent::replication::service::{peer_incoming, peer_server};
use sluice_agent::replication::{
    NodeId, PeerNetwork, PeerService, QueueStateMachine, Raft, RaftGroups, ReplicatedLog,
    raft_config,
};
use sluice_proto::storage::v1::{LogCommand, PublishCommand, log_command::Command};
use sluice_proto::v1::Message;
use tokio::net::TcpListener;

const GROUP: &str = "bench/0";
const PAYLOAD_BYTES: usize = 256;

/// The settings the replication tests ran with before tuning.
fn untuned_config() -> Config {
    Config {
        cluster_name: "raft-throughput".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        snapshot_policy: SnapshotPolicy::Never,
        ..Default::default()
    }
}

fn publish(payload: &[u8]) -> Bytes {
    Bytes::from(
        LogCommand {
            command: Some(Command::Publish(PublishCommand {
                message: Some(Message {
                    payload: payload.to_vec(),
                    ..Default::default()
                }),
                publish_time_ms: 1,
                ..Default::default()
            })),
        }
        .encode_to_vec(),
    )
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    ticks / 100.0
}

async fn start_replica(
    id: NodeId,
    dir: &Path,
    config: Arc<Config>,
    tuned: bool,
    fsync: FsyncPolicy,
) -> anyhow::Result<Raft> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (log, _) = FileLog::open(
        &dir.join("log"),
        LogConfig {
            fsync,
            ..LogConfig::default()
        },
    )?;
    let log: Arc<dyn LogStore> = Arc::new(log);
    let state_config = StateConfig {
        ack_timeout_ms: 30_000,
        max_deliveries: 0,
        has_dead_letter_queue: false,
        dedup_window_ms: 0,
    };
    let state_machine = QueueStateMachine::new(state_config, log.clone());
    let store = ReplicatedLog::open(
        log,
        MetaFile::new(dir.join("raft")),
        state_machine.purge_floor(),
    )?;
    let raft = Raft::new(id, config, PeerNetwork::new(GROUP), store, state_machine).await?;
    let groups = RaftGroups::new();
    groups.insert(GROUP, raft.clone());
    let service = PeerService::new(groups).into_server();
    tokio::spawn(async move {
        // Untuned: tonic's default server and accepted sockets as they come (Nagle on), as
        // before tuning.
        let served = if tuned {
            peer_server()
                .add_service(service)
                .serve_with_incoming(peer_incoming(listener))
                .await
        } else {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        };
        if let Err(e) = served {
            eprintln!("peer server {addr} ended: {e}");
        }
    });
    ADDRS.lock().expect("addrs").insert(id, addr.to_string());
    Ok(raft)
}

static ADDRS: std::sync::Mutex<BTreeMap<NodeId, String>> = std::sync::Mutex::new(BTreeMap::new());

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let writers: usize = args.get(1).map_or(Ok(64), |s| s.parse())?;
    let seconds: u64 = args.get(2).map_or(Ok(5), |s| s.parse())?;
    let tuned = args.get(3).is_none_or(|s| s != "untuned");
    let fsync = match args.get(4).map(String::as_str) {
        Some("never") => FsyncPolicy::Never,
        _ => FsyncPolicy::Always,
    };
    let per_entry: usize = args.get(5).map_or(Ok(1), |s| s.parse())?;
    let config = if tuned {
        raft_config("raft-throughput", 0)
    } else {
        untuned_config()
    };
    let config = Arc::new(config.validate()?);

    let root = tempfile::tempdir()?;
    let mut rafts = Vec::new();
    for id in 1..=3 {
        let dir = root.path().join(format!("node-{id}"));
        rafts.push(start_replica(id, &dir, config.clone(), tuned, fsync).await?);
    }
    let members: BTreeMap<NodeId, BasicNode> = ADDRS
        .lock()
        .expect("addrs")
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
        .collect();
    rafts[0].initialize(members).await?;
    let leader = loop {
        if let Some(r) = rafts
            .iter()
            .find(|r| r.metrics().borrow().state == ServerState::Leader)
        {
            break r.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let data = publish(&vec![0x5a; PAYLOAD_BYTES * per_entry]);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (leader, data) = (leader.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let start = Instant::now();
                leader.client_write(data.clone()).await?;
                latencies.push(start.elapsed());
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.context("writer task")??);
    }
    let (elapsed, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - cpu0);
    latencies.sort_unstable();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "config={} fsync={fsync:?} writers={writers} per_entry={per_entry} writes={} \
         elapsed={elapsed:.2}s rate={:.0}/s msgs={:.0}/s latency_ms p50={:.2} p99={:.2} \
         max={:.2} cpu={:.0}%",
        if tuned { "tuned" } else { "untuned" },
        latencies.len(),
        latencies.len() as f64 / elapsed,
        (latencies.len() * per_entry) as f64 / elapsed,
        at(0.5),
        at(0.99),
        at(1.0),
        cpu / elapsed * 100.0,
    );
    for raft in rafts {
        raft.shutdown().await?;
    }
    Ok(())
}
