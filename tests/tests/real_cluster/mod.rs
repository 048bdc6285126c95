//! A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager
//! and kube-scheduler, built from Kubernetes' own Go modules (`tests/control-plane/build`), run
//! as processes on loopback.
//!
//! - **TLS everywhere.** A CA the harness makes ([`pki`]) signs etcd's and the API server's
//!   serving certificates and one client certificate per identity: the admin
//!   (`system:masters`), the controller-manager and the scheduler (their bootstrap RBAC
//!   users), and the node (`system:node:<name>`, group `system:nodes`).
//! - **Authorization `Node,RBAC`**, the default admission plugins plus `NodeRestriction` and the
//!   two webhook plugins, service-account tokens signed with the harness's key.
//! - **Controllers** as a cluster runs them, each with its own service account
//!   (`--use-service-account-credentials`); the process kubelet renews its node's Lease like a
//!   kubelet, so node lifecycle runs too.
//!
//! When a test fails, dropping the [`ControlPlane`] prints every component's log tail.

pub mod binaries;
pub mod kubelet;
pub mod operator;
pub mod pki;
pub mod process;
pub mod provisioner;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pki::{KeyFiles, Pki};
use process::{Component, free_port};

/// How long the API server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Log lines of each component printed when a test fails.
const TAIL_LINES: usize = 60;
/// The service network (no kube-proxy routes it; the API server allocates ClusterIPs from it).
const SERVICE_CIDR: &str = "10.0.0.0/24";
/// Controllers the tests rely on, by their 1.34 names.
const CONTROLLERS: &[&str] = &[
    "statefulset-controller",
    "deployment-controller",
    "replicaset-controller",
    "garbage-collector-controller",
    "endpointslice-controller",
    "endpoints-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "namespace-controller",
    "persistentvolume-binder-controller",
    "persistentvolume-expander-controller",
    // Remove the protection finalizers once no pod uses a claim (no bound claim a volume):
    // without them a claim the StatefulSet controller deletes on scale-in stays Terminating.
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
    "disruption-controller",
    // Removes the not-ready taint admission puts on a new Node once it reports Ready, and
    // watches the node's Lease.
    "node-lifecycle-controller",
];

/// A running control plane and the files its clients need.
pub struct ControlPlane {
    /// Holds every file of the cluster; removed when the control plane is dropped.
    pub dir: tempfile::TempDir,
    /// The CA and certificates.
    pub pki: Pki,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// A kubeconfig of the cluster admin (`system:masters`).
    pub admin_kubeconfig: PathBuf,
    components: Vec<Component>,
}

impl ControlPlane {
    /// Starts etcd and the API server, waits until `/readyz` answers, then starts the
    /// controller-manager and the scheduler.
    pub async fn start() -> ControlPlane {
        let bin = binaries::control_plane_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs).expect("log dir");
        let pki = Pki::create(&root.join("pki"));
        let mut components = Vec::new();

        let etcd_port = free_port();
        let etcd_peer = free_port();
        components.push(Component::start(
            "etcd",
            &bin.join("etcd"),
            &etcd_args(root, &pki, etcd_port, etcd_peer),
            &logs,
        ));

        let port = free_port();
        let server = format!("https://127.0.0.1:{port}");
        components.push(Component::start(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &apiserver_args(root, &pki, port, etcd_port),
            &logs,
        ));
        let admin = pki.client("admin", "sluice-test-admin", &["system:masters"]);
        let admin_kubeconfig = root.join("admin.kubeconfig");
        write_kubeconfig(
            &admin_kubeconfig,
            &server,
            &pki.ca_cert,
            Credential::Cert(&admin),
        );
        let mut plane = ControlPlane {
            dir,
            pki,
            server,
            admin_kubeconfig,
            components,
        };
        plane.wait_ready().await;

        let cm =
            plane.identity_kubeconfig("controller-manager", "system:kube-controller-manager", &[]);
        let pki = &plane.pki;
        let mut cm_args = credentials(&cm);
        cm_args.extend([
            format!("--controllers={}", CONTROLLERS.join(",")),
            "--use-service-account-credentials=true".into(),
            format!(
                "--service-account-private-key-file={}",
                pki.service_account_key.display()
            ),
            format!("--root-ca-file={}", pki.ca_cert.display()),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            // Claims and garbage are handled within a test's patience, not minutes.
            "--pvclaimbinder-sync-period=1s".into(),
        ]);
        let scheduler = plane.identity_kubeconfig("scheduler", "system:kube-scheduler", &[]);
        let mut scheduler_args = credentials(&scheduler);
        scheduler_args.extend([
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=0".into(),
        ]);
        let logs = plane.dir.path().join("logs");
        plane.components.push(Component::start(
            "kube-controller-manager",
            &bin.join("kube-controller-manager"),
            &cm_args,
            &logs,
        ));
        plane.components.push(Component::start(
            "kube-scheduler",
            &bin.join("kube-scheduler"),
            &scheduler_args,
            &logs,
        ));
        plane.wait_for_default_service_account().await;
        plane
    }

    /// Waits until the service-account controller has made `default/default`: a pod created
    /// before it is refused ("serviceaccount \"default\" not found"), as on a cluster just up.
    async fn wait_for_default_service_account(&mut self) {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let accounts: kube::Api<ServiceAccount> =
            kube::Api::namespaced(self.admin().await, "default");
        let deadline = Instant::now() + READY_TIMEOUT;
        while !matches!(accounts.get_opt("default").await, Ok(Some(_))) {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "no default ServiceAccount after {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A kubeconfig for user `common_name` in `groups`, authenticated by a client certificate.
    pub fn identity_kubeconfig(&self, file: &str, common_name: &str, groups: &[&str]) -> PathBuf {
        let keys = self.pki.client(file, common_name, groups);
        let path = self.dir.path().join(format!("{file}.kubeconfig"));
        write_kubeconfig(
            &path,
            &self.server,
            &self.pki.ca_cert,
            Credential::Cert(&keys),
        );
        path
    }

    /// A kubeconfig that authenticates with a bearer `token` (a service account's).
    pub fn token_kubeconfig(&self, file: &str, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{file}.kubeconfig"));
        write_kubeconfig(
            &path,
            &self.server,
            &self.pki.ca_cert,
            Credential::Token(token),
        );
        path
    }

    /// Registers the node and starts its process kubelet (with the node's own identity) and the
    /// default StorageClass's provisioner.
    pub async fn start_node(&self) -> (kubelet::ProcessKubelet, provisioner::Provisioner) {
        let node = self.identity_kubeconfig(
            "node",
            &format!("system:node:{}", kubelet::NODE),
            &["system:nodes"],
        );
        let kubelet =
            kubelet::ProcessKubelet::start(client_from(&node).await, self.dir.path()).await;
        let provisioner =
            provisioner::Provisioner::start(self.admin().await, self.dir.path()).await;
        (kubelet, provisioner)
    }

    /// A client of the cluster admin.
    pub async fn admin(&self) -> kube::Client {
        client_from(&self.admin_kubeconfig).await
    }

    /// `kubectl` as the admin; panics when kubectl is not installed.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with(&self.admin_kubeconfig, args, None)
    }

    /// `kubectl` with `kubeconfig`, `stdin` fed when given.
    pub fn kubectl_with(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let kubectl =
            crate::support::find_tool("kubectl").expect("kubectl is installed (.ci/install-tools)");
        run_tool(&kubectl, kubeconfig, args, stdin)
    }

    /// Whether `kubectl get <object> -n <namespace>` finds it (`object` as `kind/name`).
    pub fn exists(&self, object: &str, namespace: &str) -> bool {
        self.kubectl(&["get", object, "-n", namespace])
            .status
            .success()
    }

    /// `kubectl` as the admin that must succeed; its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// `helm` as the admin that must succeed; its stdout.
    pub fn helm_ok(&self, args: &[&str]) -> String {
        let helm =
            crate::support::find_tool("helm").expect("helm is installed (.ci/install-tools)");
        let out = run_tool(&helm, &self.admin_kubeconfig, args, None);
        assert!(
            out.status.success(),
            "helm {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// Fails the test when a component has exited.
    pub fn assert_running(&mut self) {
        for component in &mut self.components {
            if let Some(status) = component.exited() {
                panic!(
                    "{} exited ({status}):\n{}",
                    component.name,
                    component.tail(TAIL_LINES)
                );
            }
        }
    }

    async fn wait_ready(&mut self) {
        let client = self.admin().await;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.assert_running();
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("request");
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return,
                outcome => {
                    assert!(
                        Instant::now() < deadline,
                        "kube-apiserver not ready after {READY_TIMEOUT:?}: {outcome:?}"
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the API holds, as a user would look at it.
            for args in [
                &[
                    "get",
                    "nodes,pods,statefulsets,pvc,pv,mq",
                    "-A",
                    "-o",
                    "wide",
                ][..],
                &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
            ] {
                let out = self.kubectl(args);
                eprintln!(
                    "---- kubectl {} ----\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            for component in &self.components {
                eprintln!(
                    "---- {} (last {TAIL_LINES} lines of {}) ----\n{}",
                    component.name,
                    component.log.display(),
                    component.tail(TAIL_LINES)
                );
            }
        }
        // Clients first, storage last.
        while let Some(mut component) = self.components.pop() {
            component.stop();
        }
    }
}

/// A client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> kube::Client {
    // Already installed by an earlier client: nothing to do.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::config::Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await
            .expect("kubeconfig");
    kube::Client::try_from(config).expect("client")
}

/// The flags that make a component (controller-manager, scheduler) authenticate with
/// `kubeconfig` to the API server and for its own delegated authn/authz.
fn credentials(kubeconfig: &Path) -> Vec<String> {
    [
        "kubeconfig",
        "authentication-kubeconfig",
        "authorization-kubeconfig",
    ]
    .iter()
    .map(|flag| format!("--{flag}={}", kubeconfig.display()))
    .collect()
}

fn run_tool(bin: &Path, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(bin)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        // helm keeps its caches and registry config under these; a test owns its own.
        .env("HELM_CACHE_HOME", kubeconfig.with_extension("helm-cache"))
        .env("HELM_CONFIG_HOME", kubeconfig.with_extension("helm-config"))
        .env("HELM_DATA_HOME", kubeconfig.with_extension("helm-data"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("wait for the tool")
}

enum Credential<'a> {
    Cert(&'a KeyFiles),
    Token(&'a str),
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, credential: Credential<'_>) {
    let user = match credential {
        Credential::Cert(keys) => serde_json::json!({
            "client-certificate": keys.cert,
            "client-key": keys.key,
        }),
        Credential::Token(token) => serde_json::json!({ "token": token }),
    };
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sluice-test", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "sluice-test", "context": {"cluster": "sluice-test", "user": "user"}}],
        "current-context": "sluice-test",
    });
    std::fs::write(path, serde_yaml::to_string(&config).expect("YAML")).expect("write kubeconfig");
}

fn etcd_args(root: &Path, pki: &Pki, port: u16, peer: u16) -> Vec<String> {
    let client = format!("https://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{peer}");
    vec![
        "--name=default".into(),
        format!("--data-dir={}", root.join("etcd").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=default={peer}"),
        format!("--cert-file={}", pki.etcd.cert.display()),
        format!("--key-file={}", pki.etcd.key.display()),
        format!("--trusted-ca-file={}", pki.ca_cert.display()),
        "--client-cert-auth=true".into(),
        // The tests prove the API server's behaviour, not etcd's durability: skip its fsyncs.
        "--unsafe-no-fsync=true".into(),
        "--log-level=error".into(),
    ]
}

fn apiserver_args(root: &Path, pki: &Pki, port: u16, etcd_port: u16) -> Vec<String> {
    let sa_key = pki.service_account_key.display();
    let sa_pub = pki.service_account_pub.display();
    vec![
        format!("--etcd-servers=https://127.0.0.1:{etcd_port}"),
        format!("--etcd-cafile={}", pki.ca_cert.display()),
        format!("--etcd-certfile={}", pki.etcd_client.cert.display()),
        format!("--etcd-keyfile={}", pki.etcd_client.key.display()),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", root.join("apiserver").display()),
        format!("--tls-cert-file={}", pki.apiserver.cert.display()),
        format!("--tls-private-key-file={}", pki.apiserver.key.display()),
        format!("--client-ca-file={}", pki.ca_cert.display()),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook".into(),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={sa_pub}"),
        format!("--service-account-signing-key-file={sa_key}"),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        // Endpoints may not hold loopback addresses, and loopback is all this API server has.
        "--endpoint-reconciler-type=none".into(),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
    ]
}

/// Polls `check` until it returns `Some`, failing after `timeout` with `what`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
