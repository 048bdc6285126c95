//! The `sluice.v1.Consumer` service: the bidirectional `Consume` stream and unary `Settle`.
//!
//! A `Consume` stream runs as two halves. A forwarder task owns the broker
//! [`Subscription`] and pushes its deliveries to the response stream; the request half reads
//! settle frames and settles through [`Broker::settle`] (which accepts tags from any holder),
//! so a slow fsync of a settle never holds up deliveries and vice versa. When either half ends,
//! the forwarder is aborted, which drops the `Subscription`: the broker then makes this
//! consumer's unsettled deliveries ready for others.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use prost::Message as _;
use sluice_proto::v1::consume_request::Request as Frame;
use sluice_proto::v1::consume_response::Response as Out;
use sluice_proto::v1::consumer_server::Consumer;
use sluice_proto::v1::{
    ConsumeRequest, ConsumeResponse, DeliveryTag, Settle, SettleAction, SettleRequest,
    SettleResponse, SettleResult,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::status;
use super::waiting::{self, Waiting};
use crate::broker::{Broker, Subscription};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Settles of one stream being made durable at once (each from one frame, or from several
/// small frames merged). More frames are still read and wait (see [`super::waiting`]).
pub const STREAM_IN_FLIGHT_SETTLES: usize = 64;
/// Most tags one merged settle carries (the largest prefetch: a consumer holds no more).
const SETTLE_GROUP_TAGS_MAX: usize = 10_000;

/// Response frames buffered per stream. Deliveries are bounded by the prefetch anyway; this
/// only decouples the forwarder from the network.
const RESPONSE_BUFFER: usize = 256;

type ResponseTx = mpsc::Sender<Result<ConsumeResponse, Status>>;

/// Serves `Consumer` from the broker.
#[derive(Clone)]
pub struct ConsumerService {
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
}

impl ConsumerService {
    /// A service over `broker`; open streams end cleanly once `shutdown` fires.
    pub fn new(broker: Arc<Broker>, metrics: Arc<Metrics>, shutdown: Shutdown) -> Self {
        Self {
            broker,
            metrics,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl Consumer for ConsumerService {
    type ConsumeStream = ReceiverStream<Result<ConsumeResponse, Status>>;

    async fn consume(
        &self,
        request: Request<Streaming<ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("request.subscribe: the stream ended before subscribing")
        })?;
        let Some(Frame::Subscribe(subscribe)) = first.request else {
            return Err(Status::invalid_argument(
                "request.subscribe: the first frame of a Consume stream must subscribe",
            ));
        };
        let subscription = self
            .broker
            .subscribe(
                &subscribe.queue,
                subscribe.prefetch,
                &subscribe.consumer_name,
            )
            .await?;
        tracing::debug!(queue = %subscribe.queue, consumer = %subscribe.consumer_name, "subscribed");
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let forwarder = tokio::spawn(forward(
            subscription,
            tx.clone(),
            self.metrics.clone(),
            self.shutdown.clone(),
        ));
        let stream = SettleLoop {
            broker: self.broker.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            queue: subscribe.queue,
            tx,
        };
        tokio::spawn(stream.run(inbound, forwarder));
        // Response headers go out now, before any delivery: a client can tell it is attached
        // (and an empty queue from a stalled subscribe) without waiting for a message.
        let mut response = Response::new(ReceiverStream::new(rx));
        response.metadata_mut().insert(
            status::SUBSCRIBED_METADATA,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        Ok(response)
    }

    async fn settle(
        &self,
        request: Request<SettleRequest>,
    ) -> Result<Response<SettleResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let settle = request
            .settle
            .ok_or_else(|| Status::invalid_argument("settle: required"))?;
        let (action, tags) = (settle.action(), settle.tags.len());
        let result = self.broker.settle(&request.queue, settle).await;
        self.metrics.observe_rpc("Settle", started.elapsed());
        let failures = result?;
        self.metrics
            .count_settled(action, tags.saturating_sub(failures.len()) as u64);
        Ok(Response::new(SettleResponse {
            failures: status::settle_outcomes(failures),
        }))
    }
}

/// Pushes the subscription's deliveries to the stream until the broker ends it, the client
/// goes away, or shutdown begins. Returning drops the `Subscription`.
async fn forward(
    mut subscription: Subscription,
    tx: ResponseTx,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) {
    loop {
        let delivery = tokio::select! {
            delivery = subscription.next() => delivery,
            _ = tx.closed() => return,
            // The server handed this agent's leaderships away just before (`server::run`);
            // the subscription may not have looked since, so the check below tells.
            _ = shutdown.recv() => None,
        };
        let Some(delivery) = delivery else {
            // Leadership moved to another agent: tell the client where to re-subscribe.
            if let Some(err) = subscription.ended_by() {
                let _ = tx.send(Err(Status::from(err))).await;
            }
            return;
        };
        metrics.deliveries.inc();
        if delivery.attempt > 1 {
            metrics.redeliveries.inc();
        }
        let frame = ConsumeResponse {
            response: Some(Out::Delivery(delivery)),
        };
        if tx.send(Ok(frame)).await.is_err() {
            return;
        }
    }
}

/// The request half of one `Consume` stream.
struct SettleLoop {
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    queue: String,
    tx: ResponseTx,
}

impl SettleLoop {
    async fn run(
        mut self,
        mut inbound: Streaming<ConsumeRequest>,
        mut forwarder: tokio::task::JoinHandle<()>,
    ) {
        let mut in_flight = FuturesOrdered::new();
        let mut waiting = Waiting::default();
        let mut reading = true;
        let mut forwarding = true;
        // The error that ends this stream, sent after the results of earlier settle frames.
        let mut stream_error: Option<Status> = None;
        'stream: loop {
            // Frames read before the stream failed are still settled and answered.
            while in_flight.len() < STREAM_IN_FLIGHT_SETTLES && !waiting.is_empty() {
                in_flight.push_back(settle_group(
                    self.broker.clone(),
                    self.metrics.clone(),
                    self.queue.clone(),
                    take_group(&mut waiting),
                ));
            }
            tokio::select! {
                biased;
                Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                    match result {
                        Ok(results) => {
                            for settled in results {
                                let frame = ConsumeResponse { response: Some(Out::Settled(settled)) };
                                if self.tx.send(Ok(frame)).await.is_err() {
                                    break 'stream;
                                }
                            }
                        }
                        Err(status) => {
                            // A settle the broker refused as a whole (queue deleted or moved,
                            // leadership lost, outcome ambiguous after a resync) ends this
                            // stream once the frames before it are answered; other streams are
                            // unaffected. Frames sent after it are answered by that end.
                            reading = false;
                            stream_error.get_or_insert(status);
                        }
                    }
                }
                // Once a settle failed as a whole the stream is over: waiting for the
                // forwarder would keep it open (its deliveries flowing while the agent still
                // serves, e.g. after a resync in a membership change) with later settle
                // frames never read nor answered, and a consumer's flush waiting forever.
                _ = &mut forwarder, if forwarding && stream_error.is_none() => {
                    // Broker shut down, queue deleted or client gone: take no more settles.
                    forwarding = false;
                    reading = false;
                }
                _ = self.shutdown.recv(), if reading => reading = false,
                // Read whatever arrives, however much is in flight: frames left unread pile up
                // in h2, which then closes the whole connection.
                frame = inbound.message(), if reading => {
                    match frame {
                        Ok(Some(ConsumeRequest { sequence, request: Some(Frame::Settle(settle)) })) => {
                            let encoded = settle.encoded_len();
                            if waiting.push((sequence, settle), encoded).is_err() {
                                reading = false;
                                let status = waiting::overrun("settle", in_flight.len(), waiting.len());
                                stream_error = Some(status);
                            }
                        }
                        Ok(Some(ConsumeRequest { request: Some(Frame::Subscribe(_)), .. })) => {
                            reading = false;
                            stream_error = Some(Status::invalid_argument(
                                "request.subscribe: only the first frame may subscribe",
                            ));
                        }
                        Ok(Some(ConsumeRequest { request: None, .. })) => {
                            reading = false;
                            stream_error = Some(Status::invalid_argument(
                                "request: a frame must carry `subscribe` or `settle`",
                            ));
                        }
                        // The client half-closed: it will settle nothing more.
                        Ok(None) => reading = false,
                        Err(status) => {
                            reading = false;
                            stream_error = Some(status);
                        }
                    }
                }
                else => break,
            }
        }
        // Dropping the subscription before the stream closes means a consumer that reconnects
        // at once finds its unsettled messages already ready again.
        if forwarding {
            // Only while it is still running: a finished JoinHandle must not be polled again.
            forwarder.abort();
            let _ = forwarder.await;
        }
        if let Some(status) = stream_error {
            let _ = self.tx.send(Err(status)).await;
        }
    }
}

/// The oldest waiting settle frame and the frames after it with the same action (and delay or
/// timeout), up to [`SETTLE_GROUP_TAGS_MAX`] tags: one tag per frame is legal, and merged those
/// frames cost one durable write, not one each.
fn take_group(waiting: &mut Waiting<(u64, Settle)>) -> Vec<(u64, Settle)> {
    let Some(first) = waiting.pop_if(|_| true) else {
        return Vec::new();
    };
    let mut tags = first.1.tags.len();
    let (action, delay_ms) = (first.1.action, first.1.delay_ms);
    let mut group = vec![first];
    while let Some(next) = waiting.pop_if(|(_, settle)| {
        settle.action == action
            && settle.delay_ms == delay_ms
            && tags + settle.tags.len() <= SETTLE_GROUP_TAGS_MAX
    }) {
        tags += next.1.tags.len();
        group.push(next);
    }
    group
}

/// Settles a group of frames as one settle; each frame is answered with its own sequence and
/// the failures of its own tags.
async fn settle_group(
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    queue: String,
    frames: Vec<(u64, Settle)>,
) -> Result<Vec<SettleResult>, Status> {
    let started = Instant::now();
    let Some((_, first)) = frames.first() else {
        return Ok(Vec::new());
    };
    let action: SettleAction = first.action();
    let merged = Settle {
        action: first.action,
        delay_ms: first.delay_ms,
        tags: frames
            .iter()
            .flat_map(|(_, s)| s.tags.iter().copied())
            .collect(),
    };
    let tags = merged.tags.len();
    let failures = broker.settle(&queue, merged).await?;
    metrics.observe_rpc("ConsumeSettle", started.elapsed());
    metrics.count_settled(action, tags.saturating_sub(failures.len()) as u64);
    // A failure belongs to the frame that sent its tag; a tag sent twice fails in the later
    // frame (the earlier one settled it), so frames are matched in order.
    let mut results: Vec<SettleResult> = frames
        .iter()
        .map(|(sequence, _)| SettleResult {
            sequence: *sequence,
            failures: Vec::new(),
        })
        .collect();
    let mut owners: HashMap<DeliveryTag, VecDeque<usize>> = HashMap::new();
    for (i, (_, settle)) in frames.iter().enumerate() {
        for tag in &settle.tags {
            owners.entry(*tag).or_default().push_back(i);
        }
    }
    for failure in status::settle_outcomes(failures) {
        let owner = failure
            .tag
            .and_then(|tag| owners.get_mut(&tag))
            .and_then(|frames| {
                if frames.len() > 1 {
                    frames.pop_back()
                } else {
                    frames.front().copied()
                }
            })
            .unwrap_or(0);
        results[owner].failures.push(failure);
    }
    Ok(results)
}
