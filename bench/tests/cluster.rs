//! The replicated benchmarks end to end: the `sluice-bench` binary starting three real
//! `sluice-agent` processes on loopback, as `sluice-bench --cluster 3` and
//! `sluice-bench failover` do, in small runs.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// One cluster at a time: two would share the 2 cores and time each other's elections.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

/// The `sluice-agent` binary of this workspace (debug), built once for these tests: it belongs
/// to another package, so Cargo does not hand its path to this one.
fn agent_bin() -> &'static PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("bench/ sits in the workspace")
            .to_path_buf();
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "sluice-agent", "--bin", "sluice-agent"])
            .current_dir(&workspace)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building sluice-agent failed: {status}");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        target.join("debug").join("sluice-agent")
    })
}

fn bench(args: &[&str]) -> Output {
    let _turn = ONE_CLUSTER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Command::new(env!("CARGO_BIN_EXE_sluice-bench"))
        .arg("--agent-bin")
        .arg(agent_bin())
        .args(args)
        .output()
        .expect("sluice-bench runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn failover_with_two_trials_kills_two_leaders_and_prints_a_distribution_of_two_samples() {
    // Two kills of the leader under load, half a second of load between them.
    let output = bench(&[
        "failover",
        "--trials",
        "2",
        "--settle-ms",
        "500",
        "--rate",
        "2000",
    ]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );

    // Each trial reports which leader it killed and who confirmed after it.
    for trial in [
        "trial 1/2: killed leader agent",
        "trial 2/2: killed leader agent",
    ] {
        assert!(stderr.contains(trial), "{stderr}");
    }
    assert!(stderr.contains("confirmed after"), "{stderr}");

    // The table: two trials, none failed, and every column a number of milliseconds.
    let row = stdout
        .lines()
        .find(|line| line.starts_with("| 2 |"))
        .unwrap_or_else(|| panic!("no row of 2 trials in:\n{stdout}"));
    let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
    assert_eq!(cells.len(), 7, "{row}");
    assert_eq!(cells[1], "0", "no failed trial: {row}");
    let millis: Vec<u64> = cells[2..]
        .iter()
        .map(|cell| cell.parse().unwrap_or_else(|_| panic!("{cell:?} in {row}")))
        .collect();
    assert!(millis.windows(2).all(|w| w[0] <= w[1]), "ordered: {row}");
}

#[test]
fn a_cluster_run_measures_three_agents_with_replication_factor_three() {
    // A few thousand messages through a three-agent cluster, Sluice's cluster row only.
    let output = bench(&[
        "--no-sluice",
        "--peers",
        "none",
        "--cluster",
        "3",
        "--messages",
        "3000",
        "--producers",
        "2",
        "--consumers",
        "2",
        // Two frames in flight per producer: the agents (debug builds here) keep their
        // leader under this load; heavier load can move leadership mid-run, which fails the
        // row (README: the measured cluster figures).
        "--window",
        "2",
        "--latency-secs",
        "1",
    ]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );

    let row = stdout
        .lines()
        .find(|line| line.starts_with("| Sluice, 3 agents, RF 3 |"))
        .unwrap_or_else(|| panic!("no cluster row in:\n{stdout}"));
    let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
    assert_eq!(cells[1], "fsynced on 2 of 3 replicas", "{row}");
    // Publish, consume, load, p50, p99, RSS: all measured, all positive.
    for cell in &cells[2..] {
        let value: f64 = cell
            .replace(',', "")
            .parse()
            .unwrap_or_else(|_| panic!("{cell:?} is not a figure in {row}"));
        assert!(value > 0.0, "{row}");
    }
    // The RSS column sums three agents; each is reported on stderr.
    assert!(stderr.contains("agents' peak RSS MiB: "), "{stderr}");
    // No peers were measured, so there is no ratios table.
    assert!(!stdout.contains("÷ peer"), "{stdout}");
}
