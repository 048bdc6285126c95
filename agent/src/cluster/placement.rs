//! Where the replicas of a partition live and which of them should lead.
//!
//! Placement is a pure function of the queue name, the partition and the node set, so every
//! agent computes the same answer without asking anyone. Two goals:
//! - queue-affine leadership: every partition of a queue prefers the same leader, so one agent
//!   serves a queue's publishers and consumers without hopping;
//! - spread: different queues prefer different agents (by a hash of the name), and the
//!   followers of a queue's partitions rotate over the other agents, so replicas are even.
//!
//! The hash is crc32 of the name, finished with a 64-bit mixer: stable across processes,
//! versions and platforms (std's hasher is randomised per process, which would make agents
//! disagree).

/// The replicas of `partition` of `queue`, preferred leader first: `replication_factor` distinct
/// members of `nodes` (fewer when there are fewer nodes; none when `nodes` is empty). The order
/// of `nodes` and duplicates in it do not matter.
pub fn placement(queue: &str, partition: u32, replication_factor: u32, nodes: &[u64]) -> Vec<u64> {
    let mut ring = nodes.to_vec();
    ring.sort_unstable();
    ring.dedup();
    let n = ring.len();
    if n == 0 {
        return Vec::new();
    }
    let rf = (replication_factor.max(1) as usize).min(n);
    let hash = mix(u64::from(crc32fast::hash(queue.as_bytes())));
    let leader = (hash % n as u64) as usize;
    let mut replicas = Vec::with_capacity(rf);
    replicas.push(ring[leader]);
    let others = n - 1;
    if rf > 1 {
        // Followers are rf-1 consecutive members of the ring after the leader, starting at an
        // offset that moves by rf-1 per partition (and differs per queue), so successive
        // partitions use the other agents in turn.
        let start = ((hash >> 32) as usize).wrapping_add(partition as usize * (rf - 1)) % others;
        for k in 0..rf - 1 {
            replicas.push(ring[(leader + 1 + (start + k) % others) % n]);
        }
    }
    replicas
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

    /// Counts per node of leaders and of all replicas over `queues` queues of `partitions` each.
    fn tally(
        nodes: &[u64],
        queues: usize,
        partitions: u32,
        rf: u32,
    ) -> (BTreeMap<u64, usize>, BTreeMap<u64, usize>) {
        let mut leaders: BTreeMap<u64, usize> = nodes.iter().map(|n| (*n, 0)).collect();
        let mut replicas = leaders.clone();
        for q in 0..queues {
            let name = format!("queue-{q}");
            for p in 0..partitions {
                let placed = placement(&name, p, rf, nodes);
                *leaders.entry(placed[0]).or_default() += 1;
                for r in placed {
                    *replicas.entry(r).or_default() += 1;
                }
            }
        }
        (leaders, replicas)
    }

    fn spread(counts: &BTreeMap<u64, usize>) -> (usize, usize) {
        let max = counts.values().copied().max().unwrap_or(0);
        let min = counts.values().copied().min().unwrap_or(0);
        (min, max)
    }

    #[test]
    fn every_partition_gets_replication_factor_distinct_members() {
        let nodes = [0, 1, 2, 3, 4];
        for rf in 1..=5 {
            for q in 0..50 {
                for p in 0..8 {
                    let placed = placement(&format!("q{q}"), p, rf, &nodes);
                    assert_eq!(placed.len(), rf as usize);
                    let distinct: BTreeSet<u64> = placed.iter().copied().collect();
                    assert_eq!(distinct.len(), rf as usize, "{placed:?}");
                    assert!(distinct.iter().all(|n| nodes.contains(n)));
                }
            }
        }
    }

    #[test]
    fn all_partitions_of_a_queue_prefer_the_same_leader() {
        let nodes = [0, 1, 2];
        for q in 0..100 {
            let name = format!("orders-{q}");
            let leader = placement(&name, 0, 3, &nodes)[0];
            for p in 1..16 {
                assert_eq!(placement(&name, p, 3, &nodes)[0], leader, "{name}/{p}");
            }
        }
    }

    #[test]
    fn placement_is_deterministic_and_ignores_node_order_and_duplicates() {
        assert_eq!(
            placement("orders", 3, 2, &[2, 0, 1, 1]),
            placement("orders", 3, 2, &[0, 1, 2])
        );
        // Pinned: a change here moves every existing queue's replicas on upgrade.
        let three = [0, 1, 2];
        let five = [0, 1, 2, 3, 4];
        assert_eq!(placement("orders", 0, 3, &three), vec![0, 1, 2]);
        assert_eq!(placement("payments", 0, 3, &three), vec![0, 2, 1]);
        assert_eq!(placement("audit", 2, 3, &three), vec![2, 1, 0]);
        assert_eq!(placement("orders", 0, 3, &five), vec![3, 4, 0]);
        assert_eq!(placement("orders", 1, 3, &five), vec![3, 1, 2]);
        assert_eq!(placement("payments", 0, 3, &five), vec![0, 4, 1]);
    }

    #[test]
    fn fewer_nodes_than_the_factor_or_none_are_handled() {
        assert_eq!(placement("q", 0, 3, &[7]), vec![7]);
        assert_eq!(placement("q", 0, 0, &[4, 5]).len(), 1);
        assert!(placement("q", 0, 3, &[]).is_empty());
    }

    #[test]
    fn leaders_spread_evenly_over_many_queues() {
        for nodes in [vec![0, 1, 2], vec![0, 1, 2, 3, 4]] {
            let queues = 2000 * nodes.len();
            let (leaders, _) = tally(&nodes, queues, 1, 3);
            let (min, max) = spread(&leaders);
            let mean = queues / nodes.len();
            // A hash spreads like a fair die: at this many queues one agent's share varies by
            // ~2 % of the mean, so max-min stays well within 10 % (measured: 1.8 % and 5.6 %).
            assert!(max - min <= mean / 10, "leaders {leaders:?}");
        }
    }

    #[test]
    fn replicas_spread_evenly_over_many_queues_and_partitions() {
        for (nodes, rf) in [(vec![0, 1, 2, 3, 4], 3), (vec![0, 1, 2, 3], 2)] {
            let (_, replicas) = tally(&nodes, 2000, 4, rf);
            let (min, max) = spread(&replicas);
            let mean = 2000 * 4 * rf as usize / nodes.len();
            assert!(max - min <= mean / 10, "replicas {replicas:?}");
        }
    }

    #[test]
    fn a_queue_with_as_many_partitions_as_followers_uses_every_agent() {
        let nodes = [0, 1, 2, 3, 4];
        let mut used = BTreeSet::new();
        for p in 0..2 {
            used.extend(placement("orders", p, 3, &nodes));
        }
        assert_eq!(used.len(), 5, "{used:?}");
    }
}
