//! `sluice-operator`: runs the MessageQueue controller under leader election, with `/metrics`,
//! `/healthz` and `/readyz`, until SIGTERM or Ctrl-C.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use clap::Parser;
use futures::FutureExt;
use kube::{Client, runtime::events::Reporter};
use sluice_operator::{
    agent_admin::GrpcAgentAdmin,
    args::Args,
    context::Context,
    controller,
    http::{HttpState, router},
    leader::{self, LeaseConfig},
    metrics::Metrics,
    settings::Settings,
    telemetry,
};
use tokio::sync::watch;
use tracing::info;

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
