//! Redis streams with `appendfsync always`: the durable-ish comparison.
//!
//! Publishing is `XADD` in pipelines (one pipeline per batch): Redis appends the whole
//! pipeline's commands to the AOF and, under `appendfsync always`, fsyncs before it replies,
//! so a reply means "on disk" and a pipeline is a group commit. Consuming is `XREADGROUP` of a
//! consumer group followed by one `XACK` naming every id read.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig};
use tokio::process::Command;

use crate::driver::{Consumer, Driver, Producer};
use crate::process::{ServerProcess, free_port};
use crate::{Error, Result};

const SYSTEM: &str = "redis";
/// The stream every producer appends to.
const STREAM_KEY: &str = "bench";
/// The consumer group all consumers share (competing consumers).
const GROUP: &str = "bench";
/// How long one `XREADGROUP` blocks when the stream is drained.
const READ_BLOCK_MS: usize = 500;
/// Longest wait for any reply (a large pipeline behind an fsync, a blocking read).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts `redis-server` on loopback with its data in `dir` and AOF `appendfsync always`.
pub async fn start(
    program: &Path,
    dir: &Path,
    ready_timeout: Duration,
) -> Result<(ServerProcess, SocketAddr)> {
    let port = free_port()?;
    let mut command = Command::new(program);
    command
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--dir"])
        .arg(dir)
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .args([
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            "",
        ]);
    let mut server = ServerProcess::spawn("redis-server", command, &dir.join("redis.log"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    server.wait_for_tcp(addr, ready_timeout).await?;
    Ok((server, addr))
}

/// Redis streams as a [`Driver`].
pub struct RedisDriver {
    client: redis::Client,
    payload: Bytes,
}

impl RedisDriver {
    /// Connects to the server at `addr` and creates the stream and its consumer group.
    pub async fn connect(addr: SocketAddr, payload: Bytes) -> Result<Self> {
        let client = redis::Client::open(format!("redis://{addr}/"))
            .map_err(|err| Error::client(SYSTEM, "open client", err))?;
        let driver = Self { client, payload };
        let mut conn = driver.connection().await?;
        let _: () = conn
            .xgroup_create_mkstream(STREAM_KEY, GROUP, "$")
            .await
            .map_err(|err| Error::client(SYSTEM, "create consumer group", err))?;
        Ok(driver)
    }

    async fn connection(&self) -> Result<MultiplexedConnection> {
        // The default response timeout is shorter than a blocking XREADGROUP may take.
        let config = AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|err| Error::client(SYSTEM, "connect", err))
    }
}

impl Driver for RedisDriver {
    type Producer = RedisProducer;
    type Consumer = RedisConsumer;

    async fn producer(&self) -> Result<RedisProducer> {
        Ok(RedisProducer {
            conn: self.connection().await?,
            payload: self.payload.clone(),
        })
    }

    async fn consumer(&self, prefetch: u32) -> Result<RedisConsumer> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "c{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        Ok(RedisConsumer {
            conn: self.connection().await?,
            name,
            prefetch,
        })
    }
}

/// One connection sending `XADD` pipelines.
pub struct RedisProducer {
    conn: MultiplexedConnection,
    payload: Bytes,
}

/// A pipeline's reply, awaited on its own task so it proceeds while the producer sends more.
pub type RedisConfirm = futures::future::BoxFuture<'static, Result<()>>;

impl Producer for RedisProducer {
    type Confirm = RedisConfirm;

    async fn send(&mut self, count: usize) -> Result<RedisConfirm> {
        let mut pipe = redis::pipe();
        for _ in 0..count {
            pipe.cmd("XADD")
                .arg(STREAM_KEY)
                .arg("*")
                .arg("d")
                .arg(self.payload.as_ref())
                .ignore();
        }
        let mut conn = self.conn.clone();
        // Spawned so the pipeline goes out now and overlaps with the next ones on the wire.
        let reply = tokio::spawn(async move { pipe.query_async::<()>(&mut conn).await });
        Ok(Box::pin(async move {
            match reply.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(Error::client(SYSTEM, "XADD pipeline", err)),
                Err(source) => Err(Error::Task {
                    phase: "publish",
                    source,
                }),
            }
        }))
    }
}

/// One consumer of the shared group.
pub struct RedisConsumer {
    conn: MultiplexedConnection,
    name: String,
    prefetch: u32,
}

impl Consumer for RedisConsumer {
    async fn receive_and_ack(&mut self, max: usize) -> Result<usize> {
        let count = max.min(self.prefetch as usize).max(1);
        let options = StreamReadOptions::default()
            .group(GROUP, &self.name)
            .count(count)
            .block(READ_BLOCK_MS);
        let reply: Option<StreamReadReply> = self
            .conn
            .xread_options(&[STREAM_KEY], &[">"], &options)
            .await
            .map_err(|err| Error::client(SYSTEM, "XREADGROUP", err))?;
        let ids: Vec<String> = reply
            .into_iter()
            .flat_map(|reply| reply.keys)
            .flat_map(|key| key.ids)
            .map(|id| id.id)
            .collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let _: usize = self
            .conn
            .xack(STREAM_KEY, GROUP, &ids)
            .await
            .map_err(|err| Error::client(SYSTEM, "XACK", err))?;
        Ok(ids.len())
    }
}
