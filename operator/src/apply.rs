//! Server-side apply of what the operator owns: a MessageQueue's children and its status,
//! always under the one [`FIELD_MANAGER`] and with `force`, so the operator takes back fields
//! someone else changed (drift is repaired at the next pass) and owns nothing it does not set.

use k8s_openapi::{NamespaceResourceScope, api::apps::v1::StatefulSet};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    Error, FIELD_MANAGER, Result,
    builders::Children,
    crd::{MessageQueue, MessageQueueStatus},
};

/// Applies every child of a MessageQueue and returns the StatefulSet as stored. The
/// StatefulSet goes last, so that the agents it starts find their ServiceAccount, ConfigMap
/// and Services already there.
pub(crate) async fn apply_children(
    client: &Client,
    namespace: &str,
    c: &Children,
) -> Result<StatefulSet> {
    apply(client, namespace, &c.service_account, "ServiceAccount").await?;
    apply(client, namespace, &c.configmap, "ConfigMap").await?;
    apply(client, namespace, &c.headless_service, "Service").await?;
    apply(client, namespace, &c.client_service, "Service").await?;
    apply(client, namespace, &c.pdb, "PodDisruptionBudget").await?;
    apply(client, namespace, &c.network_policy, "NetworkPolicy").await?;
    apply(client, namespace, &c.statefulset, "StatefulSet").await
}

/// Writes `status` through MessageQueue `name`'s status subresource.
pub(crate) async fn apply_status(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &MessageQueueStatus,
) -> Result<()> {
    let api: Api<MessageQueue> = Api::namespaced(client.clone(), namespace);
    // An apply patch must name its object's kind; the status is all this manager sets.
    let patch = serde_json::json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "MessageQueue",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|source| Error::StatusPatchFailed {
        name: name.to_owned(),
        source,
    })
}

/// Applies one namespaced object, `kind` naming it in the error.
async fn apply<K>(client: &Client, namespace: &str, obj: &K, kind: &'static str) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::ApplyFailed { kind, name, source })
}
