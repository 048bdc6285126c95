//! The one openraft configuration every Raft group of an agent uses (partitions and the meta
//! group alike), with the timing it commits to.
//!
//! Failover budget (issue 3: kill of a leader to the first confirmed publish on its successor,
//! p99 <= 2 s): a follower notices the dead leader after a randomised election timeout in
//! [`ELECTION_TIMEOUT_MIN_MS`]..[`ELECTION_TIMEOUT_MAX_MS`], one vote round trip elects the
//! successor, and its first commit needs one more replication round trip. openraft 0.9 adds
//! its leader lease (the node's `election_timeout_max`) to the timeout of a follower that knew
//! a leader, and a voter refuses candidates while its own lease runs, so the first candidate
//! stands about `max + timeout` after the last heartbeat: with the values here 0.33–0.58 s
//! (plus up to a heartbeat interval), leaving room for a lost vote round inside the budget.
//! Measured figures and why each knob has its value: decisions 0008 ("Tuning") and 0016.

use openraft::{Config, SnapshotPolicy};

/// How often a leader sends heartbeats to idle followers. Well below the election timeout so
/// one lost heartbeat never triggers an election. openraft 0.9 also gives each AppendEntries
/// this long to answer (a slower one is retried with the next heartbeat or entry), so it must
/// cover a loaded follower's fsync: not lower.
pub const HEARTBEAT_INTERVAL_MS: u64 = 100;
/// Lower bound of the randomised election timeout.
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 150;
/// Upper bound of the randomised election timeout.
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 300;
/// Most entries per AppendEntries: big enough that one round trip carries everything that
/// arrived while the previous one (and its follower fsync) was under way at the target rate.
pub const MAX_PAYLOAD_ENTRIES: u64 = 4096;
/// A follower this many entries behind is caught up with a snapshot rather than the log.
/// Snapshots here carry every unsettled message body, so they are expensive: only a follower
/// far behind should get one, and the snapshot interval below must stay under this.
pub const REPLICATION_LAG_THRESHOLD: u64 = 1_000_000;
/// A snapshot is built after this many new entries.
pub const SNAPSHOT_LOGS_SINCE_LAST: u64 = 500_000;

/// Width of one node's election-timeout window.
const ELECTION_WINDOW_MS: u64 = 30;
/// Distinct windows the nodes are spread over.
const ELECTION_WINDOWS: u64 = 4;

/// The tuned configuration of node `node_id`'s Raft group in the cluster `cluster_name` (the
/// name is only used in logs). It always passes `Config::validate` (a unit test holds that).
///
/// openraft 0.9 draws a node's election timeout once, when the Raft starts, so two nodes that
/// drew nearly the same value would split the vote in lockstep round after round (seen in the
/// fault tests). Each node therefore gets its own window inside
/// [`ELECTION_TIMEOUT_MIN_MS`]..[`ELECTION_TIMEOUT_MAX_MS`]: nodes whose ids differ modulo
/// [`ELECTION_WINDOWS`] never time out together.
pub fn raft_config(cluster_name: impl Into<String>, node_id: u64) -> Config {
    let spacing = (ELECTION_TIMEOUT_MAX_MS - ELECTION_TIMEOUT_MIN_MS) / ELECTION_WINDOWS;
    let election_timeout_min = ELECTION_TIMEOUT_MIN_MS + (node_id % ELECTION_WINDOWS) * spacing;
    Config {
        cluster_name: cluster_name.into(),
        heartbeat_interval: HEARTBEAT_INTERVAL_MS,
        election_timeout_min,
        election_timeout_max: election_timeout_min + ELECTION_WINDOW_MS,
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        replication_lag_threshold: REPLICATION_LAG_THRESHOLD,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_LOGS_SINCE_LAST),
        ..Config::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tuned_config_validates_and_fits_the_failover_budget() {
        let mut windows = Vec::new();
        for node in 0..8 {
            let config = raft_config("test", node).validate().expect("valid");
            assert!(
                config.election_timeout_max <= ELECTION_TIMEOUT_MAX_MS,
                "failover p99 <= 2 s"
            );
            // A follower of a live leader waits its lease plus its timeout: over three
            // heartbeats.
            assert!(config.heartbeat_interval < config.election_timeout_min);
            assert!(
                config.heartbeat_interval * 3
                    <= config.election_timeout_max + config.election_timeout_min
            );
            assert!(SNAPSHOT_LOGS_SINCE_LAST < config.replication_lag_threshold);
            windows.push((config.election_timeout_min, config.election_timeout_max));
        }
        // Neighbouring ids never share an election window.
        for pair in windows.windows(2) {
            assert!(pair[0].1 < pair[1].0 || pair[1].1 < pair[0].0, "{pair:?}");
        }
    }
}
