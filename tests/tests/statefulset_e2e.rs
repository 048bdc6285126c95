//! The pods of the operator's StatefulSet run as local processes (see `e2e/pods.rs` for how
//! the pod network and volumes are emulated) form a working cluster, and the operator's own
//! day-2 logic — `day2::decide` and `day2::agents::perform`, the functions reconcile calls —
//! drives a rolling restart, a scale-out 3→4 and a scale-in 4→3 while a client publishes and
//! consumes, with nothing confirmed lost and no acked message back. The harness plays the
//! StatefulSet controller and the kubelet: it starts and stops processes as the StatefulSet
//! and its pods change.
//!
//! Run: `cargo test -p sluice-e2e --test statefulset_e2e -- --nocapture` (about a minute; it
//! builds `sluice-agent` first). Pod stderr is printed when it fails.

mod e2e;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e::pods::{Kubelet, LoopbackAddresses};
use sluice_operator::agent_admin::{AgentAdmin, GrpcAgentAdmin};
use sluice_operator::builders::{configmap, statefulset};
use sluice_operator::crd::MessageQueue;
use sluice_operator::day2::{self, Membership, Snapshot, Step, agents::AgentAddresses as _};
use sluice_operator::names::Names;
use sluice_operator::settings::Settings;
use support::workload::{self, Ledger};

/// Longest a day-2 operation may take to settle.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(120);
/// The operator's requeue while a step is under way, shortened for the test.
const PASS_PAUSE: Duration = Duration::from_millis(300);

fn message_queue(replicas: i32, image: &str) -> MessageQueue {
    let mut mq: MessageQueue = serde_json::from_value(serde_json::json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "MessageQueue",
        "metadata": {"name": "orders", "namespace": "shop", "uid": "0b6a2c1e-1111-4222-8333-444455556666"},
        "spec": {"replicas": replicas, "image": image,
                 "queues": [{"name": "orders", "partitions": 1, "replicationFactor": 3, "ackTimeout": "30s"}]},
    }))
    .expect("MessageQueue");
    mq.metadata.generation = Some(1);
    mq
}

/// The operator's view of the harness's cluster, one reconcile pass's worth.
async fn snapshot(
    kubelet: &mut Kubelet,
    mq: &MessageQueue,
    names: &Names,
) -> (Snapshot, LoopbackAddresses) {
    let pods = kubelet.pod_states().await;
    let addresses = LoopbackAddresses {
        ready: pods.iter().filter(|p| p.ready).map(|p| p.ordinal).collect(),
    };
    let membership = if addresses.ready.is_empty() {
        Membership::Unreadable("no agent is ready".into())
    } else {
        match GrpcAgentAdmin.cluster(&addresses.cluster()).await {
            Ok(view) => Membership::Known(view),
            Err(e) => Membership::Unreadable(e.to_string()),
        }
    };
    let snapshot = Snapshot {
        desired: mq.spec.replicas,
        current: kubelet.replicas(),
        replication_factor: statefulset::replication_factor(mq, names),
        update_revision: Some(e2e::pods::template_revision(kubelet.statefulset())),
        pods,
        membership,
    };
    (snapshot, addresses)
}

/// Reconciles `mq` until the day-2 logic says Steady: each pass rebuilds the StatefulSet with
/// the operator's builders and the step's replicas, lets the "StatefulSet controller" start or
/// stop pods, and carries out the step. Returns the steps taken (waits excluded).
async fn reconcile_until_steady(kubelet: &mut Kubelet, mq: &MessageQueue) -> Vec<Step> {
    let names = Names::of(mq).expect("names");
    let deadline = Instant::now() + OPERATION_TIMEOUT;
    let mut taken = Vec::new();
    loop {
        kubelet.sync();
        let (snapshot, addresses) = snapshot(kubelet, mq, &names).await;
        let step = day2::decide(&snapshot);
        let replicas = match &step {
            Step::Scale { replicas, .. } => *replicas,
            _ => snapshot.current,
        };
        let shape = statefulset::Shape::of_existing(mq, kubelet.statefulset(), replicas);
        let sts =
            statefulset::build(mq, &names, &Settings::default(), &shape).expect("StatefulSet");
        // Like the API server, a changed template gets a new revision the next pass sees.
        let changed = e2e::pods::template_revision(&sts)
            != e2e::pods::template_revision(kubelet.statefulset());
        kubelet.apply(sts);
        match &step {
            Step::Steady if changed => continue,
            Step::Steady => return taken,
            Step::Wait(progress) => {
                assert!(
                    Instant::now() < deadline,
                    "no progress within {OPERATION_TIMEOUT:?}: {progress:?}"
                );
                tokio::time::sleep(PASS_PAUSE).await;
                continue;
            }
            Step::RefuseScaleIn(progress) => panic!("scale-in refused: {progress:?}"),
            Step::Scale { .. } => {}
            Step::Add(_) | Step::Drain(_) | Step::Remove(_) | Step::Restart(_) => {
                let outcome = day2::agents::perform(&GrpcAgentAdmin, &addresses, &step).await;
                match outcome {
                    Ok(day2::agents::Outcome::Done(note)) => {
                        eprintln!("operator: {note}");
                        if let Step::Restart(i) = step {
                            kubelet.delete_pod(i);
                        }
                    }
                    Ok(other) => {
                        eprintln!("operator: {step:?} not done yet: {other:?}");
                        tokio::time::sleep(PASS_PAUSE).await;
                        continue;
                    }
                    Err(e) => {
                        // Reconcile would back off and retry; so does the harness.
                        assert!(Instant::now() < deadline, "{step:?} kept failing: {e}");
                        eprintln!("operator: {step:?} failed, retrying: {e}");
                        tokio::time::sleep(PASS_PAUSE).await;
                        continue;
                    }
                }
            }
        }
        eprintln!("operator: step {step:?}");
        taken.push(step);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statefulset_runs_as_a_cluster_and_survives_rolling_restart_scale_out_and_scale_in() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut mq = message_queue(3, "ghcr.io/sluice/agent:1");
    let names = Names::of(&mq).expect("names");
    let settings = Settings::default();
    let cm = configmap::build(&mq, &names).expect("ConfigMap");
    let sts = statefulset::build(&mq, &names, &settings, &statefulset::Shape::initial(&mq))
        .expect("StatefulSet");
    let mut kubelet = Kubelet::new(dir.path(), names.clone(), &settings.cluster_domain, cm, sts);

    // Phase 1: the three pods form a cluster that serves the ConfigMap's queue.
    let steps = reconcile_until_steady(&mut kubelet, &mq).await;
    assert!(
        steps.is_empty(),
        "a fresh cluster needs no day-2 step: {steps:?}"
    );
    let client = sluice_client::Client::connect_any(&kubelet.endpoints())
        .await
        .expect("connect");
    let queues = client.list_queues().await.expect("list queues");
    assert_eq!(
        queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(),
        vec!["orders"],
        "declared from the ConfigMap"
    );

    // Phase 2: a client publishes and consumes throughout.
    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(workload::publish(
        client.clone(),
        "orders".into(),
        "k".into(),
        ledger.clone(),
        stop.clone(),
    ));
    let consumer = tokio::spawn(workload::consume(
        kubelet.endpoints(),
        "orders".into(),
        ledger.clone(),
        stop.clone(),
    ));
    ledger.await_confirms(200, Duration::from_secs(30)).await;

    // Phase 3: a template change rolls every pod, one at a time, highest first.
    mq = message_queue(3, "ghcr.io/sluice/agent:2");
    let steps = reconcile_until_steady(&mut kubelet, &mq).await;
    assert_eq!(
        steps,
        vec![Step::Restart(2), Step::Restart(1), Step::Restart(0)]
    );
    ledger.await_confirms(200, Duration::from_secs(30)).await;

    // Phase 4: scale-out 3 -> 4.
    mq.spec.replicas = 4;
    let steps = reconcile_until_steady(&mut kubelet, &mq).await;
    assert!(
        matches!(steps[0], Step::Scale { replicas: 4, .. }),
        "{steps:?}"
    );
    assert_eq!(steps[1..], [Step::Add(3)]);
    assert_eq!(kubelet.replicas(), 4);
    ledger.await_confirms(200, Duration::from_secs(30)).await;

    // Phase 5: scale-in 4 -> 3.
    mq.spec.replicas = 3;
    let steps = reconcile_until_steady(&mut kubelet, &mq).await;
    assert_eq!(steps[..2], [Step::Drain(3), Step::Remove(3)], "{steps:?}");
    assert!(
        matches!(steps[2], Step::Scale { replicas: 3, .. }),
        "{steps:?}"
    );
    kubelet.sync();
    assert_eq!(kubelet.endpoints().len(), 3);
    // Every stopped pod (3 restarts, 1 scale-in) ran the container's preStop hand-off first,
    // and each found its agent and left it leading nothing.
    assert_eq!(kubelet.pre_stops().len(), 4, "{:?}", kubelet.pre_stops());
    assert!(
        kubelet.pre_stops().iter().all(|(_, code)| *code == Some(0)),
        "a preStop hand-off failed: {:?}",
        kubelet.pre_stops()
    );
    ledger.await_confirms(200, Duration::from_secs(30)).await;

    // Phase 6: stop publishing, let the consumer drain, judge.
    stop.store(true, Ordering::Relaxed);
    publisher.await.expect("publisher");
    tokio::time::timeout(Duration::from_secs(60), consumer)
        .await
        .unwrap_or_else(|_| panic!("consumer did not drain: {:?}", ledger.summary()))
        .expect("consumer");
    let summary = ledger.summary();
    eprintln!(
        "confirmed {} consumed {} acked {} redeliveries {}",
        summary.confirmed, summary.consumed, summary.acked, summary.redeliveries
    );
    summary.assert_guarantees();
}
