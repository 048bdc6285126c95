//! `sluice cluster`: the cluster's membership through `sluice.v1.Membership`, which any agent
//! serves (it passes changes on to the cluster catalog).

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use anyhow::Context;
use sluice_client::proto::membership_client::MembershipClient;
use sluice_client::proto::{
    AddAgentRequest, AgentState, DrainAgentRequest, GetClusterRequest, GetClusterResponse,
    HandOffLeadershipRequest, RemoveAgentRequest,
};
use tonic::transport::{Channel, Endpoint};

use crate::args::ClusterCommand;

/// How long to wait for an agent to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one call; a hand-off may take a few election rounds per group.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one `sluice cluster` subcommand against the first reachable agent of `endpoints`
/// (comma-separated) and prints its outcome.
pub async fn run(endpoints: &str, command: ClusterCommand) -> anyhow::Result<()> {
    let mut client = MembershipClient::new(connect(endpoints).await?);
    let out = match command {
        ClusterCommand::Status => {
            let response = client
                .get_cluster(request(GetClusterRequest {}))
                .await
                .map_err(sluice_client::Error::from)?;
            status_table(&response.into_inner())
        }
        ClusterCommand::Add {
            node_id,
            peer_address,
            client_address,
        } => {
            let agent = client
                .add_agent(request(AddAgentRequest {
                    node_id,
                    peer_address,
                    client_address,
                }))
                .await
                .map_err(sluice_client::Error::from)?
                .into_inner()
                .agent
                .unwrap_or_default();
            format!("agent {node_id}: {}\n", state_name(agent.state()))
        }
        ClusterCommand::Drain { node_id } => {
            let agent = client
                .drain_agent(request(DrainAgentRequest { node_id }))
                .await
                .map_err(sluice_client::Error::from)?
                .into_inner()
                .agent
                .unwrap_or_default();
            format!("agent {node_id}: {}\n", state_name(agent.state()))
        }
        ClusterCommand::Remove { node_id } => {
            client
                .remove_agent(request(RemoveAgentRequest { node_id }))
                .await
                .map_err(sluice_client::Error::from)?;
            format!("agent {node_id}: removed\n")
        }
        ClusterCommand::Handoff { node_id } => {
            let response = client
                .hand_off_leadership(request(HandOffLeadershipRequest { node_id }))
                .await
                .map_err(sluice_client::Error::from)?
                .into_inner();
            let mut out = format!("agent {node_id}: {} leaderships moved\n", response.moved);
            if !response.remaining.is_empty() {
                let _ = writeln!(
                    out,
                    "still led (no caught-up replica yet): {}",
                    response.remaining.join(", ")
                );
            }
            out
        }
    };
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// A channel to the first of `endpoints` that accepts a connection.
async fn connect(endpoints: &str) -> anyhow::Result<Channel> {
    let mut last = None;
    for endpoint in endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let parsed = Endpoint::from_shared(endpoint.to_owned())
            .with_context(|| format!("--endpoint {endpoint:?}"))?
            .connect_timeout(CONNECT_TIMEOUT);
        match parsed.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => last = Some(anyhow::Error::new(e).context(format!("connect to {endpoint}"))),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("--endpoint: no endpoint given")))
}

/// `ACTIVE` for `AGENT_STATE_ACTIVE`.
fn state_name(state: AgentState) -> &'static str {
    let name = state.as_str_name();
    name.strip_prefix("AGENT_STATE_").unwrap_or(name)
}

fn ids(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "-".to_owned();
    }
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// The agents table, then the partitions table.
fn status_table(cluster: &GetClusterResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<6} {:<9} {:<24} {:<24} {:>8} {:>7}",
        "AGENT", "STATE", "CLIENT", "PEER", "REPLICAS", "LEADS"
    );
    for a in &cluster.agents {
        let _ = writeln!(
            out,
            "{:<6} {:<9} {:<24} {:<24} {:>8} {:>7}",
            a.node_id,
            state_name(a.state()),
            a.client_address,
            a.peer_address,
            a.replicas,
            a.leaders
        );
    }
    let _ = writeln!(out, "replication factor {}", cluster.replication_factor);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:>9} {:>6} {:<12} {:<12} {:<12}",
        "QUEUE", "PARTITION", "LEADER", "VOTERS", "LEARNERS", "IN-SYNC"
    );
    for p in &cluster.partitions {
        let leader = p.leader.map_or("-".to_owned(), |l| l.to_string());
        let _ = writeln!(
            out,
            "{:<24} {:>9} {:>6} {:<12} {:<12} {:<12}",
            p.queue,
            p.partition,
            leader,
            ids(&p.voters),
            ids(&p.learners),
            ids(&p.in_sync)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use sluice_client::proto::{Agent, PartitionPlacement};

    use super::*;

    #[test]
    fn the_status_table_lists_agents_then_partitions() {
        let table = status_table(&GetClusterResponse {
            agents: vec![Agent {
                node_id: 3,
                client_address: "a:7070".into(),
                peer_address: "a:7071".into(),
                state: AgentState::Joining as i32,
                replicas: 2,
                leaders: 0,
            }],
            partitions: vec![PartitionPlacement {
                queue: "orders".into(),
                partition: 1,
                leader: None,
                voters: vec![0, 1, 2],
                learners: vec![3],
                in_sync: vec![],
            }],
            replication_factor: 3,
        });
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("AGENT"), "{table}");
        assert!(lines[1].starts_with("3      JOINING   a:7070"), "{table}");
        assert_eq!(lines[2], "replication factor 3");
        assert!(lines[4].starts_with("QUEUE"), "{table}");
        let row: Vec<&str> = lines[5].split_whitespace().collect();
        assert_eq!(row, ["orders", "1", "-", "0,1,2", "3", "-"]);
    }
}
