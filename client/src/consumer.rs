//! A subscription over the `Consume` stream, with settles batched on the wire.
//!
//! [`Consumer::ack`] and friends only queue the tag; a batcher task sends one settle frame per
//! run of same-action tags once [`SETTLE_BATCH_MAX`] are queued or [`SETTLE_LINGER`] has passed
//! since the first, so a consumer acking one message at a time still costs the agent one fsync
//! per batch, not per message. [`Consumer::flush`] sends what is queued and waits until every
//! settle sent so far is durable, returning the tags that failed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_proto::v1::consume_request::Request as Frame;
use sluice_proto::v1::consume_response::Response as In;
use sluice_proto::v1::{
    ConsumeRequest, ConsumeResponse, Delivery, DeliveryTag, Settle, SettleAction, SettleOutcome,
    SettleResult, Subscribe,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::client::consumer;
use crate::error::{Error, Result};
use crate::retry::{Failure, Resend};
use crate::router::{Route, Router};

/// Most tags in one settle frame sent by the batcher.
pub const SETTLE_BATCH_MAX: usize = 1024;

/// How long a queued settle waits for company before it is sent anyway.
pub const SETTLE_LINGER: Duration = Duration::from_millis(1);

/// Request frames buffered toward the agent.
const REQUEST_BUFFER: usize = 64;

enum Op {
    Settle {
        action: SettleAction,
        tag: DeliveryTag,
        delay_ms: u64,
    },
    Flush(oneshot::Sender<Result<Vec<SettleOutcome>>>),
    /// The stream ended and the subscription goes on elsewhere: what its sent settles came to,
    /// and the settles it never sent, for the next stream.
    HandOver(oneshot::Sender<HandedOver>),
}

/// What an ended stream hands to the stream that follows it.
#[derive(Debug)]
struct HandedOver {
    /// Failed tags, or why settles sent there have no known outcome.
    outcome: Result<Vec<SettleOutcome>>,
    /// Settles queued there but never sent: a moved leadership keeps the deliveries with
    /// their tags (decision 0018), so they are sent again on the next stream.
    unsent: Vec<Unsent>,
}

/// A run of same-action tags not yet sent.
#[derive(Debug)]
struct Unsent {
    action: SettleAction,
    delay_ms: u64,
    tags: Vec<DeliveryTag>,
}

/// An open subscription. Dropping it ends the stream; the agent then redelivers whatever this
/// consumer had not settled.
///
/// A subscription lives on one agent at a time. When that agent stops leading the queue, goes
/// away, or ends the stream with a retryable status, [`Consumer::next`] subscribes again at
/// the queue's leader by itself (within the client's retry bound) and goes on. After a
/// leadership move the new leader keeps this consumer's deliveries for their ack timeout, so
/// settles queued but not yet sent when the old stream ended are sent on the new one and the
/// messages are not delivered again; a flush before the new stream is open fails, since they
/// are not durable yet. Settles sent on the old stream whose outcome is unknown make the
/// next [`Consumer::flush`] fail, so nothing counts as acked that was not.
#[derive(Debug)]
pub struct Consumer {
    router: Arc<Router>,
    subscribe: Subscribe,
    stream: Stream,
    /// What earlier streams left for the next flush.
    carried: Mutex<Carried>,
}

/// The tasks and channels of one `Consume` stream.
#[derive(Debug)]
struct Stream {
    deliveries: mpsc::UnboundedReceiver<Result<Delivery>>,
    ops: mpsc::UnboundedSender<Op>,
    reader: JoinHandle<()>,
    batcher: JoinHandle<()>,
}

/// Settle outcomes of streams that ended, not yet handed to a flush.
#[derive(Debug, Default)]
struct Carried {
    /// Tags that failed there.
    failures: Vec<SettleOutcome>,
    /// Why settles sent there have no known outcome.
    unknown: Option<Error>,
}

impl Consumer {
    /// Opens a `Consume` stream and subscribes to `queue` at the agent that leads it,
    /// following redirects and retrying refusals within the router's bound.
    pub(crate) async fn subscribe(
        router: Arc<Router>,
        queue: &str,
        prefetch: u32,
        consumer_name: &str,
    ) -> Result<Self> {
        let subscribe = Subscribe {
            queue: queue.to_owned(),
            prefetch,
            consumer_name: consumer_name.to_owned(),
        };
        let stream = Stream::open(&router, &subscribe, None).await?;
        Ok(Self {
            router,
            subscribe,
            stream,
            carried: Mutex::default(),
        })
    }

    /// The next delivery; `Ok(None)` when the agent ended the subscription cleanly (shutdown or
    /// queue deleted). Waits while this consumer holds `prefetch` unsettled deliveries.
    pub async fn next(&mut self) -> Result<Option<Delivery>> {
        loop {
            match self.stream.deliveries.recv().await {
                None => return Ok(None),
                Some(Ok(delivery)) => return Ok(Some(delivery)),
                Some(Err(Error::Status(status)))
                    if Failure::classify(status.clone()).is_retryable(Resend::Harmless) =>
                {
                    // Opening a subscription takes nothing from the queue: always safe. The
                    // way the stream ended (a redirect, an election, a lost agent) is where
                    // the new one starts looking.
                    let ended = Failure::classify(status);
                    let stream = Stream::open(&self.router, &self.subscribe, Some(ended)).await?;
                    let old = std::mem::replace(&mut self.stream, stream);
                    self.carry(old).await?;
                }
                Some(Err(err)) => return Err(err),
            }
        }
    }

    /// Keeps what an ended stream's settles came to for the next flush, and queues the
    /// settles it never sent on the current stream (before any the caller makes next).
    async fn carry(&self, old: Stream) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if old.ops.send(Op::HandOver(tx)).is_err() {
            return Ok(());
        }
        let handed = rx.await.unwrap_or(HandedOver {
            outcome: Err(Error::Closed("consume")),
            unsent: Vec::new(),
        });
        {
            let mut carried = lock(&self.carried);
            match handed.outcome {
                Ok(failures) => carried.failures.extend(failures),
                Err(err) => {
                    carried.unknown.get_or_insert(err);
                }
            }
        }
        for run in handed.unsent {
            for tag in run.tags {
                self.settle(run.action, tag, Duration::from_millis(run.delay_ms))?;
            }
        }
        Ok(())
    }

    /// Queues an ack: the message is done.
    pub fn ack(&self, tag: DeliveryTag) -> Result<()> {
        self.settle(SettleAction::Ack, tag, Duration::ZERO)
    }

    /// Queues a nack: make the message ready again after `delay` (zero: now).
    pub fn nack(&self, tag: DeliveryTag, delay: Duration) -> Result<()> {
        self.settle(SettleAction::Nack, tag, delay)
    }

    /// Queues an extend: still working; restart the ack timeout (or set it to `timeout`).
    pub fn extend(&self, tag: DeliveryTag, timeout: Duration) -> Result<()> {
        self.settle(SettleAction::Extend, tag, timeout)
    }

    /// Queues a reject: move the message to the dead-letter queue (or discard it).
    pub fn reject(&self, tag: DeliveryTag) -> Result<()> {
        self.settle(SettleAction::Reject, tag, Duration::ZERO)
    }

    /// Queues any settle action for one tag.
    pub fn settle(&self, action: SettleAction, tag: DeliveryTag, delay: Duration) -> Result<()> {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.stream
            .ops
            .send(Op::Settle {
                action,
                tag,
                delay_ms,
            })
            .map_err(|_| Error::Closed("consume"))
    }

    /// Sends every queued settle and waits until all settles sent so far are durable; returns
    /// the tags that failed since the previous flush. Fails when the outcome of some settle is
    /// unknown (its stream ended before it was answered): those messages may come back.
    pub async fn flush(&self) -> Result<Vec<SettleOutcome>> {
        if let Some(err) = lock(&self.carried).unknown.take() {
            return Err(err);
        }
        let (tx, rx) = oneshot::channel();
        self.stream
            .ops
            .send(Op::Flush(tx))
            .map_err(|_| Error::Closed("consume"))?;
        let mut failures = rx.await.map_err(|_| Error::Closed("consume"))??;
        failures.splice(0..0, lock(&self.carried).failures.drain(..));
        Ok(failures)
    }
}

impl Stream {
    /// Opens a `Consume` stream with `subscribe` at the queue's leader; `after` is how the
    /// previous stream of the subscription ended, if there was one.
    async fn open(router: &Router, subscribe: &Subscribe, after: Option<Failure>) -> Result<Self> {
        let queue = subscribe.queue.as_str();
        let mut route = Route::new(router, Some(queue));
        if let Some(failure) = after {
            route.next(failure, Resend::Harmless).await?;
        }
        let (requests, responses) = loop {
            let failure = match router.channel(&route.target).await {
                Ok(channel) => {
                    let (requests, rx) = mpsc::channel(REQUEST_BUFFER);
                    // Queued before the call: the agent reads the subscribe before it answers
                    // the headers (and answers a redirect instead of them).
                    requests
                        .send(ConsumeRequest {
                            sequence: 0,
                            request: Some(Frame::Subscribe(subscribe.clone())),
                        })
                        .await
                        .map_err(|_| Error::Closed("consume"))?;
                    match consumer(channel).consume(ReceiverStream::new(rx)).await {
                        Ok(responses) => break (requests, responses.into_inner()),
                        Err(status) => Failure::classify(status),
                    }
                }
                Err(err @ Error::Connect { .. }) => Failure::Unreachable(err),
                Err(err) => Failure::Final(err),
            };
            // Opening a subscription takes nothing from the queue, so it is always resendable.
            route.next(failure, Resend::Harmless).await?;
        };
        route.succeeded();
        let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
        let (results_tx, results) = mpsc::unbounded_channel();
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_responses(responses, deliveries_tx, results_tx));
        let batcher = tokio::spawn(Batcher::new(requests, results).run(ops_rx));
        Ok(Self {
            deliveries,
            ops,
            reader,
            batcher,
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Aborting both tasks drops the request sender and the response stream, which resets
        // the RPC: the agent sees the consumer gone.
        self.reader.abort();
        self.batcher.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data, consistent across a panic.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Splits the response stream into deliveries and settle results.
async fn read_responses(
    mut responses: Streaming<ConsumeResponse>,
    deliveries: mpsc::UnboundedSender<Result<Delivery>>,
    results: mpsc::UnboundedSender<Result<SettleResult, tonic::Status>>,
) {
    loop {
        match responses.message().await {
            Ok(Some(ConsumeResponse {
                response: Some(In::Delivery(delivery)),
            })) => {
                let _ = deliveries.send(Ok(delivery));
            }
            Ok(Some(ConsumeResponse {
                response: Some(In::Settled(result)),
            })) => {
                let _ = results.send(Ok(result));
            }
            // A frame from a newer server with a kind this client does not know: skip it.
            Ok(Some(ConsumeResponse { response: None })) => {}
            Ok(None) => return,
            Err(status) => {
                let _ = deliveries.send(Err(Error::Status(status.clone())));
                let _ = results.send(Err(status));
                return;
            }
        }
    }
}

/// Groups queued settles into frames and tracks which frames are durable.
struct Batcher {
    requests: mpsc::Sender<ConsumeRequest>,
    /// Settle results in order, then why the stream ended (`None` once it has).
    results: mpsc::UnboundedReceiver<Result<SettleResult, tonic::Status>>,
    /// The run of same-action tags being collected, and when it must go out.
    batch: Option<(SettleAction, u64, Vec<DeliveryTag>, Instant)>,
    /// Sequence of the last settle frame sent (0 = none; 0 is the subscribe frame).
    sent: u64,
    /// Sequence of the last settle frame answered; answers come in order.
    answered: u64,
    /// Failed tags not yet handed to a flush.
    failures: Vec<SettleOutcome>,
    /// Flushes waiting for `answered` to reach their sequence.
    flushes: Vec<(u64, oneshot::Sender<Result<Vec<SettleOutcome>>>)>,
    /// Why the stream ended, once it has.
    ended: Option<tonic::Status>,
    /// Settles queued after the stream ended, for the stream that follows.
    unsent: Vec<Unsent>,
}

impl Batcher {
    fn new(
        requests: mpsc::Sender<ConsumeRequest>,
        results: mpsc::UnboundedReceiver<Result<SettleResult, tonic::Status>>,
    ) -> Self {
        Self {
            requests,
            results,
            batch: None,
            sent: 0,
            answered: 0,
            failures: Vec::new(),
            flushes: Vec::new(),
            ended: None,
            unsent: Vec::new(),
        }
    }

    async fn run(mut self, mut ops: mpsc::UnboundedReceiver<Op>) {
        loop {
            let linger_until = self.batch.as_ref().map(|b| b.3);
            tokio::select! {
                op = ops.recv() => match op {
                    // The consumer is gone (its Drop aborts us anyway).
                    None => return,
                    Some(Op::Settle { action, tag, delay_ms }) => self.queue(action, tag, delay_ms).await,
                    Some(Op::Flush(reply)) => {
                        self.send_batch().await;
                        if self.unsent.is_empty() {
                            self.flushes.push((self.sent, reply));
                            self.answer_flushes();
                        } else {
                            // Not durable until the next stream sends them again.
                            let ended = self.ended.clone().unwrap_or_else(|| {
                                tonic::Status::unavailable("consume stream closed")
                            });
                            let _ = reply.send(Err(Error::Status(ended)));
                        }
                    }
                    Some(Op::HandOver(reply)) => {
                        let _ = reply.send(self.hand_over().await);
                        return;
                    }
                },
                _ = tokio::time::sleep_until(linger_until.unwrap_or_else(Instant::now)), if linger_until.is_some() => {
                    self.send_batch().await;
                }
                result = self.results.recv(), if self.ended.is_none() => self.take_result(result),
            }
        }
    }

    /// What this ended stream leaves for the next one: the outcome of every frame it sent
    /// and the settles it could not send.
    async fn hand_over(&mut self) -> HandedOver {
        // The reader saw the end (that is why the subscription moves on) and passed it here
        // too; take every result before it.
        while self.ended.is_none() {
            let result = self.results.recv().await;
            self.take_result(result);
        }
        self.send_batch().await;
        let outcome = match &self.ended {
            Some(status) if self.sent > self.answered => Err(Error::Status(status.clone())),
            _ => Ok(std::mem::take(&mut self.failures)),
        };
        HandedOver {
            outcome,
            unsent: std::mem::take(&mut self.unsent),
        }
    }

    /// Records one settle result, or the end of the stream (`Err`, or `None`: closed), and
    /// answers the flushes it completes.
    fn take_result(&mut self, result: Option<Result<SettleResult, tonic::Status>>) {
        match result {
            Some(Ok(result)) => {
                self.answered = result.sequence;
                self.failures.extend(result.failures);
            }
            Some(Err(status)) => self.ended = Some(status),
            None => {
                self.ended = Some(tonic::Status::unavailable("consume stream closed"));
            }
        }
        self.answer_flushes();
    }

    async fn queue(&mut self, action: SettleAction, tag: DeliveryTag, delay_ms: u64) {
        let same_run = matches!(&self.batch, Some((a, d, _, _)) if *a == action && *d == delay_ms);
        if !same_run {
            self.send_batch().await;
        }
        let (_, _, tags, _) = self
            .batch
            .get_or_insert_with(|| (action, delay_ms, Vec::new(), Instant::now() + SETTLE_LINGER));
        tags.push(tag);
        if tags.len() >= SETTLE_BATCH_MAX {
            self.send_batch().await;
        }
    }

    async fn send_batch(&mut self) {
        let Some((action, delay_ms, tags, _)) = self.batch.take() else {
            return;
        };
        if self.ended.is_some() {
            // These tags can no longer be settled here; the next stream sends them.
            self.unsent.push(Unsent {
                action,
                delay_ms,
                tags,
            });
            return;
        }
        self.sent += 1;
        // Kept until the frame is handed to the transport: a stream that ends before then
        // never saw these tags, and the next stream sends them.
        let unsent = Unsent {
            action,
            delay_ms,
            tags: tags.clone(),
        };
        let settle = Settle {
            action: action as i32,
            tags,
            delay_ms,
        };
        let frame = ConsumeRequest {
            sequence: self.sent,
            request: Some(Frame::Settle(settle)),
        };
        // The request buffer is full while the agent does not read (flow control). Results
        // are taken meanwhile: a stream that ended must fail the waiting flushes, not leave
        // them behind a send that may never complete.
        let requests = self.requests.clone();
        let send = requests.send(frame);
        tokio::pin!(send);
        loop {
            tokio::select! {
                sent = &mut send => {
                    if sent.is_err() {
                        self.ended
                            .get_or_insert(tonic::Status::unavailable("consume stream closed"));
                    }
                    return;
                }
                result = self.results.recv(), if self.ended.is_none() => {
                    self.take_result(result);
                    if self.ended.is_some() {
                        // This frame was never sent.
                        self.sent -= 1;
                        self.unsent.push(unsent);
                        return;
                    }
                }
            }
        }
    }

    fn answer_flushes(&mut self) {
        let answered = self.answered;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(upto, _)| *upto <= answered || self.ended.is_some());
        self.flushes = waiting;
        for (upto, reply) in ready {
            let answer = match &self.ended {
                Some(status) if upto > answered => Err(Error::Status(status.clone())),
                _ => Ok(std::mem::take(&mut self.failures)),
            };
            let _ = reply.send(answer);
        }
    }
}
