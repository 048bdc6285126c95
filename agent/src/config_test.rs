//! Flag parsing of `sluice-agent broker`, through clap as the binary parses them.

use super::*;
use crate::cluster::ClusterConfig;
use clap::Parser;

#[test]
fn fsync_policy_parses_every_documented_form_and_rejects_others() {
    assert_eq!(parse_fsync("always"), Ok(FsyncPolicy::Always));
    assert_eq!(parse_fsync("never"), Ok(FsyncPolicy::Never));
    assert_eq!(
        parse_fsync("interval:5"),
        Ok(FsyncPolicy::Interval(Duration::from_millis(5)))
    );
    assert!(parse_fsync("interval:0").is_err());
    assert!(parse_fsync("interval:x").is_err());
    assert!(parse_fsync("sometimes").is_err());
}

#[test]
fn segment_size_accepts_units_and_refuses_tiny_values() {
    assert_eq!(parse_bytes("64MiB"), Ok(64 * 1024 * 1024));
    assert_eq!(parse_bytes("8192"), Ok(8192));
    assert!(parse_bytes("12").is_err());
    assert!(parse_bytes("lots").is_err());
}

#[test]
fn broker_flags_have_documented_defaults() {
    let args = Args::try_parse_from(["sluice-agent", "broker", "--data-dir", "/tmp/x"])
        .expect("minimal flags parse");
    let Command::Broker(b) = args.command else {
        panic!("`broker` parses as the broker command");
    };
    assert_eq!(b.listen.to_string(), "0.0.0.0:7070");
    assert_eq!(b.metrics_listen.to_string(), "0.0.0.0:9090");
    assert_eq!(b.log_config(), LogConfig::default());
    assert_eq!(b.log_format, LogFormat::Text);
}

fn broker(args: &[&str]) -> Result<BrokerArgs, clap::Error> {
    let command_line = ["sluice-agent", "broker", "--data-dir", "/tmp/x"]
        .into_iter()
        .chain(args.iter().copied());
    Args::try_parse_from(command_line).map(|args| {
        let Command::Broker(b) = args.command else {
            panic!("`broker` parses as the broker command");
        };
        b
    })
}

#[test]
fn hand_off_reads_the_pods_identity_and_defaults_to_a_20_second_deadline() {
    let args = Args::try_parse_from(["sluice-agent", "hand-off", "--pod-name", "orders-2"])
        .expect("hand-off flags parse");
    let Command::HandOff(h) = args.command else {
        panic!("`hand-off` parses as the hand-off command");
    };
    assert_eq!(h.node_id, 2);
    assert_eq!(h.listen.to_string(), "0.0.0.0:7070");
    assert_eq!(h.timeout, 20);
}

fn cluster_error(args: &[&str]) -> String {
    ClusterConfig::from_args(&broker(args).expect("flags parse"))
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn peers_are_split_on_commas_and_make_a_cluster_in_their_order() {
    let b = broker(&[
        "--pod-name",
        "sluice-1",
        "--peers",
        "a:7071,b.svc:7071,[::1]:7071",
        "--listen",
        "0.0.0.0:7000",
    ])
    .expect("parses");
    assert_eq!(b.peers, ["a:7071", "b.svc:7071", "[::1]:7071"]);
    let cluster = ClusterConfig::from_args(&b)
        .expect("valid")
        .expect("cluster mode");
    assert_eq!(cluster.node_id, 1);
    assert_eq!(cluster.peers, b.peers);
    assert_eq!(cluster.peer_listen.to_string(), "0.0.0.0:7071");
    // Default advertise: this agent's peer host with the client port.
    assert_eq!(cluster.advertise, "b.svc:7000");
    assert_eq!(cluster.replication_factor, 3);
}

#[test]
fn explicit_advertise_and_replication_factor_are_kept() {
    let b = broker(&[
        "--pod-name",
        "local-0",
        "--peers",
        "a:1,b:2",
        "--advertise",
        "public.example:443",
        "--replication-factor",
        "1",
        "--peer-listen",
        "127.0.0.1:9000",
    ])
    .expect("parses");
    let cluster = ClusterConfig::from_args(&b)
        .expect("valid")
        .expect("cluster mode");
    assert_eq!(cluster.advertise, "public.example:443");
    assert_eq!(cluster.replication_factor, 1);
    assert_eq!(cluster.peer_listen.to_string(), "127.0.0.1:9000");
}

#[test]
fn a_malformed_peer_entry_is_refused_naming_the_flag_and_the_entry() {
    let err = cluster_error(&["--pod-name", "s-0", "--peers", "a:7071,nohost"]);
    assert!(err.contains("--peers[1]"), "{err}");
    assert!(err.contains("\"nohost\""), "{err}");
    for bad in ["a:7071,:7071", "a:0", "a:70710", "a:7071,,b:1"] {
        let err = cluster_error(&["--pod-name", "s-0", "--peers", bad]);
        assert!(err.contains("--peers"), "{bad}: {err}");
    }
}

#[test]
fn peers_without_a_pod_name_are_a_usage_error() {
    let err = broker(&["--peers", "a:7071"]).expect_err("no pod name");
    assert_eq!(
        err.kind(),
        clap::error::ErrorKind::MissingRequiredArgument,
        "{err}"
    );
    assert!(err.to_string().contains("--pod-name"), "{err}");
}

#[test]
fn a_pod_name_without_an_ordinal_or_beyond_the_peers_is_refused_naming_the_flag() {
    let err = cluster_error(&["--pod-name", "sluice", "--peers", "a:1"]);
    assert!(err.contains("--pod-name \"sluice\""), "{err}");
    let err = cluster_error(&["--pod-name", "sluice-2", "--peers", "a:1,b:1"]);
    assert!(err.contains("--pod-name \"sluice-2\""), "{err}");
}

#[test]
fn a_replication_factor_beyond_the_peers_or_zero_is_refused_naming_the_flag() {
    let err = cluster_error(&[
        "--pod-name",
        "s-0",
        "--peers",
        "a:1,b:1",
        "--replication-factor",
        "3",
    ]);
    assert!(err.contains("--replication-factor 3"), "{err}");
    // Zero is refused by clap itself, before any cluster check.
    let err = broker(&["--replication-factor", "0"])
        .expect_err("zero")
        .to_string();
    assert!(err.contains("--replication-factor"), "{err}");
}

#[test]
fn without_peers_the_agent_is_not_in_a_cluster() {
    let b = broker(&["--pod-name", "local-0", "--replication-factor", "2"]).expect("parses");
    assert!(
        ClusterConfig::from_args(&b)
            .expect("no cluster error")
            .is_none()
    );
    assert!(b.queues_file.is_none());
}

#[test]
fn an_agent_beyond_the_peers_joins_with_its_peer_advertise_address() {
    let b = broker(&[
        "--pod-name",
        "s-3",
        "--peers",
        "a:7071,b:7071,c:7071",
        "--peer-advertise",
        "d:7071",
    ])
    .expect("flags parse");
    let cluster = ClusterConfig::from_args(&b)
        .expect("valid")
        .expect("cluster mode");
    assert!(cluster.is_joining());
    assert_eq!(cluster.peer_advertise, "d:7071");
    assert_eq!(cluster.advertise, "d:7070");
    let err = cluster_error(&["--pod-name", "s-3", "--peers", "a:7071,b:7071,c:7071"]);
    assert!(err.contains("--peer-advertise"), "{err}");
}

#[test]
fn a_pod_name_without_an_ordinal_is_refused_with_the_name() {
    for name in [
        "orders",
        "orders-",
        "orders-x1",
        "-",
        "orders-99999999999999999999999",
    ] {
        let err = parse_node_id(name).expect_err(name);
        assert!(err.to_string().contains(&format!("{name:?}")), "{err}");
    }
}

#[test]
fn the_node_id_is_the_ordinal_after_the_last_dash() {
    assert_eq!(parse_node_id("orders-mq-2"), Ok(2));
    assert_eq!(parse_node_id("local-0"), Ok(0));
}
