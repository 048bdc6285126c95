//! The openraft type configuration of a partition's Raft group.

use std::io::Cursor;

use bytes::Bytes;

openraft::declare_raft_types!(
    /// Types of a partition's Raft group: application data is an encoded
    /// `sluice.storage.v1.LogCommand`, nodes are agents addressed by their peer `host:port`,
    /// snapshots are held in memory (they carry only unsettled messages, see decision 0008), and
    /// the runtime parks the ticker of a quiescent group (`runtime`).
    pub TypeConfig:
        D = Bytes,
        R = Applied,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = super::runtime::QuietRuntime,
);

/// Identifies an agent within a partition's Raft group.
pub type NodeId = u64;

/// A partition's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// What applying a committed client write returns: where the command landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Log index of the command (a publish's message offset).
    pub index: u64,
}

/// What a committed client write reports.
pub type WriteResponse = openraft::raft::ClientWriteResponse<TypeConfig>;
