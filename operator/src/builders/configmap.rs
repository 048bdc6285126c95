//! The ConfigMap with the queue definitions the agents declare.
//!
//! The file is the operator's contract with the agents: JSON, one [`QueueDefinition`] per queue,
//! with every unit already resolved to whole milliseconds and bytes so that the agents parse
//! nothing human-shaped (the field names match `sluice.v1.QueueSpec`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use serde::{Deserialize, Serialize};

use crate::{
    Error, Result,
    crd::{MessageQueue, Overflow},
    names::{Names, QUEUES_FILE_KEY, child_meta},
    units,
};

/// One queue as the agents read it from `queues.json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QueueDefinition {
    /// Queue name.
    pub name: String,
    /// Partitions.
    pub partitions: u32,
    /// Copies of each partition.
    pub replication_factor: u32,
    /// Visibility timeout in milliseconds; 0 takes the agent's default.
    pub ack_timeout_ms: u64,
    /// Deliveries before dead-lettering; 0 means unlimited.
    pub max_deliveries: u32,
    /// Dead-letter queue; empty for none.
    pub dead_letter_queue: String,
    /// Default message TTL in milliseconds; 0 means none.
    pub message_ttl_ms: u64,
    /// Backlog limit in messages; 0 means unlimited.
    pub max_backlog_messages: u64,
    /// Backlog limit in bytes; 0 means unlimited.
    pub max_backlog_bytes: u64,
    /// Overflow policy, `reject-publish`.
    pub overflow: String,
    /// Whether priorities are honoured.
    pub priorities: bool,
}

/// The queue definitions of `mq`, with defaults applied and units resolved.
pub fn queue_definitions(mq: &MessageQueue, names: &Names) -> Result<Vec<QueueDefinition>> {
    let queues = mq.spec.effective_queues(&names.instance);
    queues
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let field = |name: &str| format!("spec.queues[{i}].{name}");
            let non_negative = |name: &str, value: i64| {
                u64::try_from(value).map_err(|_| Error::InvalidSpec {
                    field: field(name),
                    reason: format!("{value} is negative"),
                })
            };
            let backlog = q.max_backlog.clone().unwrap_or_default();
            Ok(QueueDefinition {
                name: q.name.clone(),
                partitions: non_negative("partitions", q.effective_partitions().into())? as u32,
                replication_factor: non_negative(
                    "replicationFactor",
                    q.effective_replication_factor(mq.spec.replicas).into(),
                )? as u32,
                ack_timeout_ms: match &q.ack_timeout {
                    Some(d) => units::duration_ms(&field("ackTimeout"), d)?,
                    None => 0,
                },
                max_deliveries: non_negative("maxDeliveries", q.max_deliveries.unwrap_or(0).into())?
                    as u32,
                dead_letter_queue: q.dead_letter_queue.clone().unwrap_or_default(),
                message_ttl_ms: match &q.message_ttl {
                    Some(d) => units::duration_ms(&field("messageTtl"), d)?,
                    None => 0,
                },
                max_backlog_messages: non_negative(
                    "maxBacklog.messages",
                    backlog.messages.unwrap_or(0),
                )?,
                max_backlog_bytes: match &backlog.bytes {
                    Some(b) => units::bytes(&field("maxBacklog.bytes"), b)?,
                    None => 0,
                },
                overflow: match backlog.overflow.unwrap_or(Overflow::RejectPublish) {
                    Overflow::RejectPublish => "reject-publish".to_owned(),
                },
                priorities: q.priorities.unwrap_or(false),
            })
        })
        .collect()
}

/// The ConfigMap holding `queues.json`.
pub fn build(mq: &MessageQueue, names: &Names) -> Result<ConfigMap> {
    let definitions = queue_definitions(mq, names)?;
    let json =
        serde_json::to_string_pretty(&definitions).map_err(|source| Error::Serialization {
            what: "queue definitions",
            source,
        })?;
    Ok(ConfigMap {
        metadata: child_meta(mq, names, names.configmap())?,
        data: Some(BTreeMap::from([(QUEUES_FILE_KEY.to_owned(), json)])),
        ..ConfigMap::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_mq;

    #[test]
    fn empty_queue_list_declares_one_queue_named_after_the_resource() {
        let mq = test_mq(serde_json::json!({"replicas": 2}));
        let defs = queue_definitions(&mq, &Names::of(&mq).unwrap()).unwrap();
        assert_eq!(defs.len(), 1);
        assert_eq!(defs[0].name, "orders");
        assert_eq!(defs[0].partitions, 1);
        assert_eq!(
            defs[0].replication_factor, 2,
            "default factor is min(3, replicas)"
        );
    }

    #[test]
    fn queue_settings_are_resolved_to_milliseconds_and_bytes() {
        let mq = test_mq(serde_json::json!({"queues": [{
            "name": "orders", "partitions": 3, "replicationFactor": 3, "ackTimeout": "30s",
            "maxDeliveries": 5, "deadLetterQueue": "orders-dlq", "messageTtl": "24h",
            "maxBacklog": {"messages": 10000000, "bytes": "50Gi", "overflow": "reject-publish"},
            "priorities": true
        }]}));
        let cm = build(&mq, &Names::of(&mq).unwrap()).unwrap();
        let json = &cm.data.unwrap()[QUEUES_FILE_KEY];
        let defs: Vec<QueueDefinition> = serde_json::from_str(json).unwrap();
        assert_eq!(
            defs[0],
            QueueDefinition {
                name: "orders".into(),
                partitions: 3,
                replication_factor: 3,
                ack_timeout_ms: 30_000,
                max_deliveries: 5,
                dead_letter_queue: "orders-dlq".into(),
                message_ttl_ms: 86_400_000,
                max_backlog_messages: 10_000_000,
                max_backlog_bytes: 50 << 30,
                overflow: "reject-publish".into(),
                priorities: true,
            }
        );
    }

    #[test]
    fn an_unparseable_duration_is_an_error_naming_the_queue_field() {
        let mq = test_mq(
            serde_json::json!({"queues": [{"name": "a"}, {"name": "b", "ackTimeout": "soon"}]}),
        );
        let err = build(&mq, &Names::of(&mq).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.queues[1].ackTimeout"), "{err}");
    }
}
