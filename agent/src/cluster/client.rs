//! Calls to other agents: the client side of `sluice.peer.v1.Cluster` (forwarding meta
//! proposals to the leader, asking an agent to take leadership of a group), and the fan-out
//! of `sluice.v1.Membership.GetCluster` that shows the groups other agents host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_proto::peer::v1 as pb;
use sluice_proto::peer::v1::cluster_client::ClusterClient;
use tonic::transport::{Channel, Endpoint};

use std::collections::BTreeMap;

use sluice_proto::v1::membership_client::MembershipClient;
use sluice_proto::v1::{GetClusterRequest, GetClusterResponse};
use tonic::{Request, Response};

use super::ClusterContext;
use super::reconcile::GroupView;
use crate::replication::NodeId;

/// Request metadata asking an agent for its own replicas' view only. `GetCluster` fills in the
/// in-sync replicas of partitions led elsewhere from their leaders with it, `GetQueueStats`
/// the counters of partitions led elsewhere, and the leaders do not ask further.
pub const LOCAL_ONLY_HEADER: &str = "sluice-local-only";
/// Deadline of a `GetCluster` of another agent's local view.
const LOCAL_VIEW_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a call to another agent's client port (`sluice.v1.Membership`) failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    /// The catalog's address of the agent is not a valid authority.
    #[error("agent address {address:?} is not a valid authority: {source}")]
    BadAddress {
        /// The address.
        address: String,
        /// Why it does not parse.
        #[source]
        source: tonic::transport::Error,
    },
    /// The agent answered with an error status, or could not be reached.
    #[error("agent at {address}: {status}")]
    Refused {
        /// The agent's client address.
        address: String,
        /// Its answer.
        #[source]
        status: tonic::Status,
    },
}

/// Deadline of one forwarded proposal: the leader confirms its leadership, commits on a quorum
/// (two fsyncs and a round trip) and applies; seconds only when something is wrong.
const PROPOSE_RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of a leadership transfer call: the receiver may need a few election rounds.
const TRANSFER_RPC_TIMEOUT: Duration = Duration::from_secs(15);

/// Connections to other agents' `Cluster` services, by peer address. Channels connect lazily
/// and reconnect by themselves, so one per address serves for the agent's lifetime.
#[derive(Clone, Default)]
pub struct PeerClients {
    clients: Arc<Mutex<HashMap<String, ClusterClient<Channel>>>>,
}

impl PeerClients {
    fn client(&self, peer: &str) -> Result<ClusterClient<Channel>, tonic::Status> {
        let mut clients = match self.clients.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = clients.get(peer) {
            return Ok(c.clone());
        }
        let client = ClusterClient::new(endpoint(peer)?.connect_lazy());
        clients.insert(peer.to_owned(), client.clone());
        Ok(client)
    }

    /// Sends `command` to the agent at `peer` for it to commit as the meta leader.
    pub async fn propose(
        &self,
        peer: &str,
        command: pb::MetaCommand,
    ) -> Result<pb::ProposeMetaResponse, tonic::Status> {
        let mut request = tonic::Request::new(pb::ProposeMetaRequest {
            command: Some(command),
        });
        request.set_timeout(PROPOSE_RPC_TIMEOUT);
        Ok(self.client(peer)?.propose_meta(request).await?.into_inner())
    }
}

fn endpoint(peer: &str) -> Result<Endpoint, tonic::Status> {
    Endpoint::from_shared(format!("http://{peer}")).map_err(|e| {
        tonic::Status::invalid_argument(format!(
            "peer address {peer:?} is not a valid authority: {e}"
        ))
    })
}

/// What an agent reported after being asked to take leadership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferOutcome {
    /// Whether it leads the group now.
    pub is_leader: bool,
    /// The leader it knows of; `None` during an election.
    pub leader: Option<NodeId>,
}

/// Why a leadership transfer call failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The call did not complete (peer down, unknown group: `NOT_FOUND` naming it).
    #[error("transfer leadership of {group:?} to {peer}: {status}")]
    Rpc {
        /// The agent asked.
        peer: String,
        /// The group.
        group: String,
        /// What it (or the transport) answered.
        #[source]
        status: tonic::Status,
    },
}

/// Asks the agent whose peer port is `peer_addr` to take leadership of `group`; it starts an
/// election on its replica and answers whether it leads when the call returns (decision 0009:
/// a caught-up replica wins; one behind may not, and reports `is_leader: false`).
pub async fn transfer_leadership(
    peer_addr: &str,
    group: &str,
    relieve: bool,
) -> Result<TransferOutcome, TransferError> {
    let failed = |status| TransferError::Rpc {
        peer: peer_addr.to_owned(),
        group: group.to_owned(),
        status,
    };
    let channel = endpoint(peer_addr).map_err(failed)?.connect_lazy();
    let mut request = tonic::Request::new(pb::TransferLeadershipRequest {
        group: group.to_owned(),
        relieve,
    });
    request.set_timeout(TRANSFER_RPC_TIMEOUT);
    let response = ClusterClient::new(channel)
        .transfer_leadership(request)
        .await
        .map_err(failed)?
        .into_inner();
    Ok(TransferOutcome {
        is_leader: response.is_leader,
        leader: response.leader_id,
    })
}

/// Views of the groups other agents host (decision 0014: with a replication factor below the
/// agent count no agent hosts every group): every other agent with a client address is asked
/// for its own replicas' views (`GetCluster`, local only), and for each partition the view of
/// the agent that leads it is kept, else any. Agents that do not answer in time are left out.
/// Such a view carries no commit state and counts as settled; callers that decide on it (the
/// life-cycle moves) only count voters, which a rolled-back change cannot have added for long.
pub async fn remote_views(
    cluster: &ClusterContext,
    catalog: &super::Catalog,
) -> Vec<(String, u32, GroupView)> {
    let me = cluster.config.node_id;
    let asks = catalog
        .client_addresses()
        .into_iter()
        .filter(|(node, _)| *node != me)
        .map(|(node, address)| async move { (node, local_view(&address).await.ok()) });
    let mut out: BTreeMap<(String, u32), GroupView> = BTreeMap::new();
    for (node, answer) in futures::future::join_all(asks).await {
        let Some(answer) = answer else { continue };
        for p in answer.partitions {
            let is_leader = p.leader == Some(node);
            let key = (p.queue.clone(), p.partition);
            if out.get(&key).is_some_and(|v| v.is_leader || !is_leader) {
                continue;
            }
            let voters: std::collections::BTreeSet<u64> = p.voters.iter().copied().collect();
            let learners: std::collections::BTreeSet<u64> = p.learners.iter().copied().collect();
            let view = GroupView {
                me: node,
                is_leader,
                leader: p.leader,
                target: voters.union(&learners).copied().collect(),
                voters,
                learners,
                settled: true,
                ..GroupView::default()
            };
            out.insert(key, view);
        }
    }
    out.into_iter().map(|((q, p), v)| (q, p, v)).collect()
}

/// Another agent's own numbers of `queue` (`GetQueueStats` with [`LOCAL_ONLY_HEADER`]): true
/// for the partitions it leads.
pub async fn local_stats(
    address: &str,
    queue: &str,
) -> Result<sluice_proto::v1::GetQueueStatsResponse, AgentCallError> {
    let request = local_only(sluice_proto::v1::GetQueueStatsRequest {
        name: queue.to_owned(),
    });
    let mut client = sluice_proto::v1::admin_client::AdminClient::new(channel(address)?);
    let answer = client.get_queue_stats(request).await;
    answered(address, answer)
}

/// A request for another agent's own view, not to be sent on ([`LOCAL_ONLY_HEADER`]).
fn local_only<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(LOCAL_VIEW_TIMEOUT);
    request.metadata_mut().insert(
        LOCAL_ONLY_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    request
}

/// The answer of the agent at `address`, or its refusal.
fn answered<T>(
    address: &str,
    answer: Result<Response<T>, tonic::Status>,
) -> Result<T, AgentCallError> {
    answer
        .map(Response::into_inner)
        .map_err(|status| AgentCallError::Refused {
            address: address.to_owned(),
            status,
        })
}

/// A lazily connecting channel to another agent's client port.
pub fn channel(address: &str) -> Result<Channel, AgentCallError> {
    let endpoint = Endpoint::from_shared(format!("http://{address}")).map_err(|source| {
        AgentCallError::BadAddress {
            address: address.to_owned(),
            source,
        }
    })?;
    Ok(endpoint.connect_lazy())
}

/// Another agent's own view (`GetCluster` with [`LOCAL_ONLY_HEADER`]).
pub async fn local_view(address: &str) -> Result<GetClusterResponse, AgentCallError> {
    let mut client = MembershipClient::new(channel(address)?);
    let answer = client.get_cluster(local_only(GetClusterRequest {})).await;
    answered(address, answer)
}
