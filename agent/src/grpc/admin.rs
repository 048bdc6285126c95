//! The `sluice.v1.Admin` service: declare, delete, list and inspect queues.

use std::sync::Arc;
use std::time::Instant;

use sluice_proto::v1::admin_server::Admin;
use sluice_proto::v1::{
    DeclareQueueRequest, DeclareQueueResponse, DeleteQueueRequest, DeleteQueueResponse,
    GetQueueStatsRequest, GetQueueStatsResponse, ListQueuesRequest, ListQueuesResponse,
};
use tonic::{Request, Response, Status};

use crate::broker::Broker;
use crate::metrics::Metrics;

/// Serves `Admin` from the broker.
#[derive(Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
}

impl AdminService {
    /// A service over `broker`, recording latency in `metrics`.
    pub fn new(broker: Arc<Broker>, metrics: Arc<Metrics>) -> Self {
        Self { broker, metrics }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn declare_queue(
        &self,
        request: Request<DeclareQueueRequest>,
    ) -> Result<Response<DeclareQueueResponse>, Status> {
        let started = Instant::now();
        let spec = request
            .into_inner()
            .queue
            .ok_or_else(|| Status::invalid_argument("queue: required"))?;
        let result = self.broker.declare(spec).await;
        self.metrics.observe_rpc("DeclareQueue", started.elapsed());
        let (queue, created) = result?;
        Ok(Response::new(DeclareQueueResponse {
            queue: Some(queue),
            created,
        }))
    }

    async fn delete_queue(
        &self,
        request: Request<DeleteQueueRequest>,
    ) -> Result<Response<DeleteQueueResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = self.broker.delete(&request.name, request.if_empty).await;
        self.metrics.observe_rpc("DeleteQueue", started.elapsed());
        Ok(Response::new(DeleteQueueResponse {
            messages_deleted: result?,
        }))
    }

    async fn list_queues(
        &self,
        _request: Request<ListQueuesRequest>,
    ) -> Result<Response<ListQueuesResponse>, Status> {
        Ok(Response::new(ListQueuesResponse {
            queues: self.broker.list(),
        }))
    }

    async fn get_queue_stats(
        &self,
        request: Request<GetQueueStatsRequest>,
    ) -> Result<Response<GetQueueStatsResponse>, Status> {
        // Another agent asking for this agent's own numbers, to answer with every partition's
        // leader's: it must not be sent on again.
        let local_only = request
            .metadata()
            .contains_key(crate::cluster::client::LOCAL_ONLY_HEADER);
        let name = request.into_inner().name;
        let stats = if local_only {
            self.broker.stats(&name)?
        } else {
            self.broker.leader_stats(&name).await?
        };
        Ok(Response::new(stats))
    }
}
