//! The `sluice.v1.Membership` service: which agents hold the cluster's replicas, and scale-out,
//! scale-in and leadership hand-off through the cluster catalog (decision 0011).
//!
//! Any agent answers: catalog changes go through the meta group (forwarded to its leader like
//! every proposal), and a hand-off for another agent is passed on to that agent's client port.
//! The membership changes themselves are carried out by the groups' leaders, which follow the
//! catalog; these calls only record what is wanted, so they return quickly and are idempotent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::peer::v1 as peer;
use sluice_proto::peer::v1::meta_command::Command;
use sluice_proto::v1::membership_client::MembershipClient;
use sluice_proto::v1::membership_server::Membership;
use sluice_proto::v1::{
    AddAgentRequest, AddAgentResponse, Agent, AgentState, DrainAgentRequest, DrainAgentResponse,
    GetClusterRequest, GetClusterResponse, HandOffLeadershipRequest, HandOffLeadershipResponse,
    PartitionPlacement, RemoveAgentRequest, RemoveAgentResponse,
};
use tonic::{Request, Response, Status};

use crate::broker::Broker;
use crate::cluster::client::{
    AgentCallError, LOCAL_ONLY_HEADER, channel, local_view, remote_views,
};
use crate::cluster::reconcile::GroupView;
use crate::cluster::{ClusterContext, MetaGroupError};

/// Deadline of a hand-off passed on to the agent concerned.
const HAND_OFF_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves `Membership` from the broker's cluster side.
#[derive(Clone)]
pub struct MembershipService {
    broker: Arc<Broker>,
}

impl MembershipService {
    /// A service over `broker` (a single agent answers every call FAILED_PRECONDITION).
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }

    fn cluster(&self) -> Result<&ClusterContext, MembershipError> {
        self.broker.cluster().ok_or(MembershipError::NotClustered)
    }

    fn agent(&self, node_id: u64) -> Result<Agent, MembershipError> {
        let cluster = self.cluster()?;
        let catalog = cluster.meta.current();
        let entry = catalog
            .agents
            .get(&node_id)
            .ok_or(MembershipError::UnknownAgent { node_id })?;
        let views = self.broker.replica_views();
        Ok(agent_pb(node_id, entry, &views))
    }

    async fn propose(&self, command: Command) -> Result<(), MembershipError> {
        let cluster = self.cluster()?;
        cluster
            .meta
            .propose(peer::MetaCommand {
                command: Some(command),
            })
            .await
            .map_err(MembershipError::Meta)
    }

    async fn get_cluster(&self, local_only: bool) -> Result<GetClusterResponse, MembershipError> {
        let cluster = self.cluster()?;
        let catalog = cluster.meta.current();
        let mut views = self.broker.replica_views();
        if !local_only {
            // Groups hosted elsewhere (replication factor below the agent count), so every
            // partition is listed and every agent's counts are right. A leader's view also
            // replaces this agent's own follower view: a follower lags, and a replica not yet
            // added (newly placed here) sees an empty group.
            for (queue, partition, view) in remote_views(cluster, &catalog).await {
                match views
                    .iter_mut()
                    .find(|(q, p, _)| *q == queue && *p == partition)
                {
                    Some((_, _, own)) => {
                        if view.is_leader && !own.is_leader {
                            *own = view;
                        }
                    }
                    None => views.push((queue, partition, view)),
                }
            }
        }
        let agents = catalog
            .agents
            .iter()
            .map(|(id, entry)| agent_pb(*id, entry, &views))
            .collect();
        let mut partitions: Vec<PartitionPlacement> = views
            .iter()
            .map(|(queue, partition, view)| PartitionPlacement {
                queue: queue.clone(),
                partition: *partition,
                leader: view.leader,
                voters: view.voters.iter().copied().collect(),
                learners: view.learners.iter().copied().collect(),
                in_sync: if view.is_leader && view.me == cluster.config.node_id {
                    in_sync(view)
                } else {
                    Vec::new()
                },
            })
            .collect();
        if !local_only {
            self.fill_in_sync(cluster, &mut partitions, &views).await;
        }
        Ok(GetClusterResponse {
            agents,
            partitions,
            replication_factor: cluster.meta.replication_factor(),
        })
    }

    /// Asks the leaders of partitions led elsewhere for their view of who is in sync (only a
    /// leader knows its followers' progress). A leader that does not answer leaves its
    /// partitions' `in_sync` empty.
    async fn fill_in_sync(
        &self,
        cluster: &ClusterContext,
        partitions: &mut [PartitionPlacement],
        views: &[(String, u32, GroupView)],
    ) {
        let me = cluster.config.node_id;
        let catalog = cluster.meta.current();
        let leaders: std::collections::BTreeSet<u64> = views
            .iter()
            .filter_map(|(_, _, v)| v.leader)
            .filter(|l| *l != me)
            .collect();
        let asks = leaders.into_iter().filter_map(|leader| {
            let address = catalog.client_address(leader)?;
            Some(async move { local_view(&address).await.ok() })
        });
        let mut known: BTreeMap<(String, u32), Vec<u64>> = BTreeMap::new();
        for answer in futures::future::join_all(asks).await.into_iter().flatten() {
            for p in answer.partitions {
                if !p.in_sync.is_empty() {
                    known.insert((p.queue, p.partition), p.in_sync);
                }
            }
        }
        for p in partitions.iter_mut().filter(|p| p.in_sync.is_empty()) {
            if let Some(in_sync) = known.remove(&(p.queue.clone(), p.partition)) {
                p.in_sync = in_sync;
            }
        }
    }

    async fn add_agent(&self, request: AddAgentRequest) -> Result<Agent, MembershipError> {
        let peer_address = request.peer_address.trim().to_owned();
        let client_address = request.client_address.trim().to_owned();
        for (field, value) in [
            ("peer_address", &peer_address),
            ("client_address", &client_address),
        ] {
            crate::cluster::config::split_host_port(value).map_err(|reason| {
                MembershipError::InvalidArgument {
                    field,
                    reason: format!("{value:?}: {reason}"),
                }
            })?;
        }
        self.propose(Command::AddAgent(peer::AddAgent {
            node_id: request.node_id,
            peer_address,
            client_address,
        }))
        .await?;
        self.agent(request.node_id)
    }

    async fn drain_agent(&self, node_id: u64) -> Result<Agent, MembershipError> {
        let cluster = self.cluster()?;
        let state = cluster.meta.current().state_of(node_id);
        // Already draining or drained: nothing to record (and no refusal: it is idempotent).
        if !matches!(state, Some(AgentState::Draining | AgentState::Drained)) {
            self.propose(Command::SetAgentState(peer::SetAgentState {
                node_id,
                state: AgentState::Draining as i32,
                from: AgentState::Unspecified as i32,
            }))
            .await?;
        }
        self.agent(node_id)
    }

    async fn remove_agent(&self, node_id: u64) -> Result<(), MembershipError> {
        let cluster = self.cluster()?;
        if cluster.meta.current().state_of(node_id).is_none() {
            return Ok(());
        }
        self.propose(Command::RemoveAgent(peer::RemoveAgent { node_id }))
            .await
    }

    async fn hand_off(&self, node_id: u64) -> Result<HandOffLeadershipResponse, MembershipError> {
        let cluster = self.cluster()?;
        if node_id == cluster.config.node_id {
            let report = self.broker.relinquish_leaderships(cluster).await;
            return Ok(HandOffLeadershipResponse {
                moved: report.moved,
                remaining: report.remaining,
            });
        }
        let address = cluster
            .meta
            .current()
            .client_address(node_id)
            .ok_or(MembershipError::UnknownAgent { node_id })?;
        let mut request = Request::new(HandOffLeadershipRequest { node_id });
        request.set_timeout(HAND_OFF_CALL_TIMEOUT);
        let mut client = MembershipClient::new(channel(&address)?);
        client
            .hand_off_leadership(request)
            .await
            .map(Response::into_inner)
            .map_err(|status| AgentCallError::Refused { address, status }.into())
    }
}

/// Voters whose log matches this leader's as far as it knows (the leader itself included).
/// Under load a healthy follower trails by the entries in flight, so "matches" allows the lag
/// a learner may have when it is promoted; an exact match would flicker with every append.
fn in_sync(view: &GroupView) -> Vec<u64> {
    view.voters
        .iter()
        .copied()
        .filter(|v| {
            *v == view.me
                || view.matched.get(v).is_some_and(|m| {
                    m + crate::cluster::reconcile::PROMOTE_LAG_ENTRIES >= view.last_index
                })
        })
        .collect()
}

fn agent_pb(
    node_id: u64,
    entry: &crate::cluster::catalog::AgentEntry,
    views: &[(String, u32, GroupView)],
) -> Agent {
    let count = |f: &dyn Fn(&GroupView) -> bool| {
        u32::try_from(views.iter().filter(|(_, _, v)| f(v)).count()).unwrap_or(u32::MAX)
    };
    Agent {
        node_id,
        client_address: entry.client_address.clone(),
        peer_address: entry.peer_address.clone(),
        state: entry.state as i32,
        replicas: count(&|v| v.voters.contains(&node_id)),
        leaders: count(&|v| v.leader == Some(node_id)),
    }
}

/// Why a `Membership` call failed; becomes a status in [`MembershipError::into_status`] only.
#[derive(Debug, thiserror::Error)]
enum MembershipError {
    #[error("this agent runs alone (no --peers): there is no cluster membership to manage")]
    NotClustered,
    #[error("node_id: agent {node_id} is not a member of the cluster")]
    UnknownAgent { node_id: u64 },
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error(transparent)]
    Meta(MetaGroupError),
    #[error(transparent)]
    Agent(#[from] AgentCallError),
}

impl MembershipError {
    fn into_status(self) -> Status {
        use sluice_proto::peer::v1::refused::Code;
        let message = self.to_string();
        match self {
            Self::NotClustered => Status::failed_precondition(message),
            Self::UnknownAgent { .. } => Status::not_found(message),
            Self::InvalidArgument { .. } => Status::invalid_argument(message),
            Self::Meta(MetaGroupError::Invalid(e)) => Status::from(e),
            Self::Meta(MetaGroupError::Refused { code, .. }) => match code {
                Code::AlreadyExists => Status::already_exists(message),
                Code::NotFound => Status::not_found(message),
                Code::FailedPrecondition | Code::Unspecified => {
                    Status::failed_precondition(message)
                }
            },
            Self::Meta(_) => Status::unavailable(message),
            // The other agent's own answer, passed on as it is.
            Self::Agent(AgentCallError::Refused { status, .. }) => {
                Status::new(status.code(), message)
            }
            Self::Agent(AgentCallError::BadAddress { .. }) => Status::internal(message),
        }
    }
}

#[tonic::async_trait]
impl Membership for MembershipService {
    async fn get_cluster(
        &self,
        request: Request<GetClusterRequest>,
    ) -> Result<Response<GetClusterResponse>, Status> {
        let local_only = request.metadata().contains_key(LOCAL_ONLY_HEADER);
        MembershipService::get_cluster(self, local_only)
            .await
            .map(Response::new)
            .map_err(MembershipError::into_status)
    }

    async fn add_agent(
        &self,
        request: Request<AddAgentRequest>,
    ) -> Result<Response<AddAgentResponse>, Status> {
        MembershipService::add_agent(self, request.into_inner())
            .await
            .map(|agent| Response::new(AddAgentResponse { agent: Some(agent) }))
            .map_err(MembershipError::into_status)
    }

    async fn drain_agent(
        &self,
        request: Request<DrainAgentRequest>,
    ) -> Result<Response<DrainAgentResponse>, Status> {
        MembershipService::drain_agent(self, request.into_inner().node_id)
            .await
            .map(|agent| Response::new(DrainAgentResponse { agent: Some(agent) }))
            .map_err(MembershipError::into_status)
    }

    async fn remove_agent(
        &self,
        request: Request<RemoveAgentRequest>,
    ) -> Result<Response<RemoveAgentResponse>, Status> {
        MembershipService::remove_agent(self, request.into_inner().node_id)
            .await
            .map(|()| Response::new(RemoveAgentResponse {}))
            .map_err(MembershipError::into_status)
    }

    async fn hand_off_leadership(
        &self,
        request: Request<HandOffLeadershipRequest>,
    ) -> Result<Response<HandOffLeadershipResponse>, Status> {
        MembershipService::hand_off(self, request.into_inner().node_id)
            .await
            .map(Response::new)
            .map_err(MembershipError::into_status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_sync_voters_are_the_leader_and_followers_within_the_promotion_lag() {
        let lag = crate::cluster::reconcile::PROMOTE_LAG_ENTRIES;
        let view = GroupView {
            me: 0,
            is_leader: true,
            voters: [0, 1, 2, 3].into(),
            learners: [4].into(),
            matched: [
                (1, 1_000),
                (2, 1_000 - lag),
                (3, 1_000 - lag - 1),
                (4, 1_000),
            ]
            .into(),
            last_index: 1_000,
            ..GroupView::default()
        };
        assert_eq!(in_sync(&view), [0, 1, 2]);
    }
}
