//! Server-side apply of what the operator owns: a MessageQueue's children and its status,
//! always under the one [`FIELD_MANAGER`], so it owns nothing it does not set.
//!
//! Children are applied without `force`. A conflict with a field changed by hand is drift: the
//! operator takes the field back (a second apply, forced). A conflict with another manager that
//! applied the field is reported and left alone ([`crate::field_conflicts`]). The status is the
//! operator's alone and always forced.

use k8s_openapi::{NamespaceResourceScope, api::apps::v1::StatefulSet};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use tracing::info;

use crate::{
    Error, FIELD_MANAGER, Result,
    builders::Children,
    crd::{MessageQueue, MessageQueueStatus},
    field_conflicts,
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

/// Applies one namespaced object, `kind` naming it in the error: without `force` first, then,
/// when only hand edits stand in the way, forced.
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
    let refused = match api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(obj),
        )
        .await
    {
        Ok(applied) => return Ok(applied),
        Err(source) => source,
    };
    let Some(conflicts) = field_conflicts::conflicts_of(&refused) else {
        return Err(Error::ApplyFailed {
            kind,
            name,
            source: refused,
        });
    };
    let current = api.get(&name).await.map_err(|source| Error::ReadFailed {
        kind,
        name: name.clone(),
        source,
    })?;
    let managed = current.meta().managed_fields.clone().unwrap_or_default();
    let appliers = field_conflicts::appliers(&conflicts, &managed);
    if !appliers.is_empty() {
        return Err(Error::FieldConflict {
            kind,
            name,
            managers: appliers,
            fields: field_conflicts::fields(&conflicts),
        });
    }
    info!(
        kind,
        name,
        fields = %field_conflicts::fields(&conflicts),
        "taking back fields changed by hand"
    );
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::ApplyFailed { kind, name, source })
}
