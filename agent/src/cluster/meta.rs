//! The meta group: one Raft group named `"meta"` across every agent, whose state is the
//! cluster [`Catalog`] (queues and agents).
//!
//! Every ACTIVE agent is a voter, so the catalog survives any minority of agents; the bootstrap
//! agents form the group, a joining agent is added by the leader (learner, then voter) once the
//! catalog records it (decision 0011). A proposal may be
//! made on any agent: the meta leader commits it itself, any other agent forwards it to the
//! leader over `sluice.peer.v1.Cluster/ProposeMeta` and retries (bounded) while an election is
//! under way. Checks that need the current catalog (a declare that conflicts, a delete of an
//! unknown queue) run on the leader, against a linearizable catalog, so every agent refuses the
//! same things (decision 0009).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{CheckIsLeaderError, ClientWriteError, Fatal, InitializeError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use prost::Message;
use sluice_proto::peer::v1 as pb;
use sluice_proto::peer::v1::meta_command::Command;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::catalog::Catalog;
use super::client::PeerClients;
use super::config::ClusterConfig;
use super::state_machine::CatalogStateMachine;
use crate::config::LogConfig;
use crate::error::BrokerError;
use crate::layout::Layout;
use crate::log::{FileLog, LogError, LogStore};
use crate::queue::spec;
use crate::replication::meta::MetaFile;
use crate::replication::{NodeId, PeerNetwork, Raft, RaftGroups, ReplicatedLog};

/// Name of the meta group in [`RaftGroups`] and on the wire.
pub const META_GROUP: &str = "meta";
/// How long [`MetaGroup::propose`] keeps trying to reach a leader before giving up.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// First pause between proposal attempts (it doubles up to [`PROPOSE_BACKOFF_MAX`]).
const PROPOSE_BACKOFF_MIN: Duration = Duration::from_millis(20);
/// Longest pause between proposal attempts.
const PROPOSE_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How long a proposer waits for its own replica to apply a change the leader committed. Past
/// it the proposal still succeeded; the local catalog just shows it a little later.
const APPLY_WAIT: Duration = Duration::from_secs(5);
/// Longest pause between attempts of the startup `RegisterNode`.
const REGISTER_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why the meta group could not start or a proposal was not committed.
#[derive(Debug, thiserror::Error)]
pub enum MetaGroupError {
    /// The meta log could not be opened.
    #[error("open the meta log in {path}: {source}")]
    OpenLog {
        /// Its directory.
        path: PathBuf,
        /// The storage error.
        #[source]
        source: LogError,
    },
    /// The meta group's Raft metadata file could not be read.
    #[error("open the meta group's raft metadata: {0}")]
    RaftMeta(#[from] crate::replication::meta::ReplicaMetaError),
    /// The openraft configuration was refused.
    #[error("meta group raft configuration: {0}")]
    Config(String),
    /// The meta group's Raft failed (stopped, or its storage failed).
    #[error("meta group raft: {0}")]
    Raft(String),
    /// The proposal is invalid; the broker error names the field (`queue.partitions`).
    #[error("{0}")]
    Invalid(#[source] BrokerError),
    /// A declare named a queue that exists with other settings; nothing changed.
    #[error("queue {queue:?} already exists with different settings: {difference}")]
    QueueConflict {
        /// The queue.
        queue: String,
        /// The first setting that differs.
        difference: String,
    },
    /// A delete named a queue the catalog does not hold; nothing changed.
    #[error("queue {queue:?} not found in the cluster catalog")]
    UnknownQueue {
        /// The queue.
        queue: String,
    },
    /// The leader refused a membership change in the catalog's current state; nothing changed.
    #[error("{reason}")]
    Refused {
        /// The class of refusal (which gRPC code the public API answers).
        code: pb::refused::Code,
        /// What is wrong, naming the agent and the state.
        reason: String,
    },
    /// This agent does not lead the meta group (retryable; `propose` retries it itself).
    #[error("this agent does not lead the meta group{}", leader.map(|l| format!("; node {l} does")).unwrap_or_default())]
    NotLeader {
        /// The leader this agent knows of.
        leader: Option<NodeId>,
    },
    /// The leader could not confirm it still has a quorum (retryable).
    #[error("the meta leader lost its quorum: {0}")]
    NoQuorum(String),
    /// A forwarded proposal failed on the wire or at the leader.
    #[error("forward to the meta leader at {peer}: {status}")]
    Forward {
        /// The leader's peer address.
        peer: String,
        /// The status it (or the transport) returned.
        #[source]
        status: tonic::Status,
    },
    /// The leader answered a forwarded proposal with nothing.
    #[error("the meta leader at {peer} sent an empty ProposeMetaResponse.result")]
    BadResponse {
        /// The leader's peer address.
        peer: String,
    },
    /// No leader committed the proposal in time: the meta group has no quorum.
    #[error("no meta group leader committed the proposal within {}s (last: {last})", PROPOSE_TIMEOUT.as_secs())]
    Unavailable {
        /// The last reason an attempt failed.
        last: String,
    },
}

impl MetaGroupError {
    /// Whether trying again (after an election) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::NotLeader { .. } | Self::NoQuorum(_) => true,
            Self::Forward { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::Unknown
            ),
            _ => false,
        }
    }
}

fn fatal(e: Fatal<NodeId>) -> MetaGroupError {
    MetaGroupError::Raft(e.to_string())
}

/// What the meta group shares between its handles, the service and the register task.
struct Inner {
    /// This agent's node id.
    node_id: NodeId,
    /// The bootstrap agents' peer addresses, by node id.
    peers: Vec<String>,
    /// Replicas per partition: a drain may not leave fewer ACTIVE agents.
    replication_factor: u32,
    raft: Raft,
    state_machine: CatalogStateMachine,
    /// The registry the Raft is served from; the meta group leaves it on shutdown.
    groups: RaftGroups,
    /// Cached connections to other agents' `Cluster` services, for forwarding.
    clients: PeerClients,
    /// The startup `RegisterNode` task, stopped on shutdown.
    register: Mutex<Option<JoinHandle<()>>>,
}

/// This agent's replica of the meta group. Clones share it.
#[derive(Clone)]
pub struct MetaGroup {
    inner: Arc<Inner>,
}

impl MetaGroup {
    /// Opens (or creates) the meta group's replica under `<data_dir>/meta/`, registers it in
    /// `groups` as [`META_GROUP`], forms the group with every peer as a voter if this replica is
    /// new (every agent does so with the same membership; whoever is second finds it formed),
    /// and starts registering this agent's client address in the catalog in the background
    /// (retrying until the group has a leader). A joining agent does neither: the leader adds
    /// its replica as a learner once `AddAgent` recorded it, with its addresses.
    pub async fn open(
        data_dir: &Path,
        cluster: &ClusterConfig,
        groups: &RaftGroups,
        log_config: LogConfig,
    ) -> Result<MetaGroup, MetaGroupError> {
        let dir = Layout::new(data_dir).meta_group_dir();
        let log_dir = dir.join(crate::layout::META_GROUP_LOG_DIR);
        let (log, _recovery) =
            FileLog::open(&log_dir, log_config).map_err(|source| MetaGroupError::OpenLog {
                path: log_dir.clone(),
                source,
            })?;
        let log: Arc<dyn LogStore> = Arc::new(log);
        // A purge floor of 0: nothing of the meta log is ever deleted (decision 0009), so a
        // restart rebuilds the catalog by replaying it.
        let store = ReplicatedLog::open(log, MetaFile::new(&dir), Arc::new(AtomicU64::new(0)))?;
        let config = openraft::Config {
            snapshot_policy: SnapshotPolicy::Never,
            ..crate::replication::raft_config(META_GROUP, cluster.node_id)
        }
        .validate()
        .map_err(|e| MetaGroupError::Config(e.to_string()))?;
        let state_machine = CatalogStateMachine::new();
        let raft = Raft::new(
            cluster.node_id,
            Arc::new(config),
            PeerNetwork::new(META_GROUP),
            store,
            state_machine.clone(),
        )
        .await
        .map_err(fatal)?;
        groups.insert(META_GROUP, raft.clone());
        if !cluster.is_joining() && !raft.is_initialized().await.map_err(fatal)? {
            let members: BTreeMap<NodeId, BasicNode> = cluster
                .peers
                .iter()
                .enumerate()
                .map(|(id, addr)| (id as NodeId, BasicNode::new(addr)))
                .collect();
            match raft.initialize(members).await {
                // NotAllowed: another agent formed the group first and reached this one.
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(MetaGroupError::Raft(e.to_string())),
            }
        }
        let meta = MetaGroup {
            inner: Arc::new(Inner {
                node_id: cluster.node_id,
                peers: cluster.peers.clone(),
                replication_factor: cluster.replication_factor,
                raft,
                state_machine,
                groups: groups.clone(),
                clients: PeerClients::default(),
                register: Mutex::new(None),
            }),
        };
        if !cluster.is_joining() {
            let task = tokio::spawn(register(
                Arc::downgrade(&meta.inner),
                cluster.node_id,
                cluster.advertise.clone(),
            ));
            *lock(&meta.inner.register) = Some(task);
        }
        Ok(meta)
    }

    /// The catalog, updated whenever this replica applies committed changes.
    pub fn catalog(&self) -> watch::Receiver<Arc<Catalog>> {
        self.inner.state_machine.catalog()
    }

    /// This replica's Raft handle (metrics, leadership).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// This agent's node id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The catalog as of the last change this replica applied.
    pub fn current(&self) -> Arc<Catalog> {
        self.inner.state_machine.current()
    }

    /// The peer address of `node`: from the meta group's membership (which carries the
    /// address of every member and learner), else the catalog, else `--peers`.
    pub fn peer_address(&self, node: NodeId) -> Option<String> {
        let from_membership = self
            .inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node)
            .map(|n| n.addr.clone());
        from_membership
            .or_else(|| {
                self.current()
                    .agents
                    .get(&node)
                    .map(|a| a.peer_address.clone())
            })
            .or_else(|| {
                usize::try_from(node)
                    .ok()
                    .and_then(|i| self.inner.peers.get(i).cloned())
            })
    }

    /// The replication factor this agent was configured with.
    pub fn replication_factor(&self) -> u32 {
        self.inner.replication_factor
    }

    /// Commits `command` to the catalog from any agent and returns once this agent's own
    /// catalog shows it (or, rarely, after a bounded wait for that). A declare's spec is
    /// validated and completed with defaults first; re-declaring the same settings succeeds
    /// without change, other settings fail with [`MetaGroupError::QueueConflict`]. Deleting a queue
    /// the catalog does not hold fails with [`MetaGroupError::UnknownQueue`]. While the group
    /// elects a leader the call retries for up to [`PROPOSE_TIMEOUT`], then fails with
    /// [`MetaGroupError::Unavailable`].
    pub async fn propose(&self, command: pb::MetaCommand) -> Result<(), MetaGroupError> {
        let command = self.validate(command)?;
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        let mut backoff = PROPOSE_BACKOFF_MIN;
        // Every failed attempt says why, for the error when time runs out.
        let mut last: String;
        loop {
            let leader = self.inner.raft.metrics().borrow().current_leader;
            let attempt = match leader {
                Some(id) if id == self.inner.node_id => {
                    self.propose_as_leader(&command).await.map(Some)
                }
                Some(id) => self.forward(id, &command).await,
                None => Ok(None),
            };
            match attempt {
                Ok(Some(raft_index)) => {
                    self.wait_applied(raft_index).await;
                    return Ok(());
                }
                Ok(None) => {
                    last = match leader {
                        Some(id) => format!("node {id} is no longer the meta leader"),
                        None => "an election is under way".to_owned(),
                    }
                }
                Err(e) if e.is_retryable() => last = e.to_string(),
                Err(e) => return Err(e),
            }
            if Instant::now() + backoff > deadline {
                return Err(MetaGroupError::Unavailable { last });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(PROPOSE_BACKOFF_MAX);
        }
    }

    /// Checks a command (from this agent or a peer) and completes a declare's spec with its
    /// defaults, so equal settings compare equal in the catalog.
    pub fn validate(&self, command: pb::MetaCommand) -> Result<pb::MetaCommand, MetaGroupError> {
        let invalid = |field: &str, reason: String| {
            MetaGroupError::Invalid(BrokerError::InvalidArgument {
                field: field.to_owned(),
                reason,
            })
        };
        let command = match command.command {
            None => return Err(invalid("command", "is missing".to_owned())),
            Some(Command::DeclareQueue(pb::DeclareQueue { spec: None })) => {
                return Err(invalid("declare_queue.spec", "is missing".to_owned()));
            }
            Some(Command::DeclareQueue(pb::DeclareQueue { spec: Some(s) })) => {
                let s = spec::effective_spec(&s).map_err(MetaGroupError::Invalid)?;
                Command::DeclareQueue(pb::DeclareQueue { spec: Some(s) })
            }
            Some(Command::DeleteQueue(d)) => {
                spec::validate_name("delete_queue.name", &d.name)
                    .map_err(MetaGroupError::Invalid)?;
                Command::DeleteQueue(d)
            }
            Some(Command::RegisterNode(r)) => {
                if r.node_id as usize >= self.inner.peers.len() {
                    return Err(invalid(
                        "register_node.node_id",
                        format!(
                            "{} is not a member (node ids 0..{})",
                            r.node_id,
                            self.inner.peers.len()
                        ),
                    ));
                }
                if r.client_address.trim().is_empty() {
                    return Err(invalid(
                        "register_node.client_address",
                        "must not be empty".to_owned(),
                    ));
                }
                Command::RegisterNode(r)
            }
            Some(Command::AddAgent(a)) => {
                for (field, value) in [
                    ("add_agent.peer_address", &a.peer_address),
                    ("add_agent.client_address", &a.client_address),
                ] {
                    super::config::split_host_port(value)
                        .map_err(|reason| invalid(field, format!("{value:?}: {reason}")))?;
                }
                Command::AddAgent(a)
            }
            Some(Command::SetAgentState(s)) => {
                match sluice_proto::v1::AgentState::try_from(s.state) {
                    Ok(sluice_proto::v1::AgentState::Unspecified) | Err(_) => {
                        return Err(invalid(
                            "set_agent_state.state",
                            format!("{} is not an agent state", s.state),
                        ));
                    }
                    Ok(_) => {}
                }
                Command::SetAgentState(s)
            }
            Some(Command::RemoveAgent(r)) => Command::RemoveAgent(r),
        };
        Ok(pb::MetaCommand {
            command: Some(command),
        })
    }

    /// Commits a validated command as the meta leader and returns its Raft index. Fails with
    /// [`MetaGroupError::NotLeader`] when this agent does not lead.
    pub async fn propose_as_leader(
        &self,
        command: &pb::MetaCommand,
    ) -> Result<u64, MetaGroupError> {
        let raft = &self.inner.raft;
        // A new leader may not have applied everything committed before its term yet; checking
        // against that catalog could refuse (or let through) the wrong thing.
        raft.ensure_linearizable().await.map_err(|e| match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
                MetaGroupError::NotLeader {
                    leader: f.leader_id,
                }
            }
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
                MetaGroupError::NoQuorum(q.to_string())
            }
            RaftError::Fatal(f) => fatal(f),
        })?;
        check(
            &self.inner.state_machine.current(),
            command,
            self.inner.replication_factor,
        )?;
        let data = Bytes::from(command.encode_to_vec());
        let response = raft.client_write(data).await.map_err(|e| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                MetaGroupError::NotLeader {
                    leader: f.leader_id,
                }
            }
            RaftError::APIError(other) => MetaGroupError::Raft(other.to_string()),
            RaftError::Fatal(f) => fatal(f),
        })?;
        // Two different declares of one queue may both pass the check above while racing;
        // the catalog keeps the first committed, so the loser learns it here.
        if let Some(Command::DeclareQueue(pb::DeclareQueue { spec: Some(wanted) })) =
            &command.command
            && let Some(existing) = self.inner.state_machine.current().queues.get(&wanted.name)
            && let Some(difference) = spec::difference(existing, wanted)
        {
            return Err(MetaGroupError::QueueConflict {
                queue: wanted.name.clone(),
                difference,
            });
        }
        Ok(response.log_id.index)
    }

    /// Sends a proposal to the leader `leader`: the committed Raft index, `None` when it is no
    /// longer the leader.
    async fn forward(
        &self,
        leader: NodeId,
        command: &pb::MetaCommand,
    ) -> Result<Option<u64>, MetaGroupError> {
        let Some(peer) = self.peer_address(leader) else {
            // A leader this replica knows no address of has not reached it yet: treat it as
            // an election in progress rather than failing the proposal.
            return Ok(None);
        };
        let peer = &peer;
        use pb::propose_meta_response::Result as R;
        let response = self
            .inner
            .clients
            .propose(peer, command.clone())
            .await
            .map_err(|status| MetaGroupError::Forward {
                peer: peer.clone(),
                status,
            })?;
        match response.result {
            Some(R::Committed(c)) => Ok(Some(c.raft_index)),
            Some(R::NotLeader(_)) => Ok(None),
            Some(R::QueueConflict(c)) => Err(MetaGroupError::QueueConflict {
                queue: c.queue,
                difference: c.difference,
            }),
            Some(R::UnknownQueue(u)) => Err(MetaGroupError::UnknownQueue { queue: u.queue }),
            Some(R::Refused(r)) => Err(MetaGroupError::Refused {
                code: r.code(),
                reason: r.reason,
            }),
            None => Err(MetaGroupError::BadResponse { peer: peer.clone() }),
        }
    }

    async fn wait_applied(&self, raft_index: u64) {
        let waited = self
            .inner
            .raft
            .wait(Some(APPLY_WAIT))
            .applied_index_at_least(Some(raft_index), "meta proposal applied locally")
            .await;
        if let Err(e) = waited {
            tracing::warn!(raft_index, error = %e, "a committed meta change is not applied here yet");
        }
    }

    /// Stops the startup registration and this replica's Raft, and stops serving it.
    pub async fn shutdown(&self) -> Result<(), MetaGroupError> {
        if let Some(task) = lock(&self.inner.register).take() {
            task.abort();
        }
        self.inner.groups.remove(META_GROUP);
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| MetaGroupError::Raft(e.to_string()))
    }
}

/// The leader-side checks that need the catalog.
fn check(
    catalog: &Catalog,
    command: &pb::MetaCommand,
    replication_factor: u32,
) -> Result<(), MetaGroupError> {
    use pb::refused::Code;
    use sluice_proto::v1::AgentState;
    let refused = |code: Code, reason: String| Err(MetaGroupError::Refused { code, reason });
    match &command.command {
        Some(Command::DeclareQueue(pb::DeclareQueue { spec: Some(wanted) })) => {
            if let Some(existing) = catalog.queues.get(&wanted.name)
                && let Some(difference) = spec::difference(existing, wanted)
            {
                return Err(MetaGroupError::QueueConflict {
                    queue: wanted.name.clone(),
                    difference,
                });
            }
        }
        Some(Command::DeleteQueue(d)) if !catalog.queues.contains_key(&d.name) => {
            return Err(MetaGroupError::UnknownQueue {
                queue: d.name.clone(),
            });
        }
        Some(Command::AddAgent(a)) => {
            if let Some(known) = catalog.agents.get(&a.node_id)
                && (known.peer_address != a.peer_address
                    || known.client_address != a.client_address)
            {
                return refused(
                    Code::AlreadyExists,
                    format!(
                        "agent {} is already a member with peer address {:?} and client address {:?}",
                        a.node_id, known.peer_address, known.client_address
                    ),
                );
            }
            if let Some((other, _)) = catalog.agents.iter().find(|(id, other)| {
                **id != a.node_id
                    && (other.peer_address == a.peer_address
                        || (!other.client_address.is_empty()
                            && other.client_address == a.client_address))
            }) {
                return refused(
                    Code::AlreadyExists,
                    format!(
                        "agent {other} already uses peer address {:?} or client address {:?}",
                        a.peer_address, a.client_address
                    ),
                );
            }
        }
        Some(Command::SetAgentState(s)) if s.state == AgentState::Draining as i32 => {
            let Some(known) = catalog.agents.get(&s.node_id) else {
                return refused(
                    Code::NotFound,
                    format!("agent {} is not a member of the cluster", s.node_id),
                );
            };
            if !matches!(known.state, AgentState::Draining | AgentState::Drained) {
                let remaining = catalog
                    .agents
                    .iter()
                    .filter(|(id, a)| **id != s.node_id && a.state == AgentState::Active)
                    .count();
                if remaining < replication_factor as usize {
                    return refused(
                        Code::FailedPrecondition,
                        format!(
                            "draining agent {} would leave {remaining} ACTIVE agents, fewer than the replication factor {replication_factor}",
                            s.node_id
                        ),
                    );
                }
            }
        }
        Some(Command::RemoveAgent(r)) => {
            if let Some(known) = catalog.agents.get(&r.node_id)
                && known.state != AgentState::Drained
            {
                return refused(
                    Code::FailedPrecondition,
                    format!(
                        "agent {} is {} and still holds replicas; drain it first",
                        r.node_id,
                        known.state.as_str_name()
                    ),
                );
            }
        }
        _ => {}
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Records this agent's client address in the catalog, retrying until the group has a leader.
/// Holds the group weakly so a dropped group ends the task.
async fn register(meta: Weak<Inner>, node_id: NodeId, advertise: String) {
    let command = pb::MetaCommand {
        command: Some(Command::RegisterNode(pb::RegisterNode {
            node_id,
            client_address: advertise.clone(),
        })),
    };
    let mut backoff = PROPOSE_BACKOFF_MIN;
    loop {
        let Some(inner) = meta.upgrade() else { return };
        let group = MetaGroup { inner };
        let current = group.inner.state_machine.current();
        if current.client_address(node_id).as_ref() == Some(&advertise)
            || current.removed.contains(&node_id)
        {
            return;
        }
        match group.propose(command.clone()).await {
            Ok(()) => {
                tracing::info!(node_id, %advertise, "registered in the cluster catalog");
                return;
            }
            Err(e) if e.is_retryable() || matches!(e, MetaGroupError::Unavailable { .. }) => {
                tracing::debug!(error = %e, "registering in the cluster catalog; retrying");
            }
            Err(e) => {
                tracing::error!(error = %e, "could not register in the cluster catalog");
                return;
            }
        }
        drop(group);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(REGISTER_BACKOFF_MAX);
    }
}
