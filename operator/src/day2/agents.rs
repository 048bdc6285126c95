//! The agents' half of a day-2 step: the membership calls, with the addresses of the agent
//! concerned given by the caller (stable DNS names in reconcile, loopback addresses in the
//! end-to-end harness).

use crate::agent_admin::{AdminError, AgentAdmin, NewAgent};

use super::plan::Step;

/// Where the agents are reached.
pub trait AgentAddresses: Send + Sync {
    /// Endpoint for cluster-wide calls (any agent: the client Service).
    fn cluster(&self) -> String;
    /// Client `host:port` of the agent with this ordinal.
    fn client(&self, ordinal: i32) -> String;
    /// Peer `host:port` of the agent with this ordinal.
    fn peer(&self, ordinal: i32) -> String;
}

/// What the agents' half of a step came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to ask the agents for this step.
    NotNeeded,
    /// The agents accepted the call.
    Done(String),
    /// The hand-off left groups led by the agent: it must not be restarted yet.
    HandOffIncomplete(Vec<String>),
}

fn node(ordinal: i32) -> u64 {
    u64::try_from(ordinal).unwrap_or(0)
}

/// Makes the agent calls `step` needs. For a restart, the hand-off is asked of the restarting
/// agent itself (it holds the leaderships); everything else goes to the cluster endpoint.
pub async fn perform(
    admin: &dyn AgentAdmin,
    addresses: &dyn AgentAddresses,
    step: &Step,
) -> Result<Outcome, AdminError> {
    let cluster = addresses.cluster();
    match *step {
        Step::Add(i) => {
            let agent = NewAgent {
                node_id: node(i),
                peer_address: addresses.peer(i),
                client_address: addresses.client(i),
            };
            let recorded = admin.add_member(&cluster, &agent).await?;
            Ok(Outcome::Done(format!(
                "added agent {i} ({}) to the cluster as {:?}",
                agent.peer_address, recorded.state
            )))
        }
        Step::Drain(i) => {
            let recorded = admin.drain(&cluster, node(i)).await?;
            Ok(Outcome::Done(format!(
                "draining agent {i}: now {:?}",
                recorded.state
            )))
        }
        Step::Remove(i) => {
            admin.remove_member(&cluster, node(i)).await?;
            Ok(Outcome::Done(format!("removed agent {i} from the cluster")))
        }
        Step::Restart(i) => {
            let handoff = admin
                .hand_off_leaderships(&addresses.client(i), node(i))
                .await?;
            if handoff.remaining.is_empty() {
                Ok(Outcome::Done(format!(
                    "agent {i} handed off {} leaderships",
                    handoff.moved
                )))
            } else {
                Ok(Outcome::HandOffIncomplete(handoff.remaining))
            }
        }
        Step::Steady | Step::Wait(_) | Step::Scale { .. } | Step::RefuseScaleIn(_) => {
            Ok(Outcome::NotNeeded)
        }
    }
}

/// The agents' stable names inside Kubernetes: the client Service for cluster-wide calls and
/// each pod's name through the headless Service.
#[derive(Debug, Clone)]
pub struct ServiceAddresses {
    /// The MessageQueue's child names.
    pub names: crate::names::Names,
    /// The cluster's DNS domain.
    pub cluster_domain: String,
}

impl AgentAddresses for ServiceAddresses {
    fn cluster(&self) -> String {
        self.names.client_endpoint(&self.cluster_domain)
    }

    fn client(&self, ordinal: i32) -> String {
        format!(
            "{}:{}",
            self.names.pod_host(ordinal, &self.cluster_domain),
            crate::names::GRPC_PORT
        )
    }

    fn peer(&self, ordinal: i32) -> String {
        format!(
            "{}:{}",
            self.names.pod_host(ordinal, &self.cluster_domain),
            crate::names::PEER_PORT
        )
    }
}
