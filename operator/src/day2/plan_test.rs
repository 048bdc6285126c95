use super::*;
use crate::cluster_view::{AgentView, PlacementView};

fn agent(id: u64, state: AgentState) -> AgentView {
    AgentView {
        node_id: id,
        client_address: format!("orders-{id}:7070"),
        peer_address: format!("orders-{id}:7071"),
        state,
        replicas: 1,
        leaders: 0,
    }
}

fn partition(id: u32, voters: &[u64], in_sync: &[u64]) -> PlacementView {
    PlacementView {
        queue: "orders".into(),
        partition: id,
        leader: voters.first().copied(),
        voters: voters.to_vec(),
        learners: vec![],
        in_sync: in_sync.to_vec(),
    }
}

/// `n` ready pods on revision `r1`, `n` active agents, every partition in sync.
fn steady(n: i32) -> Snapshot {
    let ids: Vec<u64> = (0..n as u64).collect();
    Snapshot {
        desired: n,
        current: n,
        replication_factor: 3.min(n),
        update_revision: Some("r1".into()),
        pods: (0..n)
            .map(|ordinal| PodState {
                ordinal,
                ready: true,
                revision: Some("r1".into()),
            })
            .collect(),
        membership: Membership::Known(ClusterView {
            agents: ids.iter().map(|&i| agent(i, AgentState::Active)).collect(),
            partitions: vec![partition(
                0,
                &ids[..3.min(ids.len())],
                &ids[..3.min(ids.len())],
            )],
            replication_factor: 3,
        }),
    }
}

fn cluster(s: &mut Snapshot) -> &mut ClusterView {
    match &mut s.membership {
        Membership::Known(c) => c,
        Membership::Unreadable(_) => panic!("test snapshot has no membership"),
    }
}

fn reason(step: &Step) -> &'static str {
    step.progress().map(|(_, p)| p.reason).unwrap_or("Steady")
}

#[test]
fn a_cluster_matching_its_spec_is_steady() {
    assert_eq!(decide(&steady(3)), Step::Steady);
}

#[test]
fn scale_out_first_grows_the_statefulset_then_adds_each_new_ordinal() {
    let mut s = steady(3);
    s.desired = 5;
    let step = decide(&s);
    assert!(matches!(step, Step::Scale { replicas: 5, .. }), "{step:?}");
    assert_eq!(reason(&step), reasons::SCALING_OUT);

    s.current = 5;
    assert_eq!(decide(&s), Step::Add(3));
    cluster(&mut s).agents.push(agent(3, AgentState::Joining));
    assert_eq!(decide(&s), Step::Add(4));
}

#[test]
fn scale_out_keeps_progressing_until_every_new_agent_is_active() {
    let mut s = steady(3);
    s.desired = 4;
    s.current = 4;
    cluster(&mut s).agents.push(agent(3, AgentState::Joining));
    let step = decide(&s);
    assert_eq!(reason(&step), reasons::SCALING_OUT);
    assert!(matches!(step, Step::Wait(_)), "{step:?}");

    cluster(&mut s).agents[3].state = AgentState::Active;
    s.pods.push(PodState {
        ordinal: 3,
        ready: true,
        revision: Some("r1".into()),
    });
    assert_eq!(decide(&s), Step::Steady);
}

#[test]
fn scale_in_drains_the_highest_ordinal_then_removes_it_then_shrinks() {
    let mut s = steady(5);
    s.desired = 3;
    assert_eq!(decide(&s), Step::Drain(4));

    cluster(&mut s).agents[4].state = AgentState::Draining;
    let step = decide(&s);
    assert!(matches!(step, Step::Wait(_)), "{step:?}");
    assert_eq!(reason(&step), reasons::SCALING_IN);

    cluster(&mut s).agents[4].state = AgentState::Drained;
    assert_eq!(decide(&s), Step::Remove(4));

    cluster(&mut s).agents.pop();
    let step = decide(&s);
    assert!(matches!(step, Step::Scale { replicas: 4, .. }), "{step:?}");

    s.current = 4;
    s.pods.pop();
    assert_eq!(decide(&s), Step::Drain(3), "then the next one");
}

#[test]
fn scale_in_below_the_replication_factor_is_refused_and_changes_nothing() {
    let mut s = steady(3);
    s.desired = 2;
    let step = decide(&s);
    let Step::RefuseScaleIn(progress) = &step else {
        panic!("{step:?}")
    };
    assert!(progress.message.contains("spec.replicas 2"), "{progress:?}");
    assert!(
        progress.message.contains("replication factor 3"),
        "{progress:?}"
    );
    assert_eq!(step.progress().map(|(on, _)| on), Some(false));
}

#[test]
fn a_drain_does_not_start_while_a_surviving_pod_is_down() {
    let mut s = steady(4);
    s.desired = 3;
    s.pods[1].ready = false;
    let step = decide(&s);
    assert!(matches!(step, Step::Wait(_)), "{step:?}");

    s.pods[1].ready = true;
    s.pods[3].ready = false;
    assert_eq!(
        decide(&s),
        Step::Drain(3),
        "the leaving pod itself may be down"
    );
}

#[test]
fn rolling_update_restarts_one_outdated_pod_at_a_time_highest_first() {
    let mut s = steady(3);
    s.update_revision = Some("r2".into());
    assert_eq!(decide(&s), Step::Restart(2));

    // Pod 2 is back on r2 but not ready yet: nothing else restarts.
    s.pods[2] = PodState {
        ordinal: 2,
        ready: false,
        revision: Some("r2".into()),
    };
    let step = decide(&s);
    assert!(matches!(step, Step::Wait(_)), "{step:?}");
    assert_eq!(reason(&step), reasons::ROLLING_UPDATE);

    s.pods[2].ready = true;
    assert_eq!(decide(&s), Step::Restart(1));
}

#[test]
fn rolling_update_waits_for_every_voter_to_be_in_sync() {
    let mut s = steady(3);
    s.update_revision = Some("r2".into());
    cluster(&mut s).partitions[0].in_sync = vec![0, 1];
    let step = decide(&s);
    let Step::Wait(progress) = &step else {
        panic!("{step:?}")
    };
    assert!(progress.message.contains("orders/0"), "{progress:?}");

    cluster(&mut s).partitions[0].leader = None;
    cluster(&mut s).partitions[0].in_sync = vec![0, 1, 2];
    assert!(
        matches!(decide(&s), Step::Wait(_)),
        "a leaderless partition is not in sync"
    );
}

#[test]
fn a_missing_pod_counts_as_down() {
    let mut s = steady(3);
    s.update_revision = Some("r2".into());
    s.pods.remove(1);
    assert!(matches!(decide(&s), Step::Wait(_)));
}

#[test]
fn unreadable_membership_blocks_restarts_and_scale_in_but_not_a_steady_cluster() {
    let mut s = steady(3);
    s.membership = Membership::Unreadable("connection refused".into());
    assert_eq!(decide(&s), Step::Steady);

    s.update_revision = Some("r2".into());
    let step = decide(&s);
    let Step::Wait(progress) = &step else {
        panic!("{step:?}")
    };
    assert!(progress.message.contains("connection refused"));

    let mut s = steady(4);
    s.desired = 3;
    s.membership = Membership::Unreadable("timeout".into());
    assert!(matches!(decide(&s), Step::Wait(_)));
}

#[test]
fn an_unformed_cluster_gets_no_agents_added() {
    let mut s = steady(3);
    cluster(&mut s).agents.clear();
    assert!(matches!(decide(&s), Step::Wait(_)));
}
