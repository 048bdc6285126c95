//! Day-2 operations through the real controllers while a client publishes and consumes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::real_cluster::{ControlPlane, eventually};
use crate::support::workload::{self, Ledger};
use crate::{ACT_TIMEOUT, Installed, apply_example, get_mq, patch_orders};
use serde_json::{Value, json};

/// The `controller-revision-hash` of each agent pod that exists and is Ready, and the
/// StatefulSet's `updateRevision`.
fn agent_revisions(plane: &ControlPlane) -> (Vec<(String, String)>, String) {
    let pods: Value = serde_json::from_str(&plane.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        "default",
        "-l",
        "app.kubernetes.io/instance=orders",
        "-o",
        "json",
    ]))
    .expect("JSON");
    let ready = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|pod| {
            pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .map(|pod| {
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            let revision = pod["metadata"]["labels"]["controller-revision-hash"]
                .as_str()
                .unwrap_or_default();
            (name.to_owned(), revision.to_owned())
        })
        .collect();
    // Empty until the operator has created the StatefulSet (a loaded machine can be slower to
    // get there than the test is to ask).
    let out = plane.kubectl(&[
        "get",
        "statefulset",
        "orders",
        "-n",
        "default",
        "-o",
        "jsonpath={.status.updateRevision}",
    ]);
    let update = if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        String::new()
    };
    (ready, update)
}

/// Waits until exactly `agents` agent pods are Ready on the StatefulSet's update revision and
/// `kubectl get mq` prints READY `agents/agents`; returns that revision.
async fn await_agents(plane: &ControlPlane, agents: usize, what: &str) -> String {
    eventually(what, DAY_TWO_TIMEOUT, || {
        let (ready, update) = agent_revisions(plane);
        let settled = ready.len() == agents
            && !update.is_empty()
            && ready.iter().all(|(_, r)| *r == update)
            && get_mq(plane, "default", "orders").contains(&format!(" {agents}/{agents} "));
        settled.then_some(update)
    })
    .await
}

/// How long one day-2 operation may take on the real controllers (a rolling restart hands
/// off, stops and restarts three agents one at a time).
const DAY_TWO_TIMEOUT: Duration = Duration::from_secs(300);

/// Day 2 on the real controllers while a client publishes and consumes throughout: a change
/// of the pod template (the operator restarts one pod at a time, each stop running the
/// `preStop` hand-off), 3 → 5 → 3 agents (the real StatefulSet controller creates the pods and,
/// after the operator's drain, deletes the leaving claims), and storage growth (the claims
/// are expanded). Nothing confirmed is lost and no acked message comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn day_two_operations_run_through_the_real_controllers_under_load() {
    let installed = Installed::start().await;
    let Installed {
        operator, plane, ..
    } = &installed;
    apply_example(plane, "messagequeue-small.yaml");
    let first = await_agents(plane, 3, "READY 3/3").await;

    // The three agents that stay throughout: scale-in removes the highest ordinals.
    let endpoints = installed.agent_endpoints(3);
    let client = sluice_client::Client::connect_any(&endpoints)
        .await
        .expect("connect");
    let ledger = Ledger::default();
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(workload::publish(
        client,
        "orders".into(),
        "k".into(),
        ledger.clone(),
        stop.clone(),
    ));
    let consumer = tokio::spawn(workload::consume(
        endpoints.clone(),
        "orders".into(),
        ledger.clone(),
        stop.clone(),
    ));
    let steady = Duration::from_secs(60);
    ledger.await_confirms(200, steady).await;

    // A pod-template change: every pod restarts onto the new revision, one at a time.
    patch_orders(
        plane,
        &json!({"spec": {"resources": {"requests": {"cpu": "20m", "memory": "64Mi"}}}}),
    );
    eventually(
        "the template change makes a new revision",
        ACT_TIMEOUT,
        || {
            let update = agent_revisions(plane).1;
            (!update.is_empty() && update != first).then_some(())
        },
    )
    .await;
    await_agents(plane, 3, "every agent restarted onto the new revision").await;
    eprintln!("rolled: {:?}", ledger.summary());
    ledger.await_confirms(200, steady).await;

    // 3 → 5 → 3.
    for (agents, what) in [(5, "scaled out to 5"), (3, "scaled in to 3")] {
        patch_orders(plane, &json!({"spec": {"replicas": agents}}));
        await_agents(plane, agents, what).await;
        eprintln!("{what}: {:?}", ledger.summary());
        ledger.await_confirms(200, steady).await;
    }
    eventually(
        "the leaving agents' claims are deleted",
        ACT_TIMEOUT,
        || {
            let claims = plane.kubectl_ok(&["get", "pvc", "-n", "default", "-o", "name"]);
            (!claims.contains("data-orders-3") && !claims.contains("data-orders-4")).then_some(())
        },
    )
    .await;

    // Storage growth: every claim is expanded in place.
    patch_orders(plane, &json!({"spec": {"storage": {"size": "2Gi"}}}));
    eventually("every claim has 2Gi", DAY_TWO_TIMEOUT, || {
        let sizes = plane.kubectl_ok(&[
            "get",
            "pvc",
            "-n",
            "default",
            "-o",
            "jsonpath={.items[*].status.capacity.storage}",
        ]);
        (sizes.split_whitespace().collect::<Vec<_>>() == ["2Gi"; 3]).then_some(())
    })
    .await;
    ledger.await_confirms(200, steady).await;

    stop.store(true, Ordering::Relaxed);
    publisher.await.expect("publisher");
    tokio::time::timeout(Duration::from_secs(120), consumer)
        .await
        .unwrap_or_else(|_| panic!("the consumer did not drain: {:?}", ledger.summary()))
        .expect("consumer");
    let summary = ledger.summary();
    eprintln!(
        "day 2 under load: confirmed {} consumed {} acked {} redelivered {}",
        summary.confirmed, summary.consumed, summary.acked, summary.redeliveries
    );
    summary.assert_guarantees();
    operator.assert_never_forbidden();
}
