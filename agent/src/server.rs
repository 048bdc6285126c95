//! Binds the gRPC and metrics listeners, serves, and drains on shutdown.
//!
//! [`run`] takes already-bound listeners, an open broker and the shutdown trigger as a future,
//! so tests and `sluice local` drive it the same way the binary does. Shutdown order matters:
//! health goes NOT_SERVING first (load balancers and probes stop sending), then streams are told
//! to wind down while tonic stops accepting and lets in-flight RPCs finish (their fsyncs
//! included), and only then is the broker shut down, because draining RPCs still need it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use sluice_proto::v1::admin_server::AdminServer;
use sluice_proto::v1::consumer_server::ConsumerServer;
use sluice_proto::v1::membership_server::MembershipServer;
use sluice_proto::v1::publisher_server::PublisherServer;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;

use crate::broker::{Broker, BrokerConfig};
use crate::config::LogConfig;
use crate::error::BrokerError;
use crate::grpc::{
    AdminService, ConsumerService, MAX_DECODING_MESSAGE_BYTES, MembershipService, PublisherService,
};
use crate::metrics::Metrics;
use crate::shutdown;

/// HTTP/2 connection flow-control window of the client port (see where it is set).
const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// How long in-flight RPCs and streams get to finish after shutdown begins before the broker
/// is shut down regardless. Kubernetes' default grace period is 30 s; this leaves headroom.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors that stop the agent from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The data directory could not be opened or recovered.
    #[error("cannot open data directory {}: {source}", path.display())]
    OpenBroker {
        /// The data directory.
        path: PathBuf,
        /// What the broker reported.
        #[source]
        source: BrokerError,
    },
    /// The reflection service could not load the descriptor set.
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The cluster configuration or meta group could not start.
    #[error("cannot join the cluster: {0}")]
    Cluster(#[from] crate::cluster::MetaGroupError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The metrics server failed.
    #[error("metrics server on {addr}: {source}")]
    Metrics {
        /// Its address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// An agent with its listeners bound and its broker open, ready to [`run`](Agent::run).
pub struct Agent {
    listener: TcpListener,
    metrics_listener: TcpListener,
    broker: Arc<Broker>,
    /// In a cluster: the peers-only server, serving until the agent stops.
    peer_server: Option<PeerServer>,
}

/// The peers-only gRPC server (Raft transport and cluster calls) of a clustered agent.
struct PeerServer {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Agent {
    /// Binds both listeners, then opens (recovering) the broker on `data_dir`.
    pub async fn start(
        data_dir: PathBuf,
        log: LogConfig,
        listen: SocketAddr,
        metrics_listen: SocketAddr,
    ) -> Result<Self, ServerError> {
        Self::start_with(data_dir, log, listen, metrics_listen, None).await
    }

    /// Like [`Agent::start`], as one agent of a cluster: also binds the peer port, joins the
    /// meta group and replicates every partition with the other agents.
    pub async fn start_in_cluster(
        data_dir: PathBuf,
        log: LogConfig,
        listen: SocketAddr,
        metrics_listen: SocketAddr,
        cluster: crate::cluster::ClusterConfig,
    ) -> Result<Self, ServerError> {
        Self::start_with(data_dir, log, listen, metrics_listen, Some(cluster)).await
    }

    async fn start_with(
        data_dir: PathBuf,
        log: LogConfig,
        listen: SocketAddr,
        metrics_listen: SocketAddr,
        cluster: Option<crate::cluster::ClusterConfig>,
    ) -> Result<Self, ServerError> {
        let listener = bind(listen).await?;
        let metrics_listener = bind(metrics_listen).await?;
        let mut options = crate::broker::BrokerOptions::files(log);
        let peer_server = match cluster {
            None => None,
            Some(cluster) => {
                let (context, server) = join_cluster(&data_dir, log, cluster).await?;
                options.cluster = Some(context);
                Some(server)
            }
        };
        let config = BrokerConfig {
            data_dir: data_dir.clone(),
            log,
        };
        let broker =
            Broker::open_with(config, options)
                .await
                .map_err(|source| ServerError::OpenBroker {
                    path: data_dir,
                    source,
                })?;
        Ok(Self {
            listener,
            metrics_listener,
            broker,
            peer_server,
        })
    }

    /// The broker, for startup work before serving (declaring the queues file's queues).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The bound gRPC address (with the real port when 0 was asked for).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| unspecified())
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .unwrap_or_else(|_| unspecified())
    }

    /// The machine-readable line announcing the addresses, which tests (and scripts using
    /// port 0) parse: `sluice-agent listening grpc=<addr> metrics=<addr>`, plus
    /// ` peer=<addr>` in a cluster.
    pub fn listening_line(&self) -> String {
        let peer = self
            .peer_server
            .as_ref()
            .map(|p| format!(" peer={}", p.addr))
            .unwrap_or_default();
        format!(
            "sluice-agent listening grpc={} metrics={}{peer}",
            self.grpc_addr(),
            self.metrics_addr()
        )
    }

    /// Serves until `shutdown` resolves, then drains (see [`run`]); a clustered agent keeps
    /// its peer port up until its broker (and its Raft groups) stopped.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let result = run(self.listener, self.metrics_listener, self.broker, shutdown).await;
        if let Some(peer) = self.peer_server {
            let _ = peer.stop.send(());
            // Peers hold long-lived connections to this port; a graceful stop would wait for
            // them, so it gets a moment and then the port just closes.
            let mut task = peer.task;
            match tokio::time::timeout(Duration::from_secs(1), &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "peer server failed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "peer server task failed"),
                Err(_) => task.abort(),
            }
        }
        result
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Binds the peer port and serves it (before the meta group starts, so peers can reach this
/// agent while it forms or joins the group), then joins the meta group.
async fn join_cluster(
    data_dir: &std::path::Path,
    log: LogConfig,
    cluster: crate::cluster::ClusterConfig,
) -> Result<(crate::cluster::ClusterContext, PeerServer), ServerError> {
    let peer_listener = bind(cluster.peer_listen).await?;
    let addr = peer_listener.local_addr().unwrap_or_else(|_| unspecified());
    let groups = crate::replication::RaftGroups::new();
    let meta = Arc::new(crate::cluster::MetaGroup::open(data_dir, &cluster, &groups, log).await?);
    let (liveness, peer_events) = crate::replication::Liveness::new(cluster.node_id);
    let quiescence = crate::replication::Quiescence::start(groups.clone(), liveness, peer_events);
    let raft_service = crate::replication::PeerService::new(groups.clone())
        .with_quiescence(quiescence)
        .into_server();
    let holds = crate::cluster::BalanceHolds::new();
    let cluster_service =
        crate::cluster::peer_service(groups.clone(), (*meta).clone(), holds.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        crate::replication::service::peer_server()
            .add_service(raft_service)
            .add_service(cluster_service)
            .serve_with_incoming_shutdown(
                crate::replication::service::peer_incoming(peer_listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let raft_config = crate::replication::raft_config("partition", cluster.node_id)
        .validate()
        .map_err(|e| ServerError::Cluster(crate::cluster::MetaGroupError::Config(e.to_string())))?;
    let context = crate::cluster::ClusterContext {
        config: cluster,
        groups,
        raft_config: Arc::new(raft_config),
        meta,
        holds,
    };
    Ok((context, PeerServer { addr, stop, task }))
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// State of the HTTP endpoints.
#[derive(Clone)]
struct Http {
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    serving: Arc<AtomicBool>,
}

/// Serves the public API on `listener` and `/metrics` + `/healthz` on `metrics_listener` until
/// `shutdown` resolves; then drains and shuts the broker down.
pub async fn run(
    listener: TcpListener,
    metrics_listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::new());
    let serving = Arc::new(AtomicBool::new(true));
    let (trigger, observer) = shutdown::channel();

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServer<AdminService>>().await;
    health
        .set_serving::<PublisherServer<PublisherService>>()
        .await;
    health
        .set_serving::<ConsumerServer<ConsumerService>>()
        .await;
    health
        .set_serving::<MembershipServer<MembershipService>>()
        .await;
    health.set_service_status("", ServingStatus::Serving).await;
    // Both reflection versions: grpcurl before 1.8.8, grpcio-reflection's client and many
    // other tools still ask `grpc.reflection.v1alpha`.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;

    let admin = AdminService::new(broker.clone(), metrics.clone());
    let publisher = PublisherService::new(broker.clone(), metrics.clone(), observer.clone());
    let consumer = ConsumerService::new(broker.clone(), metrics.clone(), observer.clone());
    // Served by single agents too, which answer FAILED_PRECONDITION (the contract says so).
    let membership = MembershipService::new(broker.clone());

    let http = Http {
        broker: broker.clone(),
        metrics: metrics.clone(),
        serving: serving.clone(),
    };
    let metrics_addr = metrics_listener
        .local_addr()
        .unwrap_or_else(|_| unspecified());
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .with_state(http);
    let mut http_stop = observer.clone();
    let (http_done_tx, http_done_rx) = tokio::sync::oneshot::channel::<()>();
    let http_server = tokio::spawn(async move {
        // The metrics port stays up through the drain so probes and scrapes can watch it; it
        // stops once the broker is down (`http_done`).
        let stop = async move {
            http_stop.recv().await;
            let _ = http_done_rx.await;
        };
        axum::serve(metrics_listener, app)
            .with_graceful_shutdown(stop)
            .await
    });

    let begun = Arc::new(tokio::sync::Notify::new());
    let on_shutdown = {
        let begun = begun.clone();
        let handing_off = broker.clone();
        let health = health.clone();
        let serving = serving.clone();
        async move {
            shutdown.await;
            tracing::info!("draining: health NOT_SERVING, finishing in-flight requests");
            serving.store(false, Ordering::SeqCst);
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health.set_not_serving::<AdminServer<AdminService>>().await;
            health
                .set_not_serving::<PublisherServer<PublisherService>>()
                .await;
            health
                .set_not_serving::<ConsumerServer<ConsumerService>>()
                .await;
            health
                .set_not_serving::<MembershipServer<MembershipService>>()
                .await;
            // Leadership moves before the streams are told to end: a consumer on a partition
            // that moved sees a redirect and follows it; after the drain it would see only
            // the end of its stream.
            handing_off.relinquish_before_stop().await;
            trigger.fire();
            begun.notify_one();
        }
    };

    let grpc = tonic::transport::Server::builder()
        // h2 closes a connection whose small DATA frames pile up unread past a budget of half
        // the connection window: with hyper's 1 MiB that is ~2,000 one-message frames, which a
        // client legally sends in a burst (issue 12). The streams read eagerly; this window
        // gives ~30,000 frames of slack for the moments the agent is not scheduled, at the
        // cost of up to this many request bytes buffered per connection.
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(AdminServer::new(admin).max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES))
        .add_service(
            PublisherServer::new(publisher).max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES),
        )
        .add_service(
            ConsumerServer::new(consumer).max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES),
        )
        .add_service(MembershipServer::new(membership))
        // TCP_NODELAY: a confirm is a small frame; Nagle would hold it for the client's delayed
        // ACK (tonic ignores its own nodelay setting for a caller's listener).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            on_shutdown,
        );
    tokio::pin!(grpc);
    let drain_deadline = async {
        begun.notified().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    let served = tokio::select! {
        result = &mut grpc => result.map_err(ServerError::from),
        _ = drain_deadline => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "drain timed out; closing remaining streams");
            Ok(())
        }
    };

    broker.shutdown().await;
    tracing::info!("broker shut down");
    let _ = http_done_tx.send(());
    let http_result = match http_server.await {
        Ok(result) => result.map_err(|source| ServerError::Metrics {
            addr: metrics_addr,
            source,
        }),
        // The HTTP task only ends by panicking if axum does; report it as an I/O failure.
        Err(join) => Err(ServerError::Metrics {
            addr: metrics_addr,
            source: std::io::Error::other(join),
        }),
    };
    served.and(http_result)
}

async fn scrape(State(http): State<Http>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let body = http.metrics.scrape(&http.broker);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

async fn healthz(State(http): State<Http>) -> (StatusCode, &'static str) {
    if http.serving.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    }
}
