//! `Context`: what every reconcile shares (the API client, the event recorder, settings, the
//! agents' admin calls, metrics, and the failure counts behind the backoff).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use kube::{
    Client,
    runtime::{
        events::{Recorder, Reporter},
        reflector::ObjectRef,
    },
};

use crate::{agent_admin::AgentAdmin, crd::MessageQueue, metrics::Metrics, settings::Settings};

/// Shared state of all reconciles.
pub struct Context {
    /// Client of the Kubernetes API.
    pub client: Client,
    /// Publishes Kubernetes events about MessageQueues.
    pub recorder: Recorder,
    /// Operator-wide settings of the builders.
    pub settings: Settings,
    /// Calls into the agents (stats now; day-2 operations later).
    pub admin: Arc<dyn AgentAdmin>,
    /// Prometheus metrics of the controller.
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per MessageQueue, for `error_policy`'s exponential backoff; an
    /// entry is removed by the next successful reconcile.
    pub failures: Mutex<HashMap<ObjectRef<MessageQueue>, u32>>,
}

impl Context {
    /// A context with an empty failure table.
    pub fn new(
        client: Client,
        settings: Settings,
        admin: Arc<dyn AgentAdmin>,
        metrics: Arc<Metrics>,
        reporter: Reporter,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        Self {
            client,
            recorder,
            settings,
            admin,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn failure_count(&self, key: &ObjectRef<MessageQueue>) -> u32 {
        self.failures
            .lock()
            .map(|f| f.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub(crate) fn record_failure(&self, key: ObjectRef<MessageQueue>) -> u32 {
        match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(key).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        }
    }

    pub(crate) fn clear_failures(&self, key: &ObjectRef<MessageQueue>) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }
}
