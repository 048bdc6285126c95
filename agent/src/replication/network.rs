//! The client side of the peer transport: openraft's network over tonic.
//!
//! One [`PeerNetwork`] per partition group; it hands openraft one [`PeerClient`] per target,
//! all on one connection per peer (`peer_channels`). Channels connect lazily and reconnect by themselves, so a peer that is down shows as
//! `Unreachable` (openraft backs off) rather than failing the group.

use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use sluice_proto::peer::v1 as pb;
use sluice_proto::peer::v1::raft_client::RaftClient;
use tonic::transport::{Channel, Endpoint};

use super::codec;
use super::service::{CONNECTION_WINDOW_BYTES, MAX_REQUEST_BYTES, STREAM_WINDOW_BYTES};
use super::types::{NodeId, TypeConfig};

/// HTTP/2 pings on an idle peer connection: a peer that vanished without closing the socket
/// (power loss, partition) is noticed within interval + timeout and the channel reconnects,
/// rather than the next AppendEntries waiting on a dead connection until its deadline.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a keepalive ping may go unanswered.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A lazily connecting channel to the peer port at `address` (`host:port`), tuned for
/// replication batches. Fails only for an address that is no valid URI authority.
pub fn peer_channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .http2_max_local_error_reset_streams(super::service::MAX_RESET_STREAMS);
    Ok(endpoint.connect_lazy())
}

/// The `sluice.peer.v1.Raft` client over `channel`, with the peer port's message limits.
pub fn peer_client(channel: Channel) -> RaftClient<Channel> {
    RaftClient::new(channel)
        .max_encoding_message_size(MAX_REQUEST_BYTES)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
}

/// AppendEntries sent by this agent's leaders, by kind (`heartbeat` when it carries no
/// entries, else `entries`), for `/metrics`: with idle groups quiescent, heartbeats stop.
pub static APPEND_ENTRIES_SENT: std::sync::LazyLock<
    prometheus_client::metrics::family::Family<
        AppendKind,
        prometheus_client::metrics::counter::Counter,
    >,
> = std::sync::LazyLock::new(Default::default);

/// Label of [`APPEND_ENTRIES_SENT`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct AppendKind {
    /// `heartbeat` or `entries`.
    pub kind: &'static str,
}

/// Builds clients to the peers of one partition group.
#[derive(Debug, Clone)]
pub struct PeerNetwork {
    /// The group name every request carries, so one peer port serves many partitions.
    group: String,
}

impl PeerNetwork {
    /// The network of the group named `group` (the same name on every replica).
    pub fn new(group: impl Into<String>) -> Self {
        Self {
            group: group.into(),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, _target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            group: self.group.clone(),
            node: node.clone(),
            client: None,
        }
    }
}

/// The calls of one group to one peer, on the process's connection to that peer.
pub struct PeerClient {
    group: String,
    node: BasicNode,
    /// Taken on first use from [`PeerChannels`](super::peer_channels::PeerChannels); tonic
    /// reconnects the shared channel after failures.
    client: Option<RaftClient<Channel>>,
}

/// An RPC error without a remote Raft error type (votes and appends use `RaftError`).
type RpcError<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl PeerClient {
    fn client(&mut self) -> Result<RaftClient<Channel>, tonic::transport::Error> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let client = super::peer_channels::PeerChannels::shared().client(&self.node.addr)?;
        self.client = Some(client.clone());
        Ok(client)
    }

    fn request<T>(&self, message: T, option: &RPCOption) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(option.hard_ttl());
        request
    }

    /// Maps a failed call: a peer that cannot be reached is `Unreachable` (openraft backs
    /// off 500 ms before retrying); any other status is a network error, which openraft
    /// retries at its normal pace.
    ///
    /// A call that ran out of time is not `Unreachable`: openraft 0.9 gives an AppendEntries
    /// only a heartbeat interval, so one slow round trip under load (a large batch, a
    /// follower's fsync stall) would otherwise silence replication to that follower for
    /// 500 ms — a confirm-latency spike, and when it hits both followers at once, no
    /// heartbeats and an election.
    fn status<E: std::error::Error>(&self, status: tonic::Status) -> RpcError<E> {
        match status.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        }
    }
}

fn decode_error<E: std::error::Error>(e: &codec::CodecError) -> RpcError<E> {
    RPCError::Network(NetworkError::new(e))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        let message = pb::AppendEntriesRequest {
            group: self.group.clone(),
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            prev_log_id: codec::opt_log_id_to_pb(&rpc.prev_log_id),
            entries: rpc.entries.iter().map(codec::entry_to_pb).collect(),
            leader_commit: codec::opt_log_id_to_pb(&rpc.leader_commit),
        };
        let request = self.request(message, &option);
        let sent = std::time::Instant::now();
        super::timing::record_value("ae_entries", rpc.entries.len() as u64);
        let kind = if rpc.entries.is_empty() {
            "heartbeat"
        } else {
            "entries"
        };
        APPEND_ENTRIES_SENT
            .get_or_create(&AppendKind { kind })
            .inc();
        let response = self
            .client()
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?
            .append_entries(request)
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        super::timing::record("ae_round_trip", sent.elapsed());
        use pb::append_entries_response::Result as R;
        match response.result {
            Some(R::Success(_)) => Ok(AppendEntriesResponse::Success),
            Some(R::PartialSuccess(p)) => Ok(AppendEntriesResponse::PartialSuccess(
                codec::opt_log_id_from_pb(&p.matching),
            )),
            Some(R::Conflict(_)) => Ok(AppendEntriesResponse::Conflict),
            Some(R::HigherVote(v)) => {
                Ok(AppendEntriesResponse::HigherVote(codec::vote_from_pb(&v)))
            }
            None => Err(decode_error(&codec::CodecError::Missing {
                message: "AppendEntriesResponse",
                field: "result",
            })),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>> {
        let message = pb::InstallSnapshotRequest {
            group: self.group.clone(),
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            last_log_id: codec::opt_log_id_to_pb(&rpc.meta.last_log_id),
            last_membership: Some(codec::stored_membership_to_pb(&rpc.meta.last_membership)),
            snapshot_id: rpc.meta.snapshot_id.clone(),
            offset: rpc.offset,
            data: rpc.data,
            done: rpc.done,
        };
        let request = self.request(message, &option);
        let response = self
            .client()
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?
            .install_snapshot(request)
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        let vote = codec::required_vote(&response.vote, "InstallSnapshotResponse")
            .map_err(|e| decode_error(&e))?;
        Ok(InstallSnapshotResponse { vote })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcError> {
        let message = pb::VoteRequest {
            group: self.group.clone(),
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            last_log_id: codec::opt_log_id_to_pb(&rpc.last_log_id),
        };
        let request = self.request(message, &option);
        let response = self
            .client()
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?
            .vote(request)
            .await
            .map_err(|s| self.status(s))?
            .into_inner();
        let vote =
            codec::required_vote(&response.vote, "VoteResponse").map_err(|e| decode_error(&e))?;
        Ok(VoteResponse {
            vote,
            vote_granted: response.vote_granted,
            last_log_id: codec::opt_log_id_from_pb(&response.last_log_id),
        })
    }
}
