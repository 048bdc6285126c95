//! [`Client`]: the unary calls, each routed to the queue's leader by the [`Router`].

use sluice_proto::v1::admin_client::AdminClient;
use sluice_proto::v1::consumer_client::ConsumerClient;
use sluice_proto::v1::publisher_client::PublisherClient;
use sluice_proto::v1::{
    Confirm, DeclareQueueRequest, DeclareQueueResponse, DeleteQueueRequest, DeliveryTag,
    GetQueueStatsRequest, GetQueueStatsResponse, ListQueuesRequest, Message, PublishRequest,
    QueueSpec, Settle, SettleAction, SettleOutcome, SettleRequest,
};
use std::sync::Arc;

use tonic::transport::Channel;

use crate::consumer::Consumer;
use crate::error::{Error, Result};
use crate::publisher::Publisher;
use crate::retry::{Resend, RetryPolicy};
use crate::router::Router;

/// Largest gRPC message the client sends or accepts; matches the agent's decoding limit so a
/// full batch of large messages is not refused by the client first.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// A connection to Sluice: one agent (or sidecar), or several agents of a cluster. Cheap to
/// clone; clones share connections and what was learnt about leaders.
///
/// Every call follows leader redirects and retries refusals during elections with backoff,
/// at most [`RetryPolicy::max_attempts`] times (see [`crate::retry`]). A publish is resent only
/// when the agent surely did not take it (a redirect, a refusal, no connection) unless every
/// message carries an idempotency key: then a publish whose connection broke mid-call is
/// resent too, and the agent confirms the repeat without enqueuing it twice. Publish with
/// idempotency keys when duplicates matter.
#[derive(Debug, Clone)]
pub struct Client {
    router: Arc<Router>,
}

impl Client {
    /// Connects to `endpoint`, e.g. `http://127.0.0.1:7070`.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self> {
        Self::connect_any(&[endpoint.into()]).await
    }

    /// Connects to the first reachable of `endpoints` (agents of one cluster, as
    /// `http://host:port` or `host:port`); later calls
    /// move to the others when that one goes away, and to whichever agent leads a queue.
    pub async fn connect_any(endpoints: &[impl AsRef<str>]) -> Result<Self> {
        Self::connect_with(endpoints, RetryPolicy::default()).await
    }

    /// [`Client::connect_any`] with a retry policy other than the default.
    pub async fn connect_with(endpoints: &[impl AsRef<str>], policy: RetryPolicy) -> Result<Self> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| with_scheme(e.as_ref().trim()))
            .collect();
        if endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        let router = Router::connect(endpoints, policy).await?;
        Ok(Self {
            router: Arc::new(router),
        })
    }

    /// A client over an existing channel (redirects still open channels of their own).
    pub fn from_channel(channel: Channel) -> Self {
        const NAME: &str = "channel";
        let router = Router::new(vec![NAME.to_owned()], RetryPolicy::default(), 0, channel);
        Self {
            router: Arc::new(router),
        }
    }

    /// The endpoints, connections and leader cache behind this client.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Creates a queue or confirms an identical one.
    pub async fn declare_queue(&self, queue: QueueSpec) -> Result<DeclareQueueResponse> {
        let name = queue.name.clone();
        let request = DeclareQueueRequest { queue: Some(queue) };
        self.router
            .call(Some(&name), Resend::Harmless, |channel| {
                let request = request.clone();
                async move { Ok(admin(channel).declare_queue(request).await?.into_inner()) }
            })
            .await
    }

    /// Deletes a queue; returns how many messages were discarded. (A delete retried after a
    /// broken connection can answer `NOT_FOUND` when the first try had already deleted it.)
    pub async fn delete_queue(&self, name: &str, if_empty: bool) -> Result<u64> {
        let request = DeleteQueueRequest {
            name: name.to_owned(),
            if_empty,
        };
        self.router
            .call(Some(name), Resend::Harmless, |channel| {
                let request = request.clone();
                async move {
                    let response = admin(channel).delete_queue(request).await?;
                    Ok(response.into_inner().messages_deleted)
                }
            })
            .await
    }

    /// Every queue's settings, sorted by name.
    pub async fn list_queues(&self) -> Result<Vec<QueueSpec>> {
        self.router
            .call(None, Resend::Harmless, |channel| async move {
                let response = admin(channel).list_queues(ListQueuesRequest {}).await?;
                Ok(response.into_inner().queues)
            })
            .await
    }

    /// A queue's counters, in total and per partition.
    pub async fn stats(&self, name: &str) -> Result<GetQueueStatsResponse> {
        let request = GetQueueStatsRequest {
            name: name.to_owned(),
        };
        self.router
            .call(Some(name), Resend::Harmless, |channel| {
                let request = request.clone();
                async move { Ok(admin(channel).get_queue_stats(request).await?.into_inner()) }
            })
            .await
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
        let resend = resend_of(&messages);
        let request = PublishRequest {
            queue: queue.to_owned(),
            messages,
        };
        self.router
            .call(Some(queue), resend, |channel| {
                let request = request.clone();
                async move {
                    Ok(publisher(channel)
                        .publish(request)
                        .await?
                        .into_inner()
                        .confirms)
                }
            })
            .await
    }

    /// Opens a pipelined publisher with at most `window` frames awaiting confirms.
    pub async fn publisher(&self, window: usize) -> Result<Publisher> {
        Ok(Publisher::new(self.router.clone(), window))
    }

    /// Subscribes to `queue` holding at most `prefetch` unsettled deliveries (0 = 100).
    pub async fn subscribe(&self, queue: &str, prefetch: u32) -> Result<Consumer> {
        Consumer::subscribe(self.router.clone(), queue, prefetch, "").await
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
        self.router
            .call(Some(queue), Resend::Harmless, |channel| {
                let request = request.clone();
                async move {
                    Ok(consumer(channel)
                        .settle(request)
                        .await?
                        .into_inner()
                        .failures)
                }
            })
            .await
    }

    /// The raw generated clients on the endpoint the client first connected to, for calls
    /// this wrapper does not cover (they neither follow redirects nor retry).
    pub fn raw(
        &self,
    ) -> (
        AdminClient<Channel>,
        PublisherClient<Channel>,
        ConsumerClient<Channel>,
    ) {
        let channel = self.router.first_channel();
        (
            admin(channel.clone()),
            publisher(channel.clone()),
            consumer(channel),
        )
    }
}

/// `endpoint` with `http://` in front when it is a bare `host:port` (as agents print them and
/// redirects name them).
fn with_scheme(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

/// Whether a publish of `messages` may be resent after a broken connection: only when the
/// agent can recognise the repeat by every message's idempotency key.
pub(crate) fn resend_of(messages: &[Message]) -> Resend {
    if !messages.is_empty() && messages.iter().all(|m| !m.idempotency_key.is_empty()) {
        Resend::Harmless
    } else {
        Resend::OnlyIfRefused
    }
}

pub(crate) fn admin(channel: Channel) -> AdminClient<Channel> {
    AdminClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub(crate) fn publisher(channel: Channel) -> PublisherClient<Channel> {
    PublisherClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub(crate) fn consumer(channel: Channel) -> ConsumerClient<Channel> {
    ConsumerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
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
