//! Command-line flags of `sluice-bench`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// A system the harness can measure besides Sluice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// RabbitMQ: a quorum queue and a classic durable queue, publisher confirms.
    Rabbitmq,
    /// NATS JetStream: a file-storage stream.
    Nats,
    /// Redis streams with `appendfsync always`.
    Redis,
}

/// Measure Sluice (and peers, in the same run) and print a Markdown table.
#[derive(Debug, Clone, Parser)]
#[command(name = "sluice-bench", version, about)]
pub struct Args {
    /// Another measurement than the throughput/latency table.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Also measure a cluster of this many agents (replication factor: the agent count, at
    /// most 3) with the same workload, in a row after the single agent's.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub cluster: Option<u32>,

    /// Messages published (and then consumed) in the throughput phases.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,

    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    pub size: usize,

    /// Concurrent producers, each on its own connection (channel, stream).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub producers: u32,

    /// Concurrent consumers, each on its own connection.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub consumers: u32,

    /// Messages per publish batch (one stream frame, one pipeline, one run of publishes whose
    /// confirms are awaited together).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,

    /// Unconfirmed batches each producer keeps in flight.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub window: u32,

    /// Unacked deliveries each consumer may hold (prefetch / max ack pending).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub prefetch: u32,

    /// Partitions of Sluice's benchmark queue (each its own log and group commit).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub partitions: u32,

    /// Open-loop publish rate of the latency phase in messages/s. Default: half of each
    /// system's own measured publish throughput.
    #[arg(long)]
    pub latency_rate: Option<u64>,

    /// Length of the latency phase in seconds.
    #[arg(long, default_value_t = 5)]
    pub latency_secs: u64,

    /// Peers measured in the same run, comma-separated; `--peers none` measures Sluice only.
    #[arg(long, value_delimiter = ',', default_value = "rabbitmq,nats,redis", value_parser = parse_peer)]
    pub peers: Vec<Option<Peer>>,

    /// Skip Sluice (measure peers only).
    #[arg(long)]
    pub no_sluice: bool,

    /// The `sluice-agent` binary. Default: next to this binary (`target/release/sluice-agent`).
    #[arg(long, env = "SLUICE_AGENT_BIN", global = true)]
    pub agent_bin: Option<PathBuf>,

    /// Backlog mode: instead of the throughput/latency table, publish this many messages,
    /// report server memory while the backlog is held, then (with `--drain`) consume it.
    #[arg(long)]
    pub backlog: Option<u64>,

    /// Seconds to hold the backlog while sampling memory.
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,

    /// In backlog mode, consume and ack the whole backlog afterwards and report the rate.
    #[arg(long)]
    pub drain: bool,

    /// Upper bound in seconds for any single phase; a system that exceeds it is reported as
    /// failed rather than hanging the run.
    #[arg(long, default_value_t = 600)]
    pub phase_timeout_secs: u64,

    /// Keep server data directories and logs (printed at the end) instead of deleting them.
    #[arg(long, global = true)]
    pub keep_data: bool,
}

/// Measurements other than the default table.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Failover time: kill -9 the leader of a cluster under steady confirmed-publish load,
    /// measure the time to the first confirm on its successor, restart it; repeat.
    Failover(FailoverArgs),
    /// Many partitions: declare them, leave them idle and read what they cost (CPU, memory,
    /// log), then stop one agent gracefully and kill -9 the one leading the most groups.
    Scale(ScaleArgs),
}

/// Flags of `sluice-bench scale`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// Queues to declare.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub queues: u32,

    /// Partitions per queue.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub partitions: u32,

    /// Agents in the cluster (replication factor: the agent count, at most 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(3..=9))]
    pub agents: u32,

    /// Declares in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub declare_concurrency: u32,

    /// Most seconds to wait, after the declares and after the restart, for the cluster to
    /// settle (leaderships balanced, groups quiescent): until the agents' logs have not grown
    /// for 10 s, or this long.
    #[arg(long, default_value_t = 300)]
    pub settle_secs: u64,

    /// Seconds of the idle window CPU and log growth are read over.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub window_secs: u64,
}

/// Flags of `sluice-bench failover`.
#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// Leader kills to measure.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub trials: u32,

    /// Agents in the cluster (a majority must survive a kill, so at least 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(3..=9))]
    pub agents: u32,

    /// Steady publish load in messages/s over all producers.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: u64,

    /// Producers of the load, each with its own client.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub producers: u32,

    /// Messages per publish frame of the load.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch: u32,

    /// Frames awaiting confirms per producer.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub window: u32,

    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    pub size: usize,

    /// Milliseconds of load on the whole cluster before each kill (after each restart).
    #[arg(long, default_value_t = 1_000)]
    pub settle_ms: u64,

    /// Seconds a trial may take to see a confirm on the successor before it counts as failed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub trial_timeout_secs: u64,
}

impl Args {
    /// The peers asked for, without duplicates, in the order given.
    pub fn selected_peers(&self) -> Vec<Peer> {
        let mut peers = Vec::new();
        for peer in self.peers.iter().flatten() {
            if !peers.contains(peer) {
                peers.push(*peer);
            }
        }
        peers
    }
}

/// `none` selects no peer; anything else must name one.
fn parse_peer(value: &str) -> Result<Option<Peer>, String> {
    if value.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    Peer::from_str(value, true)
        .map(Some)
        .map_err(|_| format!("unknown peer {value:?}; expected rabbitmq, nats, redis or none"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_default_to_all_three_in_order() {
        let args = Args::try_parse_from(["sluice-bench"]).expect("defaults parse");
        assert_eq!(
            args.selected_peers(),
            vec![Peer::Rabbitmq, Peer::Nats, Peer::Redis]
        );
    }

    #[test]
    fn peers_none_selects_no_peer() {
        let args = Args::try_parse_from(["sluice-bench", "--peers", "none"]).expect("parses");
        assert!(args.selected_peers().is_empty());
    }

    #[test]
    fn an_unknown_peer_is_refused_with_its_name() {
        let err = Args::try_parse_from(["sluice-bench", "--peers", "kafka"]).expect_err("refused");
        assert!(err.to_string().contains("kafka"), "{err}");
    }

    #[test]
    fn failover_takes_its_flags_and_the_global_agent_binary_after_the_subcommand() {
        let args = Args::try_parse_from([
            "sluice-bench",
            "failover",
            "--trials",
            "2",
            "--agent-bin",
            "/x/sluice-agent",
        ])
        .expect("parses");
        let Some(Command::Failover(failover)) = &args.command else {
            panic!("failover subcommand: {args:?}");
        };
        assert_eq!(failover.trials, 2);
        assert_eq!(failover.agents, 3);
        assert_eq!(args.agent_bin, Some(PathBuf::from("/x/sluice-agent")));
    }

    #[test]
    fn a_failover_cluster_of_two_agents_is_refused_naming_the_flag() {
        let err = Args::try_parse_from(["sluice-bench", "failover", "--agents", "2"])
            .expect_err("refused");
        assert!(err.to_string().contains("--agents"), "{err}");
    }

    #[test]
    fn cluster_adds_a_size_and_defaults_to_none() {
        let args = Args::try_parse_from(["sluice-bench"]).expect("parses");
        assert_eq!(args.cluster, None);
        let args = Args::try_parse_from(["sluice-bench", "--cluster", "3"]).expect("parses");
        assert_eq!(args.cluster, Some(3));
    }

    #[test]
    fn scale_defaults_to_a_thousand_queues_of_three_partitions_on_three_agents() {
        let args = Args::try_parse_from(["sluice-bench", "scale"]).expect("parses");
        let Some(Command::Scale(scale)) = &args.command else {
            panic!("scale subcommand: {args:?}");
        };
        assert_eq!(
            (scale.queues, scale.partitions, scale.agents),
            (1_000, 3, 3)
        );
        let err =
            Args::try_parse_from(["sluice-bench", "scale", "--agents", "2"]).expect_err("refused");
        assert!(err.to_string().contains("--agents"), "{err}");
    }

    #[test]
    fn zero_messages_is_refused() {
        assert!(Args::try_parse_from(["sluice-bench", "--messages", "0"]).is_err());
    }
}
