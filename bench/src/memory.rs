//! Resident memory of a server's process tree, read from `/proc`.
//!
//! Servers are measured as trees because some are more than one process: `rabbitmq-server` is a
//! shell script whose Erlang VM (`beam.smp`) is a grandchild. The figures are those of the
//! tree's largest process (the server proper). Summing the tree would count pages twice that a
//! fork shares with its parent (Redis forks to rewrite its AOF, and the child's RSS includes
//! the parent's dataset), while the helpers left out (the script, `erl_child_setup`) hold a few
//! MiB at most.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Memory figures of a process tree, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size now (`VmRSS`).
    pub rss_bytes: u64,
    /// Peak resident set size since start (`VmHWM`).
    pub peak_rss_bytes: u64,
}

impl Memory {
    /// Reads the memory of the largest process among `root` and its descendants. Processes
    /// that exit while being read are skipped (they no longer hold memory).
    pub fn of_tree(root: u32) -> Result<Memory> {
        let mut largest = Memory::default();
        for pid in descendants_and_self(root)? {
            let path = PathBuf::from(format!("/proc/{pid}/status"));
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let memory = parse_status(&text, &path)?;
                    largest.rss_bytes = largest.rss_bytes.max(memory.rss_bytes);
                    largest.peak_rss_bytes = largest.peak_rss_bytes.max(memory.peak_rss_bytes);
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(Error::Io { path, source }),
            }
        }
        Ok(largest)
    }
}

/// `root` followed by every process whose parent chain leads to it.
fn descendants_and_self(root: u32) -> Result<Vec<u32>> {
    let proc_dir = Path::new("/proc");
    let entries = std::fs::read_dir(proc_dir).map_err(|source| Error::Io {
        path: proc_dir.into(),
        source,
    })?;
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path().join("stat");
        // A process may exit between listing and reading; it is then no longer part of any tree.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        children
            .entry(parse_ppid(&stat, &path)?)
            .or_default()
            .push(pid);
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        if let Some(kids) = children.get(&tree[next]) {
            tree.extend(kids);
        }
        next += 1;
    }
    Ok(tree)
}

/// The parent pid from `/proc/<pid>/stat`: the second field after the command name, which is
/// parenthesised and may itself contain spaces and parentheses, hence the last `)`.
fn parse_ppid(stat: &str, path: &Path) -> Result<u32> {
    let bad = |reason: &str| Error::Proc {
        path: path.into(),
        reason: reason.into(),
    };
    let after_comm = stat
        .rfind(')')
        .map(|at| &stat[at + 1..])
        .ok_or_else(|| bad("no ')'"))?;
    let mut fields = after_comm.split_whitespace();
    let _state = fields.next().ok_or_else(|| bad("no state field"))?;
    fields
        .next()
        .ok_or_else(|| bad("no ppid field"))?
        .parse()
        .map_err(|_| bad("ppid is not a number"))
}

/// `VmRSS` and `VmHWM` from `/proc/<pid>/status` (kernel threads have neither: zero).
fn parse_status(text: &str, path: &Path) -> Result<Memory> {
    let mut memory = Memory::default();
    for line in text.lines() {
        let target = if let Some(rest) = line.strip_prefix("VmRSS:") {
            (&mut memory.rss_bytes, rest)
        } else if let Some(rest) = line.strip_prefix("VmHWM:") {
            (&mut memory.peak_rss_bytes, rest)
        } else {
            continue;
        };
        let (slot, rest) = target;
        let kib = rest
            .trim()
            .strip_suffix("kB")
            .and_then(|number| number.trim().parse::<u64>().ok())
            .ok_or_else(|| Error::Proc {
                path: path.into(),
                reason: format!("unexpected memory line {line:?}"),
            })?;
        *slot = kib * 1024;
    }
    Ok(memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_in_kibibytes() {
        let text = "Name:\tbeam.smp\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t4\n";
        let memory = parse_status(text, Path::new("status")).expect("parses");
        assert_eq!(
            memory,
            Memory {
                rss_bytes: 1024 * 1024,
                peak_rss_bytes: 2048 * 1024
            }
        );
    }

    #[test]
    fn a_garbled_memory_line_names_the_file() {
        let err = parse_status("VmRSS:\tlots\n", Path::new("/proc/7/status")).expect_err("refused");
        assert!(err.to_string().contains("/proc/7/status"), "{err}");
    }

    #[test]
    fn ppid_is_found_after_a_command_name_with_parentheses() {
        let stat = "42 (a) b (c)) S 17 42 42 0 -1";
        assert_eq!(parse_ppid(stat, Path::new("stat")).expect("parses"), 17);
    }

    #[test]
    fn this_process_has_resident_memory() {
        let memory = Memory::of_tree(std::process::id()).expect("reads /proc");
        assert!(memory.rss_bytes > 0);
        assert!(memory.peak_rss_bytes >= memory.rss_bytes);
    }

    #[test]
    fn a_child_process_is_part_of_the_tree() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawns sleep");
        let tree = descendants_and_self(std::process::id()).expect("reads /proc");
        let _ = child.kill();
        let _ = child.wait();
        assert!(tree.contains(&child.id()));
    }
}
