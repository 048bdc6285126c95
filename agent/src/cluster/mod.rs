//! Cluster mode: who the agents are, where each partition's replicas live, and the catalog all
//! agents agree on (decision 0009).
//!
//! # Layout
//! - [`config`]: [`ClusterConfig`], this agent's identity and peers from its flags.
//! - [`placement`]: the replicas and preferred leader of a partition, a pure function.
//! - [`catalog`]: the [`Catalog`] of queues and agents, and how commands change it.
//! - [`state_machine`]: the meta group's openraft state machine over the catalog.
//! - [`meta`]: [`MetaGroup`], the `"meta"` Raft group across all agents; proposals from any agent.
//! - [`holds`]: [`BalanceHolds`], groups whose leadership the balancer leaves alone for a while.
//! - [`reconcile`]: the membership changes a group's leader makes to match the catalog.
//! - [`reversions`]: followers that lost acknowledged entries (to be demoted until caught up).
//! - [`service`]: the peers-only `sluice.peer.v1.Cluster` service (forwarded proposals,
//!   leadership transfer).
//! - [`client`]: calls to other agents: the `Cluster` client side, including
//!   [`transfer_leadership`], and the `GetCluster` fan-out ([`client::remote_views`]).
//! - [`context`]: [`ClusterContext`], what a broker in cluster mode is given.

pub mod catalog;
pub mod client;
pub mod config;
pub mod context;
pub mod holds;
pub mod meta;
pub mod placement;
pub mod reconcile;
pub mod reversions;
pub mod service;
pub mod state_machine;

pub use catalog::Catalog;
pub use client::{TransferError, TransferOutcome, transfer_leadership};
pub use config::{ClusterConfig, ClusterConfigError};
pub use context::ClusterContext;
pub use holds::BalanceHolds;
pub use meta::{META_GROUP, MetaGroup, MetaGroupError};
pub use placement::placement;
pub use service::{ClusterService, peer_service};
pub use state_machine::CatalogStateMachine;
