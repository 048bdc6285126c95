//! The subcommands that talk to an agent through `sluice-client`.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::Context;
use sluice_client::proto::{Message, QueueSpec, Stats};
use sluice_client::{Client, tag};

use crate::args::{Consume, Declare, Publish};

/// Messages per request when publishing standard input.
const STDIN_BATCH: usize = 1000;

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `sluice declare`.
pub async fn declare(client: &Client, args: Declare) -> anyhow::Result<()> {
    let max_payload_bytes = match args.max_payload_bytes {
        Some(bytes) => u32::try_from(bytes)
            .map_err(|_| anyhow::anyhow!("--max-payload-bytes: {bytes} is over 4 GiB"))?,
        None => 0,
    };
    let spec = QueueSpec {
        name: args.queue,
        partitions: args.partitions.unwrap_or(0),
        ack_timeout_ms: args.ack_timeout.map(millis).unwrap_or(0),
        max_deliveries: args.max_deliveries.unwrap_or(0),
        dead_letter_queue: args.dead_letter_queue.unwrap_or_default(),
        message_ttl_ms: args.ttl.map(millis).unwrap_or(0),
        max_backlog_messages: args.max_backlog_messages.unwrap_or(0),
        max_backlog_bytes: args.max_backlog_bytes.unwrap_or(0),
        overflow: 0,
        priorities: args.priorities,
        dedup_window_ms: args.dedup_window.map(millis).unwrap_or(0),
        max_payload_bytes,
    };
    let response = client.declare_queue(spec).await?;
    let queue = response.queue.unwrap_or_default();
    let verb = if response.created {
        "created"
    } else {
        "already exists with these settings"
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "queue {:?} {verb}", queue.name)?;
    writeln!(out, "{}", describe(&queue))?;
    Ok(())
}

/// One line summarising a queue's settings.
fn describe(q: &QueueSpec) -> String {
    let dlq = if q.dead_letter_queue.is_empty() {
        "-"
    } else {
        &q.dead_letter_queue
    };
    let ttl = if q.message_ttl_ms == 0 {
        "never".to_owned()
    } else {
        humantime::format_duration(Duration::from_millis(q.message_ttl_ms)).to_string()
    };
    format!(
        "partitions={} ack-timeout={} max-deliveries={} dead-letter-queue={dlq} ttl={ttl} priorities={}",
        q.partitions,
        humantime::format_duration(Duration::from_millis(q.ack_timeout_ms)),
        q.max_deliveries,
        q.priorities,
    )
}

/// `sluice publish`: prints one confirmed id (`partition:offset`) per message.
pub async fn publish(client: &Client, args: Publish) -> anyhow::Result<()> {
    let template = Message {
        payload: Default::default(),
        headers: args.headers.iter().cloned().collect(),
        ordering_key: args.key.clone().unwrap_or_default(),
        priority: args.priority.unwrap_or(0),
        delay_ms: args.delay.map(millis).unwrap_or(0),
        ttl_ms: args.ttl.map(millis).unwrap_or(0),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
    };
    let make = |payload: String| Message {
        payload: payload.into_bytes(),
        ..template.clone()
    };
    if !args.messages.is_empty() {
        let batch = args.messages.into_iter().map(make).collect();
        return publish_batch(client, &args.queue, batch).await;
    }
    let stdin = std::io::stdin();
    let mut batch = Vec::with_capacity(STDIN_BATCH);
    for line in stdin.lock().lines() {
        batch.push(make(line.context("reading standard input")?));
        if batch.len() == STDIN_BATCH {
            publish_batch(client, &args.queue, std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        publish_batch(client, &args.queue, batch).await?;
    }
    Ok(())
}

async fn publish_batch(client: &Client, queue: &str, batch: Vec<Message>) -> anyhow::Result<()> {
    let confirms = client.publish(queue, batch).await?;
    let mut out = std::io::stdout().lock();
    for confirm in confirms {
        let id = confirm.id.unwrap_or_default();
        let duplicate = if confirm.duplicate {
            " (duplicate)"
        } else {
            ""
        };
        writeln!(out, "{}:{}{duplicate}", id.partition, id.offset)?;
    }
    Ok(())
}

/// `sluice consume`: prints each payload on its own line and acks it (unless `--no-ack`).
pub async fn consume(client: &Client, args: Consume) -> anyhow::Result<()> {
    let mut consumer = client.subscribe(&args.queue, args.prefetch).await?;
    let mut received = 0u64;
    let mut unprinted = None;
    while args.count.is_none_or(|count| received < count) {
        let next = consumer.next();
        let delivery = match args.idle_timeout {
            Some(idle) => match tokio::time::timeout(idle, next).await {
                Ok(delivery) => delivery?,
                Err(_) => break,
            },
            None => tokio::select! {
                delivery = next => delivery?,
                _ = tokio::signal::ctrl_c() => break,
            },
        };
        let Some(delivery) = delivery else { break };
        let payload = delivery
            .message
            .as_ref()
            .map(|m| m.payload.as_ref())
            .unwrap_or_default();
        if let Err(err) = print_payload(payload) {
            // The reader went away (`| head`): this delivery was never shown, so it is not
            // acked; the acks before it are flushed below rather than dropped.
            unprinted = Some(err);
            break;
        }
        if !args.no_ack {
            consumer.ack(tag(&delivery))?;
        }
        received += 1;
    }
    let failures = consumer.flush().await?;
    if let Some(failure) = failures.first() {
        anyhow::bail!(
            "{} of the acks failed, first: {}",
            failures.len(),
            failure.error
        );
    }
    if let Some(err) = unprinted {
        return Err(err.into());
    }
    Ok(())
}

fn print_payload(payload: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(payload)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// `sluice stats`: a table with one row per partition and a total.
pub async fn stats(client: &Client, queue: &str) -> anyhow::Result<()> {
    let stats = client.stats(queue).await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "queue {:?}  consumers {}", stats.name, stats.consumers)?;
    writeln!(
        out,
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}",
        "partition",
        "ready",
        "in-flight",
        "delayed",
        "dead",
        "expired",
        "bytes",
        "publish/s",
        "ack/s",
        "oldest"
    )?;
    for p in &stats.partitions {
        row(
            &mut out,
            &p.partition.to_string(),
            &p.stats.unwrap_or_default(),
        )?;
    }
    row(&mut out, "total", &stats.total.unwrap_or_default())?;
    Ok(())
}

fn row(out: &mut impl Write, label: &str, s: &Stats) -> std::io::Result<()> {
    let oldest = humantime::format_duration(Duration::from_secs(s.oldest_message_age_ms / 1000));
    writeln!(
        out,
        "{label:<10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10.1} {:>10.1} {:>10}",
        s.ready,
        s.in_flight,
        s.delayed,
        s.dead_lettered,
        s.expired,
        bytesize::ByteSize(s.bytes).to_string(),
        s.publish_rate,
        s.ack_rate,
        oldest.to_string(),
    )
}

/// `sluice queues`.
pub async fn queues(client: &Client) -> anyhow::Result<()> {
    let queues = client.list_queues().await?;
    let mut out = std::io::stdout().lock();
    for queue in queues {
        writeln!(out, "{:<32} {}", queue.name, describe(&queue))?;
    }
    Ok(())
}

/// `sluice delete`.
pub async fn delete(client: &Client, queue: &str, if_empty: bool) -> anyhow::Result<()> {
    let discarded = client.delete_queue(queue, if_empty).await?;
    writeln!(
        std::io::stdout(),
        "deleted queue {queue:?} ({discarded} messages discarded)"
    )?;
    Ok(())
}
