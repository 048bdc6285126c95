//! PVC expansion: which agent claims must grow to `spec.storage.size`.
//!
//! A StatefulSet's claim template is immutable, so growing storage means patching each existing
//! claim's request; the storage class must set `allowVolumeExpansion: true`, otherwise the API
//! server refuses the patch (reported as an event naming the claim). Claims are never shrunk:
//! Kubernetes cannot, and the CRD's CEL rule refuses a smaller `spec.storage.size`.

use crate::{Result, units};

/// One agent claim as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Claim name (`data-<mq>-<ordinal>`).
    pub name: String,
    /// Its `spec.resources.requests.storage`.
    pub request: String,
}

/// The claims among `claims` whose request is smaller than `desired` (`spec.storage.size`).
/// A claim whose request cannot be parsed is an error naming it, not a silent skip.
pub fn to_expand(claims: &[Claim], desired: &str) -> Result<Vec<String>> {
    let want = units::bytes("spec.storage.size", desired)?;
    let mut out = Vec::new();
    for claim in claims {
        let field = format!(
            "PersistentVolumeClaim {} spec.resources.requests.storage",
            claim.name
        );
        if units::bytes(&field, &claim.request)? < want {
            out.push(claim.name.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(name: &str, request: &str) -> Claim {
        Claim {
            name: name.into(),
            request: request.into(),
        }
    }

    #[test]
    fn only_claims_smaller_than_the_spec_are_expanded_whatever_the_unit() {
        let claims = [
            claim("data-orders-0", "10Gi"),
            claim("data-orders-1", "20Gi"),
            claim("data-orders-2", "21474836480"),
        ];
        assert_eq!(
            to_expand(&claims, "20Gi").unwrap(),
            vec!["data-orders-0".to_owned()]
        );
    }

    #[test]
    fn an_unparsable_claim_request_is_an_error_naming_the_claim() {
        let err = to_expand(&[claim("data-orders-1", "lots")], "20Gi").unwrap_err();
        assert!(err.to_string().contains("data-orders-1"), "{err}");
    }
}
