//! Server-side apply conflicts: who holds the fields the operator wants to set, and whether the
//! operator takes them back.
//!
//! The operator applies its children without `force`. When the API server answers with a
//! conflict, each cause names the other manager of one field. A manager that only ever wrote
//! with `Update` (`kubectl edit`, `kubectl patch`, a script) changed the field by hand: that is
//! drift, and the operator takes the field back with `force`. A manager that *applied* the
//! field declared an intent of its own (a GitOps tool, another controller): taking it would
//! make the two flap the field forever, so the operator leaves it and reports the conflict
//! (decision 0022).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

/// One field another manager holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager, as the API server names it.
    pub manager: String,
    /// The field, e.g. `.data.queues.yaml`.
    pub field: String,
}

/// The conflicts of a refused apply, or `None` when `error` is not an apply conflict.
pub fn conflicts_of(error: &kube::Error) -> Option<Vec<Conflict>> {
    let kube::Error::Api(status) = error else {
        return None;
    };
    if status.code != 409 || status.reason != "Conflict" {
        return None;
    }
    let conflicts: Vec<Conflict> = status
        .details
        .as_ref()?
        .causes
        .iter()
        .filter(|c| c.reason == "FieldManagerConflict")
        .filter_map(|c| {
            Some(Conflict {
                manager: quoted(&c.message)?.to_owned(),
                field: c.field.clone(),
            })
        })
        .collect();
    (!conflicts.is_empty()).then_some(conflicts)
}

/// The managers among `conflicts` that applied (server-side apply) what they hold, by the
/// object's `managedFields`; sorted, each once. Empty: every conflict is a hand edit.
pub fn appliers(conflicts: &[Conflict], managed: &[ManagedFieldsEntry]) -> Vec<String> {
    let mut out: Vec<String> = conflicts
        .iter()
        .filter(|c| {
            managed.iter().any(|m| {
                m.manager.as_deref() == Some(c.manager.as_str())
                    && m.operation.as_deref() == Some("Apply")
            })
        })
        .map(|c| c.manager.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The fields of `conflicts`, comma-separated, for messages.
pub fn fields(conflicts: &[Conflict]) -> String {
    conflicts
        .iter()
        .map(|c| c.field.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first double-quoted part of `text`: the manager in `conflict with "kubectl-edit" using v1`.
fn quoted(text: &str) -> Option<&str> {
    let (_, rest) = text.split_once('"')?;
    let (inner, _) = rest.split_once('"')?;
    Some(inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    /// The error of a refused apply, from the Status body the API server sends.
    fn conflict_error(causes: &[(&str, &str)]) -> kube::Error {
        let causes: Vec<serde_json::Value> = causes
            .iter()
            .map(|(message, field)| {
                serde_json::json!({"reason": "FieldManagerConflict", "message": message, "field": field})
            })
            .collect();
        let status: Status = serde_json::from_value(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409,
            "reason": "Conflict", "message": "Apply failed with conflicts",
            "details": {"causes": causes},
        }))
        .expect("a Status");
        kube::Error::Api(Box::new(status))
    }

    fn entry(manager: &str, operation: &str) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            ..ManagedFieldsEntry::default()
        }
    }

    #[test]
    fn a_conflict_names_each_manager_and_field_as_the_api_server_reports_them() {
        let error = conflict_error(&[
            (
                r#"conflict with "kubectl-patch" using v1"#,
                ".data.queues.yaml",
            ),
            (
                r#"conflict with "flux" with subresource "status" using v1"#,
                ".metadata.labels.tier",
            ),
        ]);
        let conflicts = conflicts_of(&error).expect("an apply conflict");
        assert_eq!(
            conflicts,
            vec![
                Conflict {
                    manager: "kubectl-patch".into(),
                    field: ".data.queues.yaml".into()
                },
                Conflict {
                    manager: "flux".into(),
                    field: ".metadata.labels.tier".into()
                },
            ]
        );
        assert_eq!(
            fields(&conflicts),
            ".data.queues.yaml, .metadata.labels.tier"
        );
    }

    #[test]
    fn other_errors_are_not_conflicts() {
        let not_found = kube::Error::Api(Box::new(Status {
            code: 404,
            reason: "NotFound".into(),
            ..Status::failure("", "")
        }));
        assert_eq!(conflicts_of(&not_found), None);
        // A 409 without field causes (an optimistic-lock conflict) is not a manager's.
        let stale = kube::Error::Api(Box::new(Status {
            code: 409,
            reason: "Conflict".into(),
            ..Status::failure("", "")
        }));
        assert_eq!(conflicts_of(&stale), None);
    }

    #[test]
    fn hand_edits_are_taken_back_and_appliers_are_left_alone() {
        let conflicts = conflicts_of(&conflict_error(&[
            (r#"conflict with "kubectl-edit" using v1"#, ".data.a"),
            (r#"conflict with "argocd-controller" using v1"#, ".data.b"),
            (r#"conflict with "argocd-controller" using v1"#, ".data.c"),
        ]))
        .expect("conflicts");
        let managed = [
            entry("sluice-operator", "Apply"),
            entry("kubectl-edit", "Update"),
            entry("argocd-controller", "Apply"),
        ];
        assert_eq!(appliers(&conflicts, &managed), vec!["argocd-controller"]);
        let by_hand = [
            entry("kubectl-edit", "Update"),
            entry("argocd-controller", "Update"),
        ];
        assert!(appliers(&conflicts, &by_hand).is_empty());
    }
}
