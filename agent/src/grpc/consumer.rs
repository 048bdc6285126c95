//! The `sluice.v1.Consumer` service: the bidirectional `Consume` stream and unary `Settle`.
//!
//! A `Consume` stream runs as two halves. A forwarder task owns the broker
//! [`Subscription`] and pushes its deliveries to the response stream; the request half reads
//! settle frames and settles through [`Broker::settle`] (which accepts tags from any holder),
//! so a slow fsync of a settle never holds up deliveries and vice versa. When either half ends,
//! the forwarder is aborted, which drops the `Subscription`: the broker then makes this
//! consumer's unsettled deliveries ready for others.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sluice_proto::v1::consume_request::Request as Frame;
use sluice_proto::v1::consume_response::Response as Out;
use sluice_proto::v1::consumer_server::Consumer;
use sluice_proto::v1::{
    ConsumeRequest, ConsumeResponse, Settle, SettleAction, SettleRequest, SettleResponse,
    SettleResult,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::status;
use crate::broker::{Broker, Subscription};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Settle frames of one stream being made durable at once; past this the request side stops
/// reading and HTTP/2 flow control slows the consumer's acks down.
pub const STREAM_IN_FLIGHT_SETTLES: usize = 64;

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
        Ok(Response::new(ReceiverStream::new(rx)))
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
        let mut reading = true;
        let mut forwarding = true;
        // The error that ends this stream, sent after the results of earlier settle frames.
        let mut stream_error: Option<Status> = None;
        loop {
            tokio::select! {
                biased;
                Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                    match result {
                        Ok(settled) => {
                            let frame = ConsumeResponse { response: Some(Out::Settled(settled)) };
                            if self.tx.send(Ok(frame)).await.is_err() {
                                break;
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
                frame = inbound.message(), if reading && in_flight.len() < STREAM_IN_FLIGHT_SETTLES => {
                    match frame {
                        Ok(Some(ConsumeRequest { sequence, request: Some(Frame::Settle(settle)) })) => {
                            in_flight.push_back(settle_frame(
                                self.broker.clone(),
                                self.metrics.clone(),
                                self.queue.clone(),
                                sequence,
                                settle,
                            ));
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

async fn settle_frame(
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    queue: String,
    sequence: u64,
    settle: Settle,
) -> Result<SettleResult, Status> {
    let started = Instant::now();
    let action: SettleAction = settle.action();
    let tags = settle.tags.len();
    let failures = broker.settle(&queue, settle).await?;
    metrics.observe_rpc("ConsumeSettle", started.elapsed());
    metrics.count_settled(action, tags.saturating_sub(failures.len()) as u64);
    Ok(SettleResult {
        sequence,
        failures: status::settle_outcomes(failures),
    })
}
