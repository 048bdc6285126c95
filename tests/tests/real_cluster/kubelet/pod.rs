//! One pod's containers as processes, in the order Kubernetes documents for native sidecars:
//! each sidecar (an init container with `restartPolicy: Always`) starts once the one before it
//! has started (its startup probe passed, or it runs when it has none); the main containers
//! start once every sidecar has; the pod is Ready when every container is. At deletion the
//! main containers stop first (`preStop`, SIGTERM), and only once they have exited do the
//! sidecars stop, in reverse order, all within the grace period.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use super::container::{ContainerProcess, expand, image_binary, resolve_env};
use super::{State, lock, names, now, volumes};

/// A pod the kubelet runs.
pub(super) struct PodProcesses {
    /// The pod's uid (a new pod of the same name is another pod).
    pub uid: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The pod as last listed.
    pub pod: Pod,
    /// Sidecars in spec order, then the main containers.
    pub containers: Vec<ContainerProcess>,
    /// What the last status report said, to write only changes.
    pub reported: Option<Value>,
}

impl PodProcesses {
    /// Resolves the pod's volumes and every container's command line and env; starts nothing.
    pub async fn prepare(
        client: &kube::Client,
        state: &Arc<Mutex<State>>,
        root: &Path,
        pod: &Pod,
    ) -> Result<PodProcesses, String> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.as_ref().ok_or("no spec")?;
        let ip = names::address(state, &namespace, &name);
        if let Some(subdomain) = &spec.subdomain {
            let host = spec.hostname.clone().unwrap_or_else(|| name.clone());
            lock(state).pod_names.insert(
                format!(
                    "{host}.{subdomain}.{namespace}.svc.{}",
                    names::CLUSTER_DOMAIN
                ),
                ip,
            );
        }
        let dir = root.join("pods").join(&namespace).join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("pod dir: {e}"))?;
        let volumes = volumes::volumes(client, pod, &dir).await?;
        let slices = names::endpoint_slices(client, &namespace).await;
        let hosts = names::namespace_hosts(root, &namespace);
        if !hosts.exists() {
            let known = lock(state).pod_names.clone();
            names::write_hosts(&hosts, &known);
        }
        let mut sidecars = Vec::new();
        for init in spec.init_containers.iter().flatten() {
            if init.restart_policy.as_deref() != Some("Always") {
                return Err(format!(
                    "init container {} runs to completion, which this kubelet does not emulate",
                    init.name
                ));
            }
            sidecars.push(init);
        }
        let mut containers = Vec::new();
        for (container, sidecar) in sidecars
            .into_iter()
            .map(|c| (c, true))
            .chain(spec.containers.iter().map(|c| (c, false)))
        {
            let mut mounts: Vec<(String, std::path::PathBuf)> = Vec::new();
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
            let rewrite =
                |value: &str| names::rewrite(state, &namespace, ip, &mounts, &slices, value);
            let env: Vec<(String, String)> = resolve_env(pod, container, ip)?
                .into_iter()
                .map(|(k, v)| {
                    let v = rewrite(&v);
                    (k, v)
                })
                .collect();
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
            containers.push(ContainerProcess::new(
                container,
                sidecar,
                argv,
                env,
                &dir,
                hosts.clone(),
                ip,
            ));
        }
        Ok(PodProcesses {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            ip,
            pod: pod.clone(),
            containers,
            reported: None,
        })
    }

    /// Restarts containers that exited (after the backoff) and starts the ones whose turn it
    /// is. Returns what happened, for the pod's lifecycle record.
    pub fn advance(&mut self) -> Vec<String> {
        let mut happened = Vec::new();
        for c in &mut self.containers {
            let restarts = c.restarts;
            match c.poll() {
                Ok(true) if c.restarts > restarts => happened.push(format!("{} restarted", c.name)),
                Ok(true) => happened.push(format!("{} exited", c.name)),
                Ok(false) => {}
                Err(e) => eprintln!("kubelet: {} cannot restart: {e}", c.name),
            }
        }
        let mut sidecars_started = true;
        for c in &mut self.containers {
            if !c.spawned() && sidecars_started {
                match c.spawn() {
                    Ok(()) => {
                        eprintln!("kubelet: started {}: {}", c.name, c.command_line());
                        happened.push(format!("{} started", c.name));
                    }
                    Err(e) => eprintln!("kubelet: {} cannot start: {e}", c.name),
                }
            }
            if c.sidecar {
                sidecars_started &= c.started;
            }
        }
        happened
    }

    /// Every container's probe endpoints: (index, startup, readiness).
    pub fn probes(&self) -> Vec<(usize, Option<String>, Option<String>)> {
        self.containers
            .iter()
            .enumerate()
            .filter(|(_, c)| c.running())
            .map(|(i, c)| {
                let (startup, readiness) = c.probes();
                (i, startup, readiness)
            })
            .collect()
    }

    /// Whether every container is ready.
    pub fn ready(&self) -> bool {
        self.containers.iter().all(|c| c.ready)
    }

    /// The pod's `status` as the kubelet reports it.
    pub fn status(&self) -> Value {
        let ready = if self.ready() { "True" } else { "False" };
        let initialized = if self
            .containers
            .iter()
            .filter(|c| c.sidecar)
            .all(|c| c.started)
        {
            "True"
        } else {
            "False"
        };
        let main_running = self.containers.iter().any(|c| !c.sidecar && c.running());
        let ip = self.ip.to_string();
        let now = now();
        let statuses = |sidecar: bool| -> Vec<Value> {
            self.containers
                .iter()
                .filter(|c| c.sidecar == sidecar)
                .map(ContainerProcess::status)
                .collect()
        };
        json!({
            "phase": if main_running { "Running" } else { "Pending" },
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": initialized, "lastTransitionTime": now},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
                {"type": "Ready", "status": ready, "lastTransitionTime": now},
            ],
            "initContainerStatuses": statuses(true),
            "containerStatuses": statuses(false),
        })
    }

    /// What of [`PodProcesses::status`] changes mean something (not its timestamps).
    pub fn fingerprint(&self) -> Value {
        Value::Array(
            self.containers
                .iter()
                .map(|c| json!([c.spawned(), c.running(), c.started, c.ready, c.restarts]))
                .collect(),
        )
    }

    /// Stops the pod: the main containers first, then the sidecars in reverse order, all within
    /// the grace period; `record` hears each step. Blocking.
    pub fn stop(mut self, key: &str, record: impl Fn(String)) {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let grace = spec.termination_grace_period_seconds.unwrap_or(30);
        let deadline = Instant::now() + Duration::from_secs(u64::try_from(grace).unwrap_or(30));
        let (mut sidecars, mut mains): (Vec<_>, Vec<_>) =
            self.containers.drain(..).partition(|c| c.sidecar);
        for c in &mut mains {
            record(format!("{} stopping", c.name));
            c.terminate(key);
        }
        for c in &mut mains {
            c.wait_exit(deadline);
            record(format!("{} stopped", c.name));
        }
        for c in sidecars.iter_mut().rev() {
            record(format!("{} stopping", c.name));
            c.terminate(key);
            c.wait_exit(deadline);
            record(format!("{} stopped", c.name));
        }
    }
}
