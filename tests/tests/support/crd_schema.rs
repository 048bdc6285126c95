//! Validation of custom resources against their CRD's `openAPIV3Schema`, as strictly as the API
//! server prunes: a field the structural schema does not declare is an error here (the server
//! would silently drop it, which is worse for a user than a refusal).

use serde_json::{Map, Value};

/// ObjectMeta fields a manifest may set (the rest are server-populated).
const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "finalizers",
];

/// A CRD's schemas, one per served version.
pub struct CrdSchema {
    group: String,
    kind: String,
    versions: Vec<(String, jsonschema::Validator)>,
}

impl CrdSchema {
    /// Compiles every served version's schema of a `CustomResourceDefinition` object.
    pub fn from_crd(crd: &Value) -> Result<CrdSchema, String> {
        let spec = &crd["spec"];
        let group = spec["group"]
            .as_str()
            .ok_or("CRD has no spec.group")?
            .to_owned();
        let kind = spec["names"]["kind"]
            .as_str()
            .ok_or("CRD has no spec.names.kind")?
            .to_owned();
        let mut versions = Vec::new();
        for version in spec["versions"]
            .as_array()
            .ok_or("CRD has no spec.versions")?
        {
            let name = version["name"]
                .as_str()
                .ok_or("CRD version without a name")?;
            if version["served"] != Value::Bool(true) {
                continue;
            }
            let schema = version["schema"]["openAPIV3Schema"].clone();
            if schema.is_null() {
                return Err(format!("CRD version {name} has no schema.openAPIV3Schema"));
            }
            let mut strict = to_strict_json_schema(schema);
            // The API server accepts these on every object whether or not the CRD declares them
            // (kube-rs's generated schemas declare only spec and status); metadata is checked
            // separately.
            if let Some(Value::Object(root)) = strict.get_mut("properties") {
                root.entry("apiVersion")
                    .or_insert(serde_json::json!({"type": "string"}));
                root.entry("kind")
                    .or_insert(serde_json::json!({"type": "string"}));
                root.entry("metadata")
                    .or_insert(serde_json::json!({"type": "object"}));
            }
            let validator = jsonschema::validator_for(&strict)
                .map_err(|e| format!("CRD version {name}: schema does not compile: {e}"))?;
            versions.push((name.to_owned(), validator));
        }
        Ok(CrdSchema {
            group,
            kind,
            versions,
        })
    }

    /// The kind the CRD defines.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Validates one custom resource; every problem is listed with its JSON pointer.
    pub fn validate(&self, object: &Value) -> Result<(), Vec<String>> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let Some((group, version)) = api_version.split_once('/') else {
            return Err(vec![format!(
                "apiVersion {api_version:?} is not <group>/<version>"
            )]);
        };
        if group != self.group {
            return Err(vec![format!(
                "apiVersion group {group:?} is not {:?}",
                self.group
            )]);
        }
        if object["kind"].as_str() != Some(&self.kind) {
            return Err(vec![format!(
                "kind {:?} is not {:?}",
                object["kind"], self.kind
            )]);
        }
        let Some((_, validator)) = self.versions.iter().find(|(v, _)| v == version) else {
            return Err(vec![format!(
                "version {version:?} is not served by the CRD"
            )]);
        };
        let mut problems = metadata_problems(&object["metadata"]);
        problems.extend(
            validator
                .iter_errors(object)
                .map(|e| format!("{}: {e}", pointer(e.instance_path()))),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

fn pointer(location: &impl std::fmt::Display) -> String {
    let text = location.to_string();
    if text.is_empty() {
        "/".to_owned()
    } else {
        text
    }
}

/// The API server checks ObjectMeta itself (the CRD schema only says `type: object`).
fn metadata_problems(metadata: &Value) -> Vec<String> {
    let Some(fields) = metadata.as_object() else {
        return vec!["/metadata: missing or not an object".to_owned()];
    };
    let mut problems: Vec<String> = fields
        .keys()
        .filter(|k| !OBJECT_META_FIELDS.contains(&k.as_str()))
        .map(|k| format!("/metadata/{k}: not a field a manifest may set"))
        .collect();
    match fields.get("name").and_then(Value::as_str) {
        Some(name) if is_dns_subdomain(name) => {}
        Some(name) => problems.push(format!(
            "/metadata/name: {name:?} is not a DNS-1123 subdomain"
        )),
        None => problems.push("/metadata/name: required".to_owned()),
    }
    problems
}

fn is_dns_subdomain(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
        && bytes[0] != b'.'
}

/// Rewrites a Kubernetes structural schema (OpenAPI v3 subset plus `x-kubernetes-*` extensions)
/// into a plain JSON Schema with the API server's semantics made explicit:
/// - objects with `properties` and no `additionalProperties` reject unknown fields, unless they
///   carry `x-kubernetes-preserve-unknown-fields: true`;
/// - `nullable: true` also admits `null`;
/// - `x-kubernetes-int-or-string: true` admits an integer or a string.
pub fn to_strict_json_schema(schema: Value) -> Value {
    match schema {
        Value::Object(mut node) => {
            for child in ["properties", "patternProperties"] {
                if let Some(Value::Object(properties)) = node.remove(child) {
                    let converted: Map<String, Value> = properties
                        .into_iter()
                        .map(|(k, v)| (k, to_strict_json_schema(v)))
                        .collect();
                    node.insert(child.to_owned(), Value::Object(converted));
                }
            }
            for child in ["items", "additionalProperties", "not"] {
                // `additionalProperties` may also be a boolean, which stays as it is.
                if let Some(value) = node.remove(child) {
                    let converted = if value.is_object() {
                        to_strict_json_schema(value)
                    } else {
                        value
                    };
                    node.insert(child.to_owned(), converted);
                }
            }
            for child in ["allOf", "anyOf", "oneOf"] {
                if let Some(Value::Array(branches)) = node.remove(child) {
                    let converted = branches.into_iter().map(to_strict_json_schema).collect();
                    node.insert(child.to_owned(), Value::Array(converted));
                }
            }
            let preserves_unknown =
                node.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            if node.contains_key("properties")
                && !node.contains_key("additionalProperties")
                && !preserves_unknown
            {
                node.insert("additionalProperties".to_owned(), Value::Bool(false));
            }
            if node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
                node.remove("type");
                node.insert(
                    "anyOf".to_owned(),
                    serde_json::json!([{"type": "integer"}, {"type": "string"}]),
                );
            }
            if node.remove("nullable") == Some(Value::Bool(true))
                && let Some(Value::String(t)) = node.get("type").cloned()
            {
                node.insert("type".to_owned(), serde_json::json!([t, "null"]));
            }
            Value::Object(node)
        }
        other => other,
    }
}
