//! Durable whole-file replacement for the small files beside the logs (queue specs, Raft
//! metadata, memberships).

use std::fs;
use std::io::Write;
use std::path::Path;

use super::LogError;

/// Durably replaces `path` with `bytes` through `tmp` (temp file, fsync, rename, directory
/// fsync): a crash leaves the old file or the new one, never a mix. The directory must exist:
/// creating it here would bring back the directory of a queue or replica deleted meanwhile.
pub fn replace_file(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<(), LogError> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| LogError::Io { op, path, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = fs::File::create(tmp).map_err(io("create", tmp))?;
    file.write_all(bytes).map_err(io("write", tmp))?;
    file.sync_all().map_err(io("fsync", tmp))?;
    fs::rename(tmp, path).map_err(io("rename", path))?;
    // The rename is durable only once the directory entry is.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", dir))?;
    Ok(())
}
