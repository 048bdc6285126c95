//! The connection to an agent and the unary calls.

use sluice_proto::v1::admin_client::AdminClient;
use sluice_proto::v1::consumer_client::ConsumerClient;
use sluice_proto::v1::publisher_client::PublisherClient;
use sluice_proto::v1::{
    Confirm, DeclareQueueRequest, DeclareQueueResponse, DeleteQueueRequest, DeliveryTag,
    GetQueueStatsRequest, GetQueueStatsResponse, ListQueuesRequest, Message, PublishRequest,
    QueueSpec, Settle, SettleAction, SettleOutcome, SettleRequest,
};
use tonic::transport::{Channel, Endpoint};

use crate::consumer::Consumer;
use crate::error::{Error, Result};
use crate::publisher::Publisher;

/// Largest gRPC message the client sends or accepts; matches the agent's decoding limit so a
/// full batch of large messages is not refused by the client first.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// A connection to one Sluice agent (or sidecar). Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    admin: AdminClient<Channel>,
    publisher: PublisherClient<Channel>,
    consumer: ConsumerClient<Channel>,
}

impl Client {
    /// Connects to `endpoint`, e.g. `http://127.0.0.1:7070`.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self> {
        let endpoint = endpoint.into();
        let channel = Endpoint::from_shared(endpoint.clone())
            .map_err(|source| Error::Endpoint {
                endpoint: endpoint.clone(),
                source,
            })?
            .connect()
            .await
            .map_err(|source| Error::Connect { endpoint, source })?;
        Ok(Self::from_channel(channel))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            admin: AdminClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            publisher: PublisherClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            consumer: ConsumerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// Creates a queue or confirms an identical one.
    pub async fn declare_queue(&self, queue: QueueSpec) -> Result<DeclareQueueResponse> {
        let request = DeclareQueueRequest { queue: Some(queue) };
        Ok(self
            .admin
            .clone()
            .declare_queue(request)
            .await?
            .into_inner())
    }

    /// Deletes a queue; returns how many messages were discarded.
    pub async fn delete_queue(&self, name: &str, if_empty: bool) -> Result<u64> {
        let request = DeleteQueueRequest {
            name: name.to_owned(),
            if_empty,
        };
        Ok(self
            .admin
            .clone()
            .delete_queue(request)
            .await?
            .into_inner()
            .messages_deleted)
    }

    /// Every queue's settings, sorted by name.
    pub async fn list_queues(&self) -> Result<Vec<QueueSpec>> {
        Ok(self
            .admin
            .clone()
            .list_queues(ListQueuesRequest {})
            .await?
            .into_inner()
            .queues)
    }

    /// A queue's counters, in total and per partition.
    pub async fn stats(&self, name: &str) -> Result<GetQueueStatsResponse> {
        let request = GetQueueStatsRequest {
            name: name.to_owned(),
        };
        Ok(self
            .admin
            .clone()
            .get_queue_stats(request)
            .await?
            .into_inner())
    }

    /// Publishes a batch and returns its confirms in order, or [`Error::Rejected`] naming the
    /// first message that was refused (the others may still have been confirmed).
    pub async fn publish(&self, queue: &str, messages: Vec<Message>) -> Result<Vec<Confirm>> {
        let confirms = self.publish_confirms(queue, messages).await?;
        check_confirms(&confirms)?;
        Ok(confirms)
    }

    /// Publishes a batch and returns every confirm as the server sent it, failures included.
    pub async fn publish_confirms(
        &self,
        queue: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Confirm>> {
        let request = PublishRequest {
            queue: queue.to_owned(),
            messages,
        };
        Ok(self
            .publisher
            .clone()
            .publish(request)
            .await?
            .into_inner()
            .confirms)
    }

    /// Opens a pipelined publisher with at most `window` frames awaiting confirms.
    pub async fn publisher(&self, window: usize) -> Result<Publisher> {
        Publisher::open(self.publisher.clone(), window).await
    }

    /// Subscribes to `queue` holding at most `prefetch` unsettled deliveries (0 = 100).
    pub async fn subscribe(&self, queue: &str, prefetch: u32) -> Result<Consumer> {
        Consumer::subscribe(self.consumer.clone(), queue, prefetch, "").await
    }

    /// Settles deliveries outside a subscription; returns the tags that failed.
    pub async fn settle(
        &self,
        queue: &str,
        action: SettleAction,
        tags: Vec<DeliveryTag>,
        delay_ms: u64,
    ) -> Result<Vec<SettleOutcome>> {
        let settle = Settle {
            action: action as i32,
            tags,
            delay_ms,
        };
        let request = SettleRequest {
            queue: queue.to_owned(),
            settle: Some(settle),
        };
        Ok(self
            .consumer
            .clone()
            .settle(request)
            .await?
            .into_inner()
            .failures)
    }

    /// The raw generated clients, for calls this wrapper does not cover.
    pub fn raw(
        &self,
    ) -> (
        AdminClient<Channel>,
        PublisherClient<Channel>,
        ConsumerClient<Channel>,
    ) {
        (
            self.admin.clone(),
            self.publisher.clone(),
            self.consumer.clone(),
        )
    }
}

/// Turns the first failed confirm into [`Error::Rejected`].
pub fn check_confirms(confirms: &[Confirm]) -> Result<()> {
    match confirms.iter().enumerate().find(|(_, c)| c.code != 0) {
        None => Ok(()),
        Some((index, confirm)) => Err(Error::Rejected {
            index,
            code: tonic::Code::from_i32(confirm.code),
            message: confirm.error.clone(),
        }),
    }
}
