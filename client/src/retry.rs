//! When a failed call is tried again, where, and after how long.
//!
//! In a cluster an agent answers a request for a queue it does not lead with `UNAVAILABLE` and
//! the leader's client address in the [`LEADER_METADATA_KEY`] metadata; while an election is
//! under way it answers `UNAVAILABLE` without it. [`Failure::classify`] sorts every failed call
//! into what the client can safely do next, and [`RetryPolicy`] bounds how often and how fast.

use std::time::Duration;

/// gRPC metadata key naming the leader's client address (`host:port`) in a redirect.
pub const LEADER_METADATA_KEY: &str = "sluice-leader";

/// Attempts per call (the first try included) before the last error is returned: with the
/// backoff below, about 4 s of retrying, which outlasts an election (under 2 s).
pub const MAX_ATTEMPTS_DEFAULT: u32 = 16;

/// Backoff before the first retry; it doubles with every further retry.
pub const BACKOFF_INITIAL_DEFAULT: Duration = Duration::from_millis(25);

/// Ceiling of the backoff: low, so a client notices a newly elected leader within a quarter
/// second instead of sleeping through it.
pub const BACKOFF_MAX_DEFAULT: Duration = Duration::from_millis(250);

/// How many times a call is tried and how long the client waits in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// Backoff before the first retry.
    pub initial_backoff: Duration,
    /// Largest backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: MAX_ATTEMPTS_DEFAULT,
            initial_backoff: BACKOFF_INITIAL_DEFAULT,
            max_backoff: BACKOFF_MAX_DEFAULT,
        }
    }
}

impl RetryPolicy {
    /// No retries: every call is tried once (redirects are not followed either).
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The wait before retry number `retry` (1 = the first retry): exponential, capped, with
    /// "equal jitter" (a random point in the upper half) so that clients failed over by the
    /// same event do not all come back in the same instant.
    pub fn backoff(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(20);
        let full = self
            .initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff);
        let half = full / 2;
        let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::random_range(0..=jitter_nanos))
    }
}

/// Whether resending a call that may already have taken effect is harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// Repeating it changes nothing (admin calls, settles, a publish whose every message
    /// carries an idempotency key, which the agent confirms again but enqueues once).
    Harmless,
    /// Repeating it could enqueue twice: only retried when the first try surely did not
    /// reach a leader (a redirect, a refusal during an election, or no connection at all).
    OnlyIfRefused,
}

/// What a failed attempt says about the next one.
#[derive(Debug)]
pub enum Failure {
    /// The agent does not lead the queue and named the one that does (`http://host:port`).
    Redirect(String, tonic::Status),
    /// The agent refused with `UNAVAILABLE` and no leader: an election is under way.
    NoLeader(tonic::Status),
    /// No connection could be made; nothing was sent.
    Unreachable(crate::Error),
    /// The call's outcome is unknown: the connection broke during it, or the agent answered
    /// `ABORTED` (the queue's leadership moved before the call was confirmed). The agent may
    /// or may not have acted on it.
    Broken(tonic::Status),
    /// Any other answer, returned to the caller as is.
    Final(crate::Error),
}

impl Failure {
    /// Sorts a failed call. A status the server sent carries no source; one made by the
    /// transport does, and tonic marks "could not connect" with [`tonic::ConnectError`].
    pub fn classify(status: tonic::Status) -> Self {
        if let Some(cause) = std::error::Error::source(&status) {
            return if is_connect_error(cause) {
                Self::Unreachable(crate::Error::Status(status))
            } else {
                Self::Broken(status)
            };
        }
        match status.code() {
            tonic::Code::Unavailable => {}
            tonic::Code::Aborted => return Self::Broken(status),
            _ => return Self::Final(crate::Error::Status(status)),
        }
        match leader_of(&status) {
            Some(leader) => Self::Redirect(leader, status),
            None => Self::NoLeader(status),
        }
    }

    /// Whether another attempt may be made for a call of the given kind.
    pub fn is_retryable(&self, resend: Resend) -> bool {
        match self {
            Self::Redirect(..) | Self::NoLeader(_) | Self::Unreachable(_) => true,
            Self::Broken(_) => resend == Resend::Harmless,
            Self::Final(_) => false,
        }
    }

    /// The error handed to the caller when no attempt is left.
    pub fn into_error(self) -> crate::Error {
        match self {
            Self::Redirect(_, status) | Self::NoLeader(status) | Self::Broken(status) => {
                crate::Error::Status(status)
            }
            Self::Unreachable(err) | Self::Final(err) => err,
        }
    }
}

/// The leader endpoint (`http://host:port`) a redirect names, if the metadata holds a usable
/// `host:port`.
pub fn leader_of(status: &tonic::Status) -> Option<String> {
    let value = status.metadata().get(LEADER_METADATA_KEY)?.to_str().ok()?;
    let value = value.trim();
    let (host, port) = value.rsplit_once(':')?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return None;
    }
    Some(format!("http://{value}"))
}

fn is_connect_error(mut err: &(dyn std::error::Error + 'static)) -> bool {
    loop {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        match err.source() {
            Some(next) => err = next,
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(to: &str) -> tonic::Status {
        let mut status = tonic::Status::unavailable("not the leader of queue \"q\"");
        status
            .metadata_mut()
            .insert(LEADER_METADATA_KEY, to.parse().expect("ascii"));
        status
    }

    #[test]
    fn a_redirect_names_the_leader_as_an_http_endpoint() {
        let failure = Failure::classify(redirect("10.0.0.7:7070"));
        assert!(
            matches!(&failure, Failure::Redirect(to, _) if to == "http://10.0.0.7:7070"),
            "{failure:?}"
        );
        assert!(failure.is_retryable(Resend::OnlyIfRefused));
    }

    #[test]
    fn unavailable_without_a_usable_leader_is_an_election() {
        for status in [
            tonic::Status::unavailable("electing"),
            redirect("no-port"),
            redirect(":7070"),
            redirect("host:99999"),
        ] {
            let failure = Failure::classify(status);
            assert!(matches!(failure, Failure::NoLeader(_)), "{failure:?}");
        }
    }

    #[test]
    fn other_server_answers_are_final() {
        let failure = Failure::classify(tonic::Status::not_found("queue \"q\" not found"));
        assert!(!failure.is_retryable(Resend::Harmless));
        assert_eq!(
            failure.into_error().to_string(),
            "queue \"q\" not found (NOT_FOUND)"
        );
    }

    #[test]
    fn a_broken_call_is_retried_only_when_resending_is_harmless() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let status = tonic::Status::from_error(Box::new(io));
        let failure = Failure::classify(status);
        assert!(matches!(failure, Failure::Broken(_)), "{failure:?}");
        assert!(failure.is_retryable(Resend::Harmless));
        assert!(!failure.is_retryable(Resend::OnlyIfRefused));
    }

    #[test]
    fn an_aborted_call_is_of_unknown_outcome_like_a_broken_one() {
        let status = tonic::Status::aborted(
            "partition 0 of queue \"q\" changed leader before entry 16 was confirmed",
        );
        let failure = Failure::classify(status);
        assert!(matches!(failure, Failure::Broken(_)), "{failure:?}");
        assert!(failure.is_retryable(Resend::Harmless));
        assert!(!failure.is_retryable(Resend::OnlyIfRefused));
    }

    #[test]
    fn a_failed_connect_is_unreachable_and_always_retryable() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let status = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let failure = Failure::classify(status);
        assert!(matches!(failure, Failure::Unreachable(_)), "{failure:?}");
        assert!(failure.is_retryable(Resend::OnlyIfRefused));
    }

    #[test]
    fn backoff_doubles_from_25ms_to_a_250ms_ceiling_with_jitter_in_the_upper_half() {
        let policy = RetryPolicy::default();
        for (retry, full_ms) in [(1, 25), (2, 50), (3, 100), (4, 200), (5, 250), (30, 250)] {
            for _ in 0..50 {
                let wait = policy.backoff(retry);
                let full = Duration::from_millis(full_ms);
                assert!(
                    wait >= full / 2 && wait <= full,
                    "retry {retry}: {wait:?} outside {:?}..={full:?}",
                    full / 2
                );
            }
        }
    }
}
