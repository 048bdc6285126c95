//! Sluice on a real Kubernetes control plane: kube-apiserver, etcd, controller-manager and
//! scheduler built from Kubernetes' own Go modules (see `real_cluster`), driven with the real
//! `kubectl` and `helm`.
//!
//! Run: `cargo test -p sluice-e2e --test control_plane -- --nocapture`. The first run builds
//! the control plane (minutes; cached afterwards, see `tests/control-plane/build`).

mod real_cluster;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use real_cluster::operator::OperatorProcess;
use real_cluster::{ControlPlane, eventually};
use serde_json::{Value, json};
use support::workload::{self, Ledger};

/// Keeps the chart's operator pod off the process kubelet's node: the test runs its container
/// as an [`OperatorProcess`] instead (kube-rs reads an in-cluster token from a fixed path that
/// a process cannot be given per pod).
const OFF_THE_NODE: &str = "nodeSelector.sluice\\.dev/operator-runs=as-a-test-process";
/// How long a controller may take to act on a change.
const ACT_TIMEOUT: Duration = Duration::from_secs(60);

fn mq(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "MessageQueue",
           "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
}

/// Installs `crds/` with server-side apply and waits until the CRD is served.
fn install_crds(plane: &ControlPlane) {
    let crds = support::repo_root().join("crds");
    plane.kubectl_ok(&[
        "apply",
        "--server-side",
        "-f",
        crds.to_str().expect("UTF-8"),
    ]);
    plane.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/messagequeues.sluice.dev",
        "--timeout=60s",
    ]);
}

/// `kubectl apply --server-side` of one object from stdin; Ok(stdout) or Err(stderr).
fn apply(plane: &ControlPlane, object: &Value) -> Result<String, String> {
    kubectl_stdin(
        plane,
        &["apply", "--server-side", "--field-manager=test", "-f", "-"],
        object,
    )
}

/// `kubectl <args>` with `object` on stdin; Ok(stdout) or Err(stderr).
fn kubectl_stdin(plane: &ControlPlane, args: &[&str], object: &Value) -> Result<String, String> {
    let text = serde_json::to_string(object).expect("JSON");
    let out = plane.kubectl_with(&plane.admin_kubeconfig, args, Some(&text));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn assert_refused(plane: &ControlPlane, object: &Value, says: &[&str]) {
    let error = apply(plane, object).expect_err(&format!("refused: {object}"));
    for part in says {
        assert!(
            error.contains(part),
            "the API server's refusal of {object} should say {part:?}; it said:\n{error}"
        );
    }
}

/// Every bad spec the offline schema and CEL tests (`operator/tests/crd_schema.rs`) cover is
/// refused by the real API server, with a message naming the field; good ones are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_refuses_bad_message_queues_naming_the_field() {
    let plane = ControlPlane::start().await;
    install_crds(&plane);
    plane.kubectl_ok(&["create", "namespace", "shop"]);

    let schema_cases: Vec<(Value, &[&str])> = vec![
        (
            mq("a", json!({"replicas": -1})),
            &["spec.replicas", "greater than or equal to 1"],
        ),
        (
            mq("a", json!({"replicas": 0})),
            &["spec.replicas", "greater than or equal to 1"],
        ),
        (
            mq("a", json!({"replicas": 3, "replica": 3})),
            &[".spec.replica: field not declared in schema"],
        ),
        (
            mq("a", json!({"queues": [{"name": "a", "ackTimeoutt": "1s"}]})),
            &["ackTimeoutt: field not declared in schema"],
        ),
        (
            mq("a", json!({"queues": [{"name": "a", "partitions": 0}]})),
            &["spec.queues[0].partitions"],
        ),
        (
            mq("a", json!({"queues": [{"name": "a", "partitions": 257}]})),
            &["spec.queues[0].partitions"],
        ),
        (
            mq("a", json!({"queues": [{"name": "Bad Name"}]})),
            &["spec.queues[0].name"],
        ),
        (
            mq(
                "a",
                json!({"queues": [{"name": "a", "ackTimeout": "30 seconds"}]}),
            ),
            &["spec.queues[0].ackTimeout"],
        ),
        (
            mq("a", json!({"storage": {"size": "lots"}})),
            &["spec.storage.size"],
        ),
        (
            mq(
                "a",
                json!({"queues": [{"name": "a", "maxBacklog": {"overflow": "drop-all"}}]}),
            ),
            &["spec.queues[0].maxBacklog.overflow", "drop-all"],
        ),
        (mq("Orders_1", json!({})), &["metadata.name", "Orders_1"]),
    ];
    for (object, says) in &schema_cases {
        assert_refused(&plane, object, says);
    }
    // A plain create (client-side apply, `kubectl create`) meets strict field validation,
    // which words an unknown field differently from server-side apply.
    for (object, says) in [
        (
            mq("a", json!({"replicas": 3, "replica": 3})),
            "unknown field \"spec.replica\"",
        ),
        (
            mq("a", json!({"queues": [{"name": "a", "ackTimeoutt": "1s"}]})),
            "unknown field \"spec.queues[0].ackTimeoutt\"",
        ),
    ] {
        let error = kubectl_stdin(&plane, &["create", "-f", "-"], &object)
            .expect_err("an unknown field is refused");
        assert!(error.contains(says), "expected {says:?}, got:\n{error}");
    }
    let cel_cases: Vec<(Value, &str)> = vec![
        (
            mq(
                "a",
                json!({"replicas": 2, "queues": [{"name": "a", "replicationFactor": 3}]}),
            ),
            "spec.queues[].replicationFactor must not exceed spec.replicas",
        ),
        (
            mq(
                "a",
                json!({"consumers": [{
                "queue": "orders", "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "w"},
                "minReplicas": 5, "maxReplicas": 2}]}),
            ),
            "spec.consumers[].minReplicas must not exceed spec.consumers[].maxReplicas",
        ),
        (
            mq("a", json!({"queues": [{"name": "a"}, {"name": "a"}]})),
            "spec.queues[].name must be unique",
        ),
        (
            mq("a", json!({"queues": [{"name": "a", "maxDeliveries": 5}]})),
            "spec.queues[].maxDeliveries requires spec.queues[].deadLetterQueue",
        ),
    ];
    for (object, says) in &cel_cases {
        assert_refused(&plane, object, &[says]);
    }

    // Transition rules: storage grows (a Quantity comparison: 9000Mi < 10Gi), never shrinks;
    // the class is fixed once set.
    apply(
        &plane,
        &mq(
            "grow",
            json!({"storage": {"size": "10Gi", "storageClassName": "fast-ssd"}}),
        ),
    )
    .expect("a good MessageQueue is stored");
    apply(
        &plane,
        &mq(
            "grow",
            json!({"storage": {"size": "20Gi", "storageClassName": "fast-ssd"}}),
        ),
    )
    .expect("storage may grow");
    for size in ["9000Mi", "5Gi"] {
        assert_refused(
            &plane,
            &mq(
                "grow",
                json!({"storage": {"size": size, "storageClassName": "fast-ssd"}}),
            ),
            &["spec.storage.size may grow but never shrink"],
        );
    }
    assert_refused(
        &plane,
        &mq(
            "grow",
            json!({"storage": {"size": "20Gi", "storageClassName": "slow-hdd"}}),
        ),
        &["spec.storage.storageClassName is immutable"],
    );
    assert_refused(
        &plane,
        &mq("grow", json!({"storage": {"size": "20Gi"}})),
        &["spec.storage.storageClassName is immutable"],
    );
    // Defaults are applied by the API server, as the schema declares them.
    let stored: Value =
        serde_json::from_str(&plane.kubectl_ok(&["get", "mq", "grow", "-n", "shop", "-o", "json"]))
            .expect("JSON");
    assert_eq!(stored["spec"]["replicas"], json!(3), "{stored}");
}

/// Every example manifest is accepted by the real API server (`--dry-run=server`: admission,
/// schema, CEL and defaulting, nothing stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_passes_a_server_side_dry_run() {
    let plane = ControlPlane::start().await;
    install_crds(&plane);
    plane.kubectl_ok(&["create", "namespace", "shop"]);
    let examples = support::repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&examples)
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in files {
        let out = plane.kubectl_ok(&[
            "apply",
            "--dry-run=server",
            "-f",
            file.to_str().expect("UTF-8"),
        ]);
        assert!(
            out.contains("(server dry run)"),
            "{}: {out}",
            file.display()
        );
    }
}

/// `helm install sluice` of `charts/sluice` into `namespace` with `values` (`--set` pairs), the
/// chart's operator pod kept off the node (see [`OFF_THE_NODE`]).
fn install_chart(plane: &ControlPlane, namespace: &str, values: &[&str]) {
    let chart = support::repo_root().join("charts/sluice");
    let mut args = vec![
        "install",
        "sluice",
        chart.to_str().expect("UTF-8"),
        "--namespace",
        namespace,
        "--create-namespace",
        "--wait=false",
        "--set",
        OFF_THE_NODE,
    ];
    for value in values {
        args.extend(["--set", value]);
    }
    plane.helm_ok(&args);
}

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

    let example = support::repo_root().join("examples/messagequeue-small.yaml");
    plane.kubectl_ok(&[
        "apply",
        "-n",
        "default",
        "-f",
        example.to_str().expect("UTF-8"),
    ]);
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
        || {
            plane
                .kubectl(&["get", "pod", "orders-0", "-n", "default"])
                .status
                .success()
                .then_some(())
        },
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
                .kubectl(&["get", "configmap", "orders-config", "-n", "default"])
                .status
                .success()
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

/// `kubectl get mq` as a user reads it: the columns the CRD prints.
fn get_mq(plane: &ControlPlane, namespace: &str, name: &str) -> String {
    plane.kubectl_ok(&["get", "mq", name, "-n", namespace])
}

/// The whole path on the real control plane: `helm install`, `kubectl apply` of the small
/// example; the operator (with the chart's token) creates the children, the real StatefulSet
/// controller the pods, the scheduler binds them to the process kubelet's node, the claims are
/// provisioned and bound, the agents form a cluster, and `kubectl get mq` prints READY 3/3.
/// Messages published at one agent are consumed through another; deleting the MessageQueue
/// garbage-collects its children and keeps its claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_small_example_becomes_a_ready_three_agent_cluster() {
    const NS: &str = "sluice-system";
    let plane = ControlPlane::start().await;
    let (kubelet, _provisioner) = plane.start_node().await;
    install_chart(&plane, NS, &[]);
    let operator = OperatorProcess::start_resolving(
        &plane,
        "sluice",
        NS,
        "sluice-operator-a",
        Some(kubelet.hosts_file()),
    );
    let example = support::repo_root().join("examples/messagequeue-small.yaml");
    plane.kubectl_ok(&[
        "apply",
        "-n",
        "default",
        "-f",
        example.to_str().expect("UTF-8"),
    ]);
    let table = eventually(
        "kubectl get mq shows READY 3/3",
        Duration::from_secs(180),
        || {
            let table = get_mq(&plane, "default", "orders");
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

    let endpoints: Vec<String> = (0..3)
        .map(|i| {
            let ip = kubelet
                .address("default", &format!("orders-{i}"))
                .expect("pod address");
            format!("http://{ip}:7070")
        })
        .collect();
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
    eprintln!("{}", get_mq(&plane, "default", "orders"));
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
    let update = plane.kubectl_ok(&[
        "get",
        "statefulset",
        "orders",
        "-n",
        "default",
        "-o",
        "jsonpath={.status.updateRevision}",
    ]);
    (ready, update)
}

/// Waits until exactly `agents` agent pods are Ready on the StatefulSet's update revision and
/// `kubectl get mq` prints READY `agents/agents`; returns that revision.
async fn await_agents(plane: &ControlPlane, agents: usize, what: &str) -> String {
    eventually(what, DAY_TWO_TIMEOUT, || {
        let (ready, update) = agent_revisions(plane);
        let settled = ready.len() == agents
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
    const NS: &str = "sluice-system";
    let plane = ControlPlane::start().await;
    let (kubelet, _provisioner) = plane.start_node().await;
    install_chart(&plane, NS, &[]);
    let operator = OperatorProcess::start_resolving(
        &plane,
        "sluice",
        NS,
        "sluice-operator-a",
        Some(kubelet.hosts_file()),
    );
    let example = support::repo_root().join("examples/messagequeue-small.yaml");
    plane.kubectl_ok(&[
        "apply",
        "-n",
        "default",
        "-f",
        example.to_str().expect("UTF-8"),
    ]);
    let first = await_agents(&plane, 3, "READY 3/3").await;

    // The three agents that stay throughout: scale-in removes the highest ordinals.
    let endpoints: Vec<String> = (0..3)
        .map(|i| {
            let ip = kubelet
                .address("default", &format!("orders-{i}"))
                .expect("pod address");
            format!("http://{ip}:7070")
        })
        .collect();
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
    plane.kubectl_ok(&[
        "patch",
        "mq",
        "orders",
        "-n",
        "default",
        "--type=merge",
        "-p",
        r#"{"spec":{"resources":{"requests":{"cpu":"20m","memory":"64Mi"}}}}"#,
    ]);
    eventually(
        "the template change makes a new revision",
        ACT_TIMEOUT,
        || (agent_revisions(&plane).1 != first).then_some(()),
    )
    .await;
    await_agents(&plane, 3, "every agent restarted onto the new revision").await;
    eprintln!("rolled: {:?}", ledger.summary());
    ledger.await_confirms(200, steady).await;

    // 3 → 5 → 3.
    for (agents, what) in [(5, "scaled out to 5"), (3, "scaled in to 3")] {
        plane.kubectl_ok(&[
            "patch",
            "mq",
            "orders",
            "-n",
            "default",
            "--type=merge",
            "-p",
            &json!({"spec": {"replicas": agents}}).to_string(),
        ]);
        await_agents(&plane, agents, what).await;
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
    plane.kubectl_ok(&[
        "patch",
        "mq",
        "orders",
        "-n",
        "default",
        "--type=merge",
        "-p",
        r#"{"spec":{"storage":{"size":"2Gi"}}}"#,
    ]);
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

/// The process kubelet runs a native sidecar as Kubernetes documents it: an agent as an init
/// container with `restartPolicy: Always` starts first, the app only once the agent's startup
/// probe passes (so its first call to `localhost:7070` succeeds: no restart), the pod is Ready
/// when both are, and at deletion the app stops before the sidecar does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_sidecar_starts_before_the_app_and_stops_after_it() {
    let plane = ControlPlane::start().await;
    let (kubelet, _provisioner) = plane.start_node().await;
    let probe = json!({"grpc": {"port": 7070}, "periodSeconds": 1, "failureThreshold": 60});
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "namespace": "default"},
        "spec": {
            "terminationGracePeriodSeconds": 30,
            "initContainers": [{
                "name": "queue-agent", "image": "ghcr.io/sluice-dev/sluice-agent:0.1.0",
                "restartPolicy": "Always",
                "args": ["broker", "--listen", "127.0.0.1:7070", "--metrics-listen", "127.0.0.1:9090",
                         "--data-dir", "/var/lib/sluice"],
                "startupProbe": probe, "readinessProbe": probe,
                "volumeMounts": [{"name": "spool", "mountPath": "/var/lib/sluice"}],
            }],
            "containers": [{
                "name": "app", "image": "ghcr.io/sluice-dev/sluice:0.1.0",
                "command": ["/busybox/sh", "-c"],
                "args": ["sluice declare jobs && sluice publish jobs hello && exec sluice consume jobs"],
                "env": [{"name": "SLUICE_ENDPOINT", "value": "http://localhost:7070"}],
            }],
            "volumes": [{"name": "spool", "emptyDir": {}}],
        },
    });
    kubectl_stdin(&plane, &["apply", "-f", "-"], &pod).expect("the pod is created");
    plane.kubectl_ok(&[
        "wait",
        "-n",
        "default",
        "--for=condition=Ready",
        "pod/app",
        "--timeout=120s",
    ]);
    eventually(
        "the app consumes what it published through its sidecar",
        Duration::from_secs(60),
        || {
            kubelet
                .log("default", "app", "app")
                .filter(|l| l.lines().any(|line| line == "hello"))
        },
    )
    .await;
    let restarts = plane.kubectl_ok(&[
        "get",
        "pod",
        "app",
        "-n",
        "default",
        "-o",
        "jsonpath={.status.initContainerStatuses[0].restartCount}/{.status.containerStatuses[0].restartCount}",
    ]);
    assert_eq!(restarts, "0/0", "neither container restarted");

    plane.kubectl_ok(&["delete", "pod", "app", "-n", "default", "--wait=false"]);
    eventually("the pod is gone", Duration::from_secs(90), || {
        (!plane
            .kubectl(&["get", "pod", "app", "-n", "default"])
            .status
            .success())
        .then_some(())
    })
    .await;
    let steps = kubelet.lifecycle("default", "app");
    let at = |step: &str| {
        steps
            .iter()
            .position(|s| s == step)
            .unwrap_or_else(|| panic!("no {step:?} in {steps:?}"))
    };
    assert!(
        at("queue-agent started") < at("app started"),
        "the sidecar starts first: {steps:?}"
    );
    assert!(
        at("app stopped") < at("queue-agent stopping"),
        "the sidecar stops after the app: {steps:?}"
    );
}
