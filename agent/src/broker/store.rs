//! The broker's files: queue spec files, opening queues and partitions from disk, setting a
//! corrupted replica aside, and the log openers that tests substitute.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message as _;
use sluice_proto::v1::QueueSpec;

use super::{Broker, BrokerOptions, io_error};
use crate::error::{BrokerError, PartitionOpenError, QueueOpenError};
use crate::layout::Layout;
use crate::log::{LogError, LogStore};
use crate::queue::partition::Partition;
use crate::queue::queue::Queue;
use crate::queue::spec::effective_spec;

/// Opens the log of one partition directory. The broker uses `FileLog`; tests substitute
/// in-memory logs that survive a "restart" of the broker.
pub trait LogOpener: Send + Sync + 'static {
    /// Opens (recovering) or creates the log in `dir`.
    fn open(&self, dir: &Path) -> Result<Arc<dyn LogStore>, LogError>;
}

/// Opens `FileLog`s with the broker's storage knobs.
#[derive(Debug)]
pub struct FileLogOpener {
    /// Segment size and fsync policy.
    pub config: crate::config::LogConfig,
}

impl LogOpener for FileLogOpener {
    fn open(&self, dir: &Path) -> Result<Arc<dyn LogStore>, LogError> {
        let (log, recovery) = crate::log::FileLog::open(dir, self.config)?;
        if recovery.truncated_bytes > 0 {
            tracing::warn!(dir = %dir.display(), bytes = recovery.truncated_bytes, "cut a torn tail (never confirmed)");
        }
        Ok(Arc::new(log))
    }
}

impl Broker {
    /// Creates a queue of a single agent: its directory, spec file and empty partitions.
    pub(super) fn create_queue(&self, spec: QueueSpec) -> Result<(), BrokerError> {
        let dir = self.layout.queue_dir(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
        write_spec(&self.layout, &spec)?;
        let queue =
            open_partitions(&self.layout, &self.options, spec.clone()).map_err(|cause| {
                BrokerError::QueueNotCreated {
                    queue: spec.name.clone(),
                    cause,
                }
            })?;
        let queue = Arc::new(queue);
        self.write_queues().insert(spec.name.clone(), queue.clone());
        self.start_timer(queue);
        Ok(())
    }
}

/// Writes the spec atomically (a crash leaves the old spec or the new one).
pub(super) fn write_spec(layout: &Layout, spec: &QueueSpec) -> Result<(), LogError> {
    crate::log::replace_file(
        &layout.queue_spec(&spec.name),
        &layout.queue_spec_tmp(&spec.name),
        &spec.encode_to_vec(),
    )
}

/// Loads one queue directory; `None` for a directory without a spec (a create that crashed
/// before its spec was written holds no messages). A queue whose spec or data cannot be read
/// is returned offline, with the reason.
pub(super) fn open_queue(layout: &Layout, options: &BrokerOptions, name: &str) -> Option<Queue> {
    let path = layout.queue_spec(name);
    let unnamed = || QueueSpec {
        name: name.to_owned(),
        ..QueueSpec::default()
    };
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(dir = %layout.queue_dir(name).display(), "queue directory without spec.pb ignored");
            return None;
        }
        Err(source) => {
            return Some(Queue::offline(
                unnamed(),
                QueueOpenError::ReadSpec { path, source },
            ));
        }
    };
    let stored = match QueueSpec::decode(bytes.as_slice()) {
        Ok(spec) => spec,
        Err(source) => {
            return Some(Queue::offline(
                unnamed(),
                QueueOpenError::DecodeSpec { path, source },
            ));
        }
    };
    let spec = match effective_spec(&stored) {
        Ok(spec) if spec.name == name => spec,
        Ok(spec) => {
            let named = spec.name.clone();
            return Some(Queue::offline(
                spec,
                QueueOpenError::SpecNamesOther { path, named },
            ));
        }
        Err(e) => {
            let source = Box::new(e);
            return Some(Queue::offline(
                stored,
                QueueOpenError::InvalidSpec { path, source },
            ));
        }
    };
    Some(match open_partitions(layout, options, spec.clone()) {
        Ok(queue) => queue,
        Err(reason) => {
            tracing::error!(queue = name, %reason, "queue kept offline");
            Queue::offline(spec, reason)
        }
    })
}

/// Opens every partition of a single agent's queue, replaying its log; the error names the
/// partition and, for corruption, the file and offset.
fn open_partitions(
    layout: &Layout,
    options: &BrokerOptions,
    spec: QueueSpec,
) -> Result<Queue, QueueOpenError> {
    let config = Queue::state_config(&spec);
    let mut partitions = Vec::with_capacity(spec.partitions as usize);
    for id in 0..spec.partitions {
        let in_partition = |source: PartitionOpenError| QueueOpenError::Partition {
            partition: id,
            source,
        };
        let dir = layout.partition_dir(&spec.name, id);
        let log = options
            .logs
            .open(&dir)
            .map_err(|e| in_partition(e.into()))?;
        let partition = Partition::open(&spec.name, id, log, config, options.clock.clone())
            .map_err(|e| in_partition(PartitionOpenError::Replay(Box::new(e))))?;
        partitions.push(Arc::new(partition));
    }
    Ok(Queue::new(spec, partitions))
}

/// Opens the log of this agent's replica of partition `id` of `queue`. A log that fails its
/// checksums is set aside (for inspection) and an empty one opened in its place: the other
/// replicas hold every committed entry, so the leader rebuilds this one as if its disk had
/// been replaced. The vote is kept, so the replica never votes twice in a term.
pub(super) fn open_replica_log(
    layout: &Layout,
    options: &BrokerOptions,
    queue: &str,
    id: u32,
) -> Result<Arc<dyn LogStore>, PartitionOpenError> {
    let dir = layout.partition_dir(queue, id);
    match options.logs.open(&dir) {
        Ok(log) => Ok(log),
        Err(cause @ LogError::Corrupted { .. }) => {
            let aside = match quarantine(layout, queue, id) {
                Ok(aside) => aside,
                Err(source) => return Err(PartitionOpenError::Quarantine { cause, source }),
            };
            tracing::error!(queue, partition = id, error = %cause, moved_to = %aside.display(), "corrupted replica set aside; rebuilding it from its peers");
            forget_log_positions(&layout.partition_raft_dir(queue, id))?;
            Ok(options.logs.open(&dir)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Keeps only the vote of a replica whose log was set aside: its commit hint and purge point
/// described entries it no longer has.
fn forget_log_positions(raft_dir: &Path) -> Result<(), crate::replication::meta::ReplicaMetaError> {
    let file = crate::replication::meta::MetaFile::new(raft_dir);
    let saved = file.load()?;
    file.save(&sluice_proto::peer::v1::ReplicaMeta {
        vote: saved.vote,
        ..Default::default()
    })
}

/// Renames a damaged partition log directory to its quarantine name (`p-NNNN.corrupt-<unix
/// seconds>`); returns the new path.
fn quarantine(layout: &Layout, queue: &str, id: u32) -> std::io::Result<PathBuf> {
    let dir = layout.partition_dir(queue, id);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = layout.partition_quarantine_dir(queue, id, stamp);
    std::fs::rename(&dir, &aside)?;
    std::fs::File::open(layout.queue_dir(queue))?.sync_all()?;
    Ok(aside)
}
