use k8s_openapi::{
    api::apps::v1::{StatefulSet, StatefulSetStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::Timestamp,
};

use super::*;
use crate::{
    agent_admin::PartitionStats,
    builders::test_mq,
    crd::{condition_reasons as reasons, condition_types as types},
};

fn now() -> Time {
    Time(Timestamp::from_second(1_700_000_000).unwrap())
}

fn sts(generation: i64, ready: i32, updated: i32) -> StatefulSet {
    StatefulSet {
        metadata: ObjectMeta {
            generation: Some(generation),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(StatefulSetStatus {
            observed_generation: Some(generation),
            replicas: 3,
            ready_replicas: Some(ready),
            updated_replicas: Some(updated),
            current_revision: Some("r1".into()),
            update_revision: Some("r1".into()),
            ..StatefulSetStatus::default()
        }),
    }
}

fn cond<'a>(s: &'a MessageQueueStatus, type_: &str) -> &'a Condition {
    s.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

fn status_for(spec: serde_json::Value, observed: Observed) -> MessageQueueStatus {
    let mut mq = test_mq(spec);
    mq.metadata.generation = Some(4);
    let names = Names::of(&mq).unwrap();
    desired_status(&mq, &names, &observed, now())
}

#[test]
fn all_agents_ready_means_ready_stable_and_fully_replicated() {
    let s = status_for(
        serde_json::json!({"replicas": 3}),
        Observed {
            statefulset: Some(sts(1, 3, 3)),
            queue_stats: None,
            day2: None,
        },
    );
    assert_eq!(s.observed_generation, Some(4));
    assert_eq!(s.ready_replicas, 3);
    assert_eq!(s.replicas_summary, "3/3");
    assert_eq!(
        (
            cond(&s, types::READY).status.as_str(),
            cond(&s, types::READY).reason.as_str()
        ),
        ("True", reasons::ALL_REPLICAS_READY)
    );
    assert_eq!(cond(&s, types::PROGRESSING).status, "False");
    assert_eq!(cond(&s, types::DEGRADED).reason, reasons::FULLY_REPLICATED);
    assert_eq!(
        s.selector,
        "app.kubernetes.io/instance=orders,app.kubernetes.io/name=sluice-agent"
    );
}

#[test]
fn missing_statefulset_is_pending_and_progressing() {
    let s = status_for(serde_json::json!({}), Observed::default());
    assert_eq!(cond(&s, types::READY).reason, reasons::STATEFULSET_PENDING);
    assert_eq!(cond(&s, types::PROGRESSING).status, "True");
    let degraded = cond(&s, types::DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("False", reasons::STATEFULSET_PENDING)
    );
}

#[test]
fn one_agent_down_of_three_is_under_replicated_but_keeps_quorum() {
    let s = status_for(
        serde_json::json!({"replicas": 3}),
        Observed {
            statefulset: Some(sts(1, 2, 3)),
            queue_stats: None,
            day2: None,
        },
    );
    assert_eq!(
        cond(&s, types::READY).reason,
        reasons::STATEFULSET_NOT_READY
    );
    let degraded = cond(&s, types::DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", reasons::UNDER_REPLICATED)
    );
}

#[test]
fn two_agents_down_of_three_loses_quorum_and_says_which_queue() {
    let s = status_for(
        serde_json::json!({"replicas": 3, "queues": [{"name": "orders", "replicationFactor": 3}]}),
        Observed {
            statefulset: Some(sts(1, 1, 3)),
            queue_stats: None,
            day2: None,
        },
    );
    let degraded = cond(&s, types::DEGRADED);
    assert_eq!(degraded.reason, reasons::QUORUM_LOST);
    assert!(
        degraded.message.contains("queue orders"),
        "{}",
        degraded.message
    );
}

#[test]
fn a_leaderless_partition_reported_by_the_agents_is_quorum_lost() {
    let stats = QueueStats {
        backlog: 1234,
        in_flight: 20,
        publish_rate: 800.0,
        consumers: 2,
        partitions: vec![
            PartitionStats {
                id: 0,
                leader: Some("orders-1".into()),
                in_sync: Some(3),
            },
            PartitionStats {
                id: 1,
                leader: None,
                in_sync: None,
            },
        ],
    };
    let s = status_for(
        serde_json::json!({}),
        Observed {
            statefulset: Some(sts(1, 3, 3)),
            queue_stats: Some(vec![("orders".into(), stats)]),
            day2: None,
        },
    );
    let degraded = cond(&s, types::DEGRADED);
    assert_eq!(degraded.reason, reasons::QUORUM_LOST);
    assert!(
        degraded.message.contains("orders/1"),
        "{}",
        degraded.message
    );
    assert_eq!(s.backlog, Some(1234));
    assert_eq!(s.consumer_count, Some(2));
    assert_eq!(
        s.queues[0].partitions[0].leader.as_deref(),
        Some("orders-1")
    );
}

#[test]
fn rolling_update_is_progressing() {
    let mut rolling = sts(2, 3, 1);
    if let Some(st) = rolling.status.as_mut() {
        st.update_revision = Some("r2".into());
    }
    let s = status_for(
        serde_json::json!({}),
        Observed {
            statefulset: Some(rolling),
            queue_stats: None,
            day2: None,
        },
    );
    assert_eq!(cond(&s, types::PROGRESSING).reason, reasons::ROLLING_UPDATE);
    assert_eq!(cond(&s, types::READY).status, "False");
}

#[test]
fn unchanged_condition_keeps_its_transition_time_so_reconciles_do_not_churn() {
    let mut mq = test_mq(serde_json::json!({}));
    let names = Names::of(&mq).unwrap();
    let observed = Observed {
        statefulset: Some(sts(1, 3, 3)),
        queue_stats: None,
        day2: None,
    };
    let first = desired_status(&mq, &names, &observed, now());
    mq.status = Some(first.clone());
    let later = Time(Timestamp::from_second(1_700_000_600).unwrap());
    let second = desired_status(&mq, &names, &observed, later);
    assert_eq!(first, second);
    assert!(!is_material_change(Some(&first), &second));
}

#[test]
fn stats_unavailable_leaves_backlog_unknown_rather_than_zero() {
    let s = status_for(
        serde_json::json!({}),
        Observed {
            statefulset: Some(sts(1, 3, 3)),
            queue_stats: None,
            day2: None,
        },
    );
    assert_eq!(s.backlog, None);
    assert!(s.queues.is_empty());
}

#[test]
fn a_day2_step_under_way_or_refused_decides_the_progressing_condition() {
    let progress = |on: bool, reason: &'static str| {
        Some((
            on,
            crate::day2::Progress {
                reason,
                message: format!("{reason} detail"),
            },
        ))
    };
    let s = status_for(
        serde_json::json!({"replicas": 3}),
        Observed {
            statefulset: Some(sts(1, 3, 3)),
            queue_stats: None,
            day2: progress(true, "ScalingOut"),
        },
    );
    let p = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(
        (p.status.as_str(), p.reason.as_str()),
        ("True", "ScalingOut")
    );
    assert_eq!(p.message, "ScalingOut detail");

    let s = status_for(
        serde_json::json!({"replicas": 3}),
        Observed {
            statefulset: Some(sts(1, 3, 3)),
            queue_stats: None,
            day2: progress(false, "ScaleInRefused"),
        },
    );
    let p = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(
        (p.status.as_str(), p.reason.as_str()),
        ("False", "ScaleInRefused")
    );
}
