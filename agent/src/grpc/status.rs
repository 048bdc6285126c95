//! The one place a [`BrokerError`] becomes a gRPC status (or a per-item failure code).
//!
//! The code comes from [`code`] and the message is the error's `Display`, which names the
//! field or queue, so clients see e.g. `queue.name: must not be empty`.

use sluice_proto::v1::{Confirm, SettleOutcome};
use tonic::{Code, Status};

use crate::error::{BrokerError, Confirmation, SettleFailure};
use crate::log::LogError;

/// The gRPC status code `err` is reported with.
pub fn code(err: &BrokerError) -> Code {
    use BrokerError as E;
    match err {
        E::InvalidArgument { .. } => Code::InvalidArgument,
        E::QueueNotFound { .. } => Code::NotFound,
        E::QueueExists { .. } => Code::AlreadyExists,
        E::PayloadTooLarge { .. } | E::BacklogFull { .. } => Code::ResourceExhausted,
        E::DataDirLocked { .. }
        | E::QueueNotEmpty { .. }
        | E::QueueNotCreated { .. }
        | E::QueueOffline { .. }
        | E::PartitionCorrupted { .. }
        | E::StaleDelivery { .. }
        | E::NoSuchPartition { .. } => Code::FailedPrecondition,
        E::ShuttingDown
        | E::BrokerClosed
        | E::NotYetMember { .. }
        | E::PartitionClosed { .. }
        | E::NoDeadLetterHost { .. }
        | E::DeadLetterUnreachable { .. }
        | E::DeadLetterRefused { .. }
        | E::Catalog(_)
        | E::NotLeader { .. } => Code::Unavailable,
        E::LeaderChanged { .. } => Code::Aborted,
        E::Storage(LogError::Corrupted { .. }) => Code::FailedPrecondition,
        E::Storage(_) => Code::Internal,
    }
}

/// The confirm of one message as the proto carries it (a refused one with its code).
pub fn confirm(confirmation: Confirmation) -> Confirm {
    match confirmation {
        Ok(stored) => Confirm {
            id: Some(stored.id),
            duplicate: stored.duplicate,
            ..Confirm::default()
        },
        Err(err) => Confirm {
            id: None,
            duplicate: false,
            code: code(&err) as i32,
            error: err.to_string(),
        },
    }
}

/// Every confirm of a publish, in order.
pub fn confirms(confirmations: Vec<Confirmation>) -> Vec<Confirm> {
    confirmations.into_iter().map(confirm).collect()
}

/// The proto form of failed settle tags.
pub fn settle_outcomes(failures: Vec<SettleFailure>) -> Vec<SettleOutcome> {
    failures
        .into_iter()
        .map(|f| SettleOutcome {
            tag: Some(f.tag),
            code: code(&f.error) as i32,
            error: f.error.to_string(),
        })
        .collect()
}

impl From<BrokerError> for Status {
    fn from(err: BrokerError) -> Self {
        let code = code(&err);
        if code == Code::Internal {
            // Internal errors are the agent's problem, not the caller's: log them with their
            // source chain, which the status message alone does not carry.
            tracing::error!(error = &err as &dyn std::error::Error, "request failed");
        }
        let mut status = Status::new(code, err.to_string());
        if let BrokerError::NotLeader {
            leader: Some(leader),
            ..
        } = &err
            && let Ok(value) = leader.parse()
        {
            status.metadata_mut().insert(LEADER_METADATA, value);
        }
        status
    }
}

/// Metadata key of a redirect: the leader's client address (`host:port`).
pub const LEADER_METADATA: &str = "sluice-leader";

/// Response header of a `Consume` stream whose subscription is in place (sent at once).
pub const SUBSCRIBED_METADATA: &str = "sluice-subscribed";

/// A failed confirm carrying `status`'s code and message, for every message of a batch that
/// failed as a whole inside a publish stream.
pub fn failed_confirm(status: &Status) -> Confirm {
    Confirm {
        id: None,
        duplicate: false,
        code: status.code() as i32,
        error: status.message().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_errors_keep_their_code_and_name_the_field() {
        let status = Status::from(BrokerError::InvalidArgument {
            field: "queue.name".into(),
            reason: "must not be empty".into(),
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "queue.name: must not be empty");

        let status = Status::from(BrokerError::QueueNotFound { queue: "x".into() });
        assert_eq!(status.code(), tonic::Code::NotFound);
        let confirm = failed_confirm(&status);
        assert_eq!(confirm.code, tonic::Code::NotFound as i32);
        assert_eq!(confirm.error, "queue \"x\" not found");
    }

    #[test]
    fn a_redirect_carries_the_leader_in_metadata() {
        let status = Status::from(BrokerError::NotLeader {
            what: "partition 0 of queue \"q\"".into(),
            leader: Some("10.0.0.2:7070".into()),
        });
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let leader = status
            .metadata()
            .get(LEADER_METADATA)
            .and_then(|v| v.to_str().ok());
        assert_eq!(leader, Some("10.0.0.2:7070"));

        let status = Status::from(BrokerError::NotLeader {
            what: "queue \"q\"".into(),
            leader: None,
        });
        assert!(status.metadata().get(LEADER_METADATA).is_none());
        assert!(
            status.message().contains("election"),
            "{}",
            status.message()
        );
    }
}
