//! The `sluice.v1.Publisher` service: batch publish and the pipelined publish stream.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use prost::Message as _;
use sluice_proto::v1::publisher_server::Publisher;
use sluice_proto::v1::{
    Confirm, PublishRequest, PublishResponse, PublishStreamRequest, PublishStreamResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::check_batch_len;
use super::status::{self, failed_confirm};
use super::waiting::{self, Waiting};
use crate::broker::{Broker, dead_letter};
use crate::error::BrokerError;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// Publishes of one stream being made durable at once (each from one frame, or from several
/// small frames merged). More frames are still read (see [`super::waiting`]) and wait; 64 keep
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

/// One publish stream: reads frames as they arrive, starts each frame's publish as soon as
/// there is room (merging waiting frames of the same queue into one publish), and answers
/// every frame in request order as it becomes durable.
struct Pipeline {
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    tx: mpsc::Sender<Result<PublishStreamResponse, Status>>,
}

impl Pipeline {
    async fn run(mut self, mut inbound: Streaming<PublishStreamRequest>) {
        let mut in_flight = FuturesOrdered::new();
        let mut waiting = Waiting::default();
        let mut reading = true;
        // A broken request stream (decode error, reset, overrun) ends this stream, but only
        // after every frame already read has been answered: those may be durable, and the
        // producer needs their confirms to know what not to resend.
        let mut stream_error = None;
        loop {
            while in_flight.len() < STREAM_IN_FLIGHT_FRAMES && !waiting.is_empty() {
                let group = take_group(&mut waiting);
                in_flight.push_back(publish_group(
                    self.broker.clone(),
                    self.metrics.clone(),
                    group,
                ));
            }
            tokio::select! {
                biased;
                Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                    let responses = match answer {
                        Answer::Done(responses) => responses,
                        Answer::Redirect(responses, status) => {
                            self.redirect(responses, status, &mut in_flight).await;
                            return;
                        }
                    };
                    for response in responses {
                        if self.tx.send(Ok(response)).await.is_err() {
                            return; // The producer is gone; nobody can read the confirms.
                        }
                    }
                }
                _ = self.shutdown.recv(), if reading => {
                    // Graceful drain: take no new frames, answer the ones taken, then end the
                    // stream with OK so the producer sees a clean close.
                    reading = false;
                }
                // Read whatever arrives, however much is in flight: frames left unread pile up
                // in h2, which then closes the whole connection.
                frame = inbound.message(), if reading => {
                    match frame {
                        Ok(Some(frame)) => {
                            let encoded = frame.encoded_len();
                            if waiting.push(frame, encoded).is_err() {
                                reading = false;
                                let status = waiting::overrun("publish stream", in_flight.len(), waiting.len());
                                stream_error = Some(status);
                            }
                        }
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
    /// later frame was taken (leadership can arrive between two publishes), so the publishes
    /// behind the refused one finish first; if any of them was taken, every frame is answered
    /// in order (the refused ones with failed confirms) before the redirect. Frames still
    /// waiting were never started: they stay unanswered and are resent.
    async fn redirect(
        &self,
        refused: Vec<PublishStreamResponse>,
        status: Status,
        in_flight: &mut FuturesOrdered<impl Future<Output = Answer>>,
    ) {
        let mut rest = Vec::new();
        while let Some(answer) = in_flight.next().await {
            rest.push(answer);
        }
        if rest.iter().any(|a| matches!(a, Answer::Done(_))) {
            let answers = refused
                .into_iter()
                .chain(rest.into_iter().flat_map(|a| match a {
                    Answer::Done(responses) | Answer::Redirect(responses, _) => responses,
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

/// How one publish (of one or several frames) ended.
enum Answer {
    /// Each frame's confirms (some may be failures) to send in order.
    Done(Vec<PublishStreamResponse>),
    /// Nothing was taken: another agent leads the queue. The responses hold failed confirms,
    /// used only when a later frame was taken and everything must be answered.
    Redirect(Vec<PublishStreamResponse>, Status),
}

/// The oldest waiting frame and the frames after it that can share its publish: same queue,
/// at most [`super::MAX_MESSAGES_PER_BATCH`] messages together, no dead-letter marks (a
/// forwarded batch's marks must stay one batch's). Small frames merged this way cost one
/// broker call, not one each.
fn take_group(waiting: &mut Waiting<PublishStreamRequest>) -> Vec<PublishStreamRequest> {
    let mergeable =
        |frame: &PublishStreamRequest| frame.messages.iter().all(|m| !dead_letter::is_marked(m));
    let Some(first) = waiting.pop_if(|_| true) else {
        return Vec::new();
    };
    let mut total = first.messages.len();
    let merging = total <= super::MAX_MESSAGES_PER_BATCH && mergeable(&first);
    let mut group = vec![first];
    if !merging {
        return group;
    }
    loop {
        let next = waiting.pop_if(|frame| {
            frame.queue == group[0].queue
                && total + frame.messages.len() <= super::MAX_MESSAGES_PER_BATCH
                && mergeable(frame)
        });
        let Some(next) = next else { break };
        total += next.messages.len();
        group.push(next);
    }
    group
}

/// Publishes a group of frames as one batch. Failures of the batch as a whole (unknown queue,
/// batch too large, shutting down) become a failed confirm for each of its messages rather
/// than ending the stream, so one bad frame does not cost the producer the confirms of the
/// frames pipelined behind it.
async fn publish_group(
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    frames: Vec<PublishStreamRequest>,
) -> Answer {
    let started = Instant::now();
    let counts: Vec<(u64, usize)> = frames
        .iter()
        .map(|f| (f.sequence, f.messages.len()))
        .collect();
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    let mut redirect = None;
    let confirms = match check_batch_len(total) {
        Err(status) => vec![failed_confirm(&status); total],
        Ok(()) => {
            let queue = frames.first().map(|f| f.queue.clone()).unwrap_or_default();
            let messages = frames.into_iter().flat_map(|f| f.messages).collect();
            match broker.publish(&queue, messages).await {
                Ok(confirmations) => status::confirms(confirmations),
                Err(err) => {
                    let refused = matches!(err, BrokerError::NotLeader { .. });
                    let status = Status::from(err);
                    let confirms = vec![failed_confirm(&status); total];
                    if refused {
                        redirect = Some(status);
                    }
                    confirms
                }
            }
        }
    };
    metrics.observe_rpc("PublishStream", started.elapsed());
    crate::replication::timing::record("publish_frame", started.elapsed());
    count_confirms(&metrics, &confirms);
    let mut confirms = confirms.into_iter();
    let responses = counts
        .into_iter()
        .map(|(sequence, n)| PublishStreamResponse {
            sequence,
            confirms: confirms.by_ref().take(n).collect(),
        })
        .collect();
    match redirect {
        Some(status) => Answer::Redirect(responses, status),
        None => Answer::Done(responses),
    }
}

fn count_confirms(metrics: &Metrics, confirms: &[Confirm]) {
    let ok = confirms.iter().filter(|c| c.code == 0).count() as u64;
    metrics.published.inc_by(ok);
    metrics.publish_rejected.inc_by(confirms.len() as u64 - ok);
}
