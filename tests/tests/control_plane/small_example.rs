//! `examples/messagequeue-small.yaml` on the real controllers: a ready three-agent cluster
//! that carries messages, then `examples/producer-consumer.yaml` against it, then deletion.

use std::time::Duration;

use crate::real_cluster::eventually;
use crate::support;
use crate::{ACT_TIMEOUT, Installed, apply_example, get_mq};
use serde_json::{Value, json};

/// The whole path on the real control plane: `helm install`, `kubectl apply` of the small
/// example; the operator (with the chart's token) creates the children, the real StatefulSet
/// controller the pods, the scheduler binds them to the process kubelet's node, the claims are
/// provisioned and bound, the agents form a cluster, and `kubectl get mq` prints READY 3/3.
/// Messages published at one agent are consumed through another; deleting the MessageQueue
/// garbage-collects its children and keeps its claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_small_example_becomes_a_ready_three_agent_cluster() {
    let installed = Installed::start().await;
    let Installed {
        operator,
        kubelet,
        plane,
        ..
    } = &installed;
    apply_example(plane, "messagequeue-small.yaml");
    let table = eventually(
        "kubectl get mq shows READY 3/3",
        Duration::from_secs(180),
        || {
            let table = get_mq(plane, "default", "orders");
            table.contains("3/3").then_some(table)
        },
    )
    .await;
    eprintln!("{table}");
    let describe = plane.kubectl_ok(&["describe", "mq", "orders", "-n", "default"]);
    assert!(
        describe.contains("Conditions:") && describe.contains("Ready"),
        "{describe}"
    );
    assert!(describe.contains("Events:"), "{describe}");

    let endpoints = installed.agent_endpoints(3);
    let client = sluice_client::Client::connect_any(&endpoints[..1])
        .await
        .expect("connect");
    let payloads: Vec<Vec<u8>> = (0..100).map(|i| format!("m-{i}").into_bytes()).collect();
    let messages = payloads
        .iter()
        .map(|p| sluice_proto_message(p))
        .collect::<Vec<_>>();
    let confirms = client.publish("orders", messages).await.expect("publish");
    assert!(confirms.iter().all(|c| c.code == 0), "{confirms:?}");
    // The operator reads the agents through the client Service's and pods' DNS names: the
    // BACKLOG column shows what was published.
    eventually(
        "kubectl get mq shows BACKLOG 100",
        Duration::from_secs(90),
        || {
            let status: Value = serde_json::from_str(
                &plane.kubectl_ok(&["get", "mq", "orders", "-n", "default", "-o", "json"]),
            )
            .ok()?;
            (status["status"]["backlog"] == json!(100)).then_some(())
        },
    )
    .await;
    eprintln!("{}", get_mq(plane, "default", "orders"));
    let other = sluice_client::Client::connect_any(&endpoints[2..])
        .await
        .expect("connect");
    let mut consumer = other.subscribe("orders", 100).await.expect("subscribe");
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < payloads.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("a delivery within 20 s")
            .expect("no error")
            .expect("not ended");
        seen.insert(delivery.message.expect("message").payload);
        consumer.ack(delivery.tag.expect("tag")).expect("ack");
    }
    consumer.flush().await.expect("acks durable");
    drop(consumer);

    // The producer-consumer example: Deployments (the real deployment and replica-set
    // controllers) whose pods run the CLI image's shell loop and `sluice consume`, reaching the
    // queue through the client Service's short name `orders:7070`.
    let apps = support::repo_root().join("examples/producer-consumer.yaml");
    plane.kubectl_ok(&[
        "apply",
        "-n",
        "default",
        "-f",
        apps.to_str().expect("UTF-8"),
    ]);
    for deployment in ["orders-producer", "orders-consumer"] {
        plane.kubectl_ok(&[
            "wait",
            "-n",
            "default",
            "--for=condition=Available",
            &format!("deployment/{deployment}"),
            "--timeout=120s",
        ]);
    }
    let consumed = eventually(
        "the example's consumers print orders 1 to 5",
        Duration::from_secs(90),
        || {
            let pods = plane.kubectl_ok(&[
                "get",
                "pods",
                "-n",
                "default",
                "-l",
                "app.kubernetes.io/name=orders-consumer",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ]);
            let printed: String = pods
                .split_whitespace()
                .filter_map(|pod| kubelet.log("default", pod, "consumer"))
                .collect();
            let lines: std::collections::BTreeSet<&str> = printed.lines().collect();
            (1..=5)
                .all(|i| lines.contains(format!("order {i}").as_str()))
                .then(|| printed.clone())
        },
    )
    .await;
    assert!(
        !consumed.contains("error"),
        "the example's consumers reported errors:\n{consumed}"
    );
    plane.kubectl_ok(&[
        "delete",
        "-n",
        "default",
        "-f",
        apps.to_str().expect("UTF-8"),
    ]);

    // Deleting the MessageQueue: the garbage collector removes its children through their
    // owner references (the pods with the StatefulSet, their processes stopped by the
    // kubelet); the claims stay, as the README documents.
    plane.kubectl_ok(&["delete", "mq", "orders", "-n", "default", "--wait=false"]);
    eventually("the children are garbage-collected", ACT_TIMEOUT, || {
        let left = plane.kubectl_ok(&[
            "get",
            "statefulset,pod,service,configmap,serviceaccount,poddisruptionbudget",
            "-n",
            "default",
            "-l",
            "app.kubernetes.io/instance=orders",
            "-o",
            "name",
        ]);
        left.trim().is_empty().then_some(())
    })
    .await;
    let claims = plane.kubectl_ok(&["get", "pvc", "-n", "default", "-o", "name"]);
    for i in 0..3 {
        assert!(
            claims.contains(&format!("persistentvolumeclaim/data-orders-{i}")),
            "claim {i} is kept: {claims}"
        );
    }
    operator.assert_never_forbidden();
}

fn sluice_proto_message(payload: &[u8]) -> sluice_client::proto::Message {
    sluice_client::proto::Message {
        payload: payload.to_vec(),
        ..Default::default()
    }
}
