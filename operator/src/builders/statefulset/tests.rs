use super::*;
use crate::builders::test_mq;

fn build_default(spec: serde_json::Value) -> StatefulSet {
    let mq = test_mq(spec);
    build(
        &mq,
        &Names::of(&mq).unwrap(),
        &Settings::default(),
        &Shape::initial(&mq),
    )
    .unwrap()
}

fn agent(sts: &StatefulSet) -> Container {
    sts.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .clone()
}

fn env_of(c: &Container, name: &str) -> EnvVar {
    c.env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == name)
        .unwrap()
        .clone()
}

#[test]
fn agents_start_in_parallel_behind_the_headless_service() {
    let spec = build_default(serde_json::json!({"replicas": 3}))
        .spec
        .unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(spec.service_name.as_deref(), Some("orders-peers"));
}

#[test]
fn container_runs_the_broker_with_its_data_dir_on_the_claim() {
    let sts = build_default(serde_json::json!({}));
    let c = agent(&sts);
    assert_eq!(c.command, Some(vec!["sluice-agent".to_owned()]));
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "broker");
    let dir = args.iter().position(|a| a == "--data-dir").unwrap();
    assert!(args[dir + 1].starts_with(DATA_MOUNT_PATH));
    let mount = c
        .volume_mounts
        .unwrap()
        .into_iter()
        .find(|m| m.name == DATA_VOLUME)
        .unwrap();
    assert_eq!(mount.mount_path, DATA_MOUNT_PATH);
    let claims = sts.spec.unwrap().volume_claim_templates.unwrap();
    assert_eq!(claims[0].metadata.name.as_deref(), Some(DATA_VOLUME));
}

#[test]
fn peers_env_lists_every_agent_by_stable_name() {
    let c = agent(&build_default(serde_json::json!({"replicas": 2})));
    assert_eq!(
        env_of(&c, env::PEERS).value.as_deref(),
        Some(
            "orders-0.orders-peers.shop.svc.cluster.local:7071,orders-1.orders-peers.shop.svc.cluster.local:7071"
        )
    );
    let pod_name = env_of(&c, env::POD_NAME)
        .value_from
        .unwrap()
        .field_ref
        .unwrap();
    assert_eq!(pod_name.field_path, "metadata.name");
}

#[test]
fn probes_use_native_grpc_health_on_the_public_port() {
    let c = agent(&build_default(serde_json::json!({})));
    for probe in [c.startup_probe, c.readiness_probe, c.liveness_probe] {
        assert_eq!(probe.unwrap().grpc.unwrap().port, 7070);
    }
    let ports: Vec<(String, i32)> = c
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        vec![
            ("grpc".into(), 7070),
            ("peer".into(), 7071),
            ("metrics".into(), 9090)
        ]
    );
}

#[test]
fn pod_and_container_meet_the_restricted_security_profile() {
    let sts = build_default(serde_json::json!({}));
    let pod = sts.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let psc = pod.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    let sc = agent(&sts).security_context.unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(pod.automount_service_account_token, Some(false));
}

#[test]
fn claim_template_takes_size_and_class_from_the_spec() {
    let sts = build_default(
        serde_json::json!({"storage": {"size": "20Gi", "storageClassName": "fast-ssd"}}),
    );
    let claim = sts
        .spec
        .unwrap()
        .volume_claim_templates
        .unwrap()
        .remove(0)
        .spec
        .unwrap();
    assert_eq!(claim.storage_class_name.as_deref(), Some("fast-ssd"));
    assert_eq!(
        claim.resources.unwrap().requests.unwrap()["storage"],
        Quantity("20Gi".into())
    );
}

#[test]
fn claims_are_retained_on_delete_and_deleted_on_scale_in_after_the_drain() {
    let policy = build_default(serde_json::json!({}))
        .spec
        .unwrap()
        .persistent_volume_claim_retention_policy
        .unwrap();
    assert_eq!(policy.when_deleted.as_deref(), Some("Retain"));
    assert_eq!(policy.when_scaled.as_deref(), Some("Delete"));
}

#[test]
fn pods_are_restarted_by_the_operator_not_by_the_statefulset_controller() {
    let strategy = build_default(serde_json::json!({}))
        .spec
        .unwrap()
        .update_strategy
        .unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("OnDelete"));
}

#[test]
fn peers_env_is_the_bootstrap_set_and_stays_when_replicas_change() {
    let mq = test_mq(serde_json::json!({"replicas": 3}));
    let names = Names::of(&mq).unwrap();
    let created = build(&mq, &names, &Settings::default(), &Shape::initial(&mq)).unwrap();
    let scaled_mq = test_mq(serde_json::json!({"replicas": 5}));
    let shape = Shape::of_existing(&scaled_mq, &created, 5);
    assert_eq!(shape.bootstrap_replicas, 3);
    assert_eq!(shape.replication_factor, 3);
    let scaled = build(&scaled_mq, &names, &Settings::default(), &shape).unwrap();

    assert_eq!(scaled.spec.as_ref().unwrap().replicas, Some(5));
    assert_eq!(
        scaled.spec.as_ref().unwrap().template,
        created.spec.as_ref().unwrap().template,
        "the pod template (and so every pod) is untouched by a scale"
    );
    assert_eq!(
        scaled.metadata.annotations.as_ref().unwrap()[BOOTSTRAP_ANNOTATION],
        "3"
    );
}

#[test]
fn replication_factor_env_stays_the_bootstrap_one_when_replicas_grow() {
    let mq = test_mq(serde_json::json!({"replicas": 1}));
    let names = Names::of(&mq).unwrap();
    let created = build(&mq, &names, &Settings::default(), &Shape::initial(&mq)).unwrap();
    let grown = test_mq(serde_json::json!({"replicas": 3}));
    let shape = Shape::of_existing(&grown, &created, 3);
    let sts = build(&grown, &names, &Settings::default(), &shape).unwrap();
    assert_eq!(
        env_of(&agent(&sts), env::REPLICATION_FACTOR)
            .value
            .as_deref(),
        Some("1"),
        "the agents refuse a factor above their bootstrap peers"
    );
}

#[test]
fn bootstrap_size_of_a_statefulset_without_the_annotation_is_read_from_its_peers_env() {
    let mq = test_mq(serde_json::json!({"replicas": 4}));
    let names = Names::of(&mq).unwrap();
    let mut old = build(&mq, &names, &Settings::default(), &Shape::initial(&mq)).unwrap();
    old.metadata.annotations = None;
    let grown = test_mq(serde_json::json!({"replicas": 6}));
    assert_eq!(Shape::of_existing(&grown, &old, 4).bootstrap_replicas, 4);
}

#[test]
fn peer_advertise_env_names_the_pod_on_the_peer_port() {
    let c = agent(&build_default(serde_json::json!({"replicas": 3})));
    assert_eq!(
        env_of(&c, env::PEER_ADVERTISE).value.as_deref(),
        Some("$(SLUICE_POD_NAME).orders-peers.shop.svc.cluster.local:7071")
    );
}

#[test]
fn spec_image_overrides_the_operator_default() {
    assert_eq!(
        agent(&build_default(serde_json::json!({})))
            .image
            .as_deref(),
        Some(crate::settings::AGENT_IMAGE_DEFAULT)
    );
    let c = agent(&build_default(
        serde_json::json!({"image": "registry.local/agent:dev"}),
    ));
    assert_eq!(c.image.as_deref(), Some("registry.local/agent:dev"));
}

#[test]
fn agents_spread_over_zones_and_nodes_without_blocking_small_clusters() {
    let pod = build_default(serde_json::json!({}))
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    let spread = pod.topology_spread_constraints.unwrap();
    let keys: Vec<&str> = spread.iter().map(|t| t.topology_key.as_str()).collect();
    assert_eq!(
        keys,
        vec!["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    );
    assert!(
        spread
            .iter()
            .all(|t| t.when_unsatisfiable == "ScheduleAnyway")
    );
}

#[test]
fn the_agent_hands_its_leaderships_away_in_prestop_within_the_grace_period() {
    let sts = build_default(serde_json::json!({}));
    let command = agent(&sts)
        .lifecycle
        .and_then(|l| l.pre_stop)
        .and_then(|h| h.exec)
        .and_then(|e| e.command)
        .unwrap();
    assert_eq!(command[..2], ["sluice-agent", "hand-off"]);
    assert_eq!(command, pre_stop_command());
    let timeout = command.iter().position(|a| a == "--timeout").unwrap();
    assert_eq!(command[timeout + 1], HAND_OFF_TIMEOUT_SECS.to_string());
    let grace = sts
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .termination_grace_period_seconds
        .unwrap();
    assert!(grace > HAND_OFF_TIMEOUT_SECS + AGENT_SHUTDOWN_SECS);
}

#[test]
fn replication_factor_env_is_the_largest_effective_factor_of_the_queues() {
    let factor = |spec| {
        env_of(&agent(&build_default(spec)), env::REPLICATION_FACTOR)
            .value
            .unwrap()
    };
    // No queues: the default queue's factor, min(3, replicas).
    assert_eq!(factor(serde_json::json!({"replicas": 2})), "2");
    assert_eq!(factor(serde_json::json!({"replicas": 5})), "3");
    assert_eq!(
        factor(serde_json::json!({"replicas": 5, "queues": [
            {"name": "a", "replicationFactor": 1},
            {"name": "b", "replicationFactor": 5},
            {"name": "c"}
        ]})),
        "5"
    );
}

#[test]
fn advertise_env_names_the_pod_through_the_headless_service_after_pod_name() {
    let c = agent(&build_default(serde_json::json!({"replicas": 3})));
    assert_eq!(
        env_of(&c, env::ADVERTISE).value.as_deref(),
        Some("$(SLUICE_POD_NAME).orders-peers.shop.svc.cluster.local:7070")
    );
    // Kubernetes expands `$(VAR)` only for variables defined earlier in the list.
    let order: Vec<&str> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    let position = |name| order.iter().position(|n| *n == name).unwrap();
    assert!(
        position(env::POD_NAME) < position(env::ADVERTISE),
        "{order:?}"
    );
}
