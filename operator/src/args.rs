//! The operator's command line: every flag, with its `SLUICE_OPERATOR_*` variable. In the
//! library (not the binary) so that the chart and image tests parse flags with clap itself.

use std::net::SocketAddr;

use clap::Parser;

use crate::{settings::AGENT_IMAGE_DEFAULT, telemetry::LogFormat};

/// Command-line flags; each can also be set through its `SLUICE_OPERATOR_*` variable.
#[derive(Debug, Parser)]
#[command(
    name = "sluice-operator",
    version,
    about = "Reconciles MessageQueue resources into Sluice agent clusters"
)]
pub struct Args {
    /// Watch only this namespace; all namespaces when unset.
    #[arg(long, env = "SLUICE_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoints.
    #[arg(
        long,
        env = "SLUICE_OPERATOR_HTTP_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub http_listen: SocketAddr,
    /// Contend for a Lease before reconciling (disable only for a single replica in development).
    #[arg(long, env = "SLUICE_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the leader Lease (the operator's own; the chart sets it from the downward API).
    #[arg(
        long,
        env = "SLUICE_OPERATOR_LEASE_NAMESPACE",
        default_value = "default"
    )]
    pub lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "SLUICE_OPERATOR_LEASE_NAME",
        default_value = "sluice-operator"
    )]
    pub lease_name: String,
    /// This replica's identity in the Lease (the chart sets the pod name).
    #[arg(long, env = "SLUICE_OPERATOR_POD_NAME")]
    pub identity: Option<String>,
    /// Agent image for MessageQueues that do not set `spec.image`.
    #[arg(long, env = "SLUICE_OPERATOR_AGENT_IMAGE", default_value = AGENT_IMAGE_DEFAULT)]
    pub agent_image: String,
    /// DNS suffix of the cluster, for the agents' peer names.
    #[arg(
        long,
        env = "SLUICE_OPERATOR_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,
    /// Log format.
    #[arg(long, env = "SLUICE_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// Log level filter (overridden by `RUST_LOG`).
    #[arg(long, env = "SLUICE_OPERATOR_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_flag_definitions_are_consistent() {
        // clap's own check: no duplicate names, defaults that parse, and so on.
        Args::command().debug_assert();
    }

    #[test]
    fn defaults_need_no_flags() {
        let args = Args::try_parse_from(["sluice-operator"]).expect("no flags needed");
        assert!(args.leader_election);
        assert_eq!(args.cluster_domain, "cluster.local");
    }
}
