//! Which followers lost log entries they had acknowledged: the sign of a replica that lost its
//! disk (or whose corrupted log was set aside) and came back empty (decision 0011, closing the
//! hazard of decision 0010).
//!
//! Such a replica would vote like a fresh node and could help elect a leader that misses
//! committed entries. Its leader notices: openraft (with `loosen-follower-log-revert`) resets
//! a follower's matched position when the follower reports a conflict below it. A watcher per
//! led group follows the Raft metrics and records every voter whose matched position fell
//! below the highest it reached in the leader's term; the reconciler then demotes that voter
//! to a learner, and promotes it again once it has caught up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use openraft::ServerState;
use tokio::task::JoinHandle;

use crate::replication::{NodeId, Raft};

/// Reverted followers per group, and the watchers that find them. Clones share them.
#[derive(Clone, Default)]
pub struct Reversions {
    /// Group name to the voters seen reverting while this agent led it.
    reverted: Arc<Mutex<HashMap<String, BTreeSet<NodeId>>>>,
    /// Group name to its watcher; a finished watcher (its Raft stopped) is replaced.
    watchers: Arc<Mutex<HashMap<String, JoinHandle<()>>>>,
}

impl Reversions {
    /// Starts watching `group` on `raft`, unless a watcher already runs.
    pub fn watch(&self, group: &str, raft: &Raft) {
        let mut watchers = lock(&self.watchers);
        if watchers.get(group).is_some_and(|w| !w.is_finished()) {
            return;
        }
        let task = tokio::spawn(follow(
            group.to_owned(),
            raft.clone(),
            self.reverted.clone(),
        ));
        watchers.insert(group.to_owned(), task);
    }

    /// The voters of `group` seen reverting and not yet demoted.
    pub fn of(&self, group: &str) -> BTreeSet<NodeId> {
        lock(&self.reverted).get(group).cloned().unwrap_or_default()
    }

    /// Forgets that `node` reverted in `group` (it was demoted).
    pub fn clear(&self, group: &str, node: NodeId) {
        if let Some(nodes) = lock(&self.reverted).get_mut(group) {
            nodes.remove(&node);
        }
    }

    /// Stops every watcher.
    pub fn stop(&self) {
        for (_, task) in lock(&self.watchers).drain() {
            task.abort();
        }
    }
}

/// Follows `raft`'s metrics for as long as it runs: while leading, the highest matched index
/// of every voter in the current term; a voter that falls below it is recorded.
async fn follow(
    group: String,
    raft: Raft,
    reverted: Arc<Mutex<HashMap<String, BTreeSet<NodeId>>>>,
) {
    let mut metrics = raft.metrics();
    let mut term = 0;
    let mut high: BTreeMap<NodeId, u64> = BTreeMap::new();
    loop {
        {
            let m = metrics.borrow_and_update();
            if m.state != ServerState::Leader || m.current_term != term {
                term = m.current_term;
                high.clear();
            }
            if m.state == ServerState::Leader
                && let Some(replication) = m.replication.as_ref()
            {
                let voters: BTreeSet<NodeId> =
                    m.membership_config.membership().voter_ids().collect();
                for (node, matched) in replication.iter() {
                    let index = matched.map_or(0, |l| l.index);
                    let seen = high.entry(*node).or_insert(index);
                    if index < *seen && voters.contains(node) {
                        tracing::warn!(%group, node, had = *seen, now = index, "a follower lost acknowledged entries; it rejoins as a learner");
                        lock(&reverted)
                            .entry(group.clone())
                            .or_default()
                            .insert(*node);
                    }
                    *seen = index;
                }
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps stay consistent whatever panicked while holding them (single inserts/removes).
    m.lock().unwrap_or_else(|p| p.into_inner())
}
