//! `GrpcAgentAdmin` against a real tonic server on loopback that speaks `sluice.v1.Admin`.

use std::net::SocketAddr;

use sluice_operator::agent_admin::{AdminError, AgentAdmin, GrpcAgentAdmin, PartitionStats};
use sluice_proto::v1::{
    DeclareQueueRequest, DeclareQueueResponse, DeleteQueueRequest, DeleteQueueResponse,
    GetQueueStatsRequest, GetQueueStatsResponse, ListQueuesRequest, ListQueuesResponse,
    PartitionStats as ProtoPartition, Stats,
    admin_server::{Admin, AdminServer},
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

#[tokio::test]
async fn membership_operations_say_they_need_the_replication_api() {
    let err = GrpcAgentAdmin
        .drain("127.0.0.1:1", "orders-2")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AdminError::Unsupported {
                operation: "drain",
                ..
            }
        ),
        "{err}"
    );
}
