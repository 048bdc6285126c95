//! The agents' StatefulSet.
//!
//! Each pod runs `sluice-agent broker` with its data directory on its own claim. Peers are
//! passed as the StatefulSet's stable DNS names, so a restarted pod finds the same peers under
//! the same names. `SLUICE_PEERS` is the *bootstrap* set, fixed when the StatefulSet is created
//! ([`Shape::bootstrap_replicas`]): agents added later join through the membership API, and a
//! changing env would roll every pod at every scale (decision 0012).
//!
//! Updates are `OnDelete`: the operator's rolling update (`crate::day2`) hands leadership away
//! and restarts one pod at a time, waiting for every partition to be back in sync in between.
//!
//! Every other way a pod stops (node drain, eviction, `kubectl delete pod`) goes through the
//! agent container's `preStop` hook, `sluice-agent hand-off`: it asks the agent to hand every
//! leadership to a caught-up peer and waits for that ([`HAND_OFF_TIMEOUT_SECS`]) before the
//! kubelet sends SIGTERM. The agent still hands off on SIGTERM too (decision 0010): its
//! balancer may have handed a partition back in between, and a hook that failed or timed out
//! must not leave the groups to an election timeout (decision 0012). The grace period covers
//! both ([`TERMINATION_GRACE_SECS`]).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{
            StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
            StatefulSetUpdateStrategy,
        },
        core::v1::{
            Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
            EnvVar, EnvVarSource, ExecAction, GRPCAction, Lifecycle, LifecycleHandler,
            ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
            PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecurityContext,
            TopologySpreadConstraint, Volume, VolumeMount, VolumeResourceRequirements,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
    },
};

use crate::{
    Result,
    crd::MessageQueue,
    names::{
        CONFIG_MOUNT_PATH, CONFIG_VOLUME, DATA_DIR, DATA_MOUNT_PATH, DATA_VOLUME, GRPC_PORT,
        GRPC_PORT_NAME, METRICS_PORT, METRICS_PORT_NAME, Names, PEER_PORT, PEER_PORT_NAME,
        QUEUES_FILE_KEY, child_meta,
    },
    settings::Settings,
};

/// Name of the agent container.
pub const AGENT_CONTAINER: &str = "agent";
/// The agent binary inside the image.
pub const AGENT_COMMAND: &str = "sluice-agent";
/// UID and GID the agent runs as (the distroless `nonroot` user).
pub const AGENT_UID: i64 = 65532;
/// Longest the `preStop` hand-off may take; the kubelet counts it against the grace period.
pub const HAND_OFF_TIMEOUT_SECS: i64 = 20;
/// Longest the agent's own shutdown takes after SIGTERM: its own hand-off (5 s), draining
/// streams (20 s) and stopping its Raft groups, rounded up.
pub const AGENT_SHUTDOWN_SECS: i64 = 30;
/// Seconds a stopping pod gets: the `preStop` hand-off, then the agent's SIGTERM shutdown
/// (finishing in-flight fsyncs, closing streams), with room to spare before SIGKILL.
pub const TERMINATION_GRACE_SECS: i64 = 60;
const _: () = assert!(HAND_OFF_TIMEOUT_SECS + AGENT_SHUTDOWN_SECS < TERMINATION_GRACE_SECS);
/// Startup probe budget: a restarting agent replays its logs before it serves, so it gets
/// `STARTUP_FAILURES * STARTUP_PERIOD_SECS` (5 minutes) before liveness takes over.
const STARTUP_PERIOD_SECS: i32 = 5;
const STARTUP_FAILURES: i32 = 60;

/// Environment variable names the agent reads (beside its flags' `SLUICE_*` twins).
pub mod env {
    /// The pod's own name (`<mq>-<ordinal>`), the agent's identity among its peers.
    pub const POD_NAME: &str = "SLUICE_POD_NAME";
    /// The pod's namespace.
    pub const NAMESPACE: &str = "SLUICE_NAMESPACE";
    /// Comma-separated `host:port` of every agent's replication endpoint, in ordinal order.
    pub const PEERS: &str = "SLUICE_PEERS";
    /// Where the replication API listens.
    pub const PEER_LISTEN: &str = "SLUICE_PEER_LISTEN";
    /// Path of the queue definitions file.
    pub const QUEUES_FILE: &str = "SLUICE_QUEUES_FILE";
    /// Copies of every partition.
    pub const REPLICATION_FACTOR: &str = "SLUICE_REPLICATION_FACTOR";
    /// The agent's own client address, handed to clients in redirects.
    pub const ADVERTISE: &str = "SLUICE_ADVERTISE";
    /// The agent's own peer address: where the other agents reach it (an agent that joins
    /// after the bootstrap is not in `SLUICE_PEERS`, so it cannot look itself up there).
    pub const PEER_ADVERTISE: &str = "SLUICE_PEER_ADVERTISE";
}

/// Annotation on the StatefulSet recording how many agents bootstrapped the cluster, i.e. the
/// length of `SLUICE_PEERS`; read back at every reconcile so the env never changes.
pub const BOOTSTRAP_ANNOTATION: &str = "sluice.dev/bootstrap-replicas";

/// What of the StatefulSet is decided by the StatefulSet's history rather than by the spec
/// alone: the replica count (moved by the day-2 logic one step at a time), the bootstrap peer
/// set and the claim size (both fixed at creation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// `spec.replicas` of the StatefulSet.
    pub replicas: i32,
    /// Agents listed in `SLUICE_PEERS`.
    pub bootstrap_replicas: i32,
    /// `SLUICE_REPLICATION_FACTOR`: fixed at bootstrap like the peers, since the agents
    /// refuse a factor above their bootstrap peer count and apply it cluster-wide.
    pub replication_factor: i32,
    /// Size of the claim template.
    pub claim_size: String,
}

impl Shape {
    /// The shape of a StatefulSet created now from `mq`'s spec.
    pub fn initial(mq: &MessageQueue) -> Self {
        let factor = Names::of(mq)
            .map(|names| replication_factor(mq, &names))
            .unwrap_or(1);
        Self {
            replicas: mq.spec.replicas,
            bootstrap_replicas: mq.spec.replicas,
            replication_factor: factor,
            claim_size: mq.spec.storage.size.clone(),
        }
    }

    /// The shape of the existing StatefulSet `sts`, with `replicas` as given. Bootstrap size:
    /// the annotation, or (for a StatefulSet written before it existed) the number of entries
    /// of its `SLUICE_PEERS`; claim size: its claim template's. Missing pieces fall back to
    /// [`Shape::initial`].
    pub fn of_existing(mq: &MessageQueue, sts: &StatefulSet, replicas: i32) -> Self {
        let initial = Self::initial(mq);
        let annotated = sts
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(BOOTSTRAP_ANNOTATION))
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|n| *n > 0);
        let env_value = |name: &str| {
            sts.spec
                .as_ref()?
                .template
                .spec
                .as_ref()?
                .containers
                .iter()
                .find(|c| c.name == AGENT_CONTAINER)?
                .env
                .as_ref()?
                .iter()
                .find(|e| e.name == name)?
                .value
                .clone()
        };
        let peers_in_env =
            || env_value(env::PEERS).and_then(|v| i32::try_from(v.split(',').count()).ok());
        Self {
            replicas,
            bootstrap_replicas: annotated
                .or_else(peers_in_env)
                .unwrap_or(initial.bootstrap_replicas),
            replication_factor: env_value(env::REPLICATION_FACTOR)
                .and_then(|v| v.parse().ok())
                .unwrap_or(initial.replication_factor),
            claim_size: template_claim_size(sts).unwrap_or(initial.claim_size),
        }
    }
}

/// Size of the `data` claim template of an existing StatefulSet.
pub fn template_claim_size(sts: &StatefulSet) -> Option<String> {
    sts.spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .iter()
        .find(|t| t.metadata.name.as_deref() == Some(DATA_VOLUME))?
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

/// The agents' replication factor: the largest effective factor of the MessageQueue's queues.
/// The agent applies one factor to every partition it places, so a queue asking for fewer
/// copies gets more rather than a queue asking for more getting fewer (the definitions file
/// still carries each queue's own factor).
pub fn replication_factor(mq: &MessageQueue, names: &Names) -> i32 {
    mq.spec
        .effective_queues(&names.instance)
        .iter()
        .map(|q| q.effective_replication_factor(mq.spec.replicas))
        .max()
        .unwrap_or(1)
}

/// The agent's client address: its stable DNS name through the headless Service and the gRPC
/// port. Kubernetes expands `$(SLUICE_POD_NAME)` because that variable comes earlier in the
/// container's env list.
pub fn advertise_address(names: &Names, cluster_domain: &str) -> String {
    format!(
        "$({}).{}.{}.svc.{cluster_domain}:{GRPC_PORT}",
        env::POD_NAME,
        names.headless_service(),
        names.namespace
    )
}

/// The agent's peer address: the same stable name on the peer port.
pub fn peer_advertise_address(names: &Names, cluster_domain: &str) -> String {
    format!(
        "$({}).{}.{}.svc.{cluster_domain}:{PEER_PORT}",
        env::POD_NAME,
        names.headless_service(),
        names.namespace
    )
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn env_value(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value),
        ..EnvVar::default()
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// A probe on the agent's `grpc.health.v1` service, with the kubelet's native gRPC prober.
fn grpc_probe(period: i32, failures: i32) -> Probe {
    Probe {
        grpc: Some(GRPCAction {
            port: GRPC_PORT,
            service: None,
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// The agent's command line: exactly what the end-to-end harness runs as a local process.
pub fn agent_args() -> Vec<String> {
    [
        "broker",
        "--data-dir",
        DATA_DIR,
        "--listen",
        &format!("0.0.0.0:{GRPC_PORT}"),
        "--metrics-listen",
        &format!("0.0.0.0:{METRICS_PORT}"),
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// The agent container's `preStop` command: hand every leadership away before SIGTERM. The pod
/// name comes from `SLUICE_POD_NAME` in the container's env (exec hooks run with it); the listen
/// address is the one [`agent_args`] gives the broker.
pub fn pre_stop_command() -> Vec<String> {
    [
        AGENT_COMMAND,
        "hand-off",
        "--listen",
        &format!("0.0.0.0:{GRPC_PORT}"),
        "--timeout",
        &HAND_OFF_TIMEOUT_SECS.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn agent_container(
    mq: &MessageQueue,
    names: &Names,
    settings: &Settings,
    shape: &Shape,
) -> Container {
    let image = mq
        .spec
        .image
        .clone()
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| settings.default_image.clone());
    Container {
        name: AGENT_CONTAINER.to_owned(),
        image: Some(image),
        command: Some(vec![AGENT_COMMAND.to_owned()]),
        args: Some(agent_args()),
        ports: Some(vec![
            container_port(GRPC_PORT_NAME, GRPC_PORT),
            container_port(PEER_PORT_NAME, PEER_PORT),
            container_port(METRICS_PORT_NAME, METRICS_PORT),
        ]),
        env: Some(vec![
            env_field(env::POD_NAME, "metadata.name"),
            env_field(env::NAMESPACE, "metadata.namespace"),
            env_value(
                env::PEERS,
                names
                    .peers(shape.bootstrap_replicas, &settings.cluster_domain)
                    .join(","),
            ),
            env_value(env::PEER_LISTEN, format!("0.0.0.0:{PEER_PORT}")),
            env_value(
                env::QUEUES_FILE,
                format!("{CONFIG_MOUNT_PATH}/{QUEUES_FILE_KEY}"),
            ),
            env_value(
                env::REPLICATION_FACTOR,
                shape.replication_factor.to_string(),
            ),
            // Must stay after POD_NAME: `$(VAR)` only expands variables defined before it.
            env_value(
                env::ADVERTISE,
                advertise_address(names, &settings.cluster_domain),
            ),
            env_value(
                env::PEER_ADVERTISE,
                peer_advertise_address(names, &settings.cluster_domain),
            ),
        ]),
        resources: mq.spec.resources.clone(),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(pre_stop_command()),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        startup_probe: Some(grpc_probe(STARTUP_PERIOD_SECS, STARTUP_FAILURES)),
        readiness_probe: Some(grpc_probe(5, 3)),
        liveness_probe: Some(grpc_probe(10, 3)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(AGENT_UID),
            run_as_group: Some(AGENT_UID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: DATA_VOLUME.to_owned(),
                mount_path: DATA_MOUNT_PATH.to_owned(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: CONFIG_VOLUME.to_owned(),
                mount_path: CONFIG_MOUNT_PATH.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

/// Spread agents over zones and nodes so that one failure domain holds as few replicas of a
/// partition as possible. `ScheduleAnyway`: a single-node development cluster must still run.
fn topology_spread(names: &Names) -> Vec<TopologySpreadConstraint> {
    ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
        .iter()
        .map(|key| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: (*key).to_owned(),
            when_unsatisfiable: "ScheduleAnyway".to_owned(),
            label_selector: Some(LabelSelector {
                match_labels: Some(names.selector_labels()),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        })
        .collect()
}

fn claim_template(mq: &MessageQueue, claim_size: &str) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: mq.spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(claim_size.to_owned()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// The StatefulSet of `mq`'s agents with the given [`Shape`].
pub fn build(
    mq: &MessageQueue,
    names: &Names,
    settings: &Settings,
    shape: &Shape,
) -> Result<StatefulSet> {
    let mut metadata = child_meta(mq, names, names.statefulset())?;
    metadata.annotations = Some(BTreeMap::from([(
        BOOTSTRAP_ANNOTATION.to_owned(),
        shape.bootstrap_replicas.to_string(),
    )]));
    Ok(StatefulSet {
        metadata,
        spec: Some(StatefulSetSpec {
            replicas: Some(shape.replicas),
            service_name: Some(names.headless_service()),
            selector: LabelSelector {
                match_labels: Some(names.selector_labels()),
                ..LabelSelector::default()
            },
            // All agents start together: a partition needs a quorum of them to elect a leader,
            // so starting one at a time would have the first wait for peers that are not started.
            pod_management_policy: Some("Parallel".to_owned()),
            // The operator restarts pods itself, one at a time and only while every partition
            // is in sync (`crate::day2`); the StatefulSet controller would not wait for that.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_owned()),
                rolling_update: None,
            }),
            // Retain on delete: the claims hold confirmed messages, and losing them must take a
            // deliberate `kubectl delete pvc` (decision 0005). Delete on scale-in: the operator
            // shrinks the StatefulSet only after the leaving agent was drained and removed, so
            // its claim holds nothing the cluster needs, and a later scale-out must not bring
            // back a removed member's stale log (decision 0012).
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Retain".to_owned()),
                    when_scaled: Some("Delete".to_owned()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names.labels()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names.service_account()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECS),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(AGENT_UID),
                        run_as_group: Some(AGENT_UID),
                        fs_group: Some(AGENT_UID),
                        fs_group_change_policy: Some("OnRootMismatch".to_owned()),
                        seccomp_profile: Some(runtime_default_seccomp()),
                        ..PodSecurityContext::default()
                    }),
                    topology_spread_constraints: Some(topology_spread(names)),
                    containers: vec![agent_container(mq, names, settings, shape)],
                    volumes: Some(vec![
                        Volume {
                            name: CONFIG_VOLUME.to_owned(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: names.configmap(),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            name: "tmp".to_owned(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Volume::default()
                        },
                    ]),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![claim_template(mq, &shape.claim_size)]),
            ..StatefulSetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests;
