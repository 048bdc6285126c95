//! Rows of results and their Markdown rendering: the results table, the Sluice/peer ratios,
//! and the backlog table.

use std::fmt::Write as _;
use std::time::Duration;

use crate::stats::{Distribution, Throughput};

/// Figures of one system in the throughput/latency mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Confirmed-publish throughput.
    pub publish: Throughput,
    /// Consume+ack throughput.
    pub consume: Throughput,
    /// Open-loop rate of the latency phase, messages/s.
    pub latency_rate: u64,
    /// Median confirm latency.
    pub p50: Option<Duration>,
    /// 99th-percentile confirm latency.
    pub p99: Option<Duration>,
    /// Peak resident memory of the server over the whole run.
    pub peak_rss_bytes: u64,
}

/// Figures of one system in backlog mode.
#[derive(Debug, Clone, PartialEq)]
pub struct BacklogMeasurement {
    /// Publishing the backlog.
    pub publish: Throughput,
    /// Highest resident memory sampled while the backlog was held.
    pub held_rss_bytes: u64,
    /// Peak resident memory of the server up to the end of the hold.
    pub peak_rss_bytes: u64,
    /// Draining the backlog, when asked for.
    pub drain: Option<Throughput>,
}

/// What happened to one system.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<M> {
    /// It ran; these are its figures.
    Measured(M),
    /// Its server is not installed on this machine (what was looked for).
    NotInstalled(String),
    /// It was started but a phase failed (the error).
    Failed(String),
}

/// One line of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row<M> {
    /// System and variant, e.g. "RabbitMQ quorum".
    pub system: String,
    /// What a confirm means for it, in a few words.
    pub durability: String,
    /// Its figures or why there are none.
    pub outcome: Outcome<M>,
}

const MIB: f64 = 1024.0 * 1024.0;

/// The results table, Markdown.
pub fn results_table(rows: &[Row<Measurement>]) -> String {
    let mut out = String::from(
        "| System | Confirm means | Publish msgs/s | Consume+ack msgs/s | Latency load msgs/s | p50 confirm ms | p99 confirm ms | Peak RSS MiB |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let _ = write!(out, "| {} | {} | ", row.system, row.durability);
        match &row.outcome {
            Outcome::Measured(m) => {
                let _ = writeln!(
                    out,
                    "{} | {} | {} | {} | {} | {:.1} |",
                    rate(m.publish.per_sec()),
                    rate(m.consume.per_sec()),
                    rate(m.latency_rate as f64),
                    millis(m.p50),
                    millis(m.p99),
                    m.peak_rss_bytes as f64 / MIB,
                );
            }
            other => {
                let _ = writeln!(out, "{} | | | | | | |", no_figures(other));
            }
        }
    }
    out
}

/// Whether `row` measures Sluice (one agent or a cluster) rather than a peer.
pub fn is_sluice<M>(row: &Row<M>) -> bool {
    row.system.starts_with(crate::suite::SLUICE)
}

/// The figures of the Sluice row named `reference` divided by each measured peer's, Markdown;
/// `None` when that row was not measured or no peer was selected.
pub fn ratios_table(rows: &[Row<Measurement>], reference: &str) -> Option<String> {
    if rows.iter().all(is_sluice) {
        return None;
    }
    let sluice = rows.iter().find_map(|row| match &row.outcome {
        Outcome::Measured(m) if row.system == reference => Some(m),
        _ => None,
    })?;
    let mut out = format!(
        "| {reference} ÷ peer | Publish (>1: Sluice faster) | Consume+ack (>1: Sluice faster) | p99 confirm (<1: Sluice faster) | Peak RSS (<1: Sluice smaller) |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for row in rows.iter().filter(|row| !is_sluice(row)) {
        let Outcome::Measured(peer) = &row.outcome else {
            let _ = writeln!(
                out,
                "| {} | {} | | | |",
                row.system,
                no_figures(&row.outcome)
            );
            continue;
        };
        let p99 = match (sluice.p99, peer.p99) {
            (Some(s), Some(p)) => ratio(s.as_secs_f64(), p.as_secs_f64()),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.system,
            ratio(sluice.publish.per_sec(), peer.publish.per_sec()),
            ratio(sluice.consume.per_sec(), peer.consume.per_sec()),
            p99,
            ratio(sluice.peak_rss_bytes as f64, peer.peak_rss_bytes as f64),
        );
    }
    Some(out)
}

/// The backlog table, Markdown.
pub fn backlog_table(messages: u64, size: usize, rows: &[Row<BacklogMeasurement>]) -> String {
    let mut out = format!(
        "Backlog of {messages} × {size} B messages.\n\n\
         | System | Confirm means | Publish msgs/s | RSS while held MiB | Peak RSS MiB | Drain msgs/s |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let _ = write!(out, "| {} | {} | ", row.system, row.durability);
        match &row.outcome {
            Outcome::Measured(m) => {
                let drain = m
                    .drain
                    .map(|d| rate(d.per_sec()))
                    .unwrap_or_else(|| "not run".into());
                let _ = writeln!(
                    out,
                    "{} | {:.1} | {:.1} | {} |",
                    rate(m.publish.per_sec()),
                    m.held_rss_bytes as f64 / MIB,
                    m.peak_rss_bytes as f64 / MIB,
                    drain,
                );
            }
            other => {
                let _ = writeln!(out, "{} | | | |", no_figures(other));
            }
        }
    }
    out
}

/// The failover distribution, Markdown: kill -9 of the leader to the first confirm on its
/// successor, over the successful trials; trials without a confirm in time are counted apart.
pub fn failover_table(distribution: &Distribution, failed_trials: usize) -> String {
    let mut out = String::from(
        "| Trials | Failed | min ms | p50 ms | p90 ms | p99 ms | max ms |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let _ = writeln!(
        out,
        "| {} | {failed_trials} | {} | {} | {} | {} | {} |",
        distribution.len() + failed_trials,
        whole_millis(distribution.min()),
        whole_millis(distribution.quantile(0.5)),
        whole_millis(distribution.quantile(0.9)),
        whole_millis(distribution.quantile(0.99)),
        whole_millis(distribution.max()),
    );
    out
}

/// The `sluice-bench scale` table: one row of what the run measured.
pub fn scale_table(outcome: &crate::scale::Outcome) -> String {
    let mut out = String::from(
        "| Queues × partitions | Agents | Replicas per agent | Declares/s | Idle CPU, % of one core (all agents) | RSS per agent MiB | RSS per replica KiB | Log bytes/hour idle | Graceful stop s | Orphaned groups | New leader p50 / p99 / max ms | Confirm p50 / p99 / max ms |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let rss_max = outcome.rss.iter().copied().max().unwrap_or(0);
    let per_replica_kib = rss_max as f64 / 1024.0 / outcome.replicas_per_agent.max(1) as f64;
    let spread = |d: &Distribution| {
        format!(
            "{} / {} / {}",
            whole_millis(d.quantile(0.5)),
            whole_millis(d.quantile(0.99)),
            whole_millis(d.max())
        )
    };
    let rss: Vec<String> = outcome
        .rss
        .iter()
        .map(|b| format!("{:.0}", mib(*b)))
        .collect();
    let unled = if outcome.unled > 0 {
        format!(" ({} never led)", outcome.unled)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "| {} × {} | {} | {} | {:.1} | {:.1} | {} | {:.0} | {:.0} | {:.1} | {}{unled} | {} | {} |",
        outcome.queues,
        outcome.partitions,
        outcome.agents,
        outcome.replicas_per_agent,
        outcome.declare_rate,
        outcome.idle_cores * 100.0,
        rss.join(" / "),
        per_replica_kib,
        outcome.log_bytes_per_hour,
        outcome.graceful_stop.as_secs_f64(),
        outcome.orphaned,
        spread(&outcome.new_leader),
        spread(&outcome.confirmed),
    );
    out
}

fn whole_millis(value: Option<Duration>) -> String {
    value
        .map(|d| d.as_millis().to_string())
        .unwrap_or_else(|| "n/a".into())
}

fn no_figures<M>(outcome: &Outcome<M>) -> String {
    match outcome {
        Outcome::Measured(_) => String::new(),
        Outcome::NotInstalled(what) => format!("not installed ({what})"),
        // A pipe or newline in an error would break the table row.
        Outcome::Failed(error) => format!("failed: {}", error.replace(['|', '\n'], " ")),
    }
}

/// Messages/s with thousands separators, rounded to whole messages.
fn rate(per_sec: f64) -> String {
    let whole = per_sec.round() as u64;
    let digits = whole.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

fn millis(latency: Option<Duration>) -> String {
    latency
        .map(|d| format!("{:.2}", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "n/a".into())
}

fn ratio(sluice: f64, peer: f64) -> String {
    if peer > 0.0 {
        format!("{:.2}×", sluice / peer)
    } else {
        "n/a".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(publish: u64, consume: u64, p99_ms: u64, rss_mib: u64) -> Outcome<Measurement> {
        Outcome::Measured(Measurement {
            publish: Throughput {
                messages: publish,
                elapsed: Duration::from_secs(1),
            },
            consume: Throughput {
                messages: consume,
                elapsed: Duration::from_secs(1),
            },
            latency_rate: publish / 2,
            p50: Some(Duration::from_millis(p99_ms / 2)),
            p99: Some(Duration::from_millis(p99_ms)),
            peak_rss_bytes: rss_mib * 1024 * 1024,
        })
    }

    fn row(system: &str, outcome: Outcome<Measurement>) -> Row<Measurement> {
        Row {
            system: system.into(),
            durability: "fsync".into(),
            outcome,
        }
    }

    #[test]
    fn rates_get_thousands_separators() {
        assert_eq!(rate(0.4), "0");
        assert_eq!(rate(999.0), "999");
        assert_eq!(rate(1_000.0), "1,000");
        assert_eq!(rate(123_456_789.0), "123,456,789");
    }

    #[test]
    fn results_table_shows_figures_and_missing_peers() {
        let rows = vec![
            row(crate::suite::SLUICE, measured(100_000, 80_000, 8, 50)),
            row(
                "Redis streams",
                Outcome::NotInstalled("redis-server".into()),
            ),
            row("NATS", Outcome::Failed("boom | bad\nthing".into())),
        ];
        let table = results_table(&rows);
        assert!(
            table.contains("| Sluice | fsync | 100,000 | 80,000 | 50,000 | 4.00 | 8.00 | 50.0 |"),
            "{table}"
        );
        assert!(
            table.contains("| Redis streams | fsync | not installed (redis-server) |"),
            "{table}"
        );
        assert!(table.contains("failed: boom   bad thing"), "{table}");
        assert_eq!(table.lines().count(), 5);
    }

    #[test]
    fn ratios_divide_sluice_by_each_peer() {
        let rows = vec![
            row(crate::suite::SLUICE, measured(100_000, 80_000, 8, 50)),
            row("RabbitMQ quorum", measured(25_000, 40_000, 16, 200)),
            row(
                "Redis streams",
                Outcome::NotInstalled("redis-server".into()),
            ),
        ];
        let table = ratios_table(&rows, crate::suite::SLUICE).expect("sluice measured");
        assert!(
            table.contains("| RabbitMQ quorum | 4.00× | 2.00× | 0.50× | 0.25× |"),
            "{table}"
        );
        assert!(
            table.contains("| Redis streams | not installed (redis-server) |"),
            "{table}"
        );
    }

    #[test]
    fn no_ratios_without_peers() {
        let rows = vec![row(crate::suite::SLUICE, measured(100_000, 80_000, 8, 50))];
        assert_eq!(ratios_table(&rows, crate::suite::SLUICE), None);
    }

    #[test]
    fn no_ratios_without_a_sluice_measurement() {
        let rows = vec![
            row(
                crate::suite::SLUICE,
                Outcome::Failed("agent missing".into()),
            ),
            row("Redis streams", measured(1, 1, 1, 1)),
        ];
        assert_eq!(ratios_table(&rows, crate::suite::SLUICE), None);
    }

    #[test]
    fn a_cluster_row_gets_its_own_ratios_against_the_peers_only() {
        let cluster = "Sluice, 3 agents, RF 3";
        let rows = vec![
            row(crate::suite::SLUICE, measured(100_000, 80_000, 8, 50)),
            row(cluster, measured(50_000, 40_000, 16, 150)),
            row("RabbitMQ quorum", measured(25_000, 40_000, 16, 300)),
        ];
        let table = ratios_table(&rows, cluster).expect("cluster measured");
        assert!(
            table.starts_with("| Sluice, 3 agents, RF 3 ÷ peer |"),
            "{table}"
        );
        assert!(
            table.contains("| RabbitMQ quorum | 2.00× | 1.00× | 1.00× | 0.50× |"),
            "{table}"
        );
        assert!(!table.contains("| Sluice |"), "{table}");
        assert_eq!(table.lines().count(), 3);
    }

    #[test]
    fn failover_table_lists_trials_failures_and_quantiles_in_whole_ms() {
        let samples = [900, 300, 450]
            .into_iter()
            .map(Duration::from_millis)
            .collect();
        let table = failover_table(&Distribution::new(samples), 1);
        assert!(
            table.contains("| 4 | 1 | 300 | 450 | 900 | 900 | 900 |"),
            "{table}"
        );
        let empty = failover_table(&Distribution::default(), 2);
        assert!(
            empty.contains("| 2 | 2 | n/a | n/a | n/a | n/a | n/a |"),
            "{empty}"
        );
    }

    #[test]
    fn backlog_table_reports_held_memory_and_optional_drain() {
        let rows = vec![Row {
            system: crate::suite::SLUICE.into(),
            durability: "fsync".into(),
            outcome: Outcome::Measured(BacklogMeasurement {
                publish: Throughput {
                    messages: 10,
                    elapsed: Duration::from_secs(1),
                },
                held_rss_bytes: 3 * 1024 * 1024,
                peak_rss_bytes: 4 * 1024 * 1024,
                drain: None,
            }),
        }];
        let table = backlog_table(10, 256, &rows);
        assert!(
            table.starts_with("Backlog of 10 × 256 B messages."),
            "{table}"
        );
        assert!(
            table.contains("| Sluice | fsync | 10 | 3.0 | 4.0 | not run |"),
            "{table}"
        );
    }
}
