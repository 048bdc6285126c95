//! A fake of the agents' admin API: answers with configured stats and records every call.

use std::sync::Mutex;

use async_trait::async_trait;
use sluice_operator::agent_admin::{AdminError, AgentAdmin, QueueStats};

/// Answers `queue_stats` from a table; `None` makes the agents unreachable.
#[derive(Default)]
pub struct FakeAdmin {
    /// Stats per queue name; `None` means "cannot reach the agents".
    pub stats: Mutex<Option<Vec<(String, QueueStats)>>>,
    /// Every call as `operation endpoint argument`.
    pub calls: Mutex<Vec<String>>,
}

impl FakeAdmin {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
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
                .ok_or_else(|| AdminError::Refused {
                    endpoint: endpoint.to_owned(),
                    operation: "GetQueueStats",
                    status: format!("NOT_FOUND: queue {queue}"),
                }),
            None => Err(AdminError::Unreachable {
                endpoint: endpoint.to_owned(),
                reason: "connection refused".into(),
            }),
        }
    }

    async fn transfer_leadership(&self, endpoint: &str, agent: &str) -> Result<(), AdminError> {
        self.record(format!("transfer_leadership {endpoint} {agent}"));
        Ok(())
    }

    async fn drain(&self, endpoint: &str, agent: &str) -> Result<(), AdminError> {
        self.record(format!("drain {endpoint} {agent}"));
        Ok(())
    }

    async fn add_member(&self, endpoint: &str, agent: &str) -> Result<(), AdminError> {
        self.record(format!("add_member {endpoint} {agent}"));
        Ok(())
    }

    async fn remove_member(&self, endpoint: &str, agent: &str) -> Result<(), AdminError> {
        self.record(format!("remove_member {endpoint} {agent}"));
        Ok(())
    }
}
