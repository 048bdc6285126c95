//! Validation of queue specs and messages, and the spec defaults.
//!
//! Every error names the proto field path (`queue.ack_timeout_ms`, `messages[3].priority`) so
//! the gRPC layer can return it verbatim as INVALID_ARGUMENT.

use sluice_proto::v1::{Message, OverflowPolicy, QueueSpec};

use crate::error::BrokerError;

/// Partitions when the spec says 0.
pub const PARTITIONS_DEFAULT: u32 = 1;
/// Most partitions a queue may have.
pub const PARTITIONS_MAX: u32 = 256;
/// Ack timeout when the spec says 0.
pub const ACK_TIMEOUT_DEFAULT_MS: u64 = 30_000;
/// Shortest ack timeout accepted.
pub const ACK_TIMEOUT_MIN_MS: u64 = 100;
/// Dedup window when the spec says 0.
pub const DEDUP_WINDOW_DEFAULT_MS: u64 = 120_000;
/// Payload limit when the spec says 0.
pub const MAX_PAYLOAD_DEFAULT_BYTES: u32 = 1024 * 1024;
/// Largest payload limit a spec may ask for.
pub const MAX_PAYLOAD_LIMIT_BYTES: u32 = 16 * 1024 * 1024;
/// Longest queue name.
pub const QUEUE_NAME_MAX_CHARS: usize = 64;
/// Longest idempotency key.
pub const IDEMPOTENCY_KEY_MAX_BYTES: usize = 256;
/// Highest priority.
pub const PRIORITY_MAX: u32 = 9;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> BrokerError {
    BrokerError::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Checks a queue name: 1..=64 characters of `[a-z0-9._-]`, starting with a letter or digit.
/// `field` is the proto path reported on failure.
pub fn validate_name(field: &str, name: &str) -> Result<(), BrokerError> {
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.len() > QUEUE_NAME_MAX_CHARS {
        return Err(invalid(
            field,
            format!("{} characters, at most {QUEUE_NAME_MAX_CHARS}", name.len()),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '-'))
    {
        return Err(invalid(
            field,
            format!("character {bad:?} not allowed (use [a-z0-9._-])"),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(invalid(field, "must start with a letter or digit"));
    }
    Ok(())
}

/// Validates a declared spec and returns it with every default filled in.
pub fn effective_spec(spec: &QueueSpec) -> Result<QueueSpec, BrokerError> {
    let mut s = spec.clone();
    validate_name("queue.name", &s.name)?;
    if s.partitions == 0 {
        s.partitions = PARTITIONS_DEFAULT;
    }
    if s.partitions > PARTITIONS_MAX {
        return Err(invalid(
            "queue.partitions",
            format!("{} is more than {PARTITIONS_MAX}", s.partitions),
        ));
    }
    if s.ack_timeout_ms == 0 {
        s.ack_timeout_ms = ACK_TIMEOUT_DEFAULT_MS;
    }
    if s.ack_timeout_ms < ACK_TIMEOUT_MIN_MS {
        return Err(invalid(
            "queue.ack_timeout_ms",
            format!(
                "{} ms is less than the minimum {ACK_TIMEOUT_MIN_MS} ms",
                s.ack_timeout_ms
            ),
        ));
    }
    if !s.dead_letter_queue.is_empty() {
        validate_name("queue.dead_letter_queue", &s.dead_letter_queue)?;
        if s.dead_letter_queue == s.name {
            return Err(invalid(
                "queue.dead_letter_queue",
                "a queue cannot be its own dead-letter queue",
            ));
        }
    } else if s.max_deliveries != 0 {
        return Err(invalid(
            "queue.max_deliveries",
            "requires queue.dead_letter_queue",
        ));
    }
    match OverflowPolicy::try_from(s.overflow) {
        Ok(OverflowPolicy::Unspecified) => s.overflow = OverflowPolicy::RejectPublish as i32,
        Ok(OverflowPolicy::RejectPublish) => {}
        Err(_) => {
            return Err(invalid(
                "queue.overflow",
                format!("unknown overflow policy {}", s.overflow),
            ));
        }
    }
    if s.dedup_window_ms == 0 {
        s.dedup_window_ms = DEDUP_WINDOW_DEFAULT_MS;
    }
    if s.max_payload_bytes == 0 {
        s.max_payload_bytes = MAX_PAYLOAD_DEFAULT_BYTES;
    }
    if s.max_payload_bytes > MAX_PAYLOAD_LIMIT_BYTES {
        return Err(invalid(
            "queue.max_payload_bytes",
            format!(
                "{} is more than {MAX_PAYLOAD_LIMIT_BYTES}",
                s.max_payload_bytes
            ),
        ));
    }
    Ok(s)
}

/// The first setting in which two effective specs differ, as `field: old vs new`.
pub fn difference(old: &QueueSpec, new: &QueueSpec) -> Option<String> {
    macro_rules! cmp {
        ($($f:ident),*) => {$(
            if old.$f != new.$f {
                return Some(format!(concat!("queue.", stringify!($f), ": existing {:?}, requested {:?}"), old.$f, new.$f));
            }
        )*};
    }
    cmp!(
        partitions,
        ack_timeout_ms,
        max_deliveries,
        dead_letter_queue,
        message_ttl_ms,
        max_backlog_messages,
        max_backlog_bytes,
        overflow,
        priorities,
        dedup_window_ms,
        max_payload_bytes
    );
    None
}

/// Checks one message against its queue; `index` is its position in the request. An oversize
/// payload is RESOURCE_EXHAUSTED, everything else INVALID_ARGUMENT.
pub fn validate_message(
    spec: &QueueSpec,
    index: usize,
    message: &Message,
) -> Result<(), BrokerError> {
    let field = |name: &str| format!("messages[{index}].{name}");
    if message.payload.len() > spec.max_payload_bytes as usize {
        return Err(BrokerError::PayloadTooLarge {
            field: field("payload"),
            bytes: message.payload.len(),
            max: spec.max_payload_bytes,
        });
    }
    if message.headers.keys().any(|k| k.is_empty()) {
        return Err(invalid(field("headers"), "header keys must not be empty"));
    }
    if message.priority != 0 && !spec.priorities {
        return Err(invalid(
            field("priority"),
            format!("queue {:?} has priorities disabled", spec.name),
        ));
    }
    if message.priority > PRIORITY_MAX {
        return Err(invalid(
            field("priority"),
            format!("{} is more than {PRIORITY_MAX}", message.priority),
        ));
    }
    if message.idempotency_key.len() > IDEMPOTENCY_KEY_MAX_BYTES {
        return Err(invalid(
            field("idempotency_key"),
            format!(
                "{} bytes is more than {IDEMPOTENCY_KEY_MAX_BYTES}",
                message.idempotency_key.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: BrokerError) -> String {
        match err {
            BrokerError::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let spec = effective_spec(&QueueSpec {
            name: "orders".into(),
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(spec.partitions, 1);
        assert_eq!(spec.ack_timeout_ms, ACK_TIMEOUT_DEFAULT_MS);
        assert_eq!(spec.dedup_window_ms, DEDUP_WINDOW_DEFAULT_MS);
        assert_eq!(spec.max_payload_bytes, MAX_PAYLOAD_DEFAULT_BYTES);
        assert_eq!(spec.overflow, OverflowPolicy::RejectPublish as i32);
    }

    #[test]
    fn each_bad_setting_is_named_by_its_field() {
        let base = QueueSpec {
            name: "q".into(),
            ..Default::default()
        };
        let cases = [
            (
                QueueSpec {
                    name: String::new(),
                    ..base.clone()
                },
                "queue.name",
            ),
            (
                QueueSpec {
                    name: "Upper".into(),
                    ..base.clone()
                },
                "queue.name",
            ),
            (
                QueueSpec {
                    name: "-x".into(),
                    ..base.clone()
                },
                "queue.name",
            ),
            (
                QueueSpec {
                    name: "x".repeat(65),
                    ..base.clone()
                },
                "queue.name",
            ),
            (
                QueueSpec {
                    partitions: 257,
                    ..base.clone()
                },
                "queue.partitions",
            ),
            (
                QueueSpec {
                    ack_timeout_ms: 99,
                    ..base.clone()
                },
                "queue.ack_timeout_ms",
            ),
            (
                QueueSpec {
                    max_deliveries: 3,
                    ..base.clone()
                },
                "queue.max_deliveries",
            ),
            (
                QueueSpec {
                    dead_letter_queue: "q".into(),
                    ..base.clone()
                },
                "queue.dead_letter_queue",
            ),
            (
                QueueSpec {
                    dead_letter_queue: "Bad!".into(),
                    ..base.clone()
                },
                "queue.dead_letter_queue",
            ),
            (
                QueueSpec {
                    overflow: 7,
                    ..base.clone()
                },
                "queue.overflow",
            ),
            (
                QueueSpec {
                    max_payload_bytes: MAX_PAYLOAD_LIMIT_BYTES + 1,
                    ..base.clone()
                },
                "queue.max_payload_bytes",
            ),
        ];
        for (spec, field) in cases {
            assert_eq!(field_of(effective_spec(&spec).expect_err(field)), field);
        }
    }

    #[test]
    fn redeclaring_names_the_first_differing_setting() {
        let a = effective_spec(&QueueSpec {
            name: "q".into(),
            ..Default::default()
        })
        .expect("valid");
        let b = effective_spec(&QueueSpec {
            name: "q".into(),
            ack_timeout_ms: 500,
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(difference(&a, &a), None);
        let diff = difference(&a, &b).expect("differs");
        assert!(diff.starts_with("queue.ack_timeout_ms"), "{diff}");
    }

    #[test]
    fn bad_messages_are_named_by_their_index_and_field() {
        let spec = effective_spec(&QueueSpec {
            name: "q".into(),
            max_payload_bytes: 4,
            ..Default::default()
        })
        .expect("valid");
        let big = Message {
            payload: vec![0; 5],
            ..Default::default()
        };
        assert!(
            matches!(validate_message(&spec, 0, &big), Err(e @ BrokerError::PayloadTooLarge { .. }) if e.to_string().starts_with("messages[0].payload"))
        );
        let prio = Message {
            priority: 1,
            ..Default::default()
        };
        assert_eq!(
            field_of(validate_message(&spec, 3, &prio).expect_err("prio")),
            "messages[3].priority"
        );
        let key = Message {
            idempotency_key: "k".repeat(257),
            ..Default::default()
        };
        assert_eq!(
            field_of(validate_message(&spec, 1, &key).expect_err("key")),
            "messages[1].idempotency_key"
        );
        let mut header = Message::default();
        header.headers.insert(String::new(), "v".into());
        assert_eq!(
            field_of(validate_message(&spec, 2, &header).expect_err("hdr")),
            "messages[2].headers"
        );
    }
}
