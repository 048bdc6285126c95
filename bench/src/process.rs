//! Spawning, probing and stopping the server processes under test.
//!
//! Every server runs in its own process group so that stopping it also stops what it started
//! (the Erlang VM under `rabbitmq-server`'s shell script) and nothing else. Output goes to a log
//! file in the server's temporary directory, which error messages name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use crate::memory::Memory;
use crate::{Error, Result};

/// How long a server gets to exit after SIGTERM before its group is killed.
const STOP_GRACE_SECS: u64 = 20;

/// A running server process (and its process group).
#[derive(Debug)]
pub struct ServerProcess {
    /// Name used in messages (`redis-server`).
    name: String,
    /// The group leader.
    child: Child,
    /// Its pid, which is also the process group id.
    pid: u32,
    /// Where stdout/stderr go.
    log: PathBuf,
    /// Set once `stop` has reaped the group, so `Drop` has nothing to do.
    stopped: bool,
}

impl ServerProcess {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Self> {
        let out = open_log(log)?;
        let err = out.try_clone().map_err(|source| Error::Io {
            path: log.into(),
            source,
        })?;
        command.stdout(out).stderr(err);
        Self::start(name, command, log)
    }

    /// Starts `command` with stdout piped back (for servers that announce their addresses
    /// there) and stderr appended to `log`.
    pub fn spawn_piped(
        name: &str,
        mut command: Command,
        log: &Path,
    ) -> Result<(Self, ChildStdout)> {
        let err = open_log(log)?;
        command.stdout(Stdio::piped()).stderr(err);
        let mut server = Self::start(name, command, log)?;
        let stdout = server.child.stdout.take().ok_or_else(|| Error::NotReady {
            server: name.into(),
            reason: "stdout was not captured".into(),
            log: log.into(),
        })?;
        Ok((server, stdout))
    }

    fn start(name: &str, mut command: Command, log: &Path) -> Result<Self> {
        command
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| Error::Spawn {
            program: name.into(),
            source,
        })?;
        let pid = child.id().ok_or_else(|| Error::NotReady {
            server: name.into(),
            reason: "exited immediately".into(),
            log: log.into(),
        })?;
        Ok(Self {
            name: name.into(),
            child,
            pid,
            log: log.into(),
            stopped: false,
        })
    }

    /// The server's pid (the root of the tree whose memory is measured).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The file that receives the server's output.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Current and peak resident memory of the server's process tree.
    pub fn memory(&self) -> Result<Memory> {
        Memory::of_tree(self.pid)
    }

    /// Fails when the server has exited, naming its exit status and log.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.not_ready(format!("exited with {status}"))),
            Err(source) => Err(Error::Io {
                path: self.log.clone(),
                source,
            }),
        }
    }

    /// An error saying the server is not ready because of `reason`.
    pub fn not_ready(&self, reason: impl Into<String>) -> Error {
        Error::NotReady {
            server: self.name.clone(),
            reason: reason.into(),
            log: self.log.clone(),
        }
    }

    /// Waits until a TCP connection to `addr` succeeds, failing early if the server exits.
    pub async fn wait_for_tcp(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!("nothing listens on {addr} after {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads `stdout` until a line starting with `prefix` and returns that line; the rest of
    /// stdout is then drained in the background so the server never blocks writing to it.
    pub async fn wait_for_line(
        &mut self,
        stdout: ChildStdout,
        prefix: &str,
        timeout: Duration,
    ) -> Result<String> {
        let mut lines = BufReader::new(stdout).lines();
        let found = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await.transpose() {
                match line {
                    Ok(line) if line.starts_with(prefix) => return Ok(Some(line)),
                    Ok(_) => continue,
                    Err(source) => {
                        return Err(Error::Io {
                            path: self.log.clone(),
                            source,
                        });
                    }
                }
            }
            Ok(None)
        })
        .await;
        match found {
            Ok(Ok(Some(line))) => {
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                Ok(line)
            }
            Ok(Ok(None)) => Err(self.not_ready(format!("stdout closed before {prefix:?}"))),
            Ok(Err(err)) => Err(err),
            Err(_) => {
                Err(self.not_ready(format!("no {prefix:?} line on stdout after {timeout:?}")))
            }
        }
    }

    /// Stops the server: SIGTERM to its group, then SIGKILL if it has not exited within
    /// [`STOP_GRACE_SECS`].
    pub async fn stop(mut self) {
        self.signal_group(Signal::SIGTERM);
        let grace = Duration::from_secs(STOP_GRACE_SECS);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.signal_group(Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
        // Children of the leader (an Erlang VM under its script) may outlive it.
        self.signal_group(Signal::SIGKILL);
        self.stopped = true;
    }

    /// Kills the server the way a crash would: SIGKILL to its group, no grace, then reaps it so
    /// that its ports and files are released when this returns.
    pub async fn kill(mut self) {
        self.signal_group(Signal::SIGKILL);
        let _ = self.child.wait().await;
        self.stopped = true;
    }

    fn signal_group(&self, signal: Signal) {
        if let Ok(pgid) = i32::try_from(self.pid) {
            // ESRCH (the group is already gone) is the outcome we want anyway.
            let _ = killpg(Pid::from_raw(pgid), signal);
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // A run that fails or is interrupted must not leave servers behind.
        if !self.stopped {
            self.signal_group(Signal::SIGKILL);
        }
    }
}

fn open_log(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
}

/// A loopback TCP port that was free a moment ago, for servers that cannot bind port 0 and
/// report it back. The window between release and reuse is the usual small race.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
        path: "127.0.0.1:0".into(),
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| Error::Io {
        path: "127.0.0.1:0".into(),
        source,
    })?;
    Ok(addr.port())
}

/// The first executable called `name` on `PATH`, or `name` itself when it is a path (absolute,
/// or relative with a `/` as a shell reads it) to an executable file.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let direct = Path::new(name);
    if direct.is_absolute() || name.contains('/') {
        return is_executable(direct).then(|| direct.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_is_found_on_path_and_a_made_up_program_is_not() {
        assert!(find_program("sh").is_some());
        assert!(find_program("no-such-program-sluice-bench").is_none());
    }

    #[test]
    fn a_relative_path_is_taken_as_a_path_not_looked_up_on_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let relative = dir.path().join("tool");
        std::fs::write(&relative, "#!/bin/sh\n").expect("writes");
        let mut mode = std::fs::metadata(&relative).expect("meta").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut mode, 0o755);
        std::fs::set_permissions(&relative, mode).expect("chmod");
        let cwd = std::env::current_dir().expect("cwd");
        let from_cwd = pathdiff(&relative, &cwd);
        assert_eq!(find_program(&from_cwd), Some(PathBuf::from(&from_cwd)));
        assert!(find_program("./no-such-program-sluice-bench").is_none());
    }

    /// `path` relative to `base` through the filesystem root (`../../tmp/x`).
    fn pathdiff(path: &Path, base: &Path) -> String {
        let ups = base.components().count().saturating_sub(1);
        let rest = path.strip_prefix("/").expect("absolute temp path");
        format!("{}{}", "../".repeat(ups), rest.display())
    }

    #[tokio::test]
    async fn a_server_announcing_itself_on_stdout_is_found_and_stopped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("server.log");
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "echo starting; echo 'ready at 1.2.3.4'; exec sleep 30",
        ]);
        let (mut server, stdout) = ServerProcess::spawn_piped("sh", command, &log).expect("spawns");
        let line = server
            .wait_for_line(stdout, "ready at", Duration::from_secs(5))
            .await
            .expect("announces");
        assert_eq!(line, "ready at 1.2.3.4");
        server.ensure_running().expect("still running");
        let pid = server.pid();
        server.stop().await;
        assert!(!Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid));
    }

    #[tokio::test]
    async fn a_server_that_exits_early_is_reported_with_its_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("server.log");
        let mut command = Command::new("sh");
        command.args(["-c", "echo boom >&2; exit 3"]);
        let mut server = ServerProcess::spawn("sh", command, &log).expect("spawns");
        let port = free_port().expect("free port");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let err = server
            .wait_for_tcp(addr, Duration::from_secs(5))
            .await
            .expect_err("exits");
        let text = err.to_string();
        assert!(
            text.contains("exit status: 3") && text.contains("server.log"),
            "{text}"
        );
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "boom\n");
    }

    fn is_zombie(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| stat.contains(") Z "))
    }
}
