//! The real `sluice` binary: `sluice local` running real `sluice-agent` processes, the other
//! subcommands against them.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The `sluice-agent` binary `sluice local` starts, built once per test run: cargo builds only
/// this package's binaries for its tests, and the agent is another package's.
fn agent_binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let sluice = Path::new(env!("CARGO_BIN_EXE_sluice"));
        let dir = sluice.parent().expect("target profile directory");
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(other) => other.to_owned(),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "sluice-agent",
                "--bin",
                "sluice-agent",
            ])
            .args(["--profile", &profile])
            .status()
            .expect("run cargo build -p sluice-agent");
        assert!(status.success(), "cargo build -p sluice-agent failed");
        dir.join("sluice-agent")
    })
}

/// `sluice local` running on free ports with a temporary data directory; killed on drop.
struct Local {
    child: Child,
    endpoint: String,
    /// The listening line.
    line: String,
    /// Every agent's client address, from the listening line.
    agents: Vec<String>,
    /// What the runner printed on stderr so far.
    stderr: Arc<Mutex<String>>,
    dir: tempfile::TempDir,
}

impl Local {
    /// A lone agent (`--agents 1`).
    fn start() -> Self {
        Self::start_agents(1)
    }

    fn start_agents(agents: u32) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "local",
                "--listen",
                "127.0.0.1:0",
                "--peer-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(["--agents", &agents.to_string()])
            .arg("--agent-bin")
            .arg(agent_binary())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sluice local");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr");
        let collected = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut collected = collected.lock().expect("stderr lock");
                collected.push_str(&line);
                collected.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .ok()
            .flatten()
            .and_then(Result::ok);
        let Some(line) = line else {
            let _ = child.kill();
            let _ = child.wait();
            // Give the stderr reader a moment to collect the last of it.
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "sluice local --agents {agents} printed no listening line; stderr:\n{}",
                stderr.lock().expect("stderr lock")
            );
        };
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                .to_owned()
        };
        let grpc = field("grpc=");
        let all = field("agents=");
        Self {
            endpoint: format!("http://{grpc}"),
            agents: all.split(',').map(str::to_owned).collect(),
            line: line.clone(),
            child,
            stderr,
            dir,
        }
    }

    /// What the runner printed on stderr so far.
    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Waits up to a minute for `check` to give a value; panics naming `what`, with the
    /// runner's stderr.
    fn eventually<T>(&self, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(value) = check() {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; sluice local's stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `sluice --endpoint <this> args...` with `stdin`.
    fn sluice(&self, args: &[&str], stdin: &str) -> Output {
        sluice_at(&self.endpoint, args, stdin)
    }

    fn ok(&self, args: &[&str], stdin: &str) -> String {
        ok_at(&self.endpoint, args, stdin)
    }
}

/// Runs `sluice --endpoint <endpoint> args...` with `stdin`.
fn sluice_at(endpoint: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--endpoint", endpoint])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("sluice runs")
}

/// `sluice --endpoint <endpoint> args...`'s stdout; panics when it fails.
fn ok_at(endpoint: &str, args: &[&str], stdin: &str) -> String {
    let output = sluice_at(endpoint, args, stdin);
    assert!(
        output.status.success(),
        "sluice {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Drop for Local {
    fn drop(&mut self) {
        // SIGTERM, so `sluice local` stops its agents too; SIGKILL would orphan them.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        for _ in 0..300 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn declare_publish_consume_stats_and_delete_through_the_cli() {
    let local = Local::start();
    let out = local.ok(
        &[
            "declare",
            "orders",
            "--partitions",
            "2",
            "--ack-timeout",
            "10s",
            "--ttl",
            "24h",
        ],
        "",
    );
    assert!(out.contains("queue \"orders\" created"), "{out}");
    assert!(out.contains("partitions=2"), "{out}");
    let out = local.ok(
        &[
            "declare",
            "orders",
            "--partitions",
            "2",
            "--ack-timeout",
            "10s",
            "--ttl",
            "24h",
        ],
        "",
    );
    assert!(out.contains("already exists"), "{out}");

    let ids = local.ok(&["publish", "orders", "one", "two", "--header", "k=v"], "");
    assert_eq!(ids.lines().count(), 2, "{ids}");
    assert!(
        ids.lines().all(|l| l.split_once(':').is_some()),
        "ids are partition:offset: {ids}"
    );
    let ids = local.ok(&["publish", "orders"], "three\nfour\nfive\n");
    assert_eq!(ids.lines().count(), 3, "one message per stdin line: {ids}");

    let stats = local.ok(&["stats", "orders"], "");
    assert!(stats.contains("ready"), "{stats}");
    let total = stats
        .lines()
        .find(|l| l.starts_with("total"))
        .expect("total row");
    assert_eq!(total.split_whitespace().nth(1), Some("5"), "{stats}");

    let queues = local.ok(&["queues"], "");
    assert!(queues.starts_with("orders"), "{queues}");

    let consumed = local.ok(&["consume", "orders", "--count", "5"], "");
    let mut payloads: Vec<_> = consumed.lines().collect();
    payloads.sort();
    assert_eq!(payloads, ["five", "four", "one", "three", "two"]);
    // They were acked: nothing is left.
    let rest = local.ok(&["consume", "orders", "--idle-timeout", "500ms"], "");
    assert!(rest.is_empty(), "{rest}");

    let out = local.ok(&["delete", "orders"], "");
    assert!(out.contains("deleted queue \"orders\""), "{out}");
    assert_eq!(local.ok(&["queues"], ""), "");
}

#[test]
fn runtime_errors_exit_1_naming_the_cause() {
    let local = Local::start();
    let output = local.sluice(&["publish", "missing", "x"], "");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "error: queue \"missing\" not found (NOT_FOUND)",
        "one line naming the cause, said once"
    );

    let output = local.sluice(&["declare", "Bad Name"], "");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("queue.name") && stderr.contains("INVALID_ARGUMENT"),
        "{stderr}"
    );

    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--endpoint", "http://127.0.0.1:1", "queues"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot connect to http://127.0.0.1:1"),
        "{stderr}"
    );
}

/// `sluice consume q | head -3`: the reader goes away; the consumer stops quietly, what was
/// printed is acked, and what was not (the delivery whose write failed, and the rest) stays.
#[test]
fn a_consumer_whose_reader_goes_away_acks_what_it_printed_and_exits_quietly() {
    let local = Local::start();
    local.ok(&["declare", "jobs"], "");
    local.ok(&["publish", "jobs", "a", "b", "c"], "");
    let mut consume = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--endpoint", &local.endpoint, "consume", "jobs"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice consume");
    let mut lines = BufReader::new(consume.stdout.take().expect("stdout")).lines();
    let printed: Vec<String> = (0..3)
        .map(|_| lines.next().expect("a line").expect("utf-8"))
        .collect();
    assert_eq!(printed.len(), 3);
    // Close the read end, then give the consumer something more to print.
    drop(lines);
    local.ok(&["publish", "jobs", "d", "e"], "");
    let mut status = None;
    for _ in 0..300 {
        status = consume.try_wait().expect("try_wait");
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(status) = status else {
        let _ = consume.kill();
        panic!("sluice consume kept running after its reader went away");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut consume.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(stderr, "", "a closed pipe is not an error to report");

    // a, b and c were printed and acked; d was delivered but never printed, so it is ready
    // again, with e.
    let rest = local.ok(&["consume", "jobs", "--idle-timeout", "1s"], "");
    let mut rest: Vec<_> = rest.lines().collect();
    rest.sort();
    assert_eq!(rest, ["d", "e"]);
}

#[test]
fn usage_errors_exit_2_naming_the_flag() {
    for args in [
        &["declare", "q", "--ack-timeout", "forever"][..],
        &["declare", "q", "--max-backlog-bytes", "lots"],
        &["publish", "q", "--priority", "12", "x"],
        &["publish", "q", "--header", "novalue", "x"],
        &["consume", "q", "--count", "many"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        let flag = args.iter().find(|a| a.starts_with("--")).expect("a flag");
        assert!(
            stderr.contains(flag),
            "{args:?} does not name {flag}: {stderr}"
        );
    }
}

#[test]
fn sluice_local_stops_gracefully_on_sigterm() {
    let mut local = Local::start();
    local.ok(&["declare", "q"], "");
    local.ok(&["publish", "q", "kept"], "");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(local.child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = local.child.wait().expect("exits");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn sluice_local_runs_three_agents_that_serve_a_round_trip_through_the_printed_endpoint() {
    let local = Local::start_agents(3);
    assert_eq!(local.agents.len(), 3, "{}", local.line);
    for n in 0..3 {
        let data = local.dir.path().join("data").join(format!("agent-{n}"));
        assert!(data.is_dir(), "{} missing", data.display());
    }

    // Everything goes through the runner's endpoint, as an app behind a sidecar would;
    // the client follows redirects to whichever agent leads the queue.
    let declared = local.sluice(&["declare", "orders", "--partitions", "2"], "");
    assert!(
        declared.status.success(),
        "declare on the 3-agent cluster failed (is replication wired into the agent?): {}",
        String::from_utf8_lossy(&declared.stderr)
    );
    let ids = local.ok(&["publish", "orders", "one", "two", "three"], "");
    assert_eq!(ids.lines().count(), 3, "{ids}");
    let consumed = local.ok(&["consume", "orders", "--count", "3"], "");
    let mut payloads: Vec<_> = consumed.lines().collect();
    payloads.sort();
    assert_eq!(payloads, ["one", "three", "two"]);
    let rest = local.ok(&["consume", "orders", "--idle-timeout", "500ms"], "");
    assert!(rest.is_empty(), "acked messages came back: {rest}");
}

#[test]
fn sluice_stats_prints_the_leaders_numbers_whichever_agent_it_asks() {
    let local = Local::start_agents(3);
    local.ok(&["declare", "counted"], "");
    local.ok(&["publish", "counted", "one", "two"], "");
    local.ok(&["publish", "counted", "--delay", "10m", "later"], "");
    // The delayed message counts as delayed once the leader's cursor reached it: its first
    // consumer looks and finds nothing deliverable yet but the two.
    local.ok(&["consume", "counted", "--count", "2"], "");
    // ready, in-flight and delayed of the `total` row, as each agent answers.
    let counts = |endpoint: &str| -> Vec<String> {
        let out = ok_at(&format!("http://{endpoint}"), &["stats", "counted"], "");
        let total = out
            .lines()
            .find(|l| l.starts_with("total"))
            .unwrap_or_else(|| panic!("no total row in {out}"))
            .to_owned();
        total
            .split_whitespace()
            .skip(1)
            .take(3)
            .map(str::to_owned)
            .collect()
    };
    for agent in &local.agents {
        assert_eq!(counts(agent), ["0", "0", "1"], "sluice stats at {agent}");
    }

    // Two deliveries held by a consumer that stays subscribed: in flight and one consumer at
    // the leader, so at every agent.
    local.ok(&["publish", "counted", "three", "four"], "");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let endpoints: Vec<String> = local.agents.iter().map(|a| format!("http://{a}")).collect();
    let _held = runtime.block_on(async {
        let client = sluice_client::Client::connect_any(&endpoints)
            .await
            .expect("connect");
        let mut consumer = client.subscribe("counted", 10).await.expect("subscribe");
        for _ in 0..2 {
            consumer.next().await.expect("delivery").expect("open");
        }
        consumer
    });
    for agent in &local.agents {
        assert_eq!(counts(agent), ["0", "2", "1"], "sluice stats at {agent}");
        let out = ok_at(&format!("http://{agent}"), &["stats", "counted"], "");
        assert!(
            out.contains("consumers 1"),
            "sluice stats at {agent}: {out}"
        );
    }
}

/// Issue 12, item 7: `sluice declare x && sluice consume x` is not moved afterwards. Declare
/// answers once each partition is led by the agent that keeps leading it, so the leaders
/// `sluice cluster` shows right after it are still the leaders seconds later (the balancer
/// would have moved a misplaced one within its 2 s pass), and a consumer started at once gets
/// what is published later.
#[test]
fn a_queue_consumed_right_after_sluice_declare_keeps_its_leaders() {
    let local = Local::start_agents(3);
    let leaders = |queue: &str| -> Vec<String> {
        let table = local.ok(&["cluster", "status"], "");
        table
            .lines()
            .filter(|line| line.split_whitespace().next() == Some(queue))
            .map(|line| line.split_whitespace().nth(2).unwrap_or("-").to_owned())
            .collect()
    };
    let queues = ["placed-0", "placed-1", "placed-2"];
    let mut consumers = Vec::new();
    let mut first = Vec::new();
    for queue in queues {
        local.ok(&["declare", queue, "--partitions", "3"], "");
        let consumer = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--endpoint", &local.endpoint])
            .args(["consume", queue, "--count", "3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sluice consume");
        consumers.push(consumer);
        let now = leaders(queue);
        assert_eq!(now.len(), 3, "{queue}: {now:?}");
        assert!(
            now.iter().all(|l| l != "-"),
            "{queue} has a partition without a leader: {now:?}"
        );
        first.push(now);
    }
    std::thread::sleep(Duration::from_secs(8));
    for (queue, first) in queues.iter().zip(&first) {
        assert_eq!(
            &leaders(queue),
            first,
            "{queue}: a leadership moved after declare"
        );
        local.ok(&["publish", queue, "one", "two", "three"], "");
    }
    for (queue, consumer) in queues.iter().zip(consumers) {
        let out = consumer.wait_with_output().expect("sluice consume");
        assert!(
            out.status.success(),
            "{queue}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut got: Vec<_> = std::str::from_utf8(&out.stdout)
            .expect("utf-8")
            .lines()
            .collect();
        got.sort();
        assert_eq!(got, ["one", "three", "two"], "{queue}");
    }
}

#[test]
fn sluice_local_fails_naming_the_agent_binary_it_cannot_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "local",
            "--listen",
            "127.0.0.1:0",
            "--peer-listen",
            "127.0.0.1:0",
        ])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--agent-bin", "/nonexistent/sluice-agent"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("starting local-0 (/nonexistent/sluice-agent)")
            && stderr.contains("cargo build -p sluice-agent"),
        "{stderr}"
    );
}

/// How long one message may take to be confirmed while agents are killed and restarted:
/// the client follows redirects and outlasts an election by itself, each `sluice publish` is
/// retried on top of that, and a debug build on a busy machine is slow to elect.
const PUBLISH_RETRY_SECS: u64 = 20;

/// Publishes `m00000`, `m00001`, ... through `endpoint`, one `sluice publish` each, until
/// stopped. A message is retried under the same idempotency key until it is confirmed, so a
/// call that broke after the agent took it is confirmed without a second copy.
struct Publisher {
    confirmed: Arc<Mutex<Vec<String>>>,
    /// The longest any message took to be confirmed, retries included.
    slowest: Arc<Mutex<Duration>>,
    /// Why it stopped on its own: a message not confirmed within [`PUBLISH_RETRY_SECS`].
    failure: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Publisher {
    fn start(endpoint: String, queue: &'static str) -> Self {
        let confirmed = Arc::new(Mutex::new(Vec::new()));
        let slowest = Arc::new(Mutex::new(Duration::ZERO));
        let failure = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (confirmed, slowest) = (confirmed.clone(), slowest.clone());
            let (failure, stop) = (failure.clone(), stop.clone());
            move || {
                for n in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let payload = format!("m{n:05}");
                    let args = ["publish", queue, "--idempotency-key", &payload, &payload];
                    let started = Instant::now();
                    let deadline = started + Duration::from_secs(PUBLISH_RETRY_SECS);
                    loop {
                        let output = sluice_at(&endpoint, &args, "");
                        if output.status.success() {
                            confirmed.lock().expect("lock").push(payload);
                            let mut slowest = slowest.lock().expect("lock");
                            *slowest = (*slowest).max(started.elapsed());
                            break;
                        }
                        if Instant::now() >= deadline {
                            *failure.lock().expect("lock") = Some(format!(
                                "{payload} was not confirmed within {PUBLISH_RETRY_SECS}s: {}",
                                String::from_utf8_lossy(&output.stderr)
                            ));
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        });
        Self {
            confirmed,
            slowest,
            failure,
            stop,
            thread,
        }
    }

    /// Messages confirmed so far; panics when the publisher gave up on one.
    fn confirmed(&self) -> usize {
        if let Some(failure) = self.failure.lock().expect("lock").as_ref() {
            panic!("the endpoint stopped confirming publishes: {failure}");
        }
        self.confirmed.lock().expect("lock").len()
    }

    /// Stops after the message in hand; every confirmed message in order, and the longest
    /// one took.
    fn finish(self) -> (Vec<String>, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let Self {
            confirmed,
            slowest,
            failure,
            thread,
            ..
        } = self;
        thread.join().expect("publisher thread");
        if let Some(failure) = failure.lock().expect("lock").as_ref() {
            panic!("the endpoint stopped confirming publishes: {failure}");
        }
        let confirmed = confirmed.lock().expect("lock").clone();
        let slowest = *slowest.lock().expect("lock");
        (confirmed, slowest)
    }
}

#[test]
fn sluice_local_restarts_each_killed_agent_while_publishes_are_confirmed_and_none_is_lost() {
    let local = Local::start_agents(3);
    assert_eq!(local.agents.len(), 3, "{}", local.line);
    // Everything goes through the runner's one endpoint, as an app would: it answers through
    // whichever agents run while one of them is down.
    ok_at(
        &local.endpoint,
        &[
            "declare",
            "orders",
            "--partitions",
            "2",
            "--dedup-window",
            "10m",
        ],
        "",
    );
    let publisher = Publisher::start(local.endpoint.clone(), "orders");
    local.eventually("a first confirmed publish", || {
        (publisher.confirmed() > 0).then_some(())
    });

    // Kill each agent in turn; it comes back on its port under a new pid, the runner says
    // so, and the publisher keeps being confirmed throughout.
    for (n, listen) in local.agents.iter().enumerate() {
        let name = format!("local-{n}");
        let old = find_agent_pid(listen).unwrap_or_else(|| panic!("{name} is not running"));
        let before = publisher.confirmed();
        kill(Pid::from_raw(old), Signal::SIGKILL).expect("SIGKILL");

        let new = local.eventually(&format!("{name} to be started again"), || {
            find_agent_pid(listen).filter(|&pid| pid != old)
        });
        local.eventually(&format!("{name} (pid {new}) to answer on {listen}"), || {
            sluice_at(listen, &["queues"], "")
                .status
                .success()
                .then_some(())
        });
        local.eventually(&format!("the runner to report {name}'s restart"), || {
            let stderr = local.stderr();
            let killed =
                format!("{name} (pid {old}) was killed by signal 9 (SIGKILL) after running ");
            let restart = "restarting it in 500ms (restart 1), its log is ";
            let back = format!("{name} is back as pid {new}, listening on {listen}");
            stderr
                .lines()
                .any(|l| l.contains(&killed) && l.contains(restart))
                .then_some(())
                .filter(|()| stderr.contains(&back))
        });
        // With the agent back, the cluster goes on confirming before the next kill.
        local.eventually(
            &format!("publishes confirmed after {name} came back"),
            || (publisher.confirmed() >= before + 10).then_some(()),
        );
    }

    // Every confirmed message is delivered exactly once, and nothing else is.
    let (confirmed, slowest) = publisher.finish();
    eprintln!(
        "{} messages confirmed across three kills, the slowest in {slowest:.1?}",
        confirmed.len()
    );
    let count = confirmed.len().to_string();
    let consumed = ok_at(
        &local.endpoint,
        &[
            "consume",
            "orders",
            "--count",
            &count,
            "--idle-timeout",
            "10s",
        ],
        "",
    );
    let mut consumed: Vec<&str> = consumed.lines().collect();
    consumed.sort_unstable();
    assert_eq!(consumed, confirmed, "consumed what was confirmed");
    let rest = ok_at(
        &local.endpoint,
        &["consume", "orders", "--idle-timeout", "1s"],
        "",
    );
    assert!(rest.is_empty(), "more than was confirmed: {rest}");
    let stderr = local.stderr();
    assert!(!stderr.contains("gives up"), "{stderr}");
}

#[test]
fn a_lone_agent_killed_five_times_within_a_minute_makes_sluice_local_give_up_naming_it() {
    let mut local = Local::start();
    let listen = local.agents[0].clone();
    let mut pid = find_agent_pid(&listen).expect("local-0 is running");

    // The first four crashes are restarted, each after twice the backoff of the one before.
    for restart in 1..=4 {
        kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL");
        let old = pid;
        pid = local.eventually(&format!("restart {restart} of local-0"), || {
            find_agent_pid(&listen).filter(|&p| p != old)
        });
    }
    local.eventually("four restart lines with a doubling backoff", || {
        let stderr = local.stderr();
        [(1, "500ms"), (2, "1s"), (3, "2s"), (4, "4s")]
            .iter()
            .all(|(restart, delay)| {
                stderr.contains(&format!("restarting it in {delay} (restart {restart})"))
            })
            .then_some(())
    });

    // The fifth crash within the minute is a crash loop: the runner stops and says why.
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("SIGKILL");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = local.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "sluice local kept running");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(1), "{}", local.stderr());
    let gave_up =
        format!("error: local-0 (pid {pid}) was killed by signal 9 (SIGKILL) after running ");
    local.eventually("the runner's reason for giving up", || {
        let stderr = local.stderr();
        (stderr.contains(&gave_up)
            && stderr.contains(
                "local-0 crashed 5 times within 60s, so sluice local gives up and stops all agents",
            )
            && stderr.contains("local-0.log ends with:"))
        .then_some(())
    });
    assert_eq!(find_agent_pid(&listen), None, "no agent is left running");
}

/// The pid of the `sluice-agent` process whose command line has `--listen <listen>`.
fn find_agent_pid(listen: &str) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let listens = args
            .windows(2)
            .any(|w| w[0] == b"--listen" && w[1] == listen.as_bytes());
        if listens && args.first().is_some_and(|a| a.ends_with(b"sluice-agent")) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn sluice_cluster_shows_the_agents_and_refuses_unsafe_membership_changes() {
    let local = Local::start_agents(3);
    local.ok(&["declare", "orders"], "");

    // The bootstrap agents are ACTIVE; their client addresses arrive as each registers.
    let mut status = String::new();
    for _ in 0..100 {
        status = local.ok(&["cluster", "status"], "");
        let active = status.lines().filter(|l| l.contains(" ACTIVE ")).count();
        let registered = status.lines().filter(|l| l.contains("127.0.0.1:")).count();
        let placed = status.lines().any(|l| {
            let row: Vec<&str> = l.split_whitespace().collect();
            row.first() == Some(&"orders")
                && row.get(2).is_some_and(|l| *l != "-")
                && row.get(3) == Some(&"0,1,2")
        });
        if active == 3 && registered == 3 && placed {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(status.starts_with("AGENT"), "{status}");
    assert!(status.contains("replication factor 3"), "{status}");
    assert_eq!(
        status.lines().filter(|l| l.contains(" ACTIVE ")).count(),
        3,
        "{status}"
    );

    // Draining one of three agents would leave fewer than the replication factor.
    let output = local.sluice(&["cluster", "drain", "0"], "");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("replication factor") && stderr.contains("FAILED_PRECONDITION"),
        "{stderr}"
    );
    // A known agent with other addresses is a conflict.
    let output = local.sluice(
        &[
            "cluster",
            "add",
            "0",
            "--peer-address",
            "127.0.0.1:1",
            "--client-address",
            "127.0.0.1:2",
        ],
        "",
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ALREADY_EXISTS"), "{stderr}");
    // Removing an agent the cluster does not know is already done.
    assert_eq!(
        local.ok(&["cluster", "remove", "9"], ""),
        "agent 9: removed\n"
    );

    // A hand-off moves the leaderships the queue's leader holds.
    let leader = status
        .lines()
        .find(|l| l.starts_with("orders "))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("no partition row in {status}"))
        .to_owned();
    // The agent passes the hand-off on to the leader's client address, which the catalog
    // learns when that agent registers: on a loaded machine that can come after the loop
    // above gave up waiting, so it is retried while the leader is still unknown.
    let mut handed = local.sluice(&["cluster", "handoff", &leader], "");
    for _ in 0..150 {
        if handed.status.success() || !String::from_utf8_lossy(&handed.stderr).contains("NOT_FOUND")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        handed = local.sluice(&["cluster", "handoff", &leader], "");
    }
    let handed_out = String::from_utf8_lossy(&handed.stdout);
    assert!(
        handed.status.success() && handed_out.contains("leaderships moved"),
        "{handed_out}{}",
        String::from_utf8_lossy(&handed.stderr)
    );
}

#[test]
fn sluice_cluster_on_a_single_agent_fails_with_failed_precondition() {
    let local = Local::start();
    let output = local.sluice(&["cluster", "status"], "");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("FAILED_PRECONDITION") && stderr.contains("--peers"),
        "{stderr}"
    );
}
