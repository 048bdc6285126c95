//! Every object the builders produce, and the CRD, validated against the official Kubernetes
//! 1.34 OpenAPI schemas by `kubernetes-validate --strict` (unknown fields are errors).
//!
//! The tool is a PyPI package (`pip install kubernetes-validate`). Without it the test is
//! skipped with a message, unless `SLUICE_REQUIRE_TOOLS=1` (set by CI), where it fails.

use std::{path::Path, process::Command};

use sluice_operator::{
    builders::{build_all, statefulset},
    crd::{MessageQueue, crd_yaml},
    settings::Settings,
};

const KUBERNETES_VERSION: &str = "1.34.0";

fn tool_available() -> bool {
    Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn example(spec: serde_json::Value) -> MessageQueue {
    let mut mq = MessageQueue::new("orders", serde_json::from_value(spec).unwrap());
    mq.metadata.namespace = Some("shop".into());
    mq.metadata.uid = Some("0b6a2c1e-1111-4222-8333-444455556666".into());
    mq
}

fn write_yaml<T: serde::Serialize>(dir: &Path, name: &str, obj: &T) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, serde_yaml::to_string(obj).unwrap()).unwrap();
    path
}

#[test]
fn built_objects_and_crd_pass_the_official_kubernetes_schemas() {
    if !tool_available() {
        let required = std::env::var("SLUICE_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "kubernetes-validate is not installed but SLUICE_REQUIRE_TOOLS=1: run `pip install kubernetes-validate`"
        );
        println!(
            "skipped: kubernetes-validate not installed (pip install kubernetes-validate; CI sets SLUICE_REQUIRE_TOOLS=1)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![];
    let crd = dir.path().join("crd.yaml");
    std::fs::write(&crd, crd_yaml().unwrap()).unwrap();
    files.push(crd);

    let minimal = example(serde_json::json!({}));
    let production = example(serde_json::json!({
        "replicas": 5, "image": "registry.local/sluice-agent:dev",
        "storage": {"size": "100Gi", "storageClassName": "fast-ssd"},
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "queues": [{"name": "orders", "partitions": 6, "replicationFactor": 3, "ackTimeout": "30s",
                    "maxDeliveries": 5, "deadLetterQueue": "orders-dlq", "messageTtl": "24h",
                    "maxBacklog": {"messages": 1000000, "bytes": "50Gi"}}, {"name": "orders-dlq"}]
    }));
    for (label, mq) in [("minimal", &minimal), ("production", &production)] {
        let c = build_all(mq, &Settings::default(), &statefulset::Shape::initial(mq)).unwrap();
        files.push(write_yaml(
            dir.path(),
            &format!("{label}-serviceaccount"),
            &c.service_account,
        ));
        files.push(write_yaml(
            dir.path(),
            &format!("{label}-configmap"),
            &c.configmap,
        ));
        files.push(write_yaml(
            dir.path(),
            &format!("{label}-headless"),
            &c.headless_service,
        ));
        files.push(write_yaml(
            dir.path(),
            &format!("{label}-client"),
            &c.client_service,
        ));
        files.push(write_yaml(dir.path(), &format!("{label}-pdb"), &c.pdb));
        files.push(write_yaml(
            dir.path(),
            &format!("{label}-networkpolicy"),
            &c.network_policy,
        ));
        files.push(write_yaml(
            dir.path(),
            &format!("{label}-statefulset"),
            &c.statefulset,
        ));
    }

    let output = Command::new("kubernetes-validate")
        .args(["--strict", "-k", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "kubernetes-validate refused an object:\n{stdout}\n{stderr}"
    );
    // One verdict per file, so a file the tool silently skipped would show up here.
    let validated = stdout
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert!(
        validated >= files.len(),
        "expected {} validated files:\n{stdout}\n{stderr}",
        files.len()
    );
    println!("{stdout}");
}
