//! `sluice-bench`: measure Sluice and its peers on this machine, print Markdown tables.

use std::process::ExitCode;

use clap::Parser;
use sluice_bench::config::Args;
use sluice_bench::{report, suite};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
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
    let all_ran = if let Some(messages) = args.backlog {
        let rows = suite::run_backlog(&args, messages).await;
        println!("{}", report::backlog_table(messages, args.size, &rows));
        rows.iter()
            .all(|row| !matches!(row.outcome, report::Outcome::Failed(_)))
    } else {
        let rows = suite::run_table(&args).await;
        println!("{}", report::results_table(&rows));
        if let Some(ratios) = report::ratios_table(&rows) {
            println!("{ratios}");
        }
        rows.iter()
            .all(|row| !matches!(row.outcome, report::Outcome::Failed(_)))
    };
    // A failed system still prints its row; the exit code tells scripts something failed.
    if all_ran {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
