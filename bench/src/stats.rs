//! Throughput figures and the confirm-latency histogram.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Messages moved in a wall-clock interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    /// Messages confirmed (or consumed and acked).
    pub messages: u64,
    /// Time from the first send to the last confirm.
    pub elapsed: Duration,
}

impl Throughput {
    /// Messages per second; zero for an empty interval.
    pub fn per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.messages as f64 / secs
        } else {
            0.0
        }
    }
}

/// Highest latency the histogram tracks exactly: anything slower is clamped to it, which
/// only happens when a system stalls for over a minute (and then the run times out anyway).
const LATENCY_MAX_MICROS: u64 = 60_000_000;

/// Confirm latencies in microseconds, 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram.
    pub fn new() -> Self {
        // 1 µs .. 60 s at 3 significant digits is a valid configuration, so this cannot fail.
        let histogram = Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, 3)
            .unwrap_or_else(|_| unreachable!("static histogram bounds are valid"));
        Self { histogram }
    }

    /// Records that `count` messages were confirmed `latency` after they were due to be sent.
    pub fn record(&mut self, latency: Duration, count: u64) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let clamped = micros.clamp(1, LATENCY_MAX_MICROS);
        // In-range values always record; saturate instead of failing if that ever changes.
        let _ = self.histogram.record_n(clamped, count);
    }

    /// Adds another histogram's samples (one per producer task).
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    /// Messages recorded.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The latency at `quantile` (0.5 = median), or `None` when empty.
    pub fn quantile(&self, quantile: f64) -> Option<Duration> {
        (!self.histogram.is_empty())
            .then(|| Duration::from_micros(self.histogram.value_at_quantile(quantile)))
    }
}

/// A small set of durations (one per trial) and its order statistics, nearest-rank: with 20
/// samples the p99 is the largest, as it should be, rather than an interpolation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Distribution {
    sorted: Vec<Duration>,
}

impl Distribution {
    /// The distribution of `samples`.
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self { sorted: samples }
    }

    /// Samples.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The smallest sample.
    pub fn min(&self) -> Option<Duration> {
        self.sorted.first().copied()
    }

    /// The largest sample.
    pub fn max(&self) -> Option<Duration> {
        self.sorted.last().copied()
    }

    /// The nearest-rank `quantile` (0.5 = median): the smallest sample with at least that
    /// share of samples at or below it.
    pub fn quantile(&self, quantile: f64) -> Option<Duration> {
        let rank = (quantile.clamp(0.0, 1.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted.get(rank.saturating_sub(1)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles_of_twenty_trials() {
        let samples = (1..=20)
            .rev()
            .map(|s| Duration::from_millis(s * 100))
            .collect();
        let d = Distribution::new(samples);
        assert_eq!(d.len(), 20);
        assert_eq!(d.min(), Some(Duration::from_millis(100)));
        assert_eq!(d.quantile(0.5), Some(Duration::from_millis(1_000)));
        assert_eq!(d.quantile(0.9), Some(Duration::from_millis(1_800)));
        assert_eq!(d.quantile(0.99), Some(Duration::from_millis(2_000)));
        assert_eq!(d.max(), Some(Duration::from_millis(2_000)));
        assert_eq!(d.quantile(0.0), Some(Duration::from_millis(100)));
        assert_eq!(Distribution::default().quantile(0.5), None);
    }

    #[test]
    fn throughput_divides_messages_by_seconds() {
        let t = Throughput {
            messages: 5_000,
            elapsed: Duration::from_millis(500),
        };
        assert!((t.per_sec() - 10_000.0).abs() < 1e-6);
        assert_eq!(
            Throughput {
                messages: 3,
                elapsed: Duration::ZERO
            }
            .per_sec(),
            0.0
        );
    }

    #[test]
    fn quantiles_reflect_weighted_samples() {
        let mut latency = Latency::new();
        latency.record(Duration::from_millis(2), 98);
        latency.record(Duration::from_millis(50), 2);
        let p50 = latency.quantile(0.5).expect("has samples");
        let p99 = latency.quantile(0.99).expect("has samples");
        assert!(
            p50 >= Duration::from_micros(1_990) && p50 <= Duration::from_micros(2_010),
            "{p50:?}"
        );
        assert!(p99 >= Duration::from_micros(49_900), "{p99:?}");
        assert_eq!(latency.count(), 100);
    }

    #[test]
    fn merged_histograms_count_both_sides_and_empty_has_no_quantile() {
        let mut a = Latency::new();
        assert_eq!(a.quantile(0.5), None);
        let mut b = Latency::new();
        b.record(Duration::from_secs(120), 1);
        a.merge(&b);
        assert_eq!(a.count(), 1);
        assert_eq!(a.quantile(1.0).map(|d| d.as_secs()), Some(60));
    }
}
