//! RabbitMQ with publisher confirms: a quorum queue (Raft-replicated log, fsync before confirm)
//! and a classic durable queue with persistent messages (confirmed once the message store has
//! written and fsynced them, batched).
//!
//! Publishing pipelines the AMQP way: a channel in confirm mode publishes a batch without
//! waiting and awaits its confirms afterwards, with several batches in flight. Consuming uses
//! `basic.qos` prefetch and one `basic.ack` with `multiple` per received batch.
//!
//! The server runs as root from `/usr/lib/rabbitmq/bin/rabbitmq-server` (the `/usr/sbin`
//! wrapper insists on switching to the `rabbitmq` user and the system paths), with every
//! path, port and node name pointed into the run's temporary directory and its own `epmd`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::process::Command;

use crate::driver::{Consumer, Driver, Producer};
use crate::process::{ServerProcess, free_port};
use crate::{Error, Result};

const SYSTEM: &str = "rabbitmq";
/// The server script used directly (see the module docs).
pub const SERVER_PROGRAM: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// AMQP `delivery_mode` of persistent messages.
const PERSISTENT: u8 = 2;
/// How long a consumer waits for a first delivery before reporting an empty receive.
const RECEIVE_WAIT: Duration = Duration::from_millis(500);

/// Which RabbitMQ queue type is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// `x-queue-type: quorum`.
    Quorum,
    /// A classic durable queue, persistent messages.
    Classic,
}

/// A RabbitMQ node and the `epmd` it registers with; both stop together.
pub struct RabbitServer {
    /// The node (`rabbitmq-server` script and its Erlang VM).
    pub node: ServerProcess,
    /// Its port mapper daemon, run in the foreground so the harness owns it.
    pub epmd: ServerProcess,
    /// AMQP listener.
    pub addr: SocketAddr,
}

/// Starts `epmd` and a RabbitMQ node on loopback with all state under `dir`.
pub async fn start(
    epmd_program: &Path,
    dir: &Path,
    ready_timeout: Duration,
) -> Result<RabbitServer> {
    let epmd_port = free_port()?;
    let mut command = Command::new(epmd_program);
    command.args(["-address", "127.0.0.1", "-port", &epmd_port.to_string()]);
    let mut epmd = ServerProcess::spawn("epmd", command, &dir.join("epmd.log"))?;
    epmd.wait_for_tcp(SocketAddr::from(([127, 0, 0, 1], epmd_port)), ready_timeout)
        .await?;

    let amqp_port = free_port()?;
    let dist_port = free_port()?;
    let config = dir.join("rabbitmq.conf");
    let text = format!("listeners.tcp.1 = 127.0.0.1:{amqp_port}\nloopback_users = none\n");
    std::fs::write(&config, text).map_err(|source| Error::Io {
        path: config.clone(),
        source,
    })?;
    let plugins = dir.join("enabled_plugins");
    std::fs::write(&plugins, "[].\n").map_err(|source| Error::Io {
        path: plugins.clone(),
        source,
    })?;

    let mut command = Command::new(SERVER_PROGRAM);
    command
        .current_dir(dir)
        // The Erlang cookie is written under $HOME.
        .env("HOME", dir)
        .env("RABBITMQ_NODENAME", format!("bench{amqp_port}@localhost"))
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", amqp_port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_LOGS", "-")
        .env("RABBITMQ_CONFIG_FILE", &config)
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", &plugins)
        .env(
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
            "-kernel inet_dist_use_interface {127,0,0,1}",
        )
        .env("ERL_EPMD_PORT", epmd_port.to_string())
        // Any value here turns the Erlang shell on, which exits at once on a closed stdin.
        .env_remove("RABBITMQ_ALLOW_INPUT");
    let mut node = ServerProcess::spawn("rabbitmq-server", command, &dir.join("rabbitmq.log"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], amqp_port));
    node.wait_for_tcp(addr, ready_timeout).await?;
    Ok(RabbitServer { node, epmd, addr })
}

/// RabbitMQ as a [`Driver`].
pub struct RabbitDriver {
    uri: String,
    queue: &'static str,
    payload: Bytes,
}

impl RabbitDriver {
    /// Connects to the node at `addr` and declares the benchmark queue of `queue_type`.
    pub async fn connect(addr: SocketAddr, queue_type: QueueType, payload: Bytes) -> Result<Self> {
        let uri = format!("amqp://guest:guest@{addr}/%2f");
        let queue = match queue_type {
            QueueType::Quorum => "bench-quorum",
            QueueType::Classic => "bench-classic",
        };
        let mut arguments = FieldTable::default();
        if queue_type == QueueType::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        let channel = open_channel(&uri).await?.1;
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .map_err(|err| Error::client(SYSTEM, "declare queue", err))?;
        Ok(Self {
            uri,
            queue,
            payload,
        })
    }
}

async fn open_channel(uri: &str) -> Result<(Connection, Channel)> {
    let connection = Connection::connect(uri, ConnectionProperties::default())
        .await
        .map_err(|err| Error::client(SYSTEM, "connect", err))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|err| Error::client(SYSTEM, "open channel", err))?;
    Ok((connection, channel))
}

impl Driver for RabbitDriver {
    type Producer = RabbitProducer;
    type Consumer = RabbitConsumer;

    async fn producer(&self) -> Result<RabbitProducer> {
        let (connection, channel) = open_channel(&self.uri).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|err| Error::client(SYSTEM, "confirm.select", err))?;
        Ok(RabbitProducer {
            _connection: connection,
            channel,
            queue: self.queue,
            payload: self.payload.clone(),
        })
    }

    async fn consumer(&self, prefetch: u32) -> Result<RabbitConsumer> {
        let (connection, channel) = open_channel(&self.uri).await?;
        let prefetch = u16::try_from(prefetch).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|err| Error::client(SYSTEM, "basic.qos", err))?;
        let deliveries = channel
            .basic_consume(
                self.queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| Error::client(SYSTEM, "basic.consume", err))?;
        Ok(RabbitConsumer {
            _connection: connection,
            channel,
            deliveries,
        })
    }
}

/// One connection with a channel in confirm mode.
pub struct RabbitProducer {
    /// Kept so the connection lives as long as the channel.
    _connection: Connection,
    channel: Channel,
    queue: &'static str,
    payload: Bytes,
}

/// The confirms of one batch, awaited on their own task.
pub type RabbitConfirm = futures::future::BoxFuture<'static, Result<()>>;

impl Producer for RabbitProducer {
    type Confirm = RabbitConfirm;

    async fn send(&mut self, count: usize) -> Result<RabbitConfirm> {
        let mut confirms = Vec::with_capacity(count);
        for _ in 0..count {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.queue.into(),
                    BasicPublishOptions::default(),
                    &self.payload,
                    BasicProperties::default().with_delivery_mode(PERSISTENT),
                )
                .await
                .map_err(|err| Error::client(SYSTEM, "basic.publish", err))?;
            confirms.push(confirm);
        }
        let confirmed = tokio::spawn(async move {
            for confirm in confirms {
                let confirmation = confirm
                    .await
                    .map_err(|err| Error::client(SYSTEM, "publisher confirm", err))?;
                if confirmation.is_nack() {
                    return Err(Error::client(
                        SYSTEM,
                        "publisher confirm",
                        "the broker nacked a message",
                    ));
                }
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

/// One connection consuming with prefetch.
pub struct RabbitConsumer {
    /// Kept so the connection lives as long as the channel.
    _connection: Connection,
    channel: Channel,
    deliveries: lapin::Consumer,
}

impl Consumer for RabbitConsumer {
    async fn receive_and_ack(&mut self, max: usize) -> Result<usize> {
        let Ok(first) = tokio::time::timeout(RECEIVE_WAIT, self.deliveries.next()).await else {
            return Ok(0);
        };
        let mut received = 0usize;
        let mut last_tag = None;
        let mut next = first;
        loop {
            match next {
                Some(Ok(delivery)) => {
                    received += 1;
                    last_tag = Some(delivery.delivery_tag);
                }
                Some(Err(err)) => return Err(Error::client(SYSTEM, "receive", err)),
                None => break,
            }
            if received >= max {
                break;
            }
            // Take only what has already arrived; waiting here would add latency.
            match self.deliveries.next().now_or_never() {
                Some(item) => next = item,
                None => break,
            }
        }
        if let Some(tag) = last_tag {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|err| Error::client(SYSTEM, "basic.ack", err))?;
        }
        Ok(received)
    }
}
