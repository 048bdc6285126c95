//! The `sluice.v1.Publisher` service: batch publish and the pipelined publish stream.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sluice_proto::v1::publisher_server::Publisher;
use sluice_proto::v1::{
    Confirm, PublishRequest, PublishResponse, PublishStreamRequest, PublishStreamResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::check_batch_len;
use super::status::{self, failed_confirm};
use crate::broker::Broker;
use crate::error::BrokerError;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Frames of one publish stream being made durable at once. Beyond this the server stops
/// reading the stream, so HTTP/2 flow control pushes back on the producer; 64 frames keep
/// several group commits busy without letting one client queue unbounded work.
pub const STREAM_IN_FLIGHT_FRAMES: usize = 64;

/// Serves `Publisher` from the broker.
#[derive(Clone)]
pub struct PublisherService {
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
}

impl PublisherService {
    /// A service over `broker`; streams stop taking new frames once `shutdown` fires.
    pub fn new(broker: Arc<Broker>, metrics: Arc<Metrics>, shutdown: Shutdown) -> Self {
        Self {
            broker,
            metrics,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl Publisher for PublisherService {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        check_batch_len(request.messages.len())?;
        let count = request.messages.len() as u64;
        let result = self.broker.publish(&request.queue, request.messages).await;
        self.metrics.observe_rpc("Publish", started.elapsed());
        match result {
            Ok(confirmations) => {
                let confirms = status::confirms(confirmations);
                count_confirms(&self.metrics, &confirms);
                Ok(Response::new(PublishResponse { confirms }))
            }
            Err(err) => {
                self.metrics.publish_rejected.inc_by(count);
                Err(err.into())
            }
        }
    }

    type PublishStreamStream = ReceiverStream<Result<PublishStreamResponse, Status>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_IN_FLIGHT_FRAMES);
        let pipeline = Pipeline {
            broker: self.broker.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            tx,
        };
        tokio::spawn(pipeline.run(request.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One publish stream: reads frames as they arrive, starts each frame's publish at once, and
/// answers in request order as each becomes durable.
struct Pipeline {
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    tx: mpsc::Sender<Result<PublishStreamResponse, Status>>,
}

impl Pipeline {
    async fn run(mut self, mut inbound: Streaming<PublishStreamRequest>) {
        let mut in_flight = FuturesOrdered::new();
        let mut reading = true;
        // A broken request stream (decode error, reset) ends this stream, but only after every
        // frame already taken has been answered: those may be durable, and the producer needs
        // their confirms to know what not to resend.
        let mut stream_error = None;
        loop {
            tokio::select! {
                biased;
                Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                    let response = match answer {
                        Answer::Done(response) => response,
                        Answer::Redirect(response, status) => {
                            self.redirect(response, status, &mut in_flight).await;
                            return;
                        }
                    };
                    if self.tx.send(Ok(response)).await.is_err() {
                        return; // The producer is gone; nobody can read the confirms.
                    }
                }
                _ = self.shutdown.recv(), if reading => {
                    // Graceful drain: take no new frames, answer the ones taken, then end the
                    // stream with OK so the producer sees a clean close.
                    reading = false;
                }
                frame = inbound.message(), if reading && in_flight.len() < STREAM_IN_FLIGHT_FRAMES => {
                    match frame {
                        Ok(Some(frame)) => in_flight.push_back(publish_frame(
                            self.broker.clone(),
                            self.metrics.clone(),
                            frame,
                        )),
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
        if let Some(status) = stream_error {
            let _ = self.tx.send(Err(status)).await;
        }
    }

    /// Another agent leads the queue: ends the stream with the redirect, so the producer
    /// reopens it at the leader and resends every unanswered frame. That is only safe when no
    /// later frame was taken (leadership can arrive between two frames), so the frames behind
    /// the refused one finish first; if any of them was taken, every frame is answered in
    /// order (the refused ones with failed confirms) before the redirect.
    async fn redirect(
        &self,
        refused: PublishStreamResponse,
        status: Status,
        in_flight: &mut FuturesOrdered<impl Future<Output = Answer>>,
    ) {
        let mut rest = Vec::new();
        while let Some(answer) = in_flight.next().await {
            rest.push(answer);
        }
        if rest.iter().any(|a| matches!(a, Answer::Done(_))) {
            let answers = std::iter::once(refused).chain(rest.into_iter().map(|a| match a {
                Answer::Done(response) | Answer::Redirect(response, _) => response,
            }));
            for response in answers {
                if self.tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        }
        let _ = self.tx.send(Err(status)).await;
    }
}

/// How one frame ended.
enum Answer {
    /// Confirms (some may be failures) to send in order.
    Done(PublishStreamResponse),
    /// Nothing was taken: another agent leads the queue. The response holds failed confirms,
    /// used only when a later frame was taken and everything must be answered.
    Redirect(PublishStreamResponse, Status),
}

/// Publishes one frame. Frame-level failures (unknown queue, batch too large, shutting down)
/// become a failed confirm for each of its messages rather than ending the stream, so one bad
/// frame does not cost the producer the confirms of the frames pipelined behind it.
async fn publish_frame(
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    frame: PublishStreamRequest,
) -> Answer {
    let started = Instant::now();
    let count = frame.messages.len();
    let mut redirect = None;
    let confirms = match check_batch_len(count) {
        Err(status) => vec![failed_confirm(&status); count],
        Ok(()) => match broker.publish(&frame.queue, frame.messages).await {
            Ok(confirmations) => status::confirms(confirmations),
            Err(err) => {
                let refused = matches!(err, BrokerError::NotLeader { .. });
                let status = Status::from(err);
                let confirms = vec![failed_confirm(&status); count];
                if refused {
                    redirect = Some(status);
                }
                confirms
            }
        },
    };
    metrics.observe_rpc("PublishStream", started.elapsed());
    crate::replication::timing::record("publish_frame", started.elapsed());
    count_confirms(&metrics, &confirms);
    let response = PublishStreamResponse {
        sequence: frame.sequence,
        confirms,
    };
    match redirect {
        Some(status) => Answer::Redirect(response, status),
        None => Answer::Done(response),
    }
}

fn count_confirms(metrics: &Metrics, confirms: &[Confirm]) {
    let ok = confirms.iter().filter(|c| c.code == 0).count() as u64;
    metrics.published.inc_by(ok);
    metrics.publish_rejected.inc_by(confirms.len() as u64 - ok);
}
