//! `GrpcAgentAdmin` against real tonic servers on loopback that speak `sluice.v1.Admin` and
//! `sluice.v1.Membership`.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use sluice_operator::{
    agent_admin::{
        AdminError, AgentAdmin, GrpcAgentAdmin, LEADER_METADATA, NewAgent, PartitionStats,
    },
    cluster_view::AgentState,
};
use sluice_proto::v1::{
    AddAgentRequest, AddAgentResponse, Agent as ProtoAgent, AgentState as ProtoAgentState,
    DeclareQueueRequest, DeclareQueueResponse, DeleteQueueRequest, DeleteQueueResponse,
    DrainAgentRequest, DrainAgentResponse, GetClusterRequest, GetClusterResponse,
    GetQueueStatsRequest, GetQueueStatsResponse, HandOffLeadershipRequest,
    HandOffLeadershipResponse, ListQueuesRequest, ListQueuesResponse, PartitionPlacement,
    PartitionStats as ProtoPartition, RemoveAgentRequest, RemoveAgentResponse, Stats,
    admin_server::{Admin, AdminServer},
    membership_server::{Membership, MembershipServer},
};
use tonic::{Request, Response, Status};

/// Knows one queue, `orders`, with two partitions of which the second has no leader.
struct OneQueue;

#[tonic::async_trait]
impl Admin for OneQueue {
    async fn declare_queue(
        &self,
        _: Request<DeclareQueueRequest>,
    ) -> Result<Response<DeclareQueueResponse>, Status> {
        Err(Status::unimplemented("not needed by the operator"))
    }
    async fn delete_queue(
        &self,
        _: Request<DeleteQueueRequest>,
    ) -> Result<Response<DeleteQueueResponse>, Status> {
        Err(Status::unimplemented("not needed by the operator"))
    }
    async fn list_queues(
        &self,
        _: Request<ListQueuesRequest>,
    ) -> Result<Response<ListQueuesResponse>, Status> {
        Err(Status::unimplemented("not needed by the operator"))
    }
    async fn get_queue_stats(
        &self,
        request: Request<GetQueueStatsRequest>,
    ) -> Result<Response<GetQueueStatsResponse>, Status> {
        let name = request.into_inner().name;
        if name != "orders" {
            return Err(Status::not_found(format!("queue {name} does not exist")));
        }
        let partition = |id: u32, leader: &str, ready: u64| ProtoPartition {
            partition: id,
            stats: Some(Stats {
                ready,
                ..Stats::default()
            }),
            leader: leader.to_owned(),
        };
        Ok(Response::new(GetQueueStatsResponse {
            name,
            total: Some(Stats {
                ready: 100,
                in_flight: 20,
                delayed: 3,
                publish_rate: 800.0,
                ..Stats::default()
            }),
            partitions: vec![partition(0, "orders-1", 60), partition(1, "", 40)],
            consumers: 4,
        }))
    }
}

async fn serve() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AdminServer::new(OneQueue))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

#[tokio::test]
async fn queue_stats_sum_backlog_and_map_partition_leaders() {
    let addr = serve().await;
    let stats = GrpcAgentAdmin
        .queue_stats(&addr.to_string(), "orders")
        .await
        .unwrap();
    assert_eq!(stats.backlog, 123, "ready + in flight + delayed");
    assert_eq!(stats.in_flight, 20);
    assert_eq!(stats.publish_rate, 800.0);
    assert_eq!(stats.consumers, 4);
    assert_eq!(
        stats.partitions,
        vec![
            PartitionStats {
                id: 0,
                leader: Some("orders-1".into()),
                in_sync: None
            },
            PartitionStats {
                id: 1,
                leader: None,
                in_sync: None
            },
        ]
    );
}

#[tokio::test]
async fn unknown_queue_is_a_refusal_carrying_the_grpc_status() {
    let addr = serve().await;
    let err = GrpcAgentAdmin
        .queue_stats(&addr.to_string(), "nope")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AdminError::Refused {
                operation: "GetQueueStats",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("queue nope does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn closed_port_is_unreachable_naming_the_endpoint() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = GrpcAgentAdmin
        .queue_stats(&addr.to_string(), "orders")
        .await
        .unwrap_err();
    assert!(matches!(err, AdminError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

/// A `sluice.v1.Membership` server: a fixed two-agent cluster that records what it was asked;
/// when `redirect_to` is set it answers every call UNAVAILABLE naming that leader instead.
#[derive(Clone, Default)]
struct Members {
    asked: Arc<Mutex<Vec<String>>>,
    redirect_to: Option<String>,
}

impl Members {
    fn redirect(&self) -> Result<(), Status> {
        match &self.redirect_to {
            Some(leader) => {
                let mut status = Status::unavailable("not the leader");
                status
                    .metadata_mut()
                    .insert(LEADER_METADATA, leader.parse().unwrap());
                Err(status)
            }
            None => Ok(()),
        }
    }

    fn ask(&self, what: String) {
        self.asked.lock().unwrap().push(what);
    }
}

fn proto_agent(node_id: u64, state: ProtoAgentState) -> ProtoAgent {
    ProtoAgent {
        node_id,
        client_address: format!("orders-{node_id}:7070"),
        peer_address: format!("orders-{node_id}:7071"),
        state: state as i32,
        replicas: 2,
        leaders: 1,
    }
}

#[tonic::async_trait]
impl Membership for Members {
    async fn get_cluster(
        &self,
        _: Request<GetClusterRequest>,
    ) -> Result<Response<GetClusterResponse>, Status> {
        self.redirect()?;
        self.ask("GetCluster".into());
        Ok(Response::new(GetClusterResponse {
            agents: vec![
                proto_agent(0, ProtoAgentState::Active),
                proto_agent(1, ProtoAgentState::Joining),
            ],
            partitions: vec![PartitionPlacement {
                queue: "orders".into(),
                partition: 0,
                leader: Some(0),
                voters: vec![0],
                learners: vec![1],
                in_sync: vec![0],
            }],
            replication_factor: 1,
        }))
    }

    async fn add_agent(
        &self,
        request: Request<AddAgentRequest>,
    ) -> Result<Response<AddAgentResponse>, Status> {
        self.redirect()?;
        let r = request.into_inner();
        self.ask(format!(
            "AddAgent {} {} {}",
            r.node_id, r.peer_address, r.client_address
        ));
        Ok(Response::new(AddAgentResponse {
            agent: Some(proto_agent(r.node_id, ProtoAgentState::Joining)),
        }))
    }

    async fn drain_agent(
        &self,
        request: Request<DrainAgentRequest>,
    ) -> Result<Response<DrainAgentResponse>, Status> {
        self.redirect()?;
        let id = request.into_inner().node_id;
        self.ask(format!("DrainAgent {id}"));
        if id == 0 {
            return Err(Status::failed_precondition(
                "1 ACTIVE agent would remain, replication factor 1 needs 1",
            ));
        }
        Ok(Response::new(DrainAgentResponse {
            agent: Some(proto_agent(id, ProtoAgentState::Draining)),
        }))
    }

    async fn remove_agent(
        &self,
        request: Request<RemoveAgentRequest>,
    ) -> Result<Response<RemoveAgentResponse>, Status> {
        self.redirect()?;
        self.ask(format!("RemoveAgent {}", request.into_inner().node_id));
        Ok(Response::new(RemoveAgentResponse {}))
    }

    async fn hand_off_leadership(
        &self,
        request: Request<HandOffLeadershipRequest>,
    ) -> Result<Response<HandOffLeadershipResponse>, Status> {
        self.redirect()?;
        self.ask(format!(
            "HandOffLeadership {}",
            request.into_inner().node_id
        ));
        Ok(Response::new(HandOffLeadershipResponse {
            moved: 2,
            remaining: vec!["orders/3".into()],
        }))
    }
}

async fn serve_members(members: Members) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MembershipServer::new(members))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

#[tokio::test]
async fn cluster_maps_agents_states_and_placements() {
    let addr = serve_members(Members::default()).await;
    let view = GrpcAgentAdmin.cluster(&addr.to_string()).await.unwrap();
    assert_eq!(view.replication_factor, 1);
    assert_eq!(
        view.agents.iter().map(|a| a.state).collect::<Vec<_>>(),
        vec![AgentState::Active, AgentState::Joining]
    );
    assert_eq!(view.agents[1].peer_address, "orders-1:7071");
    assert_eq!(view.partitions[0].learners, vec![1]);
    assert!(view.is_in_sync(), "the only voter is in sync");
}

#[tokio::test]
async fn membership_calls_carry_the_node_id_and_addresses() {
    let members = Members::default();
    let addr = serve_members(members.clone()).await.to_string();
    let new = NewAgent {
        node_id: 3,
        peer_address: "orders-3.orders-peers:7071".into(),
        client_address: "orders-3.orders-peers:7070".into(),
    };
    let added = GrpcAgentAdmin.add_member(&addr, &new).await.unwrap();
    assert_eq!(added.state, AgentState::Joining);
    let draining = GrpcAgentAdmin.drain(&addr, 3).await.unwrap();
    assert_eq!(draining.state, AgentState::Draining);
    GrpcAgentAdmin.remove_member(&addr, 3).await.unwrap();
    let handoff = GrpcAgentAdmin.hand_off_leaderships(&addr, 2).await.unwrap();
    assert_eq!(handoff.moved, 2);
    assert_eq!(handoff.remaining, vec!["orders/3".to_owned()]);
    assert_eq!(
        members.asked.lock().unwrap().clone(),
        vec![
            "AddAgent 3 orders-3.orders-peers:7071 orders-3.orders-peers:7070",
            "DrainAgent 3",
            "RemoveAgent 3",
            "HandOffLeadership 2",
        ]
    );
}

#[tokio::test]
async fn a_refused_drain_is_a_precondition_error_with_the_agents_reason() {
    let addr = serve_members(Members::default()).await;
    let err = GrpcAgentAdmin
        .drain(&addr.to_string(), 0)
        .await
        .unwrap_err();
    assert!(err.is_precondition(), "{err}");
    assert!(err.to_string().contains("replication factor 1"), "{err}");
}

#[tokio::test]
async fn a_follower_redirect_is_followed_to_the_named_leader() {
    let leader = Members::default();
    let leader_addr = serve_members(leader.clone()).await;
    let follower = Members {
        redirect_to: Some(leader_addr.to_string()),
        ..Members::default()
    };
    let follower_addr = serve_members(follower.clone()).await;

    GrpcAgentAdmin
        .remove_member(&follower_addr.to_string(), 4)
        .await
        .unwrap();

    assert_eq!(leader.asked.lock().unwrap().clone(), vec!["RemoveAgent 4"]);
    assert!(follower.asked.lock().unwrap().is_empty());
}
