//! [`Quiescence`]: the agent-wide loop that lets idle partition groups stop ticking and wakes
//! them when they are needed again (decision 0025).
//!
//! - **Quiescing** (leader side): once a second, every group this agent leads that has had no
//!   write for [`QUIESCE_AFTER`], whose log is committed and applied to its end and matched by
//!   every answering voter, a majority at least (no learner, no joint configuration), is
//!   offered to its answering followers in one `Quiesce` request per follower agent. A voter
//!   whose agent is silent (down) does not keep the group ticking: the group wakes when it
//!   answers again. A follower quiesces only under the very vote it
//!   follows and with its log ending at the leader's last entry; when all did, the leader stops
//!   ticking too. Nothing is sent for that group from then on.
//! - **Waking**: a write or membership change at the leader, an AppendEntries with entries (or
//!   under another vote), a vote request or a snapshot at a follower, or a change of role seen
//!   in the metrics turns the ticker back on ([`QuietGroup::wake`]).
//! - **Liveness**: [`Liveness`] exchanges one `Alive` per agent pair. When the leader of quiet
//!   groups goes silent, the followers wake exactly those groups, with their election timers
//!   off: one survivor per group, chosen by the group's name, campaigns (at most
//!   [`CAMPAIGNS_PER_ROUND`] groups at a time) and again every [`CAMPAIGN_INTERVAL`] until the
//!   group has a leader; the others only if the chosen one is silent too after
//!   [`TAKEOVER_AFTER`], and every timer is back on
//!   when the group has a leader or after [`CAMPAIGN_DEADLINE`]. The campaigns (and the new
//!   leaderships) spread over the survivors, and hundreds of groups failing over at once do
//!   not split their votes: with election timers running, two survivors campaigned for the
//!   same group, each vote cost an fsync on both sides, the rounds outlasted the timeout and
//!   the terms climbed for many seconds. When a follower answers again or restarted, its quiet
//!   leaders wake so it hears heartbeats again.
//!
//! Why this is safe: the timers carry no safety in Raft. A quiet leader still needs a
//! majority to acknowledge an entry before it is committed, so a leader cut off from its
//! followers cannot confirm anything, quiet or not; a quiet follower votes and accepts entries
//! by the same rules as an active one.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use openraft::ServerState;
use sluice_proto::peer::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::codec;
use super::liveness::{Liveness, PeerEvent};
use super::quiet_group::{Quiet, QuietGroup, Wake};
use super::service::RaftGroups;
use super::types::NodeId;

/// A group with no write for this long (and otherwise settled) is quiesced.
pub const QUIESCE_AFTER: Duration = Duration::from_secs(2);
/// How often the leader side looks for groups to quiesce.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long one `Quiesce` request may take.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the survivor chosen to campaign for a group whose leader went silent campaigns
/// again while the group has no leader.
pub const CAMPAIGN_INTERVAL: Duration = Duration::from_secs(1);
/// How often the campaigns are looked at (groups led by then are done; more start).
const CAMPAIGN_ROUND: Duration = Duration::from_millis(250);
/// Most campaigns an agent starts per round. Every vote is a durable write on the candidate
/// and on the voter, and a vote that is not answered within the election timeout (150-254 ms)
/// is lost: started all at once, a thousand campaigns outlasted their timeouts, every retry
/// cost new writes, and no group got a leader.
const CAMPAIGNS_PER_ROUND: usize = 100;
/// After this long without a leader the other survivors campaign too, if the chosen one is
/// silent as well.
pub const TAKEOVER_AFTER: Duration = Duration::from_secs(4);
/// After this long the groups' election timers run again, leader or not.
pub const CAMPAIGN_DEADLINE: Duration = Duration::from_secs(15);

/// The agent's quiescence: the leader-side sweep, the follower side of `Quiesce`, and the
/// wake-ups the liveness watch triggers. Clones share it.
#[derive(Clone)]
pub struct Quiescence {
    groups: RaftGroups,
    liveness: Liveness,
}

impl Quiescence {
    /// Starts the sweep and the handling of `events` (from `liveness`) for the quiet groups
    /// registered in `groups`; both stop with the runtime.
    pub fn start(
        groups: RaftGroups,
        liveness: Liveness,
        events: mpsc::UnboundedReceiver<PeerEvent>,
    ) -> Self {
        let quiescence = Self { groups, liveness };
        tokio::spawn(quiescence.clone().run_sweeps());
        tokio::spawn(quiescence.clone().run_events(events));
        quiescence
    }

    /// The liveness watch (the peer service answers `Alive` with its boot id).
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    async fn run_sweeps(self) {
        // Group -> (writes seen, since when): idle once unchanged for QUIESCE_AFTER.
        let mut idle: HashMap<String, (u64, Instant)> = HashMap::new();
        let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.sweep(&mut idle).await;
        }
    }

    /// One pass of the leader side: offers every idle, settled group to its followers and
    /// quiesces those all of them took.
    async fn sweep(&self, idle: &mut HashMap<String, (u64, Instant)>) {
        let me = self.liveness.node_id();
        let now = Instant::now();
        let hosted = self.groups.quiet_groups();
        // A set, not a scan of `hosted` per entry: at 3,000 groups that scan was nine million
        // string comparisons a second and most of an idle agent's CPU.
        let names: std::collections::HashSet<&str> =
            hosted.iter().map(|g| g.name.as_str()).collect();
        idle.retain(|name, _| names.contains(name.as_str()));
        // Follower -> the groups offered to it; group -> (followers, writes seen).
        let mut offers: BTreeMap<NodeId, (String, Vec<pb::QuietGroup>)> = BTreeMap::new();
        let mut candidates = Vec::new();
        for group in hosted {
            if group.is_quiet() {
                // Its idle mark stays: woken by anything but a write (a follower back, a
                // restart), it is offered again as soon as it is settled, not after another
                // QUIESCE_AFTER of heartbeats. At thousands of groups those heartbeats were
                // the storm that followed an agent's restart.
                continue;
            }
            let writes = group.writes();
            let since = match idle.get(&group.name) {
                Some(&(seen, since)) if seen == writes => since,
                _ => {
                    idle.insert(group.name.clone(), (writes, now));
                    continue;
                }
            };
            if now.duration_since(since) < QUIESCE_AFTER {
                continue;
            }
            let Some(settled) = settled_leader(&group, me) else {
                continue;
            };
            // Watched from now on (a new watch counts as answering until it has had
            // SILENT_AFTER to hear back).
            for (node, address) in settled.matched.iter().chain(&settled.behind) {
                self.liveness.watch(*node, address);
            }
            // A follower behind is waited for while it answers (it is catching up); a silent
            // one (its agent is down) is left out, so a group keeps quiet through an agent's
            // outage as long as a majority is matched, and wakes when it answers again.
            if settled
                .behind
                .iter()
                .any(|(n, _)| self.liveness.is_answering(*n))
                || settled
                    .matched
                    .iter()
                    .any(|(n, _)| !self.liveness.is_answering(*n))
            {
                continue;
            }
            let Settled {
                offer,
                matched: followers,
                behind,
            } = settled;
            for (node, address) in &followers {
                offers
                    .entry(*node)
                    .or_insert_with(|| (address.clone(), Vec::new()))
                    .1
                    .push(offer.clone());
            }
            candidates.push((group, followers, behind, writes));
        }
        if candidates.is_empty() {
            return;
        }
        let asks = offers.into_iter().map(|(node, (address, groups))| {
            let client = self.liveness.watch(node, &address);
            async move {
                let Some(mut client) = client else {
                    return (node, Vec::new());
                };
                let call = client.quiesce(pb::QuiesceRequest { groups });
                match tokio::time::timeout(QUIESCE_TIMEOUT, call).await {
                    Ok(Ok(response)) => (node, response.into_inner().quiesced),
                    _ => (node, Vec::new()),
                }
            }
        });
        let answers: HashMap<NodeId, std::collections::HashSet<String>> =
            futures::future::join_all(asks)
                .await
                .into_iter()
                .map(|(node, quiesced)| (node, quiesced.into_iter().collect()))
                .collect();
        for (group, followers, behind, writes) in candidates {
            let all = followers.iter().all(|(node, _)| {
                answers
                    .get(node)
                    .is_some_and(|quiesced| quiesced.contains(&group.name))
            });
            if all {
                // The silent followers count among the voters: their answering again wakes it.
                group.quiesce_leader(followers.into_iter().chain(behind).collect(), writes);
            }
        }
    }

    /// The follower side of `Quiesce`: the groups of `request` this agent quiesced.
    pub fn quiesce_requested(&self, request: pb::QuiesceRequest) -> Vec<String> {
        let me = self.liveness.node_id();
        let mut quiesced = Vec::new();
        for offer in request.groups {
            let Some(group) = self.groups.quiet(&offer.group) else {
                continue;
            };
            let Ok(vote) = codec::required_vote(&offer.vote, "QuietGroup") else {
                continue;
            };
            let last = codec::opt_log_id_from_pb(&offer.last_log_id).map(|l| l.index);
            let Some(leader) = vote.leader_id().voted_for() else {
                continue;
            };
            let (others, address) = {
                let metrics = group.raft.metrics();
                let m = metrics.borrow();
                let settled = m.state == ServerState::Follower
                    && m.vote == vote
                    && vote.is_committed()
                    && m.current_leader == Some(leader)
                    && m.last_log_index == last
                    && m.last_applied.map(|l| l.index) == last;
                let membership = m.membership_config.membership();
                let Some(address) = membership.get_node(&leader).map(|n| n.addr.clone()) else {
                    continue;
                };
                if !settled {
                    continue;
                }
                let others: Vec<NodeId> = membership
                    .voter_ids()
                    .filter(|n| *n != me && *n != leader)
                    .collect();
                (others, address)
            };
            // Watched from now on: its silence is what wakes this group. A leader this agent
            // already counts silent would raise no new silence when it dies: such a group
            // keeps its timers.
            self.liveness.watch(leader, &address);
            if !self.liveness.is_answering(leader) {
                continue;
            }
            group.quiesce_follower(vote, last, others);
            quiesced.push(offer.group);
        }
        quiesced
    }

    async fn run_events(self, mut events: mpsc::UnboundedReceiver<PeerEvent>) {
        while let Some(event) = events.recv().await {
            self.on_peer(event);
        }
    }

    /// Wakes the quiet groups `event` concerns.
    fn on_peer(&self, event: PeerEvent) {
        let me = self.liveness.node_id();
        let mut orphans = Vec::new();
        let mut woken = 0usize;
        for group in self.groups.quiet_groups() {
            if !group.is_quiet() {
                continue;
            }
            match (event, group.state()) {
                (PeerEvent::Silent(node), Quiet::Follower { vote, others, .. })
                    if vote.leader_id().voted_for() == Some(node) =>
                {
                    let answering: Vec<NodeId> = others
                        .iter()
                        .copied()
                        .filter(|n| *n != node && self.liveness.is_answering(*n))
                        .collect();
                    // Timers off before the ticker is: no campaign but the paced ones.
                    group.raft.runtime_config().elect(false);
                    group.wake(Wake::LeaderSilent);
                    let chosen = campaigner(&group.name, me, &answering);
                    orphans.push((group, chosen));
                    woken += 1;
                }
                (PeerEvent::Restarted(node), Quiet::Follower { vote, .. })
                    if vote.leader_id().voted_for() == Some(node) =>
                {
                    woken += usize::from(group.wake(Wake::LeaderRestarted));
                }
                (PeerEvent::Back(node) | PeerEvent::Restarted(node), Quiet::Leader { voters })
                    if voters.iter().any(|(n, _)| *n == node) =>
                {
                    woken += usize::from(wake_leader(&group));
                }
                _ => {}
            }
        }
        if woken > 0 {
            tracing::info!(?event, groups = woken, "woke quiescent groups");
        }
        if let PeerEvent::Silent(silent) = event
            && !orphans.is_empty()
        {
            tokio::spawn(self.clone().campaign(silent, orphans));
        }
    }

    /// Elects new leaders for `orphans` (groups whose leader on `silent` went silent, each
    /// with the survivor chosen to campaign), paced as the module docs say.
    async fn campaign(self, silent: NodeId, orphans: Vec<(std::sync::Arc<QuietGroup>, NodeId)>) {
        let me = self.liveness.node_id();
        let start = Instant::now();
        // Each with when this agent last campaigned for it.
        let mut orphans: Vec<_> = orphans.into_iter().map(|(g, c)| (g, c, None)).collect();
        loop {
            orphans.retain(|(group, _, _)| {
                let led = group
                    .raft
                    .metrics()
                    .borrow()
                    .current_leader
                    .is_some_and(|leader| leader != silent);
                if led {
                    group.raft.runtime_config().elect(true);
                }
                !led
            });
            if orphans.is_empty() {
                return;
            }
            let waited = start.elapsed();
            if waited >= CAMPAIGN_DEADLINE {
                for (group, _, _) in &orphans {
                    group.raft.runtime_config().elect(true);
                }
                return;
            }
            let now = Instant::now();
            let mut started = 0;
            for (group, chosen, last) in &mut orphans {
                if started == CAMPAIGNS_PER_ROUND {
                    break;
                }
                let mine = *chosen == me
                    || (waited >= TAKEOVER_AFTER && !self.liveness.is_answering(*chosen));
                let due =
                    last.is_none_or(|at: Instant| now.duration_since(at) >= CAMPAIGN_INTERVAL);
                if mine && due {
                    *last = Some(now);
                    started += 1;
                    let raft = group.raft.clone();
                    tokio::spawn(async move {
                        let _ = raft.trigger().elect().await;
                    });
                }
            }
            tokio::time::sleep(CAMPAIGN_ROUND).await;
        }
    }
}

/// Wakes a quiet leader whose follower is back and heartbeats at once rather than at the
/// next tick: if the others elected a leader meanwhile (this agent may have been the silent
/// one), the answer is the higher vote and this one steps down now.
fn wake_leader(group: &QuietGroup) -> bool {
    let woke = group.wake(Wake::FollowerBack);
    if woke {
        let raft = group.raft.clone();
        tokio::spawn(async move {
            let _ = raft.trigger().heartbeat().await;
        });
    }
    woke
}

/// A settled group this agent leads, as the sweep offers it.
struct Settled {
    /// The offer its followers check.
    offer: pb::QuietGroup,
    /// Followers (node, peer address) at the leader's last entry.
    matched: Vec<(NodeId, String)>,
    /// Followers behind it (or never heard from): at most a minority.
    behind: Vec<(NodeId, String)>,
}

/// `group` as the sweep offers it, when this agent leads it and it is settled: everything
/// committed and applied, one configuration of voters only, and a majority of the voters (this
/// one included) at the leader's last entry.
fn settled_leader(group: &QuietGroup, me: NodeId) -> Option<Settled> {
    let metrics = group.raft.metrics();
    let m = metrics.borrow();
    if m.state != ServerState::Leader || m.current_leader != Some(me) {
        return None;
    }
    let membership = m.membership_config.membership();
    if membership.get_joint_config().len() != 1
        || membership.learner_ids().next().is_some()
        || !membership.voter_ids().any(|n| n == me)
    {
        return None;
    }
    let last = m.last_log_index?;
    if m.last_applied.map(|l| l.index) != Some(last) {
        return None;
    }
    let replication = m.replication.as_ref()?;
    let (mut matched, mut behind) = (Vec::new(), Vec::new());
    for node in membership.voter_ids().filter(|n| *n != me) {
        let follower = (node, membership.get_node(&node)?.addr.clone());
        let at_last = replication
            .get(&node)
            .and_then(|m| m.as_ref())
            .is_some_and(|m| m.index == last);
        if at_last {
            matched.push(follower);
        } else {
            behind.push(follower);
        }
    }
    let voters = matched.len() + behind.len() + 1;
    if (matched.len() + 1) * 2 <= voters {
        return None;
    }
    let last_log_id = m.last_applied;
    Some(Settled {
        offer: pb::QuietGroup {
            group: group.name.clone(),
            vote: Some(codec::vote_to_pb(&m.vote)),
            last_log_id: codec::opt_log_id_to_pb(&last_log_id),
        },
        matched,
        behind,
    })
}

/// The survivor that campaigns at once for `group` when its leader went silent: one of `me`
/// and `others`, by a hash of the group's name every survivor computes alike.
fn campaigner(group: &str, me: NodeId, others: &[NodeId]) -> NodeId {
    let mut survivors: Vec<NodeId> = others.iter().copied().chain([me]).collect();
    survivors.sort_unstable();
    survivors.dedup();
    let hash = super::group_hash(group);
    survivors[(hash % survivors.len() as u64) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_survivor_picks_the_same_campaigner_and_the_picks_spread() {
        let mut picks = BTreeMap::<NodeId, usize>::new();
        for i in 0..300 {
            let group = format!("q{i}/0");
            let from_1 = campaigner(&group, 1, &[2]);
            let from_2 = campaigner(&group, 2, &[1]);
            assert_eq!(from_1, from_2, "{group}");
            *picks.entry(from_1).or_default() += 1;
        }
        assert_eq!(picks.len(), 2, "{picks:?}");
        assert!(picks.values().all(|n| *n > 100), "{picks:?}");
    }
}
