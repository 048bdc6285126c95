//! A three-replica Raft group of one partition, in one process: each replica has its own
//! `FileLog` in a temporary directory and its own tonic peer server on `127.0.0.1:0`, and they
//! talk real gRPC over loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openraft::storage::RaftLogStorage as _;
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use prost::Message as _;
use sluice_agent::config::LogConfig;
use sluice_agent::log::{FileLog, LogStore};
use sluice_agent::queue::state::{PartitionState, StateConfig};
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
    /// Ends the peer server, closing its connections as a killed process would.
    stop_server: tokio::sync::oneshot::Sender<()>,
}

fn raft_config() -> Arc<Config> {
    raft_config_with(SnapshotPolicy::Never)
}

fn raft_config_with(snapshot_policy: SnapshotPolicy) -> Arc<Config> {
    let config = Config {
        cluster_name: "replication-test".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        snapshot_policy,
        // Purge as soon as a snapshot covers the entries, so a lost replica must be rebuilt
        // from the snapshot rather than from the log.
        max_in_snapshot_log_to_keep: 0,
        purge_batch_size: 1,
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
        Self::start_with(id, dir, listener, raft_config()).await
    }

    /// Like the agent does: the state machine owns the replica's log (snapshots are written
    /// into it) and recovers from it up to the saved commit hint before Raft starts.
    async fn start_with(
        id: NodeId,
        dir: &Path,
        listener: TcpListener,
        config: Arc<Config>,
    ) -> Replica {
        let addr = listener.local_addr().expect("bound address");
        let (log, _recovery) =
            FileLog::open(&dir.join("log"), LogConfig::default()).expect("open the partition log");
        let log: Arc<dyn LogStore> = Arc::new(log);
        let state = Arc::new(std::sync::Mutex::new(PartitionState::new(
            state_config(),
            log.first_index(),
        )));
        let state_machine = QueueStateMachine::shared(
            state_config(),
            log.clone(),
            state,
            None,
            Some(dir.join("raft")),
        );
        let meta = MetaFile::new(dir.join("raft"));
        meta.create_dir().expect("create the raft meta directory");
        let mut store = ReplicatedLog::open(log.clone(), meta, state_machine.purge_floor())
            .expect("open the raft meta");
        let purged = store
            .get_log_state()
            .await
            .expect("log state")
            .last_purged_log_id;
        state_machine
            .recover(store.committed_hint().max(purged))
            .await
            .expect("recover the state from the log");
        let raft = Raft::new(
            id,
            config,
            PeerNetwork::new(GROUP),
            store,
            state_machine.clone(),
        )
        .await
        .expect("start raft");
        let groups = RaftGroups::new();
        groups.insert(GROUP, raft.clone());
        let service = PeerService::new(groups).into_server();
        let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
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
            stop_server,
        }
    }

    /// Kills the replica: its peer server stops answering and its Raft stops; storage closes.
    async fn stop(mut self) -> (NodeId, SocketAddr, PathBuf) {
        // A graceful stop sends GOAWAY, so peers drop their connections and reconnect to
        // whatever listens on the address next (aborting the accept loop would leave the
        // accepted connections serving the stopped Raft).
        let _ = self.stop_server.send(());
        if tokio::time::timeout(Duration::from_secs(5), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
        }
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
    // The applied result names the partition-log index (a message there is at offset index << 16).
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

/// Acks the messages of the one-command entries `entries`.
fn ack(entries: std::ops::RangeInclusive<u64>) -> Bytes {
    use sluice_proto::storage::v1::{MessageRef, SettleCommand, SettleKind};
    Bytes::from(
        LogCommand {
            command: Some(Command::Settle(SettleCommand {
                time_ms: 2,
                kind: SettleKind::Ack as i32,
                messages: entries
                    .map(|entry| MessageRef {
                        offset: sluice_agent::queue::entry::offset(entry, 0),
                        attempt: 1,
                        size: 3,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })),
        }
        .encode_to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_disk_is_rebuilt_from_a_snapshot_and_restarts_from_its_own_log() {
    let root = tempfile::tempdir().expect("tempdir");
    let config = raft_config_with(SnapshotPolicy::LogsSinceLast(20));
    let mut replicas = Vec::new();
    for id in 1..=3 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dir = root.path().join(format!("node-{id}"));
        replicas.push(Replica::start_with(id, &dir, listener, config.clone()).await);
    }
    let members: BTreeMap<NodeId, BasicNode> = replicas
        .iter()
        .map(|r| (r.id, BasicNode::new(r.addr.to_string())))
        .collect();
    replicas[0]
        .raft
        .initialize(members)
        .await
        .expect("initialize");
    let leader = wait_for_leader(&replicas).await;

    // 60 messages; the first 40 acked: the snapshot must carry only the 20 unsettled bodies.
    let mut entries = Vec::new();
    for i in 0..60 {
        entries.push(write(&replica(&replicas, leader).raft, &format!("m{i:02}")).await);
    }
    let mut last = write(&replica(&replicas, leader).raft, "").await;
    let settle = replica(&replicas, leader)
        .raft
        .client_write(ack(entries[0]..=entries[39]))
        .await
        .expect("ack commits");
    last = last.max(settle.data.index);
    for i in 60..90 {
        last = write(&replica(&replicas, leader).raft, &format!("m{i:02}")).await;
    }
    for r in &replicas {
        wait_applied(r, last).await;
    }

    // A follower loses its disk: it comes back empty on the same address.
    let follower = replicas
        .iter()
        .find(|r| r.id != leader)
        .expect("a follower")
        .id;
    let position = replicas
        .iter()
        .position(|r| r.id == follower)
        .expect("follower");
    let (id, addr, dir) = replicas.remove(position).stop().await;
    std::fs::remove_dir_all(&dir).expect("wipe the follower's directory");
    // The leader snapshots and purges its log while the follower is away.
    replica(&replicas, leader)
        .raft
        .trigger()
        .snapshot()
        .await
        .expect("snapshot");
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    while replica(&replicas, leader)
        .raft
        .metrics()
        .borrow()
        .purged
        .is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never purged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let rebuilt = Replica::start_with(id, &dir, listener, config.clone()).await;
    wait_applied(&rebuilt, last).await;
    // Its log starts at the lowest unsettled message: the acked prefix was never copied.
    assert_eq!(rebuilt.log.first_index(), entries[40]);
    let expected: Vec<String> = (40..90)
        .map(|i| format!("m{i:02}"))
        .filter(|p| !p.is_empty())
        .collect();
    let mut stored = stored_payloads(rebuilt.log.as_ref());
    stored.retain(|p| !p.is_empty());
    assert_eq!(stored, expected);
    assert_eq!(
        rebuilt.state_machine.with_state(|s| s.backlog().0).await,
        51
    );

    // It keeps up with new writes, then restarts from its own (restarted) log.
    for i in 90..95 {
        last = write(&replica(&replicas, leader).raft, &format!("m{i:02}")).await;
    }
    wait_applied(&rebuilt, last).await;
    let (id, addr, dir) = rebuilt.stop().await;
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let restarted = Replica::start_with(id, &dir, listener, config.clone()).await;
    wait_applied(&restarted, last).await;
    assert_eq!(
        restarted.state_machine.with_state(|s| s.backlog().0).await,
        56
    );
    replicas.push(restarted);
    for r in replicas {
        r.stop().await;
    }
}
