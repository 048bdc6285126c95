//! `sluice`: the command line of the Sluice message queue.
//!
//! Exit codes: 0 success, 1 a runtime error (the message names the cause, e.g.
//! `error: queue "x" not found (NOT_FOUND)`), 2 a usage error (clap names the flag).
//!
//! # Layout
//! - `args`: subcommands, flags and the parsers of human durations and sizes.
//! - `commands`: the subcommands that call an agent through `sluice-client`.
//! - `local`: `sluice local`, a cluster of agent processes on loopback.
//! - `cluster`: `sluice cluster`, the membership of a cluster (`sluice.v1.Membership`).

mod args;
mod cluster;
mod commands;
mod local;

use std::process::ExitCode;

use clap::Parser;
use sluice_client::Client;

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout went away (`sluice queues | head -1`): what it wanted was
        // printed, as with any Unix filter; no error to report.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `err` is a write to stdout that failed with EPIPE. Only a bare `io::Error` counts:
/// the commands pass stdout's errors up unwrapped, while a broken connection to an agent
/// arrives wrapped in the client's error and must still be reported.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let endpoint = cli.endpoint;
    match cli.command {
        Command::Local(args) => {
            // Agents log to files; this process logs (little) to stderr, so stdout stays the
            // listening line and the usage text.
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            local::run(args).await
        }
        Command::Declare(args) => commands::declare(&connect(endpoint).await?, args).await,
        Command::Publish(args) => commands::publish(&connect(endpoint).await?, args).await,
        Command::Consume(args) => commands::consume(&connect(endpoint).await?, args).await,
        Command::Stats { queue } => commands::stats(&connect(endpoint).await?, &queue).await,
        Command::Queues => commands::queues(&connect(endpoint).await?).await,
        Command::Delete { queue, if_empty } => {
            commands::delete(&connect(endpoint).await?, &queue, if_empty).await
        }
        Command::Cluster(command) => cluster::run(&endpoint, command).await,
    }
}

async fn connect(endpoint: String) -> anyhow::Result<Client> {
    let endpoints: Vec<&str> = endpoint
        .split(',')
        .filter(|e| !e.trim().is_empty())
        .collect();
    Ok(Client::connect_any(&endpoints).await?)
}
