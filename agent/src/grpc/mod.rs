//! Public gRPC services, one file per service; errors become `tonic::Status` in `status`.
//!
//! The services are thin: the [`Broker`](crate::broker::Broker) validates everything it can
//! (names, payload sizes, tags). This layer checks only what is about the request's shape
//! (batch sizes, the first frame of a stream) and owns streaming: pipelining, backpressure and
//! ending streams cleanly on shutdown.

pub mod admin;
pub mod consumer;
pub mod membership;
pub mod publisher;
pub mod status;
pub mod waiting;

pub use admin::AdminService;
pub use consumer::ConsumerService;
pub use membership::MembershipService;
pub use publisher::PublisherService;

/// Most messages in one `PublishRequest` or `PublishStreamRequest` frame (the proto's limit).
pub const MAX_MESSAGES_PER_BATCH: usize = 10_000;

/// Largest gRPC message the server decodes. A batch of 10,000 messages is bounded by this, and
/// so is one 16 MiB payload (the largest `max_payload_bytes`) with room for headers. Larger
/// frames are refused by tonic with RESOURCE_EXHAUSTED before they are buffered, which bounds
/// the memory one client can make the agent hold per frame.
pub const MAX_DECODING_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// Checks a batch's message count, naming the field (`messages`) when it is over the limit.
fn check_batch_len(len: usize) -> Result<(), tonic::Status> {
    if len > MAX_MESSAGES_PER_BATCH {
        return Err(tonic::Status::resource_exhausted(format!(
            "messages: {len} messages in one batch, at most {MAX_MESSAGES_PER_BATCH}"
        )));
    }
    Ok(())
}
