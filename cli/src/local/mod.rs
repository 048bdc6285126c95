//! `sluice local`: a cluster of `sluice-agent broker` processes on loopback (three by
//! default), data under a local directory, behind one endpoint. The runner supervises them
//! like a kubelet: an agent that exits on its own is started again with backoff while the
//! others keep serving (and the endpoint keeps answering through them), and only a crash loop
//! or Ctrl-C (SIGTERM) stops them all.
//!
//! # Layout
//! - `plan`: the agents' ports, data directories and command lines.
//! - `agent`: one agent across its restarts: start, exits, crash history.
//! - `restart`: when a crashed agent is started again and when the runner gives up (pure).
//! - `front`: the endpoint, passing each connection to the first agent that accepts it.
//! - this file: start the agents, wait until they serve, print the endpoints, supervise,
//!   stop.

mod agent;
mod front;
pub mod plan;
pub mod restart;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use sluice_agent::shutdown;
use sluice_client::Client;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::args::Local;
use agent::{Agent, Report, Reports};
use front::Front;

/// How long the agents may take to print their listening lines.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the agents may take to answer a first request once listening (cluster election).
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long agents may drain after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the agents until Ctrl-C (or SIGTERM), restarting those that crash, then stops them
/// all; fails naming the agent when one does not start or keeps crashing.
pub async fn run(args: Local) -> anyhow::Result<()> {
    let front = Front::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let endpoint = front.local_addr().context("the endpoint's address")?;
    let plans = plan::plan(
        args.agents,
        &args.data_dir,
        plan::first_agent_listen(args.listen)?,
        args.peer_listen,
        args.metrics_listen,
    )?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating --data-dir {}", args.data_dir.display()))?;
    let binary = agent_binary(args.agent_bin.as_deref())?;

    // Handlers first: the agents have process groups of their own (see `Agent::start`), so
    // a Ctrl-C that killed the runner by default would leave them running.
    let stop_signal = shutdown::signal();
    tokio::pin!(stop_signal);
    // The runner keeps a sender, so `recv` never ends: restarted agents report here too.
    let (report_tx, mut reports) = mpsc::unbounded_channel();
    let mut agents: Vec<Agent> = plans
        .into_iter()
        .map(|plan| Agent::new(plan, &args.data_dir))
        .collect();
    for index in 0..agents.len() {
        if let Err(err) = agents[index].start(&binary, index, &report_tx) {
            stop(&mut agents, &mut reports).await;
            return Err(err);
        }
    }
    // Until every agent serves, an exit is a failure to start, not a crash to restart.
    let ready = async {
        wait_listening(&mut agents, &mut reports).await?;
        tokio::select! {
            ready = wait_serving(&agents) => ready,
            report = reports.recv() => Err(exited_early(&agents, report)),
        }
    };
    // `None`: told to stop while starting.
    let started = tokio::select! {
        ready = ready => Some(ready),
        () = &mut stop_signal => None,
    };
    let outcome = match started {
        Some(Ok(())) => {
            let addresses = agents.iter().filter_map(|a| a.grpc.parse().ok()).collect();
            let serving = front.serve(addresses);
            print_usage(endpoint, &agents, &args.data_dir);
            let outcome =
                supervise(&mut agents, &binary, &mut reports, &report_tx, stop_signal).await;
            serving.abort();
            outcome
        }
        Some(Err(err)) => Err(err),
        None => Ok(()),
    };
    stop(&mut agents, &mut reports).await;
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

/// Waits for every agent's listening line and takes its addresses from it.
async fn wait_listening(agents: &mut [Agent], reports: &mut Reports) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while let Some(waiting) = agents.iter().position(|a| a.grpc.is_empty()) {
        match tokio::time::timeout_at(deadline, reports.recv()).await {
            Ok(Some(Report::Listening { index, line })) => agents[index].listened(&line)?,
            Ok(report) => return Err(exited_early(agents, report)),
            Err(_) => {
                let agent = &agents[waiting];
                anyhow::bail!(
                    "{} did not report listening within {START_TIMEOUT:?}{}",
                    agent.plan.name,
                    agent.log_tail()
                );
            }
        }
    }
    Ok(())
}

/// Waits until every agent answers a request (in a cluster: once the agents found a leader).
async fn wait_serving(agents: &[Agent]) -> anyhow::Result<()> {
    let deadline = Instant::now() + SERVE_TIMEOUT;
    for agent in agents {
        let endpoint = format!("http://{}", agent.grpc);
        loop {
            let attempt = async { Client::connect(&endpoint).await?.list_queues().await };
            match attempt.await {
                Ok(_) => break,
                Err(err) if Instant::now() >= deadline => {
                    anyhow::bail!(
                        "{} at {endpoint} did not serve within {SERVE_TIMEOUT:?}: {err}{}",
                        agent.plan.name,
                        agent.log_tail()
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

/// The error for an agent that exited before the cluster was up.
fn exited_early(agents: &[Agent], report: Option<Report>) -> anyhow::Error {
    let Some(Report::Exited { index, status }) = report else {
        return anyhow::anyhow!("lost track of the agents");
    };
    let agent = &agents[index];
    anyhow::anyhow!("{} while starting{}", agent.exit(&status), agent.log_tail())
}

/// The supervisor loop: restarts crashed agents when their backoff is over, until the stop
/// signal (`Ok`) or a crash loop (`Err`, naming the agent).
async fn supervise(
    agents: &mut [Agent],
    binary: &Path,
    reports: &mut Reports,
    report_tx: &mpsc::UnboundedSender<Report>,
    mut stop_signal: Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    loop {
        let due = agents.iter().filter_map(|a| a.restart_at).min();
        tokio::select! {
            () = &mut stop_signal => return Ok(()),
            Some(report) = reports.recv() => match report {
                Report::Listening { index, .. } => agents[index].back(),
                Report::Exited { index, status } => {
                    let agent = &mut agents[index];
                    let what = agent.exit(&status);
                    agent.crashed(what)?;
                }
            },
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                let now = Instant::now();
                for (index, agent) in agents.iter_mut().enumerate() {
                    if agent.restart_at.is_none_or(|at| at > now) {
                        continue;
                    }
                    agent.restart_at = None;
                    if let Err(err) = agent.start(binary, index, report_tx) {
                        agent.crashed(format!("{err:#}"))?;
                    }
                }
            }
        }
    }
}

/// Tells every running agent to stop, waits for them to drain, and kills those that do not.
async fn stop(agents: &mut [Agent], reports: &mut Reports) {
    for process in agents.iter().filter_map(|a| a.process.as_ref()) {
        // An agent that exited unseen answers ESRCH; nothing to do then.
        let _ = kill(process.pid, Signal::SIGTERM);
    }
    let _ = tokio::time::timeout(STOP_TIMEOUT, async {
        while agents.iter().any(|a| a.process.is_some()) {
            match reports.recv().await {
                Some(Report::Exited { index, .. }) => agents[index].process = None,
                Some(Report::Listening { .. }) => {}
                None => return,
            }
        }
    })
    .await;
    for process in agents.iter().filter_map(|a| a.process.as_ref()) {
        let _ = kill(process.pid, Signal::SIGKILL);
    }
}

/// The listening line (first, for scripts and tests), then help for people.
fn print_usage(endpoint: SocketAddr, agents: &[Agent], data_dir: &Path) {
    let Some(first) = agents.first() else {
        return;
    };
    let all: Vec<&str> = agents.iter().map(|a| a.grpc.as_str()).collect();
    println!(
        "sluice local listening grpc={endpoint} agents={} metrics={}",
        all.join(","),
        first.metrics
    );
    let endpoint = format!("http://{endpoint}");
    println!(
        "Sluice is running locally: {} agent{}, data in {}",
        agents.len(),
        if agents.len() == 1 { "" } else { "s" },
        data_dir.display()
    );
    println!(
        "  endpoint  {endpoint}   (what apps and the CLI use, like a sidecar; it answers while any agent runs)"
    );
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
    let flag = if endpoint.ends_with(":7070") {
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
