//! `sluice local`: a cluster of `sluice-agent broker` processes on loopback (three by
//! default), data under a local directory, stopped together on Ctrl-C or SIGTERM.
//!
//! # Layout
//! - `plan`: the agents' ports, data directories and command lines.
//! - this file: start them, wait until they serve, print the endpoints, supervise, stop.

pub mod plan;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sluice_agent::shutdown;
use sluice_client::Client;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::args::Local;
use plan::AgentPlan;

/// How long an agent may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the agents may take to answer a first request once listening (cluster election).
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long agents may drain after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Log lines shown when an agent dies.
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

/// A started agent.
struct Running {
    plan: AgentPlan,
    pid: Pid,
    /// The client address it reported.
    grpc: String,
    /// The metrics address it reported.
    metrics: String,
    log: PathBuf,
}

/// Runs the agents until Ctrl-C (or SIGTERM), then stops them all; fails naming the agent
/// when one of them exits on its own.
pub async fn run(args: Local) -> anyhow::Result<()> {
    let plans = plan::plan(
        args.agents,
        &args.data_dir,
        args.listen,
        args.peer_listen,
        args.metrics_listen,
    )?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating --data-dir {}", args.data_dir.display()))?;
    let binary = agent_binary(args.agent_bin.as_deref())?;

    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let mut agents = Vec::new();
    for (index, plan) in plans.into_iter().enumerate() {
        match start(&binary, plan, &args.data_dir, index, exits_tx.clone()).await {
            Ok(agent) => agents.push(agent),
            Err(err) => {
                stop(&agents, &mut exits).await;
                return Err(err);
            }
        }
    }
    let ready = tokio::select! {
        ready = wait_serving(&agents) => ready,
        exit = exits.recv() => Err(died(&agents, exit)),
    };
    if let Err(err) = ready {
        stop(&agents, &mut exits).await;
        return Err(err);
    }
    print_usage(&agents, &args.data_dir);

    let outcome = tokio::select! {
        () = shutdown::signal() => Ok(()),
        exit = exits.recv() => Err(died(&agents, exit)),
    };
    stop(&agents, &mut exits).await;
    if outcome.is_ok() {
        println!("stopped");
    }
    outcome
}

/// The `sluice-agent` binary: `--agent-bin`, else the one next to this `sluice`, else `PATH`.
fn agent_binary(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = flag {
        return Ok(path.to_owned());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("sluice-agent")));
    Ok(match beside {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from("sluice-agent"),
    })
}

/// Spawns one agent and waits for its listening line; its exit is reported on `exits`.
async fn start(
    binary: &Path,
    plan: AgentPlan,
    data_dir: &Path,
    index: usize,
    exits: mpsc::UnboundedSender<(usize, std::io::Result<ExitStatus>)>,
) -> anyhow::Result<Running> {
    let log = plan.log_path(data_dir);
    let log_file = std::fs::File::create(&log)
        .with_context(|| format!("creating {}'s log {}", plan.name, log.display()))?;
    let mut command = Command::new(binary);
    command
        .args(plan.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
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
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
    let line = match first {
        Ok(Ok(Some(line))) => line,
        Ok(_) => {
            let status = child.wait().await;
            anyhow::bail!(
                "{} exited before listening ({}){}",
                plan.name,
                describe(&status),
                log_tail(&log)
            );
        }
        Err(_) => anyhow::bail!(
            "{} did not report listening within {START_TIMEOUT:?}{}",
            plan.name,
            log_tail(&log)
        ),
    };
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .map(str::to_owned)
            .with_context(|| format!("{} printed {line:?}, which has no {key}", plan.name))
    };
    let grpc = field("grpc=")?;
    let metrics = field("metrics=")?;
    tokio::spawn(async move {
        // Drain stdout so the agent never blocks on a full pipe, then report the exit.
        while let Ok(Some(_)) = lines.next_line().await {}
        let _ = exits.send((index, child.wait().await));
    });
    Ok(Running {
        plan,
        pid,
        grpc,
        metrics,
        log,
    })
}

/// Waits until every agent answers a request (in a cluster: once the agents found a leader).
async fn wait_serving(agents: &[Running]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + SERVE_TIMEOUT;
    for agent in agents {
        let endpoint = format!("http://{}", agent.grpc);
        loop {
            let attempt = async { Client::connect(&endpoint).await?.list_queues().await };
            match attempt.await {
                Ok(_) => break,
                Err(err) if tokio::time::Instant::now() >= deadline => {
                    anyhow::bail!(
                        "{} at {endpoint} did not serve within {SERVE_TIMEOUT:?}: {err}{}",
                        agent.plan.name,
                        log_tail(&agent.log)
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

/// Tells every agent to stop, waits for them to drain, and kills those that do not.
async fn stop(
    agents: &[Running],
    exits: &mut mpsc::UnboundedReceiver<(usize, std::io::Result<ExitStatus>)>,
) {
    for agent in agents {
        // An agent that already exited answers ESRCH; nothing to do then.
        let _ = kill(agent.pid, Signal::SIGTERM);
    }
    let _ = tokio::time::timeout(STOP_TIMEOUT, async {
        let mut left = agents.len();
        while left > 0 && exits.recv().await.is_some() {
            left -= 1;
        }
    })
    .await;
    for agent in agents {
        let _ = kill(agent.pid, Signal::SIGKILL);
    }
}

/// The error for an agent that exited on its own.
fn died(agents: &[Running], exit: Option<(usize, std::io::Result<ExitStatus>)>) -> anyhow::Error {
    let Some((index, status)) = exit else {
        return anyhow::anyhow!("lost track of the agents");
    };
    match agents.get(index) {
        Some(agent) => anyhow::anyhow!(
            "agent {} (pid {}) exited ({}){}",
            agent.plan.name,
            agent.pid,
            describe(&status),
            log_tail(&agent.log)
        ),
        None => anyhow::anyhow!("agent local-{index} exited ({})", describe(&status)),
    }
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(err) => format!("exit status unknown: {err}"),
    }
}

/// The last lines of an agent's log, as an indented block (empty when there is none).
fn log_tail(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    format!(
        "; {} ends with:\n    {}",
        log.display(),
        tail.join("\n    ")
    )
}

/// The listening line (first, for scripts and tests), then help for people.
fn print_usage(agents: &[Running], data_dir: &Path) {
    let Some(first) = agents.first() else {
        return;
    };
    let all: Vec<&str> = agents.iter().map(|a| a.grpc.as_str()).collect();
    println!(
        "sluice local listening grpc={} agents={} metrics={}",
        first.grpc,
        all.join(","),
        first.metrics
    );
    let endpoint = format!("http://{}", first.grpc);
    println!(
        "Sluice is running locally: {} agent{}, data in {}",
        agents.len(),
        if agents.len() == 1 { "" } else { "s" },
        data_dir.display()
    );
    println!("  endpoint  {endpoint}   (what apps and the CLI use, like a sidecar)");
    for agent in agents {
        println!(
            "  {}   grpc {}  metrics http://{}/metrics  log {}",
            agent.plan.name,
            agent.grpc,
            agent.metrics,
            agent.log.display()
        );
    }
    println!("Try, in another terminal:");
    let flag = if first.grpc.ends_with(":7070") {
        String::new()
    } else {
        format!(" --endpoint {endpoint}")
    };
    println!("  sluice{flag} declare orders");
    println!("  sluice{flag} publish orders hello world");
    println!("  sluice{flag} consume orders --count 2");
    println!("  sluice{flag} stats orders");
    println!("Press Ctrl-C to stop.");
}
