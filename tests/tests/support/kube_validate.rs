//! `kubernetes-validate`: offline validation against the official Kubernetes OpenAPI schemas,
//! strict (a field the schema does not know is an error).

use super::{KUBERNETES_VERSION, manifest, tool_or_skip};
use serde_json::Value;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;

/// Kinds that are not built into Kubernetes: kubernetes-validate has no schema for them and only
/// warns, so callers check them another way (the CRD's own schema, or field-by-field).
pub const CUSTOM_KINDS: &[&str] = &["MessageQueue", "ServiceMonitor"];

/// A `kubernetes-validate` executable.
pub struct KubeValidate {
    bin: PathBuf,
}

impl KubeValidate {
    /// The installed validator, or `None` after printing that `test` is skipped.
    pub fn find(test: &str) -> Option<KubeValidate> {
        tool_or_skip("kubernetes-validate", test).map(|bin| KubeValidate { bin })
    }

    /// Validates built-in objects; `origin` names where they came from in the report. Any
    /// warning counts as a failure too: a warning means "no schema found", i.e. not validated.
    pub fn validate(&self, objects: &[Value], origin: &str) -> Result<(), String> {
        if let Some(custom) = objects
            .iter()
            .find(|o| CUSTOM_KINDS.contains(&manifest::kind(o)))
        {
            return Err(format!(
                "{origin}: {} has no official schema; validate it separately",
                manifest::describe(custom)
            ));
        }
        let mut file = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile()
            .map_err(|e| format!("cannot create a temporary manifest: {e}"))?;
        for object in objects {
            let yaml = serde_yaml::to_string(object).expect("JSON values serialize to YAML");
            writeln!(file, "---\n{yaml}").map_err(|e| format!("cannot write manifest: {e}"))?;
        }
        file.flush()
            .map_err(|e| format!("cannot write manifest: {e}"))?;
        let output = Command::new(&self.bin)
            .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
            .arg(file.path())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let complaints: Vec<&str> = report
            .lines()
            .filter(|l| l.starts_with("WARN") || l.starts_with("ERROR") || l.starts_with("FATAL"))
            .collect();
        if output.status.success() && complaints.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{origin}: kubernetes-validate --strict -k {KUBERNETES_VERSION} rejected it \
                 (exit {:?}):\n{report}",
                output.status.code()
            ))
        }
    }
}
