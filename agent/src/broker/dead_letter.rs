//! Dead-lettering: moving messages a queue gave up on (max deliveries, rejects, expiry) to its
//! dead-letter queue (DLQ), here or on another agent (decision 0014).
//!
//! A source partition's leader moves a message by publishing a copy and settling the source
//! only once the copy is confirmed: a crash between the two duplicates a message in the DLQ,
//! never loses it. When this agent does not lead the DLQ (it is placed on other agents, or led
//! by another replica), the copy goes over the public gRPC API through the client crate, which
//! follows `sluice-leader` redirects with a small, bounded retry. Two things make that safe:
//!
//! - **No duplicates on an ambiguous outcome**: every copy carries an idempotency key derived
//!   from where the message was and why it moved ([`copy_key`]), so a resend after a lost
//!   answer is confirmed again without being enqueued twice (within the DLQ's dedup window).
//! - **The mark survives the hop**: the public `Message` has no dead-letter fields, so the
//!   source queue and reason travel as two reserved headers that the receiving agent takes off
//!   and records as the copy's `dead_letter_source`/`dead_letter_reason` ([`take_marks`]).

use std::sync::Arc;
use std::time::Duration;

use sluice_client::{Client, RetryPolicy};
use sluice_proto::v1::{Confirm, Message, QueueSpec};

use super::Broker;
use crate::error::{BrokerError, Confirmation, Stored};
use crate::queue::partition::Partition;
use crate::queue::queue::Queue;
use crate::queue::state::DisposalItem;

/// Reserved header naming the queue a forwarded dead-letter copy came from.
pub const SOURCE_HEADER: &str = "sluice-dead-letter-source";
/// Reserved header naming why a forwarded dead-letter copy was moved.
pub const REASON_HEADER: &str = "sluice-dead-letter-reason";
/// Attempts of one forwarding publish (redirects included): enough to follow a redirect from a
/// replica to the leader and ride out a short election; the caller retries the whole move on
/// its next timer pass after that.
const FORWARD_ATTEMPTS: u32 = 6;
/// First backoff between forwarding attempts.
const FORWARD_BACKOFF: Duration = Duration::from_millis(50);
/// Largest backoff between forwarding attempts.
const FORWARD_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// The idempotency key of the dead-letter copy of the message at `offset` of `partition` of
/// `source`, moved for `reason`: the same on every retry of the same move, different for any
/// other message. At most 64 (queue name) + 10 + 20 + 14 + 24 bytes, within the 256 allowed.
pub fn copy_key(source: &str, partition: u32, offset: u64, reason: &str) -> String {
    format!("sluice-dead-letter:{source}:{partition}:{offset}:{reason}")
}

/// Adds the reserved headers that carry the dead-letter mark to a copy sent to another agent.
pub fn mark(message: &mut Message, source: &str, reason: &str) {
    message
        .headers
        .insert(SOURCE_HEADER.to_owned(), source.to_owned());
    message
        .headers
        .insert(REASON_HEADER.to_owned(), reason.to_owned());
}

/// Whether `message` carries a reserved dead-letter header (a copy forwarded by another agent,
/// or a client imitating one).
pub fn is_marked(message: &Message) -> bool {
    message.headers.contains_key(SOURCE_HEADER) || message.headers.contains_key(REASON_HEADER)
}

/// Takes the reserved dead-letter headers off a published batch. `Ok(Some((source, reason)))`
/// when every message carries the same mark (a copy forwarded by [`forward`]), `Ok(None)` when
/// none carries one; a batch that mixes marks, or a mark without a source, is refused naming
/// the first offending message's header.
pub fn take_marks(messages: &mut [Message]) -> Result<Option<(String, String)>, BrokerError> {
    let mut marks: Option<(String, String)> = None;
    for (i, message) in messages.iter_mut().enumerate() {
        let source = message.headers.remove(SOURCE_HEADER);
        let reason = message.headers.remove(REASON_HEADER);
        let this = match (source, reason) {
            (None, None) => None,
            (Some(source), reason) if !source.is_empty() => {
                Some((source, reason.unwrap_or_default()))
            }
            (_, _) => {
                return Err(BrokerError::InvalidArgument {
                    field: format!("messages[{i}].headers[{SOURCE_HEADER:?}]"),
                    reason: "a dead-letter mark needs a non-empty source queue".into(),
                });
            }
        };
        match (i, &marks, this) {
            (0, _, this) => marks = this,
            (_, expected, this) if *expected == this => {}
            (_, _, _) => {
                return Err(BrokerError::InvalidArgument {
                    field: format!("messages[{i}].headers[{SOURCE_HEADER:?}]"),
                    reason: "every message of a batch must carry the same dead-letter mark \
                             as messages[0]"
                        .into(),
                });
            }
        }
    }
    Ok(marks)
}

/// Publishes `messages` (marked, keyed) to `dlq` on whichever of `endpoints` (client addresses,
/// preferred leader first) leads it. Returns the confirms as the leader sent them; an error
/// when no agent confirmed within the bounded retry (the move is then retried later).
async fn forward(
    endpoints: &[String],
    dlq: &str,
    messages: Vec<Message>,
) -> Result<Vec<Confirmation>, BrokerError> {
    let policy = RetryPolicy {
        max_attempts: FORWARD_ATTEMPTS,
        initial_backoff: FORWARD_BACKOFF,
        max_backoff: FORWARD_BACKOFF_MAX,
    };
    let unreachable = |source| BrokerError::DeadLetterUnreachable {
        dlq: dlq.to_owned(),
        source,
    };
    let client = Client::connect_with(endpoints, policy)
        .await
        .map_err(unreachable)?;
    let confirms = client
        .publish_confirms(dlq, messages)
        .await
        .map_err(unreachable)?;
    Ok(confirms
        .into_iter()
        .map(|c| confirmation_of(dlq, c))
        .collect())
}

/// A confirm from the DLQ's leader as a [`Confirmation`] (its code only tells success).
fn confirmation_of(dlq: &str, confirm: Confirm) -> Confirmation {
    match confirm.id {
        Some(id) if confirm.code == 0 => Ok(Stored {
            id,
            duplicate: confirm.duplicate,
        }),
        _ => Err(BrokerError::DeadLetterRefused {
            dlq: dlq.to_owned(),
            reason: confirm.error,
        }),
    }
}

/// Where a queue's dead-letter copies go.
enum DeadLetterTarget {
    /// The DLQ is hosted by this agent (which may or may not lead it).
    Here(Arc<Queue>),
    /// The DLQ is placed on other agents only (its spec from the catalog).
    Elsewhere(QueueSpec),
}

impl DeadLetterTarget {
    /// Whether the DLQ keeps priorities (otherwise a copy's priority is dropped).
    fn priorities(&self) -> bool {
        match self {
            Self::Here(queue) => queue.spec().priorities,
            Self::Elsewhere(spec) => spec.priorities,
        }
    }
}

impl Broker {
    /// Copies messages to the source queue's dead-letter queue durably, then settles them in
    /// the source. A crash between the two duplicates a message in the DLQ, never loses it.
    pub(super) async fn dead_letter(
        &self,
        source: &Queue,
        partition: &Arc<Partition>,
        items: Vec<DisposalItem>,
    ) -> Result<(), BrokerError> {
        if items.is_empty() {
            return Ok(());
        }
        let result = self.dead_letter_inner(source, partition, &items).await;
        match result {
            Ok(failed) => {
                if !failed.is_empty() {
                    partition.retry_disposals(failed);
                }
                Ok(())
            }
            Err(e) => {
                partition.retry_disposals(items);
                Err(e)
            }
        }
    }

    /// Returns the items the DLQ refused (to retry).
    async fn dead_letter_inner(
        &self,
        source: &Queue,
        partition: &Arc<Partition>,
        items: &[DisposalItem],
    ) -> Result<Vec<DisposalItem>, BrokerError> {
        let dlq = source.spec().dead_letter_queue.clone();
        let source_name = source.spec().name.clone();
        let target = self.dead_letter_target(&dlq).await?;
        let mut refused = Vec::new();
        let mut reasons: Vec<&'static str> = items.iter().map(|i| i.disposal.reason()).collect();
        reasons.sort_unstable();
        reasons.dedup();
        for reason in reasons {
            let group: Vec<DisposalItem> = items
                .iter()
                .filter(|i| i.disposal.reason() == reason)
                .cloned()
                .collect();
            let mut messages = Vec::with_capacity(group.len());
            for item in &group {
                let mut message = partition
                    .read_publish(item.message.offset)?
                    .message
                    .unwrap_or_default();
                // The copy is a fresh message of the DLQ: its delay and TTL belonged to the
                // source (the DLQ's own TTL applies), and its priority only counts if the DLQ
                // has priorities. Its idempotency key names this move, so a resend after an
                // ambiguous outcome (a crash, a lost answer) is not enqueued twice.
                message.delay_ms = 0;
                message.ttl_ms = 0;
                message.idempotency_key =
                    copy_key(&source_name, partition.id(), item.message.offset, reason);
                if !target.priorities() {
                    message.priority = 0;
                }
                messages.push(message);
            }
            let confirms = self
                .publish_dead_letters(&target, &dlq, &source_name, reason, messages)
                .await?;
            let mut done = Vec::with_capacity(group.len());
            for (item, confirm) in group.into_iter().zip(confirms) {
                match confirm {
                    Ok(_) => done.push(item),
                    Err(e) => {
                        tracing::warn!(queue = %source_name, dlq = %dlq, offset = item.message.offset, error = %e, "dead-letter queue refused a message");
                        refused.push(item);
                    }
                }
            }
            let index = partition.settle_dead_lettered(&done)?;
            partition.wait_durable(index).await?;
        }
        source.wake_consumers();
        Ok(refused)
    }

    /// Publishes dead-letter copies where the DLQ is led: here when this agent leads it,
    /// otherwise over the public API to the agents hosting it (following redirects). A local
    /// publish refused for leadership takes nothing, so it is safely sent on.
    async fn publish_dead_letters(
        &self,
        target: &DeadLetterTarget,
        dlq: &str,
        source: &str,
        reason: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Confirmation>, BrokerError> {
        let mut messages = messages;
        if let DeadLetterTarget::Here(queue) = target {
            let local = if self.options.cluster.is_some() {
                queue
                    .publish(messages.clone(), Some((source, reason)))
                    .await
            } else {
                return queue.publish(messages, Some((source, reason))).await;
            };
            match local {
                Err(BrokerError::NotLeader { .. }) => {}
                other => return other,
            }
        }
        let endpoints = self.dead_letter_endpoints(dlq);
        if endpoints.is_empty() {
            return Err(BrokerError::NoDeadLetterHost {
                dlq: dlq.to_owned(),
            });
        }
        for message in &mut messages {
            mark(message, source, reason);
        }
        forward(&endpoints, dlq, messages).await
    }

    /// Client addresses of the other agents placed to host `dlq`, preferred leader first.
    fn dead_letter_endpoints(&self, dlq: &str) -> Vec<String> {
        let Some(cluster) = &self.options.cluster else {
            return Vec::new();
        };
        let catalog = cluster.meta.current();
        catalog
            .replica_set(dlq, cluster.config.replication_factor)
            .into_iter()
            .filter(|n| *n != cluster.config.node_id)
            .filter_map(|n| catalog.client_address(n))
            .collect()
    }

    /// The dead-letter queue, created with default settings if missing: hosted here, or (in a
    /// cluster) declared and placed on other agents.
    async fn dead_letter_target(&self, name: &str) -> Result<DeadLetterTarget, BrokerError> {
        if let Some(target) = self.find_dead_letter_target(name) {
            return Ok(target);
        }
        self.declare(QueueSpec {
            name: name.to_owned(),
            ..QueueSpec::default()
        })
        .await?;
        self.find_dead_letter_target(name)
            .ok_or_else(|| BrokerError::QueueNotFound {
                queue: name.to_owned(),
            })
    }

    fn find_dead_letter_target(&self, name: &str) -> Option<DeadLetterTarget> {
        if let Some(queue) = self.read_queues().get(name) {
            return Some(DeadLetterTarget::Here(queue.clone()));
        }
        let cluster = self.options.cluster.as_ref()?;
        let spec = cluster.meta.current().queues.get(name)?.clone();
        Some(DeadLetterTarget::Elsewhere(spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(source: &str, reason: &str) -> Message {
        let mut m = Message::default();
        m.headers.insert("app".into(), "kept".into());
        mark(&mut m, source, reason);
        m
    }

    #[test]
    fn a_copy_key_names_the_source_message_and_fits_the_idempotency_limit() {
        let longest = "q".repeat(crate::queue::spec::QUEUE_NAME_MAX_CHARS);
        let key = copy_key(&longest, u32::MAX, u64::MAX, "max-deliveries");
        assert!(
            key.len() <= crate::queue::spec::IDEMPOTENCY_KEY_MAX_BYTES,
            "{key}"
        );
        assert_eq!(
            copy_key("a", 1, 2, "expired"),
            copy_key("a", 1, 2, "expired")
        );
        assert_ne!(
            copy_key("a", 1, 2, "expired"),
            copy_key("a", 1, 3, "expired")
        );
        assert_ne!(
            copy_key("a", 1, 2, "expired"),
            copy_key("a", 2, 2, "expired")
        );
    }

    #[test]
    fn marks_are_taken_off_and_returned_once_for_the_batch() {
        let mut batch = vec![marked("src", "expired"), marked("src", "expired")];
        let marks = take_marks(&mut batch).expect("consistent marks");
        assert_eq!(marks, Some(("src".into(), "expired".into())));
        for m in &batch {
            assert_eq!(
                m.headers.len(),
                1,
                "only the application header stays: {m:?}"
            );
        }
    }

    #[test]
    fn a_batch_without_marks_is_left_alone() {
        let mut batch = vec![Message::default(); 3];
        assert_eq!(take_marks(&mut batch).expect("no marks"), None);
    }

    #[test]
    fn a_batch_mixing_marks_is_refused_naming_the_message() {
        let mut batch = vec![marked("src", "expired"), Message::default()];
        let e = take_marks(&mut batch).expect_err("mixed");
        assert!(
            e.to_string()
                .starts_with("messages[1].headers[\"sluice-dead-letter-source\"]"),
            "{e}"
        );
    }

    #[test]
    fn a_mark_without_a_source_is_refused() {
        let mut m = Message::default();
        m.headers.insert(REASON_HEADER.into(), "expired".into());
        let e = take_marks(&mut [m]).expect_err("no source");
        assert!(e.to_string().contains("non-empty source"), "{e}");
    }
}
