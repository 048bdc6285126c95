//! Configuration: command-line flags (each also read from a `SLUICE_*` variable) and the
//! durability knobs.

use std::time::Duration;

/// The agent's default log filter: its own targets (`sluice_agent`, the client crate it uses
/// to forward dead-letter copies, and `sluice::*` such as `sluice::timing`) at info, every
/// dependency at warn, openraft at error. openraft logs vote handling and leases at info for
/// every group, which with hundreds of partitions filled disks (100 MB per agent in five
/// minutes at 900 groups), and a warning per group per missed heartbeat when the agents are
/// overloaded (75 MB in three minutes at 330 groups on a saturated machine); the agent's own
/// lines say what changed (leaders, membership steps, resyncs).
pub const LOG_LEVEL_DEFAULT: &str =
    "warn,openraft=error,sluice_agent=info,sluice_client=info,sluice=info";

/// When appended entries are fsynced. The default is the only policy under which a confirm
/// means "survives power loss"; the others trade that away for latency and are documented as
/// such.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Group commit: write everything pending, fsync once, then confirm it all. Durable.
    #[default]
    Always,
    /// Confirm after `write(2)`, fsync at most every interval. Loses up to the interval on
    /// power loss (not on process crash).
    Interval(Duration),
    /// Never fsync (tests and benchmarks of the upper layers only).
    Never,
}

/// Storage knobs of every partition log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment is closed and a new one started once it reaches this size. Smaller segments
    /// free disk sooner after acks; larger ones mean fewer files. Default 64 MiB.
    pub segment_bytes: u64,
    /// When data is fsynced.
    pub fsync: FsyncPolicy,
}

/// Default segment size.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            fsync: FsyncPolicy::Always,
        }
    }
}

/// Command line of `sluice-agent`.
#[derive(Debug, clap::Parser)]
#[command(name = "sluice-agent", version, about = "Sluice queue agent")]
pub struct Args {
    /// What this agent runs as.
    #[command(subcommand)]
    pub command: Command,
}

/// The agent's modes.
// Parsed once per process: the size of the broker's flags costs nothing worth a `Box`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve queues from a local data directory (one pod of a MessageQueue's StatefulSet).
    Broker(BrokerArgs),
    /// Ask the agent running next to this command (same `--pod-name`/`--listen`) to hand every
    /// leadership it holds to caught-up peers; the StatefulSet's `preStop` hook. Exits 0 when
    /// it leads nothing afterwards (or serves alone), 1 when something remains or the agent
    /// could not be asked.
    HandOff(HandOffArgs),
}

/// Flags of `sluice-agent hand-off`: the broker's identity flags (and their `SLUICE_*`
/// variables, which the pod's env already sets), plus a deadline.
#[derive(Debug, Clone, clap::Args)]
pub struct HandOffArgs {
    /// The local agent's pod name (`<name>-<ordinal>`); its ordinal is the node id whose
    /// leaderships move.
    #[arg(
        long = "pod-name",
        value_name = "POD_NAME",
        env = "SLUICE_POD_NAME",
        value_parser = parse_node_id
    )]
    pub node_id: u64,
    /// The local agent's `--listen` address; an unspecified host (`0.0.0.0`, `::`) is reached
    /// on loopback.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: std::net::SocketAddr,
    /// Seconds to wait for the hand-off (connecting included); keep it below the pod's
    /// termination grace period, which also covers the agent's own shutdown.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 20,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub timeout: u64,
}

/// Flags of `sluice-agent broker`; each can also be set through its `SLUICE_*` variable.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Directory holding the queues' logs; created if missing, locked while the agent runs.
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: std::path::PathBuf,
    /// Address of the public gRPC API (port 0 picks a free port).
    #[arg(long, env = "SLUICE_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: std::net::SocketAddr,
    /// Address of the HTTP server for `/metrics` and `/healthz`.
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: std::net::SocketAddr,
    /// Size at which a partition's log segment is closed and a new one started, in bytes
    /// (suffixes such as `64MiB` are accepted).
    #[arg(long, env = "SLUICE_SEGMENT_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub segment_bytes: u64,
    /// When appends are fsynced. `always` (default): a publish is confirmed only after its
    /// group-commit fsync, so confirmed messages survive power loss. `interval:<ms>`: confirm after
    /// write(2) and fsync at most every <ms>; a power loss can lose that window (a process crash
    /// cannot). `never`: no fsync at all; for tests and benchmarks only.
    #[arg(long, env = "SLUICE_FSYNC", default_value = "always", value_parser = parse_fsync)]
    pub fsync: FsyncPolicy,
    /// Log output format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax, e.g. `info` (everything, dependencies included) or
    /// `sluice_agent=debug,warn`. The default keeps Sluice's own lines at info and every
    /// dependency at warn.
    #[arg(long, env = "SLUICE_LOG_LEVEL", default_value = LOG_LEVEL_DEFAULT)]
    pub log_level: String,
    /// This agent's name among its peers: a StatefulSet pod name such as `sluice-2`, whose
    /// number after the last `-` is its node id (its position in `--peers`).
    #[arg(long, env = "SLUICE_POD_NAME")]
    pub pod_name: Option<String>,
    /// Every agent's replication endpoint as `host:port`, comma-separated, in ordinal order
    /// (this agent's own included). Setting it turns cluster mode on; without it the agent
    /// serves alone, without replication.
    #[arg(
        long,
        env = "SLUICE_PEERS",
        value_delimiter = ',',
        requires = "pod_name"
    )]
    pub peers: Vec<String>,
    /// Address of the peers-only replication API (cluster mode).
    #[arg(long, env = "SLUICE_PEER_LISTEN", default_value = "0.0.0.0:7071")]
    pub peer_listen: std::net::SocketAddr,
    /// Where the other agents reach this agent's peer port (`host:port`). Default: this
    /// agent's `--peers` entry. Required for a joining agent, whose ordinal is beyond
    /// `--peers` (scale-out: it waits to be added through `Membership.AddAgent`).
    #[arg(long, env = "SLUICE_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// This agent's client address (`host:port`) that other agents give clients in redirects.
    /// Default: the host of this agent's `--peers` entry with the port of `--listen`.
    #[arg(long, env = "SLUICE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Agents each queue lives on (every partition of a queue on the same ones, chosen by
    /// rendezvous hashing over the JOINING and ACTIVE agents; decision 0014), at most the
    /// number of peers; also the fewest ACTIVE agents a drain leaves. Every agent of a cluster
    /// must be given the same value. Default: 3, or fewer when there are fewer peers.
    #[arg(
        long,
        env = "SLUICE_REPLICATION_FACTOR",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub replication_factor: Option<u32>,
    /// JSON file of queue definitions (what the operator's ConfigMap holds) declared at startup.
    #[arg(long, env = "SLUICE_QUEUES_FILE")]
    pub queues_file: Option<std::path::PathBuf>,
}

impl BrokerArgs {
    /// The storage knobs these flags select.
    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            segment_bytes: self.segment_bytes,
            fsync: self.fsync,
        }
    }
}

/// Format of the agent's log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// A flag value refused by one of the parsers below; clap prints it after the flag's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagValueError {
    /// `--fsync` got something other than its three forms.
    #[error("{value:?} is not one of `always`, `interval:<ms>`, `never`")]
    UnknownFsync {
        /// The value given.
        value: String,
    },
    /// `--fsync interval:<ms>` with a zero or non-numeric interval.
    #[error("interval {ms:?} must be a positive number of milliseconds")]
    BadFsyncInterval {
        /// The text after `interval:`.
        ms: String,
    },
    /// A byte size that does not parse.
    #[error("{value:?}: {reason}")]
    BadSize {
        /// The value given.
        value: String,
        /// The size parser's reason (it reports a message, not an error type).
        reason: String,
    },
    /// A byte size below what a segment needs.
    #[error("{value:?} is below the minimum of {minimum} bytes")]
    SizeTooSmall {
        /// The value given.
        value: String,
        /// The smallest size accepted.
        minimum: u64,
    },
}

/// Parses `always`, `never` or `interval:<ms>`.
pub fn parse_fsync(value: &str) -> Result<FsyncPolicy, FlagValueError> {
    match value {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        other => {
            let ms =
                other
                    .strip_prefix("interval:")
                    .ok_or_else(|| FlagValueError::UnknownFsync {
                        value: other.to_owned(),
                    })?;
            match ms.parse::<u64>() {
                Ok(ms) if ms > 0 => Ok(FsyncPolicy::Interval(Duration::from_millis(ms))),
                _ => Err(FlagValueError::BadFsyncInterval { ms: ms.to_owned() }),
            }
        }
    }
}

/// Parses a byte size such as `4096`, `64MiB` or `1GB`; at least 4 KiB so a segment holds a
/// record header and then some.
pub fn parse_bytes(value: &str) -> Result<u64, FlagValueError> {
    const MIN_SEGMENT_BYTES: u64 = 4096;
    let size: bytesize::ByteSize = value.parse().map_err(|reason| FlagValueError::BadSize {
        value: value.to_owned(),
        reason,
    })?;
    if size.as_u64() < MIN_SEGMENT_BYTES {
        return Err(FlagValueError::SizeTooSmall {
            value: value.to_owned(),
            minimum: MIN_SEGMENT_BYTES,
        });
    }
    Ok(size.as_u64())
}

/// The ordinal of a StatefulSet pod name: the digits after its last `-`; `None` when there are
/// none (or too many to be a node id).
pub fn ordinal(pod_name: &str) -> Option<u64> {
    let (_, digits) = pod_name.rsplit_once('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The ordinal of a StatefulSet pod name (the digits after its last `-`), which is the agent's
/// node id; the same rule as the broker's `--pod-name`. A clap value parser, so a bad name is a
/// usage error naming the flag.
pub fn parse_node_id(pod_name: &str) -> Result<u64, NoOrdinal> {
    ordinal(pod_name).ok_or_else(|| NoOrdinal {
        pod_name: pod_name.to_owned(),
    })
}

/// A `--pod-name` without a StatefulSet ordinal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{pod_name:?} has no ordinal after the last '-' (expected a StatefulSet pod name such as \"sluice-0\")"
)]
pub struct NoOrdinal {
    /// The name given.
    pub pod_name: String,
}

#[cfg(test)]
#[path = "config_test.rs"]
mod tests;
