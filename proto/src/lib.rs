//! Generated types and gRPC stubs of Sluice's public API, package `sluice.v1`.
//!
//! The source of truth is `proto/sluice/v1/sluice.proto`; every message and field is documented
//! there and the docs are carried into the generated code.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// Package `sluice.v1`: the public client API (admin, publish, consume).
pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// Internal packages (not part of the public API).
pub mod storage {
    /// Package `sluice.storage.v1`: the commands stored in a partition's log.
    pub mod v1 {
        tonic::include_proto!("sluice.storage.v1");
    }
}

/// Peers-only packages (agent to agent, never served on the client port).
pub mod peer {
    /// Package `sluice.peer.v1`: the Raft transport between a partition's replicas.
    pub mod v1 {
        tonic::include_proto!("sluice.peer.v1");
    }
}

/// Encoded `FileDescriptorSet` of the Sluice protos served on the client port (not the
/// peers-only `sluice.peer.v1`), for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));
