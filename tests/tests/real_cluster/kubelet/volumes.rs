//! Pod volumes as directories: a claim is its bound PersistentVolume's `hostPath` (made by
//! the provisioner), a ConfigMap or Secret its files, an `emptyDir` fresh per pod, a projected
//! service-account volume a token from the TokenRequest API with the downward API's files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::api::Api;
use serde_json::{Value, json};

/// A directory per volume of `pod`, filled as the kubelet would.
pub(super) async fn volumes(
    client: &kube::Client,
    pod: &Pod,
    dir: &Path,
) -> Result<BTreeMap<String, PathBuf>, String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().ok_or("no spec")?;
    let mut out = BTreeMap::new();
    for volume in spec.volumes.iter().flatten() {
        let path = dir.join("volumes").join(&volume.name);
        if let Some(claim) = &volume.persistent_volume_claim {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
            let pvc = claims
                .get(&claim.claim_name)
                .await
                .map_err(|e| format!("claim {}: {e}", claim.claim_name))?;
            let bound = pvc
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.clone())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("claim {} is not bound", claim.claim_name))?;
            let pvs: Api<PersistentVolume> = Api::all(client.clone());
            let pv = pvs
                .get(&bound)
                .await
                .map_err(|e| format!("volume {bound}: {e}"))?;
            let host = pv
                .spec
                .as_ref()
                .and_then(|s| s.host_path.as_ref())
                .map(|h| PathBuf::from(&h.path))
                .ok_or_else(|| format!("volume {bound} is not a hostPath volume"))?;
            std::fs::create_dir_all(&host).map_err(|e| e.to_string())?;
            out.insert(volume.name.clone(), host);
            continue;
        }
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
        if volume.empty_dir.is_some() {
        } else if let Some(cm) = &volume.config_map {
            write_config_map(client, &namespace, &cm.name, &path).await?;
        } else if let Some(secret) = &volume.secret {
            let name = secret.secret_name.clone().unwrap_or_default();
            let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
            let secret = api
                .get(&name)
                .await
                .map_err(|e| format!("secret {name}: {e}"))?;
            for (key, value) in secret.data.iter().flatten() {
                std::fs::write(path.join(key), &value.0).map_err(|e| e.to_string())?;
            }
        } else if let Some(projected) = &volume.projected {
            for source in projected.sources.iter().flatten() {
                if let Some(token) = &source.service_account_token {
                    let account = spec
                        .service_account_name
                        .clone()
                        .unwrap_or_else(|| "default".to_owned());
                    let value =
                        request_token(client, pod, &account, token.expiration_seconds).await?;
                    std::fs::write(path.join(&token.path), value).map_err(|e| e.to_string())?;
                }
                if let Some(cm) = &source.config_map {
                    write_config_map(client, &namespace, &cm.name, &path).await?;
                }
                if let Some(downward) = &source.downward_api {
                    for item in downward.items.iter().flatten() {
                        let value = match item.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                            Some("metadata.namespace") => namespace.clone(),
                            Some("metadata.name") => pod.metadata.name.clone().unwrap_or_default(),
                            other => return Err(format!("downward API {other:?} is not emulated")),
                        };
                        std::fs::write(path.join(&item.path), value).map_err(|e| e.to_string())?;
                    }
                }
            }
        } else {
            return Err(format!(
                "volume {} has a source this kubelet does not emulate",
                volume.name
            ));
        }
        out.insert(volume.name.clone(), path);
    }
    Ok(out)
}

async fn write_config_map(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    path: &Path,
) -> Result<(), String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = api
        .get(name)
        .await
        .map_err(|e| format!("configMap {name}: {e}"))?;
    for (key, value) in cm.data.iter().flatten() {
        std::fs::write(path.join(key), value).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A service-account token bound to the pod, from the TokenRequest API (as the kubelet gets
/// one with the node's own credentials).
async fn request_token(
    client: &kube::Client,
    pod: &Pod,
    account: &str,
    expiration: Option<i64>,
) -> Result<String, String> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": expiration.unwrap_or(3607),
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                                    "name": pod.metadata.name, "uid": pod.metadata.uid}},
    });
    let uri = format!("/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token");
    let request = http::Request::post(uri)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).expect("JSON"))
        .expect("request");
    let answer: Value = client
        .request(request)
        .await
        .map_err(|e| format!("token for {namespace}/{account}: {e}"))?;
    answer["status"]["token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("token request answered {answer}"))
}
