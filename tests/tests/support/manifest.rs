//! Kubernetes manifests as JSON values: parsing multi-document YAML and looking objects up.

use serde::Deserialize as _;
use serde_json::Value;
use std::path::Path;

/// Parses every non-empty document of a multi-document YAML stream. `origin` names the source
/// in errors.
pub fn parse_documents(yaml: &str, origin: &str) -> Result<Vec<Value>, String> {
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = Value::deserialize(document)
            .map_err(|e| format!("{origin}: document {index} is not valid YAML: {e}"))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// Parses a manifest file of the repository.
pub fn parse_file(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_documents(&text, &path.display().to_string())
}

/// `kind` of an object ("" when missing).
pub fn kind(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

/// `metadata.name` of an object ("" when missing).
pub fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// `kind/name`, for messages.
pub fn describe(object: &Value) -> String {
    format!("{}/{}", kind(object), name(object))
}

/// Every object of the given kind.
pub fn all_of_kind<'a>(objects: &'a [Value], wanted: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| kind(o) == wanted).collect()
}

/// The only object of the given kind; panics naming the kind when there is none or several.
pub fn one_of_kind<'a>(objects: &'a [Value], wanted: &str) -> &'a Value {
    match all_of_kind(objects, wanted).as_slice() {
        [only] => only,
        found => panic!("expected exactly one {wanted}, found {}", found.len()),
    }
}

/// The operator container of the chart's Deployment.
pub fn operator_container(objects: &[Value]) -> &Value {
    let deployment = one_of_kind(objects, "Deployment");
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

/// The operator container's args as strings.
pub fn operator_args(objects: &[Value]) -> Vec<String> {
    operator_container(objects)["args"]
        .as_array()
        .map(|args| {
            args.iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Every `*.yaml`/`*.yml` file under a directory of the repository, sorted, recursively.
pub fn yaml_files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}
