//! The agents `sluice local` starts: their ports, data directories and command lines.
//!
//! The endpoint (`--listen`) is the runner's own; agent `N` (`local-N`) listens on the port
//! after it plus `N`, and on the first peer and metrics ports plus `N`. Port 0 asks for free
//! ports: the client and peer ports are picked here, before any agent starts, because every
//! agent must be told all peers up front and redirects name a real client port.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

/// Most agents `sluice local` runs; a Raft cluster on one machine gains nothing from more.
pub const AGENTS_MAX: u32 = 9;

/// What can be wrong with the flags of `sluice local`.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `--agents` outside `1..=AGENTS_MAX`.
    #[error("--agents: {0} is not between 1 and {AGENTS_MAX}")]
    Agents(u32),
    /// A base port plus the agent number passes 65535.
    #[error("{flag}: port {port} + {agent} for agent {agent} is past 65535")]
    PortRange {
        /// The flag whose port overflowed.
        flag: &'static str,
        /// The base port.
        port: u16,
        /// The agent number.
        agent: u32,
    },
    /// No free port could be reserved.
    #[error("picking a free port on {ip}: {source}")]
    FreePort {
        /// The interface.
        ip: std::net::IpAddr,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
}

/// One agent to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPlan {
    /// `local-N`, whose number is the agent's node id.
    pub name: String,
    /// Its data directory, `<data-dir>/agent-N`.
    pub data_dir: PathBuf,
    /// Client (public API) address.
    pub listen: SocketAddr,
    /// Peer (replication) address; unused by a lone agent.
    pub peer_listen: SocketAddr,
    /// `/metrics` address (port 0: the agent picks and reports it).
    pub metrics_listen: SocketAddr,
    /// Every agent's peer address in order; empty for a lone agent (no cluster mode).
    pub peers: Vec<SocketAddr>,
}

impl AgentPlan {
    /// The `sluice-agent` arguments that start this agent.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["broker".into(), "--data-dir".into()];
        args.push(self.data_dir.clone().into_os_string());
        for (flag, value) in [
            ("--listen", self.listen.to_string()),
            ("--metrics-listen", self.metrics_listen.to_string()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        if !self.peers.is_empty() {
            let peers: Vec<String> = self.peers.iter().map(ToString::to_string).collect();
            for (flag, value) in [
                ("--pod-name", self.name.clone()),
                ("--peers", peers.join(",")),
                ("--peer-listen", self.peer_listen.to_string()),
            ] {
                args.push(flag.into());
                args.push(value.into());
            }
        }
        args
    }

    /// Where this agent's log goes.
    pub fn log_path(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(format!("{}.log", self.name))
    }
}

/// The first agent's client address when the endpoint is `endpoint`: the next port (port 0
/// stays 0, free ports for all).
pub fn first_agent_listen(endpoint: SocketAddr) -> Result<SocketAddr, PlanError> {
    if endpoint.port() == 0 {
        return Ok(endpoint);
    }
    nth(endpoint, 1, "--listen", None)
}

/// The agents for `agents` agents whose first one listens on `listen`, `peer_listen` and
/// `metrics_listen`, with data under `data_dir`.
pub fn plan(
    agents: u32,
    data_dir: &Path,
    listen: SocketAddr,
    peer_listen: SocketAddr,
    metrics_listen: SocketAddr,
) -> Result<Vec<AgentPlan>, PlanError> {
    if !(1..=AGENTS_MAX).contains(&agents) {
        return Err(PlanError::Agents(agents));
    }
    // Reserved free ports stay bound until every one is picked, so none is picked twice.
    let mut held = Vec::new();
    let mut plans = Vec::new();
    for n in 0..agents {
        plans.push(AgentPlan {
            name: format!("local-{n}"),
            data_dir: data_dir.join(format!("agent-{n}")),
            listen: nth(listen, n, "--listen", Some(&mut held))?,
            peer_listen: nth(peer_listen, n, "--peer-listen", Some(&mut held))?,
            // The metrics port is read back from the agent, so 0 can stay 0.
            metrics_listen: nth(metrics_listen, n, "--metrics-listen", None)?,
            peers: Vec::new(),
        });
    }
    if agents > 1 {
        let peers: Vec<SocketAddr> = plans.iter().map(|p| p.peer_listen).collect();
        for plan in &mut plans {
            plan.peers = peers.clone();
        }
    }
    Ok(plans)
}

/// Agent `n`'s address: `base` with its port plus `n`; when the port is 0 and must be known
/// before the agent starts, a free port reserved in `held`.
fn nth(
    base: SocketAddr,
    n: u32,
    flag: &'static str,
    held: Option<&mut Vec<TcpListener>>,
) -> Result<SocketAddr, PlanError> {
    let mut addr = base;
    if base.port() == 0 {
        if let Some(held) = held {
            let listener = reserve(base)?;
            addr.set_port(
                listener
                    .local_addr()
                    .map_err(|source| PlanError::FreePort {
                        ip: base.ip(),
                        source,
                    })?
                    .port(),
            );
            held.push(listener);
        }
        return Ok(addr);
    }
    let port = u32::from(base.port()) + n;
    let port = u16::try_from(port).map_err(|_| PlanError::PortRange {
        flag,
        port: base.port(),
        agent: n,
    })?;
    addr.set_port(port);
    Ok(addr)
}

/// A bound free port. It is released before the agent starts, so another process could take
/// it first; the agent then fails to start and `sluice local` names it, which beats guessing.
fn reserve(on: SocketAddr) -> Result<TcpListener, PlanError> {
    TcpListener::bind(SocketAddr::new(on.ip(), 0)).map_err(|source| PlanError::FreePort {
        ip: on.ip(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("an address")
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn three_agents_get_consecutive_ports_and_the_same_peer_list() {
        let plans = plan(
            3,
            Path::new("/d"),
            addr("127.0.0.1:7070"),
            addr("127.0.0.1:7170"),
            addr("127.0.0.1:9090"),
        )
        .expect("plan");
        assert_eq!(plans.len(), 3);
        assert_eq!(
            strings(&plans[2].args()),
            [
                "broker",
                "--data-dir",
                "/d/agent-2",
                "--listen",
                "127.0.0.1:7072",
                "--metrics-listen",
                "127.0.0.1:9092",
                "--pod-name",
                "local-2",
                "--peers",
                "127.0.0.1:7170,127.0.0.1:7171,127.0.0.1:7172",
                "--peer-listen",
                "127.0.0.1:7172",
            ]
        );
        assert_eq!(
            plans[0].log_path(Path::new("/d")),
            Path::new("/d/local-0.log")
        );
    }

    #[test]
    fn one_agent_runs_without_cluster_flags() {
        let plans = plan(
            1,
            Path::new("/d"),
            addr("127.0.0.1:7070"),
            addr("127.0.0.1:7170"),
            addr("127.0.0.1:9090"),
        )
        .expect("plan");
        assert_eq!(
            strings(&plans[0].args()),
            [
                "broker",
                "--data-dir",
                "/d/agent-0",
                "--listen",
                "127.0.0.1:7070",
                "--metrics-listen",
                "127.0.0.1:9090",
            ]
        );
    }

    #[test]
    fn port_zero_picks_distinct_free_client_and_peer_ports_and_leaves_metrics_to_the_agent() {
        let zero = addr("127.0.0.1:0");
        let plans = plan(3, Path::new("/d"), zero, zero, zero).expect("plan");
        let mut ports: Vec<u16> = plans
            .iter()
            .flat_map(|p| [p.listen.port(), p.peer_listen.port()])
            .collect();
        assert!(ports.iter().all(|&p| p != 0), "{ports:?}");
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6, "six distinct ports: {ports:?}");
        assert!(plans.iter().all(|p| p.metrics_listen.port() == 0));
        assert_eq!(
            plans[1].peers,
            plans.iter().map(|p| p.peer_listen).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_agents_listen_after_the_endpoint() {
        assert_eq!(
            first_agent_listen(addr("127.0.0.1:7070")).expect("next port"),
            addr("127.0.0.1:7071")
        );
        assert_eq!(
            first_agent_listen(addr("127.0.0.1:0")).expect("free ports"),
            addr("127.0.0.1:0")
        );
        assert!(first_agent_listen(addr("127.0.0.1:65535")).is_err());
    }

    #[test]
    fn bad_counts_and_overflowing_ports_are_refused_naming_the_flag() {
        let at = |port: u16| addr(&format!("127.0.0.1:{port}"));
        let err = plan(0, Path::new("/d"), at(1), at(2), at(3)).expect_err("zero agents");
        assert_eq!(err.to_string(), "--agents: 0 is not between 1 and 9");
        let err = plan(3, Path::new("/d"), at(7070), at(65535), at(3)).expect_err("overflow");
        assert_eq!(
            err.to_string(),
            "--peer-listen: port 65535 + 1 for agent 1 is past 65535"
        );
    }
}
