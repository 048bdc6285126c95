//! Pipelined publishing over the `PublishStream` RPC, one stream per queue, each to the agent
//! that leads the queue.
//!
//! [`Publisher::send`] hands a frame to its queue's lane and returns a [`Pending`] confirm at
//! once, so many frames are in flight and the agent can group-commit them together. A
//! semaphore bounds the frames awaiting confirms across all lanes (the window); `send` waits
//! when it is full, which is the backpressure. Confirms arrive in request order, so a lane
//! matches each response to its oldest unanswered frame.
//!
//! A lane whose stream ends with a redirect or a refusal reopens it at the leader (with the
//! client's retry bound and backoff) and resends its unanswered frames: the agent answers every
//! frame it accepted before it ends a stream, so those were refused. A stream that breaks
//! (connection lost) is reopened and its frames resent only when each of their messages
//! carries an idempotency key; otherwise they fail with the error, as they may have been
//! taken. Once a queue's stream cannot be (re)opened within the retry bound, or the agent ends
//! it (shutting down), that queue's lane is finished: later `send`s to it fail at once, and
//! the application opens a new publisher when it wants to try again.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use sluice_proto::v1::{Confirm, Message, PublishStreamRequest, PublishStreamResponse};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Streaming;

use crate::client::{publisher, resend_of};
use crate::error::{Error, Result};
use crate::retry::{Failure, Resend};
use crate::router::{Route, Router};

/// Confirms of one frame, or why they never came.
type Answer = Result<Vec<Confirm>>;

/// A frame on its way: kept until answered so it can be resent on a new stream.
struct Frame {
    sequence: u64,
    messages: Vec<Message>,
    answer: oneshot::Sender<Answer>,
    /// Released (freeing a window slot) when the frame is answered.
    _slot: OwnedSemaphorePermit,
}

/// The task publishing one queue's frames, and the way to hand it more.
struct Lane {
    frames: mpsc::UnboundedSender<Frame>,
    /// Ends with how the lane's last stream ended (`None`: cleanly).
    driver: JoinHandle<Option<tonic::Status>>,
}

/// A pipelined publisher.
pub struct Publisher {
    router: Arc<Router>,
    window: Arc<Semaphore>,
    window_size: usize,
    lanes: HashMap<String, Lane>,
    next_sequence: u64,
}

/// The confirms of one sent frame; resolves once the agent made the frame durable.
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Answer>);

impl Future for Pending {
    type Output = Answer;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(Error::Closed("publish"))))
    }
}

impl Publisher {
    /// A publisher with at most `window` frames (at least 1) awaiting confirms; streams open
    /// on the first frame for each queue.
    pub(crate) fn new(router: Arc<Router>, window: usize) -> Self {
        let window_size = window.max(1);
        Self {
            router,
            window: Arc::new(Semaphore::new(window_size)),
            window_size,
            lanes: HashMap::new(),
            next_sequence: 1,
        }
    }

    /// Sends `messages` for `queue` as one frame (at most 10,000 messages), waiting while the
    /// window is full; the returned [`Pending`] resolves to the frame's confirms in order,
    /// failures included (see [`crate::client::check_confirms`]).
    pub async fn send(&mut self, queue: &str, messages: Vec<Message>) -> Result<Pending> {
        let slot = self
            .window
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed("publish"))?;
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let (answer, pending) = oneshot::channel();
        let frame = Frame {
            sequence,
            messages,
            answer,
            _slot: slot,
        };
        let lane = self.lanes.entry(queue.to_owned()).or_insert_with(|| {
            let (frames, rx) = mpsc::unbounded_channel();
            let driver = tokio::spawn(drive(self.router.clone(), queue.to_owned(), rx));
            Lane { frames, driver }
        });
        lane.frames
            .send(frame)
            .map_err(|_| Error::Closed("publish"))?;
        Ok(Pending(pending))
    }

    /// Frames sent and not yet confirmed.
    pub fn in_flight(&self) -> usize {
        self.window_size - self.window.available_permits()
    }

    /// Ends the streams after every sent frame is answered; pending confirms still resolve.
    /// Returns the error of the first stream that ended with one.
    pub async fn close(mut self) -> Result<()> {
        let mut first_error = None;
        for (_, lane) in std::mem::take(&mut self.lanes) {
            drop(lane.frames); // The lane half-closes once its queue is empty.
            match lane.driver.await {
                Ok(Some(status)) => {
                    first_error.get_or_insert(Error::Status(status));
                }
                Ok(None) => {}
                Err(_) => {
                    first_error.get_or_insert(Error::Closed("publish"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("next_sequence", &self.next_sequence)
            .field("in_flight", &self.in_flight())
            .field("queues", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        for lane in self.lanes.values() {
            lane.driver.abort();
        }
    }
}

/// One open `PublishStream`.
struct Stream {
    /// `None` once the publisher is closed: the stream is half-closed.
    /// Unbounded: the window already bounds what is in flight, and a bounded sender could
    /// block the lane while the agent waits for it to read confirms.
    requests: Option<mpsc::UnboundedSender<PublishStreamRequest>>,
    responses: Streaming<PublishStreamResponse>,
}

/// Publishes `queue`'s frames until the publisher is closed and every frame is answered.
async fn drive(
    router: Arc<Router>,
    queue: String,
    mut input: mpsc::UnboundedReceiver<Frame>,
) -> Option<tonic::Status> {
    // Frames written to the current stream (or to be resent on the next), oldest first.
    let mut waiting: VecDeque<Frame> = VecDeque::new();
    let mut input_open = true;
    let mut last_end = None;
    let mut route = Route::new(&router, Some(&queue));
    loop {
        if !input_open && waiting.is_empty() {
            return last_end;
        }
        if waiting.is_empty() {
            // Idle: no stream is needed until the next frame.
            match input.recv().await {
                Some(frame) => waiting.push_back(frame),
                None => {
                    input_open = false;
                    continue;
                }
            }
        }
        let mut stream = match open(&router, &mut route, &waiting).await {
            Ok(stream) => stream,
            Err(err) => {
                // Out of retries: the lane ends, so later sends fail at once instead of each
                // waiting out the retry bound again (dropped frames answer `Closed`).
                fail_all(&mut waiting, &err);
                return Some(status_of(err));
            }
        };
        if !input_open {
            stream.requests = None;
        }
        // Serve the stream until it ends.
        let end = loop {
            tokio::select! {
                frame = input.recv(), if input_open => match frame {
                    Some(frame) => {
                        if let Some(requests) = &stream.requests {
                            // A send error means the stream is ending; its status follows.
                            let _ = requests.send(request(&queue, &frame));
                        }
                        waiting.push_back(frame);
                    }
                    None => {
                        input_open = false;
                        stream.requests = None; // Half-close: the agent answers, then ends.
                    }
                },
                response = stream.responses.message() => match response {
                    Ok(Some(response)) => {
                        route.succeeded();
                        if let Err(status) = answer(&mut waiting, response) {
                            break Err(status);
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(status) => break Err(status),
                },
            }
        };
        match end {
            Ok(()) => {
                // A clean end with frames unanswered (the agent shut down): they may or may
                // not have been taken, so they fail rather than being resent. A stream the
                // agent ended while frames could still come ends the lane (later sends fail);
                // one ended after the publisher closed is the normal finish.
                fail_all(&mut waiting, &Error::Closed("publish"));
                if input_open {
                    return None;
                }
                last_end = None;
            }
            Err(status) => {
                let resend = resend_of_frames(&waiting);
                if let Err(err) = route.next(Failure::classify(status.clone()), resend).await {
                    fail_all(&mut waiting, &err);
                    return Some(status);
                }
                // Otherwise the loop reopens at the route's new target and resends.
            }
        }
    }
}

/// Opens a stream at the route's target and writes `waiting` to it, retrying refusals and
/// unreachable agents within the route's bound.
async fn open(router: &Router, route: &mut Route<'_>, waiting: &VecDeque<Frame>) -> Result<Stream> {
    loop {
        let failure = match router.channel(&route.target).await {
            Ok(channel) => {
                // Written before the call: the agent may wait for a first frame to answer.
                let (requests, rx) = mpsc::unbounded_channel();
                for frame in waiting {
                    let _ = requests.send(request(route.queue(), frame));
                }
                match publisher(channel)
                    .publish_stream(UnboundedReceiverStream::new(rx))
                    .await
                {
                    Ok(responses) => {
                        return Ok(Stream {
                            requests: Some(requests),
                            responses: responses.into_inner(),
                        });
                    }
                    Err(status) => Failure::classify(status),
                }
            }
            Err(err @ Error::Connect { .. }) => Failure::Unreachable(err),
            Err(err) => Failure::Final(err),
        };
        route.next(failure, resend_of_frames(waiting)).await?;
    }
}

fn request(queue: &str, frame: &Frame) -> PublishStreamRequest {
    PublishStreamRequest {
        sequence: frame.sequence,
        queue: queue.to_owned(),
        messages: frame.messages.clone(),
    }
}

/// Hands `response` to the oldest waiting frame; an out-of-order confirm ends the stream.
fn answer(
    waiting: &mut VecDeque<Frame>,
    response: PublishStreamResponse,
) -> Result<(), tonic::Status> {
    let Some(frame) = waiting.pop_front() else {
        return Err(tonic::Status::internal(
            "publish stream: a confirm for no sent frame",
        ));
    };
    if frame.sequence != response.sequence {
        let status = tonic::Status::internal(format!(
            "publish stream: confirm for sequence {} while {} was expected",
            response.sequence, frame.sequence
        ));
        let _ = frame.answer.send(Err(Error::Status(status.clone())));
        return Err(status);
    }
    let _ = frame.answer.send(Ok(response.confirms));
    Ok(())
}

/// Whether the waiting frames may all be resent after a broken connection.
fn resend_of_frames(waiting: &VecDeque<Frame>) -> Resend {
    if waiting
        .iter()
        .all(|frame| resend_of(&frame.messages) == Resend::Harmless)
    {
        Resend::Harmless
    } else {
        Resend::OnlyIfRefused
    }
}

/// Answers every waiting frame with `err`.
fn fail_all(waiting: &mut VecDeque<Frame>, err: &Error) {
    for frame in waiting.drain(..) {
        let _ = frame.answer.send(Err(copy(err)));
    }
}

/// A copy of `err` for one more frame ([`Error`] holds non-cloneable transport errors, whose
/// text is kept).
fn copy(err: &Error) -> Error {
    match err {
        Error::Status(status) => Error::Status(status.clone()),
        Error::Closed(what) => Error::Closed(what),
        other => Error::Status(tonic::Status::unavailable(other.to_string())),
    }
}

fn status_of(err: Error) -> tonic::Status {
    match err {
        Error::Status(status) => status,
        other => tonic::Status::unavailable(other.to_string()),
    }
}
