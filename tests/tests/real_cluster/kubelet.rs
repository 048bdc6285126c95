//! A process kubelet: one Node, registered with the node's own credentials (`system:node:<name>`,
//! so the Node authorizer and `NodeRestriction` apply), whose pods run as local processes with
//! their status written back through the API.
//!
//! What a container runtime and the pod network would provide is emulated, as documented:
//!
//! - **Images.** An image (or a command) naming one of the workspace's binaries (`sluice-agent`,
//!   `sluice`, `sluice-operator`) runs that binary, built with the test's profile. Other images
//!   are refused with the pod's name.
//! - **Pod network.** Each pod gets its own loopback address `127.0.78.x`, stable per pod name
//!   (all of 127/8 routes to `lo`). In args and env, `0.0.0.0` becomes the pod's address and a
//!   pod's stable DNS name `<pod>.<subdomain>.<ns>.svc.<domain>` its address (allocated on first
//!   mention, as DNS would answer before the pod runs); a Service name `<svc>.<ns>.svc.<domain>`
//!   or `<svc>` becomes the address of one of its ready endpoints (EndpointSlices), there being
//!   no kube-proxy.
//! - **Volumes.** Every volume is a directory: a claim is its bound PersistentVolume's `hostPath`
//!   (made by [`super::provisioner`]), a ConfigMap or Secret its files, an `emptyDir` fresh per
//!   pod, a projected service-account volume a token from the TokenRequest API with `ca.crt`
//!   and `namespace`. Args and env under a mount path are rewritten to the directory.
//! - **Lifecycle.** `readinessProbe.grpc` is probed on the pod's address; a container that exits
//!   is restarted (its `restartCount` grows); deleting a pod runs the `preStop` exec hook with
//!   the container's env, then SIGTERM, then SIGKILL after the grace period, then removes the
//!   pod object (as the kubelet does, with grace 0).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The node's name.
pub const NODE: &str = "sluice-node-0";
/// The cluster's DNS suffix.
const CLUSTER_DOMAIN: &str = "cluster.local";
/// How often pods are synced with the API.
const SYNC_PERIOD: Duration = Duration::from_millis(500);
/// How often the node renews its Lease (the node lifecycle controller's heartbeat; it marks a
/// node unreachable after 40 s without one).
const LEASE_RENEW: Duration = Duration::from_secs(5);
/// Restart backoff of a container that exited (the kubelet's starts at 10 s; tests wait less).
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// The kubelet's shared state.
#[derive(Default)]
struct State {
    pods: BTreeMap<String, Running>,
    /// Addresses per `namespace/pod`.
    addresses: BTreeMap<String, Ipv4Addr>,
    /// Pod DNS names (`<pod>.<subdomain>.<ns>.svc.<domain>`) mentioned or served, with their
    /// addresses.
    pod_names: BTreeMap<String, Ipv4Addr>,
    /// Logs of containers that ended, printed when a test fails.
    ended: Vec<PathBuf>,
}

/// One pod's running container.
struct Running {
    uid: String,
    child: Child,
    ip: Ipv4Addr,
    log: PathBuf,
    restarts: i32,
    started_at: String,
    exited_at: Option<Instant>,
    ready: bool,
    pod: Pod,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    /// The hosts file of the pod's namespace, its `/etc/hosts`.
    hosts: PathBuf,
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
        let state = Arc::new(Mutex::new(State::default()));
        let root = root.to_path_buf();
        let hosts = root.join("hosts");
        write_hosts(&hosts, &BTreeMap::new());
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
                    if let Err(e) = publish_names(&client, &state, &root).await {
                        eprintln!("kubelet: cluster names: {e}");
                    }
                    tokio::time::sleep(SYNC_PERIOD).await;
                }
            }
        });
        ProcessKubelet { state, hosts, task }
    }

    /// A hosts file (kept current) that resolves the cluster's DNS names as the emulated
    /// cluster DNS would: each pod's stable name to its address, each Service with a selector to
    /// one ready pod behind it (there is no kube-proxy). Processes outside the node (the
    /// operator) see it as their `/etc/hosts` in a mount namespace of their own.
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

    /// What the running container of `namespace/pod` has written so far.
    pub fn log(&self, namespace: &str, pod: &str) -> Option<String> {
        let path = lock(&self.state)
            .pods
            .get(&format!("{namespace}/{pod}"))
            .map(|r| r.log.clone())?;
        std::fs::read_to_string(path).ok()
    }

    /// Prints the last `lines` of every container log, ended ones included.
    pub fn dump_logs(&self, lines: usize) {
        let state = lock(&self.state);
        let logs = state
            .ended
            .iter()
            .chain(state.pods.values().map(|p| &p.log));
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
            let _ = pod.child.kill();
            let _ = pod.child.wait();
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
        let removed = lock(state).pods.remove(&key);
        if let Some(running) = removed {
            stop(state, key, running).await;
        }
    }
    for pod in listed.items {
        let key = key_of(&pod);
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let current = lock(state).pods.get(&key).map(|r| r.uid.clone());
        if current.as_ref().is_some_and(|u| *u != uid) {
            // A new pod of the same name: the old one's container goes first.
            let removed = lock(state).pods.remove(&key);
            if let Some(old) = removed {
                stop(state, key.clone(), old).await;
            }
        }
        if pod.metadata.deletion_timestamp.is_some() {
            let removed = lock(state).pods.remove(&key);
            if let Some(running) = removed {
                stop(state, key.clone(), running).await;
            }
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
            match start(client, state, root, &pod).await {
                Ok(running) => {
                    report(&api, &running).await;
                    lock(state).pods.insert(key, running);
                }
                Err(e) => eprintln!("kubelet: pod {key} cannot start yet: {e}"),
            }
            continue;
        }
        let (endpoint, exited, restart_due) = {
            let mut st = lock(state);
            let running = st.pods.get_mut(&key).expect("running");
            let exited = running.child.try_wait().ok().flatten().is_some();
            if exited && running.exited_at.is_none() {
                running.exited_at = Some(Instant::now());
            }
            let due = running
                .exited_at
                .is_some_and(|t| t.elapsed() >= RESTART_BACKOFF);
            (probe_endpoint(running), exited, due)
        };
        if restart_due {
            let mut st = lock(state);
            let running = st.pods.get_mut(&key).expect("running");
            match spawn(&running.argv, &running.env, &running.log, &running.hosts) {
                Ok(child) => {
                    running.child = child;
                    running.restarts += 1;
                    running.exited_at = None;
                    running.started_at = now();
                    running.ready = false;
                }
                Err(e) => eprintln!("kubelet: pod {key} cannot restart: {e}"),
            }
        }
        let ready = !exited
            && match endpoint {
                Some(endpoint) => crate::support::grpc_serving(&endpoint).await,
                None => true,
            };
        let changed = {
            let mut st = lock(state);
            let running = st.pods.get_mut(&key).expect("running");
            let changed = running.ready != ready || restart_due || exited;
            running.ready = ready;
            changed
        };
        if changed {
            let snapshot = {
                let st = lock(state);
                let r = &st.pods[&key];
                StatusView {
                    ip: r.ip,
                    ready: r.ready,
                    restarts: r.restarts,
                    started_at: r.started_at.clone(),
                    exited: r.exited_at.is_some(),
                    container: r.pod.spec.as_ref().map(|s| s.containers[0].clone()),
                }
            };
            report_view(&api, &name, &snapshot).await;
        }
    }
    Ok(())
}

/// What a status report says about one pod.
struct StatusView {
    ip: Ipv4Addr,
    ready: bool,
    restarts: i32,
    started_at: String,
    exited: bool,
    container: Option<Container>,
}

async fn report(api: &Api<Pod>, running: &Running) {
    let name = running.pod.metadata.name.clone().unwrap_or_default();
    let view = StatusView {
        ip: running.ip,
        ready: running.ready,
        restarts: running.restarts,
        started_at: running.started_at.clone(),
        exited: false,
        container: running.pod.spec.as_ref().map(|s| s.containers[0].clone()),
    };
    report_view(api, &name, &view).await;
}

async fn report_view(api: &Api<Pod>, name: &str, view: &StatusView) {
    let ready = if view.ready { "True" } else { "False" };
    let container = view.container.clone().unwrap_or_default();
    let state = if view.exited {
        json!({"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": now()}})
    } else {
        json!({"running": {"startedAt": view.started_at}})
    };
    let now = now();
    let status = json!({"status": {
        "phase": "Running",
        "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": view.ip.to_string(), "podIPs": [{"ip": view.ip.to_string()}],
        "startTime": view.started_at,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
            {"type": "Ready", "status": ready, "lastTransitionTime": now},
        ],
        "containerStatuses": [{
            "name": container.name, "image": container.image.unwrap_or_default(),
            "imageID": "", "containerID": format!("process://{name}"),
            "ready": view.ready, "started": !view.exited, "restartCount": view.restarts,
            "state": state,
        }],
    }});
    if let Err(e) = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
    {
        eprintln!("kubelet: status of pod {name}: {e}");
    }
}

fn probe_endpoint(running: &Running) -> Option<String> {
    let container = &running.pod.spec.as_ref()?.containers[0];
    let port = container.readiness_probe.as_ref()?.grpc.as_ref()?.port;
    Some(format!("http://{}:{port}", running.ip))
}

/// Resolves a pod's volumes, env and command line, and starts its (first) container.
async fn start(
    client: &kube::Client,
    state: &Arc<Mutex<State>>,
    root: &Path,
    pod: &Pod,
) -> Result<Running, String> {
    let key = key_of(pod);
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().ok_or("no spec")?;
    let ip = address(state, &namespace, &name);
    if let Some(subdomain) = &spec.subdomain {
        let host = spec.hostname.clone().unwrap_or_else(|| name.clone());
        lock(state).pod_names.insert(
            format!("{host}.{subdomain}.{namespace}.svc.{CLUSTER_DOMAIN}"),
            ip,
        );
    }
    let dir = root.join("pods").join(&namespace).join(&name);
    let volumes = volumes(client, pod, &dir).await?;
    let container = &spec.containers[0];
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let host = volumes
            .get(&mount.name)
            .ok_or_else(|| format!("mount {} has no volume", mount.name))?;
        let host = match &mount.sub_path {
            Some(sub) if !sub.is_empty() => host.join(sub),
            _ => host.clone(),
        };
        mounts.push((mount.mount_path.clone(), host));
    }
    // Longest mount paths first, so /data/x is not rewritten by /data.
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    let slices = endpoint_slices(client, &namespace).await;
    let rewrite = |value: &str| rewrite(state, &namespace, ip, &mounts, &slices, value);
    let env = resolve_env(pod, container, ip)?
        .into_iter()
        .map(|(k, v)| {
            let v = rewrite(&v);
            (k, v)
        })
        .collect::<Vec<_>>();
    let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
    if argv.is_empty() {
        argv.push(image_binary(container.image.as_deref().unwrap_or_default()).to_owned());
    }
    argv.extend(container.args.clone().unwrap_or_default());
    let argv: Vec<String> = argv
        .iter()
        .map(|a| expand(a, &env))
        .map(|a| rewrite(&a))
        .collect();
    std::fs::create_dir_all(&dir).map_err(|e| format!("pod dir: {e}"))?;
    let log = dir.join(format!("{}.log", container.name));
    let hosts = namespace_hosts(root, &namespace);
    if !hosts.exists() {
        let names = lock(state).pod_names.clone();
        write_hosts(&hosts, &names);
    }
    let child = spawn(&argv, &env, &log, &hosts)?;
    eprintln!("kubelet: started {key} at {ip}: {}", argv.join(" "));
    Ok(Running {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        child,
        ip,
        log,
        restarts: 0,
        started_at: now(),
        exited_at: None,
        ready: false,
        pod: pod.clone(),
        argv,
        env,
        hosts,
    })
}

/// Rewrites the hosts files from the pod names and the Services' ready pods: `root/hosts` with
/// the fully qualified names, and one per namespace that has pods, which adds the short forms
/// a pod's resolver search path would find (`<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc`).
async fn publish_names(
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
            r.ready
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
fn namespace_hosts(root: &Path, namespace: &str) -> PathBuf {
    root.join(format!("hosts.{namespace}"))
}

/// Writes `names` as a hosts file, in place (a bind mount of it sees the new content).
fn write_hosts(path: &Path, names: &BTreeMap<String, Ipv4Addr>) {
    let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for (name, ip) in names {
        text.push_str(&format!("{ip} {name}\n"));
    }
    if std::fs::read_to_string(path).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(path, text).expect("write the hosts file");
    }
}

/// The workspace binary an image or command names.
fn image_binary(image: &str) -> &str {
    let name = image.rsplit('/').next().unwrap_or(image);
    name.split([':', '@']).next().unwrap_or(name)
}

/// The program a command names: one of the workspace's binaries (built on first use), or the
/// host's `/bin/sh` for a shell (the CLI image's busybox shell).
fn program(command: &str) -> Result<PathBuf, String> {
    let name = Path::new(command)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(command);
    match name {
        "sluice-agent" | "sluice" | "sluice-operator" => {
            static BUILT: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
            let mut built = lock(&BUILT);
            if let Some(path) = built.get(name) {
                return Ok(path.clone());
            }
            let path = crate::support::workspace_binary(name, name);
            built.insert(name.to_owned(), path.clone());
            Ok(path)
        }
        "sh" => Ok(PathBuf::from("/bin/sh")),
        other => Err(format!("{other} is not a binary of this workspace")),
    }
}

/// The directory on an image's `PATH` that holds its program (so a shell script in the CLI
/// image can call `sluice`): the program's directory of the build.
fn image_path(image: &str) -> Result<PathBuf, String> {
    let binary = program(image)?;
    Ok(binary.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Starts the container's process in a mount namespace of its own whose `/etc/hosts` is
/// `hosts`, output appended to `log`.
fn spawn(
    argv: &[String],
    env: &[(String, String)],
    log: &Path,
    hosts: &Path,
) -> Result<Child, String> {
    let binary = program(&argv[0])?;
    let (binary, args) = super::process::with_hosts_file(hosts, &binary, &argv[1..]);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("open {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    Command::new(binary)
        .args(&args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", argv[0]))
}

/// Runs the `preStop` hook, SIGTERM, waits out the grace period, SIGKILL.
async fn stop(state: &Arc<Mutex<State>>, key: String, mut running: Running) {
    let spec = running.pod.spec.clone().unwrap_or_default();
    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
    let deadline = Instant::now() + Duration::from_secs(u64::try_from(grace).unwrap_or(30));
    let hook = spec.containers[0]
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| h.exec.as_ref())
        .and_then(|e| e.command.clone());
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        if let Some(command) = hook
            && running.child.try_wait().ok().flatten().is_none()
        {
            let argv: Vec<String> = command
                .iter()
                .map(|a| a.replace("0.0.0.0", &running.ip.to_string()))
                .collect();
            // Like the kubelet, a failing hook is logged and the container stops anyway.
            let outcome = program(&argv[0]).and_then(|bin| {
                Command::new(bin)
                    .args(&argv[1..])
                    .env_clear()
                    .envs(running.env.iter().map(|(k, v)| (k, v)))
                    .output()
                    .map_err(|e| e.to_string())
            });
            match outcome {
                Ok(out) => eprintln!(
                    "kubelet: {key}: preStop exit {:?}: {}{}",
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("kubelet: {key}: preStop did not run: {e}"),
            }
        }
        if let Ok(pid) = i32::try_from(running.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        loop {
            match running.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = running.child.kill();
                    let _ = running.child.wait();
                    break;
                }
            }
        }
        lock(&state).ended.push(running.log.clone());
    })
    .await
    .expect("stop task");
}

fn address(state: &Arc<Mutex<State>>, namespace: &str, pod: &str) -> Ipv4Addr {
    let mut st = lock(state);
    let next = u8::try_from(st.addresses.len() + 10).expect("fewer than 245 pods");
    *st.addresses
        .entry(format!("{namespace}/{pod}"))
        .or_insert(Ipv4Addr::new(127, 0, 78, next))
}

async fn endpoint_slices(client: &kube::Client, namespace: &str) -> Vec<EndpointSlice> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// Rewrites one value for the pod's network and volumes (see the module docs).
fn rewrite(
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
        rewritten.push_str(&resolve_name(state, namespace, slices, token).unwrap_or(token.clone()));
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

/// `$(VAR)` references to earlier variables, as the kubelet expands them.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = value.to_owned();
    for (name, earlier) in env {
        out = out.replace(&format!("$({name})"), earlier);
    }
    out
}

fn resolve_env(
    pod: &Pod,
    container: &Container,
    ip: Ipv4Addr,
) -> Result<Vec<(String, String)>, String> {
    let image = image_binary(container.image.as_deref().unwrap_or_default());
    let mut resolved: Vec<(String, String)> = vec![(
        "PATH".to_owned(),
        format!(
            "{}:/usr/local/bin:/usr/bin:/bin",
            image_path(image)?.display()
        ),
    )];
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => expand(v, &resolved),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("metadata.name") => pod.metadata.name.clone().unwrap_or_default(),
                Some("metadata.namespace") => pod.metadata.namespace.clone().unwrap_or_default(),
                Some("metadata.uid") => pod.metadata.uid.clone().unwrap_or_default(),
                Some("spec.nodeName") => NODE.to_owned(),
                Some("spec.serviceAccountName") => pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default(),
                Some("status.podIP") => ip.to_string(),
                Some("status.hostIP") => "127.0.0.1".to_owned(),
                other => {
                    return Err(format!(
                        "env {}: source {other:?} is not emulated",
                        var.name
                    ));
                }
            },
            (None, None) => String::new(),
        };
        resolved.push((var.name.clone(), value));
    }
    Ok(resolved)
}

/// A directory per volume of `pod`, filled as the kubelet would.
async fn volumes(
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
