//! The test cluster's certificates: one CA the harness makes, serving certificates for etcd and
//! the API server, client certificates per identity, and the service-account signing key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Names the API server's serving certificate is valid for: loopback, where the tests reach it,
/// and the in-cluster names a pod would use.
const APISERVER_NAMES: &[&str] = &[
    "127.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "10.0.0.1",
];

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM).
    pub key: PathBuf,
}

/// The CA and everything it signed, written under one directory.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate every component trusts.
    pub ca_cert: PathBuf,
    /// The API server's serving certificate.
    pub apiserver: KeyFiles,
    /// etcd's serving certificate.
    pub etcd: KeyFiles,
    /// The API server's client certificate towards etcd.
    pub etcd_client: KeyFiles,
    /// The key that signs service-account tokens.
    pub service_account_key: PathBuf,
    /// Its public half, which verifies them.
    pub service_account_pub: PathBuf,
}

impl Pki {
    /// Makes a CA and the serving certificates under `dir`.
    pub fn create(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).expect("create the pki directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "sluice-test-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");
        let ca_cert = dir.join("ca.crt");
        std::fs::write(&ca_cert, ca.pem()).expect("write ca.crt");
        let service_account_key = dir.join("service-account.key");
        let sa = KeyPair::generate().expect("service-account key");
        std::fs::write(&service_account_key, sa.serialize_pem()).expect("write sa key");
        let service_account_pub = dir.join("service-account.pub");
        std::fs::write(&service_account_pub, sa.public_key_pem()).expect("write sa public key");
        let mut pki = Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_cert,
            apiserver: KeyFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            etcd: KeyFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            etcd_client: KeyFiles {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            service_account_key,
            service_account_pub,
        };
        pki.apiserver = pki.issue("apiserver", "kube-apiserver", &[], APISERVER_NAMES, true);
        pki.etcd = pki.issue("etcd", "etcd", &[], &["127.0.0.1", "localhost"], true);
        pki.etcd_client = pki.issue("apiserver-etcd-client", "kube-apiserver", &[], &[], false);
        pki
    }

    /// A client certificate for user `common_name` in `groups` (how Kubernetes reads a client
    /// certificate: CN is the user, each O a group).
    pub fn client(&self, file: &str, common_name: &str, groups: &[&str]) -> KeyFiles {
        self.issue(file, common_name, groups, &[], false)
    }

    fn issue(
        &self,
        file: &str,
        common_name: &str,
        groups: &[&str],
        names: &[&str],
        server: bool,
    ) -> KeyFiles {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("certificate params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for group in groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let files = KeyFiles {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}
