//! The operator's calls into the agents, behind a trait so that reconcile is tested with a fake
//! and the day-2 operations (leadership transfer, drain, membership) plug in once the agents
//! expose them (replication, issue 3).

use std::time::Duration;

use async_trait::async_trait;

/// Counters of one queue as the agents report them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueStats {
    /// Messages ready, delayed or in flight.
    pub backlog: u64,
    /// Messages delivered and not yet acknowledged.
    pub in_flight: u64,
    /// Confirmed publishes per second over the last minute.
    pub publish_rate: f64,
    /// Consumers subscribed.
    pub consumers: u32,
    /// One entry per partition, in partition order.
    pub partitions: Vec<PartitionStats>,
}

/// Placement of one partition as the agents report it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionStats {
    /// Partition number.
    pub id: u32,
    /// Agent leading the partition; `None` when it has no leader (no quorum).
    pub leader: Option<String>,
    /// Replicas caught up with the leader, when known.
    pub in_sync: Option<u32>,
}

/// Why a call into the agents failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No connection could be made to the agents.
    #[error("cannot reach agents at {endpoint}: {reason}")]
    Unreachable {
        /// The endpoint tried.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// The agents answered with an error.
    #[error("agents at {endpoint} refused {operation}: {status}")]
    Refused {
        /// The endpoint asked.
        endpoint: String,
        /// The operation.
        operation: &'static str,
        /// The gRPC status.
        status: String,
    },
    /// The agents do not offer this operation yet.
    #[error("{operation} is not offered by this agent version ({reason})")]
    Unsupported {
        /// The operation.
        operation: &'static str,
        /// What is missing.
        reason: &'static str,
    },
}

/// Operations the operator performs on a MessageQueue's agents. `endpoint` is a `host:port` of
/// the public gRPC API (the client Service, or one agent's stable name).
#[async_trait]
pub trait AgentAdmin: Send + Sync {
    /// Counters and partition leaders of `queue`.
    async fn queue_stats(&self, endpoint: &str, queue: &str) -> Result<QueueStats, AdminError>;

    /// Moves every partition leadership held by `agent` to other replicas, so it can stop
    /// without an election (rolling updates, `preStop`).
    async fn transfer_leadership(&self, endpoint: &str, agent: &str) -> Result<(), AdminError>;

    /// Moves every replica off `agent` so it can be removed (scale-in).
    async fn drain(&self, endpoint: &str, agent: &str) -> Result<(), AdminError>;

    /// Adds `agent` as a member that receives partitions (scale-out).
    async fn add_member(&self, endpoint: &str, agent: &str) -> Result<(), AdminError>;

    /// Removes a drained `agent` from the membership.
    async fn remove_member(&self, endpoint: &str, agent: &str) -> Result<(), AdminError>;
}

/// How long one call into the agents may take before the status says "unknown" instead.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// [`AgentAdmin`] over the agents' public `sluice.v1.Admin` gRPC service.
#[derive(Debug, Clone, Default)]
pub struct GrpcAgentAdmin;

/// Why the membership operations are not offered yet.
const NEEDS_MEMBERSHIP_API: &str = "needs the agents' membership API from the replication work";

#[async_trait]
impl AgentAdmin for GrpcAgentAdmin {
    async fn queue_stats(&self, endpoint: &str, queue: &str) -> Result<QueueStats, AdminError> {
        use sluice_proto::v1::{GetQueueStatsRequest, admin_client::AdminClient};

        let unreachable = |reason: String| AdminError::Unreachable {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(ADMIN_TIMEOUT)
            .timeout(ADMIN_TIMEOUT)
            .connect()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let response = AdminClient::new(channel)
            .get_queue_stats(GetQueueStatsRequest {
                name: queue.to_owned(),
            })
            .await
            .map_err(|status| AdminError::Refused {
                endpoint: endpoint.to_owned(),
                operation: "GetQueueStats",
                status: status.to_string(),
            })?
            .into_inner();
        let total = response.total.unwrap_or_default();
        Ok(QueueStats {
            backlog: total.ready + total.in_flight + total.delayed,
            in_flight: total.in_flight,
            publish_rate: total.publish_rate,
            consumers: response.consumers,
            partitions: response
                .partitions
                .into_iter()
                .map(|p| PartitionStats {
                    id: p.partition,
                    leader: Some(p.leader).filter(|l| !l.is_empty()),
                    in_sync: None,
                })
                .collect(),
        })
    }

    async fn transfer_leadership(&self, _endpoint: &str, _agent: &str) -> Result<(), AdminError> {
        Err(AdminError::Unsupported {
            operation: "transfer_leadership",
            reason: NEEDS_MEMBERSHIP_API,
        })
    }

    async fn drain(&self, _endpoint: &str, _agent: &str) -> Result<(), AdminError> {
        Err(AdminError::Unsupported {
            operation: "drain",
            reason: NEEDS_MEMBERSHIP_API,
        })
    }

    async fn add_member(&self, _endpoint: &str, _agent: &str) -> Result<(), AdminError> {
        Err(AdminError::Unsupported {
            operation: "add_member",
            reason: NEEDS_MEMBERSHIP_API,
        })
    }

    async fn remove_member(&self, _endpoint: &str, _agent: &str) -> Result<(), AdminError> {
        Err(AdminError::Unsupported {
            operation: "remove_member",
            reason: NEEDS_MEMBERSHIP_API,
        })
    }
}
