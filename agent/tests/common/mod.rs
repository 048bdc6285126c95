//! Spawns the real `sluice-agent` binary on `127.0.0.1:0` with a data directory, finds its ports
//! from the listening line, and kills it on drop.

#![allow(dead_code)] // Each test binary uses a different part of this helper.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sluice_client::Client;
use sluice_client::proto::{Delivery, Message, QueueSpec};

/// How long an agent may take to print its listening line (recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running agent process.
pub struct AgentProcess {
    child: Child,
    /// The gRPC address.
    pub grpc: SocketAddr,
    /// The `/metrics` address.
    pub metrics: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
}

/// The agent binary under test.
pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice-agent")
}

/// Runs the agent to completion with `args` (for flag and data-dir errors).
pub fn run_agent(args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .output()
        .expect("the agent binary runs")
}

impl AgentProcess {
    /// Starts an agent on `data_dir`; panics with its stderr if it does not come up.
    pub fn spawn(data_dir: &Path) -> Self {
        Self::try_spawn(data_dir).unwrap_or_else(|err| panic!("agent did not start: {err}"))
    }

    /// Starts an agent on `data_dir`, or returns why it exited.
    pub fn try_spawn(data_dir: &Path) -> Result<Self, String> {
        Self::try_spawn_with_env(data_dir, &[])
    }

    /// Like [`AgentProcess::try_spawn`], with extra `SLUICE_*` variables in its environment.
    pub fn try_spawn_with_env(
        data_dir: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self, String> {
        let mut child = Command::new(agent_bin())
            .envs(env.iter().copied())
            .args([
                "broker",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--log-level", "warn"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining so the agent never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            _ => {
                let _ = child.kill();
                let output = child.wait_with_output().map_err(|e| e.to_string())?;
                return Err(format!(
                    "status {:?}, stderr: {}",
                    output.status.code(),
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        };
        // Forward the agent's stderr to ours so failing tests show its logs.
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[agent] {line}");
                }
            });
        }
        let (grpc, metrics) =
            parse_listening_line(&line).ok_or_else(|| format!("unexpected first line {line:?}"))?;
        Ok(Self {
            child,
            grpc,
            metrics,
            data_dir: data_dir.to_owned(),
        })
    }

    /// `http://<grpc addr>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// A connected client.
    pub async fn client(&self) -> Client {
        Client::connect(self.endpoint())
            .await
            .expect("client connects")
    }

    /// The agent's process id.
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"))
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    }

    /// Waits for the process to exit, at most `timeout`. Async so the test's runtime keeps
    /// driving its client connections, which the agent's graceful drain talks to.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "agent did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `sluice-agent listening grpc=<addr> metrics=<addr>`.
pub fn parse_listening_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.strip_prefix("sluice-agent listening ")?;
    let mut grpc = None;
    let mut metrics = None;
    for field in rest.split_whitespace() {
        match field.split_once('=')? {
            ("grpc", addr) => grpc = addr.parse().ok(),
            ("metrics", addr) => metrics = addr.parse().ok(),
            _ => {}
        }
    }
    Some((grpc?, metrics?))
}

/// A queue spec with defaults and `partitions`.
pub fn queue(name: &str, partitions: u32) -> QueueSpec {
    QueueSpec {
        name: name.into(),
        partitions,
        ..Default::default()
    }
}

/// A message with a text payload.
pub fn text(payload: &str) -> Message {
    Message {
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// The payload of a delivery as text.
pub fn payload(delivery: &Delivery) -> String {
    let bytes = delivery
        .message
        .as_ref()
        .map(|m| m.payload.clone())
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The next delivery within `timeout`, or `None`.
pub async fn next_within(
    consumer: &mut sluice_client::Consumer,
    timeout: Duration,
) -> Option<Delivery> {
    match tokio::time::timeout(timeout, consumer.next()).await {
        Ok(result) => result.expect("consume stream healthy"),
        Err(_) => None,
    }
}

/// Plain HTTP/1.1 GET against the metrics port: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics port");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("HTTP status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
