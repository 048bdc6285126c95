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
        Self { segment_bytes: SEGMENT_BYTES_DEFAULT, fsync: FsyncPolicy::Always }
    }
}
