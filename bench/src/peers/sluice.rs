//! Sluice: a real `sluice-agent broker` process (fsync `always`, the default) in a temporary
//! data directory.
//!
//! Driven through the `sluice-client` crate, the way applications use it. Publishing uses its
//! pipelined `Publisher` over the `PublishStream` RPC: each batch is one frame, confirms stream
//! back per frame, several frames in flight per stream. Consuming uses one `Consume` stream per
//! consumer with `prefetch` credit; the client batches acks into settle frames.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use sluice_client::client::check_confirms;
use sluice_client::proto::{Message, QueueSpec};
use sluice_client::{Client, Publisher, tag};
use tokio::process::Command;

use crate::driver::{Consumer, Driver, Producer};
use crate::process::ServerProcess;
use crate::{Error, Result};

const SYSTEM: &str = "sluice";
/// The benchmark queue.
pub const QUEUE: &str = "bench";
/// What the agent prints on stdout once it serves.
const LISTENING_PREFIX: &str = "sluice-agent listening ";
/// How long a consumer waits for a first delivery before reporting an empty receive.
const RECEIVE_WAIT: Duration = Duration::from_millis(500);

/// Starts `sluice-agent broker` on loopback port 0 with its data in `dir`, and returns the
/// gRPC address it announces.
pub async fn start(
    program: &Path,
    dir: &Path,
    ready_timeout: Duration,
) -> Result<(ServerProcess, SocketAddr)> {
    let command = agent_command(program, &dir.join("data"), "127.0.0.1:0");
    spawn_agent(command, &dir.join("agent.log"), ready_timeout).await
}

/// `sluice-agent broker` with its data in `data_dir`, serving clients on `listen`, metrics on
/// any free port and fsync `always` (the default, spelt out because it is what is measured).
pub fn agent_command(program: &Path, data_dir: &Path, listen: &str) -> Command {
    let mut command = Command::new(program);
    command.arg("broker").arg("--data-dir").arg(data_dir).args([
        "--listen",
        listen,
        "--metrics-listen",
        "127.0.0.1:0",
        "--fsync",
        "always",
    ]);
    command
}

/// Spawns an agent `command` logging to `log` and waits for its listening line; returns the
/// process and the gRPC address it announces.
pub async fn spawn_agent(
    command: Command,
    log: &Path,
    ready_timeout: Duration,
) -> Result<(ServerProcess, SocketAddr)> {
    let (mut server, stdout) = ServerProcess::spawn_piped("sluice-agent", command, log)?;
    let line = server
        .wait_for_line(stdout, LISTENING_PREFIX, ready_timeout)
        .await?;
    let addr = parse_listening_line(&line)
        .ok_or_else(|| server.not_ready(format!("cannot read the gRPC address from {line:?}")))?;
    Ok((server, addr))
}

/// The `grpc=` address of `sluice-agent listening grpc=<addr> metrics=<addr>`.
fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("grpc="))?
        .parse()
        .ok()
}

/// Sluice as a [`Driver`], through the `sluice-client` crate.
pub struct SluiceDriver {
    /// Every agent's client endpoint; the client crate finds the queue's leader among them.
    endpoints: Vec<String>,
    message: Message,
    window: usize,
}

impl SluiceDriver {
    /// Connects to the agent at `addr`, declares the benchmark queue with `partitions`
    /// partitions, and publishes with `window` frames in flight per stream.
    pub async fn connect(
        addr: SocketAddr,
        payload: Bytes,
        partitions: u32,
        window: usize,
    ) -> Result<Self> {
        let driver = Self::new(&[addr], payload, window);
        driver.declare(partitions).await?;
        Ok(driver)
    }

    /// Connects to a cluster of agents at `addrs`, declares the benchmark queue through any of
    /// them, and waits until the queue's leader is settled (see [`stable_leader`]), so the
    /// measured phases include neither the first election nor the hand-off to the preferred
    /// leader.
    pub async fn connect_cluster(
        addrs: &[SocketAddr],
        payload: Bytes,
        partitions: u32,
        window: usize,
        ready_timeout: Duration,
    ) -> Result<Self> {
        let driver = Self::new(addrs, payload, window);
        driver.declare(partitions).await?;
        let client = driver.client().await?;
        stable_leader(&client, &driver.message, LEADER_STABLE_FOR, ready_timeout).await?;
        Ok(driver)
    }

    fn new(addrs: &[SocketAddr], payload: Bytes, window: usize) -> Self {
        let message = Message {
            payload: payload.to_vec(),
            ..Default::default()
        };
        Self {
            endpoints: addrs.iter().map(|addr| format!("http://{addr}")).collect(),
            message,
            window,
        }
    }

    async fn declare(&self, partitions: u32) -> Result<()> {
        self.client()
            .await?
            .declare_queue(QueueSpec {
                name: QUEUE.into(),
                partitions,
                ..Default::default()
            })
            .await
            .map_err(|err| Error::client(SYSTEM, "declare queue", err))?;
        Ok(())
    }

    /// A client on its own HTTP/2 connection, so producers and consumers do not share one.
    pub async fn client(&self) -> Result<Client> {
        Client::connect_any(&self.endpoints)
            .await
            .map_err(|err| Error::client(SYSTEM, "connect", err))
    }

    /// The message every publish sends.
    pub fn message(&self) -> &Message {
        &self.message
    }
}

impl Driver for SluiceDriver {
    type Producer = SluiceProducer;
    type Consumer = SluiceConsumer;

    async fn producer(&self) -> Result<SluiceProducer> {
        let client = self.client().await?;
        if self.endpoints.len() > 1 {
            learn_leader(&client, &self.message).await?;
        }
        let publisher = client
            .publisher(self.window)
            .await
            .map_err(|err| Error::client(SYSTEM, "open publish stream", err))?;
        Ok(SluiceProducer {
            publisher,
            message: self.message.clone(),
        })
    }

    async fn consumer(&self, prefetch: u32) -> Result<SluiceConsumer> {
        let consumer = self
            .client()
            .await?
            .subscribe(QUEUE, prefetch)
            .await
            .map_err(|err| Error::client(SYSTEM, "subscribe", err))?;
        Ok(SluiceConsumer { consumer })
    }
}

/// Makes `client` learn the benchmark queue's leader by publishing `message` once through the
/// unary `Publish` RPC, whose redirects the client follows.
///
/// Needed before opening a publish stream in a cluster: an agent that does not lead the queue
/// answers a `PublishStream` frame with a failed confirm per message ("not led by this agent;
/// its leader is ...") instead of ending the stream with a redirect status, and the client's
/// publisher does not act on per-message failures, so a stream opened at a follower would
/// fail every frame.
pub async fn learn_leader(client: &Client, message: &Message) -> Result<()> {
    client
        .publish(QUEUE, vec![message.clone()])
        .await
        .map_err(|err| Error::client(SYSTEM, "find the leader", err))?;
    Ok(())
}

/// How long the same agent must keep confirming probe publishes before its leadership counts
/// as settled: longer than the agents' placement balancer takes (every 2 s) to hand a queue
/// to its preferred leader.
pub const LEADER_STABLE_FOR: Duration = Duration::from_secs(3);

/// How often [`stable_leader`] probes.
const PROBE_EVERY: Duration = Duration::from_millis(200);

/// Waits until the same agent has confirmed every probe publish (one message each, left in the
/// queue) for `stable_for`, and returns its endpoint as the client reports it; fails once
/// `timeout` has passed without that.
pub async fn stable_leader(
    client: &Client,
    message: &Message,
    stable_for: Duration,
    timeout: Duration,
) -> Result<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut current: Option<(String, tokio::time::Instant)> = None;
    loop {
        let now = tokio::time::Instant::now();
        match learn_leader(client, message).await {
            Ok(()) => {
                let leader = client.router().target(Some(QUEUE));
                match &current {
                    Some((known, since)) if *known == leader => {
                        if now.duration_since(*since) >= stable_for {
                            return Ok(leader);
                        }
                    }
                    _ => current = Some((leader, now)),
                }
            }
            // The client already retried with backoff; an election may still be on.
            Err(err) if now >= deadline => return Err(err),
            Err(_) => current = None,
        }
        if now >= deadline {
            return Err(Error::client(
                SYSTEM,
                "find the leader",
                format!("no agent led queue {QUEUE:?} for {stable_for:?} within {timeout:?}"),
            ));
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// One `PublishStream`.
pub struct SluiceProducer {
    publisher: Publisher,
    message: Message,
}

/// Resolves when a frame's confirms arrive (the client's reader task fills it).
pub type SluiceConfirm = futures::future::BoxFuture<'static, Result<()>>;

impl Producer for SluiceProducer {
    type Confirm = SluiceConfirm;

    async fn send(&mut self, count: usize) -> Result<SluiceConfirm> {
        let pending = self
            .publisher
            .send(QUEUE, vec![self.message.clone(); count])
            .await
            .map_err(|err| Error::client(SYSTEM, "publish", err))?;
        Ok(Box::pin(async move {
            let confirms = pending
                .await
                .map_err(|err| Error::client(SYSTEM, "confirm", err))?;
            check_confirms(&confirms).map_err(|err| Error::client(SYSTEM, "confirm", err))
        }))
    }
}

/// One `Consume` stream; the client batches the acks into settle frames.
pub struct SluiceConsumer {
    consumer: sluice_client::Consumer,
}

impl Consumer for SluiceConsumer {
    async fn receive_and_ack(&mut self, max: usize) -> Result<usize> {
        let first = match tokio::time::timeout(RECEIVE_WAIT, self.consumer.next()).await {
            Ok(next) => next,
            Err(_) => {
                // Idle: a good moment to make sure earlier acks all succeeded.
                let failures = self
                    .consumer
                    .flush()
                    .await
                    .map_err(|err| Error::client(SYSTEM, "ack", err))?;
                if let Some(failure) = failures.first() {
                    return Err(Error::client(SYSTEM, "ack", failure.error.clone()));
                }
                return Ok(0);
            }
        };
        let mut received = 0;
        let mut next = first;
        loop {
            match next {
                Ok(Some(delivery)) => {
                    received += 1;
                    self.consumer
                        .ack(tag(&delivery))
                        .map_err(|err| Error::client(SYSTEM, "ack", err))?;
                }
                Ok(None) => {
                    return Err(Error::client(
                        SYSTEM,
                        "consume",
                        "the agent ended the subscription",
                    ));
                }
                Err(err) => return Err(Error::client(SYSTEM, "consume", err)),
            }
            if received >= max {
                break;
            }
            // Take only what has already arrived; waiting here would add latency.
            match self.consumer.next().now_or_never() {
                Some(item) => next = item,
                None => break,
            }
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
        assert_eq!(
            parse_listening_line(line),
            Some(SocketAddr::from(([127, 0, 0, 1], 40123)))
        );
        assert_eq!(
            parse_listening_line("sluice-agent listening metrics=127.0.0.1:1"),
            None
        );
        assert_eq!(
            parse_listening_line("sluice-agent listening grpc=nonsense"),
            None
        );
    }
}
