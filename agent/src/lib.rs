//! The Sluice queue agent: durable, partitioned queues served over gRPC.
//!
//! One process runs in `broker` mode on every pod of a MessageQueue's StatefulSet (and, later, in
//! `sidecar` mode next to applications). A broker keeps each queue partition in its own
//! segmented, checksummed, append-only log; the delivery state of a partition (what is ready, in
//! flight, acked, dead-lettered) is a state machine rebuilt from that log, so the same log can
//! become the replicated Raft log without writing messages twice.
//!
//! # Layout
//! - [`cluster`]: cluster mode — peers, placement, the replicated catalog (meta group).
//! - [`config`]: command-line flags and `SLUICE_*` environment variables, durability knobs.
//! - [`error`]: [`error::BrokerError`], what a request can come to, shared by every layer.
//! - [`layout`]: every path under the data directory.
//! - [`log`]: the storage engine — record format, segments, group-commit writer, recovery.
//! - [`queue`]: delivery semantics of one partition and one queue (ready, in flight,
//!   redelivery, dead-letter, TTL, priorities, delays, dedup, backlog limits).
//! - [`queues_file`]: the queue definitions file the operator writes, declared at startup.
//! - [`replication`]: one Raft group per partition (openraft) over the partition log.
//! - [`broker`]: the registry of queues on this agent and the API the gRPC layer calls, with
//!   its rooms: files, subscriptions, timers, dead-lettering, replicas, leadership, membership.
//! - [`grpc`]: one file per public gRPC service, plus the one place errors become statuses.
//! - [`hand_off`]: the `hand-off` command (the pod's `preStop`): leadership leaves first.
//! - [`server`]: binds, serves gRPC and HTTP (metrics), drains on shutdown.
//! - [`metrics`]: Prometheus registry and the agent's metrics.
//! - [`log_throttle`]: one line per call site per window from openraft, the rest counted.
//! - [`shutdown`]: the shared shutdown signal.

pub mod broker;
pub mod cluster;
pub mod config;
pub mod error;
pub mod grpc;
pub mod hand_off;
pub mod layout;
pub mod log;
pub mod log_throttle;
pub mod metrics;
pub mod queue;
pub mod queues_file;
pub mod replication;
pub mod server;
pub mod shutdown;
