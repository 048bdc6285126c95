//! Every Kubernetes API call the operator makes, as (group, resource, verbs). The chart derives
//! its RBAC from this table, and the reconcile tests check that every request the operator
//! sends is covered by it.

/// One resource the operator calls, with the verbs it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiCall {
    /// API group; `""` for the core group.
    pub group: &'static str,
    /// Resource (plural, with `/subresource` when it is one).
    pub resource: &'static str,
    /// Verbs used.
    pub verbs: &'static [&'static str],
    /// Why the operator needs it.
    pub why: &'static str,
}

/// Server-side apply of a child needs `patch`, plus `create` the first time, when the apply
/// creates the object, and `get` to see who holds the fields when it conflicts.
const APPLY: &[&str] = &["get", "create", "patch"];

/// The complete table.
pub const API_CALLS: &[ApiCall] = &[
    ApiCall {
        group: "sluice.dev",
        resource: "messagequeues",
        verbs: &["get", "list", "watch"],
        why: "the controller's watch",
    },
    ApiCall {
        group: "sluice.dev",
        resource: "messagequeues/status",
        verbs: &["patch"],
        why: "status, conditions",
    },
    ApiCall {
        group: "apps",
        resource: "statefulsets",
        verbs: &["get", "list", "watch", "create", "patch"],
        why: "the agents; watched for readiness",
    },
    ApiCall {
        group: "",
        resource: "services",
        verbs: APPLY,
        why: "headless and client Services",
    },
    ApiCall {
        group: "",
        resource: "configmaps",
        verbs: APPLY,
        why: "queue definitions",
    },
    ApiCall {
        group: "",
        resource: "serviceaccounts",
        verbs: APPLY,
        why: "the agents' identity",
    },
    ApiCall {
        group: "policy",
        resource: "poddisruptionbudgets",
        verbs: APPLY,
        why: "one agent down at a time",
    },
    ApiCall {
        group: "networking.k8s.io",
        resource: "networkpolicies",
        verbs: APPLY,
        why: "agent ingress rules",
    },
    ApiCall {
        group: "",
        resource: "pods",
        verbs: &["list", "delete"],
        why: "rolling update: read each agent's revision and readiness, restart one at a time",
    },
    ApiCall {
        group: "",
        resource: "persistentvolumeclaims",
        verbs: &["get", "patch"],
        why: "PVC expansion when spec.storage.size grows",
    },
    ApiCall {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        why: "events on MessageQueues",
    },
    ApiCall {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "patch"],
        why: "leader election",
    },
];

/// Whether the table grants `verb` on `group`/`resource`.
pub fn is_granted(group: &str, resource: &str, verb: &str) -> bool {
    API_CALLS
        .iter()
        .any(|c| c.group == group && c.resource == resource && c.verbs.contains(&verb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verb_is_a_kubernetes_rbac_verb_and_no_resource_repeats() {
        let known = [
            "get",
            "list",
            "watch",
            "create",
            "update",
            "patch",
            "delete",
            "deletecollection",
        ];
        for (i, call) in API_CALLS.iter().enumerate() {
            assert!(call.verbs.iter().all(|v| known.contains(v)), "{call:?}");
            assert!(
                API_CALLS[i + 1..]
                    .iter()
                    .all(|c| (c.group, c.resource) != (call.group, call.resource)),
                "{call:?} listed twice"
            );
        }
    }

    #[test]
    fn the_operator_deletes_nothing_but_pods_it_restarts() {
        let deleting: Vec<_> = API_CALLS
            .iter()
            .filter(|c| c.verbs.contains(&"delete"))
            .map(|c| (c.group, c.resource))
            .collect();
        assert_eq!(deleting, vec![("", "pods")]);
    }
}
