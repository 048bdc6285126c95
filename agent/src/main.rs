//! `sluice-agent`: the queue agent binary. Thin on purpose: parse flags, set up logging, hand
//! over to [`sluice_agent::server`].

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory, Parser};
use sluice_agent::broker::{Broker, BrokerError};
use sluice_agent::cluster::ClusterConfig;
use sluice_agent::config::{Args, BrokerArgs, Command, HandOffArgs, LOG_LEVEL_DEFAULT, LogFormat};
use sluice_agent::grpc::status;
use sluice_agent::log_throttle::Throttle;
use sluice_agent::server::Agent;
use sluice_agent::shutdown;
use sluice_proto::v1::QueueSpec;

/// How often one openraft call site may log with the default filter.
const OPENRAFT_LINE_WINDOW: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    // Invalid flags exit 2 with clap's message naming the flag.
    let args = Args::parse();
    let broker = match args.command {
        Command::Broker(broker) => broker,
        Command::HandOff(hand_off) => return run_hand_off(&hand_off),
    };
    // The cluster flags are checked together (clap sees each alone); a bad combination is a
    // usage error like any bad flag: exit 2 with the message naming the flag.
    if let Err(err) = ClusterConfig::from_args(&broker) {
        Args::command()
            .error(clap::error::ErrorKind::ValueValidation, err)
            .exit();
    }
    if let Err(err) = init_tracing(&broker) {
        eprintln!("error: --log-level {:?}: {err}", broker.log_level);
        return ExitCode::from(2);
    }
    raise_open_files_limit();
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

/// `sluice-agent hand-off`: one line on stdout saying what moved and what remains; exit 0 when
/// the agent leads nothing afterwards (or serves alone), 1 otherwise with the reason on stderr.
fn run_hand_off(args: &HandOffArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let address = sluice_agent::hand_off::local_address(args.listen);
    let timeout = std::time::Duration::from_secs(args.timeout);
    match runtime.block_on(sluice_agent::hand_off::hand_off(
        address,
        args.node_id,
        timeout,
    )) {
        Ok(outcome) if outcome.is_success() => {
            println!("agent {}: {outcome}", args.node_id);
            ExitCode::SUCCESS
        }
        Ok(outcome) => {
            println!("agent {}: {outcome}", args.node_id);
            eprintln!(
                "error: agent {} still leads groups with no caught-up replica to take them",
                args.node_id
            );
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("error: hand-off of agent {}: {err}", args.node_id);
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: BrokerArgs) -> anyhow::Result<()> {
    // Read before anything binds or opens, so a bad file stops the agent at once.
    let queues = match &args.queues_file {
        Some(path) => sluice_agent::queues_file::load(path)?,
        None => Vec::new(),
    };
    let cluster = ClusterConfig::from_args(&args)?;
    // A joining agent is not a member until Membership.AddAgent: the bootstrap agents declare
    // the queues file's queues, and it learns them from the catalog once added.
    let joining = cluster.as_ref().is_some_and(|c| c.is_joining());
    let agent = match cluster {
        Some(cluster) => {
            Agent::start_in_cluster(
                args.data_dir.clone(),
                args.log_config(),
                args.listen,
                args.metrics_listen,
                cluster,
            )
            .await?
        }
        None => {
            Agent::start(
                args.data_dir.clone(),
                args.log_config(),
                args.listen,
                args.metrics_listen,
            )
            .await?
        }
    };
    // Queues file: declared before the listening line, so clients and probes never see the
    // agent without them (in a cluster, through the replicated catalog).
    if let Some(path) = args.queues_file.as_ref().filter(|_| !joining) {
        declare_queues(agent.broker(), path, queues).await?;
    }
    tracing::info!(
        grpc = %agent.grpc_addr(),
        metrics = %agent.metrics_addr(),
        data_dir = %args.data_dir.display(),
        fsync = ?args.fsync,
        "sluice-agent started"
    );
    // Handlers first: whoever reads the listening line may signal at once.
    let stop = shutdown::signal();
    println!("{}", agent.listening_line());
    agent.run(stop).await?;
    tracing::info!("sluice-agent stopped");
    Ok(())
}

/// How long a clustered agent waits at startup for the cluster catalog to take the queues
/// file: its peers may start minutes apart (pods scheduled on nodes still pulling the image).
/// Below the StatefulSet's startup probe budget (5 minutes), so the kubelet restarts an agent
/// that waited in vain, not one still waiting.
const CATALOG_STARTUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(240);

/// Declares the queues of the definitions file at `path`. A queue that already exists with
/// other settings is kept as it is, with a warning: the broker cannot change a queue's
/// settings, and refusing to start would take every queue of the agent down over one edit.
/// While the cluster has no catalog leader (its agents are still starting) the declaration
/// is retried, up to [`CATALOG_STARTUP_TIMEOUT`].
async fn declare_queues(
    broker: &Broker,
    path: &std::path::Path,
    queues: Vec<QueueSpec>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + CATALOG_STARTUP_TIMEOUT;
    for spec in queues {
        let name = spec.name.clone();
        let declared = loop {
            let declared = broker.declare(spec.clone()).await;
            match &declared {
                // Every outcome answered UNAVAILABLE (no catalog leader yet, not yet a member,
                // a redirect) is worth waiting out.
                Err(err)
                    if status::code(err) == tonic::Code::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::warn!(queue = %name, error = %err, "waiting for the cluster catalog to declare a queue of the queues file");
                    // `declare` itself waited out one proposal timeout; a short pause keeps
                    // the log readable when it failed at once.
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                _ => break declared,
            }
        };
        match declared {
            Ok((_, created)) => {
                tracing::info!(queue = %name, created, "queue from the queues file")
            }
            Err(err @ BrokerError::QueueExists { .. }) => tracing::warn!(
                queue = %name,
                file = %path.display(),
                error = %err,
                "queue kept with its existing settings"
            ),
            Err(err) => {
                return Err(err).with_context(|| {
                    format!("queue definitions {}: queue {name:?}", path.display())
                });
            }
        }
    }
    Ok(())
}

/// Raises the soft limit of open files to the hard limit. Every partition replica keeps its log
/// segments and Raft files open: a few hundred partitions pass the soft default of 1,024 many
/// shells and hosts start with, and a replica whose vote cannot be written stops its group
/// ("Too many open files" under an election storm). Servers such as Kafka ask operators to
/// raise it; the agent takes what the hard limit allows itself.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-files limit")
            }
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open-files limit"),
    }
}

fn init_tracing(args: &BrokerArgs) -> Result<(), tracing_subscriber::filter::ParseError> {
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::layer::{Layer as _, SubscriberExt as _};
    use tracing_subscriber::util::SubscriberInitExt as _;

    let levels = tracing_subscriber::EnvFilter::try_new(&args.log_level)?;
    // With the default filter, openraft's per-group error lines come once per call site per
    // 10 s; a filter of one's own gets every line it asks for.
    // (`None` lets everything through without a look.)
    let throttle = (args.log_level == LOG_LEVEL_DEFAULT)
        .then(|| Throttle::new("openraft", OPENRAFT_LINE_WINDOW));
    let filter = levels.and(throttle);
    // Logs go to stderr: stdout carries only the machine-readable listening line.
    // Colours only on a terminal: in a pod's log or a file they are escape-code noise.
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry();
    match args.log_format {
        LogFormat::Text => registry.with(lines.with_filter(filter)).init(),
        LogFormat::Json => registry.with(lines.json().with_filter(filter)).init(),
    }
    Ok(())
}
