//! `sluice-bench scale`: what many partitions cost (issue 16).
//!
//! Starts a cluster, declares `--queues` queues of `--partitions` partitions with
//! `--declare-concurrency` declares in flight (the declare rate), waits until the agents'
//! logs stay unchanged for 10 s (leaderships balanced; at most `--settle-secs`), then
//! reads over `--window-secs` with no traffic at all: the agents' CPU (`/proc/<pid>/stat`),
//! their RSS and how fast their logs grow. Then it stops the agent leading the most groups
//! with SIGTERM (how long it takes to hand off and exit), restarts it, and kills it with
//! SIGKILL once it leads again: for every group it led, how long until a survivor's log says
//! "leading" (read from the agents' own timestamped lines, so the figure does not depend on
//! how fast this harness polls) and until a publish to each of its queues is confirmed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use sluice_client::Client;
use sluice_client::proto::{Message, QueueSpec};

use crate::cluster::Cluster;
use crate::config::{Args, ScaleArgs};
use crate::stats::Distribution;
use crate::suite::agent_program;
use crate::{Error, Result};

const SYSTEM: &str = "sluice";
/// How long an agent gets to start serving (it opens every replica first).
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest the harness waits for the groups of a killed agent to be led again.
const FAILOVER_LIMIT: Duration = Duration::from_secs(120);
/// Publishes in flight at once after the kill (one per orphaned queue).
const CONFIRM_CONCURRENCY: usize = 32;

/// What one `sluice-bench scale` run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Queues declared.
    pub queues: u32,
    /// Partitions per queue.
    pub partitions: u32,
    /// Agents.
    pub agents: usize,
    /// Replicas each agent hosts (queues × partitions × RF / agents).
    pub replicas_per_agent: u64,
    /// Declares per second.
    pub declare_rate: f64,
    /// Idle CPU over all agents, as a fraction of one core.
    pub idle_cores: f64,
    /// RSS of each agent at the end of the idle window, bytes.
    pub rss: Vec<u64>,
    /// Log bytes all agents wrote per hour over the idle window.
    pub log_bytes_per_hour: f64,
    /// SIGTERM to exit of the agent leading the most groups.
    pub graceful_stop: Duration,
    /// Groups the killed agent led.
    pub orphaned: usize,
    /// Kill to a survivor leading, per orphaned group.
    pub new_leader: Distribution,
    /// Orphaned groups no survivor led within [`FAILOVER_LIMIT`].
    pub unled: usize,
    /// Kill to a confirmed publish, per queue with an orphaned group.
    pub confirmed: Distribution,
}

/// `sluice-bench scale`.
pub async fn run_command(args: &Args, scale: &ScaleArgs) -> Result<Outcome> {
    let program = agent_program(args).map_err(|missing| Error::Spawn {
        program: "sluice-agent".into(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, missing),
    })?;
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-scale-")
        .tempdir()
        .map_err(|source| Error::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let agents = scale.agents as usize;
    eprintln!("scale: starting {agents} agents");
    let mut cluster = Cluster::start(&program, dir.path(), agents, READY_TIMEOUT).await?;
    let result = measure(&mut cluster, scale).await;
    cluster.stop().await;
    if args.keep_data {
        let kept = dir.keep();
        eprintln!("scale: data and logs kept in {}", kept.display());
    }
    result
}

async fn measure(cluster: &mut Cluster, scale: &ScaleArgs) -> Result<Outcome> {
    let endpoints: Vec<String> = cluster
        .client_addrs()
        .iter()
        .map(|a| format!("http://{a}"))
        .collect();
    let client = Client::connect_any(&endpoints)
        .await
        .map_err(|e| Error::client(SYSTEM, "connect", e))?;

    // Declares, `--declare-concurrency` at a time.
    let names: Vec<String> = (0..scale.queues).map(|i| format!("scale-{i}")).collect();
    let started = Instant::now();
    let declared = futures::stream::iter(names.iter().cloned())
        .map(|name| declare(&client, name, scale.partitions))
        .buffer_unordered(scale.declare_concurrency as usize)
        .collect::<Vec<_>>()
        .await;
    declared.into_iter().collect::<Result<Vec<()>>>()?;
    let declare_rate = f64::from(scale.queues) / started.elapsed().as_secs_f64();
    eprintln!(
        "scale: {} queues × {} partitions declared at {declare_rate:.1}/s; settling",
        scale.queues, scale.partitions
    );
    let settled = settle(cluster, scale).await;
    eprintln!("scale: settled after {settled:?}");

    // The idle window.
    let agents = cluster.len();
    let cpu_before = cpu_ticks(cluster)?;
    let logs_before = log_bytes(cluster, agents);
    let window = Duration::from_secs(scale.window_secs);
    eprintln!("scale: idle window of {} s", scale.window_secs);
    tokio::time::sleep(window).await;
    cluster.ensure_running()?;
    let cpu_after = cpu_ticks(cluster)?;
    let logs_after = log_bytes(cluster, agents);
    let hz = clock_ticks_per_second();
    let idle_cores = (cpu_after - cpu_before) as f64 / hz / window.as_secs_f64();
    let log_bytes_per_hour =
        logs_after.saturating_sub(logs_before) as f64 * 3600.0 / window.as_secs_f64();
    let rss = cluster
        .memory()?
        .into_iter()
        .map(|m| m.map_or(0, |m| m.rss_bytes))
        .collect();

    // A graceful stop of the agent leading the most groups, and its restart.
    let leaders = current_leaders(cluster, agents);
    let stopping = busiest(&leaders, agents);
    eprintln!(
        "scale: agent {stopping} leads {} of {} groups; SIGTERM",
        leaders.values().filter(|l| **l == stopping).count(),
        leaders.len()
    );
    let graceful_stop = cluster.stop_agent(stopping).await?;
    eprintln!("scale: stopped in {graceful_stop:?}; restarting");
    cluster.restart(stopping).await?;
    let settled = settle(cluster, scale).await;
    eprintln!("scale: restarted agent settled after {settled:?}");

    // kill -9 of the agent leading the most groups now.
    let leaders = current_leaders(cluster, agents);
    let victim = busiest(&leaders, agents);
    let orphans: Vec<String> = leaders
        .iter()
        .filter(|(_, l)| **l == victim)
        .map(|(g, _)| g.clone())
        .collect();
    eprintln!(
        "scale: agent {victim} leads {} groups; kill -9",
        orphans.len()
    );
    let killed_at = SystemTime::now();
    let killed = Instant::now();
    cluster.kill(victim).await?;
    let survivors: Vec<usize> = (0..agents).filter(|i| *i != victim).collect();
    let orphan_queues: Vec<String> = {
        let mut queues: Vec<String> = orphans
            .iter()
            .filter_map(|g| g.rsplit_once('/').map(|(q, _)| q.to_string()))
            .collect();
        queues.sort();
        queues.dedup();
        queues
    };
    let survivor_endpoints: Vec<String> = survivors
        .iter()
        .map(|i| format!("http://{}", cluster.client_addrs()[*i]))
        .collect();
    let survivor_client = Client::connect_any(&survivor_endpoints)
        .await
        .map_err(|e| Error::client(SYSTEM, "connect", e))?;
    let confirms = futures::stream::iter(orphan_queues.iter().cloned())
        .map(|queue| confirm_once(&survivor_client, queue, killed))
        .buffer_unordered(CONFIRM_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let confirmed = Distribution::new(confirms.into_iter().flatten().collect());
    // Read the survivors' own "leading" lines until every orphan is led (or the limit).
    let led = loop {
        let led = leading_since(cluster, &survivors, killed_at);
        let done = orphans.iter().all(|g| led.contains_key(g));
        if done || killed.elapsed() >= FAILOVER_LIMIT {
            break led;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let new_leader =
        Distribution::new(orphans.iter().filter_map(|g| led.get(g).copied()).collect());
    let unled = orphans.iter().filter(|g| !led.contains_key(*g)).count();
    let replicas_per_agent =
        u64::from(scale.queues) * u64::from(scale.partitions) * cluster.replication_factor() as u64
            / agents as u64;
    Ok(Outcome {
        queues: scale.queues,
        partitions: scale.partitions,
        agents,
        replicas_per_agent,
        declare_rate,
        idle_cores,
        rss,
        log_bytes_per_hour,
        graceful_stop,
        orphaned: orphans.len(),
        new_leader,
        unled,
        confirmed,
    })
}

/// Declares `name`, retrying while the catalog is electing (a declare of an identical queue
/// is a no-op).
async fn declare(client: &Client, name: String, partitions: u32) -> Result<()> {
    let mut attempt = 0u32;
    loop {
        let spec = QueueSpec {
            name: name.clone(),
            partitions,
            ..Default::default()
        };
        match client.declare_queue(spec).await {
            Ok(_) => return Ok(()),
            Err(_) if attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(10)))).await;
            }
            Err(e) => return Err(Error::client(SYSTEM, "declare queue", e)),
        }
    }
}

/// Publishes one message to `queue` until it is confirmed; kill to confirm, or `None` after
/// [`FAILOVER_LIMIT`].
async fn confirm_once(client: &Client, queue: String, killed: Instant) -> Option<Duration> {
    let message = Message {
        payload: bytes::Bytes::from_static(b"after the kill").into(),
        ..Default::default()
    };
    while killed.elapsed() < FAILOVER_LIMIT {
        if let Ok(confirms) = client.publish(&queue, vec![message.clone()]).await
            && sluice_client::client::check_confirms(&confirms).is_ok()
        {
            return Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// utime + stime of every running agent, in clock ticks.
fn cpu_ticks(cluster: &Cluster) -> Result<u64> {
    let mut total = 0;
    for index in 0..cluster.len() {
        let Some(pid) = cluster.pid(index) else {
            continue;
        };
        let path = std::path::PathBuf::from(format!("/proc/{pid}/stat"));
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        // Fields after the command name (which may hold spaces) in parentheses.
        let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let field = |n: usize| -> Result<u64> {
            fields
                .get(n)
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| Error::Proc {
                    path: path.clone(),
                    reason: format!("no CPU time field {n}"),
                })
        };
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        total += field(11)? + field(12)?;
    }
    Ok(total)
}

/// `/proc` CPU times are in USER_HZ, which Linux fixes at 100 on every architecture the
/// harness runs on (`getconf CLK_TCK`).
fn clock_ticks_per_second() -> f64 {
    100.0
}

/// How long the agents' logs must stay unchanged for the cluster to count as settled: the
/// balancer logs every leadership it moves, and a group that elects logs `leading`.
const SETTLED_QUIET: Duration = Duration::from_secs(10);

/// Waits until the agents' logs have not grown for [`SETTLED_QUIET`] (or `--settle-secs`);
/// returns how long it waited. The idle window and the kill then measure a cluster at rest,
/// not one still moving leaderships to their preferred agents.
async fn settle(cluster: &Cluster, scale: &ScaleArgs) -> Duration {
    let started = Instant::now();
    let limit = Duration::from_secs(scale.settle_secs);
    let mut last = log_bytes(cluster, cluster.len());
    let mut quiet_since = Instant::now();
    while started.elapsed() < limit && quiet_since.elapsed() < SETTLED_QUIET {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = log_bytes(cluster, cluster.len());
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    started.elapsed()
}

fn log_bytes(cluster: &Cluster, agents: usize) -> u64 {
    (0..agents)
        .filter_map(|i| std::fs::metadata(cluster.log_path(i)).ok())
        .map(|m| m.len())
        .sum()
}

/// Each group's leader by the agents' logs: the agent with the latest `leading group=` line.
fn current_leaders(cluster: &Cluster, agents: usize) -> BTreeMap<String, usize> {
    let mut latest: BTreeMap<String, (i128, usize)> = BTreeMap::new();
    for agent in 0..agents {
        for (at, group) in leading_lines(&cluster.log_path(agent)) {
            let entry = latest.entry(group).or_insert((at, agent));
            if at >= entry.0 {
                *entry = (at, agent);
            }
        }
    }
    latest.into_iter().map(|(g, (_, a))| (g, a)).collect()
}

/// The agent leading the most groups.
fn busiest(leaders: &BTreeMap<String, usize>, agents: usize) -> usize {
    (0..agents)
        .max_by_key(|a| leaders.values().filter(|l| *l == a).count())
        .unwrap_or(0)
}

/// For every group a survivor started leading after `since`: how long after.
fn leading_since(
    cluster: &Cluster,
    survivors: &[usize],
    since: SystemTime,
) -> BTreeMap<String, Duration> {
    let since = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i128);
    let mut first: BTreeMap<String, Duration> = BTreeMap::new();
    for agent in survivors {
        for (at, group) in leading_lines(&cluster.log_path(*agent)) {
            if at < since {
                continue;
            }
            let after = Duration::from_micros((at - since) as u64);
            let entry = first.entry(group).or_insert(after);
            *entry = (*entry).min(after);
        }
    }
    first
}

/// `(microseconds since the epoch, group)` of every `leading group=<group>` line of a log.
fn leading_lines(log: &Path) -> Vec<(i128, String)> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| l.contains(" leading group="))
        .filter_map(|line| {
            let at = parse_timestamp(line.split_whitespace().next()?)?;
            let group = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("group="))?;
            Some((at, group.to_string()))
        })
        .collect()
}

/// Microseconds since the epoch of an RFC 3339 UTC timestamp as the agent logs it
/// (`2026-12-04T21:53:44.151813Z`).
fn parse_timestamp(text: &str) -> Option<i128> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (date.next()??, date.next()??, date.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (hms.next()??, hms.next()??, hms.next()??);
    let micros: i64 = format!("{fraction:0<6}").get(..6)?.parse().ok()?;
    let days = days_from_civil(y, m, d);
    Some(i128::from(((days * 24 + h) * 60 + min) * 60 + s) * 1_000_000 + i128::from(micros))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_timestamps_parse_to_microseconds_since_the_epoch() {
        assert_eq!(parse_timestamp("1970-01-01T00:00:01.5Z"), Some(1_500_000));
        assert_eq!(
            parse_timestamp("2026-12-04T21:53:44.151813Z"),
            Some(1_796_421_224_151_813)
        );
        assert_eq!(parse_timestamp("yesterday"), None);
    }
}
