//! [`FileCache`]: the read handles of one log's segment files, kept open and bounded.
//!
//! Readers use positional reads on shared handles, so one handle per segment serves every
//! reader at once. Only the [`MAX_OPEN_READ_FILES`] most recently read segments stay open (plus
//! the writer's handle of the active segment): a partition with a deep backlog may have hundreds
//! of segments, and an agent has many partitions, so "all open" would run into the fd limit.
//! Consumers read near the head and the tail, so a small LRU hits almost always.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::layout::segment_file_name;

use super::LogError;

/// Read handles kept open per log.
pub const MAX_OPEN_READ_FILES: usize = 8;

/// Open read-only handles of segment files, most recently used last.
#[derive(Debug)]
pub struct FileCache {
    dir: PathBuf,
    open: Mutex<VecDeque<(u64, Arc<File>)>>,
}

impl FileCache {
    /// An empty cache for segments in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            open: Mutex::new(VecDeque::with_capacity(MAX_OPEN_READ_FILES)),
        }
    }

    /// Path of the segment with `base`.
    pub fn path(&self, base: u64) -> PathBuf {
        self.dir.join(segment_file_name(base))
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A handle of the segment with `base`, opening it (and closing the least recently used
    /// one) when needed.
    pub fn get(&self, base: u64) -> Result<Arc<File>, LogError> {
        let mut open = self.lock();
        if let Some(at) = open.iter().position(|(b, _)| *b == base)
            && let Some(hit) = open.remove(at)
        {
            let file = Arc::clone(&hit.1);
            open.push_back(hit);
            return Ok(file);
        }
        let path = self.path(base);
        let file = Arc::new(File::open(&path).map_err(|source| LogError::Io {
            op: "open",
            path,
            source,
        })?);
        if open.len() >= MAX_OPEN_READ_FILES {
            open.pop_front();
        }
        open.push_back((base, Arc::clone(&file)));
        Ok(file)
    }

    /// Forgets handles of segments with `base >= from` (they are being deleted: a later segment
    /// with the same name must not be read through a handle of the old file).
    pub fn evict_from(&self, from: u64) {
        self.lock().retain(|(base, _)| *base < from);
    }

    /// Forgets the handle of the segment with `base`.
    pub fn evict(&self, base: u64) {
        self.lock().retain(|(b, _)| *b != base);
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<(u64, Arc<File>)>> {
        // The deque is valid after any panic (each operation is one push/pop/retain).
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
