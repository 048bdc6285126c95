//! The agents' PodDisruptionBudget.

use k8s_openapi::{
    api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use crate::{
    Result,
    crd::MessageQueue,
    names::{Names, child_meta},
};

/// At most one agent voluntarily down at a time (drains, node upgrades): with a replication
/// factor of three that keeps every partition at quorum, and it is what the rolling update does
/// too.
pub fn build(mq: &MessageQueue, names: &Names) -> Result<PodDisruptionBudget> {
    Ok(PodDisruptionBudget {
        metadata: child_meta(mq, names, names.pdb())?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(names.selector_labels()),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_mq;

    #[test]
    fn pdb_allows_one_agent_down_and_selects_the_agents() {
        let mq = test_mq(serde_json::json!({"replicas": 5}));
        let names = Names::of(&mq).unwrap();
        let spec = build(&mq, &names).unwrap().spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            spec.selector.unwrap().match_labels,
            Some(names.selector_labels())
        );
    }
}
