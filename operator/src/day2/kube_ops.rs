//! The Kubernetes reads and writes of the day-2 operations besides the StatefulSet apply:
//! listing the agent pods, deleting one for a restart, reading and growing the claims.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};

use super::{claims::Claim, plan::PodState};
use crate::{
    Error, FIELD_MANAGER, Result,
    names::{DATA_VOLUME, Names},
};

/// Label the StatefulSet controller puts on each pod: the revision it was created from.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// The ordinal of pod `name` of StatefulSet `sts` (`<sts>-<ordinal>`), if it is one.
pub fn ordinal_of(sts: &str, name: &str) -> Option<i32> {
    name.strip_prefix(sts)?
        .strip_prefix('-')
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

/// Whether `pod` counts as up: Ready and not being deleted.
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The agent pods of the MessageQueue, by ordinal.
pub async fn pods(client: &Client, names: &Names) -> Result<Vec<PodState>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &names.namespace);
    let list = api
        .list(&ListParams::default().labels(&names.selector_string()))
        .await
        .map_err(|source| Error::ReadFailed {
            kind: "Pod",
            name: names.selector_string(),
            source,
        })?;
    let sts = names.statefulset();
    let mut out: Vec<PodState> = list
        .items
        .iter()
        .filter_map(|pod| {
            let ordinal = ordinal_of(&sts, pod.metadata.name.as_deref()?)?;
            Some(PodState {
                ordinal,
                ready: is_ready(pod),
                revision: pod
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(REVISION_LABEL))
                    .cloned(),
            })
        })
        .collect();
    out.sort_by_key(|p| p.ordinal);
    Ok(out)
}

/// Deletes agent pod `ordinal`, so that the StatefulSet controller recreates it from the
/// current revision (the `OnDelete` strategy).
pub async fn delete_pod(client: &Client, names: &Names, ordinal: i32) -> Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &names.namespace);
    let name = format!("{}-{ordinal}", names.statefulset());
    api.delete(&name, &DeleteParams::default())
        .await
        .map(|_| ())
        .map_err(|source| Error::DeleteFailed {
            kind: "Pod",
            name,
            source,
        })
}

/// Name of agent `ordinal`'s claim.
pub fn claim_name(names: &Names, ordinal: i32) -> String {
    format!("{DATA_VOLUME}-{}-{ordinal}", names.statefulset())
}

/// The claims of agents `0..replicas` that exist, with their requests.
pub async fn claims(client: &Client, names: &Names, replicas: i32) -> Result<Vec<Claim>> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &names.namespace);
    let mut out = Vec::new();
    for ordinal in 0..replicas {
        let name = claim_name(names, ordinal);
        let claim = api
            .get_opt(&name)
            .await
            .map_err(|source| Error::ReadFailed {
                kind: "PersistentVolumeClaim",
                name: name.clone(),
                source,
            })?;
        let request = claim
            .and_then(|c| c.spec?.resources?.requests?.get("storage").cloned())
            .map(|q| q.0);
        if let Some(request) = request {
            out.push(Claim { name, request });
        }
    }
    Ok(out)
}

/// Sets claim `name`'s storage request to `size` (server-side apply of just that field, so
/// the operator owns nothing else of a claim the StatefulSet controller created).
pub async fn expand_claim(client: &Client, names: &Names, name: &str, size: &str) -> Result<()> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &names.namespace);
    let patch = serde_json::json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"resources": {"requests": {"storage": size}}},
    });
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
    .map_err(|source| Error::PatchFailed {
        kind: "PersistentVolumeClaim",
        name: name.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_are_read_only_from_this_statefulsets_pod_names() {
        assert_eq!(ordinal_of("orders", "orders-12"), Some(12));
        assert_eq!(ordinal_of("orders", "orders-dlq-0"), None);
        assert_eq!(ordinal_of("orders", "orders-"), None);
        assert_eq!(ordinal_of("orders", "orders"), None);
    }
}
