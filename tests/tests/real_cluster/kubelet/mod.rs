//! A process kubelet: one Node, registered with the node's own credentials (`system:node:<name>`,
//! so the Node authorizer and `NodeRestriction` apply), whose pods run as local processes with
//! their status written back through the API.
//!
//! What a container runtime and the pod network would provide is emulated, as documented:
//!
//! - **Images.** An image (or a command) naming one of the workspace's binaries (`sluice-agent`,
//!   `sluice`, `sluice-operator`) runs that binary, built with the test's profile; a shell
//!   (`/busybox/sh` of the CLI image) is the host's `/bin/sh`, with the image's binary on
//!   `PATH`. Other images are refused with the pod's name.
//! - **Pod network** ([`names`]). Each pod gets its own loopback address `127.0.<n>.x`, stable per
//!   pod name (all of 127/8 routes to `lo`), `<n>` from 78 up, one per kubelet, so that the
//!   clusters of tests running side by side never share an address. In args and env, `0.0.0.0`, `localhost` and
//!   `127.0.0.1` become the pod's address (its containers share it), and a pod's stable DNS
//!   name `<pod>.<subdomain>.<ns>.svc.<domain>` its address (allocated on first mention, as DNS
//!   would answer before the pod runs), a Service's `<svc>.<ns>.svc.<domain>` the address of
//!   one of its ready endpoints. Each container runs in a mount namespace of its own whose
//!   `/etc/hosts` resolves the same names, short Service names of its namespace included.
//! - **Volumes** ([`volumes`]). Every volume is a directory; args and env under a mount path
//!   are rewritten to it.
//! - **Lifecycle** ([`pod`], [`container`]). Native sidecars start first, one after another,
//!   and stop last, in reverse order; gRPC startup and readiness probes are probed on the
//!   pod's address; a container that exits is restarted (its `restartCount` grows); deleting a
//!   pod runs each container's `preStop` exec hook, then SIGTERM, then SIGKILL after the grace
//!   period, then removes the pod object (as the kubelet does, with grace 0).

mod container;
mod names;
mod pod;
mod volumes;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;

use pod::PodProcesses;

/// The node's name.
pub const NODE: &str = "sluice-node-0";
/// How often pods are synced with the API.
const SYNC_PERIOD: Duration = Duration::from_millis(500);
/// How often the node renews its Lease (the node lifecycle controller's heartbeat; it marks a
/// node unreachable after 40 s without one).
const LEASE_RENEW: Duration = Duration::from_secs(5);
/// Restart backoff of a container that exited (the kubelet's starts at 10 s; tests wait less).
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// The third octet of the next kubelet's pod addresses.
static NEXT_SUBNET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(78);

/// The kubelet's shared state.
#[derive(Default)]
struct State {
    /// The third octet of this kubelet's pod addresses.
    subnet: u8,
    pods: BTreeMap<String, PodProcesses>,
    /// Addresses per `namespace/pod`.
    addresses: BTreeMap<String, Ipv4Addr>,
    /// Pod DNS names (`<pod>.<subdomain>.<ns>.svc.<domain>`) mentioned or served, with their
    /// addresses.
    pod_names: BTreeMap<String, Ipv4Addr>,
    /// Per `namespace/pod`, what happened to its containers, in order (kept after the pod).
    lifecycle: BTreeMap<String, Vec<String>>,
    /// Logs of containers that ended, printed when a test fails.
    ended: Vec<PathBuf>,
}

/// The node and its kubelet loop; stops every pod when dropped.
pub struct ProcessKubelet {
    state: Arc<Mutex<State>>,
    hosts: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ProcessKubelet {
    /// Registers the node (with `client`, the node's identity) and starts syncing its pods.
    /// Files go under `root`.
    pub async fn start(client: kube::Client, root: &Path) -> ProcessKubelet {
        register(&client).await;
        let subnet = NEXT_SUBNET.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let state = Arc::new(Mutex::new(State {
            subnet,
            ..State::default()
        }));
        let root = root.to_path_buf();
        let hosts = root.join("hosts");
        names::write_hosts(&hosts, &BTreeMap::new());
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                let mut renewed: Option<Instant> = None;
                loop {
                    if renewed.is_none_or(|t| t.elapsed() >= LEASE_RENEW) {
                        match renew_lease(&client).await {
                            Ok(()) => renewed = Some(Instant::now()),
                            Err(e) => eprintln!("kubelet: node lease: {e}"),
                        }
                    }
                    if let Err(e) = sync(&client, &state, &root).await {
                        eprintln!("kubelet: sync failed: {e}");
                    }
                    if let Err(e) = names::publish_names(&client, &state, &root).await {
                        eprintln!("kubelet: cluster names: {e}");
                    }
                    tokio::time::sleep(SYNC_PERIOD).await;
                }
            }
        });
        ProcessKubelet { state, hosts, task }
    }

    /// A hosts file (kept current) that resolves the cluster's fully qualified DNS names as the
    /// emulated cluster DNS would. Processes outside the node (the operator) see it as their
    /// `/etc/hosts` in a mount namespace of their own.
    pub fn hosts_file(&self) -> &Path {
        &self.hosts
    }

    /// The address of `namespace/pod`, if it was allocated.
    pub fn address(&self, namespace: &str, pod: &str) -> Option<Ipv4Addr> {
        lock(&self.state)
            .addresses
            .get(&format!("{namespace}/{pod}"))
            .copied()
    }

    /// What container `container` of the running pod `namespace/pod` has written so far.
    pub fn log(&self, namespace: &str, pod: &str, container: &str) -> Option<String> {
        let path = lock(&self.state)
            .pods
            .get(&format!("{namespace}/{pod}"))?
            .containers
            .iter()
            .find(|c| c.name == container)
            .map(|c| c.log.clone())?;
        std::fs::read_to_string(path).ok()
    }

    /// What happened to the containers of `namespace/pod`, in order: `<container> started`,
    /// `exited`, `restarted`, `stopping`, `stopped`.
    pub fn lifecycle(&self, namespace: &str, pod: &str) -> Vec<String> {
        lock(&self.state)
            .lifecycle
            .get(&format!("{namespace}/{pod}"))
            .cloned()
            .unwrap_or_default()
    }

    /// Prints the last `lines` of every container log, ended ones included.
    pub fn dump_logs(&self, lines: usize) {
        let state = lock(&self.state);
        let logs = state.ended.iter().chain(
            state
                .pods
                .values()
                .flat_map(|p| p.containers.iter().map(|c| &c.log)),
        );
        for log in logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            eprintln!("---- {} (last {lines} lines) ----", log.display());
            for line in &all[all.len().saturating_sub(lines)..] {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for ProcessKubelet {
    fn drop(&mut self) {
        self.task.abort();
        if std::thread::panicking() {
            self.dump_logs(40);
        }
        for pod in lock(&self.state).pods.values_mut() {
            for container in &mut pod.containers {
                container.kill();
            }
        }
    }
}

async fn register(client: &kube::Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": NODE, "labels": {
            "kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
            "topology.kubernetes.io/zone": "zone-0"}},
    }))
    .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("the node registers itself");
    let now = now();
    let resources =
        json!({"cpu": "64", "memory": "256Gi", "pods": "250", "ephemeral-storage": "100Gi"});
    let status = json!({"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "process kubelet is posting ready status",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE}],
        "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                     "osImage": "process kubelet", "containerRuntimeVersion": "process://1",
                     "kubeletVersion": "v1.34.4", "kubeProxyVersion": "", "operatingSystem": "linux",
                     "architecture": "amd64"},
    }});
    nodes
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("the node posts its status");
}

/// Renews the node's Lease in `kube-node-lease`, its heartbeat.
async fn renew_lease(client: &kube::Client) -> Result<(), kube::Error> {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let lease = Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(NODE.to_owned()),
            namespace: Some("kube-node-lease".to_owned()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(NODE.to_owned()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        }),
    };
    let mut value = serde_json::to_value(&lease).expect("lease");
    value["apiVersion"] = json!("coordination.k8s.io/v1");
    value["kind"] = json!("Lease");
    leases
        .patch(
            NODE,
            &PatchParams::apply("kubelet").force(),
            &Patch::Apply(&value),
        )
        .await
        .map(|_| ())
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .expect("round")
        .to_string()
}

fn key_of(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// One pass: start what is new, restart what exited, stop what is deleted, report status.
/// One pass: stops pods that went away or are being deleted, prepares new ones, and moves each
/// running pod along (starts, restarts, probes), reporting its status when it changed.
async fn sync(client: &kube::Client, state: &Arc<Mutex<State>>, root: &Path) -> Result<(), String> {
    let pods: Api<Pod> = Api::all(client.clone());
    let listed = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={NODE}")))
        .await
        .map_err(|e| format!("list pods: {e}"))?;
    let listed_keys: Vec<String> = listed.items.iter().map(key_of).collect();
    // Pods gone from the API without passing through deletion here: stop them.
    let vanished: Vec<String> = lock(state)
        .pods
        .keys()
        .filter(|k| !listed_keys.contains(k))
        .cloned()
        .collect();
    for key in vanished {
        stop(state, &key).await;
    }
    for pod in listed.items {
        let key = key_of(&pod);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let current = lock(state).pods.get(&key).map(|r| r.uid.clone());
        if current.as_ref().is_some_and(|u| *u != uid) {
            // A new pod of the same name: the old one's containers go first.
            stop(state, &key).await;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            stop(state, &key).await;
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let _ = api.delete(&name, &params).await;
            continue;
        }
        if matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            continue;
        }
        let known = lock(state).pods.contains_key(&key);
        if !known {
            match PodProcesses::prepare(client, state, root, &pod).await {
                Ok(prepared) => {
                    lock(state).pods.insert(key.clone(), prepared);
                }
                Err(e) => {
                    eprintln!("kubelet: pod {key} cannot start yet: {e}");
                    continue;
                }
            }
        }
        let probes = {
            let mut st = lock(state);
            let running = st.pods.get_mut(&key).expect("running");
            let happened = running.advance();
            let probes = running.probes();
            st.lifecycle
                .entry(key.clone())
                .or_default()
                .extend(happened);
            probes
        };
        let mut answers = Vec::new();
        for (index, startup, readiness) in probes {
            let startup = match startup {
                Some(endpoint) => Some(crate::support::grpc_serving(&endpoint).await),
                None => None,
            };
            let readiness = match readiness {
                Some(endpoint) => Some(crate::support::grpc_serving(&endpoint).await),
                None => None,
            };
            answers.push((index, startup, readiness));
        }
        let report = {
            let mut st = lock(state);
            let running = st.pods.get_mut(&key).expect("running");
            for (index, startup, readiness) in answers {
                running.containers[index].probed(startup, readiness);
            }
            let fingerprint = running.fingerprint();
            (running.reported.as_ref() != Some(&fingerprint)).then(|| {
                running.reported = Some(fingerprint);
                running.status()
            })
        };
        if let Some(status) = report
            && let Err(e) = api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"status": status})),
                )
                .await
        {
            eprintln!("kubelet: status of pod {key}: {e}");
        }
    }
    Ok(())
}

/// Stops the pod `key` runs, if any (see [`PodProcesses::stop`]), recording each step.
async fn stop(state: &Arc<Mutex<State>>, key: &str) {
    let Some(running) = lock(state).pods.remove(key) else {
        return;
    };
    let state = state.clone();
    let key = key.to_owned();
    tokio::task::spawn_blocking(move || {
        let logs: Vec<PathBuf> = running.containers.iter().map(|c| c.log.clone()).collect();
        running.stop(&key, |step| {
            lock(&state)
                .lifecycle
                .entry(key.clone())
                .or_default()
                .push(step)
        });
        lock(&state).ended.extend(logs);
    })
    .await
    .expect("stop task");
}
