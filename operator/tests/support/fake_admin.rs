//! A fake of the agents' admin and membership APIs: a small stateful model of the cluster's
//! membership (the life cycle JOINING → ACTIVE → DRAINING → DRAINED and the agents' own
//! refusals), configured stats, and a record of every call.

use std::{collections::BTreeMap, sync::Mutex};

use async_trait::async_trait;
use sluice_operator::{
    agent_admin::{AdminError, AgentAdmin, HandOff, NewAgent, QueueStats},
    cluster_view::{AgentState, AgentView, ClusterView, PlacementView},
};

/// The membership the fake agents hold.
#[derive(Default)]
struct Model {
    agents: BTreeMap<u64, AgentView>,
    partitions: Vec<PlacementView>,
    replication_factor: u32,
}

/// Answers `queue_stats` from a table and the membership calls from a model.
#[derive(Default)]
pub struct FakeAdmin {
    /// Stats per queue name; `None` means "cannot reach the agents".
    pub stats: Mutex<Option<Vec<(String, QueueStats)>>>,
    /// Every call as `operation endpoint argument`.
    pub calls: Mutex<Vec<String>>,
    model: Mutex<Option<Model>>,
    /// Groups a hand-off leaves behind (empty: it moves everything).
    pub hand_off_remaining: Mutex<Vec<String>>,
    /// Operations that fail once each with UNAVAILABLE (no leader named).
    pub fail_once: Mutex<Vec<&'static str>>,
}

fn agent(node_id: u64, state: AgentState) -> AgentView {
    AgentView {
        node_id,
        client_address: format!("orders-{node_id}:7070"),
        peer_address: format!("orders-{node_id}:7071"),
        state,
        replicas: 1,
        leaders: 1,
    }
}

fn refused(endpoint: &str, operation: &'static str, code: tonic::Code, why: &str) -> AdminError {
    AdminError::Refused {
        endpoint: endpoint.to_owned(),
        operation,
        code,
        status: format!("{code:?}: {why}"),
    }
}

impl FakeAdmin {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    /// Calls made so far whose operation is one of the membership operations.
    pub fn membership_calls(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !c.starts_with("queue_stats") && !c.starts_with("cluster"))
            .cloned()
            .collect()
    }

    /// Starts the model: agents `0..n` ACTIVE, one partition on the first three, in sync.
    pub fn form_cluster(&self, n: u64, replication_factor: u32) {
        let voters: Vec<u64> = (0..n.min(u64::from(replication_factor))).collect();
        *self.model.lock().unwrap() = Some(Model {
            agents: (0..n).map(|i| (i, agent(i, AgentState::Active))).collect(),
            partitions: vec![PlacementView {
                queue: "orders".into(),
                partition: 0,
                leader: Some(0),
                voters: voters.clone(),
                learners: vec![],
                in_sync: voters,
            }],
            replication_factor,
        });
    }

    /// Moves every agent one state on, as the agents would once data has moved: JOINING →
    /// ACTIVE, DRAINING → DRAINED.
    pub fn settle(&self) {
        if let Some(model) = &mut *self.model.lock().unwrap() {
            for a in model.agents.values_mut() {
                a.state = match a.state {
                    AgentState::Joining => AgentState::Active,
                    AgentState::Draining => AgentState::Drained,
                    other => other,
                };
            }
        }
    }

    /// Sets which voters of partition 0 are in sync.
    pub fn set_in_sync(&self, in_sync: &[u64]) {
        if let Some(model) = &mut *self.model.lock().unwrap() {
            model.partitions[0].in_sync = in_sync.to_vec();
        }
    }

    /// Puts agent `node_id` into `state`.
    pub fn set_state(&self, node_id: u64, state: AgentState) {
        if let Some(model) = &mut *self.model.lock().unwrap()
            && let Some(a) = model.agents.get_mut(&node_id)
        {
            a.state = state;
        }
    }

    /// The state of agent `node_id` in the model.
    pub fn state_of(&self, node_id: u64) -> Option<AgentState> {
        let model = self.model.lock().unwrap();
        model.as_ref()?.agents.get(&node_id).map(|a| a.state)
    }

    fn injected(&self, endpoint: &str, operation: &'static str) -> Result<(), AdminError> {
        let mut fail = self.fail_once.lock().unwrap();
        match fail.iter().position(|o| *o == operation) {
            Some(i) => {
                fail.remove(i);
                Err(refused(
                    endpoint,
                    operation,
                    tonic::Code::Unavailable,
                    "injected failure",
                ))
            }
            None => Ok(()),
        }
    }

    fn with_model<T>(
        &self,
        endpoint: &str,
        operation: &'static str,
        f: impl FnOnce(&mut Model) -> Result<T, AdminError>,
    ) -> Result<T, AdminError> {
        self.injected(endpoint, operation)?;
        match &mut *self.model.lock().unwrap() {
            Some(model) => f(model),
            None => Err(AdminError::Unreachable {
                endpoint: endpoint.to_owned(),
                reason: "connection refused".into(),
            }),
        }
    }
}

#[async_trait]
impl AgentAdmin for FakeAdmin {
    async fn queue_stats(&self, endpoint: &str, queue: &str) -> Result<QueueStats, AdminError> {
        self.record(format!("queue_stats {endpoint} {queue}"));
        match &*self.stats.lock().unwrap() {
            Some(table) => table
                .iter()
                .find(|(q, _)| q == queue)
                .map(|(_, s)| s.clone())
                .ok_or_else(|| {
                    refused(
                        endpoint,
                        "GetQueueStats",
                        tonic::Code::NotFound,
                        &format!("queue {queue}"),
                    )
                }),
            None => Err(AdminError::Unreachable {
                endpoint: endpoint.to_owned(),
                reason: "connection refused".into(),
            }),
        }
    }

    async fn cluster(&self, endpoint: &str) -> Result<ClusterView, AdminError> {
        self.record(format!("cluster {endpoint}"));
        self.with_model(endpoint, "GetCluster", |m| {
            Ok(ClusterView {
                agents: m.agents.values().cloned().collect(),
                partitions: m.partitions.clone(),
                replication_factor: m.replication_factor,
            })
        })
    }

    async fn hand_off_leaderships(
        &self,
        endpoint: &str,
        node_id: u64,
    ) -> Result<HandOff, AdminError> {
        self.record(format!("hand_off_leaderships {endpoint} {node_id}"));
        let remaining = self.hand_off_remaining.lock().unwrap().clone();
        self.with_model(endpoint, "HandOffLeadership", |m| {
            let agent = m.agents.get_mut(&node_id).ok_or_else(|| {
                refused(
                    endpoint,
                    "HandOffLeadership",
                    tonic::Code::NotFound,
                    "unknown agent",
                )
            })?;
            let moved = if remaining.is_empty() {
                std::mem::take(&mut agent.leaders)
            } else {
                0
            };
            Ok(HandOff { moved, remaining })
        })
    }

    async fn drain(&self, endpoint: &str, node_id: u64) -> Result<AgentView, AdminError> {
        self.record(format!("drain {endpoint} {node_id}"));
        self.with_model(endpoint, "DrainAgent", |m| {
            let active_after = m
                .agents
                .values()
                .filter(|a| a.node_id != node_id && a.state == AgentState::Active)
                .count();
            if active_after < m.replication_factor as usize {
                return Err(refused(
                    endpoint,
                    "DrainAgent",
                    tonic::Code::FailedPrecondition,
                    "too few active agents would remain",
                ));
            }
            let agent = m.agents.get_mut(&node_id).ok_or_else(|| {
                refused(
                    endpoint,
                    "DrainAgent",
                    tonic::Code::NotFound,
                    "unknown agent",
                )
            })?;
            if agent.state != AgentState::Drained {
                agent.state = AgentState::Draining;
            }
            Ok(agent.clone())
        })
    }

    async fn add_member(&self, endpoint: &str, new: &NewAgent) -> Result<AgentView, AdminError> {
        self.record(format!(
            "add_member {endpoint} {} {} {}",
            new.node_id, new.peer_address, new.client_address
        ));
        self.with_model(endpoint, "AddAgent", |m| {
            let recorded = m.agents.entry(new.node_id).or_insert_with(|| AgentView {
                node_id: new.node_id,
                client_address: new.client_address.clone(),
                peer_address: new.peer_address.clone(),
                state: AgentState::Joining,
                replicas: 0,
                leaders: 0,
            });
            Ok(recorded.clone())
        })
    }

    async fn remove_member(&self, endpoint: &str, node_id: u64) -> Result<(), AdminError> {
        self.record(format!("remove_member {endpoint} {node_id}"));
        self.with_model(endpoint, "RemoveAgent", |m| match m.agents.get(&node_id) {
            Some(a) if a.state != AgentState::Drained => Err(refused(
                endpoint,
                "RemoveAgent",
                tonic::Code::FailedPrecondition,
                "still holds replicas",
            )),
            _ => {
                m.agents.remove(&node_id);
                Ok(())
            }
        })
    }
}
