//! The operator's contract with the agents, checked across the two crates: what the operator
//! puts into the ConfigMap and the StatefulSet (queue definitions, args, env) is exactly what
//! the agent's own readers accept, for every example MessageQueue we ship.

mod support;

use std::collections::BTreeMap;

use clap::{CommandFactory as _, Parser as _};
use serde_json::Value;
use sluice_agent::cluster::ClusterConfig;
use sluice_agent::config::{Args as AgentArgs, BrokerArgs, Command, HandOffArgs};
use sluice_operator::builders::{configmap, statefulset};
use sluice_operator::crd::MessageQueue;
use sluice_operator::names::{self, Names};
use sluice_operator::settings::Settings;
use support::manifest;

/// Variables the operator sets that no agent flag reads, each with why that is right.
const ENV_NOT_FOR_FLAGS: &[(&str, &str)] = &[(
    statefulset::env::NAMESPACE,
    "context for the agent's environment; the peers and advertise names already carry it",
)];

/// Every MessageQueue in `examples/`, as the API server would hand it to the operator.
fn example_message_queues() -> Vec<(String, MessageQueue)> {
    manifest::yaml_files_under(&support::repo_root().join("examples"))
        .into_iter()
        .flat_map(|path| {
            let documents = manifest::parse_file(&path).unwrap_or_else(|e| panic!("{e}"));
            documents
                .into_iter()
                .filter(|o| manifest::kind(o) == "MessageQueue")
                .map(move |mut object| {
                    let name = format!("{} {}", path.display(), manifest::name(&object));
                    // The API server sets these; the builders need them for owner references.
                    let metadata = &mut object["metadata"];
                    metadata["uid"] = "0b1c2d3e-0000-4000-8000-000000000000".into();
                    if metadata["namespace"].is_null() {
                        metadata["namespace"] = "default".into();
                    }
                    let mq: MessageQueue = serde_json::from_value(object)
                        .unwrap_or_else(|e| panic!("{name}: not a MessageQueue: {e}"));
                    (name, mq)
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_agent_reads_every_queue_definition_the_operator_writes() {
    let examples = example_message_queues();
    assert!(!examples.is_empty(), "no MessageQueue in examples/");
    for (example, mq) in examples {
        let names = Names::of(&mq).expect("names");
        let cm = configmap::build(&mq, &names).expect("ConfigMap builds");
        let json = &cm.data.expect("ConfigMap data")[names::QUEUES_FILE_KEY];
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(names::QUEUES_FILE_KEY);
        std::fs::write(&path, json).expect("write queues.json");

        let read = sluice_agent::queues_file::read(&path)
            .unwrap_or_else(|e| panic!("{example}: the agent refuses the operator's file: {e:#}"));
        let written = configmap::queue_definitions(&mq, &names).expect("definitions");
        assert_eq!(read.len(), written.len(), "{example}");
        for (agent, operator) in read.iter().zip(&written) {
            // Field by field: `deny_unknown_fields` on the agent catches fields it lacks; this
            // catches fields it reads into the wrong place.
            let pairs: [(&str, u64, u64); 8] = [
                (
                    "partitions",
                    agent.partitions.into(),
                    operator.partitions.into(),
                ),
                (
                    "replicationFactor",
                    agent.replication_factor.into(),
                    operator.replication_factor.into(),
                ),
                (
                    "ackTimeoutMs",
                    agent.ack_timeout_ms,
                    operator.ack_timeout_ms,
                ),
                (
                    "maxDeliveries",
                    agent.max_deliveries.into(),
                    operator.max_deliveries.into(),
                ),
                (
                    "messageTtlMs",
                    agent.message_ttl_ms,
                    operator.message_ttl_ms,
                ),
                (
                    "maxBacklogMessages",
                    agent.max_backlog_messages,
                    operator.max_backlog_messages,
                ),
                (
                    "maxBacklogBytes",
                    agent.max_backlog_bytes,
                    operator.max_backlog_bytes,
                ),
                (
                    "priorities",
                    agent.priorities.into(),
                    operator.priorities.into(),
                ),
            ];
            for (field, a, o) in pairs {
                assert_eq!(a, o, "{example}: queue {}: {field}", operator.name);
            }
            assert_eq!(agent.name, operator.name, "{example}");
            assert_eq!(
                agent.dead_letter_queue, operator.dead_letter_queue,
                "{example}"
            );
            assert_eq!(agent.overflow, operator.overflow, "{example}");
        }
        let specs = sluice_agent::queues_file::load(&path).expect("specs");
        assert_eq!(
            specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            written.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            "{example}"
        );
    }
}

/// The flag of `sluice-agent broker` that reads each environment variable.
fn agent_env_flags() -> BTreeMap<String, String> {
    env_flags_of("broker")
}

/// The flag of `sluice-agent <subcommand>` that reads each environment variable.
fn env_flags_of(subcommand: &str) -> BTreeMap<String, String> {
    let command = AgentArgs::command();
    let broker = command
        .find_subcommand(subcommand)
        .unwrap_or_else(|| panic!("sluice-agent has `{subcommand}`"));
    broker
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_string_lossy().into_owned();
            Some((env, format!("--{}", arg.get_long()?)))
        })
        .collect()
}

/// Expands `$(VAR)` as the kubelet does: only variables defined earlier in the list.
fn expand(value: &str, earlier: &BTreeMap<String, String>) -> String {
    let mut out = value.to_owned();
    for (name, resolved) in earlier {
        out = out.replace(&format!("$({name})"), resolved);
    }
    out
}

/// The agent's parsed flags in pod `ordinal`, from the container's args and env (as JSON, the
/// way the kubelet receives them) resolved as the kubelet would, env turned into the flags that
/// read it.
fn agent_in_pod(container: &Value, mq: &MessageQueue, ordinal: i32) -> BrokerArgs {
    let flags = agent_env_flags();
    let pod_name = format!(
        "{}-{ordinal}",
        mq.metadata.name.as_deref().unwrap_or_default()
    );
    let namespace = mq.metadata.namespace.clone().unwrap_or_default();
    let mut resolved = BTreeMap::new();
    let mut command_line = vec![statefulset::AGENT_COMMAND.to_owned()];
    for arg in container["args"].as_array().into_iter().flatten() {
        command_line.push(arg.as_str().expect("args are strings").to_owned());
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().expect("env name").to_owned();
        let value = match (
            var["value"].as_str(),
            var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(value), _) => expand(value, &resolved),
            (None, Some("metadata.name")) => pod_name.clone(),
            (None, Some("metadata.namespace")) => namespace.clone(),
            (None, other) => panic!("{name}: unexpected env source {other:?}"),
        };
        assert!(
            !value.contains("$("),
            "{name} = {value:?} refers to a variable not defined before it"
        );
        match flags.get(&name) {
            Some(flag) => command_line.push(format!("{flag}={value}")),
            None => assert!(
                ENV_NOT_FOR_FLAGS.iter().any(|(known, _)| *known == name),
                "the operator sets {name} but no agent flag reads it"
            ),
        }
        resolved.insert(name, value);
    }
    let args = AgentArgs::try_parse_from(&command_line)
        .unwrap_or_else(|e| panic!("the agent refuses {command_line:?}:\n{e}"));
    let Command::Broker(broker) = args.command else {
        panic!("{command_line:?} is not `sluice-agent broker`");
    };
    broker
}

/// The container's env in pod `ordinal`, resolved as the kubelet does (`fieldRef`s and
/// `$(VAR)` of earlier variables).
fn pod_env(container: &Value, mq: &MessageQueue, ordinal: i32) -> BTreeMap<String, String> {
    let pod_name = format!(
        "{}-{ordinal}",
        mq.metadata.name.as_deref().unwrap_or_default()
    );
    let namespace = mq.metadata.namespace.clone().unwrap_or_default();
    let mut resolved = BTreeMap::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().expect("env name").to_owned();
        let value = match (
            var["value"].as_str(),
            var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(value), _) => expand(value, &resolved),
            (None, Some("metadata.name")) => pod_name.clone(),
            (None, Some("metadata.namespace")) => namespace.clone(),
            (None, other) => panic!("{name}: unexpected env source {other:?}"),
        };
        resolved.insert(name, value);
    }
    resolved
}

/// The `preStop` exec command of the container, parsed by the agent with the pod's env (each
/// variable `hand-off` reads turned into its flag unless the command gives the flag itself,
/// which is clap's precedence).
fn pre_stop_in_pod(container: &Value, mq: &MessageQueue, ordinal: i32) -> HandOffArgs {
    let mut command_line: Vec<String> = container["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .unwrap_or_else(|| panic!("no preStop exec command in {container}"))
        .iter()
        .map(|a| a.as_str().expect("command words are strings").to_owned())
        .collect();
    let flags = env_flags_of("hand-off");
    for (name, value) in pod_env(container, mq, ordinal) {
        if let Some(flag) = flags.get(&name)
            && !command_line.iter().any(|a| a == flag)
        {
            command_line.push(format!("{flag}={value}"));
        }
    }
    let args = AgentArgs::try_parse_from(&command_line)
        .unwrap_or_else(|e| panic!("the agent refuses its preStop {command_line:?}:\n{e}"));
    let Command::HandOff(hand_off) = args.command else {
        panic!("preStop {command_line:?} is not `sluice-agent hand-off`");
    };
    hand_off
}

#[test]
fn the_prestop_command_of_every_pod_hands_off_that_pods_agent_on_its_own_port() {
    for (example, mq) in example_message_queues() {
        let names = Names::of(&mq).expect("names");
        let sts = statefulset::build(
            &mq,
            &names,
            &Settings::default(),
            &statefulset::Shape::initial(&mq),
        )
        .expect("StatefulSet builds");
        let pod = sts.spec.expect("spec").template.spec.expect("pod spec");
        let container = pod
            .containers
            .iter()
            .find(|c| c.name == statefulset::AGENT_CONTAINER)
            .expect("agent container");
        let command = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|e| e.command.as_ref())
            .unwrap_or_else(|| panic!("{example}: no preStop exec command"));
        // The image's binary, like the container's own command.
        assert_eq!(
            command.first().map(String::as_str),
            Some(statefulset::AGENT_COMMAND),
            "{example}"
        );
        let container = serde_json::to_value(container).expect("container serializes");
        for ordinal in 0..mq.spec.replicas {
            let hand_off = pre_stop_in_pod(&container, &mq, ordinal);
            let broker = agent_in_pod(&container, &mq, ordinal);
            assert_eq!(
                hand_off.node_id,
                u64::try_from(ordinal).unwrap(),
                "{example} pod {ordinal}"
            );
            let target = sluice_agent::hand_off::local_address(hand_off.listen);
            assert!(target.ip().is_loopback(), "{example}: {target}");
            assert_eq!(target.port(), broker.listen.port(), "{example}");
            assert!(
                i64::try_from(hand_off.timeout).unwrap()
                    < pod.termination_grace_period_seconds.expect("grace period"),
                "{example}: the hand-off must end within the grace period"
            );
        }
    }
}

#[test]
fn every_agent_pod_of_the_statefulset_starts_as_its_own_member_of_the_cluster() {
    for (example, mq) in example_message_queues() {
        let names = Names::of(&mq).expect("names");
        let sts = statefulset::build(
            &mq,
            &names,
            &Settings::default(),
            &statefulset::Shape::initial(&mq),
        )
        .expect("StatefulSet builds");
        let pod = sts.spec.expect("spec").template.spec.expect("pod spec");
        let container = pod
            .containers
            .iter()
            .find(|c| c.name == statefulset::AGENT_CONTAINER)
            .expect("agent container");
        let container = serde_json::to_value(container).expect("container serializes");
        let factor = statefulset::replication_factor(&mq, &names);
        for ordinal in 0..mq.spec.replicas {
            let broker = agent_in_pod(&container, &mq, ordinal);
            let cluster = ClusterConfig::from_args(&broker)
                .unwrap_or_else(|e| panic!("{example} pod {ordinal}: {e}"))
                .unwrap_or_else(|| panic!("{example} pod {ordinal}: not in cluster mode"));
            assert_eq!(
                cluster.node_id,
                u64::try_from(ordinal).unwrap(),
                "{example}"
            );
            assert_eq!(
                cluster.peers,
                names.peers(mq.spec.replicas, "cluster.local"),
                "{example}"
            );
            assert_eq!(
                cluster.advertise,
                format!(
                    "{}:{}",
                    names.pod_host(ordinal, "cluster.local"),
                    names::GRPC_PORT
                ),
                "{example} pod {ordinal}"
            );
            assert_eq!(
                i64::from(cluster.replication_factor),
                i64::from(factor),
                "{example}"
            );
            assert_eq!(
                i64::from(cluster.peer_listen.port()),
                i64::from(names::PEER_PORT),
                "{example}"
            );
            assert_eq!(
                broker.queues_file.as_deref(),
                Some(
                    std::path::Path::new(names::CONFIG_MOUNT_PATH)
                        .join(names::QUEUES_FILE_KEY)
                        .as_path()
                ),
                "{example}"
            );
        }
    }
}

#[test]
fn a_pod_added_by_scale_out_starts_as_a_joining_agent_at_its_stable_peer_name() {
    for (example, mut mq) in example_message_queues() {
        let names = Names::of(&mq).expect("names");
        let created = statefulset::build(
            &mq,
            &names,
            &Settings::default(),
            &statefulset::Shape::initial(&mq),
        )
        .expect("StatefulSet builds");
        let bootstrap = mq.spec.replicas;
        mq.spec.replicas += 1;
        let shape = statefulset::Shape::of_existing(&mq, &created, mq.spec.replicas);
        let sts = statefulset::build(&mq, &names, &Settings::default(), &shape)
            .expect("StatefulSet builds");
        let pod = sts.spec.expect("spec").template.spec.expect("pod spec");
        let container = serde_json::to_value(&pod.containers[0]).expect("container serializes");

        let broker = agent_in_pod(&container, &mq, bootstrap);
        let cluster = ClusterConfig::from_args(&broker)
            .unwrap_or_else(|e| panic!("{example} new pod {bootstrap}: {e}"))
            .unwrap_or_else(|| panic!("{example}: not in cluster mode"));
        assert!(
            cluster.is_joining(),
            "{example}: pod {bootstrap} must join, not bootstrap"
        );
        assert_eq!(
            cluster.peers,
            names.peers(bootstrap, "cluster.local"),
            "{example}"
        );
        assert_eq!(
            cluster.peer_advertise,
            format!(
                "{}:{}",
                names.pod_host(bootstrap, "cluster.local"),
                names::PEER_PORT
            ),
            "{example}"
        );
    }
}
