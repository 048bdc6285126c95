//! Tiny frames from a raw gRPC client (not the batching client crate), while two busy
//! processes share the machine's CPUs with the agent: one message per publish frame, one tag
//! per settle frame, sent as fast as the connection takes them. HTTP/2 servers guard against
//! floods of small DATA frames that pile up unread (h2 answers GOAWAY `ENHANCE_YOUR_CALM`);
//! the agent must keep reading and answer every frame, and no other stream on the connection
//! may die (issue 12, item 2).
//!
//! Run: `cargo test -p sluice-agent --test tiny_frames -- --nocapture`.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use common::{AgentProcess, queue};
use sluice_client::proto::consume_request::Request as Frame;
use sluice_client::proto::consume_response::Response as Out;
use sluice_client::proto::consumer_client::ConsumerClient;
use sluice_client::proto::publisher_client::PublisherClient;
use sluice_client::proto::{
    ConsumeRequest, Message, PublishStreamRequest, Settle, SettleAction, Subscribe,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Frames each test sends: more than the ~30,000 tiny frames h2 lets pile up unread on the
/// agent's 16 MiB connection window, so only reading them as they come passes.
const FRAMES: u64 = 50_000;
/// Longest the whole exchange may take on a loaded machine.
const WAIT: Duration = Duration::from_secs(120);

/// Passes a stream's items on one at a time, answering `Pending` (and waking at once) after
/// each: tonic's encoder flushes what it holds whenever its source is pending, so every
/// message goes out in a DATA frame of its own, as grpcio and most other clients send them.
struct OneFrameEach<S> {
    inner: S,
    yielded: bool,
}

impl<S: tokio_stream::Stream + Unpin> tokio_stream::Stream for OneFrameEach<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        if self.yielded {
            self.yielded = false;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let next = std::pin::Pin::new(&mut self.inner).poll_next(cx);
        if matches!(next, std::task::Poll::Ready(Some(_))) {
            self.yielded = true;
        }
        next
    }
}

fn one_frame_each<T>(rx: tokio::sync::mpsc::Receiver<T>) -> OneFrameEach<ReceiverStream<T>> {
    OneFrameEach {
        inner: ReceiverStream::new(rx),
        yielded: false,
    }
}

/// Two shell busy-loops, one per core, killed when dropped.
struct BusyCpus(Vec<Child>);

impl BusyCpus {
    fn start() -> Self {
        Self(
            (0..2)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("busy loop")
                })
                .collect(),
        )
    }
}

impl Drop for BusyCpus {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn channel(agent: &AgentProcess) -> Channel {
    tonic::transport::Endpoint::from_shared(agent.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// Opens a subscription on `channel` and returns its response stream once subscribed.
async fn subscribe(
    channel: &Channel,
    queue: &str,
    prefetch: u32,
) -> (
    tokio::sync::mpsc::Sender<ConsumeRequest>,
    tonic::Streaming<sluice_client::proto::ConsumeResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tx.send(ConsumeRequest {
        sequence: 0,
        request: Some(Frame::Subscribe(Subscribe {
            queue: queue.into(),
            prefetch,
            ..Subscribe::default()
        })),
    })
    .await
    .expect("subscribe frame");
    let responses = ConsumerClient::new(channel.clone())
        .consume(one_frame_each(rx))
        .await
        .expect("consume")
        .into_inner();
    (tx, responses)
}

/// Checks that the idle subscription on the flooded connection still works: it gets a
/// message published now.
async fn assert_alive(
    client: &sluice_client::Client,
    idle: &mut tonic::Streaming<sluice_client::proto::ConsumeResponse>,
) {
    client
        .publish("idle", vec![common::text("still here")])
        .await
        .expect("publish");
    let frame = tokio::time::timeout(Duration::from_secs(10), idle.message())
        .await
        .expect("the idle subscription answers")
        .expect("the idle subscription is alive")
        .expect("a frame");
    assert!(
        matches!(frame.response, Some(Out::Delivery(_))),
        "{frame:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_per_frame_under_cpu_contention_is_answered_frame_by_frame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = AgentProcess::spawn(&dir.path().join("data"));
    let client = agent.client().await;
    client
        .declare_queue(queue("tiny", 1))
        .await
        .expect("declare");
    client
        .declare_queue(queue("idle", 1))
        .await
        .expect("declare");
    let channel = channel(&agent).await;
    // An idle subscription on the same connection: it must outlive the flood.
    let (_idle_tx, mut idle) = subscribe(&channel, "idle", 1).await;
    let _busy = BusyCpus::start();

    let (tx, rx) = tokio::sync::mpsc::channel(FRAMES as usize);
    let mut responses = PublisherClient::new(channel.clone())
        .publish_stream(one_frame_each(rx))
        .await
        .expect("publish stream")
        .into_inner();
    let sender = tokio::spawn(async move {
        for sequence in 0..FRAMES {
            let frame = PublishStreamRequest {
                sequence,
                queue: "tiny".into(),
                messages: vec![Message {
                    payload: vec![b'x'],
                    ..Message::default()
                }],
            };
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    let mut answered = 0u64;
    let result = tokio::time::timeout(WAIT, async {
        while answered < FRAMES {
            let response = responses
                .message()
                .await
                .map_err(|s| format!("after {answered} answers: {s}"))?
                .ok_or_else(|| format!("the stream ended after {answered} answers"))?;
            if response.sequence != answered {
                return Err(format!("answer {} for frame {answered}", response.sequence));
            }
            if response.confirms.len() != 1 || response.confirms[0].code != 0 {
                return Err(format!("frame {answered}: {:?}", response.confirms));
            }
            answered += 1;
        }
        Ok(())
    })
    .await;
    sender.await.expect("sender");
    result
        .expect("every frame answered in time")
        .expect("every frame answered");
    let stats = client.stats("tiny").await.expect("stats");
    assert_eq!(stats.total.expect("totals").ready, FRAMES);

    // The idle subscription on the same connection is alive: it gets a message published now.
    assert_alive(&client, &mut idle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tag_per_settle_frame_under_cpu_contention_acks_every_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = AgentProcess::spawn(&dir.path().join("data"));
    let client = agent.client().await;
    client
        .declare_queue(queue("acked", 1))
        .await
        .expect("declare");
    client
        .declare_queue(queue("idle", 1))
        .await
        .expect("declare");
    for chunk in 0..FRAMES / 1_000 {
        let batch = (0..1_000)
            .map(|i| common::text(&format!("m-{}", chunk * 1_000 + i)))
            .collect();
        client.publish("acked", batch).await.expect("publish");
    }
    let channel = channel(&agent).await;
    let (_idle_tx, mut idle) = subscribe(&channel, "idle", 1).await;
    let (tx, mut responses) = subscribe(&channel, "acked", 10_000).await;
    let _busy = BusyCpus::start();

    let mut delivered = 0u64;
    let mut settled = 0u64;
    let mut sequence = 1u64;
    let result = tokio::time::timeout(WAIT, async {
        while settled < FRAMES {
            let response = responses
                .message()
                .await
                .map_err(|s| format!("after {delivered} deliveries, {settled} settled: {s}"))?
                .ok_or_else(|| format!("the stream ended after {settled} settles"))?;
            match response.response {
                Some(Out::Delivery(delivery)) => {
                    delivered += 1;
                    if delivery.attempt != 1 {
                        return Err(format!("a redelivery: {delivery:?}"));
                    }
                    // One tag per frame, sent without waiting for the answer.
                    let frame = ConsumeRequest {
                        sequence,
                        request: Some(Frame::Settle(Settle {
                            action: SettleAction::Ack as i32,
                            tags: vec![delivery.tag.expect("tag")],
                            delay_ms: 0,
                        })),
                    };
                    sequence += 1;
                    tx.send(frame).await.map_err(|_| "request stream closed")?;
                }
                Some(Out::Settled(result)) => {
                    if !result.failures.is_empty() {
                        return Err(format!(
                            "settle {} failed: {:?}",
                            result.sequence, result.failures
                        ));
                    }
                    settled += 1;
                }
                None => return Err("an empty frame".to_owned()),
            }
        }
        Ok::<_, String>(())
    })
    .await;
    result
        .expect("every settle answered in time")
        .expect("every settle answered");
    let stats = client.stats("acked").await.expect("stats");
    let total = stats.total.expect("totals");
    assert_eq!((total.ready, total.in_flight), (0, 0), "{total:?}");

    assert_alive(&client, &mut idle).await;
}
