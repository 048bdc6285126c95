//! Against a real cluster, when `KUBECONFIG` points at one: installs the CRD, applies a small
//! MessageQueue, runs the controller and waits for the StatefulSet and Services it creates,
//! then deletes the MessageQueue. Skipped (and says so) without `KUBECONFIG`.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{apps::v1::StatefulSet, core::v1::Service},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, CustomResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::events::Reporter,
};
use sluice_operator::{
    FIELD_MANAGER, agent_admin::GrpcAgentAdmin, context::Context, controller, crd::MessageQueue,
    metrics::Metrics, settings::Settings,
};

#[tokio::test]
async fn controller_creates_the_agents_of_a_message_queue_in_a_live_cluster() {
    if std::env::var_os("KUBECONFIG").is_none() {
        println!("skipped: KUBECONFIG not set (point it at a test cluster to run this)");
        return;
    }
    let namespace = std::env::var("SLUICE_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG is set but no client could be built");

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        MessageQueue::crd_name(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(MessageQueue::crd()),
    )
    .await
    .expect("installing the CRD");
    tokio::time::sleep(Duration::from_secs(2)).await; // let the API server start serving it

    let mqs: Api<MessageQueue> = Api::namespaced(client.clone(), &namespace);
    let name = "sluice-live-test";
    let mq = serde_json::json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "MessageQueue",
        "metadata": {"name": name},
        "spec": {"replicas": 1, "storage": {"size": "1Gi"}, "queues": [{"name": "live", "replicationFactor": 1}]}
    });
    mqs.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&mq),
    )
    .await
    .expect("applying the MessageQueue");

    let ctx = Arc::new(Context::new(
        client.clone(),
        Settings::default(),
        Arc::new(GrpcAgentAdmin),
        Arc::new(Metrics::default()),
        Reporter {
            controller: "sluice-operator-live-test".into(),
            instance: None,
        },
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(controller::run(ctx, Some(namespace.clone()), async move {
        let _ = stop_rx.await;
    }));

    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let mut found = false;
    for _ in 0..60 {
        if statefulsets.get_opt(name).await.unwrap().is_some()
            && services
                .get_opt(&format!("{name}-peers"))
                .await
                .unwrap()
                .is_some()
        {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let status = mqs.get_status(name).await.unwrap().status;
    let _ = stop_tx.send(());
    let _ = run.await;
    mqs.delete(name, &DeleteParams::default())
        .await
        .expect("deleting the MessageQueue");

    assert!(
        found,
        "the StatefulSet and headless Service did not appear within 60 s"
    );
    let status = status.expect("the controller wrote a status");
    assert!(
        status.conditions.iter().any(|c| c.type_ == "Ready"),
        "{status:?}"
    );
}
