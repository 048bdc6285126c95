//! Names, labels and ports shared by every child object, so that the Services, the
//! StatefulSet, the NetworkPolicy and the peer list can never disagree.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::{Error, Result, crd::MessageQueue};

/// Port of the public gRPC API (publish, consume, admin, health).
pub const GRPC_PORT: i32 = 7070;
/// Port of the peers-only replication API.
pub const PEER_PORT: i32 = 7071;
/// Port of the Prometheus `/metrics` endpoint.
pub const METRICS_PORT: i32 = 9090;

/// Named port of the public gRPC API.
pub const GRPC_PORT_NAME: &str = "grpc";
/// Named port of the replication API.
pub const PEER_PORT_NAME: &str = "peer";
/// Named port of the metrics endpoint.
pub const METRICS_PORT_NAME: &str = "metrics";

/// Name of the claim template, and so the prefix of every agent's PVC (`data-<mq>-<ordinal>`).
pub const DATA_VOLUME: &str = "data";
/// Where the agent's volume is mounted.
pub const DATA_MOUNT_PATH: &str = "/var/lib/sluice";
/// The agent's data directory on that volume (a subdirectory, so `lost+found` stays out of it).
pub const DATA_DIR: &str = "/var/lib/sluice/data";
/// Name of the queue-definitions volume (the ConfigMap).
pub const CONFIG_VOLUME: &str = "config";
/// Where the queue definitions are mounted.
pub const CONFIG_MOUNT_PATH: &str = "/etc/sluice";
/// Key of the queue definitions in the ConfigMap.
pub const QUEUES_FILE_KEY: &str = "queues.json";

/// Label keys, following the Kubernetes recommended labels.
pub mod label_keys {
    /// What the application is.
    pub const NAME: &str = "app.kubernetes.io/name";
    /// Which MessageQueue the object belongs to.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// The role inside the application.
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    /// Who manages the object.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
}

/// Value of `app.kubernetes.io/name` on every agent object.
pub const APP_NAME: &str = "sluice-agent";
/// Value of `app.kubernetes.io/managed-by`.
pub const MANAGED_BY: &str = "sluice-operator";
/// Value of `app.kubernetes.io/component` for the agents.
pub const COMPONENT_BROKER: &str = "broker";

/// Child object names of one MessageQueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Name of the MessageQueue, also of the StatefulSet, client Service, PDB and NetworkPolicy.
    pub instance: String,
    /// Namespace of the MessageQueue and all its children.
    pub namespace: String,
}

impl Names {
    /// Names for `mq`; fails with a named error when the object lacks a name or namespace
    /// (it is namespaced, so the API always sets both; a broken cache must not panic us).
    pub fn of(mq: &MessageQueue) -> Result<Self> {
        let instance = mq
            .metadata
            .name
            .clone()
            .ok_or(Error::MissingObjectKey("metadata.name"))?;
        let namespace = mq
            .metadata
            .namespace
            .clone()
            .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
        Ok(Self {
            instance,
            namespace,
        })
    }

    /// The StatefulSet.
    pub fn statefulset(&self) -> String {
        self.instance.clone()
    }

    /// The headless Service that gives every agent a stable DNS name for its peers.
    pub fn headless_service(&self) -> String {
        format!("{}-peers", self.instance)
    }

    /// The client Service applications and sidecars reach.
    pub fn client_service(&self) -> String {
        self.instance.clone()
    }

    /// The ConfigMap with the queue definitions.
    pub fn configmap(&self) -> String {
        format!("{}-config", self.instance)
    }

    /// The agents' ServiceAccount.
    pub fn service_account(&self) -> String {
        format!("{}-agent", self.instance)
    }

    /// The PodDisruptionBudget.
    pub fn pdb(&self) -> String {
        self.instance.clone()
    }

    /// The NetworkPolicy.
    pub fn network_policy(&self) -> String {
        self.instance.clone()
    }

    /// Stable DNS name of agent `ordinal` through the headless Service.
    pub fn pod_host(&self, ordinal: i32, cluster_domain: &str) -> String {
        format!(
            "{}-{ordinal}.{}.{}.svc.{cluster_domain}",
            self.statefulset(),
            self.headless_service(),
            self.namespace
        )
    }

    /// `host:port` of every agent's replication endpoint, in ordinal order.
    pub fn peers(&self, replicas: i32, cluster_domain: &str) -> Vec<String> {
        (0..replicas)
            .map(|i| format!("{}:{PEER_PORT}", self.pod_host(i, cluster_domain)))
            .collect()
    }

    /// `host:port` of the client Service's gRPC port.
    pub fn client_endpoint(&self, cluster_domain: &str) -> String {
        format!(
            "{}.{}.svc.{cluster_domain}:{GRPC_PORT}",
            self.client_service(),
            self.namespace
        )
    }

    /// Labels that select this MessageQueue's agent pods. Never change them: a StatefulSet's
    /// selector is immutable.
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (label_keys::NAME.to_owned(), APP_NAME.to_owned()),
            (label_keys::INSTANCE.to_owned(), self.instance.clone()),
        ])
    }

    /// The selector as a label-selector string, for the scale subresource.
    pub fn selector_string(&self) -> String {
        self.selector_labels()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Labels of every child object.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector_labels();
        labels.insert(
            label_keys::COMPONENT.to_owned(),
            COMPONENT_BROKER.to_owned(),
        );
        labels.insert(label_keys::MANAGED_BY.to_owned(), MANAGED_BY.to_owned());
        labels
    }
}

/// Metadata of a child object: name, namespace, labels and the controller owner reference that
/// makes Kubernetes garbage-collect it with the MessageQueue.
pub fn child_meta(mq: &MessageQueue, names: &Names, name: String) -> Result<ObjectMeta> {
    let owner = mq
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey("metadata.uid"))?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace.clone()),
        labels: Some(names.labels()),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    })
}

/// Name of `mq` for log fields, `<unnamed>` when missing.
pub fn display_name(mq: &MessageQueue) -> String {
    format!("{}/{}", mq.namespace().unwrap_or_default(), mq.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names {
            instance: "orders".into(),
            namespace: "shop".into(),
        }
    }

    #[test]
    fn peers_are_the_stable_pod_names_behind_the_headless_service() {
        assert_eq!(
            names().peers(3, "cluster.local"),
            vec![
                "orders-0.orders-peers.shop.svc.cluster.local:7071",
                "orders-1.orders-peers.shop.svc.cluster.local:7071",
                "orders-2.orders-peers.shop.svc.cluster.local:7071",
            ]
        );
    }

    #[test]
    fn selector_string_lists_the_selector_labels_sorted() {
        assert_eq!(
            names().selector_string(),
            "app.kubernetes.io/instance=orders,app.kubernetes.io/name=sluice-agent"
        );
    }

    #[test]
    fn child_meta_without_uid_is_a_named_error_not_a_panic() {
        let mut mq = MessageQueue::new(
            "orders",
            serde_json::from_str("{}").unwrap_or_else(|e| panic!("{e}")),
        );
        mq.metadata.namespace = Some("shop".into());
        let err = child_meta(&mq, &names(), "x".into()).unwrap_err();
        assert!(err.to_string().contains("metadata.uid"), "{err}");
    }
}
