//! The workload against an in-process system whose timing the tests control: a producer whose
//! confirms arrive a fixed delay after the send, and a queue the consumers drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;

/// An in-process queue: confirms come `confirm_delay` after a send; the first send of each
/// producer can be made to block (a stall) for `first_send_stall`.
#[derive(Default)]
struct FakeSystem {
    confirm_delay: Duration,
    first_send_stall: Duration,
    stored: Arc<AtomicU64>,
    sends: Arc<AtomicU64>,
}

struct FakeProducer {
    confirm_delay: Duration,
    stall: Option<Duration>,
    stored: Arc<AtomicU64>,
    sends: Arc<AtomicU64>,
}

struct FakeConsumer {
    stored: Arc<AtomicU64>,
}

impl Driver for FakeSystem {
    type Producer = FakeProducer;
    type Consumer = FakeConsumer;

    async fn producer(&self) -> Result<FakeProducer> {
        Ok(FakeProducer {
            confirm_delay: self.confirm_delay,
            stall: (!self.first_send_stall.is_zero()).then_some(self.first_send_stall),
            stored: self.stored.clone(),
            sends: self.sends.clone(),
        })
    }

    async fn consumer(&self, _prefetch: u32) -> Result<FakeConsumer> {
        Ok(FakeConsumer {
            stored: self.stored.clone(),
        })
    }
}

impl Producer for FakeProducer {
    type Confirm = futures::future::BoxFuture<'static, Result<()>>;

    async fn send(&mut self, count: usize) -> Result<Self::Confirm> {
        if let Some(stall) = self.stall.take() {
            tokio::time::sleep(stall).await;
        }
        self.sends.fetch_add(1, Ordering::Relaxed);
        let (delay, stored) = (self.confirm_delay, self.stored.clone());
        // Like the real drivers, the confirm proceeds whether or not anyone polls it yet.
        let confirm = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            stored.fetch_add(count as u64, Ordering::Relaxed);
        });
        Ok(Box::pin(async move {
            confirm.await.map_err(|source| Error::Task {
                phase: "fake",
                source,
            })
        }))
    }
}

impl Consumer for FakeConsumer {
    async fn receive_and_ack(&mut self, max: usize) -> Result<usize> {
        let taken = self
            .stored
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                Some(left - left.min(max as u64))
            })
            .map(|left| left.min(max as u64))
            .unwrap_or(0);
        if taken == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(taken as usize)
    }
}

fn shape() -> Shape {
    Shape {
        producers: 3,
        consumers: 2,
        batch: 10,
        window: 4,
        prefetch: 7,
    }
}

#[tokio::test]
async fn publish_confirms_every_message_split_over_producers() {
    let system = FakeSystem {
        confirm_delay: Duration::from_millis(1),
        ..Default::default()
    };
    let throughput = publish(&system, 1_001, shape()).await.expect("publishes");
    assert_eq!(throughput.messages, 1_001);
    assert_eq!(system.stored.load(Ordering::Relaxed), 1_001);
    // 334 + 334 + 333 messages in batches of at most 10.
    assert_eq!(system.sends.load(Ordering::Relaxed), 34 + 34 + 34);
}

#[tokio::test]
async fn pipelining_overlaps_confirm_waits() {
    // 40 batches of 10 with a 20 ms confirm: serially 800 ms, with 4 in flight per producer
    // and 1 producer about 200 ms.
    let system = FakeSystem {
        confirm_delay: Duration::from_millis(20),
        ..Default::default()
    };
    let one_producer = Shape {
        producers: 1,
        ..shape()
    };
    let throughput = publish(&system, 400, one_producer)
        .await
        .expect("publishes");
    assert!(
        throughput.elapsed < Duration::from_millis(500),
        "{:?}",
        throughput.elapsed
    );
}

#[tokio::test]
async fn consume_stops_once_the_published_count_is_acked() {
    let system = FakeSystem::default();
    system.stored.store(500, Ordering::Relaxed);
    let throughput = consume(&system, 500, shape()).await.expect("consumes");
    assert_eq!(throughput.messages, 500);
    assert_eq!(system.stored.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn latency_is_recorded_for_every_message_at_the_requested_rate() {
    let system = FakeSystem {
        confirm_delay: Duration::from_millis(5),
        ..Default::default()
    };
    let latency = confirm_latency(&system, 3_000, Duration::from_secs(1), shape())
        .await
        .expect("runs");
    let count = latency.count();
    assert!(
        (2_900..=3_000).contains(&count),
        "{count} messages in one second at 3000/s"
    );
    let p50 = latency.quantile(0.5).expect("samples");
    assert!(
        p50 >= Duration::from_millis(5) && p50 < Duration::from_millis(30),
        "{p50:?}"
    );
}

#[tokio::test]
async fn a_stalled_send_counts_against_every_message_scheduled_behind_it() {
    // A closed-loop client would measure only the stalled batch; open loop charges the 300 ms
    // to everything that was due during the stall (coordinated omission corrected).
    let system = FakeSystem {
        confirm_delay: Duration::from_millis(1),
        first_send_stall: Duration::from_millis(300),
        ..Default::default()
    };
    let latency = confirm_latency(&system, 1_000, Duration::from_secs(1), shape())
        .await
        .expect("runs");
    // The first 300 ms of a one-second run were stalled: the slowest 30% of messages waited
    // for it, spread from ~300 ms down to ~0.
    let p90 = latency.quantile(0.90).expect("samples");
    assert!(
        p90 >= Duration::from_millis(100),
        "p90 {p90:?} should include the stall"
    );
    let p99 = latency.quantile(0.99).expect("samples");
    assert!(
        p99 >= Duration::from_millis(250),
        "p99 {p99:?} should include the stall"
    );
}
