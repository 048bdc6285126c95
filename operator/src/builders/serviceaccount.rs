//! The agents' ServiceAccount.

use k8s_openapi::api::core::v1::ServiceAccount;

use crate::{
    Result,
    crd::MessageQueue,
    names::{Names, child_meta},
};

/// A ServiceAccount of its own per MessageQueue, without a mounted token: the agents never call
/// the Kubernetes API, so they get no credentials to leak.
pub fn build(mq: &MessageQueue, names: &Names) -> Result<ServiceAccount> {
    Ok(ServiceAccount {
        metadata: child_meta(mq, names, names.service_account())?,
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_mq;

    #[test]
    fn service_account_mounts_no_token_and_is_owned_by_the_queue() {
        let mq = test_mq(serde_json::json!({}));
        let sa = build(&mq, &Names::of(&mq).unwrap()).unwrap();
        assert_eq!(sa.metadata.name.as_deref(), Some("orders-agent"));
        assert_eq!(sa.automount_service_account_token, Some(false));
        let owners = sa.metadata.owner_references.unwrap();
        assert_eq!(owners[0].kind, "MessageQueue");
        assert_eq!(owners[0].controller, Some(true));
    }
}
