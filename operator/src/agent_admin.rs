//! The operator's calls into the agents, behind a trait so that reconcile is tested with a fake:
//! queue counters over `sluice.v1.Admin`, and the day-2 operations (leadership hand-off, drain,
//! add, remove, the cluster's membership) over `sluice.v1.Membership`.

use std::time::Duration;

use async_trait::async_trait;
use sluice_proto::v1 as pb;
use tonic::transport::Channel;

use crate::cluster_view::{AgentState, AgentView, ClusterView, PlacementView};

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
        /// The gRPC code, so callers can tell a precondition (e.g. too few agents left to drain
        /// one) from a transient failure.
        code: tonic::Code,
        /// The gRPC status, as text.
        status: String,
    },
}

impl AdminError {
    /// Whether the agents refused because the cluster's state forbids the operation
    /// (`FAILED_PRECONDITION`): retrying changes nothing until the state does.
    pub fn is_precondition(&self) -> bool {
        matches!(
            self,
            AdminError::Refused {
                code: tonic::Code::FailedPrecondition,
                ..
            }
        )
    }
}

/// An agent to add to the cluster (scale-out): its ordinal and its stable addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAgent {
    /// Node id: the StatefulSet ordinal.
    pub node_id: u64,
    /// Where its peers reach it (`host:port` on the peer port).
    pub peer_address: String,
    /// Where clients are redirected to it (`host:port` on the client port).
    pub client_address: String,
}

/// What a leadership hand-off achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandOff {
    /// Groups whose leadership moved.
    pub moved: u32,
    /// Groups still led by the agent (no caught-up replica to take them yet).
    pub remaining: Vec<String>,
}

/// Operations the operator performs on a MessageQueue's agents. `endpoint` is a `host:port` of
/// the public gRPC API (the client Service, or one agent's stable name).
#[async_trait]
pub trait AgentAdmin: Send + Sync {
    /// Counters and partition leaders of `queue`.
    async fn queue_stats(&self, endpoint: &str, queue: &str) -> Result<QueueStats, AdminError>;

    /// The agents, their membership states and every partition's placement.
    async fn cluster(&self, endpoint: &str) -> Result<ClusterView, AdminError>;

    /// Moves every leadership held by agent `node_id` to caught-up replicas elsewhere, so it
    /// can restart without an election (rolling updates).
    async fn hand_off_leaderships(
        &self,
        endpoint: &str,
        node_id: u64,
    ) -> Result<HandOff, AdminError>;

    /// Starts moving every replica off agent `node_id` (scale-in); it becomes DRAINING, then
    /// DRAINED.
    async fn drain(&self, endpoint: &str, node_id: u64) -> Result<AgentView, AdminError>;

    /// Adds `agent` as a member that receives partitions (scale-out); it becomes JOINING, then
    /// ACTIVE.
    async fn add_member(&self, endpoint: &str, agent: &NewAgent) -> Result<AgentView, AdminError>;

    /// Forgets a DRAINED agent `node_id`.
    async fn remove_member(&self, endpoint: &str, node_id: u64) -> Result<(), AdminError>;
}

/// How long one call into the agents may take before the status says "unknown" instead.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Metadata key in which an agent that cannot serve a request names the leader's client
/// address (the agents' `UNAVAILABLE` redirect).
pub const LEADER_METADATA: &str = "sluice-leader";

/// [`AgentAdmin`] over the agents' public `sluice.v1.Admin` and `sluice.v1.Membership` gRPC
/// services.
#[derive(Debug, Clone, Default)]
pub struct GrpcAgentAdmin;

async fn connect(endpoint: &str) -> Result<Channel, AdminError> {
    let unreachable = |reason: String| AdminError::Unreachable {
        endpoint: endpoint.to_owned(),
        reason,
    };
    tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(ADMIN_TIMEOUT)
        .timeout(ADMIN_TIMEOUT)
        .connect()
        .await
        .map_err(|e| unreachable(e.to_string()))
}

/// Runs `call` against `endpoint`; when the agent answers `UNAVAILABLE` naming the leader (a
/// membership change must be made by the cluster's leader), runs it once more there.
async fn call_following_leader<T, F, Fut>(
    endpoint: &str,
    operation: &'static str,
    call: F,
) -> Result<T, AdminError>
where
    F: Fn(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let refused = |endpoint: &str, status: tonic::Status| AdminError::Refused {
        endpoint: endpoint.to_owned(),
        operation,
        code: status.code(),
        status: format!("{:?}: {}", status.code(), status.message()),
    };
    let first = call(connect(endpoint).await?).await;
    match first {
        Ok(value) => Ok(value),
        Err(status) if status.code() == tonic::Code::Unavailable => {
            let leader = status
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .filter(|l| !l.is_empty() && l != endpoint);
            match leader {
                Some(leader) => call(connect(&leader).await?)
                    .await
                    .map_err(|s| refused(&leader, s)),
                None => Err(refused(endpoint, status)),
            }
        }
        Err(status) => Err(refused(endpoint, status)),
    }
}

fn agent_state(value: i32) -> AgentState {
    match pb::AgentState::try_from(value) {
        Ok(pb::AgentState::Joining) => AgentState::Joining,
        Ok(pb::AgentState::Active) => AgentState::Active,
        Ok(pb::AgentState::Draining) => AgentState::Draining,
        Ok(pb::AgentState::Drained) => AgentState::Drained,
        Ok(pb::AgentState::Unspecified) | Err(_) => AgentState::Unknown,
    }
}

fn agent_view(a: pb::Agent) -> AgentView {
    AgentView {
        node_id: a.node_id,
        client_address: a.client_address,
        peer_address: a.peer_address,
        state: agent_state(a.state),
        replicas: a.replicas,
        leaders: a.leaders,
    }
}

/// The agent a membership response carries; its absence is the agent's bug, reported as such.
fn recorded_agent(
    endpoint: &str,
    operation: &'static str,
    agent: Option<pb::Agent>,
) -> Result<AgentView, AdminError> {
    agent.map(agent_view).ok_or_else(|| AdminError::Refused {
        endpoint: endpoint.to_owned(),
        operation,
        code: tonic::Code::Internal,
        status: "the response carries no agent".to_owned(),
    })
}

#[async_trait]
impl AgentAdmin for GrpcAgentAdmin {
    async fn queue_stats(&self, endpoint: &str, queue: &str) -> Result<QueueStats, AdminError> {
        use pb::{GetQueueStatsRequest, admin_client::AdminClient};

        let response = call_following_leader(endpoint, "GetQueueStats", |channel| {
            let request = GetQueueStatsRequest {
                name: queue.to_owned(),
            };
            async move {
                AdminClient::new(channel)
                    .get_queue_stats(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await?;
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

    async fn cluster(&self, endpoint: &str) -> Result<ClusterView, AdminError> {
        use pb::{GetClusterRequest, membership_client::MembershipClient};

        let response = call_following_leader(endpoint, "GetCluster", |channel| {
            let request = GetClusterRequest {};
            async move {
                MembershipClient::new(channel)
                    .get_cluster(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await?;
        Ok(ClusterView {
            agents: response.agents.into_iter().map(agent_view).collect(),
            partitions: response
                .partitions
                .into_iter()
                .map(|p| PlacementView {
                    queue: p.queue,
                    partition: p.partition,
                    leader: p.leader,
                    voters: p.voters,
                    learners: p.learners,
                    in_sync: p.in_sync,
                })
                .collect(),
            replication_factor: response.replication_factor,
        })
    }

    async fn hand_off_leaderships(
        &self,
        endpoint: &str,
        node_id: u64,
    ) -> Result<HandOff, AdminError> {
        use pb::{HandOffLeadershipRequest, membership_client::MembershipClient};

        // The day-2 logic asks the agent itself (its own address): it holds the leaderships.
        let response = call_following_leader(endpoint, "HandOffLeadership", |channel| {
            let request = HandOffLeadershipRequest { node_id };
            async move {
                MembershipClient::new(channel)
                    .hand_off_leadership(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await?;
        Ok(HandOff {
            moved: response.moved,
            remaining: response.remaining,
        })
    }

    async fn drain(&self, endpoint: &str, node_id: u64) -> Result<AgentView, AdminError> {
        use pb::{DrainAgentRequest, membership_client::MembershipClient};

        let response = call_following_leader(endpoint, "DrainAgent", |channel| {
            let request = DrainAgentRequest { node_id };
            async move {
                MembershipClient::new(channel)
                    .drain_agent(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await?;
        recorded_agent(endpoint, "DrainAgent", response.agent)
    }

    async fn add_member(&self, endpoint: &str, agent: &NewAgent) -> Result<AgentView, AdminError> {
        use pb::{AddAgentRequest, membership_client::MembershipClient};

        let response = call_following_leader(endpoint, "AddAgent", |channel| {
            let request = AddAgentRequest {
                node_id: agent.node_id,
                peer_address: agent.peer_address.clone(),
                client_address: agent.client_address.clone(),
            };
            async move {
                MembershipClient::new(channel)
                    .add_agent(request)
                    .await
                    .map(tonic::Response::into_inner)
            }
        })
        .await?;
        recorded_agent(endpoint, "AddAgent", response.agent)
    }

    async fn remove_member(&self, endpoint: &str, node_id: u64) -> Result<(), AdminError> {
        use pb::{RemoveAgentRequest, membership_client::MembershipClient};

        call_following_leader(endpoint, "RemoveAgent", |channel| {
            let request = RemoveAgentRequest { node_id };
            async move {
                MembershipClient::new(channel)
                    .remove_agent(request)
                    .await
                    .map(|_| ())
            }
        })
        .await
    }
}
