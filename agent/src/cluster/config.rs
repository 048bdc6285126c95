//! Who this agent is within its cluster, and who its peers are, from the flags the operator sets.
//!
//! A StatefulSet gives every pod a stable name ending in its ordinal (`orders-2`), and the
//! operator passes every pod's peer endpoint in ordinal order, so a node id is both the number
//! after the pod name's last `-` and a position in `--peers`. Everything is checked here, once, so
//! a mis-set pod fails at start with a message naming the flag instead of joining the wrong group.
//!
//! The agents listed in `--peers` are the *bootstrap* agents: they form the cluster. An agent
//! whose ordinal is beyond `--peers` is a *joining* agent (scale-out): it forms nothing, serves
//! its peer port at `--peer-advertise`, and waits until a `Membership.AddAgent` call makes the
//! leaders replicate to it (decision 0011).

use std::net::SocketAddr;

use crate::config::{BrokerArgs, ordinal};

/// Replicas per partition when `--replication-factor` is not given (fewer agents: all of them).
pub const REPLICATION_FACTOR_DEFAULT: u32 = 3;

/// The cluster-mode settings of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This agent's node id: its ordinal (its position in `peers` for a bootstrap agent).
    pub node_id: u64,
    /// The bootstrap agents' peer (replication) endpoints, `host:port`, in node-id order.
    pub peers: Vec<String>,
    /// Where peers reach this agent: its `peers` entry, or `--peer-advertise` for a joining
    /// agent.
    pub peer_advertise: String,
    /// Where this agent's peers-only gRPC service listens.
    pub peer_listen: SocketAddr,
    /// This agent's client address, handed to clients in redirects.
    pub advertise: String,
    /// Replicas per partition, `1..=peers.len()`.
    pub replication_factor: u32,
}

/// Why the cluster flags do not describe a valid cluster; each names the flag at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterConfigError {
    /// The pod name does not end in `-<ordinal>`.
    #[error(
        "--pod-name {pod_name:?}: no ordinal after the last '-' (expected a StatefulSet pod name such as \"sluice-0\")"
    )]
    PodNameWithoutOrdinal {
        /// The name given.
        pod_name: String,
    },
    /// `--peers` lists no endpoint.
    #[error("--peers: no peer endpoints given")]
    NoPeers,
    /// The ordinal has no entry in `--peers` (a joining agent) and no `--peer-advertise` says
    /// where its peers reach it.
    #[error(
        "--pod-name {pod_name:?}: ordinal {node_id} is beyond --peers (ordinals 0..{peers}), so this agent joins an existing cluster and needs --peer-advertise <host:port> (where its peers reach it)"
    )]
    JoiningWithoutPeerAdvertise {
        /// The pod name.
        pod_name: String,
        /// Its ordinal.
        node_id: u64,
        /// How many peers are listed.
        peers: usize,
    },
    /// An entry of `--peers` is empty (as in `a:1,,b:2`).
    #[error("--peers[{position}]: empty entry")]
    EmptyPeer {
        /// Its position (= the node id it would be).
        position: usize,
    },
    /// An entry of `--peers` is not `host:port`.
    #[error("--peers[{position}] {value:?}: {reason}")]
    BadPeer {
        /// Its position.
        position: usize,
        /// The entry.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Two entries of `--peers` name the same endpoint.
    #[error("--peers[{position}] {value:?}: same endpoint as --peers[{first}]")]
    DuplicatePeer {
        /// The later position.
        position: usize,
        /// The earlier one.
        first: usize,
        /// The endpoint.
        value: String,
    },
    /// `--peer-advertise` is not `host:port`.
    #[error("--peer-advertise {value:?}: {reason}")]
    BadPeerAdvertise {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A bootstrap agent's `--peer-advertise` differs from its `--peers` entry (the cluster
    /// was formed with that entry, so peers would reach it at two addresses).
    #[error(
        "--peer-advertise {value:?}: differs from this agent's entry --peers[{node_id}] {entry:?}"
    )]
    PeerAdvertiseMismatch {
        /// The value given.
        value: String,
        /// This agent's node id.
        node_id: u64,
        /// Its `--peers` entry.
        entry: String,
    },
    /// A joining agent's `--peer-advertise` is a bootstrap agent's endpoint.
    #[error("--peer-advertise {value:?}: same endpoint as --peers[{position}]")]
    PeerAdvertiseTaken {
        /// The value given.
        value: String,
        /// The bootstrap agent's position.
        position: usize,
    },
    /// `--advertise` is not `host:port`.
    #[error("--advertise {value:?}: {reason}")]
    BadAdvertise {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The replication factor is 0 or larger than the number of agents.
    #[error("--replication-factor {value}: must be between 1 and the number of peers ({peers})")]
    BadReplicationFactor {
        /// The value given.
        value: u32,
        /// How many peers are listed.
        peers: usize,
    },
}

impl ClusterConfig {
    /// The cluster this agent belongs to, or `None` without `--peers` (a single agent).
    /// The cluster flags are checked here, together, by [`ClusterConfig::new`] (pod ordinal,
    /// each `host:port`, the ordinal within the peers, the factor within the peers), so one
    /// parser owns their syntax; its errors name the flag. The binary reports them as usage
    /// errors, like clap's own.
    pub fn from_args(args: &BrokerArgs) -> Result<Option<Self>, ClusterConfigError> {
        if args.peers.is_empty() {
            return Ok(None);
        }
        // clap's `requires` makes `--peers` without `--pod-name` a usage error before this.
        let pod_name = args.pod_name.as_deref().unwrap_or_default();
        Self::with_peer_advertise(
            pod_name,
            args.peers.clone(),
            args.peer_listen,
            args.peer_advertise.clone(),
            args.advertise.clone(),
            args.listen,
            args.replication_factor,
        )
        .map(Some)
    }

    /// [`ClusterConfig::with_peer_advertise`] without `--peer-advertise`: a bootstrap agent.
    pub fn new(
        pod_name: &str,
        peers: Vec<String>,
        peer_listen: SocketAddr,
        advertise: Option<String>,
        client_listen: SocketAddr,
        replication_factor: Option<u32>,
    ) -> Result<Self, ClusterConfigError> {
        Self::with_peer_advertise(
            pod_name,
            peers,
            peer_listen,
            None,
            advertise,
            client_listen,
            replication_factor,
        )
    }

    /// Checks the cluster flags and derives the node id, this agent's peer address (its
    /// `--peers` entry, or `peer_advertise` for a joining agent, which must give it), the
    /// advertised client address (default: this agent's peer host with the port of
    /// `client_listen`) and the replication factor (default: `min(3, peers)`).
    pub fn with_peer_advertise(
        pod_name: &str,
        peers: Vec<String>,
        peer_listen: SocketAddr,
        peer_advertise: Option<String>,
        advertise: Option<String>,
        client_listen: SocketAddr,
        replication_factor: Option<u32>,
    ) -> Result<Self, ClusterConfigError> {
        let node_id =
            ordinal(pod_name).ok_or_else(|| ClusterConfigError::PodNameWithoutOrdinal {
                pod_name: pod_name.to_owned(),
            })?;
        let peers = check_peers(peers)?;
        let entry = usize::try_from(node_id).ok().and_then(|i| peers.get(i));
        let peer_advertise = match peer_advertise.map(|v| v.trim().to_owned()) {
            Some(value) => {
                split_host_port(&value).map_err(|reason| ClusterConfigError::BadPeerAdvertise {
                    value: value.clone(),
                    reason,
                })?;
                match entry {
                    Some(entry) if *entry != value => {
                        return Err(ClusterConfigError::PeerAdvertiseMismatch {
                            value,
                            node_id,
                            entry: entry.clone(),
                        });
                    }
                    Some(_) => {}
                    None => {
                        if let Some(position) = peers.iter().position(|p| *p == value) {
                            return Err(ClusterConfigError::PeerAdvertiseTaken { value, position });
                        }
                    }
                }
                value
            }
            None => {
                entry
                    .cloned()
                    .ok_or_else(|| ClusterConfigError::JoiningWithoutPeerAdvertise {
                        pod_name: pod_name.to_owned(),
                        node_id,
                        peers: peers.len(),
                    })?
            }
        };
        let own = &peer_advertise;
        let advertise = match advertise {
            Some(value) => {
                let value = value.trim().to_owned();
                split_host_port(&value).map_err(|reason| ClusterConfigError::BadAdvertise {
                    value: value.clone(),
                    reason,
                })?;
                value
            }
            None => {
                // Checked by check_peers, so the split cannot fail; keep the error path anyway.
                let (host, _) =
                    split_host_port(own).map_err(|reason| ClusterConfigError::BadAdvertise {
                        value: own.clone(),
                        reason,
                    })?;
                if host.contains(':') {
                    format!("[{host}]:{}", client_listen.port())
                } else {
                    format!("{host}:{}", client_listen.port())
                }
            }
        };
        let count = peers.len();
        let replication_factor = replication_factor.unwrap_or_else(|| {
            REPLICATION_FACTOR_DEFAULT.min(u32::try_from(count).unwrap_or(u32::MAX))
        });
        if replication_factor == 0 || replication_factor as usize > count {
            return Err(ClusterConfigError::BadReplicationFactor {
                value: replication_factor,
                peers: count,
            });
        }
        Ok(Self {
            node_id,
            peers,
            peer_advertise,
            peer_listen,
            advertise,
            replication_factor,
        })
    }

    /// The bootstrap agents' node ids, `0..peers.len()`.
    pub fn node_ids(&self) -> Vec<u64> {
        (0..self.peers.len() as u64).collect()
    }

    /// Whether this agent joins an existing cluster (its ordinal is beyond `--peers`): it
    /// initialises no Raft group and waits to be added.
    pub fn is_joining(&self) -> bool {
        usize::try_from(self.node_id).map_or(true, |i| i >= self.peers.len())
    }

    /// The peer endpoint of bootstrap agent `node_id`, if it is one.
    pub fn peer(&self, node_id: u64) -> Option<&str> {
        usize::try_from(node_id)
            .ok()
            .and_then(|i| self.peers.get(i))
            .map(String::as_str)
    }
}

fn check_peers(peers: Vec<String>) -> Result<Vec<String>, ClusterConfigError> {
    if peers.is_empty() {
        return Err(ClusterConfigError::NoPeers);
    }
    let mut out: Vec<String> = Vec::with_capacity(peers.len());
    for (position, peer) in peers.into_iter().enumerate() {
        let value = peer.trim().to_owned();
        if value.is_empty() {
            return Err(ClusterConfigError::EmptyPeer { position });
        }
        split_host_port(&value).map_err(|reason| ClusterConfigError::BadPeer {
            position,
            value: value.clone(),
            reason,
        })?;
        if let Some(first) = out.iter().position(|p| *p == value) {
            return Err(ClusterConfigError::DuplicatePeer {
                position,
                first,
                value,
            });
        }
        out.push(value);
    }
    Ok(out)
}

/// Splits `host:port` (`[v6]:port` for IPv6 literals); the reason names what is wrong.
pub(crate) fn split_host_port(value: &str) -> Result<(&str, u16), String> {
    if value.contains("://") {
        return Err("expected host:port without a scheme".to_owned());
    }
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port, found no ':'".to_owned())?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .ok_or_else(|| "IPv6 host opens '[' without closing ']'".to_owned())?,
        None if host.contains(':') => {
            return Err("an IPv6 host must be written in brackets, as [::1]:7071".to_owned());
        }
        None => host,
    };
    if host.is_empty() {
        return Err("empty host".to_owned());
    }
    if let Some(c) = host
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '/' | '@' | '?' | '#'))
    {
        return Err(format!("character {c:?} not allowed in a host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("port {port:?} is not a number in 1..=65535"))?;
    if port == 0 {
        return Err("port 0 is not an address peers can reach".to_owned());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn peers(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn config(pod: &str, list: &[&str]) -> Result<ClusterConfig, ClusterConfigError> {
        ClusterConfig::new(
            pod,
            peers(list),
            addr("0.0.0.0:7071"),
            None,
            addr("0.0.0.0:7070"),
            None,
        )
    }

    const THREE: [&str; 3] = [
        "orders-0.orders-peers:7071",
        "orders-1.orders-peers:7071",
        "orders-2.orders-peers:7071",
    ];

    #[test]
    fn the_node_id_is_the_ordinal_and_defaults_derive_from_the_peers() {
        let c = config("orders-2", &THREE).expect("valid");
        assert_eq!(c.node_id, 2);
        assert_eq!(c.advertise, "orders-2.orders-peers:7070");
        assert_eq!(c.replication_factor, 3);
        assert_eq!(c.node_ids(), vec![0, 1, 2]);
        assert_eq!(c.peer(1), Some("orders-1.orders-peers:7071"));
        assert_eq!(c.peer(3), None);
    }

    #[test]
    fn the_default_replication_factor_is_at_most_the_number_of_peers() {
        let c = config("local-0", &["127.0.0.1:7071"]).expect("valid");
        assert_eq!(c.replication_factor, 1);
        let five = ["a:1", "b:1", "c:1", "d:1", "e:1"];
        assert_eq!(config("x-4", &five).expect("valid").replication_factor, 3);
    }

    #[test]
    fn an_explicit_advertise_address_and_factor_are_kept() {
        let c = ClusterConfig::new(
            "local-1",
            peers(&["127.0.0.1:7071", "[::1]:7072"]),
            addr("127.0.0.1:7072"),
            Some("localhost:7170".into()),
            addr("127.0.0.1:7070"),
            Some(2),
        )
        .expect("valid");
        assert_eq!(c.advertise, "localhost:7170");
        assert_eq!(c.replication_factor, 2);
    }

    #[test]
    fn the_advertised_default_of_an_ipv6_peer_keeps_its_brackets() {
        let c = config("n-0", &["[::1]:7071"]).expect("valid");
        assert_eq!(c.advertise, "[::1]:7070");
    }

    #[test]
    fn a_pod_name_without_an_ordinal_is_refused() {
        for pod in ["orders", "orders-", "orders-a1", "-", ""] {
            assert_eq!(
                config(pod, &THREE),
                Err(ClusterConfigError::PodNameWithoutOrdinal {
                    pod_name: pod.into()
                }),
                "{pod:?}"
            );
        }
        let e = config("orders", &THREE).expect_err("refused");
        assert!(e.to_string().starts_with("--pod-name \"orders\""), "{e}");
    }

    fn joining(pod: &str, peer_advertise: &str) -> Result<ClusterConfig, ClusterConfigError> {
        ClusterConfig::with_peer_advertise(
            pod,
            peers(&THREE),
            addr("0.0.0.0:7071"),
            Some(peer_advertise.into()),
            None,
            addr("0.0.0.0:7070"),
            None,
        )
    }

    #[test]
    fn an_ordinal_beyond_the_peers_without_a_peer_advertise_address_is_refused() {
        let e = config("orders-3", &THREE).expect_err("refused");
        assert_eq!(
            e,
            ClusterConfigError::JoiningWithoutPeerAdvertise {
                pod_name: "orders-3".into(),
                node_id: 3,
                peers: 3
            }
        );
        assert!(e.to_string().contains("needs --peer-advertise"), "{e}");
    }

    #[test]
    fn an_ordinal_beyond_the_peers_with_a_peer_advertise_address_is_a_joining_agent() {
        let c = joining("orders-3", "orders-3.orders-peers:7071").expect("valid");
        assert!(c.is_joining());
        assert_eq!(c.node_id, 3);
        assert_eq!(c.peer_advertise, "orders-3.orders-peers:7071");
        assert_eq!(c.advertise, "orders-3.orders-peers:7070");
        assert_eq!(c.peer(3), None);
        let bootstrap = config("orders-1", &THREE).expect("valid");
        assert!(!bootstrap.is_joining());
        assert_eq!(bootstrap.peer_advertise, THREE[1]);
    }

    #[test]
    fn a_peer_advertise_address_must_be_host_port_and_fit_the_peers() {
        let e = joining("orders-3", "nohost").expect_err("refused");
        assert!(
            e.to_string().starts_with("--peer-advertise \"nohost\""),
            "{e}"
        );
        assert_eq!(
            joining("orders-3", THREE[2]),
            Err(ClusterConfigError::PeerAdvertiseTaken {
                value: THREE[2].into(),
                position: 2
            })
        );
        assert_eq!(
            joining("orders-1", "elsewhere:7071"),
            Err(ClusterConfigError::PeerAdvertiseMismatch {
                value: "elsewhere:7071".into(),
                node_id: 1,
                entry: THREE[1].into()
            })
        );
        assert!(joining("orders-1", THREE[1]).is_ok());
    }

    #[test]
    fn empty_and_missing_peer_entries_are_refused() {
        assert_eq!(config("a-0", &[]), Err(ClusterConfigError::NoPeers));
        assert_eq!(
            config("a-0", &["a:1", " ", "c:1"]),
            Err(ClusterConfigError::EmptyPeer { position: 1 })
        );
    }

    #[test]
    fn peer_entries_that_are_not_host_port_are_refused_naming_the_entry() {
        let cases = [
            ("nohost", "no ':'"),
            (":7071", "empty host"),
            ("a:", "not a number"),
            ("a:70000", "not a number"),
            ("a:0", "port 0"),
            ("::1:7071", "brackets"),
            ("[::1:7071", "without closing"),
            ("http://a:1", "without a scheme"),
            ("a b:1", "not allowed"),
        ];
        for (value, reason) in cases {
            match config("a-0", &["ok:1", value]) {
                Err(ClusterConfigError::BadPeer {
                    position: 1,
                    value: v,
                    reason: r,
                }) => {
                    assert_eq!(v, value);
                    assert!(r.contains(reason), "{value:?}: {r}");
                }
                other => panic!("{value:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn duplicate_peers_are_refused() {
        assert_eq!(
            config("a-0", &["a:1", "b:1", "a:1"]),
            Err(ClusterConfigError::DuplicatePeer {
                position: 2,
                first: 0,
                value: "a:1".into()
            })
        );
    }

    #[test]
    fn a_bad_advertise_address_is_refused() {
        let e = ClusterConfig::new(
            "a-0",
            peers(&["a:1"]),
            addr("0.0.0.0:7071"),
            Some("a-host".into()),
            addr("0.0.0.0:7070"),
            None,
        )
        .expect_err("refused");
        assert!(matches!(e, ClusterConfigError::BadAdvertise { .. }), "{e}");
        assert!(e.to_string().starts_with("--advertise \"a-host\""), "{e}");
    }

    #[test]
    fn a_replication_factor_of_zero_or_above_the_peers_is_refused() {
        for value in [0, 4] {
            let e = ClusterConfig::new(
                "a-0",
                peers(&THREE),
                addr("0.0.0.0:7071"),
                None,
                addr("0.0.0.0:7070"),
                Some(value),
            )
            .expect_err("refused");
            assert_eq!(
                e,
                ClusterConfigError::BadReplicationFactor { value, peers: 3 }
            );
        }
    }
}
