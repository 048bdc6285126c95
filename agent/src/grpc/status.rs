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
        Status::new(err.code(), err.to_string())
    }
}

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
}
