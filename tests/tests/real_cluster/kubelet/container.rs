//! One container of a pod run as a local process: the program its image names, its
//! environment, its restarts after an exit, and its stop (`preStop`, SIGTERM, SIGKILL).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use super::{NODE, RESTART_BACKOFF, lock, now};

/// A container's process and what the kubelet knows of it.
pub(super) struct ContainerProcess {
    /// The container's name.
    pub name: String,
    image: String,
    /// A native sidecar: an init container with `restartPolicy: Always`, started before the
    /// main containers and stopped after them.
    pub sidecar: bool,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    hosts: PathBuf,
    ip: Ipv4Addr,
    child: Option<Child>,
    /// Times it was restarted after an exit.
    pub restarts: i32,
    started_at: String,
    exited_at: Option<Instant>,
    /// Its startup probe passed (or it has none and runs).
    pub started: bool,
    /// Its readiness probe passes (or it has none and has started).
    pub ready: bool,
    startup_port: Option<i32>,
    readiness_port: Option<i32>,
    pre_stop: Option<Vec<String>>,
}

impl ContainerProcess {
    /// A container not started yet, with its command line and env already resolved.
    pub fn new(
        container: &Container,
        sidecar: bool,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        dir: &Path,
        hosts: PathBuf,
        ip: Ipv4Addr,
    ) -> ContainerProcess {
        let grpc_port = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
            probe.as_ref()?.grpc.as_ref().map(|g| g.port)
        };
        ContainerProcess {
            name: container.name.clone(),
            image: container.image.clone().unwrap_or_default(),
            sidecar,
            argv,
            env,
            log: dir.join(format!("{}.log", container.name)),
            hosts,
            ip,
            child: None,
            restarts: 0,
            started_at: String::new(),
            exited_at: None,
            started: false,
            ready: false,
            startup_port: grpc_port(&container.startup_probe),
            readiness_port: grpc_port(&container.readiness_probe),
            pre_stop: container
                .lifecycle
                .as_ref()
                .and_then(|l| l.pre_stop.as_ref())
                .and_then(|h| h.exec.as_ref())
                .and_then(|e| e.command.clone()),
        }
    }

    /// Whether it was ever started.
    pub fn spawned(&self) -> bool {
        self.child.is_some()
    }

    /// Starts (or restarts) the process in a mount namespace of its own whose `/etc/hosts` is
    /// the pod's namespace's hosts file.
    pub fn spawn(&mut self) -> Result<(), String> {
        let binary = program(&self.argv[0])?;
        let (binary, args) =
            super::super::process::with_hosts_file(&self.hosts, &binary, &self.argv[1..]);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("open {}: {e}", self.log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .args(&args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.argv[0]))?;
        if self.child.is_some() {
            self.restarts += 1;
        }
        self.child = Some(child);
        self.started_at = now();
        self.exited_at = None;
        self.started = false;
        self.ready = false;
        Ok(())
    }

    /// The command line, for messages.
    pub fn command_line(&self) -> String {
        self.argv.join(" ")
    }

    /// Notes an exit; restarts the container once its backoff has passed (every pod the tests
    /// run has `restartPolicy: Always`, and native sidecars always restart). Returns whether
    /// anything changed.
    pub fn poll(&mut self) -> Result<bool, String> {
        let Some(child) = self.child.as_mut() else {
            return Ok(false);
        };
        let exited = child.try_wait().ok().flatten().is_some();
        if !exited {
            return Ok(false);
        }
        match self.exited_at {
            None => {
                self.exited_at = Some(Instant::now());
                self.started = false;
                self.ready = false;
                Ok(true)
            }
            Some(at) if at.elapsed() >= RESTART_BACKOFF => self.spawn().map(|()| true),
            Some(_) => Ok(false),
        }
    }

    /// Whether its process runs.
    pub fn running(&self) -> bool {
        self.child.is_some() && self.exited_at.is_none()
    }

    /// The gRPC endpoints of its startup probe (until it passed) and readiness probe.
    pub fn probes(&self) -> (Option<String>, Option<String>) {
        let at = |port: Option<i32>| port.map(|p| format!("http://{}:{p}", self.ip));
        let startup = if self.started {
            None
        } else {
            at(self.startup_port)
        };
        (startup, at(self.readiness_port))
    }

    /// Records what the probes answered (`None`: no such probe).
    pub fn probed(&mut self, startup: Option<bool>, readiness: Option<bool>) {
        if !self.running() {
            return;
        }
        if !self.started {
            self.started = startup.unwrap_or(true);
        }
        self.ready = self.started && readiness.unwrap_or(true);
    }

    /// The `containerStatuses` (or `initContainerStatuses`) entry.
    pub fn status(&self) -> Value {
        let state = match (&self.child, self.exited_at) {
            (None, _) => json!({"waiting": {"reason": "PodInitializing"}}),
            (Some(_), Some(_)) => {
                json!({"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": now()}})
            }
            (Some(_), None) => json!({"running": {"startedAt": self.started_at}}),
        };
        json!({
            "name": self.name, "image": self.image, "imageID": "",
            "containerID": format!("process://{}", self.log.display()),
            "ready": self.ready, "started": self.started, "restartCount": self.restarts,
            "state": state,
        })
    }

    /// Runs the `preStop` hook (with the container's env; a failing hook is logged and the
    /// container stops anyway, as the kubelet does), then sends SIGTERM. Blocking.
    pub fn terminate(&mut self, pod: &str) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        if let Some(command) = &self.pre_stop {
            let argv: Vec<String> = command
                .iter()
                .map(|a| a.replace("0.0.0.0", &self.ip.to_string()))
                .collect();
            let outcome = program(&argv[0]).and_then(|bin| {
                Command::new(bin)
                    .args(&argv[1..])
                    .env_clear()
                    .envs(self.env.iter().map(|(k, v)| (k, v)))
                    .output()
                    .map_err(|e| e.to_string())
            });
            match outcome {
                Ok(out) => eprintln!(
                    "kubelet: {pod}/{}: preStop exit {:?}: {}{}",
                    self.name,
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("kubelet: {pod}/{}: preStop did not run: {e}", self.name),
            }
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }

    /// Waits for the process to exit until `deadline`, then kills it. Blocking.
    pub fn wait_exit(&mut self, deadline: Instant) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    /// Kills the process at once (the kubelet itself going away).
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The workspace binary an image names (`ghcr.io/sluice-dev/sluice-agent:0.1.0` → `sluice-agent`).
pub(super) fn image_binary(image: &str) -> &str {
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

/// `$(VAR)` references to earlier variables, as the kubelet expands them.
pub(super) fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = value.to_owned();
    for (name, earlier) in env {
        out = out.replace(&format!("$({name})"), earlier);
    }
    out
}

/// The container's environment: `PATH` with the image's program first (so a shell script in
/// the CLI image can call `sluice`), then its `env` with `$(VAR)` and `fieldRef` resolved.
pub(super) fn resolve_env(
    pod: &Pod,
    container: &Container,
    ip: Ipv4Addr,
) -> Result<Vec<(String, String)>, String> {
    let image = program(image_binary(container.image.as_deref().unwrap_or_default()))?;
    let image_dir = image.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut resolved: Vec<(String, String)> = vec![(
        "PATH".to_owned(),
        format!("{}:/usr/local/bin:/usr/bin:/bin", image_dir.display()),
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
