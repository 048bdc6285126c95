//! A Sluice cluster: several real `sluice-agent broker` processes on loopback, each with its
//! own data directory, replicating to each other over their peer ports.
//!
//! Client and peer ports are fixed before the agents start, because every agent is told all
//! peers' addresses up front and hands its own client address to clients in redirects. An
//! agent that is killed is restarted on the same ports and data directory, as a pod restarted
//! by its StatefulSet would be.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::memory::Memory;
use crate::peers::sluice::{agent_command, spawn_agent};
use crate::process::{ServerProcess, free_port};
use crate::{Error, Result};

/// Largest replication factor the harness asks for (the figure is for three).
pub const REPLICATION_FACTOR_MAX: usize = 3;

/// Agents of one cluster and how to (re)start each.
#[derive(Debug)]
pub struct Cluster {
    program: PathBuf,
    dir: PathBuf,
    /// Every agent's peer endpoint, ordinal order (the `--peers` value).
    peers: String,
    replication_factor: usize,
    ready_timeout: Duration,
    members: Vec<Member>,
}

/// One agent's fixed addresses and, while it runs, its process.
#[derive(Debug)]
struct Member {
    client: SocketAddr,
    peer: SocketAddr,
    process: Option<ServerProcess>,
}

impl Cluster {
    /// Starts `agents` agents of `program` with their data under `dir` and waits until every one
    /// serves. The replication factor is `agents`, at most [`REPLICATION_FACTOR_MAX`].
    pub async fn start(
        program: &Path,
        dir: &Path,
        agents: usize,
        ready_timeout: Duration,
    ) -> Result<Self> {
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let mut members = Vec::with_capacity(agents);
        for _ in 0..agents {
            members.push(Member {
                client: loopback(free_port()?),
                peer: loopback(free_port()?),
                process: None,
            });
        }
        let peers = members
            .iter()
            .map(|m| m.peer.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            program: program.into(),
            dir: dir.into(),
            peers,
            replication_factor: agents.min(REPLICATION_FACTOR_MAX),
            ready_timeout,
            members,
        };
        // All at once: an agent may wait for its peers while it joins the meta group.
        let started =
            futures::future::join_all((0..agents).map(|index| cluster.spawn(index))).await;
        for (index, process) in started.into_iter().enumerate() {
            cluster.members[index].process = Some(process?);
        }
        Ok(cluster)
    }

    /// Starts agent `index` and waits for its listening line.
    async fn spawn(&self, index: usize) -> Result<ServerProcess> {
        let member = &self.members[index];
        let mut command = agent_command(
            &self.program,
            &self.dir.join(format!("agent-{index}")),
            &member.client.to_string(),
        );
        command
            .args(["--pod-name", &format!("local-{index}")])
            .args(["--peers", &self.peers])
            .args(["--peer-listen", &member.peer.to_string()])
            .args(["--replication-factor", &self.replication_factor.to_string()]);
        let log = self.log_path(index);
        let (process, announced) = spawn_agent(command, &log, self.ready_timeout).await?;
        if announced != member.client {
            return Err(process.not_ready(format!(
                "announced grpc={announced}, expected {}",
                member.client
            )));
        }
        Ok(process)
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no agents.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The replication factor the agents were started with.
    pub fn replication_factor(&self) -> usize {
        self.replication_factor
    }

    /// Every agent's client address, ordinal order.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.client).collect()
    }

    /// The agent whose client address is `endpoint` (`http://127.0.0.1:7070` or
    /// `127.0.0.1:7070`, as the client crate reports leaders).
    pub fn index_of(&self, endpoint: &str) -> Option<usize> {
        let addr = endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse::<SocketAddr>()
            .ok()?;
        self.members.iter().position(|m| m.client == addr)
    }

    /// Kills agent `index` with SIGKILL and reaps it.
    pub async fn kill(&mut self, index: usize) -> Result<()> {
        self.member(index)?;
        let process = self.members[index]
            .process
            .take()
            .ok_or_else(|| self.not_running(index, "cannot be killed: it is not running".into()))?;
        process.kill().await;
        Ok(())
    }

    /// Restarts agent `index` (killed earlier) on its ports and data directory and waits until
    /// it serves.
    pub async fn restart(&mut self, index: usize) -> Result<()> {
        if self.member(index)?.process.is_some() {
            return Err(self.not_running(index, "is still running".into()));
        }
        let process = self.spawn(index).await?;
        self.members[index].process = Some(process);
        Ok(())
    }

    /// Process id of agent `index`, while it runs.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.members
            .get(index)?
            .process
            .as_ref()
            .map(ServerProcess::pid)
    }

    /// Where agent `index` writes its log (across restarts).
    pub fn log_path(&self, index: usize) -> PathBuf {
        self.dir.join(format!("agent-{index}.log"))
    }

    /// Stops agent `index` gracefully (SIGTERM, SIGKILL after the grace period) and returns how
    /// long it took to exit.
    pub async fn stop_agent(&mut self, index: usize) -> Result<Duration> {
        self.member(index)?;
        let process = self.members[index].process.take().ok_or_else(|| {
            self.not_running(index, "cannot be stopped: it is not running".into())
        })?;
        let started = std::time::Instant::now();
        process.stop().await;
        Ok(started.elapsed())
    }

    /// Memory of each running agent, ordinal order (`None` for one that is down).
    pub fn memory(&self) -> Result<Vec<Option<Memory>>> {
        self.members
            .iter()
            .map(|m| m.process.as_ref().map(ServerProcess::memory).transpose())
            .collect()
    }

    /// Fails naming the agent and its log when one of the running agents has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        for member in &mut self.members {
            if let Some(process) = &mut member.process {
                process.ensure_running()?;
            }
        }
        Ok(())
    }

    /// Stops every agent (SIGTERM, then SIGKILL after the grace period).
    pub async fn stop(self) {
        let stops = self
            .members
            .into_iter()
            .filter_map(|m| m.process)
            .map(ServerProcess::stop);
        futures::future::join_all(stops).await;
    }

    fn member(&self, index: usize) -> Result<&Member> {
        self.members
            .get(index)
            .ok_or_else(|| self.not_running(index, format!("of {} does not exist", self.len())))
    }

    fn not_running(&self, index: usize, reason: String) -> Error {
        Error::NotReady {
            server: format!("sluice-agent local-{index}"),
            reason: format!("agent {index} {reason}"),
            log: self.log_path(index),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster_of(ports: &[u16]) -> Cluster {
        Cluster {
            program: "sluice-agent".into(),
            dir: "/tmp".into(),
            peers: String::new(),
            replication_factor: 3,
            ready_timeout: Duration::from_secs(1),
            members: ports
                .iter()
                .map(|&port| Member {
                    client: SocketAddr::from(([127, 0, 0, 1], port)),
                    peer: SocketAddr::from(([127, 0, 0, 1], port + 1)),
                    process: None,
                })
                .collect(),
        }
    }

    #[test]
    fn an_agent_is_found_by_its_client_endpoint_with_or_without_scheme() {
        let cluster = cluster_of(&[7000, 7010, 7020]);
        assert_eq!(cluster.index_of("http://127.0.0.1:7010"), Some(1));
        assert_eq!(cluster.index_of("127.0.0.1:7020/"), Some(2));
        assert_eq!(cluster.index_of("127.0.0.1:7001"), None);
        assert_eq!(cluster.index_of("not an address"), None);
    }

    #[tokio::test]
    async fn killing_an_agent_that_is_not_running_names_it_and_its_log() {
        let mut cluster = cluster_of(&[7000]);
        let err = cluster.kill(0).await.expect_err("nothing to kill");
        let text = err.to_string();
        assert!(
            text.contains("agent 0 cannot be killed") && text.contains("agent-0.log"),
            "{text}"
        );
        let err = cluster.kill(5).await.expect_err("no such agent");
        assert!(
            err.to_string().contains("agent 5 of 1 does not exist"),
            "{err}"
        );
    }
}
