//! [`MemLog`]: the in-memory [`LogStore`], for fast tests of the layers above the storage engine.
//!
//! It follows the same contract as `FileLog` (the conformance suite runs against both) except
//! that everything is "durable" as soon as it is appended and nothing survives the process.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

use super::{Durability, Entry, LogError, LogStore, check_entry_sizes};

/// An in-memory log. Appends are durable at once; purge drops exactly the entries below the
/// given index (there are no segments to round to).
#[derive(Debug)]
pub struct MemLog {
    /// Entries `first..first + entries.len()`.
    state: Mutex<MemState>,
    /// Published after every append/truncate; `durable_next == next_index()` at rest.
    durability: watch::Sender<Durability>,
}

#[derive(Debug)]
struct MemState {
    /// Index of `entries[0]` (or of the next append when empty).
    first: u64,
    entries: VecDeque<Entry>,
    /// Sum of `data.len()` over `entries`.
    bytes: u64,
}

impl MemState {
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    fn get(&self, index: u64) -> Option<&Entry> {
        let offset = index.checked_sub(self.first)?;
        self.entries.get(usize::try_from(offset).ok()?)
    }
}

impl MemLog {
    /// An empty log whose first entry will get index 1.
    pub fn new() -> Self {
        let (durability, _) = watch::channel(Durability {
            durable_next: 1,
            failure: None,
        });
        Self {
            state: Mutex::new(MemState {
                first: 1,
                entries: VecDeque::new(),
                bytes: 0,
            }),
            durability,
        }
    }

    fn state(&self) -> MutexGuard<'_, MemState> {
        // A panic while holding the lock cannot leave MemState half-updated in a way that
        // breaks its invariants (each mutation is a single push/pop/truncate), so poisoning is
        // ignored rather than propagated as a panic into every later caller.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish_durable(&self, next: u64) {
        self.durability.send_modify(|d| d.durable_next = next);
    }
}

impl Default for MemLog {
    fn default() -> Self {
        Self::new()
    }
}

impl LogStore for MemLog {
    fn append(&self, term: u64, data: &[Bytes]) -> Result<u64, LogError> {
        check_entry_sizes(data)?;
        let mut state = self.state();
        let first_new = state.next();
        for (index, item) in (first_new..).zip(data) {
            state.bytes += item.len() as u64;
            state.entries.push_back(Entry {
                index,
                term,
                data: item.clone(),
            });
        }
        let next = state.next();
        drop(state);
        self.publish_durable(next);
        Ok(first_new)
    }

    fn durability(&self) -> watch::Receiver<Durability> {
        self.durability.subscribe()
    }

    fn read(&self, index: u64) -> Result<Option<Entry>, LogError> {
        Ok(self.state().get(index).cloned())
    }

    fn read_range(
        &self,
        from: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, LogError> {
        let state = self.state();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut index = from;
        while out.len() < max_entries {
            let Some(entry) = state.get(index) else { break };
            bytes = bytes.saturating_add(entry.data.len());
            out.push(entry.clone());
            if bytes >= max_bytes {
                break;
            }
            index += 1;
        }
        Ok(out)
    }

    fn first_index(&self) -> u64 {
        self.state().first
    }

    fn next_index(&self) -> u64 {
        self.state().next()
    }

    fn purge_before(&self, index: u64) -> Result<u64, LogError> {
        let mut state = self.state();
        while state.first < index {
            let Some(entry) = state.entries.pop_front() else {
                break;
            };
            state.bytes -= entry.data.len() as u64;
            state.first += 1;
        }
        Ok(state.first)
    }

    fn truncate_from(&self, index: u64) -> Result<(), LogError> {
        let mut state = self.state();
        let (first, next) = (state.first, state.next());
        if index < first {
            return Err(LogError::OutOfRange { index, first, next });
        }
        while state.next() > index {
            if let Some(entry) = state.entries.pop_back() {
                state.bytes -= entry.data.len() as u64;
            }
        }
        let next = state.next();
        drop(state);
        self.publish_durable(next);
        Ok(())
    }

    fn reset(&self, first_index: u64) -> Result<(), LogError> {
        if first_index == 0 {
            return Err(LogError::ResetToZero);
        }
        let mut state = self.state();
        state.entries.clear();
        state.bytes = 0;
        state.first = first_index;
        drop(state);
        self.publish_durable(first_index);
        Ok(())
    }

    fn sync(&self) -> Result<(), LogError> {
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.state().bytes
    }
}
