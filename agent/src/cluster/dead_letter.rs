//! Dead-lettering into a queue led by another agent (decision 0014).
//!
//! A source partition's leader moves a message to the dead-letter queue (DLQ) by publishing a
//! copy and settling the source only once the copy is confirmed. When this agent does not lead
//! the DLQ (it is placed on other agents, or led by another replica), the copy goes over the
//! public gRPC API through the client crate, which follows `sluice-leader` redirects with a
//! small, bounded retry. Two things make that safe:
//!
//! - **No duplicates on an ambiguous outcome**: every copy carries an idempotency key derived
//!   from where the message was and why it moved ([`copy_key`]), so a resend after a lost
//!   answer is confirmed again without being enqueued twice (within the DLQ's dedup window).
//! - **The mark survives the hop**: the public `Message` has no dead-letter fields, so the
//!   source queue and reason travel as two reserved headers that the receiving agent takes off
//!   and records as the copy's `dead_letter_source`/`dead_letter_reason` ([`take_marks`]).

use std::time::Duration;

use sluice_client::{Client, RetryPolicy};
use sluice_proto::v1::{Confirm, Message};

use crate::broker::BrokerError;

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
pub async fn forward(
    endpoints: &[String],
    dlq: &str,
    messages: Vec<Message>,
) -> Result<Vec<Confirm>, BrokerError> {
    let policy = RetryPolicy {
        max_attempts: FORWARD_ATTEMPTS,
        initial_backoff: FORWARD_BACKOFF,
        max_backoff: FORWARD_BACKOFF_MAX,
    };
    let unavailable = |e: sluice_client::Error| {
        BrokerError::Unavailable(format!("dead-letter queue {dlq:?}: {e}"))
    };
    let client = Client::connect_with(endpoints, policy)
        .await
        .map_err(unavailable)?;
    client
        .publish_confirms(dlq, messages)
        .await
        .map_err(unavailable)
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
