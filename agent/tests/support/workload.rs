//! The load the fault tests run.
//!
//! Publishers send batches with idempotency keys to whichever agent leads, follow
//! `sluice-leader` redirects, and resend a batch with the same keys until it is confirmed, so a
//! resend can never enqueue a key twice. Every confirmed key is recorded with its message id.
//! Consumers subscribe at the leader, check every payload (it carries a checksum of its key),
//! ack, and record an ack only once the agent reports it durable, in the [`Ledger`].

#![allow(dead_code)] // Each fault test uses a different part of the workload.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sluice_proto::v1::consume_request::Request as Frame;
use sluice_proto::v1::consume_response::Response as In;
use sluice_proto::v1::consumer_client::ConsumerClient;
use sluice_proto::v1::publisher_client::PublisherClient;
use sluice_proto::v1::{
    ConsumeRequest, DeliveryTag, Message, PublishRequest, Settle, SettleAction, SettleResult,
    Subscribe,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::cluster::channel_to;
use super::ledger::{Ledger, payload};

/// Deadline of one publish request: a paused or isolated leader must not stall a publisher.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// A subscription that brings nothing for this long is given up and opened again at the
/// leader (its agent may be paused or cut off).
const CONSUME_IDLE: Duration = Duration::from_secs(2);
/// Pause between attempts after a failure.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Publishers and a consumer running against the cluster, started together and stopped
/// together (the consumer may be stopped first, so a backlog builds up).
pub struct Load {
    stop: Arc<AtomicBool>,
    stop_consumer: Arc<AtomicBool>,
    publishers: Vec<JoinHandle<PublisherReport>>,
    consumer: JoinHandle<ConsumerReport>,
}

impl Load {
    /// Starts `publishers` publishers of `queue` (publisher `n` keys its messages
    /// `<prefix><n>-<seq>`, in batches of `batch`) and one consumer, all entering the cluster
    /// at `endpoints` and recording into `ledger`. Must run inside a Tokio runtime.
    pub fn start(
        endpoints: Vec<String>,
        queue: &str,
        ledger: &Arc<Ledger>,
        publishers: usize,
        prefix: &str,
        batch: usize,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_consumer = Arc::new(AtomicBool::new(false));
        let publishers = (0..publishers)
            .map(|n| {
                tokio::spawn(publish(
                    endpoints.clone(),
                    queue.to_owned(),
                    format!("{prefix}{n}"),
                    batch,
                    ledger.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        let consumer = tokio::spawn(consume(
            endpoints,
            queue.to_owned(),
            ledger.clone(),
            Until::Stopped(stop_consumer.clone()),
        ));
        Load {
            stop,
            stop_consumer,
            publishers,
            consumer,
        }
    }

    /// Stops consuming while publishing goes on (a backlog builds up).
    pub fn stop_consumer(&self) {
        self.stop_consumer.store(true, Ordering::Release);
    }

    /// Stops the load and prints what each part did.
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.stop_consumer.store(true, Ordering::Release);
        for (n, p) in self.publishers.into_iter().enumerate() {
            let report = p.await.expect("publisher task");
            eprintln!("publisher {n}: {report:?}");
        }
        let report = self.consumer.await.expect("consumer task");
        eprintln!("consumer under load: {report:?}");
    }
}

/// Which agent a client talks to: the last known leader, learned from redirects.
struct Target {
    endpoints: Vec<String>,
    channels: HashMap<String, Channel>,
    current: String,
    next: usize,
}

impl Target {
    fn new(endpoints: Vec<String>) -> Self {
        let current = endpoints[0].clone();
        Target {
            endpoints,
            channels: HashMap::new(),
            current,
            next: 1,
        }
    }

    fn channel(&mut self) -> Channel {
        let endpoint = self.current.clone();
        self.channels
            .entry(endpoint.clone())
            .or_insert_with(|| channel_to(&endpoint))
            .clone()
    }

    /// After a failure: go where the redirect points, else to the next agent.
    fn failed(&mut self, status: &tonic::Status) {
        let leader = status
            .metadata()
            .get("sluice-leader")
            .and_then(|v| v.to_str().ok());
        match leader {
            Some(address) => self.current = format!("http://{address}"),
            None => {
                self.current = self.endpoints[self.next % self.endpoints.len()].clone();
                self.next += 1;
            }
        }
    }
}

/// What one publisher did.
#[derive(Debug, Default)]
pub struct PublisherReport {
    /// Batches confirmed.
    pub batches: usize,
    /// Requests that failed and were resent.
    pub resends: usize,
    /// The first few failures, for the test's output.
    pub failures: Vec<String>,
}

/// Publishes batches of `batch` messages keyed `<prefix>-<n>` until `stop` is set, resending
/// each batch with the same keys until every message of it is confirmed.
pub async fn publish(
    endpoints: Vec<String>,
    queue: String,
    prefix: String,
    batch: usize,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
) -> PublisherReport {
    let mut target = Target::new(endpoints);
    let mut report = PublisherReport::default();
    let mut next = 0usize;
    'batches: while !stop.load(Ordering::Acquire) {
        let mut pending: Vec<String> = (next..next + batch)
            .map(|n| format!("{prefix}-{n}"))
            .collect();
        next += batch;
        loop {
            match publish_once(&mut target, &queue, &pending, &ledger).await {
                Ok(unconfirmed) => pending = unconfirmed,
                Err(status) => {
                    target.failed(&status);
                    if report.failures.len() < 5 {
                        report
                            .failures
                            .push(format!("{}: {}", status.code(), status.message()));
                    }
                }
            }
            if pending.is_empty() {
                report.batches += 1;
                break;
            }
            if stop.load(Ordering::Acquire) {
                break 'batches;
            }
            report.resends += 1;
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
    report
}

/// Sends one publish of `keys` to the target; records the confirmed ones and returns the rest.
async fn publish_once(
    target: &mut Target,
    queue: &str,
    keys: &[String],
    ledger: &Ledger,
) -> Result<Vec<String>, tonic::Status> {
    let confirms = publish_keys(target.channel(), queue, keys, PUBLISH_TIMEOUT).await?;
    let mut unconfirmed = Vec::new();
    for (key, confirm) in keys.iter().zip(confirms) {
        match confirm.id.filter(|_| confirm.code == 0) {
            Some(id) => ledger.confirm(key, id),
            None => unconfirmed.push(key.clone()),
        }
    }
    Ok(unconfirmed)
}

/// One `Publish` of the messages of `keys` (idempotency key = key) to `channel`.
pub async fn publish_keys(
    channel: Channel,
    queue: &str,
    keys: &[String],
    timeout: Duration,
) -> Result<Vec<sluice_proto::v1::Confirm>, tonic::Status> {
    let messages = keys
        .iter()
        .map(|key| Message {
            payload: payload(key),
            idempotency_key: key.clone(),
            ..Default::default()
        })
        .collect();
    let mut request = tonic::Request::new(PublishRequest {
        queue: queue.to_owned(),
        messages,
    });
    request.set_timeout(timeout);
    let mut client = PublisherClient::new(channel);
    let call = client.publish(request);
    // The transport timeout covers a server that answers nothing; this covers a connect that
    // never completes.
    match tokio::time::timeout(timeout + Duration::from_millis(200), call).await {
        Ok(result) => result.map(|r| r.into_inner().confirms),
        Err(_) => Err(tonic::Status::deadline_exceeded("publish timed out")),
    }
}

/// When a consumer ends.
#[derive(Debug, Clone)]
pub enum Until {
    /// When the flag is set.
    Stopped(Arc<AtomicBool>),
    /// When nothing was delivered for this long and every ack is settled (a drain); fails the
    /// test when no leader served within the second duration.
    Quiet(Duration, Duration),
}

/// What one consumer did.
#[derive(Debug, Default)]
pub struct ConsumerReport {
    /// Deliveries received.
    pub deliveries: usize,
    /// Acks reported durable.
    pub acks: usize,
    /// Subscriptions opened.
    pub subscriptions: usize,
    /// When the last delivery came.
    pub last_delivery: Option<Instant>,
    /// How the subscriptions ended (the first few), for the test's output.
    pub ends: Vec<String>,
}

/// Consumes `queue` at its leader, checking and acking every delivery, re-subscribing
/// wherever the leader goes, until `until`.
pub async fn consume(
    endpoints: Vec<String>,
    queue: String,
    ledger: Arc<Ledger>,
    until: Until,
) -> ConsumerReport {
    let mut target = Target::new(endpoints);
    let mut report = ConsumerReport::default();
    let mut last_delivery = Instant::now();
    let mut last_served = Instant::now();
    loop {
        let done = match &until {
            Until::Stopped(stop) => stop.load(Ordering::Acquire),
            Until::Quiet(quiet, _) => last_delivery.elapsed() >= *quiet,
        };
        if done {
            return report;
        }
        if let Until::Quiet(_, unserved) = &until {
            assert!(
                last_served.elapsed() < *unserved,
                "no agent served {queue} to a consumer for {unserved:?}"
            );
        }
        let result = subscription(&mut target, &queue, &ledger, &until, &mut report).await;
        if let Some(at) = report.last_delivery {
            last_delivery = at;
        }
        match result {
            Ok(()) => last_served = Instant::now(),
            Err(status) => {
                target.failed(&status);
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// One subscription at the target: consumes until it fails, idles, or `until` says stop.
/// Records its deliveries and how it ended in `report`.
async fn subscription(
    target: &mut Target,
    queue: &str,
    ledger: &Ledger,
    until: &Until,
    report: &mut ConsumerReport,
) -> Result<(), tonic::Status> {
    let result = subscribe_once(target, queue, ledger, until, report).await;
    if report.ends.len() < 8 {
        let end = match &result {
            Ok(()) => "ended".to_owned(),
            Err(status) => format!("{:?}: {}", status.code(), status.message()),
        };
        report.ends.push(end);
    }
    result
}

async fn subscribe_once(
    target: &mut Target,
    queue: &str,
    ledger: &Ledger,
    until: &Until,
    report: &mut ConsumerReport,
) -> Result<(), tonic::Status> {
    let (requests, rx) = mpsc::channel(64);
    let subscribe = ConsumeRequest {
        sequence: 0,
        request: Some(Frame::Subscribe(Subscribe {
            queue: queue.to_owned(),
            prefetch: 64,
            consumer_name: "fault-test".into(),
        })),
    };
    requests
        .send(subscribe)
        .await
        .map_err(|_| tonic::Status::cancelled("request channel closed"))?;
    let mut client = ConsumerClient::new(target.channel());
    let call = client.consume(ReceiverStream::new(rx));
    let mut stream = match tokio::time::timeout(CONSUME_IDLE, call).await {
        Ok(result) => result?.into_inner(),
        Err(_) => return Err(tonic::Status::deadline_exceeded("subscribe timed out")),
    };
    report.subscriptions += 1;
    let sub = ledger.next_subscription();
    let mut sequence = 0u64;
    // Settle frames awaiting their result: sequence -> (key, attempt) of each tag.
    let mut unsettled: BTreeMap<u64, Vec<(DeliveryTag, String, u32)>> = BTreeMap::new();
    let mut batch: Vec<(DeliveryTag, String, u32)> = Vec::new();
    let mut idle_since = Instant::now();
    let stopping = |u: &Until| matches!(u, Until::Stopped(s) if s.load(Ordering::Acquire));
    let mut stopped_at: Option<Instant> = None;
    loop {
        // Once told to stop: no new acks; finish when the sent ones have their results (or
        // the agent has not answered them within the idle bound).
        if stopping(until) {
            let since = *stopped_at.get_or_insert_with(Instant::now);
            if batch.is_empty() && (unsettled.is_empty() || since.elapsed() >= CONSUME_IDLE) {
                return Ok(());
            }
        }
        // Collect acks briefly, then send them as one frame.
        let wait = if batch.is_empty() {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(5)
        };
        match tokio::time::timeout(wait, stream.message()).await {
            Ok(Ok(Some(frame))) => {
                idle_since = Instant::now();
                match frame.response {
                    Some(In::Delivery(d)) => {
                        report.last_delivery = Some(Instant::now());
                        report.deliveries += 1;
                        let key = ledger.deliver(&d, &target.current, sub);
                        if let (Some(key), Some(tag), None) = (key, d.tag, stopped_at) {
                            batch.push((tag, key, d.attempt));
                        }
                    }
                    Some(In::Settled(result)) => {
                        let failed = failed_tags(&result);
                        for (tag, key, attempt) in
                            unsettled.remove(&result.sequence).unwrap_or_default()
                        {
                            if !failed.contains(&tag_key(&tag)) {
                                ledger.ack(&key, attempt, &target.current, sub);
                                report.acks += 1;
                            }
                        }
                    }
                    None => {}
                }
            }
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                if !batch.is_empty() {
                    sequence += 1;
                    let frame = ConsumeRequest {
                        sequence,
                        request: Some(Frame::Settle(Settle {
                            action: SettleAction::Ack as i32,
                            tags: batch.iter().map(|(t, _, _)| *t).collect(),
                            delay_ms: 0,
                        })),
                    };
                    unsettled.insert(sequence, std::mem::take(&mut batch));
                    if requests.send(frame).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                let idle = idle_since.elapsed();
                let quiet = match until {
                    Until::Quiet(q, _) => idle >= *q && unsettled.is_empty(),
                    Until::Stopped(_) => false,
                };
                // Stop once every sent ack has its result (or the agent stopped answering).
                let finished = stopping(until) && (unsettled.is_empty() || idle >= CONSUME_IDLE);
                // A leader that went silent (paused, cut off) is given up; so is an idle
                // subscription at a former leader.
                if quiet || finished || idle >= CONSUME_IDLE {
                    return Ok(());
                }
            }
        }
    }
}

/// A delivery tag as a comparable `(partition, offset, attempt)` (prost's `DeliveryTag` is not
/// `Ord`).
pub fn tag_key(tag: &DeliveryTag) -> (u32, u64, u32) {
    (tag.partition, tag.offset, tag.attempt)
}

/// The tags a settle frame's result reports as failed (their acks did not take effect).
pub fn failed_tags(result: &SettleResult) -> BTreeSet<(u32, u64, u32)> {
    result
        .failures
        .iter()
        .filter_map(|f| f.tag.as_ref())
        .map(tag_key)
        .collect()
}
