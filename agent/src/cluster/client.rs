//! The client side of `sluice.peer.v1.Cluster`: forwarding meta proposals to the leader and
//! asking an agent to take leadership of a group.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_proto::peer::v1 as pb;
use sluice_proto::peer::v1::cluster_client::ClusterClient;
use tonic::transport::{Channel, Endpoint};

use crate::replication::NodeId;

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
