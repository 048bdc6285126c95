//! Where the replicas of a queue live and which of them should lead (decision 0014).
//!
//! Placement is a pure function of the queue name, the replication factor and the node set, so
//! every agent computes the same answer from the catalog without asking anyone. Every
//! partition of a queue shares the queue's replica set and preferred leader: leadership stays
//! queue-affine (one agent serves a queue's publishers and consumers) and an agent hosts all of
//! a queue or none of it.
//!
//! The set is chosen by rendezvous (highest-random-weight) hashing: each node scores
//! `hash(queue, node)` and the `replication_factor` best scores win, best first. Adding a node
//! moves only the queues where it now scores among the best (about `rf / n` of the replicas);
//! removing one moves only the queues it held. The hash is crc32 of the name mixed with the
//! node id through a 64-bit finaliser: stable across processes, versions and platforms (std's
//! hasher is randomised per process, which would make agents disagree).

/// The replica set of `queue`, preferred leader first: `replication_factor` distinct members
/// of `nodes` (fewer when there are fewer nodes; at least one when `nodes` is not empty; none
/// when it is). The order of `nodes` and duplicates in it do not matter.
pub fn replica_set(queue: &str, replication_factor: u32, nodes: &[u64]) -> Vec<u64> {
    let mut ring = nodes.to_vec();
    ring.sort_unstable();
    ring.dedup();
    let rf = (replication_factor.max(1) as usize).min(ring.len());
    let name = u64::from(crc32fast::hash(queue.as_bytes()));
    // Ties (practically impossible over 64 bits) fall to the lower node id, so the order is
    // total and every agent agrees.
    ring.sort_by_key(|node| (std::cmp::Reverse(score(name, *node)), *node));
    ring.truncate(rf);
    ring
}

/// The replicas of `partition` of `queue`, preferred leader first. Every partition of a queue
/// shares the queue's [`replica_set`]; the partition is named so callers state what they
/// place.
pub fn placement(queue: &str, partition: u32, replication_factor: u32, nodes: &[u64]) -> Vec<u64> {
    let _ = partition;
    replica_set(queue, replication_factor, nodes)
}

/// The weight of `node` for the queue whose name hashes to `name`.
fn score(name: u64, node: u64) -> u64 {
    mix(mix(name).wrapping_add(node.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// The finaliser of MurmurHash3 (fmix64): spreads crc32's linear structure over all 64 bits, so
/// names that differ in one character land on unrelated agents.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// Counts per node of preferred leaderships and of replicas over `queues` queues.
    fn tally(
        nodes: &[u64],
        queues: usize,
        rf: u32,
    ) -> (BTreeMap<u64, usize>, BTreeMap<u64, usize>) {
        let mut leaders: BTreeMap<u64, usize> = nodes.iter().map(|n| (*n, 0)).collect();
        let mut replicas = leaders.clone();
        for q in 0..queues {
            let placed = replica_set(&format!("queue-{q}"), rf, nodes);
            *leaders.entry(placed[0]).or_default() += 1;
            for r in placed {
                *replicas.entry(r).or_default() += 1;
            }
        }
        (leaders, replicas)
    }

    /// Asserts every count is within `percent` % of the mean.
    fn assert_within(counts: &BTreeMap<u64, usize>, percent: usize, what: &str) {
        let total: usize = counts.values().sum();
        let mean = total / counts.len();
        for (node, count) in counts {
            assert!(
                count.abs_diff(mean) * 100 <= mean * percent,
                "{what}: node {node} has {count}, mean {mean}: {counts:?}"
            );
        }
    }

    #[test]
    fn each_queue_gets_replication_factor_distinct_members_of_the_node_set() {
        let nodes = [0, 1, 2, 3, 4];
        for rf in 1..=5 {
            for q in 0..100 {
                let placed = replica_set(&format!("q{q}"), rf, &nodes);
                assert_eq!(placed.len(), rf as usize);
                let distinct: BTreeSet<u64> = placed.iter().copied().collect();
                assert_eq!(distinct.len(), rf as usize, "{placed:?}");
                assert!(distinct.iter().all(|n| nodes.contains(n)));
            }
        }
    }

    #[test]
    fn all_partitions_of_a_queue_share_its_replica_set_and_preferred_leader() {
        let nodes = [0, 1, 2, 3, 4];
        for q in 0..100 {
            let name = format!("orders-{q}");
            let set = replica_set(&name, 3, &nodes);
            for p in 0..16 {
                assert_eq!(placement(&name, p, 3, &nodes), set, "{name}/{p}");
            }
        }
    }

    #[test]
    fn placement_is_deterministic_and_ignores_node_order_and_duplicates() {
        assert_eq!(
            replica_set("orders", 2, &[2, 0, 1, 1]),
            replica_set("orders", 2, &[0, 1, 2])
        );
        // Pinned: a change here moves every existing queue's replicas on upgrade.
        let five = [0, 1, 2, 3, 4];
        assert_eq!(replica_set("orders", 3, &five), PINNED_ORDERS.to_vec());
        assert_eq!(replica_set("payments", 3, &five), PINNED_PAYMENTS.to_vec());
    }

    const PINNED_ORDERS: [u64; 3] = [4, 2, 3];
    const PINNED_PAYMENTS: [u64; 3] = [4, 3, 1];

    #[test]
    fn fewer_nodes_than_the_factor_or_none_are_handled() {
        assert_eq!(replica_set("q", 3, &[7]), vec![7]);
        assert_eq!(replica_set("q", 0, &[4, 5]).len(), 1);
        assert!(replica_set("q", 3, &[]).is_empty());
    }

    #[test]
    fn over_300_queues_on_5_agents_replicas_and_leaderships_are_within_20_percent_of_the_mean() {
        let nodes = [0, 1, 2, 3, 4];
        let (leaders, replicas) = tally(&nodes, 300, 3);
        assert_within(&replicas, 20, "replicas");
        assert_within(&leaders, 20, "preferred leaderships");
    }

    #[test]
    fn adding_a_sixth_agent_moves_about_rf_over_six_of_the_replicas_and_only_onto_it() {
        let five = [0, 1, 2, 3, 4];
        let six = [0, 1, 2, 3, 4, 5];
        let (queues, rf) = (300, 3u32);
        let mut moved = 0;
        for q in 0..queues {
            let name = format!("queue-{q}");
            let before: BTreeSet<u64> = replica_set(&name, rf, &five).into_iter().collect();
            let after: BTreeSet<u64> = replica_set(&name, rf, &six).into_iter().collect();
            let added: Vec<u64> = after.difference(&before).copied().collect();
            assert!(
                added.iter().all(|n| *n == 5),
                "{name}: {before:?} -> {after:?}"
            );
            moved += added.len();
        }
        // The new agent takes its fair share, rf/6 of all replicas, and nothing else moves.
        let total = queues * rf as usize;
        let fair = total / 6;
        assert!(
            moved.abs_diff(fair) * 100 <= fair * 20,
            "moved {moved} of {total}, fair {fair}"
        );
    }

    #[test]
    fn removing_an_agent_moves_only_the_queues_it_held() {
        let five = [0, 1, 2, 3, 4];
        let four = [0, 1, 2, 4];
        for q in 0..300 {
            let name = format!("queue-{q}");
            let before = replica_set(&name, 3, &five);
            let after = replica_set(&name, 3, &four);
            if !before.contains(&3) {
                assert_eq!(before, after, "{name} did not hold agent 3 but moved");
            } else {
                let kept: Vec<u64> = before.iter().copied().filter(|n| *n != 3).collect();
                assert!(
                    kept.iter().all(|n| after.contains(n)),
                    "{name}: {before:?} -> {after:?}"
                );
            }
        }
    }
}
