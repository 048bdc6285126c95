//! Native sidecars as the process kubelet runs them.

use std::time::Duration;

use crate::kubectl_stdin;
use crate::real_cluster::{ControlPlane, eventually};
use serde_json::json;

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
        (!plane.exists("pod/app", "default")).then_some(())
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
