//! Rust client of Sluice's public gRPC API (`sluice.v1`), shared by the `sluice` CLI, the
//! tests, the benchmarks and, later, the operator.
//!
//! A client may be given several agents of a cluster ([`Client::connect_any`]); every call goes
//! to the agent leading its queue, following `UNAVAILABLE` redirects that name the leader in
//! [`LEADER_METADATA_KEY`] metadata, with bounded retries and backoff ([`RetryPolicy`]).
//! Publishes are resent only when that cannot enqueue twice; give messages idempotency keys to
//! have them resent after a lost connection too.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_client::Error> {
//! use sluice_client::{Client, proto::{Message, QueueSpec}};
//! let client = Client::connect("http://127.0.0.1:7070").await?;
//! client.declare_queue(QueueSpec { name: "orders".into(), ..Default::default() }).await?;
//! client.publish("orders", vec![Message { payload: b"hi".to_vec(), ..Default::default() }]).await?;
//! let mut consumer = client.subscribe("orders", 100).await?;
//! if let Some(delivery) = consumer.next().await? {
//!     consumer.ack(sluice_client::tag(&delivery))?;
//! }
//! consumer.flush().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`client`]: [`Client`], the unary calls.
//! - [`router`]: [`Router`], which agent a call goes to; the loop following redirects.
//! - [`retry`]: [`RetryPolicy`] and which failures may be retried.
//! - [`publisher`]: [`Publisher`], pipelined publishing over `PublishStream`.
//! - [`consumer`]: [`Consumer`], a subscription with automatically batched settles.
//! - [`error`]: the crate's [`Error`].

pub mod client;
pub mod consumer;
pub mod error;
pub mod publisher;
pub mod retry;
pub mod router;

pub use client::Client;
pub use consumer::Consumer;
pub use error::{Error, Result};
pub use publisher::{Pending, Publisher};
pub use retry::{LEADER_METADATA_KEY, RetryPolicy};
pub use router::Router;
/// The generated `sluice.v1` types and raw gRPC clients.
pub use sluice_proto::v1 as proto;

/// The tag that settles `delivery` (the default tag, which the server refuses as unknown, when
/// the server sent none).
pub fn tag(delivery: &proto::Delivery) -> proto::DeliveryTag {
    delivery.tag.unwrap_or_default()
}
