//! [`DedupWindow`]: idempotency keys seen within the queue's dedup window.

use std::collections::{HashMap, VecDeque};

/// Maps idempotency keys to the offset of their first message, for keys published within the
/// window. Memory is per key inside the window (publish rate × window), never per backlog
/// message; it is rebuilt on replay from the retained log (keys in purged segments are
/// forgotten, which only matters when a whole segment was settled inside the window).
#[derive(Debug, Default)]
pub struct DedupWindow {
    window_ms: u64,
    /// Key → (first offset, publish time).
    keys: HashMap<String, (u64, u64)>,
    /// Keys in publish order, to evict the ones that left the window.
    order: VecDeque<(u64, String)>,
}

impl DedupWindow {
    /// An empty window of `window_ms` milliseconds.
    pub fn new(window_ms: u64) -> Self {
        Self {
            window_ms,
            ..Self::default()
        }
    }

    /// The first offset of `key` if it was published within the window ending at `now_ms`.
    pub fn get(&self, key: &str, now_ms: u64) -> Option<u64> {
        let (offset, time) = self.keys.get(key)?;
        (now_ms.saturating_sub(*time) < self.window_ms).then_some(*offset)
    }

    /// Records `key` for the message at `offset` published at `time_ms`, evicting older keys.
    /// A key already present keeps its first offset.
    pub fn insert(&mut self, key: &str, offset: u64, time_ms: u64) {
        self.evict(time_ms);
        if !self.keys.contains_key(key) {
            self.keys.insert(key.to_owned(), (offset, time_ms));
            self.order.push_back((time_ms, key.to_owned()));
        }
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn evict(&mut self, now_ms: u64) {
        while let Some((time, _)) = self.order.front() {
            if now_ms.saturating_sub(*time) < self.window_ms {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.keys.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_remembered_for_the_window_and_then_forgotten() {
        let mut window = DedupWindow::new(1_000);
        window.insert("a", 5, 10_000);
        window.insert("a", 9, 10_100);
        assert_eq!(window.get("a", 10_999), Some(5), "the first offset wins");
        assert_eq!(window.get("a", 11_000), None, "outside the window");
        window.insert("b", 12, 11_500);
        assert_eq!(window.len(), 1, "inserting evicted the expired key");
        assert_eq!(window.get("b", 11_600), Some(12));
    }
}
