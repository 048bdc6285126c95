//! The generated CRD against what the API server would do with it: the committed YAML is
//! current, example MessageQueues pass the structural schema, and bad ones are refused by the
//! schema or by the CEL rules (evaluated with the Kubernetes CEL libraries, `quantity()`
//! included) with a message naming the field.

use kube::CustomResourceExt;
use serde_json::{Value, json};
use sluice_operator::crd::{MessageQueue, crd_yaml};

fn committed_crd_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/messagequeue.yaml")
}

#[test]
fn committed_crd_yaml_matches_the_code() {
    let generated = crd_yaml().unwrap();
    let committed = std::fs::read_to_string(committed_crd_path()).unwrap_or_default();
    assert!(
        committed == generated,
        "crds/messagequeue.yaml is stale; regenerate it with:\n  cargo run -p sluice-operator --bin crdgen > crds/messagequeue.yaml"
    );
}

fn open_api_schema() -> Value {
    let crd = serde_json::to_value(MessageQueue::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The schema as `kubectl apply` with strict field validation enforces it: unknown fields are
/// errors, i.e. every object schema with properties forbids others.
fn strict(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out: serde_json::Map<String, Value> =
                map.iter().map(|(k, v)| (k.clone(), strict(v))).collect();
            if out.contains_key("properties") && !out.contains_key("additionalProperties") {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(strict).collect()),
        other => other.clone(),
    }
}

fn schema_errors(object: &Value) -> Vec<String> {
    let mut schema = strict(&open_api_schema());
    // metadata is validated by the API server itself, not by the CRD schema.
    schema["properties"]["metadata"] = json!({"type": "object"});
    // apiVersion and kind are checked by the API server's routing, not listed in the schema.
    schema["properties"]["apiVersion"] = json!({"type": "string"});
    schema["properties"]["kind"] = json!({"type": "string"});
    let validator = jsonschema::validator_for(&schema).unwrap();
    validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

fn cel_errors(object: &Value, old: Option<&Value>) -> Vec<String> {
    match kube_cel::Validator::new().validate(&open_api_schema(), object, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

fn mq(spec: Value) -> Value {
    json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "MessageQueue", "metadata": {"name": "orders", "namespace": "shop"}, "spec": spec})
}

fn production_example() -> Value {
    mq(json!({
        "replicas": 3,
        "storage": {"size": "10Gi", "storageClassName": "fast-ssd"},
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "queues": [{
            "name": "orders", "partitions": 3, "replicationFactor": 3, "ackTimeout": "30s",
            "maxDeliveries": 5, "deadLetterQueue": "orders-dlq", "messageTtl": "24h",
            "maxBacklog": {"messages": 10000000, "bytes": "50Gi", "overflow": "reject-publish"},
            "priorities": true
        }, {"name": "orders-dlq"}],
        "consumers": [{
            "queue": "orders",
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "order-worker"},
            "minReplicas": 0, "maxReplicas": 50, "targetBacklogPerReplica": 500, "targetDrainSeconds": 60
        }]
    }))
}

#[test]
fn design_example_and_minimal_spec_pass_schema_and_cel() {
    for example in [production_example(), mq(json!({}))] {
        assert_eq!(schema_errors(&example), Vec::<String>::new());
        assert_eq!(cel_errors(&example, None), Vec::<String>::new());
        serde_json::from_value::<MessageQueue>(example).unwrap();
    }
}

fn assert_schema_refuses(object: Value, field: &str) {
    let errors = schema_errors(&object);
    assert!(
        errors.iter().any(|e| e.contains(field)),
        "expected an error naming {field}, got {errors:?}"
    );
}

#[test]
fn negative_or_zero_replicas_are_refused_naming_spec_replicas() {
    assert_schema_refuses(mq(json!({"replicas": -1})), "/spec/replicas");
    assert_schema_refuses(mq(json!({"replicas": 0})), "/spec/replicas");
}

#[test]
fn unknown_fields_are_refused_naming_the_field() {
    let errors = schema_errors(&mq(json!({"replicas": 3, "replica": 3})));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("/spec") && e.contains("replica")),
        "{errors:?}"
    );
    let errors = schema_errors(&mq(json!({"queues": [{"name": "a", "ackTimeoutt": "1s"}]})));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("/spec/queues/0") && e.contains("ackTimeoutt")),
        "{errors:?}"
    );
}

#[test]
fn schema_bounds_refuse_bad_partitions_names_and_durations() {
    assert_schema_refuses(
        mq(json!({"queues": [{"name": "a", "partitions": 0}]})),
        "/spec/queues/0/partitions",
    );
    assert_schema_refuses(
        mq(json!({"queues": [{"name": "a", "partitions": 257}]})),
        "/spec/queues/0/partitions",
    );
    assert_schema_refuses(
        mq(json!({"queues": [{"name": "Bad Name"}]})),
        "/spec/queues/0/name",
    );
    assert_schema_refuses(
        mq(json!({"queues": [{"name": "a", "ackTimeout": "30 seconds"}]})),
        "/spec/queues/0/ackTimeout",
    );
    assert_schema_refuses(
        mq(json!({"storage": {"size": "lots"}})),
        "/spec/storage/size",
    );
    assert_schema_refuses(
        mq(json!({"queues": [{"name": "a", "maxBacklog": {"overflow": "drop-all"}}]})),
        "/spec/queues/0/maxBacklog/overflow",
    );
}

fn assert_cel_refuses(object: Value, old: Option<&Value>, message: &str) {
    let errors = cel_errors(&object, old);
    assert!(
        errors.iter().any(|e| e.contains(message)),
        "expected {message:?}, got {errors:?}"
    );
}

#[test]
fn replication_factor_above_replicas_is_refused_by_cel() {
    let object = mq(json!({"replicas": 2, "queues": [{"name": "a", "replicationFactor": 3}]}));
    assert_cel_refuses(
        object,
        None,
        "spec.queues[].replicationFactor must not exceed spec.replicas",
    );
}

#[test]
fn min_replicas_above_max_replicas_is_refused_by_cel() {
    let object = mq(json!({"consumers": [{
        "queue": "orders", "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "w"},
        "minReplicas": 5, "maxReplicas": 2
    }]}));
    assert_cel_refuses(
        object,
        None,
        "spec.consumers[].minReplicas must not exceed spec.consumers[].maxReplicas",
    );
}

#[test]
fn duplicate_queue_names_and_dead_lettering_without_a_queue_are_refused_by_cel() {
    assert_cel_refuses(
        mq(json!({"queues": [{"name": "a"}, {"name": "a"}]})),
        None,
        "spec.queues[].name must be unique",
    );
    assert_cel_refuses(
        mq(json!({"queues": [{"name": "a", "maxDeliveries": 5}]})),
        None,
        "spec.queues[].maxDeliveries requires spec.queues[].deadLetterQueue",
    );
}

#[test]
fn storage_may_grow_but_never_shrink() {
    let old = mq(json!({"storage": {"size": "10Gi"}}));
    assert_eq!(
        cel_errors(&mq(json!({"storage": {"size": "20Gi"}})), Some(&old)),
        Vec::<String>::new()
    );
    // Quantity comparison, not string comparison: 9000Mi < 10Gi although "9" > "1".
    assert_cel_refuses(
        mq(json!({"storage": {"size": "9000Mi"}})),
        Some(&old),
        "spec.storage.size may grow but never shrink",
    );
    assert_cel_refuses(
        mq(json!({"storage": {"size": "5Gi"}})),
        Some(&old),
        "spec.storage.size may grow but never shrink",
    );
}

#[test]
fn storage_class_cannot_change_be_added_or_removed() {
    let old = mq(json!({"storage": {"size": "10Gi", "storageClassName": "fast-ssd"}}));
    let same = mq(json!({"storage": {"size": "10Gi", "storageClassName": "fast-ssd"}}));
    assert_eq!(cel_errors(&same, Some(&old)), Vec::<String>::new());
    let changed = mq(json!({"storage": {"size": "10Gi", "storageClassName": "slow-hdd"}}));
    assert_cel_refuses(
        changed,
        Some(&old),
        "spec.storage.storageClassName is immutable",
    );
    let removed = mq(json!({"storage": {"size": "10Gi"}}));
    assert_cel_refuses(
        removed,
        Some(&old),
        "spec.storage.storageClassName is immutable",
    );
}

/// Every schema node that carries CEL rules, with its rules.
fn nodes_with_rules(schema: &Value, out: &mut Vec<(Value, Vec<String>)>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Array(rules)) = map.get("x-kubernetes-validations") {
                let texts = rules
                    .iter()
                    .filter_map(|r| r["rule"].as_str().map(str::to_owned))
                    .collect();
                out.push((schema.clone(), texts));
            }
            map.values().for_each(|v| nodes_with_rules(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| nodes_with_rules(v, out)),
        _ => {}
    }
}

#[test]
fn cel_rules_compile_and_fit_the_cost_budget() {
    let compiled = kube_cel::compile_schema(&open_api_schema());
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
    let mut nodes = Vec::new();
    nodes_with_rules(&open_api_schema(), &mut nodes);
    assert!(
        nodes.len() >= 4,
        "expected rules on spec, storage, size, queues and consumers"
    );
    for (node, rules) in nodes {
        let compiled = kube_cel::compile_schema(&node);
        for rule in rules {
            // Only the cost analysis: kube-cel's scope check does not know comprehension
            // variables (`q` in `self.queues.all(q, ...)`) and flags them falsely.
            let warnings = kube_cel::estimate_rule_cost(&rule, &compiled);
            assert!(warnings.is_empty(), "{rule}: {warnings:?}");
        }
    }
}
