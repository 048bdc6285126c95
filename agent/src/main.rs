//! `sluice-agent`: the queue agent binary. Thin on purpose: parse flags, set up logging, hand
//! over to [`sluice_agent::server`].

use std::process::ExitCode;

use clap::Parser;
use sluice_agent::config::{Args, BrokerArgs, Command, LogFormat};
use sluice_agent::server::Agent;
use sluice_agent::shutdown;

fn main() -> ExitCode {
    // Invalid flags exit 2 with clap's message naming the flag.
    let args = Args::parse();
    let Command::Broker(broker) = args.command;
    if let Err(message) = init_tracing(&broker) {
        eprintln!("error: --log-level: {message}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(broker)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line naming the cause chain; no panic, no backtrace.
            tracing::error!(error = %format!("{err:#}"), "agent stopped");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: BrokerArgs) -> anyhow::Result<()> {
    let agent = Agent::start(
        args.data_dir.clone(),
        args.log_config(),
        args.listen,
        args.metrics_listen,
    )
    .await?;
    tracing::info!(
        grpc = %agent.grpc_addr(),
        metrics = %agent.metrics_addr(),
        data_dir = %args.data_dir.display(),
        fsync = ?args.fsync,
        "sluice-agent started"
    );
    println!("{}", agent.listening_line());
    agent.run(shutdown::signal()).await?;
    tracing::info!("sluice-agent stopped");
    Ok(())
}

fn init_tracing(args: &BrokerArgs) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .map_err(|err| format!("{:?}: {err}", args.log_level))?;
    // Logs go to stderr: stdout carries only the machine-readable listening line.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
