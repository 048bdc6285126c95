//! The queue definitions file (`--queues-file`): the JSON array the operator writes into the
//! MessageQueue's ConfigMap (`operator/src/builders/configmap.rs`, `QueueDefinition`), read at
//! startup and turned into the [`QueueSpec`]s the agent declares.
//!
//! The agent keeps its own serde type rather than sharing the operator's: the agent must not
//! depend on the operator crate, and `deny_unknown_fields` turns any drift between the two
//! (a renamed or added field) into a startup error naming the field instead of a silently
//! ignored setting. Units are already resolved by the operator: durations in milliseconds,
//! sizes in bytes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sluice_proto::v1::{OverflowPolicy, QueueSpec};

/// The only overflow policy there is; an empty value takes it too.
pub const OVERFLOW_REJECT_PUBLISH: &str = "reject-publish";

/// One queue as the operator writes it. Every field but `name` may be left out of a
/// hand-written file and then takes the agent's default (0 and empty mean "the default", as in
/// [`QueueSpec`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueueDefinition {
    /// Queue name.
    pub name: String,
    /// Partitions; 0 takes the default (1).
    #[serde(default)]
    pub partitions: u32,
    /// Copies of each partition the MessageQueue asks for; 0 leaves it to the agent's
    /// `--replication-factor`. [`QueueSpec`] has no such field, so [`QueueDefinition::to_spec`]
    /// drops it; cluster mode reads it from here.
    #[serde(default)]
    pub replication_factor: u32,
    /// Visibility timeout in milliseconds; 0 takes the default.
    #[serde(default)]
    pub ack_timeout_ms: u64,
    /// Deliveries before dead-lettering; 0 means unlimited.
    #[serde(default)]
    pub max_deliveries: u32,
    /// Dead-letter queue; empty for none.
    #[serde(default)]
    pub dead_letter_queue: String,
    /// Default message TTL in milliseconds; 0 means none.
    #[serde(default)]
    pub message_ttl_ms: u64,
    /// Backlog limit in messages; 0 means unlimited.
    #[serde(default)]
    pub max_backlog_messages: u64,
    /// Backlog limit in payload bytes; 0 means unlimited.
    #[serde(default)]
    pub max_backlog_bytes: u64,
    /// Overflow policy: `reject-publish` (or empty for that default).
    #[serde(default)]
    pub overflow: String,
    /// Whether per-message priorities are honoured.
    #[serde(default)]
    pub priorities: bool,
}

impl QueueDefinition {
    /// The public API's spec of this queue; the policy string was checked by [`read`].
    pub fn to_spec(&self) -> QueueSpec {
        QueueSpec {
            name: self.name.clone(),
            partitions: self.partitions,
            ack_timeout_ms: self.ack_timeout_ms,
            max_deliveries: self.max_deliveries,
            dead_letter_queue: self.dead_letter_queue.clone(),
            message_ttl_ms: self.message_ttl_ms,
            max_backlog_messages: self.max_backlog_messages,
            max_backlog_bytes: self.max_backlog_bytes,
            overflow: OverflowPolicy::RejectPublish as i32,
            priorities: self.priorities,
            // Not part of the operator's contract: the agent's defaults apply.
            dedup_window_ms: 0,
            max_payload_bytes: 0,
        }
    }
}

/// Why a queue definitions file was refused. Every variant names the file; those about one
/// queue name its position in the array and, when it has one, its name. The cause (I/O or
/// JSON error, with the field and line) is the `source`, shown by `{:#}` of an error chain.
#[derive(Debug, thiserror::Error)]
pub enum QueuesFileError {
    /// The file could not be read.
    #[error("queue definitions {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a JSON array.
    #[error("queue definitions {}: not a JSON array of queues", path.display())]
    NotAnArray {
        /// The file.
        path: PathBuf,
        /// The JSON error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// One queue's object does not fit [`QueueDefinition`] (unknown or mistyped field).
    #[error("queue definitions {}: queue [{index}]{}", path.display(), named(name))]
    Queue {
        /// The file.
        path: PathBuf,
        /// Position of the queue in the array.
        index: usize,
        /// The queue's `name`, when the object has a string one.
        name: Option<String>,
        /// The JSON error naming the field.
        #[source]
        source: serde_json::Error,
    },
    /// One queue's field has a value the agent does not accept.
    #[error("queue definitions {}: queue [{index}] {name:?}: {field}: {reason}", path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// Position of the queue in the array.
        index: usize,
        /// The queue's name.
        name: String,
        /// The offending field, as spelled in the file.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn named(name: &Option<String>) -> String {
    name.as_ref().map(|n| format!(" {n:?}")).unwrap_or_default()
}

/// Reads and checks the definitions in `path`, in file order.
///
/// Each queue is decoded on its own so that an error names the queue it is in; the checks here
/// are the ones the file format owns (names present and unique, a known overflow policy). The
/// limits of each setting are the broker's to enforce when it declares the queue.
pub fn read(path: &Path) -> Result<Vec<QueueDefinition>, QueuesFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| QueuesFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let items: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|source| QueuesFileError::NotAnArray {
            path: path.to_owned(),
            source,
        })?;
    let mut names = BTreeSet::new();
    let mut definitions = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let name = item
            .get("name")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        let definition: QueueDefinition =
            serde_json::from_value(item).map_err(|source| QueuesFileError::Queue {
                path: path.to_owned(),
                index,
                name,
                source,
            })?;
        let field_error = |field: &'static str, reason: String| QueuesFileError::Field {
            path: path.to_owned(),
            index,
            name: definition.name.clone(),
            field,
            reason,
        };
        if definition.name.is_empty() {
            return Err(field_error("name", "must not be empty".to_owned()));
        }
        if !names.insert(definition.name.clone()) {
            return Err(field_error(
                "name",
                "is defined twice in the file".to_owned(),
            ));
        }
        if !definition.overflow.is_empty() && definition.overflow != OVERFLOW_REJECT_PUBLISH {
            return Err(field_error(
                "overflow",
                format!(
                    "{:?} is not a known policy (only {OVERFLOW_REJECT_PUBLISH:?})",
                    definition.overflow
                ),
            ));
        }
        definitions.push(definition);
    }
    Ok(definitions)
}

/// The specs of the queues in `path`, in file order, for the agent to declare at startup.
pub fn load(path: &Path) -> Result<Vec<QueueSpec>, QueuesFileError> {
    Ok(read(path)?.iter().map(QueueDefinition::to_spec).collect())
}

#[cfg(test)]
#[path = "queues_file_test.rs"]
mod tests;
