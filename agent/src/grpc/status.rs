//! The one place a [`BrokerError`] becomes a gRPC status (or a per-item failure code).
//!
//! The code comes from [`BrokerError::code`] and the message is the error's `Display`, which
//! names the field or queue, so clients see e.g. `queue.name: must not be empty`.

use sluice_proto::v1::Confirm;
use tonic::Status;

use crate::broker::BrokerError;

impl From<BrokerError> for Status {
    fn from(err: BrokerError) -> Self {
        if err.code() == tonic::Code::Internal {
            // Internal errors are the agent's problem, not the caller's: log them with their
            // source chain, which the status message alone does not carry.
            tracing::error!(error = &err as &dyn std::error::Error, "request failed");
        }
        let mut status = Status::new(err.code(), err.to_string());
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
