//! The real `helm` binary run against `charts/sluice`.

use super::{manifest, repo_root, tool_or_skip};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

/// Release name every render uses; object names derive from it.
pub const RELEASE: &str = "sluice";
/// Namespace every render installs into.
pub const NAMESPACE: &str = "sluice-system";

/// A `helm` executable.
pub struct Helm {
    bin: PathBuf,
}

/// What a failed `helm` run said.
#[derive(Debug)]
pub struct HelmFailure {
    /// The command line, for messages.
    pub command: String,
    /// Everything helm wrote to stderr (its error message).
    pub stderr: String,
}

impl Helm {
    /// The installed helm, or `None` after printing that `test` is skipped.
    pub fn find(test: &str) -> Option<Helm> {
        tool_or_skip("helm", test).map(|bin| Helm { bin })
    }

    /// The chart's directory.
    pub fn chart_dir() -> PathBuf {
        repo_root().join("charts/sluice")
    }

    /// `helm template` with the CRDs included; `args` are extra flags such as `--set a=b`.
    pub fn template(&self, args: &[&str]) -> Result<Vec<Value>, HelmFailure> {
        let chart = Self::chart_dir();
        let mut full = vec![
            "template",
            RELEASE,
            chart.to_str().expect("repository paths are UTF-8"),
            "--namespace",
            NAMESPACE,
            "--include-crds",
        ];
        full.extend_from_slice(args);
        let stdout = self.run(&full)?;
        Ok(manifest::parse_documents(&stdout, "helm template output")
            .unwrap_or_else(|e| panic!("helm rendered invalid YAML: {e}")))
    }

    /// `helm template` that must succeed; panics with helm's message otherwise.
    pub fn render(&self, args: &[&str]) -> Vec<Value> {
        self.template(args)
            .unwrap_or_else(|f| panic!("`{}` failed:\n{}", f.command, f.stderr))
    }

    /// `helm lint --strict` (warnings are failures) with extra flags; returns helm's report.
    pub fn lint(&self, args: &[&str]) -> Result<String, HelmFailure> {
        let chart = Self::chart_dir();
        let mut full = vec![
            "lint",
            "--strict",
            chart.to_str().expect("repository paths are UTF-8"),
        ];
        full.extend_from_slice(args);
        self.run(&full)
    }

    /// The NOTES.txt a user sees after `helm install` (rendered by a client-side dry run).
    pub fn install_notes(&self, args: &[&str]) -> String {
        let chart = Self::chart_dir();
        let mut full = vec![
            "install",
            RELEASE,
            chart.to_str().expect("repository paths are UTF-8"),
            "--namespace",
            NAMESPACE,
            "--dry-run=client",
        ];
        full.extend_from_slice(args);
        let output = self
            .run(&full)
            .unwrap_or_else(|f| panic!("`{}` failed:\n{}", f.command, f.stderr));
        let notes = output
            .split_once("\nNOTES:\n")
            .map(|(_, notes)| notes.to_owned());
        notes.unwrap_or_else(|| panic!("helm install printed no NOTES:\n{output}"))
    }

    fn run(&self, args: &[&str]) -> Result<String, HelmFailure> {
        let command = format!("helm {}", args.join(" "));
        let output = Command::new(&self.bin)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(HelmFailure {
                command,
                stderr: format!("{}{}", String::from_utf8_lossy(&output.stderr), stdout),
            })
        }
    }
}

/// The value sets the chart is tested with: name, `helm` flags.
pub const VALUE_SETS: &[(&str, &[&str])] = &[
    ("defaults", &[]),
    (
        "namespace-scoped",
        &["--set", "watchNamespace=sluice-system"],
    ),
    (
        "service-monitor",
        &["--set", "metrics.serviceMonitor.enabled=true"],
    ),
    (
        "production",
        &[
            "--set",
            "replicaCount=2",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set-json",
            r#"metrics.serviceMonitor.labels={"release":"prometheus"}"#,
            "--set-json",
            r#"networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]"#,
            "--set-json",
            r#"networkPolicy.apiServerCidrs=["10.0.0.1/32"]"#,
            "--set-json",
            r#"tolerations=[{"key":"dedicated","operator":"Equal","value":"system","effect":"NoSchedule"}]"#,
            "--set-json",
            r#"nodeSelector={"kubernetes.io/os":"linux"}"#,
            "--set",
            "priorityClassName=system-cluster-critical",
            "--set-json",
            r#"imagePullSecrets=["registry"]"#,
            "--set-json",
            r#"serviceAccount.annotations={"example.com/role":"sluice"}"#,
        ],
    ),
    (
        "no-networkpolicy-existing-serviceaccount",
        &[
            "--set",
            "networkPolicy.enabled=false",
            "--set",
            "serviceAccount.create=false",
            "--set",
            "serviceAccount.name=platform-sluice",
        ],
    ),
];
