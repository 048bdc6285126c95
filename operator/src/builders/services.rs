//! The headless Service (peer discovery) and the client Service.

use k8s_openapi::{
    api::core::v1::{Service, ServicePort, ServiceSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    Result,
    crd::MessageQueue,
    names::{
        GRPC_PORT, GRPC_PORT_NAME, METRICS_PORT, METRICS_PORT_NAME, Names, PEER_PORT,
        PEER_PORT_NAME, child_meta,
    },
};

fn port(name: &str, number: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port: number,
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        app_protocol: None,
        ..ServicePort::default()
    }
}

/// Headless Service that gives each agent the stable name `<mq>-<i>.<mq>-peers`. It publishes
/// agents that are not ready yet, because agents must find each other to become ready (a
/// partition elects a leader before it serves). It also carries the metrics port, so a
/// ServiceMonitor can scrape every agent.
pub fn build_headless(mq: &MessageQueue, names: &Names) -> Result<Service> {
    Ok(Service {
        metadata: child_meta(mq, names, names.headless_service())?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(names.selector_labels()),
            ports: Some(vec![
                port(GRPC_PORT_NAME, GRPC_PORT),
                port(PEER_PORT_NAME, PEER_PORT),
                port(METRICS_PORT_NAME, METRICS_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// Client Service: the public gRPC API of the ready agents only.
pub fn build_client(mq: &MessageQueue, names: &Names) -> Result<Service> {
    Ok(Service {
        metadata: child_meta(mq, names, names.client_service())?,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(names.selector_labels()),
            ports: Some(vec![port(GRPC_PORT_NAME, GRPC_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_mq;

    #[test]
    fn headless_service_publishes_not_ready_agents_on_all_ports() {
        let mq = test_mq(serde_json::json!({}));
        let svc = build_headless(&mq, &Names::of(&mq).unwrap()).unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("orders-peers"));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let ports: Vec<i32> = spec.ports.unwrap().iter().map(|p| p.port).collect();
        assert_eq!(ports, vec![7070, 7071, 9090]);
    }

    #[test]
    fn client_service_exposes_only_the_public_grpc_port() {
        let mq = test_mq(serde_json::json!({}));
        let svc = build_client(&mq, &Names::of(&mq).unwrap()).unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("orders"));
        let ports = svc.spec.unwrap().ports.unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, 7070);
        assert_eq!(
            ports[0].target_port,
            Some(IntOrString::String("grpc".into()))
        );
    }
}
