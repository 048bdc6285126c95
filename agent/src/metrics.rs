//! Prometheus metrics of the agent.
//!
//! Hot-path metrics (publishes, deliveries, settles, RPC latency) are atomic counters and
//! histograms updated by the gRPC layer. Per-queue gauges (ready, in flight, bytes...) are not
//! tracked on the hot path at all: they are copied from [`Broker::stats`] when `/metrics` is
//! scraped, so their cost is paid once per scrape instead of once per message.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sluice_proto::v1::SettleAction;

use crate::broker::Broker;

/// Labels of per-RPC metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// gRPC method name, e.g. `Publish`.
    pub method: &'static str,
}

/// Labels of settle counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// What the consumer did: `ack`, `nack`, `extend` or `reject`.
    pub action: &'static str,
}

/// Labels of per-queue gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// Queue name.
    pub queue: String,
}

type QueueGauge = Family<QueueLabels, Gauge>;

/// The agent's metrics and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Messages confirmed durable.
    pub published: Counter,
    /// Messages refused at publish (per-message or whole-request errors).
    pub publish_rejected: Counter,
    /// Deliveries sent to consumers (first and repeated).
    pub deliveries: Counter,
    /// Deliveries whose attempt was greater than 1.
    pub redeliveries: Counter,
    /// Successfully settled tags, by action.
    pub settled: Family<ActionLabels, Counter>,
    /// Latency of unary RPCs and of each publish-stream frame, in seconds.
    pub rpc_seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
    ready: QueueGauge,
    in_flight: QueueGauge,
    delayed: QueueGauge,
    bytes: QueueGauge,
    consumers: QueueGauge,
    dead_lettered: QueueGauge,
    expired: QueueGauge,
    /// Serialises scrapes: a refresh clears and refills the queue gauges, and two concurrent
    /// scrapes must not see each other's half-filled families.
    scrape: Mutex<()>,
}

fn rpc_histogram() -> Histogram {
    // 100 µs .. ~3.3 s: covers a cached confirm up to a badly stalled fsync.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every agent metric registered under the `sluice_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let published = Counter::default();
        let publish_rejected = Counter::default();
        let deliveries = Counter::default();
        let redeliveries = Counter::default();
        let settled = Family::<ActionLabels, Counter>::default();
        let rpc_seconds = Family::new_with_constructor(rpc_histogram as fn() -> Histogram);
        registry.register(
            "published_messages",
            "Messages confirmed durable",
            published.clone(),
        );
        registry.register(
            "publish_rejected_messages",
            "Messages refused at publish",
            publish_rejected.clone(),
        );
        registry.register(
            "deliveries",
            "Deliveries sent to consumers",
            deliveries.clone(),
        );
        registry.register(
            "redeliveries",
            "Deliveries with attempt > 1",
            redeliveries.clone(),
        );
        registry.register(
            "settled",
            "Delivery tags settled, by action",
            settled.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "RPC latency by method",
            rpc_seconds.clone(),
        );
        registry.register(
            "log_lines_suppressed",
            "Log lines of openraft dropped by the one-per-call-site-per-window throttle",
            crate::log_throttle::SUPPRESSED.clone(),
        );
        registry.register(
            "raft_groups",
            "Partition Raft groups hosted here, by state (active or quiescent)",
            crate::replication::quiet_group::GROUPS.clone(),
        );
        registry.register(
            "raft_group_wakeups",
            "Wake-ups of quiescent partition groups, by cause",
            crate::replication::quiet_group::WAKEUPS.clone(),
        );
        registry.register(
            "raft_groups_quiesced",
            "Times a partition group hosted here quiesced",
            crate::replication::quiet_group::QUIESCED.clone(),
        );
        registry.register(
            "raft_append_entries_sent",
            "AppendEntries sent by this agent's leaders, by kind (heartbeat or entries)",
            crate::replication::network::APPEND_ENTRIES_SENT.clone(),
        );
        registry.register(
            "peer_alive_exchanges",
            "Alive exchanges sent to watched peers (one stream per agent pair)",
            crate::replication::liveness::ALIVE_SENT.clone(),
        );
        registry.register(
            "peer_connections",
            "Peer addresses with a replication connection, shared by every group",
            crate::replication::peer_channels::CONNECTIONS.clone(),
        );
        registry.register(
            "log_flusher_threads",
            "Threads writing and fsyncing the logs of every partition hosted here",
            crate::log::flush_pool::THREADS.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let g = QueueGauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let ready = gauge("queue_ready_messages", "Messages ready for delivery");
        let in_flight = gauge(
            "queue_in_flight_messages",
            "Messages delivered and not settled",
        );
        let delayed = gauge("queue_delayed_messages", "Messages waiting for their time");
        let bytes = gauge("queue_bytes", "Payload bytes of unsettled messages");
        let consumers = gauge("queue_consumers", "Subscribed consumers");
        let dead_lettered = gauge(
            "queue_dead_lettered_messages",
            "Messages dead-lettered since start",
        );
        let expired = gauge(
            "queue_expired_messages",
            "Messages expired by TTL since start",
        );
        Self {
            registry,
            published,
            publish_rejected,
            deliveries,
            redeliveries,
            settled,
            rpc_seconds,
            ready,
            in_flight,
            delayed,
            bytes,
            consumers,
            dead_lettered,
            expired,
            scrape: Mutex::new(()),
        }
    }

    /// Records how long one RPC (or stream frame) took.
    pub fn observe_rpc(&self, method: &'static str, elapsed: Duration) {
        self.rpc_seconds
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts `count` successfully settled tags of `action`.
    pub fn count_settled(&self, action: SettleAction, count: u64) {
        let action = match action {
            SettleAction::Ack => "ack",
            SettleAction::Nack => "nack",
            SettleAction::Extend => "extend",
            SettleAction::Reject => "reject",
            SettleAction::Unspecified => return,
        };
        self.settled
            .get_or_create(&ActionLabels { action })
            .inc_by(count);
    }

    /// Copies every queue's counters from the broker and encodes all metrics in the
    /// Prometheus text format.
    pub fn scrape(&self, broker: &Broker) -> String {
        let _guard = self
            .scrape
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let families = [
            &self.ready,
            &self.in_flight,
            &self.delayed,
            &self.bytes,
            &self.consumers,
            &self.dead_lettered,
            &self.expired,
        ];
        // Cleared so deleted queues disappear instead of reporting their last value forever.
        families.iter().for_each(|f| f.clear());
        for spec in broker.list() {
            // A queue deleted between list and stats is simply skipped this scrape.
            let Ok(stats) = broker.stats(&spec.name) else {
                continue;
            };
            let total = stats.total.unwrap_or_default();
            let labels = QueueLabels { queue: spec.name };
            let set = |family: &QueueGauge, value: u64| {
                family
                    .get_or_create(&labels)
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            };
            set(&self.ready, total.ready);
            set(&self.in_flight, total.in_flight);
            set(&self.delayed, total.delayed);
            set(&self.bytes, total.bytes);
            set(&self.consumers, u64::from(stats.consumers));
            set(&self.dead_lettered, total.dead_lettered);
            set(&self.expired, total.expired);
        }
        self.encode()
    }

    /// Encodes the registry as it stands (no refresh).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_path_metrics_appear_in_the_text_encoding() {
        let m = Metrics::new();
        m.published.inc_by(3);
        m.count_settled(SettleAction::Ack, 2);
        m.count_settled(SettleAction::Unspecified, 9);
        m.observe_rpc("Publish", Duration::from_millis(2));
        let text = m.encode();
        assert!(text.contains("sluice_published_messages_total 3"), "{text}");
        assert!(
            text.contains("sluice_settled_total{action=\"ack\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sluice_rpc_duration_seconds_count{method=\"Publish\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
