//! Delivery semantics of partitions and queues.
//!
//! The log is the store: every state change of a partition is a `sluice.storage.v1.LogCommand`
//! appended to its log (publish, deliver, settle), and the in-memory state is a pure function of
//! those commands, so a restart (and later a Raft follower) rebuilds it by replay. See
//! `docs/decisions/0003-delivery-state.md`.
//!
//! # Layout
//! - [`state`]: [`state::PartitionState`], the state machine (apply) plus the leader's dispatch
//!   bookkeeping (cursors, in-flight deadlines, delays).
//! - [`partition`]: [`partition::Partition`], the log + state + I/O (append, wait, read bodies).
//! - [`queue`]: [`queue::Queue`], routing to partitions, competing consumers, stats.
//! - [`spec`]: validation and defaults of queue specs and messages.
//! - [`replica`]: a replicated partition's Raft side: opening it, the proposer and role tasks;
//!   [`replica_link`]: [`replica_link::ReplicaLink`], the partition's handle on them;
//!   [`replica_status`]: [`replica_status::ReplicaStatus`], leadership and progress.
//! - [`entry`]: what a log entry holds (one command or a batch) and what an offset means;
//!   [`outbox`]: the leader's entries waiting for the proposer.
//! - [`consumer`]: [`consumer::ConsumerSlot`], a subscription's credit.
//! - [`dedup`], [`rates`], [`clock`]: idempotency window, per-minute rates, injectable time.

pub mod clock;
pub mod consumer;
pub mod dedup;
pub mod entry;
pub mod outbox;
pub mod partition;
// The type is `Queue`, the module owns it; `queue::queue::Queue` is the honest name.
#[allow(clippy::module_inception)]
pub mod queue;
pub mod rates;
pub mod replica;
pub mod replica_link;
pub mod replica_status;
pub mod spec;
pub mod state;
