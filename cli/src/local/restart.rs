//! When `sluice local` starts a crashed agent again, and when it gives up: a pure decision
//! over the agent's crash history, so it is tested without processes or clocks.

use std::time::{Duration, Instant};

/// Wait before restarting an agent after the first crash of a streak; doubles per crash.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(500);

/// Longest wait before a restart.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A run this long counts as healthy: the crash that ends it starts a new streak, so the
/// backoff is back at [`BACKOFF_INITIAL`].
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Crashes within [`CRASH_LOOP_WINDOW`] after which the runner gives up.
///
/// A failure that restarting cannot cure (a taken port, an unreadable data directory, a
/// broken binary) recurs within a second of every start: after the backoffs of 0.5, 1, 2 and
/// 4 s such an agent crashes for the fifth time about 8 s after the first, well inside the
/// window, so the user reads its log tail in seconds instead of watching it loop forever (no
/// controller above `sluice local` would notice). An agent whose crashes come more than 15 s
/// apart on average (five then span over a minute) serves in between, so it stays outside the
/// rule and keeps being restarted; meanwhile the other agents carry the cluster.
pub const CRASH_LOOP_CRASHES: usize = 5;

/// The window of [`CRASH_LOOP_CRASHES`].
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);

/// Crashes remembered per agent; older ones cannot change a decision, since the give-up
/// rule looks at [`CRASH_LOOP_CRASHES`] of them and the backoff reaches [`BACKOFF_MAX`] after
/// six (0.5 s × 2⁵ > 10 s).
pub const HISTORY_KEPT: usize = 16;

/// One exit of an agent that the runner did not ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crash {
    /// When it exited.
    pub at: Instant,
    /// How long that run had lasted.
    pub ran: Duration,
}

/// What to do about an agent that just crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start it again after `delay`.
    Restart {
        /// Wait before the restart.
        delay: Duration,
    },
    /// It is crash-looping: stop everything and report it.
    GiveUp {
        /// Its crashes within [`CRASH_LOOP_WINDOW`], the latest included.
        crashes: usize,
    },
}

/// The verdict on the latest crash in `history`, oldest first. (An empty history, which the
/// runner never passes, gets the initial backoff.)
pub fn decide(history: &[Crash]) -> Verdict {
    let Some(latest) = history.last() else {
        return Verdict::Restart {
            delay: BACKOFF_INITIAL,
        };
    };
    let crashes = history
        .iter()
        .filter(|c| latest.at.duration_since(c.at) < CRASH_LOOP_WINDOW)
        .count();
    if crashes >= CRASH_LOOP_CRASHES {
        return Verdict::GiveUp { crashes };
    }
    // The streak starts at the last crash that ended a healthy run (or at the first crash).
    let streak_start = history
        .iter()
        .rposition(|c| c.ran >= HEALTHY_RUN)
        .unwrap_or(0);
    let doublings = u32::try_from(history.len() - 1 - streak_start).unwrap_or(u32::MAX);
    let delay = BACKOFF_INITIAL
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(BACKOFF_MAX);
    Verdict::Restart { delay }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Crashes `(at, ran)`: at `at` seconds after `start`, ending a run of `ran` seconds.
    fn history(start: Instant, crashes: &[(u64, u64)]) -> Vec<Crash> {
        crashes
            .iter()
            .map(|&(at, ran)| Crash {
                at: start + Duration::from_secs(at),
                ran: Duration::from_secs(ran),
            })
            .collect()
    }

    fn delay(verdict: Verdict) -> Duration {
        match verdict {
            Verdict::Restart { delay } => delay,
            Verdict::GiveUp { crashes } => panic!("gave up after {crashes} crashes"),
        }
    }

    #[test]
    fn the_backoff_doubles_per_crash_from_half_a_second_up_to_ten_seconds() {
        let start = Instant::now();
        // Crashes a minute apart never trip the crash-loop rule; each run is short.
        let crashes: Vec<(u64, u64)> = (0..8).map(|n| (n * 61, 30)).collect();
        let delays: Vec<Duration> = (1..=crashes.len())
            .map(|n| delay(decide(&history(start, &crashes[..n]))))
            .collect();
        let ms = Duration::from_millis;
        assert_eq!(
            delays,
            [
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(8000),
                ms(10_000),
                ms(10_000),
                ms(10_000)
            ]
        );
        // Forgetting all but the last HISTORY_KEPT crashes changes nothing.
        let long: Vec<(u64, u64)> = (0..40)
            .map(|n| (n * 61, if n == 0 { 90 } else { 30 }))
            .collect();
        let long = history(start, &long);
        assert_eq!(decide(&long), decide(&long[long.len() - HISTORY_KEPT..]));
    }

    #[test]
    fn a_healthy_run_resets_the_backoff() {
        let start = Instant::now();
        let short = [(0, 5), (61, 5), (122, 5), (183, 5)];
        assert_eq!(
            delay(decide(&history(start, &short))),
            Duration::from_secs(4)
        );
        let mut healed = short.to_vec();
        healed.push((300, 90));
        assert_eq!(delay(decide(&history(start, &healed))), BACKOFF_INITIAL);
        healed.push((310, 9));
        assert_eq!(
            delay(decide(&history(start, &healed))),
            Duration::from_secs(1),
            "the streak counts again from the crash that ended the healthy run"
        );
    }

    #[test]
    fn five_crashes_within_a_minute_give_up_and_four_do_not() {
        let start = Instant::now();
        // A crash loop at startup: every run ends at once, the backoff between them.
        let looping = [(0, 0), (1, 0), (2, 0), (4, 0), (8, 0)];
        assert!(matches!(
            decide(&history(start, &looping[..4])),
            Verdict::Restart { .. }
        ));
        assert_eq!(
            decide(&history(start, &looping)),
            Verdict::GiveUp { crashes: 5 }
        );
        // Five crashes spread over more than a minute are restarted.
        let spread = [(0, 0), (16, 15), (32, 15), (48, 15), (64, 15)];
        assert!(matches!(
            decide(&history(start, &spread)),
            Verdict::Restart { .. }
        ));
        // Crashes that left the window do not count towards a new loop.
        let mut later = vec![(0, 0), (61, 60), (122, 60)];
        later.extend([(123, 0), (124, 0), (125, 0)]);
        assert!(matches!(
            decide(&history(start, &later)),
            Verdict::Restart { .. }
        ));
        later.push((126, 0));
        assert_eq!(
            decide(&history(start, &later)),
            Verdict::GiveUp { crashes: 5 }
        );
    }
}
