//! The harness end to end against real servers: an in-process Sluice agent serving gRPC on
//! loopback, and every peer server this machine has installed.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use sluice_agent::config::LogConfig;
use sluice_agent::server::Agent;
use sluice_bench::config::Args;
use sluice_bench::peers::sluice::SluiceDriver;
use sluice_bench::process::find_program;
use sluice_bench::report::Outcome;
use sluice_bench::suite::{self, Target};
use sluice_bench::workload::{self, Shape};

const SHAPE: Shape = Shape {
    producers: 2,
    consumers: 2,
    batch: 50,
    window: 4,
    prefetch: 100,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_driver_publishes_consumes_and_times_confirms_through_a_real_agent() {
    // Start: a real agent on loopback port 0 with a temporary data directory.
    let dir = tempfile::tempdir().expect("temp dir");
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let agent = Agent::start(
        dir.path().join("data"),
        LogConfig::default(),
        any_port,
        any_port,
    )
    .await
    .expect("agent starts");
    let addr = agent.grpc_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(agent.run(async move {
        let _ = stopped.await;
    }));

    // Publish 1,000 confirmed messages, then consume and ack all of them.
    let driver = SluiceDriver::connect(addr, Bytes::from(vec![7u8; 256]), 1, 4)
        .await
        .expect("connects");
    let published = workload::publish(&driver, 1_000, SHAPE)
        .await
        .expect("publishes");
    assert_eq!(published.messages, 1_000);
    assert!(published.per_sec() > 0.0);
    let consumed = tokio::time::timeout(
        Duration::from_secs(60),
        workload::consume(&driver, 1_000, SHAPE),
    )
    .await
    .expect("consume finishes")
    .expect("consumes");
    assert_eq!(consumed.messages, 1_000);

    // Open-loop latency: every scheduled message is confirmed and timed.
    let latency = workload::confirm_latency(&driver, 500, Duration::from_secs(1), SHAPE)
        .await
        .expect("latency phase runs");
    assert!(
        (450..=500).contains(&latency.count()),
        "{} messages timed",
        latency.count()
    );

    let _ = stop.send(());
    serving
        .await
        .expect("agent task")
        .expect("agent stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_installed_peer_is_measured_and_a_missing_one_is_reported_not_installed() {
    // A tiny run of all peers; Sluice is pointed at a binary that does not exist.
    let args = Args::try_parse_from([
        "sluice-bench",
        "--messages",
        "400",
        "--latency-secs",
        "1",
        "--agent-bin",
        "/nonexistent/sluice-agent",
    ])
    .expect("flags parse");
    let rows = suite::run_table(&args).await;
    let targets = Target::selected(&args);
    assert_eq!(rows.len(), targets.len());

    for (row, target) in rows.iter().zip(&targets) {
        assert_eq!(row.system, target.label());
        let installed = match target {
            Target::Sluice | Target::SluiceCluster(_) => false,
            Target::RabbitQuorum | Target::RabbitClassic => {
                find_program(sluice_bench::peers::rabbitmq::SERVER_PROGRAM).is_some()
                    && find_program("epmd").is_some()
            }
            Target::Nats => find_program("nats-server").is_some(),
            Target::Redis => find_program("redis-server").is_some(),
        };
        match &row.outcome {
            Outcome::Measured(m) => {
                assert!(installed, "{} measured without being installed", row.system);
                assert_eq!(m.publish.messages, 400);
                assert_eq!(m.consume.messages, 400);
                assert!(
                    m.p99.is_some() && m.peak_rss_bytes > 0,
                    "{}: {m:?}",
                    row.system
                );
            }
            Outcome::NotInstalled(what) => {
                assert!(
                    !installed,
                    "{} installed but reported missing ({what})",
                    row.system
                );
            }
            Outcome::Failed(error) => panic!("{} failed: {error}", row.system),
        }
    }
    let Outcome::NotInstalled(what) = &rows[0].outcome else {
        panic!("Sluice row should be not installed: {:?}", rows[0].outcome);
    };
    assert!(
        what.contains("/nonexistent/sluice-agent") && what.contains("cargo build"),
        "{what}"
    );
}
