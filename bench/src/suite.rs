//! Runs the selected systems one after another, each on a fresh server in its own temporary
//! directory, and collects their rows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::config::{Args, Peer};
use crate::driver::Driver;
use crate::memory::Memory;
use crate::peers::nats::{self, NatsDriver};
use crate::peers::rabbitmq::{self, QueueType, RabbitDriver};
use crate::peers::redis::{self, RedisDriver};
use crate::peers::sluice::{self, SluiceDriver};
use crate::process::{ServerProcess, find_program};
use crate::report::{BacklogMeasurement, Measurement, Outcome, Row};
use crate::stats::Throughput;
use crate::workload::{self, Shape};
use crate::{Error, Result};

/// Name of Sluice's row (the ratios are computed against it).
pub const SLUICE: &str = "Sluice";

/// How long a server gets to start listening.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// One row of the table: a system and, for RabbitMQ, a queue type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A `sluice-agent broker`, fsync `always`.
    Sluice,
    /// That many agents in a cluster, replication factor the agent count (at most 3).
    SluiceCluster(u32),
    /// RabbitMQ quorum queue.
    RabbitQuorum,
    /// RabbitMQ classic durable queue.
    RabbitClassic,
    /// NATS JetStream file stream.
    Nats,
    /// Redis streams, `appendfsync always`.
    Redis,
}

impl Target {
    /// The targets `args` selects, Sluice first.
    pub fn selected(args: &Args) -> Vec<Target> {
        let mut targets = Vec::new();
        if !args.no_sluice {
            targets.push(Target::Sluice);
        }
        if let Some(agents) = args.cluster {
            targets.push(Target::SluiceCluster(agents));
        }
        for peer in args.selected_peers() {
            match peer {
                Peer::Rabbitmq => targets.extend([Target::RabbitQuorum, Target::RabbitClassic]),
                Peer::Nats => targets.push(Target::Nats),
                Peer::Redis => targets.push(Target::Redis),
            }
        }
        targets
    }

    /// Row name. Every Sluice row starts with [`SLUICE`].
    pub fn label(self) -> String {
        match self {
            Target::Sluice => SLUICE.into(),
            Target::SluiceCluster(agents) => format!(
                "{SLUICE}, {agents} agents, RF {}",
                replication_factor(agents)
            ),
            Target::RabbitQuorum => "RabbitMQ quorum queue".into(),
            Target::RabbitClassic => "RabbitMQ classic durable queue".into(),
            Target::Nats => "NATS JetStream (file)".into(),
            Target::Redis => "Redis streams (AOF always)".into(),
        }
    }

    /// What a confirm promises, in a few words (details in `bench/README.md`).
    pub fn durability(self) -> String {
        match self {
            Target::Sluice => "fsynced (group commit)".into(),
            Target::SluiceCluster(agents) => {
                let factor = replication_factor(agents);
                format!("fsynced on {} of {factor} replicas", factor / 2 + 1)
            }
            Target::RabbitQuorum => "fsynced (Raft WAL)".into(),
            Target::RabbitClassic => "fsynced (msg store, batched)".into(),
            Target::Nats => "written, fsync every 2 min".into(),
            Target::Redis => "fsynced (AOF always)".into(),
        }
    }
}

/// The replication factor a cluster of `agents` is started with.
fn replication_factor(agents: u32) -> usize {
    (agents as usize).min(crate::cluster::REPLICATION_FACTOR_MAX)
}

/// Everything a target needs from the command line.
struct Plan<'a> {
    args: &'a Args,
    payload: Bytes,
    shape: Shape,
    phase_timeout: Duration,
}

/// Runs the throughput/latency measurements of every selected target.
pub async fn run_table(args: &Args) -> Vec<Row<Measurement>> {
    let plan = Plan::new(args);
    let mut rows = Vec::new();
    for target in Target::selected(args) {
        eprintln!("measuring {} ...", target.label());
        let outcome = run_target(target, &plan, Mode::Table).await;
        let outcome = match outcome {
            Outcome::Measured(Measured::Table(m)) => Outcome::Measured(m),
            Outcome::Measured(Measured::Backlog(_)) => Outcome::Failed("wrong mode".into()),
            Outcome::NotInstalled(what) => Outcome::NotInstalled(what),
            Outcome::Failed(error) => Outcome::Failed(error),
        };
        rows.push(Row {
            system: target.label(),
            durability: target.durability(),
            outcome,
        });
    }
    rows
}

/// Runs the backlog mode of every selected target with `messages` messages.
pub async fn run_backlog(args: &Args, messages: u64) -> Vec<Row<BacklogMeasurement>> {
    let plan = Plan::new(args);
    let mut rows = Vec::new();
    for target in Target::selected(args) {
        eprintln!("backlog of {messages} into {} ...", target.label());
        let outcome = match run_target(target, &plan, Mode::Backlog(messages)).await {
            Outcome::Measured(Measured::Backlog(m)) => Outcome::Measured(m),
            Outcome::Measured(Measured::Table(_)) => Outcome::Failed("wrong mode".into()),
            Outcome::NotInstalled(what) => Outcome::NotInstalled(what),
            Outcome::Failed(error) => Outcome::Failed(error),
        };
        rows.push(Row {
            system: target.label(),
            durability: target.durability(),
            outcome,
        });
    }
    rows
}

impl<'a> Plan<'a> {
    fn new(args: &'a Args) -> Self {
        Plan {
            args,
            payload: Bytes::from(vec![b'x'; args.size]),
            shape: Shape {
                producers: args.producers,
                consumers: args.consumers,
                batch: args.batch,
                window: args.window,
                prefetch: args.prefetch,
            },
            phase_timeout: Duration::from_secs(args.phase_timeout_secs),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Table,
    Backlog(u64),
}

enum Measured {
    Table(Measurement),
    Backlog(BacklogMeasurement),
}

/// Starts the target's server in a fresh temporary directory, measures, stops it.
async fn run_target(target: Target, plan: &Plan<'_>, mode: Mode) -> Outcome<Measured> {
    let program = match program_of(target, plan.args) {
        Ok(program) => program,
        Err(missing) => return Outcome::NotInstalled(missing),
    };
    let dir = match tempfile::Builder::new().prefix("sluice-bench-").tempdir() {
        Ok(dir) => dir,
        Err(err) => return Outcome::Failed(format!("creating a temporary directory: {err}")),
    };
    let result = run_in(target, &program, dir.path(), plan, mode).await;
    if plan.args.keep_data {
        let kept = dir.keep();
        eprintln!("  data and logs kept in {}", kept.display());
    }
    match result {
        Ok(measured) => Outcome::Measured(measured),
        // Every variant prints its cause, and client errors print theirs.
        Err(err) => Outcome::Failed(err.to_string()),
    }
}

/// The server program of `target`, or a description of what is missing.
fn program_of(target: Target, args: &Args) -> Result<PathBuf, String> {
    let found = |name: &str| find_program(name).ok_or_else(|| name.to_string());
    match target {
        Target::Sluice | Target::SluiceCluster(_) => agent_program(args),
        // RabbitMQ also needs `epmd`; the node's script is checked when it starts.
        Target::RabbitQuorum | Target::RabbitClassic => {
            found(rabbitmq::SERVER_PROGRAM)?;
            found("epmd")
        }
        Target::Nats => found("nats-server"),
        Target::Redis => found("redis-server"),
    }
}

/// The `sluice-agent` binary: `--agent-bin`, else the one next to this binary; or what is
/// missing and how to build it.
pub fn agent_program(args: &Args) -> Result<PathBuf, String> {
    let path = match &args.agent_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("sluice-agent")))
            .unwrap_or_else(|| PathBuf::from("sluice-agent")),
    };
    find_program(&path.to_string_lossy()).ok_or_else(|| {
        format!(
            "{}; build it with `cargo build --release -p sluice-agent`",
            path.display()
        )
    })
}

async fn run_in(
    target: Target,
    program: &Path,
    dir: &Path,
    plan: &Plan<'_>,
    mode: Mode,
) -> Result<Measured> {
    let payload = plan.payload.clone();
    match target {
        Target::Sluice => {
            let (server, addr) = sluice::start(program, dir, READY_TIMEOUT).await?;
            let window = plan.shape.window as usize;
            let driver = SluiceDriver::connect(addr, payload, plan.args.partitions, window).await;
            finish(driver, Servers::One(server), plan, mode).await
        }
        Target::SluiceCluster(agents) => {
            let cluster = Cluster::start(program, dir, agents as usize, READY_TIMEOUT).await?;
            let window = plan.shape.window as usize;
            let driver = SluiceDriver::connect_cluster(
                &cluster.client_addrs(),
                payload,
                plan.args.partitions,
                window,
                READY_TIMEOUT,
            )
            .await;
            finish(driver, Servers::Cluster(cluster), plan, mode).await
        }
        Target::RabbitQuorum | Target::RabbitClassic => {
            let queue_type = if target == Target::RabbitQuorum {
                QueueType::Quorum
            } else {
                QueueType::Classic
            };
            let server = rabbitmq::start(program, dir, READY_TIMEOUT).await?;
            let driver = RabbitDriver::connect(server.addr, queue_type, payload).await;
            let result = finish(driver, Servers::One(server.node), plan, mode).await;
            server.epmd.stop().await;
            result
        }
        Target::Nats => {
            let (server, addr) = nats::start(program, dir, READY_TIMEOUT).await?;
            let max_ack_pending = i64::from(plan.shape.prefetch) * i64::from(plan.shape.consumers);
            let driver = NatsDriver::connect(addr, payload, max_ack_pending).await;
            finish(driver, Servers::One(server), plan, mode).await
        }
        Target::Redis => {
            let (server, addr) = redis::start(program, dir, READY_TIMEOUT).await?;
            let driver = RedisDriver::connect(addr, payload).await;
            finish(driver, Servers::One(server), plan, mode).await
        }
    }
}

/// The server processes of one target.
enum Servers {
    /// One server (and its process tree).
    One(ServerProcess),
    /// A Sluice cluster.
    Cluster(Cluster),
}

impl Servers {
    /// Memory of the server, or the sum over a cluster's agents (each its own process, sharing
    /// nothing, so the sum is what the cluster holds). A cluster's per-agent peaks go to
    /// stderr.
    fn memory(&self) -> Result<Memory> {
        match self {
            Servers::One(server) => server.memory(),
            Servers::Cluster(cluster) => {
                let agents = cluster.memory()?;
                let peaks: Vec<String> = agents
                    .iter()
                    .map(|m| match m {
                        Some(m) => format!("{:.1}", m.peak_rss_bytes as f64 / (1024.0 * 1024.0)),
                        None => "down".into(),
                    })
                    .collect();
                eprintln!("  agents' peak RSS MiB: {}", peaks.join(", "));
                Ok(agents
                    .iter()
                    .flatten()
                    .fold(Memory::default(), |sum, m| Memory {
                        rss_bytes: sum.rss_bytes + m.rss_bytes,
                        peak_rss_bytes: sum.peak_rss_bytes + m.peak_rss_bytes,
                    }))
            }
        }
    }

    async fn stop(self) {
        match self {
            Servers::One(server) => server.stop().await,
            Servers::Cluster(cluster) => cluster.stop().await,
        }
    }
}

/// Measures with a connected driver, then stops the server whatever happened.
async fn finish<D: Driver>(
    driver: Result<D>,
    server: Servers,
    plan: &Plan<'_>,
    mode: Mode,
) -> Result<Measured> {
    let result = match driver {
        Ok(driver) => match mode {
            Mode::Table => measure_table(&driver, &server, plan)
                .await
                .map(Measured::Table),
            Mode::Backlog(messages) => measure_backlog(&driver, &server, plan, messages)
                .await
                .map(Measured::Backlog),
        },
        Err(err) => Err(err),
    };
    server.stop().await;
    result
}

async fn measure_table<D: Driver>(
    driver: &D,
    server: &Servers,
    plan: &Plan<'_>,
) -> Result<Measurement> {
    let messages = plan.args.messages;
    let publish = bounded(
        "publish",
        plan.phase_timeout,
        workload::publish(driver, messages, plan.shape),
    )
    .await?;
    eprintln!("  publish: {:.0} msgs/s", publish.per_sec());
    let consume = bounded(
        "consume",
        plan.phase_timeout,
        workload::consume(driver, messages, plan.shape),
    )
    .await?;
    eprintln!("  consume+ack: {:.0} msgs/s", consume.per_sec());
    let latency_rate = plan
        .args
        .latency_rate
        .unwrap_or((publish.per_sec() / 2.0) as u64)
        .max(1);
    let duration = Duration::from_secs(plan.args.latency_secs);
    let latency = bounded(
        "latency",
        plan.phase_timeout,
        workload::confirm_latency(driver, latency_rate, duration, plan.shape),
    )
    .await?;
    let peak_rss_bytes = server.memory()?.peak_rss_bytes;
    Ok(Measurement {
        publish,
        consume,
        latency_rate,
        p50: latency.quantile(0.5),
        p99: latency.quantile(0.99),
        peak_rss_bytes,
    })
}

/// How often memory is sampled while a backlog is held.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

async fn measure_backlog<D: Driver>(
    driver: &D,
    server: &Servers,
    plan: &Plan<'_>,
    messages: u64,
) -> Result<BacklogMeasurement> {
    let publish = bounded(
        "backlog publish",
        plan.phase_timeout,
        workload::publish(driver, messages, plan.shape),
    )
    .await?;
    eprintln!(
        "  published {messages} at {:.0} msgs/s; holding",
        publish.per_sec()
    );
    let hold_until = Instant::now() + Duration::from_secs(plan.args.hold_secs);
    let mut held_rss_bytes = 0;
    loop {
        held_rss_bytes = held_rss_bytes.max(server.memory()?.rss_bytes);
        if Instant::now() >= hold_until {
            break;
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let peak_rss_bytes = server.memory()?.peak_rss_bytes;
    let drain: Option<Throughput> = if plan.args.drain {
        let drained = bounded(
            "backlog drain",
            plan.phase_timeout,
            workload::consume(driver, messages, plan.shape),
        )
        .await?;
        eprintln!("  drained at {:.0} msgs/s", drained.per_sec());
        Some(drained)
    } else {
        None
    };
    Ok(BacklogMeasurement {
        publish,
        held_rss_bytes,
        peak_rss_bytes,
        drain,
    })
}

async fn bounded<T>(
    phase: &'static str,
    limit: Duration,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| Error::Timeout {
            phase,
            limit_secs: limit.as_secs(),
        })?
}
