//! Benchmark harness: Sluice against RabbitMQ, NATS JetStream and Redis on this machine.
//!
//! Every system is started as a real server process on loopback with its data in a temporary
//! directory, driven through the same workload (pipelined confirmed publishing from several
//! producers, consume+ack with several consumers, open-loop confirm latency at a fixed rate),
//! and measured the same way (wall-clock throughput, an HDR histogram of confirm latency, the
//! server's peak resident memory from `/proc`). The result is a Markdown table.
//!
//! # Layout
//! - [`config`]: command-line flags.
//! - [`process`]: spawning, probing, killing and stopping server processes.
//! - [`cluster`]: several Sluice agents on loopback forming a cluster; kill and restart one.
//! - [`memory`]: resident memory of a process tree from `/proc/<pid>/status`.
//! - [`stats`]: throughput figures and the latency histogram.
//! - [`driver`]: the small trait every system's client side implements.
//! - [`workload`]: the measured phases, written once against [`driver::Driver`].
//! - [`peers`]: one module per system: start its server, implement the driver.
//! - [`report`]: rows and the Markdown tables (results and Sluice/peer ratios).
//! - [`suite`]: runs the selected systems one after another and collects rows.
//! - [`failover`]: leader kills under load and the time to the successor's first confirm.

pub mod cluster;
pub mod config;
pub mod driver;
pub mod failover;
pub mod memory;
pub mod peers;
pub mod process;
pub mod report;
pub mod scale;
pub mod stats;
pub mod suite;
pub mod workload;

use std::path::PathBuf;

/// Errors of the harness. Each names the system, file or phase it came from.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A server process could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        /// Program that failed to start.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A server did not become ready in time or exited early.
    #[error("{server} not ready: {reason} (log: {})", log.display())]
    NotReady {
        /// Server name.
        server: String,
        /// What was observed.
        reason: String,
        /// Where its output went.
        log: PathBuf,
    },
    /// Reading or writing a file of the harness (config, data dir, `/proc`) failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `/proc` file did not have the expected shape.
    #[error("{}: {reason}", path.display())]
    Proc {
        /// File concerned.
        path: PathBuf,
        /// What was unexpected.
        reason: String,
    },
    /// A client call to a system under test failed.
    #[error("{system}: {operation}: {source}")]
    Client {
        /// System under test.
        system: &'static str,
        /// What was being done (`publish`, `consume`, `declare queue`...).
        operation: &'static str,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A phase did not finish within its time limit.
    #[error("{phase} did not finish within {limit_secs} s")]
    Timeout {
        /// Phase name.
        phase: &'static str,
        /// The limit.
        limit_secs: u64,
    },
    /// A worker task panicked or was cancelled.
    #[error("{phase}: worker task failed: {source}")]
    Task {
        /// Phase name.
        phase: &'static str,
        /// The join error.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Result with the harness [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps a client error of `system` during `operation`.
    pub fn client(
        system: &'static str,
        operation: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Client {
            system,
            operation,
            source: source.into(),
        }
    }
}
