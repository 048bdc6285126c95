//! The manifests we ship outside the chart: `examples/` and the generated `crds/` (and the
//! chart's copy of them), validated against the official Kubernetes schemas with unknown fields
//! as errors, and the MessageQueue examples against the CRD's own schema.

mod support;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use support::crd_schema::{CrdSchema, to_strict_json_schema};
use support::kube_validate::KubeValidate;
use support::manifest;

/// The generated CRD, when `make crds` has produced it.
fn message_queue_crd() -> Option<CrdSchema> {
    let path = support::repo_root().join("crds/messagequeue.yaml");
    if !path.exists() {
        eprintln!("skipped: crds/messagequeue.yaml is not generated yet (`make crds`)");
        return None;
    }
    let documents = manifest::parse_file(&path).unwrap_or_else(|e| panic!("{e}"));
    let crd = manifest::one_of_kind(&documents, "CustomResourceDefinition");
    Some(CrdSchema::from_crd(crd).unwrap_or_else(|e| panic!("crds/messagequeue.yaml: {e}")))
}

fn shipped_manifest_files() -> Vec<PathBuf> {
    let root = support::repo_root();
    ["examples", "crds", "charts/sluice/crds"]
        .iter()
        .flat_map(|dir| manifest::yaml_files_under(&root.join(dir)))
        .collect()
}

fn relative(path: &Path) -> String {
    path.strip_prefix(support::repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn every_example_and_crd_file_passes_strict_kubernetes_validation() {
    let Some(validator) =
        KubeValidate::find("every_example_and_crd_file_passes_strict_kubernetes_validation")
    else {
        return;
    };
    let crd = message_queue_crd();
    let files = shipped_manifest_files();
    assert!(
        files.iter().any(|f| relative(f).starts_with("examples/")),
        "no examples found"
    );
    for file in files {
        let name = relative(&file);
        let objects = manifest::parse_file(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(!objects.is_empty(), "{name} holds no object");
        let (custom, built_in): (Vec<Value>, Vec<Value>) = objects
            .into_iter()
            .partition(|o| manifest::kind(o) == "MessageQueue");
        if !built_in.is_empty() {
            validator
                .validate(&built_in, &name)
                .unwrap_or_else(|report| panic!("{report}"));
        }
        if let Some(crd) = &crd {
            for object in &custom {
                if let Err(problems) = crd.validate(object) {
                    panic!(
                        "{name}: {} does not match the CRD:\n{}",
                        manifest::describe(object),
                        problems.join("\n")
                    );
                }
            }
        }
    }
}

#[test]
fn message_queue_schema_refuses_unknown_fields_and_wrong_types_naming_them() {
    let Some(crd) = message_queue_crd() else {
        return;
    };
    let example =
        manifest::parse_file(&support::repo_root().join("examples/messagequeue-small.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
    let good = manifest::one_of_kind(&example, "MessageQueue").clone();
    assert_eq!(crd.kind(), "MessageQueue");
    crd.validate(&good)
        .unwrap_or_else(|p| panic!("the example must be valid: {p:?}"));

    let mut unknown = good.clone();
    unknown["spec"]["replicaz"] = json!(3);
    let problems = crd
        .validate(&unknown)
        .expect_err("an unknown field is refused");
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("/spec") && p.contains("replicaz")),
        "{problems:?}"
    );

    let mut mistyped = good.clone();
    mistyped["spec"]["replicas"] = json!("three");
    let problems = crd
        .validate(&mistyped)
        .expect_err("a string replica count is refused");
    assert!(
        problems.iter().any(|p| p.starts_with("/spec/replicas")),
        "{problems:?}"
    );

    let mut bad_name = good;
    bad_name["metadata"]["name"] = json!("Orders_1");
    let problems = crd
        .validate(&bad_name)
        .expect_err("an invalid name is refused");
    assert!(
        problems.iter().any(|p| p.starts_with("/metadata/name")),
        "{problems:?}"
    );
}

#[test]
fn strict_crd_schemas_refuse_undeclared_fields_unless_unknown_fields_are_preserved() {
    let schema = to_strict_json_schema(json!({
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "integer", "nullable": true}}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                     "properties": {"x": {"type": "string"}}},
            "size": {"x-kubernetes-int-or-string": true},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}
        }
    }));
    let validator = jsonschema::validator_for(&schema).expect("the converted schema compiles");
    assert!(validator.is_valid(&json!({
        "a": {"b": null}, "free": {"anything": 1}, "size": "1Gi", "labels": {"k": "v"}
    })));
    assert!(validator.is_valid(&json!({"size": 3})));
    assert!(
        !validator.is_valid(&json!({"a": {"b": 1, "c": 2}})),
        "unknown nested field"
    );
    assert!(
        !validator.is_valid(&json!({"z": 1})),
        "unknown top-level field"
    );
    assert!(
        !validator.is_valid(&json!({"labels": {"k": 1}})),
        "typed map values"
    );
}

#[test]
fn example_clients_reach_the_client_service_of_an_example_message_queue() {
    let root = support::repo_root();
    let queues: Vec<Value> = manifest::yaml_files_under(&root.join("examples"))
        .iter()
        .flat_map(|f| manifest::parse_file(f).unwrap_or_else(|e| panic!("{e}")))
        .filter(|o| manifest::kind(o) == "MessageQueue")
        .collect();
    let clients = manifest::parse_file(&root.join("examples/producer-consumer.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let deployments = manifest::all_of_kind(&clients, "Deployment");
    assert_eq!(deployments.len(), 2, "a producer and a consumer");

    // The CLI reads its endpoint from this variable.
    let cli_args = support::read_repo_file("cli/src/args.rs");
    assert!(
        cli_args.contains(r#"env = "SLUICE_ENDPOINT""#),
        "the sluice CLI reads SLUICE_ENDPOINT"
    );

    for deployment in deployments {
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let endpoint = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "SLUICE_ENDPOINT")
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| {
                panic!("{} sets no SLUICE_ENDPOINT", manifest::describe(deployment))
            });
        let authority = endpoint
            .strip_prefix("http://")
            .expect("plain gRPC endpoint");
        let (host, port) = authority.rsplit_once(':').expect("host:port");
        assert_eq!(
            port.parse::<i32>().ok(),
            Some(sluice_operator::names::GRPC_PORT),
            "{endpoint}"
        );
        // `orders` or `orders.<ns>.svc[.cluster.local]`: the client Service is named after the
        // MessageQueue (operator/src/names.rs).
        let service = host.split('.').next().unwrap_or(host);
        assert!(
            queues.iter().any(|q| manifest::name(q) == service),
            "{endpoint} names no example MessageQueue"
        );
        // Both talk to the queue the MessageQueue declares by default (its own name).
        let command = format!("{} {}", container["command"], container["args"]);
        let mut words = command.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'));
        assert!(
            words.any(|w| w == service),
            "{command} does not use queue {service}"
        );
    }
}

#[test]
fn install_notes_give_a_valid_first_message_queue_and_how_to_watch_it() {
    let test = "install_notes_give_a_valid_first_message_queue_and_how_to_watch_it";
    let Some(helm) = support::helm::Helm::find(test) else {
        return;
    };
    let Some(crd) = message_queue_crd() else {
        return;
    };
    for (args, namespace_flag) in [
        (&[][..], ""),
        (&["--set", "watchNamespace=shop"][..], " -n shop"),
    ] {
        let notes = helm.install_notes(args);
        assert!(
            notes.contains(&format!("kubectl get mq{namespace_flag} -w")),
            "{notes}"
        );
        assert!(
            notes.contains(&format!("kubectl apply{namespace_flag} -f -")),
            "{notes}"
        );
        // The MessageQueue the notes pipe into kubectl is valid against the CRD.
        let quoted = notes
            .split_once("echo '")
            .and_then(|(_, rest)| rest.split_once('\''))
            .map(|(json, _)| json)
            .unwrap_or_else(|| panic!("no `echo '<MessageQueue>'` in the notes:\n{notes}"));
        let object: Value = serde_json::from_str(quoted)
            .unwrap_or_else(|e| panic!("the notes' MessageQueue is not JSON: {e}\n{quoted}"));
        crd.validate(&object)
            .unwrap_or_else(|p| panic!("the notes' MessageQueue: {p:?}"));
    }
}
