//! [`RateWindow`]: events per second over the last minute, in fixed memory.

/// Width of the window in seconds.
pub const RATE_WINDOW_SECS: u64 = 60;

/// Counts events in one-second buckets over the last [`RATE_WINDOW_SECS`] seconds.
///
/// Events are recorded with the time stored in their log command, so a replayed log refills
/// the buckets exactly (old events simply fall outside the window).
#[derive(Debug, Clone)]
pub struct RateWindow {
    /// Event count per bucket; bucket `s % 60` holds second `s` when `seconds[s % 60] == s`.
    counts: [u64; RATE_WINDOW_SECS as usize],
    /// Which absolute second each bucket currently holds.
    seconds: [u64; RATE_WINDOW_SECS as usize],
}

impl Default for RateWindow {
    fn default() -> Self {
        Self {
            counts: [0; RATE_WINDOW_SECS as usize],
            seconds: [u64::MAX; RATE_WINDOW_SECS as usize],
        }
    }
}

impl RateWindow {
    /// Records `n` events at `time_ms`.
    pub fn record(&mut self, time_ms: u64, n: u64) {
        let second = time_ms / 1000;
        let slot = (second % RATE_WINDOW_SECS) as usize;
        if self.seconds[slot] != second {
            // Only move a bucket forward: an older event than the bucket holds is outside the
            // window anyway.
            if self.seconds[slot] != u64::MAX && self.seconds[slot] > second {
                return;
            }
            self.seconds[slot] = second;
            self.counts[slot] = 0;
        }
        self.counts[slot] += n;
    }

    /// Events per second averaged over the minute ending at `now_ms`.
    pub fn per_second(&self, now_ms: u64) -> f64 {
        let now = now_ms / 1000;
        let oldest = now.saturating_sub(RATE_WINDOW_SECS - 1);
        let total: u64 = self
            .seconds
            .iter()
            .zip(self.counts.iter())
            .filter(|(s, _)| **s != u64::MAX && **s >= oldest && **s <= now)
            .map(|(_, c)| *c)
            .sum();
        total as f64 / RATE_WINDOW_SECS as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_the_last_minute_only() {
        let mut rates = RateWindow::default();
        rates.record(1_000, 60);
        rates.record(30_500, 60);
        assert_eq!(rates.per_second(31_000), 2.0);
        // 70 s later the first second has left the window, the second not yet.
        assert_eq!(rates.per_second(71_000), 1.0);
        assert_eq!(rates.per_second(200_000), 0.0);
    }
}
