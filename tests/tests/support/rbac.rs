//! The permissions a rendered chart grants its operator ServiceAccount, flattened to
//! (API group, resource, verb) triples per scope, so they can be compared with the operator's
//! own list of the API calls it makes.

use super::manifest;
use serde_json::Value;
use std::collections::BTreeSet;

/// One permission: a verb on a resource (or `resource/subresource`) of an API group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    /// API group; "" is the core group.
    pub group: String,
    /// Plural resource name, with `/subresource` when it is one.
    pub resource: String,
    /// RBAC verb (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, ...).
    pub verb: String,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        write!(f, "{} {group}/{}", self.verb, self.resource)
    }
}

/// Where a set of grants applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Every namespace (and cluster-scoped resources): a ClusterRole bound by a
    /// ClusterRoleBinding.
    Cluster,
    /// One namespace: a Role (or ClusterRole) bound by a RoleBinding there.
    Namespace(String),
}

/// The grants of one scope.
pub type Grants = BTreeSet<Grant>;

/// Everything the rendered objects grant to `service_account` (in `namespace`), by scope. Panics
/// naming the role when a rule uses a wildcard or `resourceNames`, which this chart never should.
pub fn granted_to(
    objects: &[Value],
    service_account: &str,
    namespace: &str,
) -> Vec<(Scope, Grants)> {
    let mut scopes = Vec::new();
    for binding in objects
        .iter()
        .filter(|o| matches!(manifest::kind(o), "ClusterRoleBinding" | "RoleBinding"))
    {
        let binds_operator = binding["subjects"].as_array().is_some_and(|subjects| {
            subjects.iter().any(|s| {
                s["kind"] == "ServiceAccount"
                    && s["name"] == service_account
                    && s["namespace"] == namespace
            })
        });
        if !binds_operator {
            continue;
        }
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let scope = if manifest::kind(binding) == "ClusterRoleBinding" {
            Scope::Cluster
        } else {
            let ns = binding["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default();
            Scope::Namespace(ns.to_owned())
        };
        let role = objects
            .iter()
            .find(|o| {
                manifest::kind(o) == role_kind
                    && manifest::name(o) == role_name
                    && (role_kind == "ClusterRole"
                        || o["metadata"]["namespace"] == binding["metadata"]["namespace"])
            })
            .unwrap_or_else(|| {
                panic!(
                    "{} refers to {role_kind}/{role_name}, which the chart does not render",
                    manifest::describe(binding)
                )
            });
        scopes.push((scope, rules_of(role)));
    }
    scopes
}

fn rules_of(role: &Value) -> Grants {
    let mut grants = Grants::new();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    for rule in role["rules"].as_array().into_iter().flatten() {
        assert!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "{}: rules are plain (group, resource, verb) grants",
            manifest::describe(role)
        );
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "{} grants a wildcard: {verb} {group}/{resource}",
                        manifest::describe(role)
                    );
                    grants.insert(Grant {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb,
                    });
                }
            }
        }
    }
    grants
}
