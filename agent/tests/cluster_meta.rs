//! The meta group of three agents in one process: each agent has its own data directory in a
//! temporary directory, its own `RaftGroups` and its own peer server on loopback serving
//! `sluice.peer.v1.Raft` and `sluice.peer.v1.Cluster`; they talk real gRPC.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice_agent::cluster::{
    BalanceHolds, Catalog, ClusterConfig, META_GROUP, MetaGroup, MetaGroupError, peer_service,
    transfer_leadership,
};
use sluice_agent::config::LogConfig;
use sluice_agent::replication::{NodeId, PeerService, RaftGroups};
use sluice_proto::peer::v1 as pb;
use sluice_proto::peer::v1::meta_command::Command;
use sluice_proto::v1::QueueSpec;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

/// How long a step (election, replication, catch-up) may take before the test fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// One agent: its meta replica and peer server.
struct Agent {
    id: NodeId,
    addr: SocketAddr,
    dir: PathBuf,
    meta: MetaGroup,
    server: JoinHandle<()>,
    /// Ends the peer server and its connections.
    stop_serving: tokio::sync::oneshot::Sender<()>,
}

fn client_address(id: NodeId) -> String {
    format!("agent-{id}.test:7070")
}

impl Agent {
    /// Opens (or reopens) the agent's meta replica in `dir` and serves the peer port on
    /// `listener`.
    async fn start(id: NodeId, dir: &Path, listener: TcpListener, peers: &[String]) -> Agent {
        let addr = listener.local_addr().expect("bound address");
        let cluster = ClusterConfig::new(
            &format!("sluice-{id}"),
            peers.to_vec(),
            addr,
            Some(client_address(id)),
            "127.0.0.1:7070".parse().expect("address"),
            None,
        )
        .expect("valid cluster flags");
        let groups = RaftGroups::new();
        let meta = MetaGroup::open(dir, &cluster, &groups, LogConfig::default())
            .await
            .expect("open the meta group");
        let raft_service = PeerService::new(groups.clone()).into_server();
        let cluster_service = peer_service(groups, meta.clone(), BalanceHolds::new());
        let (stop_serving, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            // With shutdown, so a stop closes the accepted connections too (their tasks outlive
            // an aborted server): peers share one connection per address and must see it end,
            // as they would when a real agent process dies.
            let result = tonic::transport::Server::builder()
                .add_service(raft_service)
                .add_service(cluster_service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = result {
                eprintln!("peer server of node {id} ended: {e}");
            }
        });
        Agent {
            id,
            addr,
            dir: dir.to_path_buf(),
            meta,
            server,
            stop_serving,
        }
    }

    /// Kills the agent: its peer server stops answering and its meta replica stops.
    async fn stop(self) -> (NodeId, SocketAddr, PathBuf) {
        let _ = self.stop_serving.send(());
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(5), &mut server)
            .await
            .is_err()
        {
            eprintln!("peer server of node {} did not stop in 5 s", self.id);
            server.abort();
        }
        self.meta.shutdown().await.expect("meta group shuts down");
        (self.id, self.addr, self.dir)
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.meta.catalog().borrow().clone()
    }
}

async fn start_cluster(root: &Path) -> (Vec<Agent>, Vec<String>) {
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("address").to_string())
        .collect();
    let mut agents = Vec::new();
    for (id, listener) in listeners.into_iter().enumerate() {
        let dir = root.join(format!("agent-{id}"));
        agents.push(Agent::start(id as NodeId, &dir, listener, &peers).await);
    }
    (agents, peers)
}

/// Waits until the given agents agree on one leader among them and returns its id.
async fn wait_for_leader(agents: &[Agent]) -> NodeId {
    wait_until("an agreed meta leader", || {
        let leaders: BTreeSet<Option<NodeId>> = agents
            .iter()
            .map(|a| a.meta.raft().metrics().borrow().current_leader)
            .collect();
        match leaders.into_iter().collect::<Vec<_>>()[..] {
            [Some(leader)] if agents.iter().any(|a| a.id == leader) => Some(leader),
            _ => None,
        }
    })
    .await
}

/// Polls `probe` until it returns a value, failing the test after [`STEP_TIMEOUT`].
async fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} within {STEP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn agent(agents: &[Agent], id: NodeId) -> &Agent {
    agents.iter().find(|a| a.id == id).expect("agent exists")
}

fn declare(name: &str, partitions: u32) -> pb::MetaCommand {
    pb::MetaCommand {
        command: Some(Command::DeclareQueue(pb::DeclareQueue {
            spec: Some(QueueSpec {
                name: name.into(),
                partitions,
                ..Default::default()
            }),
        })),
    }
}

fn delete(name: &str) -> pb::MetaCommand {
    pb::MetaCommand {
        command: Some(Command::DeleteQueue(pb::DeleteQueue { name: name.into() })),
    }
}

async fn wait_all_registered(agents: &[Agent]) {
    for a in agents {
        wait_until("every agent registered", || {
            let nodes = a.catalog().client_addresses();
            (nodes.len() == 3).then_some(nodes)
        })
        .await;
        for id in 0..3 {
            assert_eq!(
                a.catalog().client_addresses()[&id],
                client_address(id),
                "on node {}",
                a.id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declare_on_a_follower_is_forwarded_to_the_leader_and_reaches_every_catalog() {
    let root = tempfile::tempdir().expect("tempdir");
    let (agents, _peers) = start_cluster(root.path()).await;

    // Phase 1: the group elects a leader and every agent registers its client address.
    let leader = wait_for_leader(&agents).await;
    wait_all_registered(&agents).await;

    // Phase 2: a follower's declare is forwarded; the follower sees it when propose returns,
    // the others shortly after, with the defaults filled in.
    let follower = agents.iter().find(|a| a.id != leader).expect("a follower");
    follower
        .meta
        .propose(declare("orders", 3))
        .await
        .expect("declare via a follower");
    assert_eq!(follower.catalog().queues["orders"].partitions, 3);
    for a in &agents {
        let spec = wait_until("the declared queue everywhere", || {
            a.catalog().queues.get("orders").cloned()
        })
        .await;
        assert_eq!(spec.partitions, 3);
        assert_eq!(spec.ack_timeout_ms, 30_000, "defaults are filled in");
    }

    // Phase 3: the same declare again is accepted; different settings are refused by name.
    let other = agents
        .iter()
        .find(|a| a.id != leader && a.id != follower.id)
        .expect("the other follower");
    other
        .meta
        .propose(declare("orders", 3))
        .await
        .expect("re-declaring the same settings is idempotent");
    match other.meta.propose(declare("orders", 5)).await {
        Err(MetaGroupError::QueueConflict { queue, difference }) => {
            assert_eq!(queue, "orders");
            assert!(difference.starts_with("queue.partitions"), "{difference}");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        agent(&agents, leader).catalog().queues["orders"].partitions,
        3
    );

    // Phase 4: bad proposals fail precisely and change nothing.
    match follower.meta.propose(delete("missing")).await {
        Err(MetaGroupError::UnknownQueue { queue }) => assert_eq!(queue, "missing"),
        other => panic!("expected an unknown queue, got {other:?}"),
    }
    let e = follower
        .meta
        .propose(declare("Bad Name", 1))
        .await
        .expect_err("invalid name refused");
    assert!(matches!(e, MetaGroupError::Invalid(_)), "{e:?}");
    assert!(e.to_string().starts_with("queue.name"), "{e}");
    let e = follower
        .meta
        .propose(pb::MetaCommand { command: None })
        .await
        .expect_err("empty command refused");
    assert!(e.to_string().starts_with("command"), "{e}");
    assert_eq!(
        follower.catalog().queues.keys().collect::<Vec<_>>(),
        ["orders"]
    );

    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_of_a_leader_shutdown_accept_a_delete_and_the_restarted_agent_catches_up() {
    let root = tempfile::tempdir().expect("tempdir");
    let (mut agents, peers) = start_cluster(root.path()).await;
    let leader = wait_for_leader(&agents).await;
    wait_all_registered(&agents).await;
    for name in ["orders", "payments", "audit"] {
        agent(&agents, leader)
            .meta
            .propose(declare(name, 2))
            .await
            .expect("declare on the leader");
    }

    // Phase 1: the leader dies; the two survivors elect a new one and commit a delete.
    let position = agents.iter().position(|a| a.id == leader).expect("leader");
    let (old_id, old_addr, old_dir) = agents.remove(position).stop().await;
    let new_leader = wait_for_leader(&agents).await;
    assert_ne!(new_leader, old_id);
    let survivor = agents
        .iter()
        .find(|a| a.id != new_leader)
        .expect("survivor");
    survivor
        .meta
        .propose(delete("payments"))
        .await
        .expect("delete via the surviving follower");
    for a in &agents {
        wait_until("the delete on every survivor", || {
            (!a.catalog().queues.contains_key("payments")).then_some(())
        })
        .await;
    }

    // Phase 2: the old leader restarts from its own directory on its old address; it replays
    // its log and catches up on what it missed, ending with the survivors' catalog.
    let listener = TcpListener::bind(old_addr).await.expect("rebind");
    let restarted = Agent::start(old_id, &old_dir, listener, &peers).await;
    let expected = agent(&agents, new_leader).catalog();
    assert_eq!(
        expected.queues.keys().collect::<Vec<_>>(),
        ["audit", "orders"]
    );
    wait_until("the restarted agent's catalog to catch up", || {
        (*restarted.catalog() == *expected).then_some(())
    })
    .await;
    assert_eq!(restarted.catalog().client_addresses().len(), 3);
    agents.push(restarted);
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transferring_meta_leadership_to_a_named_agent_makes_it_the_leader() {
    let root = tempfile::tempdir().expect("tempdir");
    let (agents, peers) = start_cluster(root.path()).await;
    let leader = wait_for_leader(&agents).await;
    wait_all_registered(&agents).await;

    // Phase 1: the named follower takes over; everyone follows it.
    let target = (leader + 1) % 3;
    let outcome = transfer_leadership(&peers[target as usize], META_GROUP, true)
        .await
        .expect("transfer call");
    assert!(outcome.is_leader, "{outcome:?}");
    assert_eq!(outcome.leader, Some(target));
    assert_eq!(wait_for_leader(&agents).await, target);

    // Phase 2: the old leader, now a follower, still gets its proposals committed.
    agent(&agents, leader)
        .meta
        .propose(declare("after-transfer", 1))
        .await
        .expect("declare via the old leader");
    assert!(
        agent(&agents, target)
            .catalog()
            .queues
            .contains_key("after-transfer")
    );

    // Phase 3: asking to lead a group the agent does not host names the group.
    let e = transfer_leadership(&peers[0], "orders/7", true)
        .await
        .expect_err("unknown group");
    let sluice_agent::cluster::TransferError::Rpc { status, .. } = &e;
    assert_eq!(status.code(), tonic::Code::NotFound, "{e}");
    assert!(status.message().contains("orders/7"), "{e}");

    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_proposal_without_a_command_is_refused_naming_the_field() {
    let root = tempfile::tempdir().expect("tempdir");
    let (agents, peers) = start_cluster(root.path()).await;
    let leader = wait_for_leader(&agents).await;
    let mut client =
        pb::cluster_client::ClusterClient::connect(format!("http://{}", peers[leader as usize]))
            .await
            .expect("connect");
    let status = client
        .propose_meta(pb::ProposeMetaRequest { command: None })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("command"), "{status:?}");
    for a in agents {
        a.stop().await;
    }
}
