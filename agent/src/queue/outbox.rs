//! [`Outbox`]: the commands a replicated partition's leader applied and has not yet handed to
//! Raft, grouped into the entries they will be proposed as.
//!
//! The leader applies each command at once (decision 0010) at the next position of the *open*
//! entry; the proposer takes the open entry whole when Raft can take another entry, so while
//! openraft writes one entry the next one fills up (group commit, decision 0013). An entry is
//! sealed early when it reaches [`MAX_ENTRY_BYTES`] or [`MAX_COMMANDS_PER_ENTRY`].

use std::collections::VecDeque;

use bytes::Bytes;

use super::entry::{MAX_COMMANDS_PER_ENTRY, offset};

/// Bytes of commands after which an entry is sealed: large enough that one fsync carries
/// thousands of small messages, small enough that an AppendEntries (4 MiB) holds several.
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// An entry the leader built.
#[derive(Debug)]
pub struct Staged {
    /// Its log index.
    pub index: u64,
    /// The leadership epoch its commands were applied in.
    pub epoch: u64,
    /// Its encoded commands, in position order.
    pub commands: Vec<Bytes>,
    /// When its first command was staged (how long commands wait for the proposer).
    pub opened: std::time::Instant,
    bytes: usize,
}

impl Staged {
    /// An entry of no command at `index`: fills an index reserved for a membership change the
    /// change did not use.
    pub fn empty(index: u64, epoch: u64) -> Self {
        Self {
            index,
            epoch,
            commands: Vec::new(),
            opened: std::time::Instant::now(),
            bytes: 0,
        }
    }
}

/// Entries built by the leader, oldest first; the last one is open unless `sealed_last`.
#[derive(Debug, Default)]
pub struct Outbox {
    entries: VecDeque<Staged>,
    sealed_last: bool,
}

impl Outbox {
    /// Seals the open entry if a command of `len` bytes would not fit; returns its index.
    pub fn seal_if_full(&mut self, len: usize) -> Option<u64> {
        let open = self.entries.back().filter(|_| !self.sealed_last)?;
        let full = open.commands.len() >= MAX_COMMANDS_PER_ENTRY
            || (open.bytes > 0 && open.bytes + len > MAX_ENTRY_BYTES);
        full.then(|| {
            self.sealed_last = true;
            open.index
        })
    }

    /// Adds a command to the open entry, opening entry `next_entry` when none is open; returns
    /// the command's offset.
    pub fn push(&mut self, epoch: u64, next_entry: u64, data: Bytes) -> u64 {
        if self.sealed_last || self.entries.is_empty() {
            self.entries.push_back(Staged {
                index: next_entry,
                epoch,
                commands: Vec::new(),
                opened: std::time::Instant::now(),
                bytes: 0,
            });
            self.sealed_last = false;
        }
        let open = self
            .entries
            .back_mut()
            .expect("an entry was opened above when none was open");
        let slot = open.commands.len() as u32;
        open.bytes += data.len();
        open.commands.push(data);
        offset(open.index, slot)
    }

    /// Takes the oldest entry; when it is the open one, it is sealed by this.
    pub fn take(&mut self) -> Option<Staged> {
        let staged = self.entries.pop_front()?;
        crate::replication::timing::record("outbox_wait", staged.opened.elapsed());
        crate::replication::timing::record_value("entry_commands", staged.commands.len() as u64);
        if self.entries.is_empty() {
            self.sealed_last = false;
        }
        Some(staged)
    }

    /// Whether nothing waits for the proposer.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::entry::{entry_of, slot_of};

    #[test]
    fn commands_fill_the_open_entry_until_it_is_taken() {
        let mut outbox = Outbox::default();
        let a = outbox.push(1, 5, Bytes::from_static(b"a"));
        let b = outbox.push(1, 5, Bytes::from_static(b"b"));
        assert_eq!(
            (entry_of(a), slot_of(a), entry_of(b), slot_of(b)),
            (5, 0, 5, 1)
        );
        let taken = outbox.take().expect("staged");
        assert_eq!((taken.index, taken.commands.len()), (5, 2));
        assert!(outbox.is_empty());
        let c = outbox.push(1, 6, Bytes::from_static(b"c"));
        assert_eq!((entry_of(c), slot_of(c)), (6, 0));
    }

    #[test]
    fn a_full_entry_is_sealed_and_the_next_command_opens_the_next_entry() {
        let mut outbox = Outbox::default();
        outbox.push(1, 3, Bytes::from(vec![0; MAX_ENTRY_BYTES - 10]));
        assert_eq!(outbox.seal_if_full(5), None);
        assert_eq!(outbox.seal_if_full(11), Some(3));
        let next = outbox.push(1, 4, Bytes::from_static(b"x"));
        assert_eq!((entry_of(next), slot_of(next)), (4, 0));
        assert_eq!(outbox.take().map(|s| s.index), Some(3));
        assert_eq!(outbox.take().map(|s| s.index), Some(4));
        assert!(outbox.take().is_none());
    }

    #[test]
    fn one_oversized_command_still_gets_an_entry_of_its_own() {
        let mut outbox = Outbox::default();
        assert_eq!(outbox.seal_if_full(MAX_ENTRY_BYTES * 2), None);
        outbox.push(1, 1, Bytes::from(vec![0; MAX_ENTRY_BYTES * 2]));
        assert_eq!(outbox.seal_if_full(1), Some(1));
    }
}
