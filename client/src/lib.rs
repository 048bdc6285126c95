//! Rust client of Sluice's public gRPC API (`sluice.v1`), shared by the `sluice` CLI, the
//! tests, the benchmarks and, later, the operator.
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
//! - [`client`]: [`Client`], the connection and the unary calls.
//! - [`publisher`]: [`Publisher`], pipelined publishing over `PublishStream`.
//! - [`consumer`]: [`Consumer`], a subscription with automatically batched settles.
//! - [`error`]: the crate's [`Error`].

pub mod client;
pub mod consumer;
pub mod error;
pub mod publisher;

pub use client::Client;
pub use consumer::Consumer;
pub use error::{Error, Result};
pub use publisher::{Pending, Publisher};
/// The generated `sluice.v1` types and raw gRPC clients.
pub use sluice_proto::v1 as proto;

/// The tag that settles `delivery` (the default tag, which the server refuses as unknown, when
/// the server sent none).
pub fn tag(delivery: &proto::Delivery) -> proto::DeliveryTag {
    delivery.tag.unwrap_or_default()
}
