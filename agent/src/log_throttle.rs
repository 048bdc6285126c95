//! At most one log line per call site per window from a chatty dependency.
//!
//! openraft reports every failed vote and append request of every group at `error` (a timeout,
//! an unreachable peer). On a machine too busy for its Raft groups that is one line per group
//! per election round: three agents with 900 partitions wrote about 750 MB in ten minutes. The
//! line says the same thing for every group, so the first one per call site per window tells
//! the operator what is wrong; the rest are dropped and counted
//! ([`SUPPRESSED`], `sluice_log_lines_suppressed_total` on `/metrics`), and metrics say which
//! groups lead.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tracing::Metadata;
use tracing::callsite::Identifier;
use tracing::subscriber::Interest;
use tracing_subscriber::layer::{Context, Filter};

/// Lines dropped by every [`Throttle`] of this process.
pub static SUPPRESSED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Lets through the first event of each call site under `prefix` per `window`.
#[derive(Debug)]
pub struct Throttle {
    prefix: &'static str,
    window: Duration,
    /// When each call site last let a line through.
    last: Mutex<HashMap<Identifier, Instant>>,
}

impl Throttle {
    /// Throttles the events of targets starting with `prefix`.
    pub fn new(prefix: &'static str, window: Duration) -> Self {
        Self {
            prefix,
            window,
            last: Mutex::default(),
        }
    }

    fn applies(&self, meta: &Metadata<'_>) -> bool {
        meta.is_event() && meta.target().starts_with(self.prefix)
    }
}

impl<S> Filter<S> for Throttle {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        if !self.applies(meta) {
            return true;
        }
        let now = Instant::now();
        // Plain data, consistent across a panic.
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match last.get(&meta.callsite()) {
            Some(at) if now.duration_since(*at) < self.window => {
                SUPPRESSED.inc();
                false
            }
            _ => {
                last.insert(meta.callsite(), now);
                true
            }
        }
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.applies(meta) {
            // Asked at every event: the answer depends on the time.
            Interest::sometimes()
        } else {
            Interest::always()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Counts the events that reach it.
    struct Count(Arc<AtomicUsize>);

    impl<S: tracing::Subscriber> Layer<S> for Count {
        fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_call_site_under_the_prefix_logs_once_per_window_and_others_always() {
        let seen = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(
            Count(seen.clone()).with_filter(Throttle::new("chatty", Duration::from_secs(60))),
        );
        let before = SUPPRESSED.get();
        tracing::subscriber::with_default(subscriber, || {
            for group in 0..100 {
                tracing::error!(target: "chatty::core", group, "vote timed out");
            }
            tracing::error!(target: "chatty::replication", "append failed");
            for _ in 0..3 {
                tracing::error!(target: "sluice_agent::replica", "our own line");
            }
        });
        // One per chatty call site, every one of ours.
        assert_eq!(seen.load(Ordering::Relaxed), 1 + 1 + 3);
        assert!(SUPPRESSED.get() - before >= 99);
    }
}
