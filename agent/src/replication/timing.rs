//! Where the time of a replicated write goes: named stage durations, summarised (count, p50,
//! p99, max) once per [`REPORT_EVERY`] at debug level under the `sluice::timing` target.
//!
//! Off unless that target is enabled (`--log-level info,sluice::timing=debug`): recording then
//! costs one filter check, so the hooks stay in the write path for the next investigation.

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

/// How often the collected durations are summarised and cleared.
pub const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Durations (µs) per stage since the last report, and when that was.
struct Window {
    started: Instant,
    stages: BTreeMap<&'static str, Vec<u64>>,
}

static WINDOW: LazyLock<Mutex<Window>> = LazyLock::new(|| {
    Mutex::new(Window {
        started: Instant::now(),
        stages: BTreeMap::new(),
    })
});

/// Whether stage timings are collected.
pub fn enabled() -> bool {
    tracing::enabled!(target: "sluice::timing", tracing::Level::DEBUG)
}

/// Records that `stage` took `took`; a value may also be a count (recorded as µs).
pub fn record(stage: &'static str, took: Duration) {
    record_value(stage, u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
}

/// Records a plain value (a count, a size) under `stage`.
pub fn record_value(stage: &'static str, value: u64) {
    if !enabled() {
        return;
    }
    let Ok(mut window) = WINDOW.lock() else {
        return;
    };
    window.stages.entry(stage).or_default().push(value);
    if window.started.elapsed() < REPORT_EVERY {
        return;
    }
    window.started = Instant::now();
    let stages = std::mem::take(&mut window.stages);
    drop(window);
    for (stage, mut values) in stages {
        values.sort_unstable();
        let at = |q: f64| values[((values.len() - 1) as f64 * q) as usize];
        tracing::debug!(
            target: "sluice::timing",
            stage,
            n = values.len(),
            p50 = at(0.5),
            p90 = at(0.9),
            p99 = at(0.99),
            max = at(1.0),
            "timing"
        );
    }
}
