//! The emulated cluster network's names: one loopback address per pod, the hosts files that
//! resolve the cluster's DNS names (pods' stable names, Services to one ready pod behind them,
//! there being no kube-proxy), and the rewrites of args and env for the pod's network.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

use super::{State, lock};

/// The cluster's DNS suffix.
pub(super) const CLUSTER_DOMAIN: &str = "cluster.local";

/// Rewrites the hosts files from the pod names and the Services' ready pods: `root/hosts` with
/// the fully qualified names, and one per namespace that has pods, which adds the short forms
/// a pod's resolver search path would find (`<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc`).
pub(super) async fn publish_names(
    client: &kube::Client,
    state: &Arc<Mutex<State>>,
    root: &Path,
) -> Result<(), String> {
    use k8s_openapi::api::core::v1::Service;
    let services: Api<Service> = Api::all(client.clone());
    let services = services
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list services: {e}"))?;
    let st = lock(state);
    let mut names: BTreeMap<String, Ipv4Addr> = st.pod_names.clone();
    let mut short: BTreeMap<String, BTreeMap<String, Ipv4Addr>> = BTreeMap::new();
    for service in services.items {
        let namespace = service.metadata.namespace.clone().unwrap_or_default();
        let name = service.metadata.name.clone().unwrap_or_default();
        let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.clone()) else {
            continue;
        };
        let ready = st.pods.values().find(|r| {
            r.ready()
                && r.pod.metadata.namespace.as_deref() == Some(namespace.as_str())
                && selector
                    .iter()
                    .all(|(k, v)| r.pod.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v))
        });
        if let Some(running) = ready {
            names.insert(
                format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
                running.ip,
            );
            let aliases = short.entry(namespace.clone()).or_default();
            for alias in [
                name.clone(),
                format!("{name}.{namespace}"),
                format!("{name}.{namespace}.svc"),
            ] {
                aliases.insert(alias, running.ip);
            }
        }
    }
    let namespaces: std::collections::BTreeSet<String> = st
        .pods
        .values()
        .filter_map(|r| r.pod.metadata.namespace.clone())
        .collect();
    drop(st);
    write_hosts(&root.join("hosts"), &names);
    for namespace in namespaces {
        let mut all = names.clone();
        all.extend(short.remove(&namespace).unwrap_or_default());
        write_hosts(&namespace_hosts(root, &namespace), &all);
    }
    Ok(())
}

/// The hosts file of the pods of `namespace`.
pub(super) fn namespace_hosts(root: &Path, namespace: &str) -> PathBuf {
    root.join(format!("hosts.{namespace}"))
}

/// Writes `names` as a hosts file, in place (a bind mount of it sees the new content).
pub(super) fn write_hosts(path: &Path, names: &BTreeMap<String, Ipv4Addr>) {
    let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for (name, ip) in names {
        text.push_str(&format!("{ip} {name}\n"));
    }
    if std::fs::read_to_string(path).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(path, text).expect("write the hosts file");
    }
}

/// The address of `namespace/pod`, allocated on first use (stable for the name).
pub(super) fn address(state: &Arc<Mutex<State>>, namespace: &str, pod: &str) -> Ipv4Addr {
    let mut st = lock(state);
    let next = u8::try_from(st.addresses.len() + 10).expect("fewer than 245 pods");
    let subnet = st.subnet;
    *st.addresses
        .entry(format!("{namespace}/{pod}"))
        .or_insert(Ipv4Addr::new(127, 0, subnet, next))
}

pub(super) async fn endpoint_slices(client: &kube::Client, namespace: &str) -> Vec<EndpointSlice> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// Rewrites one value for the pod's network and volumes (see the module docs).
pub(super) fn rewrite(
    state: &Arc<Mutex<State>>,
    namespace: &str,
    ip: Ipv4Addr,
    mounts: &[(String, PathBuf)],
    slices: &[EndpointSlice],
    value: &str,
) -> String {
    let mut out = value.to_owned();
    for (mount, host) in mounts {
        if out == *mount || out.starts_with(&format!("{mount}/")) {
            out = format!("{}{}", host.display(), &out[mount.len()..]);
            break;
        }
    }
    let mut rewritten = String::new();
    let mut token = String::new();
    let flush = |token: &mut String, rewritten: &mut String| {
        // The pod's containers share its network: their loopback is the pod's address.
        let resolved = if token == "localhost" || token == "127.0.0.1" {
            Some(ip.to_string())
        } else {
            resolve_name(state, namespace, slices, token)
        };
        rewritten.push_str(&resolved.unwrap_or(token.clone()));
        token.clear();
    };
    for c in out.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
            token.push(c);
        } else {
            flush(&mut token, &mut rewritten);
            rewritten.push(c);
        }
    }
    flush(&mut token, &mut rewritten);
    rewritten.replace("0.0.0.0", &ip.to_string())
}

/// The address a DNS name resolves to in the emulated cluster, if it is a cluster name.
fn resolve_name(
    state: &Arc<Mutex<State>>,
    namespace: &str,
    slices: &[EndpointSlice],
    name: &str,
) -> Option<String> {
    let suffix = format!(".svc.{CLUSTER_DOMAIN}");
    let base = name.strip_suffix(&suffix)?;
    let parts: Vec<&str> = base.split('.').collect();
    match parts.as_slice() {
        // <pod>.<subdomain>.<namespace>: the pod's own address.
        [pod, _subdomain, ns] => {
            let ip = address(state, ns, pod);
            lock(state).pod_names.insert(name.to_owned(), ip);
            Some(ip.to_string())
        }
        // <service>.<namespace>: one ready endpoint.
        [service, ns] if *ns == namespace => service_endpoint(slices, service),
        _ => None,
    }
}

fn service_endpoint(slices: &[EndpointSlice], service: &str) -> Option<String> {
    slices
        .iter()
        .filter(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .is_some_and(|n| n == service)
        })
        .flat_map(|s| s.endpoints.iter())
        .find(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
        .and_then(|e| e.addresses.first().cloned())
}
