//! Leader election on a `coordination.k8s.io/v1` Lease, so that several operator replicas can
//! run for availability while exactly one reconciles.
//!
//! Built on `kube-lease-manager` (it targets kube 5, renews with server-side apply and
//! tolerates clock skew), rather than a hand-written renew loop.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;

/// Seconds a lease stays valid after its last renewal.
pub const LEASE_DURATION_SECS: u64 = 15;
/// Seconds before expiry at which the holder renews.
pub const LEASE_GRACE_SECS: u64 = 5;

/// Why leader election stopped.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The lease could not be created or read.
    #[error("leader election on lease {namespace}/{name} failed: {source}")]
    Lease {
        /// Namespace of the lease.
        namespace: String,
        /// Name of the lease.
        name: String,
        /// The lease manager's error.
        #[source]
        source: LeaseManagerError,
    },
}

/// Where the lease lives and who we are.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
}

/// Starts contending for the lease. The returned channel is `true` while this replica leads;
/// dropping it releases the lease.
pub async fn elect(
    client: Client,
    config: &LeaseConfig,
) -> Result<watch::Receiver<bool>, LeaderError> {
    let to_err = |source| LeaderError::Lease {
        namespace: config.namespace.clone(),
        name: config.name.clone(),
        source,
    };
    let manager = LeaseManagerBuilder::new(client, config.name.clone())
        .with_namespace(config.namespace.clone())
        .with_identity(config.identity.clone())
        .with_duration(LEASE_DURATION_SECS)
        .with_grace(LEASE_GRACE_SECS)
        .with_field_manager(crate::FIELD_MANAGER)
        .build()
        .await
        .map_err(to_err)?;
    let (leading, _task) = manager.watch().await;
    Ok(leading)
}

/// Waits until `leading` says this replica leads (returns `false` if the channel closed first).
pub async fn wait_for_leadership(leading: &mut watch::Receiver<bool>) -> bool {
    leading.wait_for(|is_leader| *is_leader).await.is_ok()
}

/// Resolves once this replica stops leading (or the election task ends).
pub async fn lost_leadership(mut leading: watch::Receiver<bool>) {
    let _ = leading.wait_for(|is_leader| !*is_leader).await;
}
