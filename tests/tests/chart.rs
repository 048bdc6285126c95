//! The Helm chart `charts/sluice`, rendered and linted with the real `helm` and validated with
//! `kubernetes-validate`. Tests that need a tool print "skipped: ..." when it is missing, and fail
//! instead when `SLUICE_REQUIRE_TOOLS=1` (CI).

mod support;

use serde_json::Value;
use support::helm::{Helm, NAMESPACE, VALUE_SETS};
use support::kube_validate::{CUSTOM_KINDS, KubeValidate};
use support::manifest::{self, all_of_kind, one_of_kind, operator_args, operator_container};
use support::rbac::{self, Scope};

/// Name of every release-wide object for release `sluice` of chart `sluice`.
const FULLNAME: &str = "sluice";

#[test]
fn chart_app_version_is_the_workspace_crate_version() {
    let chart: Value = serde_yaml::from_str(&support::read_repo_file("charts/sluice/Chart.yaml"))
        .expect("Chart.yaml is YAML");
    // This crate's version is inherited from `[workspace.package] version`.
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "charts/sluice/Chart.yaml appVersion must equal the workspace version in Cargo.toml"
    );
}

#[test]
fn chart_crds_are_an_exact_copy_of_the_generated_crds() {
    let generated = support::repo_root().join("crds");
    let copied = Helm::chart_dir().join("crds");
    let names = |dir: &std::path::Path| -> Vec<String> {
        manifest::yaml_files_under(dir)
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    };
    assert_eq!(
        names(&copied),
        names(&generated),
        "charts/sluice/crds must hold the same files as crds/ (copy them after `make crds`)"
    );
    for name in names(&generated) {
        let original = std::fs::read(generated.join(&name)).expect("generated CRD is readable");
        let copy = std::fs::read(copied.join(&name)).expect("chart CRD is readable");
        assert!(
            original == copy,
            "charts/sluice/crds/{name} is stale: run `cp crds/{name} charts/sluice/crds/`"
        );
    }
}

#[test]
fn helm_lint_passes_strictly_for_every_tested_value_set() {
    let Some(helm) = Helm::find("helm_lint_passes_strictly_for_every_tested_value_set") else {
        return;
    };
    for (name, args) in VALUE_SETS {
        if let Err(failure) = helm.lint(args) {
            panic!(
                "helm lint failed for the {name} values:\n{}",
                failure.stderr
            );
        }
    }
}

#[test]
fn every_rendered_manifest_passes_strict_kubernetes_validation() {
    let test = "every_rendered_manifest_passes_strict_kubernetes_validation";
    let (Some(helm), Some(validator)) = (Helm::find(test), KubeValidate::find(test)) else {
        return;
    };
    for (name, args) in VALUE_SETS {
        let objects = helm.render(args);
        let built_in: Vec<Value> = objects
            .iter()
            .filter(|o| !CUSTOM_KINDS.contains(&manifest::kind(o)))
            .cloned()
            .collect();
        assert!(
            built_in.len() >= 4,
            "the {name} render has too few objects: {built_in:?}"
        );
        if let Err(report) = validator.validate(&built_in, &format!("helm template ({name})")) {
            panic!("{report}");
        }
    }
}

#[test]
fn default_install_watches_every_namespace_with_a_cluster_role() {
    let Some(helm) = Helm::find("default_install_watches_every_namespace_with_a_cluster_role")
    else {
        return;
    };
    let objects = helm.render(&[]);

    let args = operator_args(&objects);
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "args: {args:?}"
    );
    assert!(
        args.contains(&"--leader-election=false".to_owned()),
        "one replica: {args:?}"
    );
    assert_eq!(
        one_of_kind(&objects, "Deployment")["spec"]["strategy"]["type"],
        "Recreate"
    );
    let scopes = rbac::granted_to(&objects, FULLNAME, NAMESPACE);
    assert_eq!(
        scopes.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
        vec![Scope::Cluster],
        "a single replica needs exactly one binding, cluster-wide"
    );
    assert!(all_of_kind(&objects, "Role").is_empty());
    assert!(
        all_of_kind(&objects, "ServiceMonitor").is_empty(),
        "off by default"
    );
    assert_eq!(one_of_kind(&objects, "Deployment")["spec"]["replicas"], 1);
}

#[test]
fn namespace_scoped_install_grants_nothing_cluster_wide_and_passes_the_namespace_flag() {
    let Some(helm) = Helm::find("namespace_scoped_install_grants_nothing_cluster_wide") else {
        return;
    };
    let objects = helm.render(&["--set", "watchNamespace=shop"]);

    let args = operator_args(&objects);
    assert!(
        args.contains(&"--namespace=shop".to_owned()),
        "args: {args:?}"
    );
    assert!(all_of_kind(&objects, "ClusterRole").is_empty());
    assert!(all_of_kind(&objects, "ClusterRoleBinding").is_empty());
    let scopes = rbac::granted_to(&objects, FULLNAME, NAMESPACE);
    assert_eq!(
        scopes.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
        vec![Scope::Namespace("shop".to_owned())]
    );
    let policy = one_of_kind(&objects, "NetworkPolicy");
    let agent_peer = &policy["spec"]["egress"][2]["to"][0];
    assert_eq!(
        agent_peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "shop",
        "the operator reaches agents of the watched namespace only"
    );
}

#[test]
fn several_replicas_turn_on_leader_election_with_a_lease_role_in_the_release_namespace() {
    let Some(helm) = Helm::find("several_replicas_turn_on_leader_election") else {
        return;
    };
    let objects = helm.render(&["--set", "replicaCount=3"]);

    assert!(operator_args(&objects).contains(&"--leader-election=true".to_owned()));
    let strategy = &one_of_kind(&objects, "Deployment")["spec"]["strategy"];
    assert_eq!(
        strategy["rollingUpdate"]["maxSurge"], 0,
        "standbys are replaced one at a time"
    );
    let scopes = rbac::granted_to(&objects, FULLNAME, NAMESPACE);
    let release_ns = scopes
        .iter()
        .find(|(s, _)| *s == Scope::Namespace(NAMESPACE.to_owned()))
        .expect("a RoleBinding in the release namespace");
    assert!(
        release_ns
            .1
            .iter()
            .all(|g| g.group == "coordination.k8s.io" && g.resource == "leases"),
        "the release-namespace Role is for the Lease only: {:?}",
        release_ns.1
    );
}

#[test]
fn service_monitor_scrapes_the_metrics_service_port_of_the_operator_pods() {
    let Some(helm) = Helm::find("service_monitor_scrapes_the_metrics_service_port") else {
        return;
    };
    let objects = helm.render(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prometheus",
    ]);

    // No official schema for monitoring.coreos.com: check what makes it scrape anything.
    let monitor = one_of_kind(&objects, "ServiceMonitor");
    let service = one_of_kind(&objects, "Service");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"][0],
        NAMESPACE
    );
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    for (key, value) in selector {
        assert_eq!(
            &service["metadata"]["labels"][key], value,
            "Service lacks label {key}"
        );
    }
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], service["spec"]["ports"][0]["name"]);
    assert_eq!(endpoint["path"], "/metrics");
    let allowed: Vec<&str> = ["port", "path", "interval", "scrapeTimeout"]
        .into_iter()
        .collect();
    for key in endpoint.as_object().expect("endpoint").keys() {
        assert!(
            allowed.contains(&key.as_str()),
            "unexpected endpoint field {key}"
        );
    }

    // The Service's target port is the container's named port, which serves the probes too.
    let container = operator_container(&objects);
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"],
        container["ports"][0]["name"]
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
}

#[test]
fn operator_pods_meet_the_restricted_pod_security_standard() {
    let Some(helm) = Helm::find("operator_pods_meet_the_restricted_pod_security_standard") else {
        return;
    };
    for (name, args) in VALUE_SETS {
        let objects = helm.render(args);
        let pod = &one_of_kind(&objects, "Deployment")["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        assert!(
            pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none(),
            "{name}"
        );
        for container in pod["containers"].as_array().expect("containers") {
            let security = &container["securityContext"];
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(
                security["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{name}"
            );
            assert!(security["capabilities"].get("add").is_none(), "{name}");
        }
    }
}

#[test]
fn values_schema_rejects_a_wrong_type_naming_the_value() {
    let Some(helm) = Helm::find("values_schema_rejects_a_wrong_type_naming_the_value") else {
        return;
    };
    let failure = helm
        .template(&["--set", "replicaCount=two"])
        .expect_err("a string replicaCount must be refused");
    assert!(
        failure.stderr.contains("replicaCount") && failure.stderr.contains("integer"),
        "helm's message should name replicaCount and the wanted type:\n{}",
        failure.stderr
    );

    let failure = helm
        .template(&["--set", "metrics.serviceMonitor.enabled=maybe"])
        .expect_err("a string where a boolean belongs must be refused");
    assert!(
        failure.stderr.contains("serviceMonitor/enabled") && failure.stderr.contains("boolean"),
        "{}",
        failure.stderr
    );
}

#[test]
fn values_schema_rejects_unknown_and_misspelled_values() {
    let Some(helm) = Helm::find("values_schema_rejects_unknown_and_misspelled_values") else {
        return;
    };
    for misspelled in [
        "replicas=2",
        "metrics.serviceMonitor.enable=true",
        "image.tags=1",
    ] {
        let failure = helm
            .template(&["--set", misspelled])
            .expect_err("an unknown value must be refused");
        let key = misspelled
            .split(['=', '.'])
            .rev()
            .nth(1)
            .unwrap_or(misspelled);
        assert!(
            failure.stderr.contains("additional properties") && failure.stderr.contains(key),
            "--set {misspelled}: helm's message should name {key}:\n{}",
            failure.stderr
        );
    }
}

#[test]
fn values_schema_describes_every_value_and_closes_every_object() {
    let schema: Value =
        serde_json::from_str(&support::read_repo_file("charts/sluice/values.schema.json"))
            .expect("values.schema.json is JSON");
    let values: Value = serde_yaml::from_str(&support::read_repo_file("charts/sluice/values.yaml"))
        .expect("values.yaml is YAML");

    let mut missing = Vec::new();
    check_described(&schema, &schema, &values, "", &mut missing);
    assert!(
        missing.is_empty(),
        "values without a schema entry: {missing:?}"
    );

    let mut open = Vec::new();
    check_closed(&schema, "", &mut open);
    assert!(
        open.is_empty(),
        "schema objects that accept unknown keys: {open:?}"
    );
}

/// Walks values.yaml alongside the schema; every key must have a `properties` entry.
fn check_described(root: &Value, node: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    let node = resolve(root, node);
    let Some(fields) = value.as_object() else {
        return;
    };
    for (key, child) in fields {
        let here = format!("{path}.{key}");
        match node["properties"].get(key) {
            Some(schema) => check_described(root, schema, child, &here, out),
            None if node["additionalProperties"].is_object() => {}
            None => out.push(here),
        }
    }
}

/// Every object schema with `properties` must say `additionalProperties`.
fn check_closed(node: &Value, path: &str, out: &mut Vec<String>) {
    let Some(fields) = node.as_object() else {
        return;
    };
    if fields.contains_key("properties") && !fields.contains_key("additionalProperties") {
        out.push(if path.is_empty() {
            "/".to_owned()
        } else {
            path.to_owned()
        });
    }
    for (key, child) in fields {
        match child {
            Value::Object(_) => check_closed(child, &format!("{path}/{key}"), out),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    check_closed(item, &format!("{path}/{key}/{i}"), out);
                }
            }
            _ => {}
        }
    }
}

fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    match node["$ref"].as_str().and_then(|r| r.strip_prefix('#')) {
        Some(pointer) => root.pointer(pointer).unwrap_or(node),
        None => node,
    }
}

/// The operator's API calls as grants, split into the Lease calls (leader election, in the
/// release namespace, only with several replicas) and the rest (in the watched namespaces).
fn operator_api_calls() -> (rbac::Grants, rbac::Grants) {
    let mut workload = rbac::Grants::new();
    let mut lease = rbac::Grants::new();
    for call in sluice_operator::rbac::API_CALLS {
        for verb in call.verbs {
            let grant = rbac::Grant {
                group: call.group.to_owned(),
                resource: call.resource.to_owned(),
                verb: (*verb).to_owned(),
            };
            if call.group == "coordination.k8s.io" {
                lease.insert(grant);
            } else {
                workload.insert(grant);
            }
        }
    }
    (workload, lease)
}

fn differences(granted: &rbac::Grants, used: &rbac::Grants) -> String {
    let missing: Vec<String> = used.difference(granted).map(ToString::to_string).collect();
    let extra: Vec<String> = granted.difference(used).map(ToString::to_string).collect();
    format!("not granted but used: {missing:?}; granted but never used: {extra:?}")
}

#[test]
fn chart_rbac_grants_exactly_the_api_calls_the_operator_makes() {
    let Some(helm) = Helm::find("chart_rbac_grants_exactly_the_api_calls_the_operator_makes")
    else {
        return;
    };
    let (workload, lease) = operator_api_calls();
    assert!(
        !workload.is_empty() && !lease.is_empty(),
        "operator/src/rbac.rs API_CALLS is empty"
    );

    let modes: [(&str, &[&str], Scope, bool); 4] = [
        ("cluster-wide", &[], Scope::Cluster, false),
        (
            "cluster-wide, 2 replicas",
            &["--set", "replicaCount=2"],
            Scope::Cluster,
            true,
        ),
        (
            "namespace-scoped",
            &["--set", "watchNamespace=shop"],
            Scope::Namespace("shop".to_owned()),
            false,
        ),
        (
            "namespace-scoped, 2 replicas",
            &["--set", "watchNamespace=shop", "--set", "replicaCount=2"],
            Scope::Namespace("shop".to_owned()),
            true,
        ),
    ];
    for (mode, args, workload_scope, elects) in modes {
        let objects = helm.render(args);
        let mut scopes = rbac::granted_to(&objects, FULLNAME, NAMESPACE);

        let at = scopes
            .iter()
            .position(|(s, _)| *s == workload_scope)
            .unwrap_or_else(|| panic!("{mode}: nothing bound at {workload_scope:?}"));
        let (_, granted) = scopes.remove(at);
        assert!(
            granted == workload,
            "{mode}: {}",
            differences(&granted, &workload)
        );

        if elects {
            let at = scopes
                .iter()
                .position(|(s, _)| *s == Scope::Namespace(NAMESPACE.to_owned()))
                .unwrap_or_else(|| panic!("{mode}: no Lease role in the release namespace"));
            let (_, granted) = scopes.remove(at);
            assert!(
                granted == lease,
                "{mode}, leases: {}",
                differences(&granted, &lease)
            );
        }
        assert!(
            scopes.is_empty(),
            "{mode}: grants beyond what the operator uses: {scopes:?}"
        );
    }
}

#[test]
fn operator_args_and_env_in_the_chart_are_flags_the_operator_defines() {
    let Some(helm) =
        Helm::find("operator_args_and_env_in_the_chart_are_flags_the_operator_defines")
    else {
        return;
    };
    let flags = support::operator_flags::operator_flags();
    for (name, args) in VALUE_SETS
        .iter()
        .copied()
        .chain([("two replicas", &["--set", "replicaCount=2"][..])])
    {
        let objects = helm.render(args);
        for arg in operator_args(&objects) {
            let long = arg.split('=').next().unwrap_or(&arg);
            assert!(
                flags.iter().any(|f| f.long == long),
                "{name}: sluice-operator has no {long}"
            );
        }
        let container = operator_container(&objects);
        for env in container["env"].as_array().into_iter().flatten() {
            let var = env["name"].as_str().unwrap_or_default();
            assert!(
                flags.iter().any(|f| f.env.as_deref() == Some(var)),
                "{name}: sluice-operator reads no {var}"
            );
        }
        // The flag takes an explicit value (true by default in the binary), so the chart must
        // always say which.
        let election: Vec<String> = operator_args(&objects)
            .into_iter()
            .filter(|a| a.starts_with("--leader-election"))
            .collect();
        let several = one_of_kind(&objects, "Deployment")["spec"]["replicas"].as_u64() > Some(1);
        assert_eq!(
            election,
            vec![format!("--leader-election={several}")],
            "{name}"
        );
    }
}
