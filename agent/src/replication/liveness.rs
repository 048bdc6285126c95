//! [`Liveness`]: one `Alive` exchange per agent pair, standing in for the heartbeats of every
//! quiescent group between the two agents (decision 0025).
//!
//! A peer is watched from the first time a group quiesces with it; from then on this agent
//! sends it an `Alive` every [`ALIVE_INTERVAL`] and reports when it goes silent (no answer, and
//! no `Alive` of its own, for [`SILENT_AFTER`]; twice that after each flap, up to 8 s, while it
//! keeps flapping), when it answers again, and when it answers with another boot id (it
//! restarted, so it leads nothing it led before). The cost is per agent pair, however many
//! groups they share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_proto::peer::v1 as pb;
use sluice_proto::peer::v1::raft_client::RaftClient;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::types::NodeId;

/// How often a watched peer is asked whether it is alive.
pub const ALIVE_INTERVAL: Duration = Duration::from_millis(200);
/// How long one exchange may take before it counts as unanswered.
const ALIVE_TIMEOUT: Duration = Duration::from_millis(400);
/// A peer unanswered for this long is silent: the quiescent groups it led wake and elect.
/// Five exchanges, so one slow answer on a loaded machine does not cost an election; with the
/// election after it, a leader's death is repaired well inside the 2 s failover budget.
pub const SILENT_AFTER: Duration = Duration::from_millis(1000);

/// A peer answering again within this long of going silent flapped.
const FLAP_WITHIN: Duration = Duration::from_secs(30);
/// Longest silence threshold a flapping peer is given.
const MAX_SILENT_AFTER: Duration = Duration::from_secs(8);
/// How long a flapping peer must answer steadily before its threshold halves again.
const CALM: Duration = Duration::from_secs(30);

/// What the watch saw of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    /// No answer for [`SILENT_AFTER`].
    Silent(NodeId),
    /// Answering again after being silent.
    Back(NodeId),
    /// Answered with a boot id other than the one it answered with before.
    Restarted(NodeId),
}

/// The watched peers of this agent. Clones share the watch.
#[derive(Clone)]
pub struct Liveness {
    inner: Arc<Inner>,
}

struct Inner {
    node_id: NodeId,
    boot_id: u64,
    peers: Mutex<HashMap<NodeId, Peer>>,
    /// When each peer's own `Alive` last reached this agent.
    heard: Mutex<HashMap<NodeId, Instant>>,
    events: mpsc::UnboundedSender<PeerEvent>,
}

/// One watched peer.
struct Peer {
    address: String,
    client: RaftClient<Channel>,
    /// Whether its last exchanges went unanswered for [`SILENT_AFTER`].
    silent: Arc<std::sync::atomic::AtomicBool>,
}

impl Liveness {
    /// The watch of agent `node_id`, and the receiver of what it sees.
    pub fn new(node_id: NodeId) -> (Self, mpsc::UnboundedReceiver<PeerEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let liveness = Self {
            inner: Arc::new(Inner {
                node_id,
                boot_id: boot_id(),
                peers: Mutex::new(HashMap::new()),
                heard: Mutex::new(HashMap::new()),
                events,
            }),
        };
        (liveness, rx)
    }

    /// This agent's node id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// This process's boot id, sent in every exchange.
    pub fn boot_id(&self) -> u64 {
        self.inner.boot_id
    }

    /// A client to `node` at `address`, watching it from now on if it was not watched yet (or
    /// moved to another address).
    pub fn watch(&self, node: NodeId, address: &str) -> Option<RaftClient<Channel>> {
        let mut peers = self.lock();
        if let Some(peer) = peers.get(&node)
            && peer.address == address
        {
            return Some(peer.client.clone());
        }
        let channel = match super::network::peer_channel(address) {
            Ok(channel) => channel,
            Err(e) => {
                tracing::warn!(node, address, error = %e, "peer address is no valid endpoint");
                return None;
            }
        };
        let client = super::network::peer_client(channel);
        let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn(watch_peer(
            Arc::downgrade(&self.inner),
            node,
            address.to_string(),
            client.clone(),
            silent.clone(),
        ));
        peers.insert(
            node,
            Peer {
                address: address.to_string(),
                client: client.clone(),
                silent,
            },
        );
        Some(client)
    }

    /// Whether `node` is watched and answering.
    pub fn is_answering(&self, node: NodeId) -> bool {
        self.lock()
            .get(&node)
            .is_some_and(|p| !p.silent.load(std::sync::atomic::Ordering::Acquire))
    }

    /// `node`'s own `Alive` reached this agent: it is running, whatever becomes of this
    /// agent's exchange with it (an overloaded moment can time that out on both sides while
    /// each still hears the other).
    pub fn heard_from(&self, node: NodeId) {
        self.inner
            .heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, Instant::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Peer>> {
        self.inner.peers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Asks `node` every [`ALIVE_INTERVAL`] until the watch is dropped or the peer moved to
/// another address (a newer task watches it there).
async fn watch_peer(
    inner: std::sync::Weak<Inner>,
    node: NodeId,
    address: String,
    mut client: RaftClient<Channel>,
    silent: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut last_answer = Instant::now();
    let mut boot: Option<u64> = None;
    // No answer and no `Alive` of its own for this long: silent. Grows when the peer flaps.
    let mut silent_after = SILENT_AFTER;
    let mut silenced_at: Option<Instant> = None;
    let mut calm_since = Instant::now();
    let mut ticker = tokio::time::interval(ALIVE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let current = {
            let peers = inner.peers.lock().unwrap_or_else(|p| p.into_inner());
            peers.get(&node).is_some_and(|p| p.address == address)
        };
        if !current {
            return;
        }
        let request = pb::AliveRequest {
            node_id: inner.node_id,
            boot_id: inner.boot_id,
        };
        let answer = tokio::time::timeout(ALIVE_TIMEOUT, client.alive(request)).await;
        ALIVE_SENT.inc();
        match answer {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                let gap = last_answer.elapsed();
                last_answer = Instant::now();
                // A gap this long with no answer is a silence too, even if this side never
                // noticed it: this process was stopped (SIGSTOP) or starved meanwhile, and
                // its quiet leaderships may have been taken over. Reported as `Back`, so
                // they wake, heartbeat, and learn of a newer leader at once.
                let was_silent = silent.swap(false, std::sync::atomic::Ordering::AcqRel);
                if was_silent || gap >= SILENT_AFTER {
                    let _ = inner.events.send(PeerEvent::Back(node));
                }
                // A peer back within moments of going silent was not dead but slow (or this
                // agent was): the next silence must last twice as long, so an overloaded
                // moment does not wake and re-elect its groups over and over. Calm halves it.
                if was_silent && silenced_at.is_some_and(|at| at.elapsed() < FLAP_WITHIN) {
                    silent_after = (silent_after * 2).min(MAX_SILENT_AFTER);
                    calm_since = Instant::now();
                } else if silent_after > SILENT_AFTER && calm_since.elapsed() >= CALM {
                    silent_after = (silent_after / 2).max(SILENT_AFTER);
                    calm_since = Instant::now();
                }
                if boot.is_some_and(|b| b != response.boot_id) {
                    let _ = inner.events.send(PeerEvent::Restarted(node));
                }
                boot = Some(response.boot_id);
            }
            Ok(Err(_)) | Err(_) => {
                let heard = inner
                    .heard
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&node)
                    .copied();
                let last_sign = heard.map_or(last_answer, |h| h.max(last_answer));
                if last_sign.elapsed() >= silent_after
                    && !silent.swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    tracing::info!(node, address, ?silent_after, "peer went silent");
                    let _ = inner.events.send(PeerEvent::Silent(node));
                    silenced_at = Some(Instant::now());
                }
            }
        }
    }
}

/// `Alive` exchanges sent, for `/metrics`.
pub static ALIVE_SENT: std::sync::LazyLock<prometheus_client::metrics::counter::Counter> =
    std::sync::LazyLock::new(Default::default);

/// A value that differs between two starts of the agent: the clock's nanoseconds mixed with
/// the process id (two starts within one nanosecond would also need the same pid).
fn boot_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40)
}
