//! A dynamic provisioner for the test cluster's default StorageClass: each claim of that class
//! gets a `hostPath` PersistentVolume, a directory of its own, bound to it by the real
//! persistent-volume controller; a released volume is deleted with its directory; a claim
//! whose request grows is resized (the external-resizer's part: the volume's capacity, then the
//! claim's status).

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// The default StorageClass's name.
pub const STORAGE_CLASS: &str = "standard";
/// Its provisioner name.
const PROVISIONER: &str = "sluice.dev/local-directory";
/// How often claims are looked at.
const PERIOD: Duration = Duration::from_millis(500);

/// The provisioner loop; stops when dropped.
pub struct Provisioner {
    task: tokio::task::JoinHandle<()>,
}

impl Provisioner {
    /// Creates the default StorageClass and starts provisioning under `root` with `client`
    /// (the admin: provisioners run with a cluster-wide grant).
    pub async fn start(client: kube::Client, root: &Path) -> Provisioner {
        let classes: Api<StorageClass> = Api::all(client.clone());
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": STORAGE_CLASS,
                         "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "allowVolumeExpansion": true,
            "volumeBindingMode": "Immediate",
        }))
        .expect("storage class");
        classes
            .create(&PostParams::default(), &class)
            .await
            .expect("create the default StorageClass");
        let root = root.to_path_buf();
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = pass(&client, &root).await {
                    eprintln!("provisioner: {e}");
                }
                tokio::time::sleep(PERIOD).await;
            }
        });
        Provisioner { task }
    }
}

impl Drop for Provisioner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pass(client: &kube::Client, root: &Path) -> Result<(), kube::Error> {
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let existing = volumes.list(&ListParams::default()).await?.items;
    for claim in claims.list(&ListParams::default()).await?.items {
        let spec = claim.spec.clone().unwrap_or_default();
        if spec.storage_class_name.as_deref() != Some(STORAGE_CLASS) {
            continue;
        }
        let uid = claim.metadata.uid.clone().unwrap_or_default();
        let namespace = claim.metadata.namespace.clone().unwrap_or_default();
        let name = claim.metadata.name.clone().unwrap_or_default();
        let pv_name = format!("pvc-{uid}");
        let requested = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone())
            .unwrap_or_else(|| "1Gi".to_owned());
        let Some(pv) = existing
            .iter()
            .find(|v| v.metadata.name.as_deref() == Some(&pv_name))
        else {
            if claim.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let dir: PathBuf = root.join("volumes").join(&pv_name);
            std::fs::create_dir_all(&dir).expect("volume directory");
            let pv: PersistentVolume = serde_json::from_value(json!({
                "metadata": {"name": pv_name,
                             "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {
                    "capacity": {"storage": requested},
                    "accessModes": spec.access_modes.clone().unwrap_or_default(),
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": STORAGE_CLASS,
                    "volumeMode": "Filesystem",
                    "hostPath": {"path": dir, "type": "DirectoryOrCreate"},
                    "claimRef": {"namespace": namespace, "name": name, "uid": uid},
                },
            }))
            .expect("volume");
            volumes.create(&PostParams::default(), &pv).await?;
            continue;
        };
        // Expansion: a bound claim asking for more than its volume holds.
        let capacity = pv
            .spec
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage"))
            .map(|q| q.0.clone())
            .unwrap_or_default();
        let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        if bound && bytes(&requested) > bytes(&capacity) {
            volumes
                .patch(
                    &pv_name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"spec": {"capacity": {"storage": requested}}})),
                )
                .await?;
            let ns_claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
            ns_claims
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"status": {"capacity": {"storage": requested},
                                                     "allocatedResources": {"storage": requested}}})),
                )
                .await?;
        }
    }
    // Volumes whose claim is gone: deleted with their directory (reclaim policy Delete).
    for pv in existing {
        let spec = pv.spec.clone().unwrap_or_default();
        let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
        if spec.storage_class_name.as_deref() == Some(STORAGE_CLASS) && phase == Some("Released") {
            if let Some(path) = spec.host_path.as_ref().map(|h| h.path.clone()) {
                let _ = std::fs::remove_dir_all(path);
            }
            let name = pv.metadata.name.clone().unwrap_or_default();
            volumes.delete(&name, &DeleteParams::default()).await?;
        }
    }
    Ok(())
}

/// A storage quantity in bytes, parsed as the operator parses claim sizes (0 when unparsable).
fn bytes(quantity: &str) -> u64 {
    sluice_operator::units::bytes("storage", quantity).unwrap_or(0)
}
