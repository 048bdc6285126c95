//! A cluster of real `sluice-agent` processes for fault tests (three agents, or any number
//! with extra flags such as `--replication-factor`): start, SIGKILL,
//! SIGSTOP/SIGCONT, restart on the same ports and data directory, wipe a data directory, cut an
//! agent off its peers (network namespaces, see [`super::netns`]), and find the leader of a
//! partition group by asking the agents.
//!
//! Every agent keeps its ports for the whole test, so a restarted agent is the same cluster
//! member at the same address; its stderr is kept in memory (and dumped when a test fails).

#![allow(dead_code)] // Each fault test uses a different part of the harness.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sluice_proto::v1::admin_client::AdminClient;
use sluice_proto::v1::consumer_client::ConsumerClient;
use sluice_proto::v1::membership_client::MembershipClient;
use sluice_proto::v1::{
    AgentState, DeclareQueueRequest, DeliveryTag, GetClusterRequest, GetClusterResponse,
    GetQueueStatsRequest, GetQueueStatsResponse, QueueSpec, Settle, SettleAction, SettleRequest,
};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::netns::Namespaces;

/// How long an agent may take to print its listening line (recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Most stderr lines kept per agent (the newest); enough to explain a failure.
const LOG_LINES_MAX: usize = 20_000;
/// Timeout of one probe RPC: a paused agent must not hold up the search for the leader.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// The agent binary under test.
const AGENT_BIN: &str = env!("CARGO_BIN_EXE_sluice-agent");
/// Overrides [`LOG_FILTER`] (e.g. `info` to see openraft's elections).
pub const LOG_FILTER_ENV: &str = "SLUICE_FAULT_TEST_LOG_FILTER";
/// Set (to anything) to print every agent's whole stderr when a test ends, passed or not.
pub const DUMP_LOGS_ENV: &str = "SLUICE_FAULT_TEST_LOGS";
/// Agents in a test cluster.
pub const NODES: usize = 3;
/// Log filter of the agents: the queue layer at info (its `leading` lines), Raft quieter.
const LOG_FILTER: &str = "info,openraft=error,h2=warn,tower=warn,hyper=warn";

/// Where the agents' sockets live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// Every agent on 127.0.0.1 with its own ports.
    Loopback,
    /// Every agent in its own network namespace (so one can be cut off its peers).
    Namespaces,
}

/// One agent of the cluster: its fixed addresses, data directory and (when running) process.
pub struct Node {
    /// Ordinal (also its Raft node id: the pod name is `local-<index>`).
    pub index: usize,
    /// Client gRPC address as the test reaches it.
    pub client: SocketAddr,
    /// Address the agent binds its client port to.
    listen: SocketAddr,
    /// Address the agent binds its metrics port to.
    metrics: SocketAddr,
    /// Address the agent binds its peer port to.
    peer_listen: SocketAddr,
    /// Address the other agents reach its peer port at.
    pub peer: SocketAddr,
    /// Network namespace it runs in, if any.
    namespace: Option<String>,
    /// Its data directory.
    pub data_dir: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Its stderr, newest last, across restarts.
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Whether the process runs (and is not paused).
    pub fn is_up(&self) -> bool {
        self.child.is_some() && !self.paused
    }

    /// Stderr lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        lock(&self.log)
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// `http://<peer address>` (for the peers-only `sluice.peer.v1.Cluster` service).
    pub fn peer_endpoint(&self) -> String {
        format!("http://{}", self.peer_listen)
    }

    fn pid(&self) -> Option<Pid> {
        let child = self.child.as_ref()?;
        i32::try_from(child.id()).ok().map(Pid::from_raw)
    }
}

/// An agent process started by [`Cluster::launch`], not yet known to listen.
struct Launched {
    child: Child,
    /// Its first stdout line (the listening line, if it starts).
    first_line: mpsc::Receiver<Option<std::io::Result<String>>>,
}

/// What an agent said when asked whether it serves a queue's partition 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It leads and serves.
    Leader,
    /// It does not lead; the leader's client address when it knows one.
    Follower(Option<String>),
    /// No answer (down, paused, cut off) or another failure.
    Unreachable(String),
}

/// Three agents forming one cluster.
pub struct Cluster {
    /// The agents, by ordinal.
    pub nodes: Vec<Node>,
    /// How many agents `--peers` names (the bootstrap agents, ordinals `0..bootstrap`).
    bootstrap: usize,
    /// Flags every agent is started with beyond the harness's own (e.g.
    /// `--replication-factor 3`).
    extra_args: Vec<String>,
    peers: String,
    net: Option<Namespaces>,
    channels: Mutex<Vec<Option<Channel>>>,
}

impl Cluster {
    /// Starts three agents under `root` (one data directory each) and waits until all printed
    /// their listening line. `Err` says why the network could not be set up (namespaces only).
    pub fn start(root: &Path, net: Net) -> Result<Cluster, String> {
        Self::start_with(root, net, NODES, &[])
    }

    /// Starts `count` bootstrap agents under `root`, each also given `extra_args` (on every
    /// start, restarts and joining agents included), and waits until all printed their
    /// listening line.
    pub fn start_with(
        root: &Path,
        net: Net,
        count: usize,
        extra_args: &[&str],
    ) -> Result<Cluster, String> {
        let mut cluster = Self::build(root, net, count, extra_args)?;
        // One after another: each waits for its listening line, which an agent without a
        // queues file prints before its peers are up (`start_apart` overlaps them).
        for i in 0..count {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    /// `count` bootstrap agents' addresses and directories, none started.
    fn build(root: &Path, net: Net, count: usize, extra_args: &[&str]) -> Result<Cluster, String> {
        let (net, addresses) = match net {
            Net::Loopback => (None, loopback_addresses_for(count)?),
            Net::Namespaces => {
                let ns = Namespaces::create(count)?;
                let addresses = (0..count).map(|i| ns.addresses(i)).collect();
                (Some(ns), addresses)
            }
        };
        let peers = addresses
            .iter()
            .map(|a| a.peer.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let nodes = addresses
            .into_iter()
            .enumerate()
            .map(|(index, a)| Node {
                index,
                client: a.client,
                listen: a.listen,
                metrics: a.metrics,
                peer_listen: a.peer_listen,
                peer: a.peer,
                namespace: net.as_ref().map(|n| n.name(index)),
                data_dir: root.join(format!("agent-{index}")),
                child: None,
                paused: false,
                log: Arc::default(),
            })
            .collect();
        Ok(Cluster {
            nodes,
            bootstrap: count,
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            peers,
            net,
            channels: Mutex::new(vec![None; count]),
        })
    }

    /// `http://<client address>` of every agent (what the workload clients are given).
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("http://{}", n.client))
            .collect()
    }

    /// Starts agent `i` with its fixed ports and data directory; waits for its listening line.
    pub fn spawn(&mut self, i: usize) -> Result<(), String> {
        let launched = self.launch(i)?;
        self.await_listening(i, launched)
    }

    /// Starts `count` bootstrap agents as [`Cluster::start_with`] does, but agent 0 first and
    /// alone for `alone` before the others: as pods of a StatefulSet that start minutes apart.
    /// Waits until every agent printed its listening line.
    pub fn start_apart(
        root: &Path,
        count: usize,
        extra_args: &[&str],
        alone: Duration,
    ) -> Result<Cluster, String> {
        let mut cluster = Self::build(root, Net::Loopback, count, extra_args)?;
        let first = cluster.launch(0)?;
        std::thread::sleep(alone);
        let rest = (1..count)
            .map(|i| cluster.launch(i).map(|l| (i, l)))
            .collect::<Result<Vec<_>, _>>()?;
        cluster.await_listening(0, first)?;
        for (i, launched) in rest {
            cluster.await_listening(i, launched)?;
        }
        Ok(cluster)
    }

    /// Starts agent `i`'s process without waiting for it; [`Cluster::await_listening`] takes
    /// what this returns.
    fn launch(&self, i: usize) -> Result<Launched, String> {
        let node = &self.nodes[i];
        let mut command = match &node.namespace {
            Some(ns) => {
                // `ip netns exec` execs the agent, so the child's pid is the agent's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(AGENT_BIN);
                c
            }
            None => Command::new(AGENT_BIN),
        };
        command
            .arg("broker")
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--listen", &node.listen.to_string()])
            .args(["--metrics-listen", &node.metrics.to_string()])
            .args(["--pod-name", &format!("local-{i}")])
            .args(["--peers", &self.peers])
            .args(["--peer-listen", &node.peer_listen.to_string()])
            .args(["--advertise", &node.client.to_string()])
            // An ordinal beyond --peers joins an existing cluster (scale-out) and must say
            // where its peers reach it.
            .args(if i >= self.bootstrap {
                vec!["--peer-advertise".to_owned(), node.peer.to_string()]
            } else {
                Vec::new()
            })
            .args(&self.extra_args)
            // A test that chose its own filter (in `extra_args`) keeps it.
            .args(if self.extra_args.iter().any(|a| a == "--log-level") {
                Vec::new()
            } else {
                let filter = std::env::var_os(LOG_FILTER_ENV).unwrap_or_else(|| LOG_FILTER.into());
                vec![std::ffi::OsString::from("--log-level"), filter]
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| format!("agent {i}: spawn: {e}"))?;
        let log = node.log.clone();
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut log = lock(&log);
                    if log.len() >= LOG_LINES_MAX {
                        log.drain(..LOG_LINES_MAX / 2);
                    }
                    log.push(line);
                }
            });
        }
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, first_line) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            // Keep draining so the agent never blocks on a full pipe.
            for _ in lines {}
        });
        Ok(Launched { child, first_line })
    }

    /// Waits for the listening line of agent `i`, started by [`Cluster::launch`].
    fn await_listening(&mut self, i: usize, launched: Launched) -> Result<(), String> {
        let Launched {
            mut child,
            first_line,
        } = launched;
        let node = &self.nodes[i];
        match first_line.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) if line.starts_with("sluice-agent listening ") => {}
            other => {
                let _ = child.kill();
                let status = child.wait().map(|s| format!("{s}")).unwrap_or_default();
                let tail: Vec<String> = {
                    let log = lock(&node.log);
                    log.iter()
                        .skip(log.len().saturating_sub(20))
                        .cloned()
                        .collect()
                };
                return Err(format!(
                    "agent {i} did not start ({other:?}, {status}); stderr tail:\n{}",
                    tail.join("\n")
                ));
            }
        }
        let node = &mut self.nodes[i];
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// Starts one more agent (ordinal `nodes.len()`, beyond `--peers`) on loopback: a joining
    /// agent, which serves its ports and waits to be added (`Membership.AddAgent`). Returns
    /// its ordinal.
    pub fn start_joining(&mut self, root: &Path) -> Result<usize, String> {
        assert!(self.net.is_none(), "joining agents run on loopback only");
        let index = self.nodes.len();
        let a = loopback_addresses_for(1)?
            .pop()
            .ok_or("no addresses for the joining agent")?;
        self.nodes.push(Node {
            index,
            client: a.client,
            listen: a.listen,
            metrics: a.metrics,
            peer_listen: a.peer_listen,
            peer: a.peer,
            namespace: None,
            data_dir: root.join(format!("agent-{index}")),
            child: None,
            paused: false,
            log: Arc::default(),
        });
        lock(&self.channels).push(None);
        self.spawn(index)?;
        Ok(index)
    }

    /// SIGKILL agent `i` and reap it.
    pub fn kill9(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        node.paused = false;
    }

    /// SIGTERM agent `i` (a graceful stop: it hands its leaderships away, drains and exits)
    /// and reaps it; SIGKILL if it has not exited within 60 s.
    pub fn stop(&mut self, i: usize) {
        self.signal(i, Signal::SIGTERM);
        let node = &mut self.nodes[i];
        if let Some(mut child) = node.child.take() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts agent `i` (after [`Cluster::kill9`] or [`Cluster::stop`]) on the same ports and data directory.
    pub fn restart(&mut self, i: usize) {
        if let Err(e) = self.spawn(i) {
            panic!("restart of agent {i}: {e}");
        }
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing.
    pub fn pause(&mut self, i: usize) {
        self.signal(i, Signal::SIGSTOP);
        self.nodes[i].paused = true;
    }

    /// SIGCONT after [`Cluster::pause`].
    pub fn resume(&mut self, i: usize) {
        self.signal(i, Signal::SIGCONT);
        self.nodes[i].paused = false;
    }

    fn signal(&self, i: usize, signal: Signal) {
        let pid = self.nodes[i]
            .pid()
            .unwrap_or_else(|| panic!("agent {i} is not running"));
        kill(pid, signal).unwrap_or_else(|e| panic!("{signal} to agent {i}: {e}"));
    }

    /// Removes agent `i`'s whole data directory (it must be stopped).
    pub fn wipe(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "wipe a stopped agent only");
        let dir = &self.nodes[i].data_dir;
        std::fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("rm -rf {}: {e}", dir.display()));
    }

    /// Cuts agent `i` off its peers (its client port stays reachable from the test).
    pub fn isolate(&mut self, i: usize) {
        let net = self.net.as_ref().expect("isolation needs Net::Namespaces");
        net.set_peer_link(i, false)
            .unwrap_or_else(|e| panic!("isolate agent {i}: {e}"));
        // Live peer connections are not reset by a link going down; the peers must time out.
    }

    /// Undoes [`Cluster::isolate`].
    pub fn heal(&mut self, i: usize) {
        let net = self.net.as_ref().expect("isolation needs Net::Namespaces");
        net.set_peer_link(i, true)
            .unwrap_or_else(|e| panic!("heal agent {i}: {e}"));
    }

    /// The value of one series of agent `i`'s `/metrics` (e.g.
    /// `sluice_raft_groups{state="quiescent"}`); `None` when the agent does not answer or
    /// does not report the series.
    pub async fn metric(&self, i: usize, series: &str) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let node = &self.nodes[i];
        // The metrics port listens on the agent's own address (its namespace's, if any).
        let addr = SocketAddr::new(node.client.ip(), node.metrics.port());
        let fetch = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            let request =
                format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await.ok()?;
            Some(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .ok()??;
        response.lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
    }

    /// A lazily connecting channel to agent `i`'s client port (reused).
    pub fn channel(&self, i: usize) -> Channel {
        let mut channels = lock(&self.channels);
        channels[i]
            .get_or_insert_with(|| channel_to(&format!("http://{}", self.nodes[i].client)))
            .clone()
    }

    /// Asks agent `i` whether it serves partition 0 of `queue`: a settle of a tag that cannot
    /// exist changes nothing, is answered by the leader with a per-tag failure and by any
    /// other replica with UNAVAILABLE naming the leader.
    pub async fn role(&self, i: usize, queue: &str) -> Role {
        if !self.nodes[i].is_up() {
            return Role::Unreachable("not running".into());
        }
        let mut request = tonic::Request::new(SettleRequest {
            queue: queue.into(),
            settle: Some(Settle {
                action: SettleAction::Ack as i32,
                tags: vec![DeliveryTag {
                    partition: 0,
                    offset: u64::MAX,
                    attempt: 1,
                }],
                delay_ms: 0,
            }),
        });
        request.set_timeout(PROBE_TIMEOUT);
        let mut client = ConsumerClient::new(self.channel(i));
        match tokio::time::timeout(PROBE_TIMEOUT, client.settle(request)).await {
            Ok(Ok(_)) => Role::Leader,
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => Role::Follower(
                status
                    .metadata()
                    .get("sluice-leader")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            ),
            Ok(Err(status)) => Role::Unreachable(format!("{status}")),
            Err(_) => Role::Unreachable("probe timed out".into()),
        }
    }

    /// Waits until exactly one of `among` serves `queue` and every other reachable one of them
    /// names it as leader; returns its ordinal.
    pub async fn leader_among(&self, queue: &str, among: &[usize], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let probes = among
                .iter()
                .map(|&i| async move { (i, self.role(i, queue).await) });
            let roles = futures::future::join_all(probes).await;
            let leaders: Vec<usize> = roles
                .iter()
                .filter(|(_, r)| *r == Role::Leader)
                .map(|(i, _)| *i)
                .collect();
            if let [leader] = leaders[..] {
                let address = self.nodes[leader].client.to_string();
                let agreed = roles.iter().all(|(_, r)| match r {
                    Role::Follower(Some(l)) => *l == address,
                    Role::Follower(None) => false,
                    Role::Leader | Role::Unreachable(_) => true,
                });
                if agreed {
                    return leader;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader of {queue} among {among:?} within {timeout:?}: {roles:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// [`Cluster::leader_among`] over every running agent.
    pub async fn leader(&self, queue: &str, timeout: Duration) -> usize {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_up())
            .collect();
        self.leader_among(queue, &up, timeout).await
    }

    /// Waits until one agent has led `queue` for `hold` without a change (past the agents'
    /// hand-off of leadership to the queue's preferred leader); returns it.
    pub async fn settled_leader(&self, queue: &str, hold: Duration, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut current = self.leader(queue, timeout).await;
        let mut since = Instant::now();
        while since.elapsed() < hold {
            assert!(
                Instant::now() < deadline,
                "leadership of {queue} did not settle within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            let leader = self.leader(queue, timeout).await;
            if leader != current {
                current = leader;
                since = Instant::now();
            }
        }
        current
    }

    /// Agent `i`'s own replicas' counters of `queue` (a follower's lag its leader's).
    pub async fn stats(&self, i: usize, queue: &str) -> Result<GetQueueStatsResponse, String> {
        self.stats_with(i, queue, true).await
    }

    /// `queue`'s counters as a client asking agent `i` sees them: every partition's leader's.
    pub async fn client_stats(
        &self,
        i: usize,
        queue: &str,
    ) -> Result<GetQueueStatsResponse, String> {
        self.stats_with(i, queue, false).await
    }

    async fn stats_with(
        &self,
        i: usize,
        queue: &str,
        own_replicas: bool,
    ) -> Result<GetQueueStatsResponse, String> {
        let mut request = tonic::Request::new(GetQueueStatsRequest { name: queue.into() });
        request.set_timeout(Duration::from_secs(2));
        if own_replicas {
            // An agent answers for the partitions it does not lead with their leaders' numbers
            // unless asked for its own replicas' (what these tests compare).
            request.metadata_mut().insert(
                sluice_agent::cluster::client::LOCAL_ONLY_HEADER,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        AdminClient::new(self.channel(i))
            .get_queue_stats(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("agent {i}: {:?}: {}", s.code(), s.message()))
    }

    /// A `sluice.v1.Membership` client of agent `i` (on its reused channel).
    pub fn membership(&self, i: usize) -> MembershipClient<Channel> {
        MembershipClient::new(self.channel(i))
    }

    /// Agent `i`'s `GetCluster` answer (5 s deadline, so a stuck agent fails the call rather
    /// than the test's wait).
    pub async fn get_cluster(&self, i: usize) -> Result<GetClusterResponse, tonic::Status> {
        let mut request = tonic::Request::new(GetClusterRequest {});
        request.set_timeout(Duration::from_secs(5));
        self.membership(i)
            .get_cluster(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Polls agent `i`'s `GetCluster` every 250 ms until `done` holds and returns that view;
    /// fails the test with the last view (or error) after `timeout`. Prints how long `what`
    /// took.
    pub async fn wait_view(
        &self,
        i: usize,
        what: &str,
        timeout: Duration,
        done: impl Fn(&GetClusterResponse) -> bool,
    ) -> GetClusterResponse {
        let started = Instant::now();
        loop {
            let view = self.get_cluster(i).await;
            if let Ok(view) = &view
                && done(view)
            {
                eprintln!("{what} after {:?}", started.elapsed());
                return view.clone();
            }
            assert!(
                started.elapsed() < timeout,
                "{what}: not within {timeout:?}; last view from agent {i}: {view:#?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Declares `spec` through agent 0 (which forwards it to the meta leader), retrying every
    /// 100 ms while the cluster elects its first meta leader; fails the test when it is still
    /// refused after `timeout`.
    pub async fn declare(&self, spec: QueueSpec, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let request = DeclareQueueRequest {
                queue: Some(spec.clone()),
            };
            match AdminClient::new(self.channel(0))
                .declare_queue(request)
                .await
            {
                Ok(_) => return,
                Err(status) => assert!(
                    Instant::now() < deadline,
                    "declare {} failed until the deadline: {status}",
                    spec.name
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Prints the last `n` stderr lines of every agent (for a failing test).
    pub fn dump_logs(&self, n: usize) {
        for node in &self.nodes {
            let log = lock(&node.log);
            eprintln!("---- agent {} stderr (last {n} lines) ----", node.index);
            for line in log.iter().skip(log.len().saturating_sub(n)) {
                eprintln!("[agent {}] {line}", node.index);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os(DUMP_LOGS_ENV).is_some() {
            self.dump_logs(LOG_LINES_MAX);
        } else if std::thread::panicking() {
            self.dump_logs(40);
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // A stopped process dies of SIGKILL too.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // `self.net` drops after this: namespaces go once their processes are gone.
    }
}

/// The four addresses of one agent.
pub struct Addresses {
    /// Client address the test uses (and redirects name).
    pub client: SocketAddr,
    /// Client bind address.
    pub listen: SocketAddr,
    /// Metrics bind address.
    pub metrics: SocketAddr,
    /// Peer address the other agents use.
    pub peer: SocketAddr,
    /// Peer bind address.
    pub peer_listen: SocketAddr,
}

/// Free loopback ports for `nodes` agents, three ports each. Picked by binding port 0 and
/// releasing it: another process could take one in between, which a test would show as a
/// bind error naming the address.
fn loopback_addresses_for(nodes: usize) -> Result<Vec<Addresses>, String> {
    let listeners: Vec<TcpListener> = (0..nodes * 3)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}")))
        .collect::<Result<_, _>>()?;
    let ports: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    Ok(ports
        .chunks(3)
        .map(|p| Addresses {
            client: p[0],
            listen: p[0],
            metrics: p[1],
            peer: p[2],
            peer_listen: p[2],
        })
        .collect())
}

/// A channel that connects on first use, with a short connect timeout.
pub fn channel_to(endpoint: &str) -> Channel {
    Endpoint::from_shared(endpoint.to_owned())
        .unwrap_or_else(|e| panic!("endpoint {endpoint}: {e}"))
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy()
}

/// A queue named `name` with `partitions` partitions and every other field at its default
/// (what [`Cluster::declare`] is usually given).
pub fn queue_spec(name: &str, partitions: u32) -> QueueSpec {
    QueueSpec {
        name: name.into(),
        partitions,
        ..Default::default()
    }
}

/// The state `view` gives agent `node`, or `None` when it is not a member.
pub fn state_of(view: &GetClusterResponse, node: u64) -> Option<AgentState> {
    view.agents
        .iter()
        .find(|a| a.node_id == node)
        .map(|a| a.state())
}

/// Polls `probe` every 50 ms until it returns a value; `None` after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if Instant::now() >= deadline {
            eprintln!("gave up waiting for {what} after {timeout:?}");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking reader thread cannot leave the log half-written in a way that matters.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
