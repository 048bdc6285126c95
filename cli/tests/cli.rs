//! The real `sluice` binary: `sluice local` as the agent, the other subcommands against it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// `sluice local` running on free ports with a temporary data directory; killed on drop.
struct Local {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Local {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "local",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sluice local");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .ok()
            .flatten()
            .and_then(Result::ok)
            .expect("listening line");
        let grpc = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("grpc="))
            .unwrap_or_else(|| panic!("no grpc= in {line:?}"));
        Self {
            child,
            endpoint: format!("http://{grpc}"),
            _dir: dir,
        }
    }

    /// Runs `sluice --endpoint <this> args...` with `stdin`.
    fn sluice(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--endpoint", &self.endpoint])
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

    fn ok(&self, args: &[&str], stdin: &str) -> String {
        let output = self.sluice(args, stdin);
        assert!(
            output.status.success(),
            "sluice {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
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
