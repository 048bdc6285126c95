//! Replicas a group removed while they were not listening (decision 0027).
//!
//! openraft stops replicating to a node as soon as the configuration without it is appended,
//! so the removed replica may never see that configuration: it goes on counting itself a
//! member. Its peers can tell ([`is_left_out`]); its agent asks them ([`ask`]) about the
//! replicas placement no longer wants there and deletes those they name.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use sluice_proto::peer::v1 as pb;

use openraft::raft::VoteRequest;

use super::codec;
use super::peer_channels::PeerChannels;
use super::types::{NodeId, Raft};

/// How long one peer may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `raft`'s group removed `node` while it was not listening: its committed membership
/// has `node` in no configuration, and `node`'s log (ending at `last_index`) stops before that
/// membership's entry, so it never saw it. A node whose log reaches past that entry may know a
/// newer membership with it in. (The index alone decides: every entry of a later term than a
/// committed entry lies past it.)
pub fn is_left_out(raft: &Raft, node: NodeId, last_index: Option<u64>) -> bool {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let Some(config) = m.membership_config.log_id() else {
        return false;
    };
    let committed = m
        .last_applied
        .is_some_and(|applied| applied.index >= config.index);
    let member = m
        .membership_config
        .membership()
        .nodes()
        .any(|(id, _)| *id == node);
    committed && !member && last_index.is_none_or(|last| last < config.index)
}

/// The refusal of a vote request from a replica its group left out
/// ([`is_left_out`]). Such a
/// candidate campaigns at every election timeout; handed to openraft, each request would wake
/// a quiescent follower whose leader stays quiet, and the follower would start an election of
/// its own. Refusing a vote is always safe in Raft.
pub fn vote_refusal(raft: &Raft, rpc: &VoteRequest<NodeId>) -> Option<pb::VoteResponse> {
    let candidate = rpc.vote.leader_id().voted_for()?;
    if !is_left_out(raft, candidate, rpc.last_log_id.map(|l| l.index)) {
        return None;
    }
    let m = raft.metrics().borrow().clone();
    Some(pb::VoteResponse {
        vote: Some(codec::vote_to_pb(&m.vote)),
        vote_granted: false,
        last_log_id: codec::opt_log_id_to_pb(&m.last_applied),
    })
}

/// One of this agent's replicas to ask about.
#[derive(Debug, Clone)]
pub struct Question {
    /// Its group.
    pub group: String,
    /// Index of its last log entry.
    pub last_index: Option<u64>,
    /// Peer addresses of the other members it knows of.
    pub peers: Vec<String>,
}

/// The groups of `questions` that at least one peer says left `me` out: one `LeftOut` call per
/// peer address for all the groups it is asked about. A peer that does not answer says nothing.
pub async fn ask(me: NodeId, questions: &[Question]) -> HashSet<String> {
    let mut by_peer: BTreeMap<&str, Vec<pb::ReplicaPosition>> = BTreeMap::new();
    for q in questions {
        for peer in &q.peers {
            by_peer
                .entry(peer.as_str())
                .or_default()
                .push(pb::ReplicaPosition {
                    group: q.group.clone(),
                    last_index: q.last_index,
                });
        }
    }
    let calls = by_peer.into_iter().map(|(peer, replicas)| async move {
        let Ok(mut client) = PeerChannels::shared().client(peer) else {
            return Vec::new();
        };
        let call = client.left_out(pb::LeftOutRequest {
            node_id: me,
            replicas,
        });
        match tokio::time::timeout(ASK_TIMEOUT, call).await {
            Ok(Ok(answer)) => answer.into_inner().left_out,
            Ok(Err(status)) => {
                tracing::debug!(peer, %status, "asking which replicas were left out failed");
                Vec::new()
            }
            Err(_) => Vec::new(),
        }
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}
