//! The operator's StatefulSet run as local processes: this module plays the StatefulSet
//! controller and the kubelet.
//!
//! Each pod runs the container's command with its args and env expanded as the kubelet does
//! (`fieldRef`s for `metadata.name`/`metadata.namespace`, `$(VAR)` of earlier variables), then
//! two documented rewrites emulate what Kubernetes provides:
//!
//! - **Pod network.** Pod `i` gets its own loopback address `127.0.77.(10+i)` (all of 127/8
//!   routes to `lo`). Every stable DNS name `<sts>-<i>.<headless>.<ns>.svc.<domain>` in args
//!   and env is replaced by that address, and `0.0.0.0` by the pod's own address (a pod's
//!   network namespace holds only its own IP, so binding all interfaces there binds just it).
//!   Ports stay as the StatefulSet says (7070, 7071, 9090).
//! - **Volumes.** Each `volumeMount` path is a per-pod directory under the test's temp dir: the
//!   claim (`data`) survives pod restarts and is deleted on scale-in (the StatefulSet's
//!   `whenScaled: Delete`), the ConfigMap volume holds the ConfigMap's files, an `emptyDir` is
//!   fresh per pod start. Args and env values under a mount path are rewritten to that dir.
//!
//! A pod is ready when its agent answers `grpc.health.v1` SERVING on the client port (the
//! StatefulSet's readiness probe). Its revision is a hash of the pod template, as the
//! StatefulSet controller's `controller-revision-hash`.

use std::collections::{BTreeMap, hash_map::DefaultHasher};
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use k8s_openapi::api::{apps::v1::StatefulSet, core::v1::ConfigMap};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sluice_operator::day2::{PodState, agents::AgentAddresses};
use sluice_operator::names::{GRPC_PORT, Names, PEER_PORT};

/// How long an agent may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Newest stderr lines kept per pod, dumped when the test fails.
const LOG_LINES_MAX: usize = 4000;
/// Highest ordinal whose DNS name is rewritten.
const ORDINALS_MAX: i32 = 16;

/// The `sluice-agent` binary, built once per test run.
pub fn agent_binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| crate::support::workspace_binary("sluice-agent", "sluice-agent"))
}

/// Pod `ordinal`'s loopback address.
pub fn pod_ip(ordinal: i32) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        0,
        77,
        10 + u8::try_from(ordinal).expect("small ordinal"),
    )
}

/// The emulated pod network's addresses for the day-2 calls: the same mapping as the env.
pub struct LoopbackAddresses {
    /// Ordinals of ready pods, the client Service's endpoints.
    pub ready: Vec<i32>,
}

impl AgentAddresses for LoopbackAddresses {
    fn cluster(&self) -> String {
        // The client Service picks any ready pod.
        let first = self.ready.first().copied().unwrap_or(0);
        format!("{}:{GRPC_PORT}", pod_ip(first))
    }
    fn client(&self, ordinal: i32) -> String {
        format!("{}:{GRPC_PORT}", pod_ip(ordinal))
    }
    fn peer(&self, ordinal: i32) -> String {
        format!("{}:{PEER_PORT}", pod_ip(ordinal))
    }
}

/// One running pod.
struct Pod {
    child: Child,
    revision: String,
    log: Arc<Mutex<Vec<String>>>,
}

/// The StatefulSet controller and kubelet of one StatefulSet.
pub struct Kubelet {
    root: PathBuf,
    names: Names,
    cluster_domain: String,
    configmap: ConfigMap,
    statefulset: StatefulSet,
    pods: BTreeMap<i32, Pod>,
    /// Stderr of pods that ended, kept for the failure dump.
    ended_logs: Vec<(i32, Vec<String>)>,
    /// Every `preStop` hook run: the pod and its exit code (`None`: did not run or killed).
    pre_stops: Vec<(i32, Option<i32>)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The revision of `sts`'s pod template (what `controller-revision-hash` identifies).
pub fn template_revision(sts: &StatefulSet) -> String {
    let template = serde_json::to_string(&sts.spec.as_ref().expect("spec").template)
        .expect("template serializes");
    let mut h = DefaultHasher::new();
    template.hash(&mut h);
    format!("{:016x}", h.finish())
}

impl Kubelet {
    /// A kubelet for `statefulset` under `root`; starts no pod yet.
    pub fn new(
        root: &Path,
        names: Names,
        cluster_domain: &str,
        configmap: ConfigMap,
        statefulset: StatefulSet,
    ) -> Self {
        Self {
            root: root.to_path_buf(),
            names,
            cluster_domain: cluster_domain.to_owned(),
            configmap,
            statefulset,
            pods: BTreeMap::new(),
            ended_logs: Vec::new(),
            pre_stops: Vec::new(),
        }
    }

    /// The StatefulSet as last applied.
    pub fn statefulset(&self) -> &StatefulSet {
        &self.statefulset
    }

    /// Applies a new version of the StatefulSet (replicas and/or template); pods follow at the
    /// next [`Kubelet::sync`], `OnDelete`: a changed template restarts nobody by itself.
    pub fn apply(&mut self, statefulset: StatefulSet) {
        self.statefulset = statefulset;
    }

    /// The StatefulSet's `spec.replicas`.
    pub fn replicas(&self) -> i32 {
        self.statefulset
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(0)
    }

    /// The StatefulSet controller's pass: pods missing below `replicas` are created (all at
    /// once, `Parallel`), pods at or above it are stopped and their claims deleted.
    pub fn sync(&mut self) {
        let replicas = self.replicas();
        let extra: Vec<i32> = self
            .pods
            .keys()
            .copied()
            .filter(|&i| i >= replicas)
            .collect();
        for i in extra {
            self.stop(i);
            let claim = self.pod_dir(i).join("data");
            std::fs::remove_dir_all(&claim)
                .unwrap_or_else(|e| panic!("delete claim of pod {i} ({}): {e}", claim.display()));
        }
        let starting: Vec<i32> = (0..replicas)
            .filter(|i| !self.pods.contains_key(i))
            .collect();
        let spawned: Vec<(i32, Result<Pod, String>)> =
            starting.iter().map(|&i| (i, self.spawn(i))).collect();
        // Every pod is awaited before a failure is reported, so the dump shows the peers of a
        // pod that could not start too (a pod alone cannot form the cluster).
        let mut failures = Vec::new();
        for (i, pod) in spawned {
            match pod.and_then(|p| self.await_listening(i, p)) {
                Ok(pod) => {
                    self.pods.insert(i, pod);
                }
                Err(e) => failures.push(format!("pod {i}: {e}")),
            }
        }
        if !failures.is_empty() {
            self.dump_logs(60);
            panic!("{}", failures.join("\n"));
        }
    }

    /// Deletes pod `i` as the API would: the container's `preStop` hook, SIGTERM, wait for it
    /// to exit (the hook and the exit within the pod's grace period), gone. The next
    /// [`Kubelet::sync`] recreates it from the current template.
    pub fn delete_pod(&mut self, i: i32) {
        self.stop(i);
    }

    fn stop(&mut self, i: i32) {
        let Some(mut pod) = self.pods.remove(&i) else {
            return;
        };
        let grace = self
            .statefulset
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.termination_grace_period_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(30);
        let deadline = std::time::Instant::now() + Duration::from_secs(grace);
        self.run_pre_stop(i, &pod);
        if let Ok(pid) = i32::try_from(pod.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        loop {
            match pod.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = pod.child.kill();
                    let _ = pod.child.wait();
                    break;
                }
            }
        }
        self.ended_logs.push((i, lock(&pod.log).clone()));
    }

    /// Runs the container's `preStop` exec command with the pod's env, as the kubelet does
    /// before SIGTERM; like the kubelet, a failing hook is logged and the pod stops anyway.
    fn run_pre_stop(&mut self, i: i32, pod: &Pod) {
        let spec = self.statefulset.spec.as_ref().expect("spec");
        let container = &spec.template.spec.as_ref().expect("pod spec").containers[0];
        let Some(command) = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.clone())
        else {
            return;
        };
        assert_eq!(
            command.first().map(String::as_str),
            Some(sluice_operator::builders::statefulset::AGENT_COMMAND),
            "the hook runs the image's agent binary"
        );
        // The running pod's volumes, without recreating them (an emptyDir is wiped on start).
        let mounts = self.mounts(|name| self.pod_dir(i).join(name));
        let env = self.env_of(i, &mounts);
        let argv: Vec<String> = command
            .iter()
            .map(|a| self.rewrite(i, a, &mounts))
            .collect();
        let started = std::time::Instant::now();
        let output = Command::new(agent_binary())
            .args(&argv[1..])
            .env_clear()
            .envs(env)
            .output();
        self.pre_stops
            .push((i, output.as_ref().ok().and_then(|o| o.status.code())));
        let line = match output {
            Ok(out) => format!(
                "[preStop] exit {:?} after {:?}: {}{}",
                out.status.code(),
                started.elapsed(),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => format!("[preStop] did not run: {e}"),
        };
        eprintln!("kubelet: pod {i}: {line}");
        lock(&pod.log).push(line);
    }

    /// Every `preStop` hook the harness ran, in order: the pod and the hook's exit code.
    pub fn pre_stops(&self) -> &[(i32, Option<i32>)] {
        &self.pre_stops
    }

    fn pod_dir(&self, i: i32) -> PathBuf {
        self.root.join(format!("pod-{i}"))
    }

    /// Host directory of each volume of pod `i`, created (the claim kept across restarts, an
    /// emptyDir fresh, a ConfigMap volume with its files).
    fn volumes(&self, i: i32) -> BTreeMap<String, PathBuf> {
        let spec = self.statefulset.spec.as_ref().expect("spec");
        let pod = spec.template.spec.as_ref().expect("pod spec");
        let dir = self.pod_dir(i);
        let mut out = BTreeMap::new();
        for claim in spec.volume_claim_templates.iter().flatten() {
            let name = claim.metadata.name.clone().expect("claim template name");
            let path = dir.join(&name);
            std::fs::create_dir_all(&path).expect("claim dir");
            out.insert(name, path);
        }
        for volume in pod.volumes.iter().flatten() {
            let path = dir.join(&volume.name);
            if volume.empty_dir.is_some() {
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).expect("emptyDir");
            } else if let Some(cm) = &volume.config_map {
                assert_eq!(
                    Some(&cm.name),
                    self.configmap.metadata.name.as_ref(),
                    "the pod mounts the operator's ConfigMap"
                );
                std::fs::create_dir_all(&path).expect("configMap dir");
                for (key, value) in self.configmap.data.iter().flatten() {
                    std::fs::write(path.join(key), value).expect("configMap file");
                }
            } else {
                panic!(
                    "volume {} has a source the harness does not emulate",
                    volume.name
                );
            }
            out.insert(volume.name.clone(), path);
        }
        out
    }

    /// Rewrites one expanded value for pod `i`'s network and volumes.
    fn rewrite(&self, i: i32, value: &str, mounts: &[(String, PathBuf)]) -> String {
        let mut out = value.to_owned();
        for (mount, host) in mounts {
            if out == *mount || out.starts_with(&format!("{mount}/")) {
                out = format!("{}{}", host.display(), &out[mount.len()..]);
                break;
            }
        }
        // Longest ordinals first, so `orders-1.` never matches inside `orders-12.`.
        for j in (0..ORDINALS_MAX).rev() {
            out = out.replace(
                &self.names.pod_host(j, &self.cluster_domain),
                &pod_ip(j).to_string(),
            );
        }
        out.replace("0.0.0.0", &pod_ip(i).to_string())
    }

    /// Each mount path of the agent container with its host directory (`host(volume name)`).
    fn mounts(&self, host: impl Fn(&str) -> PathBuf) -> Vec<(String, PathBuf)> {
        let spec = self.statefulset.spec.as_ref().expect("spec");
        let container = &spec.template.spec.as_ref().expect("pod spec").containers[0];
        container
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.mount_path.clone(), host(&m.name)))
            .collect()
    }

    /// The container env of pod `i`, as the kubelet resolves it, rewritten.
    fn env_of(&self, i: i32, mounts: &[(String, PathBuf)]) -> Vec<(String, String)> {
        let spec = self.statefulset.spec.as_ref().expect("spec");
        let container = &spec.template.spec.as_ref().expect("pod spec").containers[0];
        let pod_name = format!("{}-{i}", self.names.statefulset());
        let mut resolved: Vec<(String, String)> = Vec::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => {
                    let mut v = v.clone();
                    for (name, earlier) in &resolved {
                        v = v.replace(&format!("$({name})"), earlier);
                    }
                    v
                }
                (None, Some(from)) => {
                    match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                        Some("metadata.name") => pod_name.clone(),
                        Some("metadata.namespace") => self.names.namespace.clone(),
                        other => panic!("{}: env source {other:?} is not emulated", var.name),
                    }
                }
                (None, None) => String::new(),
            };
            resolved.push((var.name.clone(), value));
        }
        resolved
            .into_iter()
            .map(|(k, v)| {
                let v = self.rewrite(i, &v, mounts);
                (k, v)
            })
            .collect()
    }

    /// The command line and env of pod `i`, as the kubelet resolves them, rewritten.
    pub fn command_of(&self, i: i32) -> (Vec<String>, Vec<(String, String)>) {
        let spec = self.statefulset.spec.as_ref().expect("spec");
        let container = &spec.template.spec.as_ref().expect("pod spec").containers[0];
        let volumes = self.volumes(i);
        let mounts = self.mounts(|name| {
            volumes
                .get(name)
                .unwrap_or_else(|| panic!("mount {name} has no volume"))
                .clone()
        });
        let env = self.env_of(i, &mounts);
        let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
        argv.extend(container.args.clone().unwrap_or_default());
        let argv = argv.iter().map(|a| self.rewrite(i, a, &mounts)).collect();
        (argv, env)
    }

    fn spawn(&self, i: i32) -> Result<Pod, String> {
        let (argv, env) = self.command_of(i);
        assert_eq!(
            argv[0],
            sluice_operator::builders::statefulset::AGENT_COMMAND
        );
        let mut command = Command::new(agent_binary());
        command
            .args(&argv[1..])
            .env_clear()
            .envs(env)
            // Readable logs in a failure dump; the StatefulSet asks for JSON.
            .env(
                "SLUICE_LOG_LEVEL",
                "info,openraft=error,h2=warn,tower=warn,hyper=warn",
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|e| format!("spawn: {e}"))?;
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = lock(&log);
                    if log.len() >= LOG_LINES_MAX {
                        log.drain(..LOG_LINES_MAX / 2);
                    }
                    log.push(line);
                }
            });
        }
        Ok(Pod {
            child,
            revision: template_revision(&self.statefulset),
            log,
        })
    }

    fn await_listening(&self, i: i32, mut pod: Pod) -> Result<Pod, String> {
        let stdout = pod.child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) if line.starts_with("sluice-agent listening ") => Ok(pod),
            other => {
                let _ = pod.child.kill();
                let status = pod.child.wait().map(|s| s.to_string()).unwrap_or_default();
                let tail = lock(&pod.log)
                    .iter()
                    .rev()
                    .take(30)
                    .rev()
                    .cloned()
                    .collect::<Vec<_>>();
                Err(format!(
                    "pod {i} did not start ({other:?}, {status}); stderr tail:\n{}",
                    tail.join("\n")
                ))
            }
        }
    }

    /// Every pod as the operator would list it, ready when its agent answers health checks.
    pub async fn pod_states(&mut self) -> Vec<PodState> {
        let mut out = Vec::new();
        for (&i, pod) in &mut self.pods {
            let running = matches!(pod.child.try_wait(), Ok(None));
            let ready = running && is_serving(i).await;
            out.push(PodState {
                ordinal: i,
                ready,
                revision: Some(pod.revision.clone()),
            });
        }
        out
    }

    /// `http://<ip>:7070` of every running pod.
    pub fn endpoints(&self) -> Vec<String> {
        self.pods
            .keys()
            .map(|&i| format!("http://{}:{GRPC_PORT}", pod_ip(i)))
            .collect()
    }

    /// Prints the last `n` stderr lines of every pod, ended ones included.
    pub fn dump_logs(&self, n: usize) {
        let running = self.pods.iter().map(|(i, p)| (*i, lock(&p.log).clone()));
        for (i, log) in self.ended_logs.iter().cloned().chain(running) {
            eprintln!("---- pod {i} stderr (last {n} lines) ----");
            for line in log.iter().skip(log.len().saturating_sub(n)) {
                eprintln!("[pod {i}] {line}");
            }
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs(40);
        }
        for pod in self.pods.values_mut() {
            let _ = pod.child.kill();
            let _ = pod.child.wait();
        }
    }
}

/// The readiness probe: `grpc.health.v1.Health/Check` on the pod's client port.
async fn is_serving(i: i32) -> bool {
    crate::support::grpc_serving(&format!("http://{}:{GRPC_PORT}", pod_ip(i))).await
}
