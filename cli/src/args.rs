//! The command line: subcommands, flags, and the parsers for human durations and sizes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Command line of `sluice`.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "Sluice message queue command line")]
pub struct Cli {
    /// Agent (or sidecar) to talk to; several agents of one cluster may be given,
    /// comma-separated.
    #[arg(
        long,
        global = true,
        env = "SLUICE_ENDPOINT",
        default_value = "http://127.0.0.1:7070"
    )]
    pub endpoint: String,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a queue, or confirm that an identical one exists.
    Declare(Declare),
    /// Publish messages given as arguments, or one per line of standard input.
    Publish(Publish),
    /// Receive messages, print their payloads, and ack them.
    Consume(Consume),
    /// Show a queue's counters per partition.
    Stats {
        /// Queue name.
        queue: String,
    },
    /// List queues.
    Queues,
    /// Delete a queue and its messages.
    Delete {
        /// Queue name.
        queue: String,
        /// Refuse when the queue still holds messages.
        #[arg(long)]
        if_empty: bool,
    },
    /// Run Sluice on this machine: a cluster of three agents on loopback (or one, with
    /// --agents 1), data under a local directory.
    Local(Local),
    /// Show and change which agents hold the cluster's replicas (scale-out, scale-in,
    /// leadership hand-off).
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

/// The subcommands of `sluice cluster`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Tables of the agents (state, addresses, replicas, leaderships) and of every
    /// partition's leader and replicas.
    Status,
    /// Add an agent (it joins as JOINING and becomes ACTIVE once it votes everywhere).
    Add {
        /// Its node id (StatefulSet ordinal).
        node_id: u64,
        /// Where its peers reach it, `host:port`.
        #[arg(long)]
        peer_address: String,
        /// Where clients are redirected to it, `host:port`.
        #[arg(long)]
        client_address: String,
    },
    /// Move every replica and leadership off an agent (DRAINING, then DRAINED).
    Drain {
        /// Its node id.
        node_id: u64,
    },
    /// Forget a DRAINED agent.
    Remove {
        /// Its node id.
        node_id: u64,
    },
    /// Move every leadership an agent holds to caught-up replicas elsewhere.
    Handoff {
        /// Its node id.
        node_id: u64,
    },
}

/// Flags of `sluice declare`.
#[derive(Debug, clap::Args)]
pub struct Declare {
    /// Queue name: 1..=64 of [a-z0-9._-], starting with a letter or digit.
    pub queue: String,
    /// Number of partitions (default 1).
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Redelivery timeout of unacked deliveries, e.g. `30s` (default 30s).
    #[arg(long, value_parser = parse_duration)]
    pub ack_timeout: Option<Duration>,
    /// Deliveries before a message is dead-lettered (needs --dead-letter-queue).
    #[arg(long)]
    pub max_deliveries: Option<u32>,
    /// Queue receiving rejected, expired and over-delivered messages.
    #[arg(long)]
    pub dead_letter_queue: Option<String>,
    /// Default message time-to-live, e.g. `24h` (default: never expire).
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Backlog limit in messages; publishes are refused beyond it.
    #[arg(long)]
    pub max_backlog_messages: Option<u64>,
    /// Backlog limit in payload bytes, e.g. `1GiB`.
    #[arg(long, value_parser = parse_size)]
    pub max_backlog_bytes: Option<u64>,
    /// Largest accepted payload, e.g. `256KiB` (default 1MiB).
    #[arg(long, value_parser = parse_size)]
    pub max_payload_bytes: Option<u64>,
    /// Idempotency-key dedup window, e.g. `2m` (default 2m).
    #[arg(long, value_parser = parse_duration)]
    pub dedup_window: Option<Duration>,
    /// Honour per-message priorities (0..=9).
    #[arg(long)]
    pub priorities: bool,
}

/// Flags of `sluice publish`.
#[derive(Debug, clap::Args)]
pub struct Publish {
    /// Queue name.
    pub queue: String,
    /// Message payloads; when none are given, each line of standard input is one message.
    pub messages: Vec<String>,
    /// Ordering key: messages with the same key keep their order on one partition.
    #[arg(long)]
    pub key: Option<String>,
    /// Priority 0..=9 (queues declared with --priorities).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=9))]
    pub priority: Option<u32>,
    /// Do not deliver before this delay, e.g. `10s`.
    #[arg(long, value_parser = parse_duration)]
    pub delay: Option<Duration>,
    /// Expire after this long, e.g. `1h`.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Idempotency key (only sensible with a single message).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Header `key=value`; repeatable.
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
}

/// Flags of `sluice consume`.
#[derive(Debug, clap::Args)]
pub struct Consume {
    /// Queue name.
    pub queue: String,
    /// Stop after this many messages (default: run until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
    /// Most unacked deliveries held at once.
    #[arg(long, default_value_t = 100)]
    pub prefetch: u32,
    /// Print without acking; the messages are redelivered once this command exits.
    #[arg(long)]
    pub no_ack: bool,
    /// Stop when no message arrives for this long, e.g. `2s`.
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
}

/// Flags of `sluice local`.
#[derive(Debug, clap::Args)]
pub struct Local {
    /// Where the queues are kept: one `agent-N` directory per agent, and their logs.
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./.sluice-data")]
    pub data_dir: PathBuf,
    /// Agents to run: 3 replicate every partition; 1 runs a lone agent without replication.
    #[arg(long, default_value_t = 3)]
    pub agents: u32,
    /// The endpoint apps and the CLI use; it passes each connection to the first agent that
    /// accepts it. Agent N's gRPC API listens on this port plus 1 + N (port 0: free ports).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Address of the first agent's replication port; agent N adds N to the port.
    #[arg(long, default_value = "127.0.0.1:7170")]
    pub peer_listen: SocketAddr,
    /// Address of the first agent's `/metrics` and `/healthz`; agent N adds N to the port.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,
    /// The `sluice-agent` binary. Default: the one next to `sluice`, else from `PATH`.
    #[arg(long, env = "SLUICE_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,
}

/// Parses a human duration such as `30s`, `1h 30m` or `250ms`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|e| format!("{value:?} is not a duration like 30s: {e}"))
}

/// Parses a size such as `1048576`, `512KiB` or `1GiB`.
pub fn parse_size(value: &str) -> Result<u64, String> {
    value
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|e| format!("{value:?} is not a size like 1GiB: {e}"))
}

/// Parses `key=value` with a non-empty key.
pub fn parse_header(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, val)) if !key.is_empty() => Ok((key.to_owned(), val.to_owned())),
        _ => Err(format!("{value:?} is not key=value with a non-empty key")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations_sizes_and_headers_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("big").is_err());
        assert_eq!(parse_header("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_header("=x").is_err());
        assert!(parse_header("novalue").is_err());
    }

    #[test]
    fn an_invalid_duration_is_a_usage_error_naming_the_flag() {
        let err = Cli::try_parse_from(["sluice", "declare", "q", "--ack-timeout", "forever"])
            .expect_err("must refuse");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--ack-timeout"), "{err}");
    }
}
