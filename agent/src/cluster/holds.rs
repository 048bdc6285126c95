//! Groups whose leadership the balancer leaves alone for a while.
//!
//! Two things put a group on hold. A hand-off to an agent that failed puts the group on hold
//! *for that agent*: with four or more voters the campaign-based transfer often fails (decision
//! 0009) and each lost campaign costs an election, so retrying every round would keep the group
//! electing (the balancer tries the next agent in placement order instead). And leadership
//! taken on request (`Cluster.TransferLeadership`): the old leader asked to be relieved — a
//! rolling update's `preStop` hook, `sluice cluster handoff` — and handing the group straight back
//! to it, because placement still prefers it, would undo the request before the pod stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How long a group stays on hold, both after a failed hand-off and after leadership was taken
/// on request. Long enough for a pod to stop and restart; short enough that leadership returns
/// to its preferred agent soon after.
pub const HOLD: Duration = Duration::from_secs(30);

/// What one hold covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum HoldKey {
    /// The group goes to no agent.
    Group(String),
    /// The group goes to every agent but this one.
    GroupFor(String, u64),
    /// No group goes to this agent.
    Agent(u64),
}

/// The groups on hold (for every target, or for one) and until when; cloned handles share
/// one map.
#[derive(Clone, Debug, Default)]
pub struct BalanceHolds {
    until: Arc<Mutex<HashMap<HoldKey, Instant>>>,
}

impl BalanceHolds {
    /// No group on hold.
    pub fn new() -> Self {
        Self::default()
    }

    /// Leaves `group` alone until [`HOLD`] from now.
    pub fn hold(&self, group: &str) {
        self.hold_key(HoldKey::Group(group.to_owned()), HOLD);
    }

    /// Hands `group` to `node` no more until [`HOLD`] from now.
    pub fn hold_for(&self, group: &str, node: u64) {
        self.hold_key(HoldKey::GroupFor(group.to_owned(), node), HOLD);
    }

    /// Hands no group to `node` until [`HOLD`] from now: it asked to be relieved of its
    /// leaderships (it is about to stop), so it should not get any other one either.
    pub fn relieve(&self, node: u64) {
        self.hold_key(HoldKey::Agent(node), HOLD);
    }

    fn hold_key(&self, key: HoldKey, hold: Duration) {
        let until = Instant::now() + hold;
        self.lock().insert(key, until);
    }

    /// Whether `group` is on hold now (for every target); forgets holds that have lapsed.
    pub fn is_held(&self, group: &str) -> bool {
        self.active(&HoldKey::Group(group.to_owned()))
    }

    /// Whether handing `group` to `node` is on hold now (for every target or for it, or
    /// `node` is being relieved).
    pub fn is_held_for(&self, group: &str, node: u64) -> bool {
        self.is_held(group)
            || self.active(&HoldKey::GroupFor(group.to_owned(), node))
            || self.active(&HoldKey::Agent(node))
    }

    fn active(&self, key: &HoldKey) -> bool {
        let now = Instant::now();
        let mut holds = self.lock();
        holds.retain(|_, until| *until > now);
        holds.contains_key(key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<HoldKey, Instant>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_covers_only_its_group_and_lapses() {
        let holds = BalanceHolds::new();
        let shared = holds.clone();
        holds.hold("orders/0");
        assert!(shared.is_held("orders/0"));
        assert!(
            shared.is_held_for("orders/0", 3),
            "a group hold covers every target"
        );
        assert!(!shared.is_held("orders/1"));
        holds.hold_key(HoldKey::Group("orders/1".into()), Duration::ZERO);
        assert!(!holds.is_held("orders/1"));
        assert!(
            holds.is_held("orders/0"),
            "a lapsed hold forgets only itself"
        );
    }

    #[test]
    fn a_relieved_agent_gets_no_group_while_the_others_do() {
        let holds = BalanceHolds::new();
        holds.relieve(2);
        assert!(holds.is_held_for("orders/0", 2));
        assert!(holds.is_held_for("jobs/3", 2));
        assert!(!holds.is_held_for("orders/0", 1));
        assert!(!holds.is_held("orders/0"));
    }

    #[test]
    fn a_hold_for_one_target_leaves_the_others_and_the_group_free() {
        let holds = BalanceHolds::new();
        holds.hold_for("orders/0", 4);
        assert!(holds.is_held_for("orders/0", 4));
        assert!(!holds.is_held_for("orders/0", 2));
        assert!(!holds.is_held("orders/0"));
    }
}
