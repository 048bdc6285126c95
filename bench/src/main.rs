//! `sluice-bench`: measure Sluice and its peers on this machine, print Markdown tables.

use std::process::ExitCode;

use clap::Parser;
use sluice_bench::config::{Args, Command};
use sluice_bench::{failover, report, scale, suite};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let all_ran = match &args.command {
        Some(Command::Failover(failover_args)) => {
            match failover::run_command(&args, failover_args).await {
                Ok(outcome) => {
                    println!(
                        "{}",
                        report::failover_table(&outcome.distribution(), outcome.failed_trials())
                    );
                    outcome.failed_trials() == 0
                }
                Err(err) => {
                    eprintln!("error: failover: {err}");
                    false
                }
            }
        }
        Some(Command::Scale(scale_args)) => match scale::run_command(&args, scale_args).await {
            Ok(outcome) => {
                println!("{}", report::scale_table(&outcome));
                outcome.unled == 0
            }
            Err(err) => {
                eprintln!("error: scale: {err}");
                false
            }
        },
        None => run_tables(&args).await,
    };
    // A failed system still prints its row; the exit code tells scripts something failed.
    if all_ran {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The throughput/latency table (or the backlog table); whether every system ran.
async fn run_tables(args: &Args) -> bool {
    eprintln!(
        "sluice-bench: {} messages × {} B, {} producers (batch {}, window {}), {} consumers (prefetch {})",
        args.backlog.unwrap_or(args.messages),
        args.size,
        args.producers,
        args.batch,
        args.window,
        args.consumers,
        args.prefetch
    );
    if let Some(messages) = args.backlog {
        let rows = suite::run_backlog(args, messages).await;
        println!("{}", report::backlog_table(messages, args.size, &rows));
        rows.iter()
            .all(|row| !matches!(row.outcome, report::Outcome::Failed(_)))
    } else {
        let rows = suite::run_table(args).await;
        println!("{}", report::results_table(&rows));
        for reference in rows.iter().filter(|row| report::is_sluice(row)) {
            if let Some(ratios) = report::ratios_table(&rows, &reference.system) {
                println!("{ratios}");
            }
        }
        rows.iter()
            .all(|row| !matches!(row.outcome, report::Outcome::Failed(_)))
    }
}
