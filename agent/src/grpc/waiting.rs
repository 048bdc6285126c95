//! [`Waiting`]: frames a stream has read but cannot start yet, bounded by memory.
//!
//! A stream keeps reading its request frames however many are being worked on: h2 closes the
//! whole connection (GOAWAY `ENHANCE_YOUR_CALM`) when small DATA frames pile up unread, and
//! flow control, which counts payload bytes, never stops a client sending one tiny frame per
//! message. Frames read early wait here, where the stream merges them into fewer broker calls;
//! a stream whose waiting frames would pass [`WAITING_BYTES_MAX`] has truly overrun and is
//! ended with RESOURCE_EXHAUSTED (its other frames still answered).

use std::collections::VecDeque;

/// Most memory one stream's waiting frames may take (their encoded size plus
/// [`FRAME_OVERHEAD_BYTES`] each).
pub const WAITING_BYTES_MAX: usize = 64 * 1024 * 1024;
/// What one waiting frame costs beyond its encoded size (the decoded structs, allocations).
const FRAME_OVERHEAD_BYTES: usize = 256;

/// Frames read and not yet started, oldest first.
#[derive(Debug)]
pub struct Waiting<T> {
    frames: VecDeque<(T, usize)>,
    bytes: usize,
}

impl<T> Default for Waiting<T> {
    fn default() -> Self {
        Self {
            frames: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl<T> Waiting<T> {
    /// Queues a frame of `encoded` bytes; `Err` with the frame when the stream would hold more
    /// than [`WAITING_BYTES_MAX`].
    pub fn push(&mut self, frame: T, encoded: usize) -> Result<(), T> {
        let cost = encoded + FRAME_OVERHEAD_BYTES;
        if self.bytes + cost > WAITING_BYTES_MAX {
            return Err(frame);
        }
        self.bytes += cost;
        self.frames.push_back((frame, cost));
        Ok(())
    }

    /// The oldest frame, if it satisfies `take`.
    pub fn pop_if(&mut self, take: impl FnOnce(&T) -> bool) -> Option<T> {
        if !take(&self.frames.front()?.0) {
            return None;
        }
        let (frame, cost) = self.frames.pop_front()?;
        self.bytes -= cost;
        Some(frame)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// How many frames wait.
    pub fn len(&self) -> usize {
        self.frames.len()
    }
}

/// The status ending a stream that overran its waiting room.
pub fn overrun(what: &str, in_flight: usize, waiting: usize) -> tonic::Status {
    tonic::Status::resource_exhausted(format!(
        "{what}: {waiting} frames wait behind {in_flight} in flight, more than \
         {WAITING_BYTES_MAX} bytes; wait for answers before sending more"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_wait_in_order_within_the_memory_bound() {
        let mut waiting = Waiting::default();
        assert!(waiting.push(1, 10).is_ok());
        assert!(waiting.push(2, 10).is_ok());
        assert_eq!(
            waiting.pop_if(|f| *f == 2),
            None,
            "only the oldest frame is taken"
        );
        assert_eq!(waiting.pop_if(|_| true), Some(1));
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting.push(3, WAITING_BYTES_MAX), Err(3));
        assert_eq!(waiting.pop_if(|_| true), Some(2));
        assert!(waiting.is_empty());
        assert!(
            waiting
                .push(3, WAITING_BYTES_MAX - FRAME_OVERHEAD_BYTES)
                .is_ok()
        );
    }
}
