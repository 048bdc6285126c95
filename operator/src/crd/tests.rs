use kube::CustomResourceExt;

use super::*;

fn crd_json() -> serde_json::Value {
    serde_json::to_value(MessageQueue::crd()).unwrap()
}

#[test]
fn crd_is_namespaced_with_plural_and_short_name() {
    let crd = crd_json();
    assert_eq!(crd["metadata"]["name"], "messagequeues.sluice.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(
        crd["spec"]["names"]["shortNames"],
        serde_json::json!(["mq"])
    );
    assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
}

#[test]
fn crd_has_status_and_scale_subresources() {
    let sub = &crd_json()["spec"]["versions"][0]["subresources"];
    assert!(sub["status"].is_object());
    assert_eq!(sub["scale"]["specReplicasPath"], ".spec.replicas");
    assert_eq!(sub["scale"]["statusReplicasPath"], ".status.replicas");
    assert_eq!(sub["scale"]["labelSelectorPath"], ".status.selector");
}

#[test]
fn printer_columns_are_ready_replicas_backlog_consumers_age() {
    let cols = crd_json()["spec"]["versions"][0]["additionalPrinterColumns"].clone();
    let names: Vec<String> = cols
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_uppercase())
        .collect();
    assert_eq!(
        names,
        vec!["READY", "REPLICAS", "BACKLOG", "CONSUMERS", "AGE"]
    );
}

#[test]
fn schema_is_structural_without_preserved_unknown_fields() {
    let text = serde_json::to_string(&crd_json()).unwrap();
    assert!(!text.contains("x-kubernetes-preserve-unknown-fields"));
    assert!(
        !text.contains("\"$ref\""),
        "structural schemas cannot use $ref"
    );
    assert!(
        !text.contains("additionalProperties\":false"),
        "structural schemas cannot forbid additionalProperties"
    );
}

#[test]
fn every_cel_rule_has_a_message_naming_its_field() {
    let text = serde_json::to_string(&crd_json()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut rules = Vec::new();
    collect_rules(&v, &mut rules);
    assert!(rules.len() >= 6, "{rules:?}");
    for rule in rules {
        let message = rule["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("spec."),
            "rule without a field-naming message: {rule}"
        );
    }
}

fn collect_rules(v: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(rules)) = map.get("x-kubernetes-validations") {
                out.extend(rules.iter().cloned());
            }
            map.values().for_each(|x| collect_rules(x, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|x| collect_rules(x, out)),
        _ => {}
    }
}

#[test]
fn defaults_fill_an_empty_spec() {
    let spec: MessageQueueSpec = serde_json::from_str("{}").unwrap();
    assert_eq!(spec.replicas, REPLICAS_DEFAULT);
    assert_eq!(spec.storage.size, STORAGE_SIZE_DEFAULT);
    let queues = spec.effective_queues("orders");
    assert_eq!(queues[0].name, "orders");
    assert_eq!(queues[0].effective_replication_factor(1), 1);
    assert_eq!(queues[0].effective_replication_factor(5), 3);
}
