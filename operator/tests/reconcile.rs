//! Reconcile against an in-process stateful fake of the Kubernetes API: which requests it
//! sends, what ends up stored, and how failures and deletion are handled.

mod support;

use std::{sync::Arc, time::Duration};

use http::Method;
use kube::runtime::{controller::Action, events::Reporter};
use serde_json::{Value, json};
use sluice_operator::{
    Error, FIELD_MANAGER,
    agent_admin::{PartitionStats, QueueStats},
    context::Context,
    controller,
    crd::MessageQueue,
    events::event_reasons,
    metrics::Metrics,
    rbac,
    settings::Settings,
};
use support::{fake_admin::FakeAdmin, fake_api::FakeApi};

const MQ_PATH: &str = "/apis/sluice.dev/v1alpha1/namespaces/shop/messagequeues/orders";
const STS_PATH: &str = "/apis/apps/v1/namespaces/shop/statefulsets/orders";

/// Every child path in apply order, with the kind the body must carry.
const CHILDREN: &[(&str, &str)] = &[
    (
        "/api/v1/namespaces/shop/serviceaccounts/orders-agent",
        "ServiceAccount",
    ),
    (
        "/api/v1/namespaces/shop/configmaps/orders-config",
        "ConfigMap",
    ),
    ("/api/v1/namespaces/shop/services/orders-peers", "Service"),
    ("/api/v1/namespaces/shop/services/orders", "Service"),
    (
        "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/orders",
        "PodDisruptionBudget",
    ),
    (
        "/apis/networking.k8s.io/v1/namespaces/shop/networkpolicies/orders",
        "NetworkPolicy",
    ),
    (STS_PATH, "StatefulSet"),
];

fn pod_path(i: i32) -> String {
    format!("/api/v1/namespaces/shop/pods/orders-{i}")
}

fn claim_path(i: i32) -> String {
    format!("/api/v1/namespaces/shop/persistentvolumeclaims/data-orders-{i}")
}

/// Agent pod `i` as the StatefulSet controller creates it.
fn pod(i: i32, revision: &str, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("orders-{i}"), "namespace": "shop",
                        "labels": {"app.kubernetes.io/name": "sluice-agent", "app.kubernetes.io/instance": "orders",
                                   "controller-revision-hash": revision}},
           "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

struct Harness {
    api: FakeApi,
    admin: Arc<FakeAdmin>,
    ctx: Arc<Context>,
}

fn harness() -> Harness {
    let api = FakeApi::default();
    let admin = Arc::new(FakeAdmin::default());
    let ctx = Arc::new(Context::new(
        api.client(),
        Settings::default(),
        admin.clone(),
        Arc::new(Metrics::default()),
        Reporter {
            controller: "sluice-operator".into(),
            instance: Some("test".into()),
        },
    ));
    Harness { api, admin, ctx }
}

fn new_mq(spec: Value) -> Value {
    json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "MessageQueue",
        "metadata": {"name": "orders", "namespace": "shop", "uid": "0b6a2c1e-1111-4222-8333-444455556666", "generation": 1},
        "spec": spec,
    })
}

impl Harness {
    /// Stores `mq` in the fake and returns it as the controller would see it.
    fn seed(&self, mq: Value) -> Arc<MessageQueue> {
        self.api.insert(MQ_PATH, mq);
        self.current()
    }

    /// The MessageQueue as currently stored (with the status the operator wrote).
    fn current(&self) -> Arc<MessageQueue> {
        Arc::new(serde_json::from_value(self.api.object(MQ_PATH).unwrap()).unwrap())
    }

    async fn reconcile(&self) -> Result<Action, Error> {
        controller::reconcile(self.current(), self.ctx.clone()).await
    }

    fn event_reasons(&self) -> Vec<String> {
        self.api
            .requests()
            .iter()
            // A repeated event is a PATCH of the first one's series, with the same reason.
            .filter(|r| r.is_event() && (r.method == Method::POST || r.method == Method::PATCH))
            .filter_map(|r| r.body.as_ref()?["reason"].as_str().map(str::to_owned))
            .collect()
    }

    fn make_statefulset_ready(&self, ready: i32) {
        let generation = self.api.object(STS_PATH).unwrap()["metadata"]["generation"].clone();
        let replicas = self.api.object(STS_PATH).unwrap()["spec"]["replicas"].clone();
        self.api.set_status(
            STS_PATH,
            json!({"observedGeneration": generation, "replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas,
                   "currentRevision": "r1", "updateRevision": "r1"}),
        );
    }

    /// Plays the StatefulSet controller and kubelet: pods `0..n` exist, ready, on `revision`,
    /// and the StatefulSet's status says so.
    fn run_pods(&self, n: i32, revision: &str) {
        for i in 0..n {
            self.api.insert(&pod_path(i), pod(i, revision, true));
        }
        let sts = self.api.object(STS_PATH).unwrap();
        self.api.set_status(
            STS_PATH,
            json!({"observedGeneration": sts["metadata"]["generation"], "replicas": n, "readyReplicas": n,
                   "updatedReplicas": n, "currentRevision": revision, "updateRevision": revision}),
        );
    }

    /// Changes the stored MessageQueue's spec and bumps its generation.
    fn update_spec(&self, change: impl FnOnce(&mut Value)) {
        let mut mq = self.api.object(MQ_PATH).unwrap();
        change(&mut mq["spec"]);
        let generation = mq["metadata"]["generation"].as_i64().unwrap_or(1);
        mq["metadata"]["generation"] = json!(generation + 1);
        self.api.insert(MQ_PATH, mq);
    }

    fn sts_replicas(&self) -> i64 {
        self.api.object(STS_PATH).unwrap()["spec"]["replicas"]
            .as_i64()
            .unwrap()
    }

    fn condition_message(&self, type_: &str) -> String {
        let mq = self.api.object(MQ_PATH).unwrap();
        mq["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap()["message"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn condition(&self, type_: &str) -> (String, String) {
        let mq = self.api.object(MQ_PATH).unwrap();
        let c = mq["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap()
            .clone();
        (
            c["status"].as_str().unwrap().to_owned(),
            c["reason"].as_str().unwrap().to_owned(),
        )
    }
}

#[tokio::test]
async fn first_reconcile_applies_every_child_with_one_field_manager_and_owner_references() {
    let h = harness();
    h.seed(new_mq(json!({"replicas": 3})));

    let action = h.reconcile().await.unwrap();
    assert_eq!(action, Action::requeue(controller::REQUEUE_CONVERGING));

    let requests: Vec<_> = h
        .api
        .requests()
        .into_iter()
        .filter(|r| !r.is_event())
        .collect();
    let summary: Vec<(Method, String)> = requests
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    let mut expected = vec![(Method::GET, STS_PATH.to_owned())];
    expected.extend(
        CHILDREN
            .iter()
            .map(|(p, _)| (Method::PATCH, (*p).to_owned())),
    );
    expected.push((Method::PATCH, format!("{MQ_PATH}/status")));
    assert_eq!(summary, expected);

    for (request, (_, kind)) in requests[1..8].iter().zip(CHILDREN) {
        assert!(request.is_apply_by(FIELD_MANAGER), "{request:?}");
        assert!(
            !request.is_forced(),
            "children are applied unforced: {request:?}"
        );
        let body = request.body.as_ref().unwrap();
        assert_eq!(body["kind"], *kind);
        let owner = &body["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "MessageQueue");
        assert_eq!(owner["name"], "orders");
        assert_eq!(owner["uid"], "0b6a2c1e-1111-4222-8333-444455556666");
        assert_eq!(owner["controller"], true);
        assert!(body["metadata"].get("finalizers").is_none());
    }
    assert!(
        requests[8].is_apply_by(FIELD_MANAGER) && requests[8].is_forced(),
        "status is applied by the same manager, forced (it is the operator's alone)"
    );
    assert_eq!(h.event_reasons(), vec![event_reasons::CREATED]);
    assert_eq!(
        h.condition("Ready"),
        ("False".into(), "StatefulSetPending".into())
    );
}

#[tokio::test]
async fn second_reconcile_of_the_same_state_changes_nothing() {
    let h = harness();
    h.seed(new_mq(json!({})));
    *h.admin.stats.lock().unwrap() = Some(vec![("orders".into(), QueueStats::default())]);
    h.reconcile().await.unwrap();
    h.make_statefulset_ready(3);
    h.reconcile().await.unwrap();
    let before: Vec<Value> = CHILDREN
        .iter()
        .map(|(p, _)| h.api.object(p).unwrap())
        .collect();
    let mq_before = h.api.object(MQ_PATH).unwrap();
    h.api.clear_requests();

    h.reconcile().await.unwrap();

    let after: Vec<Value> = CHILDREN
        .iter()
        .map(|(p, _)| h.api.object(p).unwrap())
        .collect();
    assert_eq!(before, after, "no child changed (same resourceVersions)");
    assert_eq!(
        mq_before,
        h.api.object(MQ_PATH).unwrap(),
        "status not rewritten"
    );
    let writes: Vec<String> = h
        .api
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/status") || r.is_event())
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(writes, Vec::<String>::new());
}

#[tokio::test]
async fn spec_change_patches_the_statefulset_and_reports_it() {
    let h = harness();
    h.seed(new_mq(json!({"replicas": 3})));
    h.reconcile().await.unwrap();
    let generation_before = h.api.object(STS_PATH).unwrap()["metadata"]["generation"]
        .as_i64()
        .unwrap();

    let mut mq = h.api.object(MQ_PATH).unwrap();
    mq["spec"]["replicas"] = json!(5);
    mq["metadata"]["generation"] = json!(2);
    h.api.insert(MQ_PATH, mq);
    h.api.clear_requests();
    h.reconcile().await.unwrap();

    let sts = h.api.object(STS_PATH).unwrap();
    assert_eq!(sts["spec"]["replicas"], 5);
    assert_eq!(
        sts["metadata"]["generation"].as_i64().unwrap(),
        generation_before + 1
    );
    let env = sts["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone();
    let peers = env.iter().find(|e| e["name"] == "SLUICE_PEERS").unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        peers.split(',').count(),
        3,
        "SLUICE_PEERS is the bootstrap set; new agents join through the membership API"
    );
    assert_eq!(
        h.event_reasons(),
        vec![event_reasons::UPDATED, event_reasons::SCALING_OUT]
    );
    let status = &h.api.object(MQ_PATH).unwrap()["status"];
    assert_eq!(status["observedGeneration"], 2);
}

#[tokio::test]
async fn ready_agents_and_their_stats_show_in_status_and_conditions() {
    let h = harness();
    h.seed(new_mq(
        json!({"queues": [{"name": "orders", "partitions": 2}]}),
    ));
    h.reconcile().await.unwrap();
    h.make_statefulset_ready(3);
    *h.admin.stats.lock().unwrap() = Some(vec![(
        "orders".into(),
        QueueStats {
            backlog: 1234,
            in_flight: 20,
            publish_rate: 800.0,
            consumers: 4,
            partitions: vec![
                PartitionStats {
                    id: 0,
                    leader: Some("orders-1".into()),
                    in_sync: Some(3),
                },
                PartitionStats {
                    id: 1,
                    leader: Some("orders-2".into()),
                    in_sync: Some(3),
                },
            ],
        },
    )]);
    h.api.clear_requests();

    let action = h.reconcile().await.unwrap();

    assert_eq!(action, Action::requeue(controller::REQUEUE_READY));
    assert_eq!(
        h.condition("Ready"),
        ("True".into(), "AllReplicasReady".into())
    );
    assert_eq!(
        h.condition("Progressing"),
        ("False".into(), "Stable".into())
    );
    assert_eq!(
        h.condition("Degraded"),
        ("False".into(), "FullyReplicated".into())
    );
    let status = h.api.object(MQ_PATH).unwrap()["status"].clone();
    assert_eq!(status["readyReplicas"], 3);
    assert_eq!(status["replicasSummary"], "3/3");
    assert_eq!(status["backlog"], 1234);
    assert_eq!(status["consumerCount"], 4);
    assert_eq!(status["queues"][0]["partitions"][1]["leader"], "orders-2");
    assert_eq!(
        h.admin.calls.lock().unwrap().clone(),
        vec![
            "cluster orders.shop.svc.cluster.local:7070".to_owned(),
            "queue_stats orders.shop.svc.cluster.local:7070 orders".to_owned()
        ]
    );
    assert_eq!(h.event_reasons(), vec![event_reasons::READY]);
}

#[tokio::test]
async fn losing_two_of_three_agents_reports_quorum_lost() {
    let h = harness();
    h.seed(new_mq(json!({})));
    h.reconcile().await.unwrap();
    h.make_statefulset_ready(3);
    h.reconcile().await.unwrap();
    h.make_statefulset_ready(1);
    h.api.clear_requests();

    h.reconcile().await.unwrap();

    assert_eq!(
        h.condition("Degraded"),
        ("True".into(), "QuorumLost".into())
    );
    assert_eq!(
        h.condition("Ready"),
        ("False".into(), "StatefulSetNotReady".into())
    );
    let reasons = h.event_reasons();
    assert!(
        reasons.contains(&event_reasons::QUORUM_LOST.to_owned()),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&event_reasons::NOT_READY.to_owned()),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn unreachable_agents_leave_backlog_unknown_and_raise_an_event() {
    let h = harness();
    h.seed(new_mq(json!({})));
    h.reconcile().await.unwrap();
    h.make_statefulset_ready(3);
    h.api.clear_requests();

    h.reconcile().await.unwrap();

    assert!(
        h.api.object(MQ_PATH).unwrap()["status"]
            .get("backlog")
            .is_none()
    );
    assert!(
        h.event_reasons()
            .contains(&event_reasons::AGENT_STATS_UNAVAILABLE.to_owned())
    );
}

#[tokio::test]
async fn api_conflict_and_server_error_fail_the_reconcile_and_back_off() {
    let h = harness();
    let mq = h.seed(new_mq(json!({})));
    h.api.fail(Method::PATCH, "/configmaps/", 409, 1);
    h.api.fail(Method::PATCH, "/statefulsets/", 500, 1);

    let first = h.reconcile().await.unwrap_err();
    assert!(
        matches!(
            &first,
            Error::ApplyFailed {
                kind: "ConfigMap",
                ..
            }
        ),
        "{first}"
    );
    assert_eq!(first.metric_label(), "apply_failed");
    assert_eq!(
        controller::error_policy(mq.clone(), &first, h.ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );

    let second = h.reconcile().await.unwrap_err();
    assert!(
        matches!(
            &second,
            Error::ApplyFailed {
                kind: "StatefulSet",
                ..
            }
        ),
        "{second}"
    );
    assert_eq!(
        controller::error_policy(mq.clone(), &second, h.ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    assert_eq!(controller::failures_of(&h.ctx, &mq), 2);
    assert!(
        h.ctx
            .metrics
            .encode()
            .contains(r#"sluice_operator_reconcile_failures_total{error="apply_failed"} 2"#)
    );
    assert_eq!(
        h.event_reasons()
            .iter()
            .filter(|r| *r == event_reasons::APPLY_FAILED)
            .count(),
        2,
        "each failure is reported as a Warning event"
    );

    h.reconcile().await.unwrap();
    assert_eq!(
        controller::failures_of(&h.ctx, &mq),
        0,
        "success resets the backoff"
    );
}

/// The ConfigMap's one data key and its value as the operator applied it.
fn configmap_entry(h: &Harness) -> (String, Value) {
    let cm = h.api.object(CHILDREN[1].0).unwrap();
    let (key, value) = cm["data"].as_object().unwrap().iter().next().unwrap();
    (key.clone(), value.clone())
}

#[tokio::test]
async fn a_field_changed_by_hand_is_taken_back_and_labels_others_set_are_kept() {
    let h = harness();
    h.seed(new_mq(json!({})));
    h.reconcile().await.unwrap();
    let (key, applied) = configmap_entry(&h);
    let cm_path = CHILDREN[1].0;
    h.api.edit(
        cm_path,
        "kubectl-edit",
        json!({"data": {&key: "changed by hand"}, "metadata": {"labels": {"team": "payments"}}}),
    );
    h.api.clear_requests();

    h.reconcile().await.unwrap();

    let cm = h.api.object(cm_path).unwrap();
    assert_eq!(cm["data"][&key], applied, "the hand edit is taken back");
    assert_eq!(
        cm["metadata"]["labels"]["team"], "payments",
        "a label the operator does not set is another manager's and stays"
    );
    let writes: Vec<(Method, bool)> = h
        .api
        .requests()
        .iter()
        .filter(|r| r.path == cm_path)
        .map(|r| (r.method.clone(), r.is_forced()))
        .collect();
    assert_eq!(
        writes,
        vec![
            (Method::PATCH, false),
            (Method::GET, false),
            (Method::PATCH, true)
        ],
        "an unforced apply, a read of who holds the field, the forced apply"
    );
}

#[tokio::test]
async fn a_field_another_manager_applied_is_reported_not_fought() {
    let h = harness();
    let mq = h.seed(new_mq(json!({})));
    h.reconcile().await.unwrap();
    let (key, _) = configmap_entry(&h);
    let cm_path = CHILDREN[1].0;
    h.api.apply_as(
        cm_path,
        "gitops-controller",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "orders-config"},
               "data": {&key: "declared elsewhere"}}),
    );

    let error = h.reconcile().await.unwrap_err();
    match &error {
        Error::FieldConflict {
            kind,
            name,
            managers,
            fields,
        } => {
            assert_eq!((*kind, name.as_str()), ("ConfigMap", "orders-config"));
            assert_eq!(managers, &vec!["gitops-controller".to_owned()]);
            assert!(fields.contains(&key), "{fields}");
        }
        other => panic!("expected a field conflict, got {other}"),
    }
    assert_eq!(error.metric_label(), "field_conflict");
    controller::error_policy(mq, &error, h.ctx.clone());
    assert!(
        h.event_reasons()
            .iter()
            .any(|r| r == event_reasons::FIELD_CONFLICT),
        "{:?}",
        h.event_reasons()
    );
    assert_eq!(
        h.api.object(cm_path).unwrap()["data"][&key],
        "declared elsewhere",
        "the other manager's value stays"
    );
    assert!(
        h.api
            .requests()
            .iter()
            .filter(|r| r.path == cm_path)
            .all(|r| !r.is_forced()),
        "never forced against an applier"
    );
}

#[test]
fn backoff_doubles_from_five_seconds_up_to_five_minutes() {
    let delays: Vec<u64> = (1..=9).map(|n| controller::backoff(n).as_secs()).collect();
    assert_eq!(delays, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(controller::backoff(u32::MAX).as_secs(), 300);
}

#[tokio::test]
async fn status_write_failure_is_an_error_not_a_silent_skip() {
    let h = harness();
    h.seed(new_mq(json!({})));
    h.api
        .fail(Method::PATCH, "/messagequeues/orders/status", 500, 1);
    let err = h.reconcile().await.unwrap_err();
    assert_eq!(err.metric_label(), "status_patch_failed");
}

#[tokio::test]
async fn deleting_queue_is_left_to_garbage_collection_without_requests() {
    let h = harness();
    let mut mq = new_mq(json!({}));
    mq["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    h.seed(mq);

    let action = h.reconcile().await.unwrap();

    assert_eq!(action, Action::await_change());
    assert!(h.api.requests().is_empty(), "{:?}", h.api.requests());
}

#[tokio::test]
async fn growing_storage_patches_every_claim_and_keeps_the_immutable_template() {
    let h = harness();
    h.seed(new_mq(json!({"storage": {"size": "10Gi"}})));
    h.reconcile().await.unwrap();
    h.run_pods(3, "r1");
    for i in 0..3 {
        h.api.insert(
            &claim_path(i),
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": format!("data-orders-{i}"), "namespace": "shop"},
                   "spec": {"resources": {"requests": {"storage": if i == 2 { "20Gi" } else { "10Gi" }}}}}),
        );
    }
    h.update_spec(|spec| spec["storage"]["size"] = json!("20Gi"));
    h.api.clear_requests();

    h.reconcile().await.unwrap();

    let sts = h.api.object(STS_PATH).unwrap();
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "10Gi"
    );
    let patched: Vec<String> = h
        .api
        .requests()
        .iter()
        .filter(|r| r.method == Method::PATCH && r.path.contains("/persistentvolumeclaims/"))
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        patched,
        vec![claim_path(0), claim_path(1)],
        "claim 2 is already 20Gi"
    );
    for i in 0..3 {
        assert_eq!(
            h.api.object(&claim_path(i)).unwrap()["spec"]["resources"]["requests"]["storage"],
            "20Gi"
        );
    }
    assert_eq!(
        h.event_reasons()
            .iter()
            .filter(|r| *r == event_reasons::STORAGE_EXPANDED)
            .count(),
        2
    );
}

#[tokio::test]
async fn a_refused_claim_expansion_fails_the_reconcile_with_an_event_naming_the_claim() {
    let h = harness();
    h.seed(new_mq(json!({"replicas": 1, "storage": {"size": "10Gi"}})));
    h.reconcile().await.unwrap();
    h.run_pods(1, "r1");
    h.api.insert(
        &claim_path(0),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data-orders-0", "namespace": "shop"},
               "spec": {"resources": {"requests": {"storage": "10Gi"}}}}),
    );
    h.update_spec(|spec| spec["storage"]["size"] = json!("20Gi"));
    h.api
        .fail(Method::PATCH, "/persistentvolumeclaims/", 500, 1);

    let err = h.reconcile().await.unwrap_err();

    assert_eq!(err.metric_label(), "patch_failed");
    assert!(err.to_string().contains("data-orders-0"), "{err}");
    assert!(
        h.event_reasons()
            .contains(&event_reasons::STORAGE_EXPANSION_FAILED.to_owned())
    );
}

#[tokio::test]
async fn missing_uid_is_a_named_error_not_a_panic() {
    let h = harness();
    let mut mq = new_mq(json!({}));
    mq["metadata"].as_object_mut().unwrap().remove("uid");
    h.seed(mq);
    let err = h.reconcile().await.unwrap_err();
    assert!(err.to_string().contains("metadata.uid"), "{err}");
}

/// Maps a request to the (group, resource, verb) RBAC would check.
fn rbac_of(method: &Method, path: &str) -> (String, String, &'static str) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = if parts[0] == "api" {
        ("", &parts[2..])
    } else {
        (parts[1], &parts[3..])
    };
    // rest: namespaces/<ns>/<resource>[/<name>[/<subresource>]]
    let resource = match rest.len() {
        5 => format!("{}/{}", rest[2], rest[4]),
        _ => rest[2].to_owned(),
    };
    let verb = match *method {
        Method::GET if rest.len() == 3 => "list",
        Method::GET => "get",
        Method::POST => "create",
        Method::PATCH => "patch",
        Method::PUT => "update",
        Method::DELETE => "delete",
        _ => "unknown",
    };
    (group.to_owned(), resource, verb)
}

#[tokio::test]
async fn every_request_reconcile_makes_is_granted_by_the_rbac_table() {
    let h = harness();
    h.seed(new_mq(json!({})));
    h.api.fail(Method::PATCH, "/services/", 500, 1);
    let _ = h.reconcile().await;
    h.reconcile().await.unwrap();
    h.make_statefulset_ready(3);
    h.reconcile().await.unwrap();

    let requests = h.api.requests();
    assert!(requests.len() > 10);
    for r in requests {
        let (group, resource, verb) = rbac_of(&r.method, &r.path);
        assert!(
            rbac::is_granted(&group, &resource, verb),
            "{verb} {group}/{resource} ({} {}) is not in rbac::API_CALLS",
            r.method,
            r.path
        );
        // A server-side apply may create the object, which RBAC checks as `create`.
        if verb == "patch"
            && r.content_type.starts_with("application/apply-patch")
            && !resource.contains('/')
        {
            assert!(
                rbac::is_granted(&group, &resource, "create"),
                "apply of {group}/{resource} needs create"
            );
        }
    }
}

/// Seeds `replicas` agents, reconciles, runs their pods on `r1` and forms the fake cluster.
async fn running_cluster(spec: Value, replicas: i32, factor: u32) -> Harness {
    let h = harness();
    h.seed(new_mq(spec));
    h.reconcile().await.unwrap();
    h.run_pods(replicas, "r1");
    h.admin
        .form_cluster(u64::try_from(replicas).unwrap(), factor);
    h.reconcile().await.unwrap();
    h.api.clear_requests();
    h.admin.calls.lock().unwrap().clear();
    h
}

fn peers_env(h: &Harness) -> String {
    let sts = h.api.object(STS_PATH).unwrap();
    sts["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SLUICE_PEERS")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn assert_all_granted(h: &Harness) {
    for r in h.api.requests() {
        let (group, resource, verb) = rbac_of(&r.method, &r.path);
        assert!(
            rbac::is_granted(&group, &resource, verb),
            "{verb} {group}/{resource} ({} {}) is not in rbac::API_CALLS",
            r.method,
            r.path
        );
    }
}

#[tokio::test]
async fn scale_out_grows_the_statefulset_adds_each_new_agent_and_progresses_until_active() {
    let h = running_cluster(json!({"replicas": 3}), 3, 3).await;
    let template_before = h.api.object(STS_PATH).unwrap()["spec"]["template"].clone();

    // Pass 1: the StatefulSet grows; the pod template (bootstrap peers) stays.
    h.update_spec(|spec| spec["replicas"] = json!(4));
    let action = h.reconcile().await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert_eq!(h.sts_replicas(), 4);
    assert_eq!(
        h.api.object(STS_PATH).unwrap()["spec"]["template"],
        template_before,
        "scaling must not roll the pods"
    );
    assert_eq!(peers_env(&h).split(',').count(), 3);
    assert_eq!(
        h.condition("Progressing"),
        ("True".into(), "ScalingOut".into())
    );

    // Pass 2: the new pod exists; the operator adds it under its stable names.
    h.run_pods(4, "r1");
    h.reconcile().await.unwrap();
    assert_eq!(
        h.admin.membership_calls(),
        vec![
            "add_member orders.shop.svc.cluster.local:7070 3 orders-3.orders-peers.shop.svc.cluster.local:7071 orders-3.orders-peers.shop.svc.cluster.local:7070"
        ]
    );

    // Pass 3: still joining, still progressing, nothing new asked.
    h.reconcile().await.unwrap();
    assert_eq!(h.admin.membership_calls().len(), 1);
    assert_eq!(
        h.condition("Progressing"),
        ("True".into(), "ScalingOut".into())
    );
    assert!(h.condition_message("Progressing").contains("3"));

    // Pass 4: active: done.
    h.admin.settle();
    let action = h.reconcile().await.unwrap();
    assert_eq!(action, Action::requeue(controller::REQUEUE_READY));
    assert_eq!(
        h.condition("Progressing"),
        ("False".into(), "Stable".into())
    );
    let reasons = h.event_reasons();
    for reason in [event_reasons::SCALING_OUT, event_reasons::AGENT_ADDED] {
        assert!(reasons.contains(&reason.to_owned()), "{reasons:?}");
    }
    assert_all_granted(&h);
}

#[tokio::test]
async fn scale_in_drains_then_removes_the_agent_and_only_then_shrinks_the_statefulset() {
    let h = running_cluster(json!({"replicas": 4}), 4, 3).await;

    h.update_spec(|spec| spec["replicas"] = json!(3));
    h.reconcile().await.unwrap();
    assert_eq!(h.sts_replicas(), 4, "not shrunk before the drain");
    assert_eq!(
        h.admin.membership_calls(),
        vec!["drain orders.shop.svc.cluster.local:7070 3"]
    );
    assert_eq!(
        h.condition("Progressing"),
        ("True".into(), "ScalingIn".into())
    );

    h.reconcile().await.unwrap();
    assert_eq!(h.sts_replicas(), 4, "still draining");
    assert_eq!(h.admin.membership_calls().len(), 1);

    h.admin.settle();
    h.reconcile().await.unwrap();
    assert_eq!(h.sts_replicas(), 4, "removed before shrinking");
    assert_eq!(
        h.admin.membership_calls()[1],
        "remove_member orders.shop.svc.cluster.local:7070 3"
    );

    h.reconcile().await.unwrap();
    assert_eq!(h.sts_replicas(), 3);
    let reasons = h.event_reasons();
    for reason in [
        event_reasons::AGENT_DRAINING,
        event_reasons::AGENT_REMOVED,
        event_reasons::SCALING_IN,
    ] {
        assert!(reasons.contains(&reason.to_owned()), "{reasons:?}");
    }
    assert_all_granted(&h);
}

#[tokio::test]
async fn scale_in_below_the_replication_factor_is_refused_and_the_statefulset_kept() {
    let spec = json!({"replicas": 3, "queues": [{"name": "orders", "replicationFactor": 3}]});
    let h = running_cluster(spec, 3, 3).await;

    h.update_spec(|spec| spec["replicas"] = json!(2));
    h.reconcile().await.unwrap();

    assert_eq!(h.sts_replicas(), 3);
    assert!(h.admin.membership_calls().is_empty());
    assert_eq!(
        h.condition("Progressing"),
        ("False".into(), "ScaleInRefused".into())
    );
    assert!(
        h.condition_message("Progressing")
            .contains("replication factor 3")
    );
    assert!(
        h.event_reasons()
            .contains(&event_reasons::SCALE_IN_REFUSED.to_owned())
    );
    let mq = h.api.object(MQ_PATH).unwrap();
    assert_eq!(
        mq["spec"]["replicas"], 2,
        "the spec is left as the user wrote it"
    );
}

#[tokio::test]
async fn a_drain_the_agents_refuse_is_reported_as_a_refused_scale_in_not_retried_as_a_failure() {
    let h = running_cluster(json!({"replicas": 4}), 4, 3).await;
    h.update_spec(|spec| spec["replicas"] = json!(3));
    // A survivor is still joining, so the agents count too few ACTIVE ones left and refuse.
    h.admin
        .set_state(2, sluice_operator::cluster_view::AgentState::Joining);

    let action = h.reconcile().await.unwrap();

    assert_eq!(
        h.condition("Progressing"),
        ("False".into(), "ScaleInRefused".into())
    );
    assert!(
        h.condition_message("Progressing")
            .contains("too few active agents"),
        "{}",
        h.condition_message("Progressing")
    );
    assert_eq!(h.sts_replicas(), 4);
    assert_ne!(action, Action::requeue(Duration::from_secs(5)));
}

#[tokio::test]
async fn rolling_update_hands_off_and_restarts_one_pod_at_a_time() {
    let h = running_cluster(json!({"replicas": 3}), 3, 3).await;

    // A template change: the StatefulSet controller computes revision r2 but (OnDelete)
    // restarts nothing itself.
    h.update_spec(|spec| spec["image"] = json!("ghcr.io/sluice/agent:2"));
    h.reconcile().await.unwrap();
    let sts = h.api.object(STS_PATH).unwrap();
    assert_eq!(sts["spec"]["updateStrategy"]["type"], "OnDelete");
    let mut status = sts["status"].clone();
    status["updateRevision"] = json!("r2");
    status["observedGeneration"] = sts["metadata"]["generation"].clone();
    h.api.set_status(STS_PATH, status.clone());
    h.api.clear_requests();
    h.admin.calls.lock().unwrap().clear();

    h.reconcile().await.unwrap();
    assert_eq!(
        h.admin.membership_calls(),
        vec!["hand_off_leaderships orders-2.orders-peers.shop.svc.cluster.local:7070 2"]
    );
    assert!(h.api.object(&pod_path(2)).is_none(), "pod 2 deleted");
    assert_eq!(
        h.condition("Progressing"),
        ("True".into(), "RollingUpdate".into())
    );

    // Pod 2 not back yet: nothing else is touched.
    h.reconcile().await.unwrap();
    h.api.insert(&pod_path(2), pod(2, "r2", false));
    h.reconcile().await.unwrap();
    assert_eq!(h.admin.membership_calls().len(), 1);
    assert!(h.api.object(&pod_path(1)).is_some());

    // Back and ready, but a partition is catching up: still nothing.
    h.api.insert(&pod_path(2), pod(2, "r2", true));
    h.admin.set_in_sync(&[0, 1]);
    h.reconcile().await.unwrap();
    assert!(h.api.object(&pod_path(1)).is_some());
    assert!(h.condition_message("Progressing").contains("orders/0"));

    // In sync: the next one.
    h.admin.set_in_sync(&[0, 1, 2]);
    h.reconcile().await.unwrap();
    assert!(h.api.object(&pod_path(1)).is_none(), "pod 1 deleted next");
    assert_eq!(
        h.event_reasons()
            .iter()
            .filter(|r| *r == event_reasons::AGENT_RESTARTED)
            .count(),
        2
    );
    assert_all_granted(&h);
}

#[tokio::test]
async fn an_incomplete_hand_off_leaves_the_pod_running() {
    let h = running_cluster(json!({"replicas": 3}), 3, 3).await;
    let mut status = h.api.object(STS_PATH).unwrap()["status"].clone();
    status["updateRevision"] = json!("r2");
    h.api.set_status(STS_PATH, status);
    *h.admin.hand_off_remaining.lock().unwrap() = vec!["orders/0".into()];

    h.reconcile().await.unwrap();

    assert!(h.api.object(&pod_path(2)).is_some());
    assert!(
        h.event_reasons()
            .contains(&event_reasons::HAND_OFF_INCOMPLETE.to_owned())
    );
}

#[tokio::test]
async fn a_failing_membership_call_is_retried_with_backoff_and_reported() {
    let h = running_cluster(json!({"replicas": 3}), 3, 3).await;
    h.update_spec(|spec| spec["replicas"] = json!(4));
    h.reconcile().await.unwrap();
    h.run_pods(4, "r1");
    h.admin.fail_once.lock().unwrap().push("AddAgent");

    let err = h.reconcile().await.unwrap_err();
    assert_eq!(err.metric_label(), "agent_call_failed");
    assert!(err.to_string().contains("adding agent 3"), "{err}");
    assert_eq!(
        controller::error_policy(h.current(), &err, h.ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert!(
        h.event_reasons()
            .contains(&event_reasons::DAY2_FAILED.to_owned())
    );

    h.reconcile().await.unwrap();
    assert_eq!(
        h.admin.state_of(3),
        Some(sluice_operator::cluster_view::AgentState::Joining)
    );
}
