//! `sluice-agent hand-off`: asks the agent running next to it (same pod, same identity flags)
//! to move every Raft leadership it holds to caught-up peers. The StatefulSet runs it as the
//! agent container's `preStop` hook, so leadership leaves before the kubelet's SIGTERM; the
//! agent's own hand-off on SIGTERM stays as the second line (decision 0012).
//!
//! It reads the same `--pod-name`/`--listen` (`SLUICE_POD_NAME`/`SLUICE_LISTEN`) as
//! `sluice-agent broker`, so the pod's env and the broker's flags identify the local agent
//! without any other configuration.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use sluice_proto::v1::HandOffLeadershipRequest;
use sluice_proto::v1::membership_client::MembershipClient;
use tonic::Code;

/// What a hand-off achieved, as the exit status and the line printed say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every leadership the agent held moved (possibly none).
    Done {
        /// Groups whose leadership moved.
        moved: u32,
    },
    /// The agent serves alone: there is no peer to hand anything to.
    Single {
        /// The agent's own explanation.
        message: String,
    },
    /// Some groups are still led by the agent (no caught-up replica to take them yet).
    Incomplete {
        /// Groups whose leadership moved.
        moved: u32,
        /// Groups still led (`<queue>/<partition>` or `meta`).
        remaining: Vec<String>,
    },
}

impl Outcome {
    /// Whether the pod may stop without an election timeout on any group it led.
    pub fn is_success(&self) -> bool {
        !matches!(self, Self::Incomplete { .. })
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done { moved } => {
                write!(
                    f,
                    "handed off {moved} leadership(s); this agent leads nothing"
                )
            }
            Self::Single { message } => {
                write!(f, "nothing to hand off: the agent serves alone ({message})")
            }
            Self::Incomplete { moved, remaining } => write!(
                f,
                "handed off {moved} leadership(s); still leading {}: {}",
                remaining.len(),
                remaining.join(", ")
            ),
        }
    }
}

/// Why a hand-off could not be asked for or answered.
#[derive(Debug, thiserror::Error)]
pub enum HandOffError {
    /// The local agent did not answer within `--timeout`.
    #[error("--timeout: the agent at {address} did not finish the hand-off within {timeout:?}")]
    Timeout {
        /// Where it was asked.
        address: SocketAddr,
        /// The deadline.
        timeout: Duration,
    },
    /// The agent could not be reached.
    #[error("agent at {address}: connect: {}", chain(source))]
    Unreachable {
        /// Where it was asked.
        address: SocketAddr,
        /// Why connecting failed.
        #[source]
        source: tonic::transport::Error,
    },
    /// The agent answered with an error (unknown node id, ...).
    #[error("agent at {address}: {:?}: {}", status.code(), status.message())]
    Refused {
        /// Where it was asked.
        address: SocketAddr,
        /// The agent's answer (its message names the field at fault).
        #[source]
        status: tonic::Status,
    },
}

/// Where to reach an agent listening on `listen`: an unspecified address (`0.0.0.0`, `::`)
/// binds every interface, loopback included, and loopback is what stays up while the pod stops.
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Asks the agent at `address` to hand off every leadership of `node_id`, within `timeout`
/// (connecting included).
pub async fn hand_off(
    address: SocketAddr,
    node_id: u64,
    timeout: Duration,
) -> Result<Outcome, HandOffError> {
    let call = async {
        let unreachable = |source| HandOffError::Unreachable { address, source };
        // `SocketAddr`'s display is always a valid authority; were it not, the URI error is
        // as much a reason the agent cannot be reached as a refused connection.
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(unreachable)?
            .connect_timeout(timeout);
        let channel = endpoint.connect().await.map_err(unreachable)?;
        let mut request = tonic::Request::new(HandOffLeadershipRequest { node_id });
        request.set_timeout(timeout);
        match MembershipClient::new(channel)
            .hand_off_leadership(request)
            .await
        {
            Ok(response) => {
                let response = response.into_inner();
                Ok(if response.remaining.is_empty() {
                    Outcome::Done {
                        moved: response.moved,
                    }
                } else {
                    Outcome::Incomplete {
                        moved: response.moved,
                        remaining: response.remaining,
                    }
                })
            }
            // The agent answers FAILED_PRECONDITION when it is not in cluster mode.
            Err(status) if status.code() == Code::FailedPrecondition => Ok(Outcome::Single {
                message: status.message().to_owned(),
            }),
            Err(status) => Err(HandOffError::Refused { address, status }),
        }
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or(Err(HandOffError::Timeout { address, timeout }))
}

/// `err` and its sources, `: `-separated (tonic's transport error alone says only
/// "transport error").
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_listening_everywhere_is_reached_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:7070".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(local_address(v4).to_string(), "127.0.0.1:7070");
        let v6: SocketAddr = "[::]:7070".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(local_address(v6).to_string(), "[::1]:7070");
        let exact: SocketAddr = "10.1.2.3:7070".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(local_address(exact), exact);
    }

    #[test]
    fn the_outcome_says_what_moved_and_what_remains() {
        let done = Outcome::Done { moved: 3 };
        assert!(done.is_success());
        assert_eq!(
            done.to_string(),
            "handed off 3 leadership(s); this agent leads nothing"
        );
        let single = Outcome::Single {
            message: "not clustered".into(),
        };
        assert!(single.is_success());
        assert!(single.to_string().starts_with("nothing to hand off"));
        let partial = Outcome::Incomplete {
            moved: 1,
            remaining: vec!["orders/0".into(), "meta".into()],
        };
        assert!(!partial.is_success());
        assert!(
            partial
                .to_string()
                .ends_with("still leading 2: orders/0, meta")
        );
    }

    #[tokio::test]
    async fn no_agent_listening_is_an_error_naming_the_address() {
        // Bind then drop: a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let err = hand_off(address, 0, Duration::from_secs(2))
            .await
            .expect_err("nothing listens");
        assert!(err.to_string().contains(&address.to_string()), "{err}");
    }
}
