//! The container images (`docker/Dockerfile`), checked statically against the crates they
//! package: there is no container engine on the build machines, so these tests hold the
//! Dockerfile to the binaries, ports, paths and user that the operator and chart rely on.

mod support;

use clap::Parser as _;
use sluice_operator::builders::statefulset::{AGENT_COMMAND, AGENT_UID, agent_args};
use sluice_operator::names;
use std::collections::BTreeMap;
use support::dockerfile::{self, Stage};

fn stages() -> BTreeMap<String, Stage> {
    dockerfile::stages(&support::read_repo_file("docker/Dockerfile"))
}

fn stage<'a>(stages: &'a BTreeMap<String, Stage>, name: &str) -> &'a Stage {
    stages
        .get(name)
        .unwrap_or_else(|| panic!("docker/Dockerfile has no `{name}` stage"))
}

/// Binary names of the workspace's packages, from `cargo metadata`.
fn workspace_binaries() -> Vec<String> {
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(support::repo_root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn every_runtime_image_runs_a_workspace_binary_as_the_distroless_nonroot_user() {
    let stages = stages();
    let binaries = workspace_binaries();
    let builder = stage(&stages, "builder");
    let build = builder.all("RUN").join(" ");
    for (target, binary) in [
        ("operator", "sluice-operator"),
        ("agent", "sluice-agent"),
        ("cli", "sluice"),
    ] {
        assert!(
            binaries.contains(&binary.to_owned()),
            "no workspace binary {binary}"
        );
        assert!(
            build.contains(&format!("--bin {binary}")),
            "the builder does not build {binary}"
        );
        let runtime = stage(&stages, target);
        assert!(
            runtime.from.starts_with("gcr.io/distroless/") && runtime.from.ends_with("nonroot"),
            "{target}: runtime base {} is not a distroless nonroot image",
            runtime.from
        );
        let installed = format!("/usr/local/bin/{binary}");
        assert!(
            runtime
                .all("COPY")
                .iter()
                .any(|c| c.starts_with("--from=builder") && c.ends_with(&installed)),
            "{target}: does not copy {binary} to {installed}"
        );
        assert_eq!(
            runtime.entrypoint(),
            vec![installed],
            "{target}: ENTRYPOINT"
        );
        assert_eq!(runtime.last("USER"), Some("65532:65532"), "{target}: USER");
    }
}

#[test]
fn the_agent_image_runs_the_command_line_the_operator_gives_its_statefulset() {
    let stages = stages();
    let agent = stage(&stages, "agent");

    // The StatefulSet overrides the entrypoint with a bare command name, found through PATH
    // (distroless includes /usr/local/bin).
    assert_eq!(
        agent.entrypoint(),
        vec![format!("/usr/local/bin/{AGENT_COMMAND}")]
    );
    assert_eq!(
        AGENT_UID, 65532,
        "the StatefulSet's runAsUser is the image's nonroot user"
    );

    // The operator's args are accepted by the agent's own flag parser.
    let command_line = std::iter::once(AGENT_COMMAND.to_owned()).chain(agent_args());
    let parsed = sluice_agent::config::Args::try_parse_from(command_line).unwrap_or_else(|e| {
        panic!(
            "the agent rejects the operator's args {:?}:\n{e}",
            agent_args()
        )
    });
    let broker = match parsed.command {
        sluice_agent::config::Command::Broker(broker) => broker,
        // Other modes (the sidecar) are not what the StatefulSet runs.
        #[allow(unreachable_patterns)]
        other => panic!("the operator's args select {other:?}, not the broker"),
    };

    // Ports the agent listens on are exposed, and are the ones the operator's Services target.
    let exposed = agent.exposed_ports();
    for port in [
        broker.listen.port(),
        broker.peer_listen.port(),
        broker.metrics_listen.port(),
    ] {
        assert!(
            exposed.contains(&port),
            "agent listens on {port}, image exposes {exposed:?}"
        );
    }
    let operator_ports = [names::GRPC_PORT, names::PEER_PORT, names::METRICS_PORT]
        .map(|p| u16::try_from(p).expect("ports fit u16"));
    let mut expected = operator_ports.to_vec();
    expected.sort_unstable();
    let mut exposed_sorted = exposed.clone();
    exposed_sorted.sort_unstable();
    assert_eq!(
        exposed_sorted, expected,
        "EXPOSE of the agent image vs the StatefulSet's ports"
    );

    // Without args, the image's data directory is the one the operator mounts.
    assert_eq!(
        agent.env().get("SLUICE_DATA_DIR").map(String::as_str),
        Some(names::DATA_DIR)
    );
    assert_eq!(broker.data_dir, std::path::Path::new(names::DATA_DIR));
}

#[test]
fn the_operator_image_exposes_the_port_the_operator_serves_and_the_chart_probes() {
    let stages = stages();
    let operator = stage(&stages, "operator");
    // The operator's own flag parser, with no flags: the defaults the image runs with.
    let args = sluice_operator::args::Args::try_parse_from(["sluice-operator"])
        .expect("sluice-operator starts without flags");
    let default = args.http_listen;
    assert_eq!(operator.exposed_ports(), vec![default.port()]);

    let values: serde_json::Value =
        serde_yaml::from_str(&support::read_repo_file("charts/sluice/values.yaml"))
            .expect("values.yaml is YAML");
    assert_eq!(
        values["metrics"]["port"].as_u64(),
        Some(u64::from(default.port()))
    );
}
