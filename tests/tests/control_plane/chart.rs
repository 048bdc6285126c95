//! `helm install` of the chart: the operator runs with the chart's ServiceAccount token and
//! Lease, cluster-wide or namespace-scoped, and its server-side apply converges, takes back
//! hand edits and leaves another applier's fields alone.

use std::time::Duration;

use crate::real_cluster::operator::OperatorProcess;
use crate::real_cluster::{ControlPlane, eventually};
use crate::support;
use crate::{ACT_TIMEOUT, apply_example, install_chart, kubectl_stdin};
use serde_json::{Value, json};

fn lease_holder(plane: &ControlPlane, namespace: &str, lease: &str) -> Option<String> {
    let out = plane.kubectl(&["get", "lease", lease, "-n", namespace, "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    let lease: Value = serde_json::from_slice(&out.stdout).ok()?;
    lease["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
        .filter(|h| !h.is_empty())
}

/// The children a MessageQueue's reconcile creates, as `kind/name` the API server lists.
fn children(plane: &ControlPlane, namespace: &str, name: &str) -> Option<Vec<String>> {
    let out = plane.kubectl(&[
        "get",
        "statefulset,service,configmap,serviceaccount,poddisruptionbudget",
        "-n",
        namespace,
        "-l",
        &format!("app.kubernetes.io/instance={name}"),
        "-o",
        "name",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<String> = text.lines().map(str::to_owned).collect();
    names
        .iter()
        .any(|n| n.starts_with("statefulset"))
        .then_some(names)
}

/// `helm install` of the chart (cluster-wide, two operator replicas): the operator, run with
/// the chart's ServiceAccount token, wins the Lease, reconciles a MessageQueue into its
/// children (the real StatefulSet controller then creates the pods), and a standby takes over
/// when the holder is killed. Any call the chart's RBAC does not grant fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_runs_the_operator_with_the_charts_rbac_and_lease() {
    const NS: &str = "sluice-system";
    let plane = ControlPlane::start().await;
    install_chart(
        &plane,
        NS,
        // The operator logs each reconcile at debug.
        &[
            "replicaCount=2",
            "logging.level=info\\,sluice_operator=debug",
        ],
    );
    let mut first = OperatorProcess::start(&plane, "sluice", NS, "sluice-operator-a");
    let second = OperatorProcess::start(&plane, "sluice", NS, "sluice-operator-b");
    let holder = eventually("an operator holds the Lease", ACT_TIMEOUT, || {
        lease_holder(&plane, NS, "sluice")
    })
    .await;
    assert_eq!(
        holder, "sluice-operator-a",
        "the first replica started wins"
    );

    apply_example(&plane, "messagequeue-small.yaml");
    let made = eventually("the operator creates the children", ACT_TIMEOUT, || {
        children(&plane, "default", "orders")
    })
    .await;
    for kind in [
        "statefulset.apps/orders",
        "service/orders",
        "service/orders-peers",
    ] {
        assert!(
            made.iter().any(|m| m == kind),
            "{kind} missing from {made:?}"
        );
    }
    // The real StatefulSet controller acts on what the operator wrote.
    eventually(
        "the StatefulSet controller creates pod orders-0",
        ACT_TIMEOUT,
        || plane.exists("pod/orders-0", "default").then_some(()),
    )
    .await;

    server_side_apply_converges(&plane, &first).await;
    another_applier_is_reported_not_fought(&plane, &first).await;

    first.component.stop();
    first.assert_never_forbidden();
    eventually("the standby takes the Lease", ACT_TIMEOUT, || {
        lease_holder(&plane, NS, "sluice").filter(|h| h == "sluice-operator-b")
    })
    .await;
    // The new holder reconciles: a deleted child comes back.
    plane.kubectl_ok(&["delete", "configmap", "orders-config", "-n", "default"]);
    eventually(
        "the new holder recreates the ConfigMap",
        ACT_TIMEOUT,
        || {
            plane
                .exists("configmap/orders-config", "default")
                .then_some(())
        },
    )
    .await;
    second.assert_never_forbidden();
}

/// `helm install` scoped to one namespace (Role and RoleBinding only): the operator reconciles
/// MessageQueues there with no cluster-wide grant, and leaves other namespaces alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_scoped_install_reconciles_only_its_namespace() {
    const NS: &str = "team-a";
    let plane = ControlPlane::start().await;
    install_chart(&plane, NS, &[&format!("watchNamespace={NS}")]);
    let cluster_roles = plane.kubectl_ok(&["get", "clusterrolebinding", "-o", "name"]);
    assert!(
        !cluster_roles.contains("sluice"),
        "a namespace-scoped install binds no ClusterRole: {cluster_roles}"
    );
    let operator = OperatorProcess::start(&plane, "sluice", NS, "sluice-operator-a");
    plane.kubectl_ok(&["create", "namespace", "team-b"]);
    let example = support::repo_root().join("examples/messagequeue-small.yaml");
    for ns in [NS, "team-b"] {
        plane.kubectl_ok(&["apply", "-n", ns, "-f", example.to_str().expect("UTF-8")]);
    }
    eventually(
        "the operator creates the children in its namespace",
        ACT_TIMEOUT,
        || children(&plane, NS, "orders"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        children(&plane, "team-b", "orders"),
        None,
        "another namespace is left alone"
    );
    operator.assert_never_forbidden();
}

/// The children only the operator writes, each with its `resourceVersion` (the StatefulSet,
/// whose status its controller updates, with its `generation`).
fn child_versions(plane: &ControlPlane) -> String {
    let only_operator = plane.kubectl_ok(&[
        "get",
        "serviceaccount/orders-agent",
        "configmap/orders-config",
        "service/orders",
        "service/orders-peers",
        "networkpolicy/orders",
        "-n",
        "default",
        "-o",
        "jsonpath={range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion} {end}",
    ]);
    let statefulset = plane.kubectl_ok(&[
        "get",
        "statefulset/orders",
        "-n",
        "default",
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    format!("{only_operator}StatefulSet/orders@{statefulset}")
}

/// Server-side apply as the operator uses it, against the real API server's merge: a
/// reconcile of an unchanged MessageQueue writes nothing (every child's resourceVersion
/// stays), and a field changed by hand on a child is put back at the next reconcile.
async fn server_side_apply_converges(plane: &ControlPlane, operator: &OperatorProcess) {
    let before = child_versions(plane);
    for touch in ["1", "2"] {
        reconcile_once(plane, operator, touch).await;
    }
    assert_eq!(
        child_versions(plane),
        before,
        "a reconcile with nothing to change wrote"
    );

    let (key, ours) = configmap_entry(plane);
    let tampered = json!({"data": {key.clone(): "changed by hand"}}).to_string();
    plane.kubectl_ok(&[
        "patch",
        "configmap",
        "orders-config",
        "-n",
        "default",
        "--type=merge",
        "-p",
        &tampered,
    ]);
    reconcile_once(plane, operator, "3").await;
    eventually(
        "the operator puts the hand-changed field back",
        ACT_TIMEOUT,
        || (configmap_value(plane, &key) == ours).then_some(()),
    )
    .await;
}

/// Touches the MessageQueue and waits for the operator's next pass over it (which may fail).
async fn reconcile_once(plane: &ControlPlane, operator: &OperatorProcess, touch: &str) {
    let passes = operator.passes();
    plane.kubectl_ok(&[
        "annotate",
        "--overwrite",
        "mq",
        "orders",
        "-n",
        "default",
        &format!("sluice.dev/test-touch={touch}"),
    ]);
    eventually(
        "the operator takes up the touched MessageQueue",
        ACT_TIMEOUT,
        || (operator.passes() > passes).then_some(()),
    )
    .await;
}

/// The operator's ConfigMap's `data`.
fn configmap_data(plane: &ControlPlane) -> Value {
    let out = plane.kubectl_ok(&[
        "get",
        "configmap",
        "orders-config",
        "-n",
        "default",
        "-o",
        "json",
    ]);
    let configmap: Value = serde_json::from_str(&out).expect("JSON");
    configmap["data"].clone()
}

/// The value of `key` in the operator's ConfigMap.
fn configmap_value(plane: &ControlPlane, key: &str) -> Value {
    configmap_data(plane)[key].clone()
}

/// The (first) key of the operator's ConfigMap and its value.
fn configmap_entry(plane: &ControlPlane) -> (String, Value) {
    let data = configmap_data(plane);
    data.as_object()
        .and_then(|d| d.iter().next())
        .map(|(k, v)| (k.clone(), v.clone()))
        .expect("the ConfigMap has data")
}

/// A second applier (a GitOps tool taking a field of the operator's ConfigMap with
/// `--force-conflicts`) is reported with a `FieldConflict` event naming it and the field, and
/// its value is left alone over several reconciles; once it lets the field go, the operator
/// applies its own value again.
async fn another_applier_is_reported_not_fought(plane: &ControlPlane, operator: &OperatorProcess) {
    let (key, ours) = configmap_entry(plane);
    let gitops = |data: Option<Value>| {
        let mut object = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "orders-config", "namespace": "default"}});
        if let Some(data) = data {
            object["data"] = data;
        }
        kubectl_stdin(
            plane,
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=gitops-tool",
                "-f",
                "-",
            ],
            &object,
        )
        .expect("the GitOps tool applies");
    };
    gitops(Some(json!({&key: "declared by gitops"})));
    for touch in ["4", "5"] {
        reconcile_once(plane, operator, touch).await;
    }
    let event = eventually("a FieldConflict event", ACT_TIMEOUT, || {
        let out = plane.kubectl_ok(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            "reason=FieldConflict",
            "-o",
            "jsonpath={.items[*].note}{.items[*].message}",
        ]);
        (!out.trim().is_empty()).then_some(out)
    })
    .await;
    assert!(
        event.contains("gitops-tool") && event.contains(&key),
        "the event names the other manager and the field: {event}"
    );
    assert_eq!(
        configmap_value(plane, &key),
        json!("declared by gitops"),
        "the operator does not fight another applier"
    );

    // The tool lets the field go (its manifest no longer has `data`): the operator's value is
    // back.
    gitops(None);
    reconcile_once(plane, operator, "6").await;
    eventually("the operator applies its value again", ACT_TIMEOUT, || {
        (configmap_value(plane, &key) == ours).then_some(())
    })
    .await;
}
