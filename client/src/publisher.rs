//! Pipelined publishing over the `PublishStream` RPC.
//!
//! [`Publisher::send`] puts a frame on the stream and returns a [`Pending`] confirm at once, so
//! many frames are in flight and the agent can group-commit them together. A semaphore bounds
//! the frames awaiting confirms (the window); `send` waits when it is full, which is the
//! backpressure. Confirms arrive in request order, so a reader task matches each response to
//! the oldest pending frame.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use sluice_proto::v1::publisher_client::PublisherClient;
use sluice_proto::v1::{Confirm, Message, PublishStreamRequest, PublishStreamResponse};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::error::{Error, Result};

/// Confirms of one frame, or why they never came.
type Answer = Result<Vec<Confirm>>;

/// A frame sent and not yet confirmed.
struct Waiting {
    sequence: u64,
    answer: oneshot::Sender<Answer>,
    /// Released (freeing a window slot) when the frame is answered.
    _slot: OwnedSemaphorePermit,
}

/// Frames awaiting confirms, and whether the stream is over.
#[derive(Default)]
struct Book {
    waiting: VecDeque<Waiting>,
    /// Set when the response stream ended; later sends fail at once with this.
    closed: Option<tonic::Status>,
}

fn lock(book: &Mutex<Book>) -> MutexGuard<'_, Book> {
    // A panic while holding this lock leaves the queue consistent (push/pop only).
    book.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A pipelined publish stream.
pub struct Publisher {
    tx: Option<mpsc::Sender<PublishStreamRequest>>,
    window: Arc<Semaphore>,
    book: Arc<Mutex<Book>>,
    next_sequence: u64,
    reader: JoinHandle<()>,
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
    /// Opens the stream; at most `window` frames (at least 1) await confirms at a time.
    pub(crate) async fn open(mut client: PublisherClient<Channel>, window: usize) -> Result<Self> {
        let window = window.max(1);
        let (tx, rx) = mpsc::channel(window);
        let responses = client
            .publish_stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let book = Arc::new(Mutex::new(Book::default()));
        let reader = tokio::spawn(read_confirms(responses, book.clone()));
        Ok(Self {
            tx: Some(tx),
            window: Arc::new(Semaphore::new(window)),
            book,
            next_sequence: 1,
            reader,
        })
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
        let tx = self.tx.as_ref().ok_or(Error::Closed("publish"))?;
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let (answer, pending) = oneshot::channel();
        {
            let mut book = lock(&self.book);
            if let Some(status) = &book.closed {
                return Err(closed_error(status));
            }
            // Registered before the frame is sent, so its response always finds it.
            book.waiting.push_back(Waiting {
                sequence,
                answer,
                _slot: slot,
            });
        }
        let frame = PublishStreamRequest {
            sequence,
            queue: queue.to_owned(),
            messages,
        };
        if tx.send(frame).await.is_err() {
            return Err(Error::Closed("publish"));
        }
        Ok(Pending(pending))
    }

    /// Frames sent and not yet confirmed.
    pub fn in_flight(&self) -> usize {
        lock(&self.book).waiting.len()
    }

    /// Ends the stream after every sent frame is answered; pending confirms still resolve.
    pub async fn close(mut self) -> Result<()> {
        self.tx = None; // Half-close: the agent answers what it has, then ends the stream.
        let reader = std::mem::replace(&mut self.reader, tokio::spawn(async {}));
        let _ = reader.await;
        match lock(&self.book).closed.take() {
            Some(status) if status.code() != tonic::Code::Ok => Err(Error::Status(status)),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("next_sequence", &self.next_sequence)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Matches responses to waiting frames until the stream ends, then fails whatever is left.
async fn read_confirms(mut responses: Streaming<PublishStreamResponse>, book: Arc<Mutex<Book>>) {
    let end = loop {
        match responses.message().await {
            Ok(Some(response)) => {
                let Some(waiting) = lock(&book).waiting.pop_front() else {
                    break tonic::Status::internal("publish stream: a confirm for no sent frame");
                };
                if waiting.sequence != response.sequence {
                    let status = tonic::Status::internal(format!(
                        "publish stream: confirm for sequence {} while {} was expected",
                        response.sequence, waiting.sequence
                    ));
                    let _ = waiting.answer.send(Err(Error::Status(status.clone())));
                    break status;
                }
                let _ = waiting.answer.send(Ok(response.confirms));
            }
            Ok(None) => break tonic::Status::ok("publish stream closed"),
            Err(status) => break status,
        }
    };
    let mut book = lock(&book);
    for waiting in book.waiting.drain(..) {
        let _ = waiting.answer.send(Err(closed_error(&end)));
    }
    book.closed = Some(end);
}

/// The error for a frame the stream ended before answering: the stream's status, or
/// [`Error::Closed`] when it ended cleanly.
fn closed_error(end: &tonic::Status) -> Error {
    if end.code() == tonic::Code::Ok {
        Error::Closed("publish")
    } else {
        Error::Status(end.clone())
    }
}
