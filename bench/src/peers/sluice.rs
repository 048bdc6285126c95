//! Sluice: a real `sluice-agent broker` process (fsync `always`, the default) in a temporary
//! data directory.
//!
//! Publishing uses the `PublishStream` RPC: each batch is one frame and confirms stream back
//! per frame, with several frames in flight per stream. Consuming uses one `Consume` stream
//! per consumer with `prefetch` credit and one ack frame per received batch.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use sluice_proto::v1::admin_client::AdminClient;
use sluice_proto::v1::consume_request::Request as ConsumeFrame;
use sluice_proto::v1::consume_response::Response as ConsumeReply;
use sluice_proto::v1::consumer_client::ConsumerClient;
use sluice_proto::v1::publisher_client::PublisherClient;
use sluice_proto::v1::{
    ConsumeRequest, ConsumeResponse, DeclareQueueRequest, Message, PublishStreamRequest, QueueSpec,
    Settle, SettleAction, Subscribe,
};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::driver::{Consumer, Driver, Producer};
use crate::process::ServerProcess;
use crate::{Error, Result};

const SYSTEM: &str = "sluice";
/// The benchmark queue.
const QUEUE: &str = "bench";
/// What the agent prints on stdout once it serves.
const LISTENING_PREFIX: &str = "sluice-agent listening ";
/// How long a consumer waits for a first delivery before reporting an empty receive.
const RECEIVE_WAIT: Duration = Duration::from_millis(500);

/// Starts `sluice-agent broker` on loopback port 0 with its data in `dir`, and returns the
/// gRPC address it announces.
pub async fn start(program: &Path, dir: &Path, ready_timeout: Duration) -> Result<(ServerProcess, SocketAddr)> {
    let mut command = Command::new(program);
    command
        .arg("broker")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--fsync", "always"]);
    let (mut server, stdout) = ServerProcess::spawn_piped("sluice-agent", command, &dir.join("agent.log"))?;
    let line = server.wait_for_line(stdout, LISTENING_PREFIX, ready_timeout).await?;
    let addr = parse_listening_line(&line)
        .ok_or_else(|| server.not_ready(format!("cannot read the gRPC address from {line:?}")))?;
    Ok((server, addr))
}

/// The `grpc=` address of `sluice-agent listening grpc=<addr> metrics=<addr>`.
fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    line.split_whitespace().find_map(|field| field.strip_prefix("grpc="))?.parse().ok()
}

/// Sluice as a [`Driver`].
pub struct SluiceDriver {
    endpoint: Endpoint,
    payload: Bytes,
}

impl SluiceDriver {
    /// Connects to the agent at `addr` and declares the benchmark queue.
    pub async fn connect(addr: SocketAddr, payload: Bytes) -> Result<Self> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|err| Error::client(SYSTEM, "endpoint", err))?;
        let channel = connect(&endpoint).await?;
        AdminClient::new(channel)
            .declare_queue(DeclareQueueRequest {
                queue: Some(QueueSpec { name: QUEUE.into(), ..Default::default() }),
            })
            .await
            .map_err(|err| Error::client(SYSTEM, "declare queue", err))?;
        Ok(Self { endpoint, payload })
    }
}

async fn connect(endpoint: &Endpoint) -> Result<Channel> {
    endpoint.connect().await.map_err(|err| Error::client(SYSTEM, "connect", err))
}

impl Driver for SluiceDriver {
    type Producer = SluiceProducer;
    type Consumer = SluiceConsumer;

    async fn producer(&self) -> Result<SluiceProducer> {
        let mut client = PublisherClient::new(connect(&self.endpoint).await?);
        let (frames, outgoing) = mpsc::channel(1024);
        let mut confirms = client
            .publish_stream(ReceiverStream::new(outgoing))
            .await
            .map_err(|err| Error::client(SYSTEM, "open publish stream", err))?
            .into_inner();
        let waiting: Pending = Arc::new(Mutex::new(HashMap::new()));
        let dispatch = waiting.clone();
        // Confirms arrive per frame; hand each to the batch waiting for it. A stream error
        // fails every waiting batch (dropping their senders).
        tokio::spawn(async move {
            while let Some(Ok(reply)) = confirms.next().await {
                let Some(done) = dispatch.lock().ok().and_then(|mut w| w.remove(&reply.sequence)) else {
                    continue;
                };
                let failed = reply.confirms.iter().find(|confirm| confirm.code != 0);
                let _ = done.send(match failed {
                    None => Ok(()),
                    Some(confirm) => Err(confirm.error.clone()),
                });
            }
            if let Ok(mut waiting) = dispatch.lock() {
                waiting.clear();
            }
        });
        let message = Message { payload: self.payload.to_vec(), ..Default::default() };
        Ok(SluiceProducer { frames, waiting, sequence: 0, message })
    }

    async fn consumer(&self, prefetch: u32) -> Result<SluiceConsumer> {
        let mut client = ConsumerClient::new(connect(&self.endpoint).await?);
        let (frames, outgoing) = mpsc::channel(1024);
        let subscribe = ConsumeRequest {
            sequence: 0,
            request: Some(ConsumeFrame::Subscribe(Subscribe {
                queue: QUEUE.into(),
                prefetch,
                consumer_name: "sluice-bench".into(),
            })),
        };
        frames.send(subscribe).await.map_err(|err| Error::client(SYSTEM, "subscribe", err.to_string()))?;
        let replies = client
            .consume(ReceiverStream::new(outgoing))
            .await
            .map_err(|err| Error::client(SYSTEM, "open consume stream", err))?
            .into_inner();
        Ok(SluiceConsumer { frames, replies, sequence: 0 })
    }
}

/// Batches waiting for their confirms, by frame sequence.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>>;

/// One `PublishStream`.
pub struct SluiceProducer {
    frames: mpsc::Sender<PublishStreamRequest>,
    waiting: Pending,
    sequence: u64,
    message: Message,
}

/// Resolves when a frame's confirms arrive.
pub type SluiceConfirm = futures::future::BoxFuture<'static, Result<()>>;

impl Producer for SluiceProducer {
    type Confirm = SluiceConfirm;

    async fn send(&mut self, count: usize) -> Result<SluiceConfirm> {
        self.sequence += 1;
        let (done, confirmed) = oneshot::channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(self.sequence, done);
        }
        let frame = PublishStreamRequest {
            sequence: self.sequence,
            queue: QUEUE.into(),
            messages: vec![self.message.clone(); count],
        };
        self.frames
            .send(frame)
            .await
            .map_err(|_| Error::client(SYSTEM, "publish", "the publish stream closed"))?;
        Ok(Box::pin(async move {
            match confirmed.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(Error::client(SYSTEM, "confirm", error)),
                Err(_) => Err(Error::client(SYSTEM, "confirm", "the publish stream ended before the confirm")),
            }
        }))
    }
}

/// One `Consume` stream.
pub struct SluiceConsumer {
    frames: mpsc::Sender<ConsumeRequest>,
    replies: tonic::Streaming<ConsumeResponse>,
    sequence: u64,
}

impl Consumer for SluiceConsumer {
    async fn receive_and_ack(&mut self, max: usize) -> Result<usize> {
        let deadline = tokio::time::Instant::now() + RECEIVE_WAIT;
        let mut tags = Vec::new();
        loop {
            let next = if tags.is_empty() {
                match tokio::time::timeout_at(deadline, self.replies.next()).await {
                    Ok(next) => next,
                    Err(_) => return Ok(0),
                }
            } else {
                // Take only what has already arrived; waiting here would add latency.
                match self.replies.next().now_or_never() {
                    Some(next) => next,
                    None => break,
                }
            };
            match next {
                Some(Ok(ConsumeResponse { response: Some(ConsumeReply::Delivery(delivery)) })) => {
                    if let Some(tag) = delivery.tag {
                        tags.push(tag);
                    }
                }
                Some(Ok(ConsumeResponse { response: Some(ConsumeReply::Settled(result)) })) => {
                    if let Some(failure) = result.failures.first() {
                        return Err(Error::client(SYSTEM, "ack", failure.error.clone()));
                    }
                }
                Some(Ok(ConsumeResponse { response: None })) => {}
                Some(Err(status)) => return Err(Error::client(SYSTEM, "consume", status)),
                None => return Err(Error::client(SYSTEM, "consume", "the consume stream ended")),
            }
            if tags.len() >= max {
                break;
            }
        }
        let received = tags.len();
        if received > 0 {
            self.sequence += 1;
            let settle = ConsumeRequest {
                sequence: self.sequence,
                request: Some(ConsumeFrame::Settle(Settle {
                    action: SettleAction::Ack.into(),
                    tags,
                    delay_ms: 0,
                })),
            };
            self.frames
                .send(settle)
                .await
                .map_err(|_| Error::client(SYSTEM, "ack", "the consume stream closed"))?;
        }
        Ok(received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grpc_address_is_read_from_the_listening_line() {
        let line = "sluice-agent listening grpc=127.0.0.1:40123 metrics=127.0.0.1:40124";
        assert_eq!(parse_listening_line(line), Some(SocketAddr::from(([127, 0, 0, 1], 40123))));
        assert_eq!(parse_listening_line("sluice-agent listening metrics=127.0.0.1:1"), None);
        assert_eq!(parse_listening_line("sluice-agent listening grpc=nonsense"), None);
    }
}
