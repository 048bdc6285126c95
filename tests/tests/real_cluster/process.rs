//! One control-plane component run as a child process, its output kept in a log file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a component may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running component.
pub struct Component {
    /// Its name in messages ("etcd", "kube-apiserver", ...).
    pub name: String,
    child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Component {
    /// Starts `binary` with `args`, output appended to `<log_dir>/<name>.log`.
    pub fn start(name: &str, binary: &Path, args: &[String], log_dir: &Path) -> Component {
        Self::start_with_env(name, binary, args, &[], log_dir)
    }

    /// [`Component::start`] with extra environment variables.
    pub fn start_with_env(
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Component {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let err = out.try_clone().expect("clone the log file");
        let child = Command::new(binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", binary.display()));
        Component {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of its log.
    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; waits for the exit.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free TCP port on loopback (bound and released; the component binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `binary args` run in a private mount namespace whose `/etc/hosts` is `hosts` (bind-mounted,
/// so the file's later rewrites in place are seen): the process resolves the cluster's names
/// as a pod would. `unshare` and `sh` exec, so the process keeps the pid signals go to.
pub fn with_hosts_file(hosts: &Path, binary: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
    let mut wrapped: Vec<String> = [
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    wrapped.push(hosts.display().to_string());
    wrapped.push(binary.display().to_string());
    wrapped.extend(args.iter().cloned());
    (PathBuf::from("unshare"), wrapped)
}
