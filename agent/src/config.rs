//! Configuration: command-line flags (each also read from a `SLUICE_*` variable) and the
//! durability knobs.

use std::time::Duration;

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
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve queues from a local data directory (one pod of a MessageQueue's StatefulSet).
    Broker(BrokerArgs),
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
    /// Log filter in `tracing` syntax, e.g. `info` or `sluice_agent=debug,info`.
    #[arg(long, env = "SLUICE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
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

/// Parses `always`, `never` or `interval:<ms>`.
pub fn parse_fsync(value: &str) -> Result<FsyncPolicy, String> {
    match value {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        other => {
            let ms = other.strip_prefix("interval:").ok_or_else(|| {
                format!("{other:?} is not one of `always`, `interval:<ms>`, `never`")
            })?;
            match ms.parse::<u64>() {
                Ok(ms) if ms > 0 => Ok(FsyncPolicy::Interval(Duration::from_millis(ms))),
                _ => Err(format!(
                    "interval {ms:?} must be a positive number of milliseconds"
                )),
            }
        }
    }
}

/// Parses a byte size such as `4096`, `64MiB` or `1GB`; at least 4 KiB so a segment holds a
/// record header and then some.
pub fn parse_bytes(value: &str) -> Result<u64, String> {
    const MIN_SEGMENT_BYTES: u64 = 4096;
    let size: bytesize::ByteSize = value.parse().map_err(|e| format!("{value:?}: {e}"))?;
    if size.as_u64() < MIN_SEGMENT_BYTES {
        return Err(format!(
            "{value:?} is below the minimum of {MIN_SEGMENT_BYTES} bytes"
        ));
    }
    Ok(size.as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn fsync_policy_parses_every_documented_form_and_rejects_others() {
        assert_eq!(parse_fsync("always"), Ok(FsyncPolicy::Always));
        assert_eq!(parse_fsync("never"), Ok(FsyncPolicy::Never));
        assert_eq!(
            parse_fsync("interval:5"),
            Ok(FsyncPolicy::Interval(Duration::from_millis(5)))
        );
        assert!(parse_fsync("interval:0").is_err());
        assert!(parse_fsync("interval:x").is_err());
        assert!(parse_fsync("sometimes").is_err());
    }

    #[test]
    fn segment_size_accepts_units_and_refuses_tiny_values() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 * 1024 * 1024));
        assert_eq!(parse_bytes("8192"), Ok(8192));
        assert!(parse_bytes("12").is_err());
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn broker_flags_have_documented_defaults() {
        let args = Args::try_parse_from(["sluice-agent", "broker", "--data-dir", "/tmp/x"])
            .expect("minimal flags parse");
        let Command::Broker(b) = args.command;
        assert_eq!(b.listen.to_string(), "0.0.0.0:7070");
        assert_eq!(b.metrics_listen.to_string(), "0.0.0.0:9090");
        assert_eq!(b.log_config(), LogConfig::default());
        assert_eq!(b.log_format, LogFormat::Text);
    }
}
