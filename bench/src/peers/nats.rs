//! NATS JetStream with a file-storage, work-queue stream.
//!
//! Durability note: nats-server 2.9 (Debian bookworm) has no `sync_interval: always`; its file
//! store acknowledges a publish once the message is written to the OS (`write(2)`), and fsyncs
//! on a 2-minute interval. Its acks therefore survive a process crash but not power loss, a
//! weaker promise than the other rows; the table says so.
//!
//! Publishing uses JetStream's asynchronous publish: every message is published without
//! waiting and its `PublishAckFuture` is awaited later (the client's pipelining). Consuming
//! uses one durable pull consumer shared by all consumer connections, with explicit acks
//! (a work-queue stream requires them), sent as fire-and-forget publishes.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::process::Command;

use crate::driver::{Consumer, Driver, Producer};
use crate::process::{ServerProcess, free_port};
use crate::{Error, Result};

const SYSTEM: &str = "nats";
/// Stream name and the one subject it captures.
const STREAM: &str = "bench";
/// The durable pull consumer all consumer connections share.
const DURABLE: &str = "workers";
/// Unconfirmed publishes one JetStream context may have before `publish` waits.
const MAX_ACK_INFLIGHT: usize = 65_536;
/// How long a consumer waits for a first message before reporting an empty receive.
const RECEIVE_WAIT: Duration = Duration::from_millis(500);

/// Starts `nats-server` with JetStream on loopback, its store in `dir`.
pub async fn start(
    program: &Path,
    dir: &Path,
    ready_timeout: Duration,
) -> Result<(ServerProcess, SocketAddr)> {
    let port = free_port()?;
    let store = dir.join("jetstream");
    let config = dir.join("nats.conf");
    let text = format!(
        "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n}}\n",
        store.display().to_string()
    );
    std::fs::write(&config, text).map_err(|source| Error::Io {
        path: config.clone(),
        source,
    })?;
    let mut command = Command::new(program);
    command.arg("-c").arg(&config);
    let mut server = ServerProcess::spawn("nats-server", command, &dir.join("nats.log"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    server.wait_for_tcp(addr, ready_timeout).await?;
    Ok((server, addr))
}

/// NATS JetStream as a [`Driver`].
pub struct NatsDriver {
    addr: SocketAddr,
    payload: Bytes,
}

impl NatsDriver {
    /// Connects, creates the stream and the durable consumer allowing `max_ack_pending`
    /// unacked messages over all consumer connections.
    pub async fn connect(addr: SocketAddr, payload: Bytes, max_ack_pending: i64) -> Result<Self> {
        let context = jetstream_context(addr).await?;
        let stream = context
            .get_or_create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec![STREAM.into()],
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::WorkQueue,
                ..Default::default()
            })
            .await
            .map_err(|err| Error::client(SYSTEM, "create stream", err))?;
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(DURABLE.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending,
                ..Default::default()
            })
            .await
            .map_err(|err| Error::client(SYSTEM, "create consumer", err))?;
        Ok(Self { addr, payload })
    }
}

async fn jetstream_context(addr: SocketAddr) -> Result<jetstream::Context> {
    let client = async_nats::connect(addr.to_string())
        .await
        .map_err(|err| Error::client(SYSTEM, "connect", err))?;
    Ok(jetstream::ContextBuilder::new()
        .max_ack_inflight(MAX_ACK_INFLIGHT)
        .backpressure_on_inflight(true)
        .build(client))
}

impl Driver for NatsDriver {
    type Producer = NatsProducer;
    type Consumer = NatsConsumer;

    async fn producer(&self) -> Result<NatsProducer> {
        Ok(NatsProducer {
            context: jetstream_context(self.addr).await?,
            payload: self.payload.clone(),
        })
    }

    async fn consumer(&self, prefetch: u32) -> Result<NatsConsumer> {
        let context = jetstream_context(self.addr).await?;
        let consumer: consumer::PullConsumer = context
            .get_consumer_from_stream(DURABLE, STREAM)
            .await
            .map_err(|err| Error::client(SYSTEM, "get consumer", err))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(prefetch as usize)
            .messages()
            .await
            .map_err(|err| Error::client(SYSTEM, "pull messages", err))?;
        Ok(NatsConsumer { messages })
    }
}

/// One connection publishing asynchronously.
pub struct NatsProducer {
    context: jetstream::Context,
    payload: Bytes,
}

/// The publish acks of one batch, awaited on their own task.
pub type NatsConfirm = futures::future::BoxFuture<'static, Result<()>>;

impl Producer for NatsProducer {
    type Confirm = NatsConfirm;

    async fn send(&mut self, count: usize) -> Result<NatsConfirm> {
        let mut acks = Vec::with_capacity(count);
        for _ in 0..count {
            let ack = self
                .context
                .publish(STREAM, self.payload.clone())
                .await
                .map_err(|err| Error::client(SYSTEM, "publish", err))?;
            acks.push(ack.into_future());
        }
        let confirmed = tokio::spawn(async move {
            for ack in acks {
                ack.await
                    .map_err(|err| Error::client(SYSTEM, "publish ack", err))?;
            }
            Ok(())
        });
        Ok(Box::pin(async move {
            confirmed.await.map_err(|source| Error::Task {
                phase: "publish",
                source,
            })?
        }))
    }
}

/// One pull subscription on the shared durable consumer.
pub struct NatsConsumer {
    messages: consumer::pull::Stream,
}

impl Consumer for NatsConsumer {
    async fn receive_and_ack(&mut self, max: usize) -> Result<usize> {
        let Ok(first) = tokio::time::timeout(RECEIVE_WAIT, self.messages.next()).await else {
            return Ok(0);
        };
        let mut batch = Vec::new();
        let mut next = first;
        loop {
            match next {
                Some(Ok(message)) => batch.push(message),
                Some(Err(err)) => return Err(Error::client(SYSTEM, "receive", err)),
                None => break,
            }
            if batch.len() >= max {
                break;
            }
            // Take only what has already arrived; waiting here would add latency.
            match self.messages.next().now_or_never() {
                Some(item) => next = item,
                None => break,
            }
        }
        for message in &batch {
            message
                .ack()
                .await
                .map_err(|err| Error::client(SYSTEM, "ack", err))?;
        }
        Ok(batch.len())
    }
}
