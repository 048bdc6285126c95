//! End-to-end tests of Sluice that cross crate boundaries: the Helm chart rendered with the real
//! `helm`, the container images' Dockerfile, and the example manifests, all checked against the
//! official Kubernetes schemas and against the crates they package.
//!
//! Everything lives under `tests/`; this library is intentionally empty. Run with
//! `cargo test -p sluice-e2e` (tools: `.ci/install-tools`; set `SLUICE_REQUIRE_TOOLS=1` to turn
//! "tool missing, skipped" into a failure, as CI does).
