//! A three-replica Raft group of one partition, in one process: each replica has its own
//! `FileLog` in a temporary directory and its own tonic peer server on `127.0.0.1:0`, and they
//! talk real gRPC over loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use prost::Message as _;
use sluice_agent::config::LogConfig;
use sluice_agent::log::{FileLog, LogStore};
use sluice_agent::queue::state::StateConfig;
use sluice_agent::replication::codec;
use sluice_agent::replication::meta::MetaFile;
use sluice_agent::replication::{
    NodeId, PeerNetwork, PeerService, QueueStateMachine, Raft, RaftGroups, ReplicatedLog,
};
use sluice_proto::storage::v1::{LogCommand, PublishCommand, log_command::Command};
use sluice_proto::v1::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

/// The Raft group's name, carried by every peer request.
const GROUP: &str = "orders/0";
/// How long a step (election, replication) may take before the test fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// One replica: its storage, Raft and peer server.
struct Replica {
    id: NodeId,
    addr: SocketAddr,
    dir: PathBuf,
    raft: Raft,
    state_machine: QueueStateMachine,
    log: Arc<dyn LogStore>,
    server: JoinHandle<()>,
}

fn raft_config() -> Arc<Config> {
    let config = Config {
        cluster_name: "replication-test".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        // Snapshots would need the log-restart hook (decision 0008); this test exercises
        // catch-up from the log.
        snapshot_policy: SnapshotPolicy::Never,
        ..Default::default()
    };
    Arc::new(config.validate().expect("valid raft config"))
}

fn state_config() -> StateConfig {
    StateConfig {
        ack_timeout_ms: 30_000,
        max_deliveries: 0,
        has_dead_letter_queue: false,
        dedup_window_ms: 0,
    }
}

impl Replica {
    /// Opens (or reopens) the replica's storage in `dir` and serves it on `listener`.
    async fn start(id: NodeId, dir: &Path, listener: TcpListener) -> Replica {
        let addr = listener.local_addr().expect("bound address");
        let (log, _recovery) =
            FileLog::open(&dir.join("log"), LogConfig::default()).expect("open the partition log");
        let log: Arc<dyn LogStore> = Arc::new(log);
        let state_machine = QueueStateMachine::new(state_config(), log.clone());
        let store = ReplicatedLog::open(
            log.clone(),
            MetaFile::new(dir.join("raft")),
            state_machine.purge_floor(),
        )
        .expect("open the raft meta");
        let raft = Raft::new(
            id,
            raft_config(),
            PeerNetwork::new(GROUP),
            store,
            state_machine.clone(),
        )
        .await
        .expect("start raft");
        let groups = RaftGroups::new();
        groups.insert(GROUP, raft.clone());
        let service = PeerService::new(groups).into_server();
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
            if let Err(e) = result {
                eprintln!("peer server of node {id} ended: {e}");
            }
        });
        Replica {
            id,
            addr,
            dir: dir.to_path_buf(),
            raft,
            state_machine,
            log,
            server,
        }
    }

    /// Kills the replica: its peer server stops answering and its Raft stops; storage closes.
    async fn stop(self) -> (NodeId, SocketAddr, PathBuf) {
        self.server.abort();
        let _ = self.server.await;
        self.raft.shutdown().await.expect("raft shuts down");
        (self.id, self.addr, self.dir)
    }
}

fn publish(payload: &str) -> Bytes {
    Bytes::from(
        LogCommand {
            command: Some(Command::Publish(PublishCommand {
                message: Some(Message {
                    payload: payload.as_bytes().to_vec(),
                    ..Default::default()
                }),
                publish_time_ms: 1,
                ..Default::default()
            })),
        }
        .encode_to_vec(),
    )
}

async fn start_cluster(root: &Path) -> Vec<Replica> {
    let mut replicas = Vec::new();
    for id in 1..=3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        replicas.push(Replica::start(id, &root.join(format!("node-{id}")), listener).await);
    }
    let members: BTreeMap<NodeId, BasicNode> = replicas
        .iter()
        .map(|r| (r.id, BasicNode::new(r.addr.to_string())))
        .collect();
    replicas[0]
        .raft
        .initialize(members)
        .await
        .expect("initialize the group");
    replicas
}

/// Waits until the given replicas agree on one leader among them and returns its id.
async fn wait_for_leader(replicas: &[Replica]) -> NodeId {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let leaders: BTreeSet<Option<NodeId>> = replicas
            .iter()
            .map(|r| r.raft.metrics().borrow().current_leader)
            .collect();
        if let [Some(leader)] = leaders.iter().collect::<Vec<_>>()[..]
            && replicas
                .iter()
                .any(|r| r.id == *leader && r.raft.metrics().borrow().state == ServerState::Leader)
        {
            return *leader;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agreed leader within {STEP_TIMEOUT:?}: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn replica(replicas: &[Replica], id: NodeId) -> &Replica {
    replicas
        .iter()
        .find(|r| r.id == id)
        .expect("replica exists")
}

async fn write(raft: &Raft, payload: &str) -> u64 {
    let response = tokio::time::timeout(STEP_TIMEOUT, raft.client_write(publish(payload)))
        .await
        .expect("the write commits in time")
        .expect("the write commits");
    // The applied result names the partition-log index: the message's offset.
    assert_eq!(response.data.index, codec::log_index(response.log_id.index));
    response.data.index
}

async fn wait_applied(replica: &Replica, index: u64) {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while replica.state_machine.applied_index().await < index {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {} applied only {} of {index}",
            replica.id,
            replica.state_machine.applied_index().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every payload published, in log order, as the replica's own partition log holds it.
fn stored_payloads(log: &dyn LogStore) -> Vec<String> {
    let mut out = Vec::new();
    for index in log.first_index()..log.next_index() {
        let entry = log.read(index).expect("read").expect("entry present");
        let command = LogCommand::decode(entry.data.as_ref()).expect("a LogCommand");
        if let Some(Command::Publish(p)) = command.command {
            let payload = p.message.expect("message").payload;
            out.push(String::from_utf8(payload).expect("utf-8"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_commit_on_a_quorum_survive_leader_loss_and_a_restarted_replica_catches_up() {
    let root = tempfile::tempdir().expect("tempdir");

    // Phase 1: three replicas elect a leader and replicate writes to every log.
    let mut replicas = start_cluster(root.path()).await;
    let leader = wait_for_leader(&replicas).await;
    let mut last = 0;
    for i in 0..50 {
        last = write(&replica(&replicas, leader).raft, &format!("m{i}")).await;
    }
    for r in &replicas {
        wait_applied(r, last).await;
    }
    let expected: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    for r in &replicas {
        assert_eq!(stored_payloads(r.log.as_ref()), expected, "node {}", r.id);
        let unsettled = r.state_machine.with_state(|s| s.backlog().0).await;
        assert_eq!(unsettled, 50, "node {} delivery state", r.id);
    }

    // Phase 2: the leader dies; the two survivors elect a new one and keep committing.
    let position = replicas
        .iter()
        .position(|r| r.id == leader)
        .expect("leader");
    let (old_id, old_addr, old_dir) = replicas.remove(position).stop().await;
    let new_leader = wait_for_leader(&replicas).await;
    assert_ne!(new_leader, old_id);
    for i in 50..80 {
        last = write(&replica(&replicas, new_leader).raft, &format!("m{i}")).await;
    }

    // Phase 3: the old leader restarts on its address from its own files and catches up.
    let listener = TcpListener::bind(old_addr)
        .await
        .expect("rebind the old address");
    let restarted = Replica::start(old_id, &old_dir, listener).await;
    wait_applied(&restarted, last).await;
    let expected: Vec<String> = (0..80).map(|i| format!("m{i}")).collect();
    assert_eq!(stored_payloads(restarted.log.as_ref()), expected);
    replicas.push(restarted);
    for r in replicas {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_without_a_quorum_cannot_commit() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut replicas = start_cluster(root.path()).await;
    let leader = wait_for_leader(&replicas).await;
    let index = write(&replica(&replicas, leader).raft, "before").await;

    // Stop both followers: the leader may append locally but must not commit.
    let followers: Vec<NodeId> = replicas
        .iter()
        .map(|r| r.id)
        .filter(|id| *id != leader)
        .collect();
    for id in followers {
        let position = replicas.iter().position(|r| r.id == id).expect("follower");
        replicas.remove(position).stop().await;
    }
    let lone = replica(&replicas, leader);
    let attempt = tokio::time::timeout(
        Duration::from_secs(2),
        lone.raft.client_write(publish("after")),
    )
    .await;
    assert!(
        attempt.is_err(),
        "a write committed without a quorum: {attempt:?}"
    );
    assert_eq!(lone.state_machine.applied_index().await, index);
    for r in replicas {
        r.stop().await;
    }
}
