//! The peers-only `sluice.peer.v1.Raft` service refuses what it cannot route or decode, with a
//! status naming the group or field, over real gRPC on loopback.

use sluice_agent::replication::{PeerService, RaftGroups};
use sluice_proto::peer::v1::raft_client::RaftClient;
use sluice_proto::peer::v1::{
    AppendEntriesRequest, LeftOutRequest, ReplicaPosition, Vote, VoteRequest,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// Serves a peer service for `groups` and returns a client to it.
async fn serve(groups: RaftGroups) -> RaftClient<tonic::transport::Channel> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PeerService::new(groups).into_server())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    RaftClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

#[tokio::test]
async fn a_request_for_a_group_this_agent_does_not_host_is_not_found_naming_the_group() {
    let mut client = serve(RaftGroups::new()).await;
    let status = client
        .vote(VoteRequest {
            group: "orders/7".into(),
            vote: Some(Vote {
                term: 1,
                node_id: Some(1),
                committed: false,
            }),
            last_log_id: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(status.message().contains("\"orders/7\""), "{status:?}");
}

#[tokio::test]
async fn an_append_without_a_vote_is_an_invalid_argument_naming_the_field() {
    // A hosted group is needed to get past routing, so start a one-node Raft with no peers.
    let dir = tempfile::tempdir().expect("tempdir");
    let groups = RaftGroups::new();
    let raft = single_node(dir.path()).await;
    groups.insert("orders/0", raft.clone());
    let mut client = serve(groups).await;
    let status = client
        .append_entries(AppendEntriesRequest {
            group: "orders/0".into(),
            vote: None,
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("AppendEntriesRequest.vote"),
        "{status:?}"
    );
    raft.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_replica_the_group_removed_is_refused_its_vote_and_told_it_was_left_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let groups = RaftGroups::new();
    let raft = single_node(dir.path()).await;
    raft.initialize(std::collections::BTreeMap::from([(
        1,
        openraft::BasicNode::new("127.0.0.1:1"),
    )]))
    .await
    .expect("initialize");
    let mut metrics = raft.metrics();
    let settled = metrics
        .wait_for(|m| {
            m.current_leader == Some(1)
                && m.last_applied.is_some()
                && m.last_applied.as_ref() >= m.membership_config.log_id().as_ref()
        })
        .await
        .expect("leads")
        .clone();
    let config = settled
        .membership_config
        .log_id()
        .expect("a configuration entry");
    groups.insert("orders/0", raft.clone());
    let mut client = serve(groups).await;
    let request = |last_log_id| VoteRequest {
        group: "orders/0".into(),
        vote: Some(Vote {
            term: 100,
            node_id: Some(9),
            committed: false,
        }),
        last_log_id,
    };
    // Node 9 is in no configuration and its log ends before the committed one: refused,
    // and the group's term stays where it was.
    let refused = client
        .vote(request(None))
        .await
        .expect("vote answered")
        .into_inner();
    assert!(!refused.vote_granted, "{refused:?}");
    assert!(
        refused.vote.as_ref().is_some_and(|v| v.term < 100),
        "{refused:?}"
    );
    assert!(raft.metrics().borrow().vote.leader_id().term < 100);
    // Asked, the peer names the group as having left node 9 out; not so for a member, nor for
    // a node whose log reaches past that configuration (it may know a newer one with it in).
    let ask = |node_id, last_index| LeftOutRequest {
        node_id,
        replicas: vec![ReplicaPosition {
            group: "orders/0".into(),
            last_index,
        }],
    };
    let left_out = |answer: tonic::Response<sluice_proto::peer::v1::LeftOutResponse>| {
        answer.into_inner().left_out
    };
    assert_eq!(
        left_out(client.left_out(ask(9, None)).await.expect("answered")),
        vec!["orders/0".to_owned()]
    );
    assert!(left_out(client.left_out(ask(1, None)).await.expect("answered")).is_empty());
    assert!(
        left_out(
            client
                .left_out(ask(9, Some(config.index + 5)))
                .await
                .expect("answered")
        )
        .is_empty()
    );
    raft.shutdown().await.expect("shutdown");
}

async fn single_node(dir: &std::path::Path) -> sluice_agent::replication::Raft {
    use std::sync::Arc;

    use sluice_agent::config::LogConfig;
    use sluice_agent::log::{FileLog, LogStore};
    use sluice_agent::queue::state::StateConfig;
    use sluice_agent::replication::meta::MetaFile;
    use sluice_agent::replication::{PeerNetwork, QueueStateMachine, Raft, ReplicatedLog};

    let (log, _) = FileLog::open(&dir.join("log"), LogConfig::default()).expect("open log");
    let log: Arc<dyn LogStore> = Arc::new(log);
    let config = StateConfig {
        ack_timeout_ms: 30_000,
        max_deliveries: 0,
        has_dead_letter_queue: false,
        dedup_window_ms: 0,
    };
    let machine = QueueStateMachine::new(config, log.clone());
    let meta = MetaFile::new(dir.join("raft"));
    meta.create_dir().expect("create the raft meta directory");
    let store = ReplicatedLog::open(log, meta, machine.purge_floor()).expect("open meta");
    let raft_config = openraft::Config::default().validate().expect("config");
    Raft::new(
        1,
        Arc::new(raft_config),
        PeerNetwork::new("orders/0"),
        store,
        machine,
    )
    .await
    .expect("start raft")
}
