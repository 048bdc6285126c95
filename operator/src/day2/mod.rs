//! Day-2 operations: rolling updates, scale-out, scale-in and PVC expansion.
//!
//! Each reconcile pass observes the StatefulSet, its pods and the agents' membership into a
//! [`plan::Snapshot`], asks the pure [`plan::decide`] for the one next [`plan::Step`], and
//! carries it out through [`execute`]: the StatefulSet's replicas with reconcile's apply,
//! deleting a pod through [`kube_ops`], the agents' half (hand-off, add, drain, remove) through
//! [`agents`].
//! The end-to-end harness calls the same `decide` and [`agents::perform`], playing the
//! StatefulSet controller and kubelet itself (decision 0012).
//!
//! # Layout
//! - [`plan`]: the decision, from observed state to the next step.
//! - [`execute`]: observing the cluster for the decision and executing the step it chose.
//! - [`agents`]: the agents' half of a step, over [`crate::agent_admin::AgentAdmin`].
//! - [`kube_ops`]: the pods and claims reconcile reads and changes.
//! - [`claims`]: which claims PVC expansion patches.

pub mod agents;
pub mod claims;
/// Observing the cluster into a [`Snapshot`] and executing the [`Step`] [`decide`] chose.
pub mod execute;
pub mod kube_ops;
pub mod plan;

pub use plan::{Membership, PodState, Progress, Snapshot, Step, decide};

/// Requeue interval while a day-2 step is under way: short, since each pass does one step.
pub const REQUEUE_DAY2: std::time::Duration = std::time::Duration::from_secs(5);
