//! Helpers shared by the test binaries.
//!
//! Each test binary (`chart`, `manifests`, `images`, `control_plane`, ...) uses a different subset of these helpers, so
//! unused-item warnings in one binary say nothing about the others.
#![allow(dead_code)]

pub mod crd_schema;
pub mod dockerfile;
pub mod helm;
pub mod kube_validate;
pub mod manifest;
pub mod operator_flags;
pub mod rbac;
pub mod workload;

use std::path::{Path, PathBuf};

/// Environment variable that turns a missing tool from "skipped" into a failure (CI sets it).
pub const REQUIRE_TOOLS_ENV: &str = "SLUICE_REQUIRE_TOOLS";

/// Kubernetes version every manifest is validated against (the oldest the project supports is
/// older, but the schemas of 1.34 are what the operator's k8s-openapi feature targets).
pub const KUBERNETES_VERSION: &str = "1.34.0";

/// Root of the repository (the workspace), whatever directory the test runs in.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives one level below the workspace root")
        .to_path_buf()
}

/// Finds an executable on `PATH` or in the places `.ci/install-tools` installs to.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/bin"));
    std::env::split_paths(&path)
        .chain(home_bin)
        .chain([PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The tool, or `None` after printing why the calling test is skipped. Panics instead when
/// [`REQUIRE_TOOLS_ENV`] is `1`, so CI cannot pass by skipping.
pub fn tool_or_skip(name: &str, test: &str) -> Option<PathBuf> {
    if let Some(found) = find_tool(name) {
        return Some(found);
    }
    let message = format!(
        "{test}: `{name}` is not installed (run .ci/install-tools to install helm, kubectl and \
         kubernetes-validate)"
    );
    if std::env::var(REQUIRE_TOOLS_ENV).as_deref() == Ok("1") {
        panic!("{message}; {REQUIRE_TOOLS_ENV}=1 forbids skipping");
    }
    eprintln!("skipped: {message}");
    None
}

/// Reads a file of the repository as text, naming it when it cannot.
pub fn read_repo_file(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A binary of another workspace package (cargo builds only this package's binaries for its
/// tests), built with the test's own profile (quick when it is up to date); its path.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .to_path_buf();
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .args(["--profile", &profile])
        .status()
        .unwrap_or_else(|e| panic!("run cargo build -p {package}: {e}"));
    assert!(
        status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    dir.join(bin)
}

/// The gRPC readiness probe: `grpc.health.v1.Health/Check` at `endpoint` (`http://ip:port`)
/// answers SERVING.
pub async fn grpc_serving(endpoint: &str) -> bool {
    use std::time::Duration;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let Ok(channel) = tonic::transport::Endpoint::from_shared(endpoint.to_owned()).map(|e| {
        e.connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(2))
    }) else {
        return false;
    };
    let Ok(channel) = channel.connect().await else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}
