//! Operator-wide settings that shape the objects it builds (not per-MessageQueue).

/// Image of the agents when a MessageQueue does not name one: the agent built from the same
/// source as this operator.
pub const AGENT_IMAGE_DEFAULT: &str = concat!(
    "ghcr.io/sluice-dev/sluice-agent:",
    env!("CARGO_PKG_VERSION")
);

/// Settings of the builders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Agent image used when `spec.image` is empty.
    pub default_image: String,
    /// DNS suffix of the cluster, for the agents' stable peer names.
    pub cluster_domain: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            default_image: AGENT_IMAGE_DEFAULT.to_owned(),
            cluster_domain: "cluster.local".to_owned(),
        }
    }
}
