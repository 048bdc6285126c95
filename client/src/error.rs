//! The client's error type.

/// Result with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong talking to Sluice.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint is not a valid URI.
    #[error("invalid endpoint {endpoint:?}: {}", chain(source))]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },
    /// The connection could not be established.
    #[error("cannot connect to {endpoint}: {}", chain(source))]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The transport failure.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server answered with an error status. Not marked `#[source]`: the message already
    /// says everything the status does, and error-chain printers would repeat it.
    #[error("{} ({})", .0.message(), code_name(.0.code()))]
    Status(tonic::Status),
    /// One message of a publish was refused; the others of the batch may have been confirmed.
    #[error("message {index} rejected: {message} ({})", code_name(*code))]
    Rejected {
        /// Position of the message in the batch.
        index: usize,
        /// The gRPC code of the failure.
        code: tonic::Code,
        /// Why, as the server said.
        message: String,
    },
    /// A client was built from an empty list of endpoints.
    #[error("no endpoint given")]
    NoEndpoints,
    /// A stream ended (server shut down or connection lost) before the answer arrived.
    #[error("the {0} stream closed before answering")]
    Closed(&'static str),
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Self::Status(status)
    }
}

impl Error {
    /// The gRPC code of a server-side failure, if this is one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status(status) => Some(status.code()),
            Self::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The canonical upper-case name of a gRPC code, as in the proto docs (`NOT_FOUND`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `err` and its sources joined with `: `, since transport errors put the useful part
/// ("connection refused") in the source chain.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(next) = source {
        out.push_str(": ");
        out.push_str(&next.to_string());
        source = next.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_errors_read_as_message_then_code() {
        let err = Error::from(tonic::Status::not_found("queue \"x\" not found"));
        assert_eq!(err.to_string(), "queue \"x\" not found (NOT_FOUND)");
        assert_eq!(err.code(), Some(tonic::Code::NotFound));
        assert!(
            std::error::Error::source(&err).is_none(),
            "a status must not repeat itself as a source in `{{err:#}}` output"
        );
        let err = Error::Rejected {
            index: 2,
            code: tonic::Code::ResourceExhausted,
            message: "messages[2].payload: too large".into(),
        };
        assert_eq!(
            err.to_string(),
            "message 2 rejected: messages[2].payload: too large (RESOURCE_EXHAUSTED)"
        );
    }
}
