//! `sluice local`: one broker in this process, data under a local directory.

use sluice_agent::config::LogConfig;
use sluice_agent::server::Agent;
use sluice_agent::shutdown;

use crate::args::Local;

/// Runs a broker until Ctrl-C (or SIGTERM), then shuts it down gracefully.
pub async fn run(args: Local) -> anyhow::Result<()> {
    let agent = Agent::start(
        args.data_dir.clone(),
        LogConfig::default(),
        args.listen,
        args.metrics_listen,
    )
    .await?;
    let endpoint = format!("http://{}", agent.grpc_addr());
    // First line machine-readable (scripts and tests parse it), then help for people.
    println!("{}", agent.listening_line());
    println!(
        "Sluice is running locally; data in {}",
        args.data_dir.display()
    );
    println!("  endpoint  {endpoint}");
    println!("  metrics   http://{}/metrics", agent.metrics_addr());
    println!("Try, in another terminal:");
    let flag = if agent.grpc_addr().port() == 7070 {
        String::new()
    } else {
        format!(" --endpoint {endpoint}")
    };
    println!("  sluice{flag} declare orders");
    println!("  sluice{flag} publish orders hello world");
    println!("  sluice{flag} consume orders --count 2");
    println!("  sluice{flag} stats orders");
    println!("Press Ctrl-C to stop.");
    agent.run(shutdown::signal()).await?;
    println!("stopped");
    Ok(())
}
