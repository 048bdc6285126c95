//! The agents' NetworkPolicy.

use k8s_openapi::{
    api::networking::v1::{
        NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
        NetworkPolicySpec,
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use crate::{
    Result,
    crd::MessageQueue,
    names::{GRPC_PORT, METRICS_PORT, Names, PEER_PORT, child_meta},
};

fn tcp(port: i32) -> Option<Vec<NetworkPolicyPort>> {
    Some(vec![NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    }])
}

/// Ingress only where it is needed: the public API and metrics from pods of any namespace in
/// the cluster (clients and sidecars live in other namespaces; so does Prometheus), the
/// replication port only from the other agents of the same MessageQueue. Egress is left open:
/// agents reach each other and DNS, and an egress rule would have to know the cluster's DNS
/// service.
pub fn build(mq: &MessageQueue, names: &Names) -> Result<NetworkPolicy> {
    let any_pod_in_cluster = || {
        Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            ..NetworkPolicyPeer::default()
        }])
    };
    let agents = LabelSelector {
        match_labels: Some(names.selector_labels()),
        ..LabelSelector::default()
    };
    Ok(NetworkPolicy {
        metadata: child_meta(mq, names, names.network_policy())?,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(agents.clone()),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: any_pod_in_cluster(),
                    ports: tcp(GRPC_PORT),
                },
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(agents),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: tcp(PEER_PORT),
                },
                NetworkPolicyIngressRule {
                    from: any_pod_in_cluster(),
                    ports: tcp(METRICS_PORT),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_mq;

    #[test]
    fn only_agents_of_the_same_queue_reach_the_peer_port() {
        let mq = test_mq(serde_json::json!({}));
        let names = Names::of(&mq).unwrap();
        let spec = build(&mq, &names).unwrap().spec.unwrap();
        let rules = spec.ingress.unwrap();
        let peer_rule = rules
            .iter()
            .find(|r| r.ports.as_ref().unwrap()[0].port == Some(IntOrString::Int(7071)))
            .unwrap();
        let from = &peer_rule.from.as_ref().unwrap()[0];
        assert_eq!(
            from.namespace_selector, None,
            "peers must be in the same namespace"
        );
        assert_eq!(
            from.pod_selector.as_ref().unwrap().match_labels,
            Some(names.selector_labels())
        );
    }

    #[test]
    fn clients_and_scrapers_reach_grpc_and_metrics_from_any_namespace() {
        let mq = test_mq(serde_json::json!({}));
        let spec = build(&mq, &Names::of(&mq).unwrap()).unwrap().spec.unwrap();
        for port in [7070, 9090] {
            let rule = spec
                .ingress
                .as_ref()
                .unwrap()
                .iter()
                .find(|r| r.ports.as_ref().unwrap()[0].port == Some(IntOrString::Int(port)))
                .unwrap();
            assert_eq!(
                rule.from.as_ref().unwrap()[0].namespace_selector,
                Some(LabelSelector::default())
            );
        }
    }
}
