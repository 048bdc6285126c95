//! Every path under the data directory is built here, so the on-disk layout is in one place:
//!
//! ```text
//! <data>/LOCK                                   exclusive lock of the running agent
//! <data>/meta/log/, <data>/meta/raft-meta.pb     the cluster catalog's Raft group (cluster mode)
//! <data>/queues/<queue>/spec.pb                 the queue's QueueSpec (protobuf), atomically replaced
//! <data>/queues/<queue>/spec.pb.tmp             the next spec while it is written (renamed over spec.pb)
//! <data>/queues/<queue>/p-0003/                 partition 3's log directory
//! <data>/queues/<queue>/p-0003/00000000000000000001.log   segment whose first entry has index 1
//! <data>/queues/<queue>/p-0003/00000000000000000900.log.reset   the staged first segment of a log reset (its commit point)
//! <data>/queues/<queue>/p-0003.raft/            partition 3's Raft metadata (cluster mode):
//! <data>/queues/<queue>/p-0003.raft/raft-meta.pb    vote, commit hint, purge point
//! <data>/queues/<queue>/p-0003.raft/membership.pb   the group's last applied membership
//! <dir>/<file>.tmp                              any atomically replaced file while it is written
//! <data>/queues/<queue>/p-0003.corrupt-<t>/     a corrupted log set aside at unix time <t>, kept for inspection
//! ```
//!
//! Segment names are the zero-padded base index, so a directory listing sorts in log order.

use std::path::{Path, PathBuf};

/// Paths of one agent's data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// Suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".log";

/// Suffix of the staged first segment of a log reset (`<base>.log.reset`).
pub const RESET_SUFFIX: &str = ".reset";

/// The vote, commit hint and purge point of a Raft group, in its metadata directory.
pub const RAFT_META_FILE: &str = "raft-meta.pb";

/// A Raft group's last applied membership, in its metadata directory.
pub const MEMBERSHIP_FILE: &str = "membership.pb";

/// The meta group's log directory, inside [`Layout::meta_group_dir`].
pub const META_GROUP_LOG_DIR: &str = "log";

impl Layout {
    /// A layout rooted at `root` (nothing is created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The data directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The lock file that keeps two agents off one directory.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join("LOCK")
    }

    /// Directory of the cluster's meta Raft group (`log/` and its `raft-meta.pb`).
    pub fn meta_group_dir(&self) -> PathBuf {
        self.root.join("meta")
    }

    /// Directory holding all queues.
    pub fn queues_dir(&self) -> PathBuf {
        self.root.join("queues")
    }

    /// Directory of one queue.
    pub fn queue_dir(&self, queue: &str) -> PathBuf {
        self.queues_dir().join(queue)
    }

    /// The queue's persisted spec.
    pub fn queue_spec(&self, queue: &str) -> PathBuf {
        self.queue_dir(queue).join("spec.pb")
    }

    /// The spec being written, before it is renamed over [`Layout::queue_spec`].
    pub fn queue_spec_tmp(&self, queue: &str) -> PathBuf {
        replacement_tmp(&self.queue_spec(queue))
    }

    /// Log directory of one partition.
    pub fn partition_dir(&self, queue: &str, partition: u32) -> PathBuf {
        self.queue_dir(queue).join(format!("p-{partition:04}"))
    }

    /// Raft metadata directory of this agent's replica of one partition (cluster mode).
    pub fn partition_raft_dir(&self, queue: &str, partition: u32) -> PathBuf {
        self.queue_dir(queue).join(format!("p-{partition:04}.raft"))
    }

    /// Where a corrupted partition log is set aside at unix time `stamp` (seconds).
    pub fn partition_quarantine_dir(&self, queue: &str, partition: u32, stamp: u64) -> PathBuf {
        self.queue_dir(queue)
            .join(format!("p-{partition:04}.corrupt-{stamp}"))
    }
}

/// File name of the segment whose first entry has `base_index`.
pub fn segment_file_name(base_index: u64) -> String {
    format!("{base_index:020}{SEGMENT_SUFFIX}")
}

/// File name of the staged first segment of a reset to `base_index`.
pub fn staged_segment_file_name(base_index: u64) -> String {
    format!("{}{RESET_SUFFIX}", segment_file_name(base_index))
}

/// The temporary file an atomic replacement of `path` writes first (`<path>.tmp`).
pub fn replacement_tmp(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Parses a segment file name back into its base index; `None` for other files.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_paths_sit_side_by_side_in_the_queue_directory() {
        let layout = Layout::new("/data");
        let dir = layout.partition_dir("q", 3);
        assert_eq!(dir, Path::new("/data/queues/q/p-0003"));
        assert_eq!(
            layout.partition_raft_dir("q", 3),
            dir.with_extension("raft")
        );
        assert_eq!(
            layout.partition_quarantine_dir("q", 3, 17),
            dir.with_extension("corrupt-17")
        );
        assert_eq!(
            layout.queue_spec_tmp("q"),
            layout.queue_spec("q").with_extension("pb.tmp")
        );
    }

    #[test]
    fn segment_names_round_trip_and_sort_in_log_order() {
        let a = segment_file_name(9);
        let b = segment_file_name(10);
        assert!(a < b, "lexical order must follow index order");
        assert_eq!(parse_segment_file_name(&a), Some(9));
        assert_eq!(parse_segment_file_name("12.log"), None);
        assert_eq!(parse_segment_file_name("00000000000000000001.idx"), None);
    }
}
