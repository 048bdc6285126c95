//! Sluice on a real Kubernetes control plane: kube-apiserver, etcd, controller-manager and
//! scheduler built from Kubernetes' own Go modules (see `real_cluster`), driven with the real
//! `kubectl` and `helm`, with a process kubelet whose pods are local processes.
//!
//! - [`crds`]: the API server's schema and CEL validation of MessageQueues, the examples.
//! - [`chart`]: `helm install` (cluster-wide and namespace-scoped), the operator with the
//!   chart's RBAC and Lease, server-side apply as the operator uses it.
//! - [`small_example`]: the small example becomes a ready cluster that carries messages; the
//!   producer-consumer example runs against it.
//! - [`day_two`]: rolling restart, scale-out and -in, storage growth under load.
//! - [`sidecar`]: native sidecars in their documented order.
//!
//! Run: `cargo test -p sluice-e2e --test control_plane -- --nocapture`. The first run builds
//! the control plane (minutes; cached afterwards, see `tests/control-plane/build`).

#[path = "../real_cluster/mod.rs"]
mod real_cluster;
#[path = "../support/mod.rs"]
mod support;

mod chart;
mod crds;
mod day_two;
mod sidecar;
mod small_example;

use std::time::Duration;

use real_cluster::ControlPlane;
use real_cluster::kubelet::ProcessKubelet;
use real_cluster::operator::OperatorProcess;
use real_cluster::provisioner::Provisioner;
use serde_json::Value;

/// Keeps the chart's operator pod off the process kubelet's node: the test runs its container
/// as an [`real_cluster::operator::OperatorProcess`] instead (kube-rs reads an in-cluster token
/// from a fixed path that a process cannot be given per pod).
const OFF_THE_NODE: &str = "nodeSelector.sluice\\.dev/operator-runs=as-a-test-process";
/// How long a controller may take to act on a change.
const ACT_TIMEOUT: Duration = Duration::from_secs(60);

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

/// `kubectl get mq` as a user reads it: the columns the CRD prints.
fn get_mq(plane: &ControlPlane, namespace: &str, name: &str) -> String {
    plane.kubectl_ok(&["get", "mq", name, "-n", namespace])
}

/// `kubectl apply -n default -f examples/<file>`.
fn apply_example(plane: &ControlPlane, file: &str) {
    let example = support::repo_root().join("examples").join(file);
    plane.kubectl_ok(&[
        "apply",
        "-n",
        "default",
        "-f",
        example.to_str().expect("UTF-8"),
    ]);
}

/// `kubectl patch mq orders -n default --type=merge -p <patch>`.
fn patch_orders(plane: &ControlPlane, patch: &Value) {
    plane.kubectl_ok(&[
        "patch",
        "mq",
        "orders",
        "-n",
        "default",
        "--type=merge",
        "-p",
        &patch.to_string(),
    ]);
}

/// A control plane with a node (process kubelet and claim provisioner), the chart installed in
/// `sluice-system` and its operator running as a process that resolves the cluster's names.
/// Fields drop in order: the operator first, the control plane last.
struct Installed {
    operator: OperatorProcess,
    kubelet: ProcessKubelet,
    _provisioner: Provisioner,
    plane: ControlPlane,
}

impl Installed {
    /// The client endpoints of agents `orders-0..n` (their pod addresses).
    fn agent_endpoints(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let ip = self
                    .kubelet
                    .address("default", &format!("orders-{i}"))
                    .expect("pod address");
                format!("http://{ip}:7070")
            })
            .collect()
    }

    async fn start() -> Installed {
        const NS: &str = "sluice-system";
        let plane = ControlPlane::start().await;
        let (kubelet, provisioner) = plane.start_node().await;
        install_chart(&plane, NS, &[]);
        let operator = OperatorProcess::start_resolving(
            &plane,
            "sluice",
            NS,
            "sluice-operator-a",
            Some(kubelet.hosts_file()),
        );
        Installed {
            operator,
            kubelet,
            _provisioner: provisioner,
            plane,
        }
    }
}
