//! `sluice-operator`: runs the MessageQueue controller under leader election, with `/metrics`,
//! `/healthz` and `/readyz`, until SIGTERM or Ctrl-C.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context as _;
use clap::Parser;
use futures::FutureExt;
use kube::{Client, runtime::events::Reporter};
use sluice_operator::{
    agent_admin::GrpcAgentAdmin,
    controller::{self, Context},
    http::{HttpState, router},
    leader::{self, LeaseConfig},
    metrics::Metrics,
    settings::{AGENT_IMAGE_DEFAULT, Settings},
    telemetry::{self, LogFormat},
};
use tokio::sync::watch;
use tracing::info;

/// Command-line flags; each can also be set through its `SLUICE_OPERATOR_*` variable.
#[derive(Debug, Parser)]
#[command(
    name = "sluice-operator",
    version,
    about = "Reconciles MessageQueue resources into Sluice agent clusters"
)]
struct Args {
    /// Watch only this namespace; all namespaces when unset.
    #[arg(long, env = "SLUICE_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoints.
    #[arg(
        long,
        env = "SLUICE_OPERATOR_HTTP_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    http_listen: SocketAddr,
    /// Contend for a Lease before reconciling (disable only for a single replica in development).
    #[arg(long, env = "SLUICE_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease (the operator's own; the chart sets it from the downward API).
    #[arg(
        long,
        env = "SLUICE_OPERATOR_LEASE_NAMESPACE",
        default_value = "default"
    )]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "SLUICE_OPERATOR_LEASE_NAME",
        default_value = "sluice-operator"
    )]
    lease_name: String,
    /// This replica's identity in the Lease (the chart sets the pod name).
    #[arg(long, env = "SLUICE_OPERATOR_POD_NAME")]
    identity: Option<String>,
    /// Agent image for MessageQueues that do not set `spec.image`.
    #[arg(long, env = "SLUICE_OPERATOR_AGENT_IMAGE", default_value = AGENT_IMAGE_DEFAULT)]
    agent_image: String,
    /// DNS suffix of the cluster, for the agents' peer names.
    #[arg(
        long,
        env = "SLUICE_OPERATOR_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    cluster_domain: String,
    /// Log format.
    #[arg(long, env = "SLUICE_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Log level filter (overridden by `RUST_LOG`).
    #[arg(long, env = "SLUICE_OPERATOR_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            return;
        }
    }
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format, &args.log_level);

    // One shutdown signal shared by the HTTP server, the election and the controller.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested");
        let _ = stop_tx.send(true);
    });
    let stop_flag = stop_rx.clone();
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));

    let listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("binding --http-listen {}", args.http_listen))?;
    let http = axum::serve(
        listener,
        router(HttpState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        }),
    )
    .with_graceful_shutdown(stopped());
    let http = tokio::spawn(async move { http.await });

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .context("no --identity and no HOSTNAME to name this replica in the lease")?;
    let ctx = Arc::new(Context::new(
        client.clone(),
        Settings {
            default_image: args.agent_image.clone(),
            cluster_domain: args.cluster_domain.clone(),
        },
        Arc::new(GrpcAgentAdmin),
        metrics.clone(),
        Reporter {
            controller: "sluice-operator".into(),
            instance: Some(identity.clone()),
        },
    ));
    ready.store(true, Ordering::Relaxed);

    if args.leader_election {
        let config = LeaseConfig {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
            identity,
        };
        let mut leading = leader::elect(client, &config).await?;
        info!(lease = %config.name, "waiting for leadership");
        let became_leader = tokio::select! {
            led = leader::wait_for_leadership(&mut leading) => led,
            _ = stopped() => false,
        };
        if became_leader {
            metrics.is_leader.set(1);
            info!("leading; starting the controller");
            let lost = leader::lost_leadership(leading.clone());
            let stop = futures::future::select(Box::pin(stopped()), Box::pin(lost)).map(|_| ());
            controller::run(ctx, args.namespace.clone(), stop).await;
            metrics.is_leader.set(0);
            // Stopping without a shutdown request means the lease was lost, and another
            // replica may already reconcile: exit so that Kubernetes restarts us as a standby.
            if !*stop_flag.borrow() {
                anyhow::bail!("lost the leader lease {}/{}", config.namespace, config.name);
            }
        }
        drop(leading);
    } else {
        controller::run(ctx, args.namespace.clone(), stopped()).await;
    }

    ready.store(false, Ordering::Relaxed);
    http.await
        .context("HTTP server task")?
        .context("HTTP server")?;
    info!("stopped");
    Ok(())
}
