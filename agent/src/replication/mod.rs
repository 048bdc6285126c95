//! Replication: each partition is one Raft group (openraft, decision 0008).
//!
//! The replicated log *is* the partition log: every Raft entry is stored as one record of the
//! partition's [`LogStore`](crate::log::LogStore), with the Raft term as the record's term and the
//! encoded queue command as its data, so a message is written to disk once per replica.
//! Raft-internal entries (a new leader's no-op, membership changes) are stored as
//! `sluice.peer.v1.ControlEntry`, whose field numbers a `LogCommand` decoder skips, so they read
//! as no-op commands to the queue layer.
//!
//! # Layout
//! - [`types`]: the openraft type configuration.
//! - [`config`]: the tuned openraft configuration every group uses.
//! - [`codec`]: conversions between openraft values, log records and `sluice.peer.v1` messages.
//! - [`meta`]: the small atomically replaced file holding the vote and the purge point.
//! - [`log_store`]: openraft's log storage over a `LogStore`.
//! - [`state_machine`]: applies committed entries to a partition's delivery state; snapshots.
//! - [`network`]: the client side of the peer transport (tonic).
//! - [`peer_channels`]: one connection per peer address, shared by every group.
//! - [`service`]: the server side, `sluice.peer.v1.Raft`, routing requests to groups.
//! - [`quiet_group`]: whether one partition group ticks or is quiescent (decision 0025).
//! - [`quiescence`]: the agent-wide loop that quiesces idle groups and wakes them.
//! - [`runtime`]: openraft's tokio runtime with a ticker that sleeps through quiescence.
//! - [`liveness`]: the one `Alive` exchange per agent pair that quiet groups rely on.
//! - [`timing`]: stage durations of the replicated write path, at debug level.

pub mod codec;
pub mod config;
pub mod left_out;
pub mod liveness;
pub mod log_store;
pub mod meta;
pub mod network;
pub mod peer_channels;
pub mod quiescence;
pub mod quiet_group;
pub mod runtime;
pub mod service;
pub mod state_machine;
pub mod timing;
pub mod types;

pub use config::raft_config;
pub use liveness::Liveness;
pub use log_store::ReplicatedLog;
pub use network::PeerNetwork;
pub use quiescence::Quiescence;
pub use quiet_group::QuietGroup;
pub use service::{PeerService, RaftGroups};
pub use state_machine::QueueStateMachine;
pub use types::{NodeId, Raft, TypeConfig};

/// Waits up to `timeout` for a Raft group's `shutdown`, logging rather than returning a
/// failure: everything acknowledged is on disk already, so a group that does not stop in time
/// is left behind as a crash would leave it.
pub async fn stop_within<E: std::fmt::Display>(
    group: &str,
    timeout: std::time::Duration,
    shutdown: impl std::future::Future<Output = Result<(), E>>,
) {
    match tokio::time::timeout(timeout, shutdown).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(group, error = %e, "raft did not stop cleanly"),
        Err(_) => tracing::warn!(group, "raft did not stop in time"),
    }
}

/// A hash of a group's name that every agent and every run computes alike (FNV-1a; the std
/// hasher promises no stability), for choices that spread groups over agents or over time.
pub fn group_hash(group: &str) -> u64 {
    group.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
