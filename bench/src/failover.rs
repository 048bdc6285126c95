//! Failover time: how long a cluster under steady confirmed-publish load takes, after its
//! queue's leader is killed with SIGKILL, to confirm a publish on the successor.
//!
//! Each trial finds the current leader (the agent that confirms a probe publish: every other
//! agent answers with a redirect), kills it, and measures from the kill to the first confirm
//! of a batch that was *sent after the killed process was reaped*, so no confirm the dead
//! leader gave can count. The killed agent is then restarted on its ports and data directory,
//! as its StatefulSet would, and the next trial starts once the load has run on the whole
//! cluster again for the settle time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_client::client::check_confirms;
use sluice_client::proto::Message;
use sluice_client::{Client, Publisher};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::cluster::Cluster;
use crate::config::{Args, FailoverArgs};
use crate::peers::sluice::{LEADER_STABLE_FOR, QUEUE, SluiceDriver, learn_leader, stable_leader};
use crate::stats::Distribution;
use crate::suite::agent_program;
use crate::{Error, Result};

const SYSTEM: &str = "sluice";

/// How often the trial loop looks for the first confirm after a kill; the resolution of the
/// measurement is the confirm's own timestamp, not this.
const POLL_EVERY: Duration = Duration::from_millis(5);

/// What a failover run does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Kills to measure.
    pub trials: u32,
    /// Steady publish load, messages/s over all producers.
    pub rate: u64,
    /// Concurrent producers of the load, each with its own client.
    pub producers: u32,
    /// Messages per publish frame.
    pub batch: u32,
    /// Frames awaiting confirms per producer.
    pub window: usize,
    /// Payload bytes.
    pub size: usize,
    /// Load on the whole cluster after each restart, before the trial waits for a settled
    /// leader ([`LEADER_STABLE_FOR`]) and kills it.
    pub settle: Duration,
    /// A trial without a confirm on the successor within this long counts as failed.
    pub trial_timeout: Duration,
}

/// One measured kill.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    /// The agent that led the queue and was killed.
    pub killed: usize,
    /// The agent found leading afterwards, when the probe found one.
    pub successor: Option<usize>,
    /// Kill to first confirm on the successor; `None` when none came within the timeout.
    pub took: Option<Duration>,
}

/// The trials of a run and the load's failed frames (those the dead leader never answered).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// Every trial in order.
    pub trials: Vec<Trial>,
    /// Publish frames that failed over the run (they were in flight at a kill or sent while
    /// there was no leader; the load does not resend them).
    pub failed_frames: u64,
    /// Frames confirmed over the run.
    pub confirmed_frames: u64,
    /// The error of the last failed frame, if any failed.
    pub last_failure: Option<String>,
}

impl Outcome {
    /// The distribution of the successful trials' failover times.
    pub fn distribution(&self) -> Distribution {
        Distribution::new(self.trials.iter().filter_map(|t| t.took).collect())
    }

    /// Trials without a confirm on the successor in time.
    pub fn failed_trials(&self) -> usize {
        self.trials.iter().filter(|t| t.took.is_none()).count()
    }
}

/// How long an agent gets to start serving.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

impl Plan {
    /// The plan `sluice-bench failover` flags describe.
    pub fn from_args(args: &FailoverArgs) -> Self {
        Self {
            trials: args.trials,
            rate: args.rate,
            producers: args.producers,
            batch: args.batch,
            window: args.window as usize,
            size: args.size,
            settle: Duration::from_millis(args.settle_ms),
            trial_timeout: Duration::from_secs(args.trial_timeout_secs),
        }
    }
}

/// `sluice-bench failover`: starts a cluster of `failover.agents` agents in a temporary
/// directory, runs the trials, stops the cluster (keeping its data with `--keep-data`).
pub async fn run_command(args: &Args, failover: &FailoverArgs) -> Result<Outcome> {
    let program = agent_program(args).map_err(|missing| Error::Spawn {
        program: "sluice-agent".into(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, missing),
    })?;
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-failover-")
        .tempdir()
        .map_err(|source| Error::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let plan = Plan::from_args(failover);
    eprintln!(
        "sluice-bench failover: {} trials, {} agents, {} msgs/s of {} B from {} producers (frames of {}, window {})",
        plan.trials, failover.agents, plan.rate, plan.size, plan.producers, plan.batch, plan.window
    );
    let result = match Cluster::start(
        &program,
        dir.path(),
        failover.agents as usize,
        READY_TIMEOUT,
    )
    .await
    {
        Ok(mut cluster) => {
            let result = run(&mut cluster, &plan).await;
            cluster.stop().await;
            result
        }
        Err(err) => Err(err),
    };
    if args.keep_data {
        let kept = dir.keep();
        eprintln!("  data and logs kept in {}", kept.display());
    }
    let outcome = result?;
    eprintln!(
        "  load: {} frames confirmed, {} failed (in flight at a kill or sent without a leader; not resent)",
        outcome.confirmed_frames, outcome.failed_frames
    );
    if let Some(error) = &outcome.last_failure {
        eprintln!("  last failed frame: {error}");
    }
    Ok(outcome)
}

/// Runs `plan.trials` kills against `cluster` (already started) and restarts each killed
/// agent before the next trial. The cluster is left running.
pub async fn run(cluster: &mut Cluster, plan: &Plan) -> Result<Outcome> {
    let payload = bytes::Bytes::from(vec![b'x'; plan.size]);
    let driver = SluiceDriver::connect_cluster(
        &cluster.client_addrs(),
        payload,
        1,
        plan.window,
        plan.trial_timeout,
    )
    .await?;
    let probe = Arc::new(Probe::default());
    let mut load = JoinSet::new();
    let interval = tick_of(plan);
    for _ in 0..plan.producers {
        let client = driver.client().await?;
        let message = driver.message().clone();
        load.spawn(steady_load(
            client,
            message,
            plan.clone(),
            interval,
            probe.clone(),
        ));
    }
    let prober = driver.client().await?;
    let result = trials(cluster, plan, &prober, &probe).await;
    load.abort_all();
    let trials = result?;
    Ok(Outcome {
        trials,
        failed_frames: probe.failed.load(Ordering::Relaxed),
        confirmed_frames: probe.confirmed.load(Ordering::Relaxed),
        last_failure: probe.last_failure(),
    })
}

async fn trials(
    cluster: &mut Cluster,
    plan: &Plan,
    prober: &Client,
    probe: &Probe,
) -> Result<Vec<Trial>> {
    let mut trials = Vec::new();
    for number in 1..=plan.trials {
        tokio::time::sleep(plan.settle).await;
        cluster.ensure_running()?;
        // Settled, so the kill does not land in the hand-off back to a restarted agent.
        let endpoint =
            stable_leader(prober, &probe_message(), LEADER_STABLE_FOR, READY_TIMEOUT).await?;
        let leader = cluster.index_of(&endpoint).ok_or_else(|| {
            Error::client(
                SYSTEM,
                "find the leader",
                format!("the leader {endpoint:?} is none of the cluster's agents"),
            )
        })?;
        // The clock starts before the signal; only sends after the reap may count.
        let killed_at = Instant::now();
        cluster.kill(leader).await?;
        probe.arm(Instant::now());
        let took = first_confirm_after(probe, killed_at, plan.trial_timeout).await;
        let successor = find_leader(cluster, prober, plan.trial_timeout).await.ok();
        match (took, successor) {
            (Some(took), Some(successor)) => eprintln!(
                "  trial {number}/{}: killed leader agent {leader}; agent {successor} confirmed after {} ms",
                plan.trials,
                took.as_millis()
            ),
            _ => eprintln!(
                "  trial {number}/{}: killed leader agent {leader}; no confirm within {} s",
                plan.trials,
                plan.trial_timeout.as_secs()
            ),
        }
        trials.push(Trial {
            killed: leader,
            successor,
            took,
        });
        cluster.restart(leader).await?;
    }
    Ok(trials)
}

/// The small message leader probes publish.
fn probe_message() -> Message {
    Message {
        payload: b"probe".to_vec(),
        ..Default::default()
    }
}

/// The agent that confirms a one-message probe publish; the client follows redirects to it.
async fn find_leader(cluster: &Cluster, client: &Client, timeout: Duration) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    let message = probe_message();
    loop {
        let outcome = client.publish(QUEUE, vec![message.clone()]).await;
        let leader = client.router().target(Some(QUEUE));
        match (outcome, cluster.index_of(&leader)) {
            (Ok(_), Some(index)) => return Ok(index),
            (Ok(_), None) => {
                return Err(Error::client(
                    SYSTEM,
                    "find leader",
                    format!("the leader {leader:?} is none of the cluster's agents"),
                ));
            }
            (Err(err), _) if Instant::now() >= deadline => {
                return Err(Error::client(SYSTEM, "find leader", err));
            }
            (Err(_), _) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Waits for the probe's first confirm of a frame sent after it was armed; returns the time
/// from `killed_at` to that confirm.
async fn first_confirm_after(
    probe: &Probe,
    killed_at: Instant,
    timeout: Duration,
) -> Option<Duration> {
    let deadline = killed_at + timeout;
    loop {
        if let Some(at) = probe.first_confirm() {
            return Some(at.saturating_duration_since(killed_at));
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The pause between two frames of one producer for the plan's rate.
fn tick_of(plan: &Plan) -> Duration {
    let per_producer = (plan.rate as f64 / f64::from(plan.producers.max(1))).max(1.0);
    Duration::from_secs_f64(f64::from(plan.batch.max(1)) / per_producer)
}

/// What the load saw: counts, and the first confirm of a frame sent after the last kill.
#[derive(Debug, Default)]
struct Probe {
    state: Mutex<ProbeState>,
    confirmed: AtomicU64,
    failed: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

#[derive(Debug, Default)]
struct ProbeState {
    /// Frames sent at or after this instant count.
    armed_at: Option<Instant>,
    /// When the first such frame was confirmed.
    first_confirm: Option<Instant>,
}

impl Probe {
    /// Starts watching for frames sent from `at` on, forgetting the previous trial's confirm.
    fn arm(&self, at: Instant) {
        if let Ok(mut state) = self.state.lock() {
            *state = ProbeState {
                armed_at: Some(at),
                first_confirm: None,
            };
        }
    }

    fn confirmed(&self, sent_at: Instant, confirmed_at: Instant) {
        self.confirmed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut state) = self.state.lock()
            && state.armed_at.is_some_and(|armed| sent_at >= armed)
            && state.first_confirm.is_none_or(|first| confirmed_at < first)
        {
            state.first_confirm = Some(confirmed_at);
        }
    }

    fn failed(&self, error: &sluice_client::Error) {
        self.failed_with(&error.to_string());
    }

    fn failed_with(&self, error: &str) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last_failure.lock() {
            *last = Some(error.to_owned());
        }
    }

    fn last_failure(&self) -> Option<String> {
        self.last_failure.lock().ok().and_then(|last| last.clone())
    }

    fn first_confirm(&self) -> Option<Instant> {
        self.state.lock().ok().and_then(|state| state.first_confirm)
    }
}

/// One producer publishing a frame of `plan.batch` every `interval`, forever (the run aborts
/// it). A frame that fails is counted and not resent, and the producer starts over: one unary
/// publish, which follows redirects to the (new) leader and so teaches the client where it is
/// (see [`learn_leader`]), then a new publish stream there.
async fn steady_load(
    client: Client,
    message: Message,
    plan: Plan,
    interval: Duration,
    probe: Arc<Probe>,
) {
    let mut ticks = tokio::time::interval(interval);
    // After a stall the load resumes at its rate rather than bursting to catch up.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut publisher: Option<Publisher> = None;
    let broken = Arc::new(AtomicBool::new(false));
    let batch = vec![message.clone(); plan.batch as usize];
    loop {
        ticks.tick().await;
        if broken.swap(false, Ordering::AcqRel) {
            publisher = None;
        }
        let current = match &mut publisher {
            Some(current) => current,
            None => {
                // The unary publish is itself a confirmed publish; it counts like a frame.
                let sent_at = Instant::now();
                if let Err(err) = learn_leader(&client, &message).await {
                    probe.failed_with(&err.to_string());
                    continue;
                }
                probe.confirmed(sent_at, Instant::now());
                match client.publisher(plan.window).await {
                    Ok(opened) => publisher.insert(opened),
                    Err(err) => {
                        probe.failed(&err);
                        continue;
                    }
                }
            }
        };
        match current.send(QUEUE, batch.clone()).await {
            Ok(pending) => {
                // Taken once the frame is handed over (`send` waits while the window is full),
                // so a frame stamped after a reap can only be confirmed by a live agent.
                let sent_at = Instant::now();
                let (probe, broken) = (probe.clone(), broken.clone());
                tokio::spawn(async move {
                    let answered = pending.await;
                    let confirmed_at = Instant::now();
                    match answered.and_then(|confirms| check_confirms(&confirms)) {
                        Ok(()) => probe.confirmed(sent_at, confirmed_at),
                        Err(err) => {
                            probe.failed(&err);
                            broken.store(true, Ordering::Release);
                        }
                    }
                });
            }
            Err(err) => {
                probe.failed(&err);
                publisher = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rate: u64, producers: u32, batch: u32) -> Plan {
        Plan {
            trials: 1,
            rate,
            producers,
            batch,
            window: 4,
            size: 256,
            settle: Duration::ZERO,
            trial_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_tick_spreads_the_rate_over_producers_and_batches() {
        assert_eq!(tick_of(&plan(10_000, 2, 10)), Duration::from_millis(2));
        assert_eq!(tick_of(&plan(1_000, 1, 1)), Duration::from_millis(1));
        // A zero rate still ticks (once per batch-second) instead of dividing by zero.
        assert_eq!(tick_of(&plan(0, 1, 1)), Duration::from_secs(1));
    }

    #[test]
    fn only_frames_sent_after_arming_count_and_the_earliest_confirm_wins() {
        let probe = Probe::default();
        let t0 = Instant::now();
        probe.confirmed(t0, t0 + Duration::from_millis(1));
        assert_eq!(probe.first_confirm(), None, "not armed yet");

        probe.arm(t0 + Duration::from_millis(10));
        // Sent before the reap: a confirm the dead leader may have given.
        probe.confirmed(
            t0 + Duration::from_millis(5),
            t0 + Duration::from_millis(20),
        );
        assert_eq!(probe.first_confirm(), None);
        probe.confirmed(
            t0 + Duration::from_millis(12),
            t0 + Duration::from_millis(40),
        );
        probe.confirmed(
            t0 + Duration::from_millis(11),
            t0 + Duration::from_millis(30),
        );
        assert_eq!(probe.first_confirm(), Some(t0 + Duration::from_millis(30)));
        assert_eq!(probe.confirmed.load(Ordering::Relaxed), 4);

        // The next trial starts afresh.
        probe.arm(t0 + Duration::from_millis(100));
        assert_eq!(probe.first_confirm(), None);
    }

    #[test]
    fn failed_trials_are_counted_and_left_out_of_the_distribution() {
        let trial = |took: Option<u64>| Trial {
            killed: 0,
            successor: took.map(|_| 1),
            took: took.map(Duration::from_millis),
        };
        let outcome = Outcome {
            trials: vec![trial(Some(300)), trial(None), trial(Some(100))],
            ..Default::default()
        };
        assert_eq!(outcome.failed_trials(), 1);
        let distribution = outcome.distribution();
        assert_eq!(distribution.len(), 2);
        assert_eq!(distribution.min(), Some(Duration::from_millis(100)));
        assert_eq!(distribution.max(), Some(Duration::from_millis(300)));
    }
}
