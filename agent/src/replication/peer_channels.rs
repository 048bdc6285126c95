//! [`PeerChannels`]: one HTTP/2 connection per peer address, shared by every group.
//!
//! Each partition group talks to the same two or four peers. A channel per group and peer
//! meant a TCP connection per group and peer on both sides: 3,000 groups held ~12,000 sockets
//! per agent, ran into the open-files limit on a restart, and paid a keepalive ping per
//! connection while idle. HTTP/2 multiplexes the groups' calls as streams of one connection, as
//! Kafka keeps one replica fetcher per broker pair. The liveness exchange keeps a connection of
//! its own, so a long replication batch never delays the answer that tells a peer is alive.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use sluice_proto::peer::v1::raft_client::RaftClient;
use tonic::transport::Channel;

use super::network::{peer_channel, peer_client};

/// The peer connections of this process, by `host:port`.
#[derive(Debug, Default)]
pub struct PeerChannels {
    by_address: Mutex<HashMap<String, Channel>>,
}

/// Peer addresses this process keeps a replication connection to, for `/metrics`.
pub static CONNECTIONS: LazyLock<prometheus_client::metrics::gauge::Gauge> =
    LazyLock::new(Default::default);

/// The process's channels. One agent runs per process, and a channel is a connection to an
/// address whoever asks, so the registry is process-wide rather than threaded through every
/// group's construction.
static SHARED: LazyLock<PeerChannels> = LazyLock::new(PeerChannels::default);

impl PeerChannels {
    /// The registry every group of this process uses.
    pub fn shared() -> &'static PeerChannels {
        &SHARED
    }

    /// A client on the connection to `address`, made (lazily connecting) on first use. Fails
    /// only for an address that is no valid URI authority.
    pub fn client(&self, address: &str) -> Result<RaftClient<Channel>, tonic::transport::Error> {
        let mut channels = self
            .by_address
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let channel = match channels.get(address) {
            Some(channel) => channel.clone(),
            None => {
                let channel = peer_channel(address)?;
                channels.insert(address.to_string(), channel.clone());
                CONNECTIONS.set(i64::try_from(channels.len()).unwrap_or(i64::MAX));
                channel
            }
        };
        Ok(peer_client(channel))
    }
}
