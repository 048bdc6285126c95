//! Publishes a deep backlog of 256-byte messages through `Broker` on `FileLog` and prints the
//! confirmed-publish throughput and the process RSS, then reopens the directory (replay) and
//! prints the RSS again.
//!
//! ```text
//! cargo run --release -p sluice-agent --example broker_backlog -- [messages] [always|never] [partitions]
//! ```

use std::sync::Arc;
use std::time::Instant;

use sluice_agent::broker::{Broker, BrokerConfig};
use sluice_agent::config::{FsyncPolicy, LogConfig};
use sluice_proto::v1::{Message, QueueSpec, Settle, SettleAction};

const BATCH: usize = 2_000;
const PUBLISHERS: usize = 4;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let total: usize = args.get(1).map_or(Ok(1_000_000), |s| s.parse())?;
    let fsync = match args.get(2).map(String::as_str) {
        Some("always") => FsyncPolicy::Always,
        _ => FsyncPolicy::Never,
    };
    let partitions: u32 = args.get(3).map_or(Ok(1), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let config = BrokerConfig {
        data_dir: dir.path().to_path_buf(),
        log: LogConfig {
            fsync,
            ..LogConfig::default()
        },
    };
    let broker = Broker::open(config.clone()).await?;
    broker
        .declare(QueueSpec {
            name: "deep".into(),
            partitions,
            ..QueueSpec::default()
        })
        .await?;
    let start = Instant::now();
    let per_publisher = total / PUBLISHERS;
    let mut tasks = Vec::new();
    for _ in 0..PUBLISHERS {
        let broker = Arc::clone(&broker);
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < per_publisher {
                let n = BATCH.min(per_publisher - sent);
                let batch = (0..n)
                    .map(|_| Message {
                        payload: vec![7u8; 256],
                        ..Message::default()
                    })
                    .collect();
                let confirms = broker.publish("deep", batch).await?;
                anyhow::ensure!(confirms.iter().all(Result::is_ok), "a publish failed");
                sent += n;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let published = per_publisher * PUBLISHERS;
    println!(
        "published {published} x 256 B ({fsync:?}, {partitions} partition(s)) in {secs:.1} s: {:.0} msg/s confirmed; RSS {:.0} MiB",
        published as f64 / secs,
        rss_mib()
    );
    let stats = broker.stats("deep")?;
    println!("ready {}", stats.total.map_or(0, |t| t.ready));
    broker.shutdown().await;
    drop(broker);
    let start = Instant::now();
    let broker = Broker::open(config).await?;
    let stats = broker.stats("deep")?;
    println!(
        "reopened (replayed) in {:.1} s: ready {}; RSS {:.0} MiB",
        start.elapsed().as_secs_f64(),
        stats.total.map_or(0, |t| t.ready),
        rss_mib()
    );
    // Consume + ack (batched) a slice of the backlog.
    let consume = (total / 5).min(500_000);
    let mut sub = broker.subscribe("deep", 1_000, "bench").await?;
    let start = Instant::now();
    let mut tags = Vec::with_capacity(500);
    for _ in 0..consume {
        let Some(delivery) = sub.next().await else {
            break;
        };
        tags.extend(delivery.tag);
        if tags.len() == 500 {
            let settle = Settle {
                action: SettleAction::Ack as i32,
                tags: std::mem::take(&mut tags),
                delay_ms: 0,
            };
            anyhow::ensure!(sub.settle(settle).await?.is_empty(), "an ack failed");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "consumed and acked {consume} in {secs:.1} s: {:.0} msg/s; RSS {:.0} MiB",
        consume as f64 / secs,
        rss_mib()
    );
    Ok(())
}
