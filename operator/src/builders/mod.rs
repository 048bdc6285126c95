//! Pure builders of the desired child objects of a MessageQueue. None of them calls the API,
//! so each is unit-tested on its own and the whole set is checked against the official
//! Kubernetes schemas.

pub mod configmap;
pub mod networkpolicy;
pub mod pdb;
pub mod serviceaccount;
pub mod services;
pub mod statefulset;

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{ConfigMap, Service, ServiceAccount},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};

use crate::{Result, crd::MessageQueue, names::Names, settings::Settings};

/// Every child object of one MessageQueue, in the order they are applied: what the pods need
/// (identity, configuration, network names) before the StatefulSet that starts them.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    /// The agents' ServiceAccount.
    pub service_account: ServiceAccount,
    /// The queue definitions.
    pub configmap: ConfigMap,
    /// Peer discovery Service.
    pub headless_service: Service,
    /// Client Service.
    pub client_service: Service,
    /// Disruption budget.
    pub pdb: PodDisruptionBudget,
    /// Ingress rules.
    pub network_policy: NetworkPolicy,
    /// The agents.
    pub statefulset: StatefulSet,
}

/// Builds every child of `mq`; `shape` fixes the StatefulSet's replicas, bootstrap peers and
/// claim size ([`statefulset::Shape::initial`] on creation, [`statefulset::Shape::of_existing`]
/// afterwards: claim templates are immutable and the peer env must not change).
pub fn build_all(
    mq: &MessageQueue,
    settings: &Settings,
    shape: &statefulset::Shape,
) -> Result<Children> {
    let names = Names::of(mq)?;
    Ok(Children {
        service_account: serviceaccount::build(mq, &names)?,
        configmap: configmap::build(mq, &names)?,
        headless_service: services::build_headless(mq, &names)?,
        client_service: services::build_client(mq, &names)?,
        pdb: pdb::build(mq, &names)?,
        network_policy: networkpolicy::build(mq, &names)?,
        statefulset: statefulset::build(mq, &names, settings, shape)?,
    })
}

/// A MessageQueue with a name, namespace and uid, for the builders' tests.
#[cfg(test)]
pub(crate) fn test_mq(spec_json: serde_json::Value) -> MessageQueue {
    let spec = serde_json::from_value(spec_json).expect("test spec parses");
    let mut mq = MessageQueue::new("orders", spec);
    mq.metadata.namespace = Some("shop".into());
    mq.metadata.uid = Some("6f1c7d0e-0000-4000-8000-000000000001".into());
    mq
}
