//! The measured phases, written once against [`Driver`] so every system is driven and timed
//! the same way.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::driver::{Consumer, Driver, Producer};
use crate::stats::{Latency, Throughput};
use crate::{Error, Result};

/// How the load is spread over connections.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Concurrent producers.
    pub producers: u32,
    /// Concurrent consumers.
    pub consumers: u32,
    /// Messages per batch in the throughput phase.
    pub batch: u32,
    /// Unconfirmed batches per producer.
    pub window: u32,
    /// Unacked deliveries per consumer.
    pub prefetch: u32,
}

/// Interval between sends of one producer in the latency phase, times the producer count: with
/// producers offset evenly, the system sees one send per millisecond.
const LATENCY_TICK: Duration = Duration::from_millis(1);

/// Publishes `messages` with confirms from `shape.producers` producers, each keeping
/// `shape.window` batches of `shape.batch` in flight; the clock runs from the first send to
/// the last confirm (connections are opened before it starts).
pub async fn publish<D: Driver>(driver: &D, messages: u64, shape: Shape) -> Result<Throughput> {
    let mut producers = Vec::new();
    for _ in 0..shape.producers {
        producers.push(driver.producer().await?);
    }
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (index, producer) in producers.into_iter().enumerate() {
        let quota = share(messages, shape.producers, index);
        tasks.spawn(publish_quota(producer, quota, shape.batch, shape.window));
    }
    join_all(tasks, "publish").await?;
    Ok(Throughput {
        messages,
        elapsed: started.elapsed(),
    })
}

/// This producer's part of `total` split over `parts`: the remainder goes to the first ones.
fn share(total: u64, parts: u32, index: usize) -> u64 {
    let parts = u64::from(parts.max(1));
    let index = index as u64;
    total / parts + u64::from(index < total % parts)
}

async fn publish_quota<P: Producer>(
    mut producer: P,
    quota: u64,
    batch: u32,
    window: u32,
) -> Result<()> {
    // Confirms progress on their own (see `Producer::send`), so waiting for the oldest one
    // first never holds the others back.
    let mut in_flight = VecDeque::new();
    let mut sent = 0u64;
    while sent < quota {
        if in_flight.len() >= window as usize
            && let Some(oldest) = in_flight.pop_front()
        {
            oldest.await?;
        }
        let count = (quota - sent).min(u64::from(batch));
        in_flight.push_back(producer.send(count as usize).await?);
        sent += count;
    }
    for confirm in in_flight {
        confirm.await?;
    }
    Ok(())
}

/// Consumes and acks `messages` with `shape.consumers` competing consumers; the clock runs
/// from opening the consumers to the ack that completes the count.
pub async fn consume<D: Driver>(driver: &D, messages: u64, shape: Shape) -> Result<Throughput> {
    let started = Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(Mutex::new(None::<Instant>));
    let mut tasks = JoinSet::new();
    for _ in 0..shape.consumers {
        let consumer = driver.consumer(shape.prefetch).await?;
        let (received, finished) = (received.clone(), finished.clone());
        tasks.spawn(consume_until(
            consumer,
            messages,
            shape.prefetch,
            received,
            finished,
        ));
    }
    join_all(tasks, "consume").await?;
    let finished = finished
        .lock()
        .ok()
        .and_then(|at| *at)
        .unwrap_or_else(Instant::now);
    Ok(Throughput {
        messages,
        elapsed: finished - started,
    })
}

async fn consume_until<C: Consumer>(
    mut consumer: C,
    target: u64,
    prefetch: u32,
    received: Arc<AtomicU64>,
    finished: Arc<Mutex<Option<Instant>>>,
) -> Result<()> {
    // Each consumer stops once the shared count is reached; an idle one notices within its
    // receive wait.
    while received.load(Ordering::Acquire) < target {
        let got = consumer.receive_and_ack(prefetch as usize).await? as u64;
        let before = received.fetch_add(got, Ordering::AcqRel);
        if before < target
            && before + got >= target
            && let Ok(mut at) = finished.lock()
        {
            *at = Some(Instant::now());
        }
    }
    Ok(())
}

/// Publishes at `rate` messages/s for `duration`, open loop: sends are scheduled on a fixed
/// timetable and each message's latency runs from its scheduled time (not from when a slow
/// system let it go out) to its confirm, so stalls are counted rather than hidden.
pub async fn confirm_latency<D: Driver>(
    driver: &D,
    rate: u64,
    duration: Duration,
    shape: Shape,
) -> Result<Latency> {
    let mut producers = Vec::new();
    for _ in 0..shape.producers {
        producers.push(driver.producer().await?);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let latency = Arc::new(Mutex::new(Latency::new()));
    let mut tasks = JoinSet::new();
    for (index, producer) in producers.into_iter().enumerate() {
        let schedule = Schedule {
            start: start + LATENCY_TICK * index as u32,
            interval: LATENCY_TICK * shape.producers,
            rate: share(rate, shape.producers, index),
            end: start + duration,
        };
        tasks.spawn(publish_on_schedule(producer, schedule, latency.clone()));
    }
    join_all(tasks, "latency").await?;
    let merged = latency.lock().map(|l| l.clone()).unwrap_or_default();
    Ok(merged)
}

/// One producer's timetable in the latency phase.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    start: Instant,
    interval: Duration,
    /// Messages per second for this producer.
    rate: u64,
    end: Instant,
}

impl Schedule {
    /// Messages due in total by `at`: the rate times the time since start, so rounding never
    /// accumulates drift.
    fn due_by(&self, at: Instant) -> u64 {
        let elapsed = at.saturating_duration_since(self.start).as_secs_f64();
        (self.rate as f64 * elapsed) as u64
    }
}

async fn publish_on_schedule<P: Producer>(
    mut producer: P,
    schedule: Schedule,
    latency: Arc<Mutex<Latency>>,
) -> Result<()> {
    let mut confirms = JoinSet::new();
    let mut sent = 0u64;
    let mut tick = 1u32;
    loop {
        let due_at = schedule.start + schedule.interval * tick;
        if due_at > schedule.end {
            break;
        }
        tokio::time::sleep_until(due_at).await;
        let count = schedule.due_by(due_at) - sent;
        tick += 1;
        if count == 0 {
            continue;
        }
        let confirm = producer.send(count as usize).await?;
        sent += count;
        let latency = latency.clone();
        confirms.spawn(async move {
            confirm.await?;
            let took = due_at.elapsed();
            if let Ok(mut latency) = latency.lock() {
                latency.record(took, count);
            }
            Ok(())
        });
        // Reap finished confirms as we go so the set stays small and errors surface early.
        while let Some(done) = confirms.try_join_next() {
            done.map_err(|source| Error::Task {
                phase: "latency",
                source,
            })??;
        }
    }
    join_all(confirms, "latency").await
}

async fn join_all(mut tasks: JoinSet<Result<()>>, phase: &'static str) -> Result<()> {
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tasks.abort_all();
                return Err(err);
            }
            Err(source) => {
                tasks.abort_all();
                return Err(Error::Task { phase, source });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
