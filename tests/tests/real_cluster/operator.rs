//! The chart's operator run as a test process: the Deployment's args and env as `helm` rendered
//! them, authenticated with a token of the chart's ServiceAccount (kube-rs reads an in-cluster
//! token from a fixed path that a process cannot be given per pod, so the chart's own pod is
//! kept off the node and this process stands in for it).

use std::path::Path;

use super::ControlPlane;
use super::process::{Component, free_port, with_hosts_file};

/// One operator replica run as a process the way the chart's Deployment runs it: the
/// Deployment's args and env, authenticated with a token of the chart's ServiceAccount.
pub struct OperatorProcess {
    /// The process.
    pub component: Component,
}

impl OperatorProcess {
    pub fn start(
        plane: &ControlPlane,
        release: &str,
        namespace: &str,
        pod: &str,
    ) -> OperatorProcess {
        Self::start_resolving(plane, release, namespace, pod, None)
    }

    /// [`OperatorProcess::start`] in a mount namespace whose `/etc/hosts` is `hosts` (the
    /// process kubelet's cluster names), so the operator reaches agents by their DNS names.
    pub fn start_resolving(
        plane: &ControlPlane,
        release: &str,
        namespace: &str,
        pod: &str,
        hosts: Option<&Path>,
    ) -> OperatorProcess {
        let manifest = plane.helm_ok(&["get", "manifest", release, "-n", namespace]);
        let documents = crate::support::manifest::parse_documents(&manifest, "helm get manifest")
            .expect("YAML");
        let deployment = documents
            .iter()
            .find(|d| d["kind"] == "Deployment")
            .expect("the chart renders a Deployment");
        let pod_spec = &deployment["spec"]["template"]["spec"];
        let account = pod_spec["serviceAccountName"]
            .as_str()
            .expect("serviceAccountName");
        let token =
            plane.kubectl_ok(&["create", "token", account, "-n", namespace, "--duration=2h"]);
        let kubeconfig = plane.token_kubeconfig(&format!("{release}-{pod}"), token.trim());
        let container = &pod_spec["containers"][0];
        let metrics = format!("127.0.0.1:{}", free_port());
        let args: Vec<String> = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("string arg").to_owned())
            .map(|a| {
                // No pod network: the metrics listener binds loopback on a free port.
                if a.starts_with("--http-listen=") {
                    format!("--http-listen={metrics}")
                } else {
                    a
                }
            })
            .collect();
        let mut env = Vec::new();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().expect("env name").to_owned();
            let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => pod.to_owned(),
                Some("metadata.namespace") => namespace.to_owned(),
                Some(other) => panic!("the operator's env uses fieldRef {other}, not emulated"),
                None => var["value"].as_str().unwrap_or_default().to_owned(),
            };
            env.push((name, value));
        }
        env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        let binary = crate::support::workspace_binary("sluice-operator", "sluice-operator");
        let (binary, args) = match hosts {
            None => (binary, args),
            Some(hosts) => with_hosts_file(hosts, &binary, &args),
        };
        let component = Component::start_with_env(
            &format!("operator-{release}-{pod}"),
            &binary,
            &args,
            &env,
            &plane.dir.path().join("logs"),
        );
        OperatorProcess { component }
    }

    /// How many reconciles it has logged (at debug).
    pub fn reconciles(&self) -> usize {
        self.count_lines("\"reconciled\"")
    }

    /// How many reconciles ended, well or failed.
    pub fn passes(&self) -> usize {
        self.reconciles() + self.count_lines("\"reconcile failed\"")
    }

    fn count_lines(&self, needle: &str) -> usize {
        let log = std::fs::read_to_string(&self.component.log).unwrap_or_default();
        log.lines().filter(|l| l.contains(needle)).count()
    }

    /// Fails the test when the operator was refused anything by RBAC.
    pub fn assert_never_forbidden(&self) {
        let log = std::fs::read_to_string(&self.component.log).unwrap_or_default();
        let forbidden: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("forbidden") || l.contains("Forbidden") || l.contains(" 403"))
            .collect();
        assert!(
            forbidden.is_empty(),
            "the chart's RBAC refused the operator:\n{}",
            forbidden.join("\n")
        );
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} (last 60 lines) ----\n{}",
                self.component.name,
                self.component.tail(60)
            );
        }
    }
}
