//! Prometheus metrics of the operator, served on `/metrics`.

use std::time::Instant;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Label set of the failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// [`crate::Error::metric_label`] of the failure.
    pub error: String,
}

/// The operator's metrics and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    /// Reconciles started.
    pub reconciliations: Counter,
    /// Reconciles failed, by error label.
    pub failures: Family<ErrorLabels, Counter>,
    /// Reconcile duration in seconds.
    pub duration: Histogram,
    /// 1 while this replica holds the leader lease.
    pub is_leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sluice_operator");
        let reconciliations = Counter::default();
        registry.register(
            "reconciliations",
            "Reconciles started",
            reconciliations.clone(),
        );
        let failures = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Reconciles failed, by error",
            failures.clone(),
        );
        let duration = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            duration.clone(),
        );
        let is_leader = Gauge::default();
        registry.register(
            "is_leader",
            "1 while this replica holds the leader lease",
            is_leader.clone(),
        );
        Self {
            registry,
            reconciliations,
            failures,
            duration,
            is_leader,
        }
    }
}

/// Observes a reconcile's duration when dropped (also on early returns and errors).
pub struct ReconcileTimer<'a> {
    start: Instant,
    histogram: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the returned guard is dropped.
    pub fn reconcile_timer(&self) -> ReconcileTimer<'_> {
        self.reconciliations.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: &self.duration,
        }
    }

    /// Counts a failed reconcile under `label`.
    pub fn reconcile_failure(&self, label: &str) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: label.to_owned(),
            })
            .inc();
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error here would be a bug in the encoder.
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_by_error_label() {
        let m = Metrics::default();
        m.reconcile_failure("apply_failed");
        m.reconcile_failure("apply_failed");
        drop(m.reconcile_timer());
        let text = m.encode();
        assert!(
            text.contains(r#"sluice_operator_reconcile_failures_total{error="apply_failed"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("sluice_operator_reconciliations_total 1"),
            "{text}"
        );
        assert!(
            text.contains("sluice_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }
}
