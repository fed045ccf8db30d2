//! A throwaway PKI for the TLS tests (rcgen, aws-lc-rs): a [`Ca`] that signs
//! a server certificate for `localhost` / 127.0.0.1 and client certificates
//! with chosen SANs; [`TlsDir`], the server's files laid out the way the
//! kubelet and cert-manager's CSI driver do (each file a symlink through
//! `..data`, replaced by one atomic rename), so a rotation is a symlink swap.
//! Keys are written to files only, never printed.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate naming `uris` (URI SANs) and `dns` (DNS SANs).
    pub fn client(&self, uris: &[&str], dns: &[&str]) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "client");
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .chain(
                dns.iter()
                    .map(|d| SanType::DnsName((*d).try_into().unwrap())),
            )
            .collect();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// The server's `tls.crt`, `tls.key` and `ca.crt` (the client CA) in a temp
/// dir, each a symlink `name -> ..data/name`, `..data` a symlink to the
/// current version's directory.
pub struct TlsDir {
    dir: tempfile::TempDir,
    version: usize,
}

impl TlsDir {
    pub fn new(server: &Leaf, client_ca: &Ca) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Self { dir, version: 0 };
        d.write(&server.cert, &server.key, &client_ca.pem());
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(Path::new("..data").join(name), d.dir.path().join(name))
                .unwrap();
        }
        d
    }

    /// Writes a new version and swaps `..data` to it in one rename, as the
    /// kubelet's atomic writer does.
    pub fn write(&mut self, cert: &str, key: &str, ca: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let vdir = self.dir.path().join(&version);
        std::fs::create_dir(&vdir).unwrap();
        std::fs::write(vdir.join("tls.crt"), cert).unwrap();
        std::fs::write(vdir.join("tls.key"), key).unwrap();
        std::fs::write(vdir.join("ca.crt"), ca).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `[server.tls]` table for these files.
    pub fn toml(&self, extra: &str) -> String {
        format!(
            "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n{extra}\n",
            self.path("tls.crt"),
            self.path("tls.key"),
            self.path("ca.crt"),
        )
    }
}
