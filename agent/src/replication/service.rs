//! The server side of the peer transport: `sluice.peer.v1.Raft`, routing each request to the
//! Raft group it names.
//!
//! Served only on the peer port; requests for a group this agent does not host are refused with
//! `NOT_FOUND` naming the group, so a misrouted peer learns it at once.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use openraft::SnapshotMeta;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest,
};
use sluice_proto::peer::v1 as pb;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use super::codec::{self, CodecError};
use super::left_out;
use super::quiescence::Quiescence;
use super::quiet_group::{QuietGroup, Wake};
use super::types::Raft;

/// How often an idle peer connection is probed, so a peer that vanished without closing its
/// socket (power loss, network partition) is noticed and its connection dropped.
const PEER_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest peer request the server decodes: one AppendEntries of
/// [`MAX_APPEND_BYTES`](super::log_store::MAX_APPEND_BYTES) plus one entry of the largest size a
/// log record holds, plus framing. (tonic's default of 4 MiB would refuse a batch ending in a
/// large entry, and the follower could then never catch up.)
pub const MAX_REQUEST_BYTES: usize =
    super::log_store::MAX_APPEND_BYTES + crate::log::record::MAX_DATA_BYTES + (1 << 20);
// A request stops taking entries once MAX_APPEND_BYTES is reached, so its worst case is just
// under that plus one entry of the largest size; one whole request fits the stream window.
const _: () = assert!(
    MAX_REQUEST_BYTES > super::log_store::MAX_APPEND_BYTES + crate::log::record::MAX_DATA_BYTES
);
const _: () = assert!(STREAM_WINDOW_BYTES as usize >= super::log_store::MAX_APPEND_BYTES);

/// HTTP/2 receive window per stream on the peer port: one whole AppendEntries fits, so a
/// request never waits a round trip for a window update.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// HTTP/2 receive window per connection: the streams of every group this peer sends for.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// Streams reset (a peer's before the server accepted them; this side's own, as a call timed
/// out or its answer was dropped) before h2 ends the connection. h2's defaults (20 and 1,024)
/// guard a public port against "rapid reset" floods; on the peer port every group of a peer
/// shares one connection (`peer_channels`), and an overloaded moment (a thousand groups
/// electing at once after an agent died) times out and resets hundreds of calls legitimately:
/// with the defaults, h2 closed the connection every group depended on, which timed out more
/// calls. Bounded still, as each pending reset holds a slot.
pub const MAX_RESET_STREAMS: usize = 100_000;

/// The tonic server builder for the peer port, with the HTTP/2 windows sized for replication
/// batches. Add [`PeerService::into_server`] (and the other peers-only services) and serve it
/// with [`peer_incoming`].
pub fn peer_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .http2_max_pending_accept_reset_streams(Some(MAX_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_RESET_STREAMS))
}

/// The accepted connections of the peer port, with `TCP_NODELAY` set on each.
///
/// Serve the peer port through this (`serve_with_incoming(peer_incoming(listener))`): tonic
/// ignores its own `tcp_nodelay` setting for caller-provided listeners, and without it Nagle's
/// algorithm holds back the small trailing frames of each AppendEntries response until the
/// caller's delayed ACK (~40 ms on Linux) — which is what capped replication at ~1,200 writes/s
/// (decision 0008, "Tuning").
pub fn peer_incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(PEER_KEEPALIVE))
}

/// The Raft groups this agent hosts, by group name. Clones share the registry.
#[derive(Clone, Default)]
pub struct RaftGroups {
    groups: Arc<RwLock<HashMap<String, Hosted>>>,
}

/// One hosted group: its Raft and, for a partition group, its quiescence.
#[derive(Clone)]
struct Hosted {
    raft: Raft,
    quiet: Option<Arc<QuietGroup>>,
}

impl RaftGroups {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts routing requests for `group` to `raft` (replacing a previous instance, as when a
    /// replica restarts in the same process).
    pub fn insert(&self, group: impl Into<String>, raft: Raft) {
        self.write()
            .insert(group.into(), Hosted { raft, quiet: None });
    }

    /// Like [`Self::insert`], for a group that may quiesce when idle (a partition's).
    pub fn insert_quiet(&self, quiet: Arc<QuietGroup>) {
        let hosted = Hosted {
            raft: quiet.raft.clone(),
            quiet: Some(quiet.clone()),
        };
        self.write().insert(quiet.name.clone(), hosted);
    }

    /// Stops routing requests for `group`; returns its Raft if it was registered.
    pub fn remove(&self, group: &str) -> Option<Raft> {
        self.write().remove(group).map(|h| h.raft)
    }

    /// The Raft of `group`; `UnknownGroup` when this agent does not host it.
    pub fn get(&self, group: &str) -> Result<Raft, ServiceError> {
        self.read()
            .get(group)
            .map(|h| h.raft.clone())
            .ok_or_else(|| ServiceError::UnknownGroup {
                group: group.to_string(),
            })
    }

    /// The quiescence of `group`, when it is a hosted partition group.
    pub fn quiet(&self, group: &str) -> Option<Arc<QuietGroup>> {
        self.read().get(group).and_then(|h| h.quiet.clone())
    }

    /// Every hosted group that may quiesce.
    pub fn quiet_groups(&self) -> Vec<Arc<QuietGroup>> {
        self.read()
            .values()
            .filter_map(|h| h.quiet.clone())
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Hosted>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Hosted>> {
        self.groups.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a peer request failed; becomes a `tonic::Status` in [`ServiceError::into_status`] only.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request names a group this agent does not host.
    #[error("this agent hosts no Raft group {group:?}")]
    UnknownGroup {
        /// The group.
        group: String,
    },
    /// The request is malformed.
    #[error("bad request: {0}")]
    BadRequest(#[from] CodecError),
    /// The local Raft could not handle it (shutting down, or a storage failure).
    #[error("raft: {0}")]
    Raft(String),
}

impl ServiceError {
    /// The one place peer errors become statuses.
    pub fn into_status(self) -> Status {
        let message = self.to_string();
        match self {
            Self::UnknownGroup { .. } => Status::not_found(message),
            Self::BadRequest(_) => Status::invalid_argument(message),
            // Unavailable makes the caller treat this node as unreachable and back off.
            Self::Raft(_) => Status::unavailable(message),
        }
    }
}

/// The `sluice.peer.v1.Raft` service over a [`RaftGroups`] registry.
#[derive(Clone)]
pub struct PeerService {
    groups: RaftGroups,
    quiescence: Option<Quiescence>,
}

impl PeerService {
    /// A service routing to `groups`; `Quiesce` and `Alive` are unimplemented until
    /// [`Self::with_quiescence`].
    pub fn new(groups: RaftGroups) -> Self {
        Self {
            groups,
            quiescence: None,
        }
    }

    /// Serves `Quiesce` and `Alive` with `quiescence`.
    pub fn with_quiescence(self, quiescence: Quiescence) -> Self {
        Self {
            quiescence: Some(quiescence),
            ..self
        }
    }

    /// The tonic server wrapper to add to a `Server` builder.
    pub fn into_server(self) -> pb::raft_server::RaftServer<Self> {
        pb::raft_server::RaftServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    async fn append_entries(
        &self,
        req: pb::AppendEntriesRequest,
    ) -> Result<pb::AppendEntriesResponse, ServiceError> {
        let raft = self.groups.get(&req.group)?;
        let received = std::time::Instant::now();
        let vote = codec::required_vote(&req.vote, "AppendEntriesRequest")?;
        let entries = req
            .entries
            .into_iter()
            .map(codec::entry_from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(quiet) = self.groups.quiet(&req.group) {
            let prev = codec::opt_log_id_from_pb(&req.prev_log_id).map(|l| l.index);
            let commit = codec::opt_log_id_from_pb(&req.leader_commit).map(|l| l.index);
            quiet.appended(&vote, entries.len(), prev, commit);
        }
        let rpc = AppendEntriesRequest {
            vote,
            prev_log_id: codec::opt_log_id_from_pb(&req.prev_log_id),
            entries,
            leader_commit: codec::opt_log_id_from_pb(&req.leader_commit),
        };
        let response = raft
            .append_entries(rpc)
            .await
            .map_err(|e| ServiceError::Raft(e.to_string()))?;
        super::timing::record("ae_follower", received.elapsed());
        use pb::append_entries_response::Result as R;
        let result = match response {
            AppendEntriesResponse::Success => R::Success(pb::Empty {}),
            AppendEntriesResponse::PartialSuccess(matching) => {
                R::PartialSuccess(pb::PartialSuccess {
                    matching: codec::opt_log_id_to_pb(&matching),
                })
            }
            AppendEntriesResponse::Conflict => R::Conflict(pb::Empty {}),
            AppendEntriesResponse::HigherVote(v) => R::HigherVote(codec::vote_to_pb(&v)),
        };
        Ok(pb::AppendEntriesResponse {
            result: Some(result),
        })
    }

    async fn vote(&self, req: pb::VoteRequest) -> Result<pb::VoteResponse, ServiceError> {
        let raft = self.groups.get(&req.group)?;
        let rpc = VoteRequest {
            vote: codec::required_vote(&req.vote, "VoteRequest")?,
            last_log_id: codec::opt_log_id_from_pb(&req.last_log_id),
        };
        if let Some(refusal) = left_out::vote_refusal(&raft, &rpc) {
            return Ok(refusal);
        }
        self.wake(&req.group, Wake::Vote);
        let response = raft
            .vote(rpc)
            .await
            .map_err(|e| ServiceError::Raft(e.to_string()))?;
        Ok(pb::VoteResponse {
            vote: Some(codec::vote_to_pb(&response.vote)),
            vote_granted: response.vote_granted,
            last_log_id: codec::opt_log_id_to_pb(&response.last_log_id),
        })
    }

    async fn install_snapshot(
        &self,
        req: pb::InstallSnapshotRequest,
    ) -> Result<pb::InstallSnapshotResponse, ServiceError> {
        let raft = self.groups.get(&req.group)?;
        self.wake(&req.group, Wake::Snapshot);
        let rpc = InstallSnapshotRequest {
            vote: codec::required_vote(&req.vote, "InstallSnapshotRequest")?,
            meta: SnapshotMeta {
                last_log_id: codec::opt_log_id_from_pb(&req.last_log_id),
                last_membership: codec::stored_membership_from_pb(&req.last_membership),
                snapshot_id: req.snapshot_id,
            },
            offset: req.offset,
            data: req.data,
            done: req.done,
        };
        let response = raft
            .install_snapshot(rpc)
            .await
            .map_err(|e| ServiceError::Raft(e.to_string()))?;
        Ok(pb::InstallSnapshotResponse {
            vote: Some(codec::vote_to_pb(&response.vote)),
        })
    }

    /// Wakes `group` if it is quiet.
    fn wake(&self, group: &str, cause: Wake) {
        if let Some(quiet) = self.groups.quiet(group) {
            quiet.wake(cause);
        }
    }

    fn quiescence(&self) -> Result<&Quiescence, Status> {
        self.quiescence
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this agent does not quiesce groups"))
    }
}

#[tonic::async_trait]
impl pb::raft_server::Raft for PeerService {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        PeerService::append_entries(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(ServiceError::into_status)
    }

    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        PeerService::vote(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(ServiceError::into_status)
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        PeerService::install_snapshot(self, request.into_inner())
            .await
            .map(Response::new)
            .map_err(ServiceError::into_status)
    }

    async fn quiesce(
        &self,
        request: Request<pb::QuiesceRequest>,
    ) -> Result<Response<pb::QuiesceResponse>, Status> {
        let quiesced = self.quiescence()?.quiesce_requested(request.into_inner());
        Ok(Response::new(pb::QuiesceResponse { quiesced }))
    }

    async fn left_out(
        &self,
        request: Request<pb::LeftOutRequest>,
    ) -> Result<Response<pb::LeftOutResponse>, Status> {
        let request = request.into_inner();
        let left_out = request
            .replicas
            .into_iter()
            .filter(|r| {
                self.groups
                    .get(&r.group)
                    .is_ok_and(|raft| left_out::is_left_out(&raft, request.node_id, r.last_index))
            })
            .map(|r| r.group)
            .collect();
        Ok(Response::new(pb::LeftOutResponse { left_out }))
    }

    async fn alive(
        &self,
        request: Request<pb::AliveRequest>,
    ) -> Result<Response<pb::AliveResponse>, Status> {
        let liveness = self.quiescence()?.liveness();
        liveness.heard_from(request.get_ref().node_id);
        Ok(Response::new(pb::AliveResponse {
            node_id: liveness.node_id(),
            boot_id: liveness.boot_id(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn peer_connections_are_accepted_with_nodelay_set() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut incoming = peer_incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("read TCP_NODELAY"));
    }
}
