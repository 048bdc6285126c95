//! The vote, purge point and committed hint of one replica, in a small file replaced
//! atomically.
//!
//! Raft must never forget a vote (it could vote twice in one term), so the file is written to a
//! temporary name, fsynced, renamed over the old one and the directory fsynced: a crash leaves
//! either the old or the new content, never a torn one.

use std::fs;
use std::path::{Path, PathBuf};

use prost::Message;
use sluice_proto::peer::v1::ReplicaMeta;

use crate::layout::RAFT_META_FILE;

/// Errors reading or writing the meta file; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaMetaError {
    /// An I/O operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be replaced.
    #[error(transparent)]
    Write(#[from] crate::log::LogError),
    /// The file exists but does not decode (it is only ever replaced whole, so this is damage).
    #[error("{path} does not decode: {source}")]
    Corrupted {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: prost::DecodeError,
    },
}

/// The meta file of one replica.
#[derive(Debug, Clone)]
pub struct MetaFile {
    dir: PathBuf,
}

impl MetaFile {
    /// The meta file inside `dir`, which must exist when the file is saved (see
    /// [`MetaFile::create_dir`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Creates the file's directory. Done once, when a replica is opened: a save never
    /// creates it, so a late write (a vote or snapshot saved while a removed replica's Raft
    /// stops) cannot bring back a directory that was deleted with the replica.
    pub fn create_dir(&self) -> Result<(), ReplicaMetaError> {
        fs::create_dir_all(&self.dir).map_err(|source| ReplicaMetaError::Io {
            op: "create",
            path: self.dir.clone(),
            source,
        })
    }

    /// Path of the file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(RAFT_META_FILE)
    }

    /// Reads the saved meta; the default when the file does not exist yet.
    pub fn load(&self) -> Result<ReplicaMeta, ReplicaMetaError> {
        let path = self.path();
        match fs::read(&path) {
            Ok(bytes) => ReplicaMeta::decode(bytes.as_slice())
                .map_err(|source| ReplicaMetaError::Corrupted { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ReplicaMeta::default()),
            Err(source) => Err(ReplicaMetaError::Io {
                op: "read",
                path,
                source,
            }),
        }
    }

    /// Durably replaces the file with `meta`.
    pub fn save(&self, meta: &ReplicaMeta) -> Result<(), ReplicaMetaError> {
        replace_file(&self.dir, RAFT_META_FILE, &meta.encode_to_vec())
    }
}

/// Durably replaces `dir/name` with `bytes` (see [`crate::log::replace_file`]); the
/// temporary file is `dir/name.tmp`.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), ReplicaMetaError> {
    let path = dir.join(name);
    crate::log::replace_file(&path, &crate::layout::replacement_tmp(&path), bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::peer::v1::{LogId, Vote};

    #[test]
    fn a_saved_meta_is_read_back_and_a_missing_file_reads_as_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = MetaFile::new(dir.path().join("p0"));
        assert_eq!(file.load().expect("load"), ReplicaMeta::default());
        file.create_dir().expect("create the directory");
        let meta = ReplicaMeta {
            vote: Some(Vote {
                term: 3,
                node_id: Some(2),
                committed: true,
            }),
            purged: Some(LogId { term: 2, index: 40 }),
            committed: Some(LogId { term: 3, index: 57 }),
        };
        file.save(&meta).expect("save");
        assert_eq!(file.load().expect("load"), meta);
    }

    #[test]
    fn a_damaged_meta_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = MetaFile::new(dir.path());
        fs::write(file.path(), [0xff, 0xff, 0xff]).expect("write");
        let err = file.load().unwrap_err();
        assert!(err.to_string().contains(RAFT_META_FILE), "{err}");
    }
}
