//! The real API server validates MessageQueues: schema, CEL rules and transition rules,
//! each refusal naming the field; every example passes a server-side dry run.

use crate::kubectl_stdin;
use crate::real_cluster::ControlPlane;
use crate::support;
use serde_json::{Value, json};

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
