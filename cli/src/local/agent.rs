//! One agent of `sluice local` across its restarts: its process and what that reports, its
//! crash history, and the effects of the restart policy (`restart::decide`) on it.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::plan::AgentPlan;
use super::restart::{self, CRASH_LOOP_WINDOW, Crash, HISTORY_KEPT, Verdict};

/// Log lines shown when an agent fails.
const LOG_TAIL_LINES: usize = 10;

/// Cluster flags that `sluice local` sets itself, removed from the agents' environment so a
/// stray `SLUICE_PEERS` in the shell cannot turn a lone agent into a cluster member.
const CLUSTER_ENV: [&str; 6] = [
    "SLUICE_POD_NAME",
    "SLUICE_PEERS",
    "SLUICE_PEER_LISTEN",
    "SLUICE_ADVERTISE",
    "SLUICE_REPLICATION_FACTOR",
    "SLUICE_QUEUES_FILE",
];

/// What an agent's process tells the runner; `index` is the agent's place in the plan.
pub enum Report {
    /// It printed its listening line.
    Listening {
        /// Which agent.
        index: usize,
        /// The line, `sluice-agent listening grpc=<addr> metrics=<addr> ...`.
        line: String,
    },
    /// It exited.
    Exited {
        /// Which agent.
        index: usize,
        /// How it ended.
        status: std::io::Result<ExitStatus>,
    },
}

/// Where the runner reads every agent's reports.
pub type Reports = mpsc::UnboundedReceiver<Report>;

/// An agent the runner keeps running, across restarts.
pub struct Agent {
    /// What it runs as.
    pub plan: AgentPlan,
    /// Its log file (the agent's stderr).
    pub log: PathBuf,
    /// The client address it reported (empty until it first listens).
    pub grpc: String,
    /// The metrics address it reported (empty until it first listens).
    pub metrics: String,
    /// Its process: `None` from the runner's reading of its exit until its restart.
    pub process: Option<Process>,
    /// When it is due to be started again, after a crash.
    pub restart_at: Option<Instant>,
    /// Its latest crashes, oldest first, at most [`HISTORY_KEPT`].
    crashes: Vec<Crash>,
    /// How often it was restarted.
    restarts: u32,
}

/// One run of an agent.
pub struct Process {
    /// Its process id.
    pub pid: Pid,
    /// When it was started.
    pub started: Instant,
}

impl Agent {
    /// The agent of `plan`, not started yet.
    pub fn new(plan: AgentPlan, data_dir: &Path) -> Self {
        Self {
            log: plan.log_path(data_dir),
            plan,
            grpc: String::new(),
            metrics: String::new(),
            process: None,
            restart_at: None,
            crashes: Vec::new(),
            restarts: 0,
        }
    }

    /// Starts a run of the agent, `index` in the plan, which reports its listening line and
    /// its exit. A restart appends to the log, so the crash stays readable above the new run.
    pub fn start(
        &mut self,
        binary: &Path,
        index: usize,
        reports: &mpsc::UnboundedSender<Report>,
    ) -> anyhow::Result<()> {
        let (plan, log, append) = (&self.plan, &self.log, self.restarts > 0);
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(log)
            .with_context(|| format!("opening {}'s log {}", plan.name, log.display()))?;
        let mut command = Command::new(binary);
        command
            .args(plan.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            // A group of its own: a Ctrl-C at the terminal reaches the runner alone, which then
            // stops the agents in order, instead of every agent exiting at once like a crash.
            .process_group(0)
            .kill_on_drop(true);
        for key in CLUSTER_ENV {
            command.env_remove(key);
        }
        let mut child = command.spawn().with_context(|| {
            format!(
                "starting {} ({}); build it with `cargo build -p sluice-agent` or pass --agent-bin",
                plan.name,
                binary.display()
            )
        })?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
            .with_context(|| format!("{} has no process id", plan.name))?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let reports = reports.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            if let Ok(Some(line)) = lines.next_line().await {
                let _ = reports.send(Report::Listening { index, line });
                // Drain stdout so the agent never blocks on a full pipe.
                while let Ok(Some(_)) = lines.next_line().await {}
            }
            let status = child.wait().await;
            let _ = reports.send(Report::Exited { index, status });
        });
        self.process = Some(Process {
            pid,
            started: Instant::now(),
        });
        Ok(())
    }

    /// Takes the addresses from the first listening line. A metrics port of 0 is pinned to
    /// the one the agent picked, so a restart keeps the address the usage text printed.
    pub fn listened(&mut self, line: &str) -> anyhow::Result<()> {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(key))
                .map(str::to_owned)
                .with_context(|| format!("{} printed {line:?}, which has no {key}", self.plan.name))
        };
        let (grpc, metrics) = (field("grpc=")?, field("metrics=")?);
        if let Ok(addr) = metrics.parse() {
            self.plan.metrics_listen = addr;
        }
        self.grpc = grpc;
        self.metrics = metrics;
        Ok(())
    }

    /// A restarted agent listens again.
    pub fn back(&self) {
        if let Some(process) = &self.process {
            eprintln!(
                "sluice local: {} is back as pid {}, listening on {}",
                self.plan.name, process.pid, self.grpc
            );
        }
    }

    /// "local-1 (pid 42) was killed by signal 9 (SIGKILL) after running 3.2s".
    pub fn exit(&self, status: &std::io::Result<ExitStatus>) -> String {
        let how = match status {
            Ok(status) => match (status.code(), status.signal()) {
                (Some(code), _) => format!("exited with code {code}"),
                (None, Some(signal)) => format!(
                    "was killed by signal {signal} ({})",
                    Signal::try_from(signal).map_or("unknown", Signal::as_str)
                ),
                (None, None) => format!("exited ({status})"),
            },
            Err(err) => format!("exited, status unknown ({err})"),
        };
        match &self.process {
            Some(process) => format!(
                "{} (pid {}) {how} after running {:.1?}",
                self.plan.name,
                process.pid,
                process.started.elapsed()
            ),
            None => format!("{} {how}", self.plan.name),
        }
    }

    /// Records a crash (`what` says which run ended how) and schedules the restart the
    /// policy decides, or fails when the agent is crash-looping.
    pub fn crashed(&mut self, what: String) -> anyhow::Result<()> {
        let now = Instant::now();
        let ran = self
            .process
            .take()
            .map_or(Duration::ZERO, |p| now - p.started);
        if self.crashes.len() == HISTORY_KEPT {
            self.crashes.remove(0);
        }
        self.crashes.push(Crash {
            at: now.into_std(),
            ran,
        });
        match restart::decide(&self.crashes) {
            Verdict::Restart { delay } => {
                self.restarts += 1;
                self.restart_at = Some(now + delay);
                eprintln!(
                    "sluice local: {what}; restarting it in {delay:?} (restart {}), its log is {}",
                    self.restarts,
                    self.log.display()
                );
                Ok(())
            }
            Verdict::GiveUp { crashes } => anyhow::bail!(
                "{what}; {} crashed {crashes} times within {CRASH_LOOP_WINDOW:?}, so sluice \
                 local gives up and stops all agents{}",
                self.plan.name,
                self.log_tail()
            ),
        }
    }

    /// The last lines of its log, as an indented block (empty when there is none).
    pub fn log_tail(&self) -> String {
        let Ok(text) = std::fs::read_to_string(&self.log) else {
            return String::new();
        };
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            return String::new();
        }
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!(
            "; {} ends with:\n    {}",
            self.log.display(),
            tail.join("\n    ")
        )
    }
}
