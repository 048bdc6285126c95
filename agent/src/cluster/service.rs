//! The server side of `sluice.peer.v1.Cluster`, mounted on the peer port beside
//! `sluice.peer.v1.Raft`.

use std::time::Duration;

use openraft::ServerState;
use sluice_proto::peer::v1 as pb;
use sluice_proto::peer::v1::cluster_server::{Cluster, ClusterServer};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::holds::BalanceHolds;
use super::meta::{MetaGroup, MetaGroupError};
use crate::replication::RaftGroups;
use crate::replication::service::ServiceError;

/// How long a transfer keeps trying to win an election before reporting that it did not.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one campaign is given to win; above the election timeout, so a lost round is over
/// before anything else is tried.
const ELECTION_ROUND: Duration = Duration::from_millis(1_000);
/// How long a leader's vote keeps its voters from granting another (openraft's leader lease is
/// the maximum election timeout), plus a heartbeat of margin.
const LEASE: Duration = Duration::from_millis(
    crate::replication::config::ELECTION_TIMEOUT_MAX_MS
        + crate::replication::config::HEARTBEAT_INTERVAL_MS,
);
/// Longest pause between looks at the group's state while waiting for a settled leader.
const POLL: Duration = Duration::from_millis(50);

/// The `Cluster` service of one agent.
#[derive(Clone)]
pub struct ClusterService {
    /// Every Raft group this agent hosts, for leadership transfers.
    groups: RaftGroups,
    /// This agent's meta replica, for proposals forwarded by other agents.
    meta: MetaGroup,
    /// Groups this agent took on request, which its balancer must not hand straight back.
    holds: BalanceHolds,
}

/// The tonic server of the `Cluster` service over this agent's groups and meta replica, to add
/// to the peer port's server next to the `Raft` service.
pub fn peer_service(
    groups: RaftGroups,
    meta: MetaGroup,
    holds: BalanceHolds,
) -> ClusterServer<ClusterService> {
    ClusterServer::new(ClusterService {
        groups,
        meta,
        holds,
    })
}

/// Why a `Cluster` call failed; becomes a status in [`ClusterError::into_status`] only.
#[derive(Debug, thiserror::Error)]
enum ClusterError {
    #[error(transparent)]
    Group(#[from] ServiceError),
    #[error(transparent)]
    Meta(#[from] MetaGroupError),
    #[error("raft of group {group:?}: {reason}")]
    Raft { group: String, reason: String },
}

impl ClusterError {
    fn into_status(self) -> Status {
        match self {
            Self::Group(e) => e.into_status(),
            Self::Meta(e @ MetaGroupError::Invalid(_)) => Status::invalid_argument(e.to_string()),
            // The caller retries elsewhere or later: the group is electing or shutting down.
            Self::Meta(e) => Status::unavailable(e.to_string()),
            Self::Raft { .. } => Status::unavailable(self.to_string()),
        }
    }
}

impl ClusterService {
    async fn propose_meta(
        &self,
        request: pb::ProposeMetaRequest,
    ) -> Result<pb::ProposeMetaResponse, ClusterError> {
        use pb::propose_meta_response::Result as R;
        let command = self.meta.validate(request.command.unwrap_or_default())?;
        let result = match self.meta.propose_as_leader(&command).await {
            Ok(raft_index) => R::Committed(pb::Committed { raft_index }),
            // Answer, never forward again: the proposer picks the next leader itself, so a
            // stale view of leadership cannot bounce a proposal between agents.
            Err(MetaGroupError::NotLeader { leader }) => {
                R::NotLeader(pb::NotLeader { leader_id: leader })
            }
            Err(MetaGroupError::QueueConflict { queue, difference }) => {
                R::QueueConflict(pb::QueueConflict { queue, difference })
            }
            Err(MetaGroupError::UnknownQueue { queue }) => {
                R::UnknownQueue(pb::UnknownQueue { queue })
            }
            Err(MetaGroupError::Refused { code, reason }) => R::Refused(pb::Refused {
                code: code as i32,
                reason,
            }),
            Err(e) => return Err(e.into()),
        };
        Ok(pb::ProposeMetaResponse {
            result: Some(result),
        })
    }

    /// Starts elections on this agent's replica of the group until it leads or
    /// [`TRANSFER_TIMEOUT`] passes. openraft 0.9 has no transfer: a caught-up replica that
    /// campaigns wins with the old leader's vote once the old leader's own lease has lapsed
    /// (the other followers' leases are kept fresh by its heartbeats). A lost campaign still
    /// unseats the old leader (it saw a higher term), so campaigning again at once would unseat
    /// every next leader too, forever; after a lost round this waits until some leader has
    /// held office for a full lease before trying again (decision 0009).
    ///
    /// When the sender is relieving itself, the group goes on hold first, and the sender gets
    /// no group from this agent's balancer for a while, so a preferred leader that is about to
    /// stop is not handed this or another leadership back.
    async fn transfer_leadership(
        &self,
        request: pb::TransferLeadershipRequest,
    ) -> Result<pb::TransferLeadershipResponse, ClusterError> {
        let raft = self.groups.get(&request.group)?;
        if let Some(quiet) = self.groups.quiet(&request.group) {
            // A campaign needs this replica's election timer for its retries.
            quiet.wake(crate::replication::quiet_group::Wake::Transfer);
        }
        if request.relieve {
            self.holds.hold(&request.group);
            // The sender leads the group now; it is about to stop, so it gets no other
            // leadership from this agent's balancer either. (If this agent already leads it,
            // there is no sender to relieve; this agent must stay eligible.)
            let sender = {
                let metrics = raft.metrics();
                let metrics = metrics.borrow();
                metrics
                    .current_leader
                    .filter(|&leader| leader != metrics.id)
            };
            if let Some(sender) = sender {
                self.holds.relieve(sender);
            }
        }
        let failed = |reason: String| ClusterError::Raft {
            group: request.group.clone(),
            reason,
        };
        let deadline = Instant::now() + TRANSFER_TIMEOUT;
        let mut metrics_rx = raft.metrics();
        // The (term, leader) last seen and since when; the first campaign does not wait.
        let mut office: Option<((u64, Option<u64>), Instant)> = None;
        let mut campaigned = false;
        loop {
            let metrics = metrics_rx.borrow_and_update().clone();
            let now = Instant::now();
            if metrics.state == ServerState::Leader || now >= deadline {
                return Ok(pb::TransferLeadershipResponse {
                    is_leader: metrics.state == ServerState::Leader,
                    leader_id: metrics.current_leader,
                });
            }
            let key = (metrics.current_term, metrics.current_leader);
            let since = match office {
                Some((k, since)) if k == key => since,
                _ => {
                    office = Some((key, now));
                    now
                }
            };
            let settled = metrics.current_leader.is_some() && now - since >= LEASE;
            if !campaigned || settled {
                campaigned = true;
                raft.trigger()
                    .elect()
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                let round = ELECTION_ROUND.min(deadline.saturating_duration_since(Instant::now()));
                // A timeout only means this round was lost; the loop decides what next.
                let _ = raft
                    .wait(Some(round))
                    .state(ServerState::Leader, "leadership transfer")
                    .await;
                office = None;
            } else {
                // Wait for the next metrics change, or the moment the lease would have lapsed.
                let _ = tokio::time::timeout(POLL, metrics_rx.changed()).await;
            }
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn propose_meta(
        &self,
        request: Request<pb::ProposeMetaRequest>,
    ) -> Result<Response<pb::ProposeMetaResponse>, Status> {
        ClusterService::propose_meta(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(ClusterError::into_status)
    }

    async fn transfer_leadership(
        &self,
        request: Request<pb::TransferLeadershipRequest>,
    ) -> Result<Response<pb::TransferLeadershipResponse>, Status> {
        ClusterService::transfer_leadership(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(ClusterError::into_status)
    }
}
