//! Where the control-plane binaries are: built (or found in the cache) by
//! `tests/control-plane/build`, once per test process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The directory holding `etcd`, `kube-apiserver`, `kube-controller-manager` and
/// `kube-scheduler`.
pub fn control_plane_bin() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = crate::support::repo_root().join("tests/control-plane/build");
        let output = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        assert!(
            output.status.success(),
            "{} failed ({}); it needs Go and the Go module proxy",
            script.display(),
            output.status
        );
        let stdout = String::from_utf8(output.stdout).expect("UTF-8 path");
        let dir = stdout
            .lines()
            .last()
            .expect("the script prints the directory");
        PathBuf::from(dir.trim())
    })
}
