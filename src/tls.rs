//! TLS for the token API: the server's certificate, key and client CA read
//! from PEM files, re-read when they change, and the caller identities a
//! verified client certificate carries.
//!
//! Contract:
//! - [`load`] either builds a complete rustls `ServerConfig` (aws-lc-rs
//!   provider passed explicitly, never a process default; ALPN `h2`) or a
//!   [`TlsError`] naming the `server.tls.*` field at fault. Config loading
//!   calls it, so bad material fails at start (exit 64).
//! - [`Reloader`] holds the material in force. Its [`Reloader::run`] loop
//!   re-reads the three files by path every `reload_interval` (paths are
//!   re-opened each time, so a symlink swap by cert-manager or SPIRE is
//!   seen) and compares a SHA-256 of their content: a change that loads
//!   replaces the material for new handshakes (info log, `ok` count); one
//!   that does not keeps the previous material (one warn log and one
//!   `failed` count per distinct bad content, never file content in
//!   either). Connections already open keep the material they started with.
//! - [`identities`] lists a verified certificate's URI SANs as written and
//!   DNS SANs as `dns:<name>` (lower-cased); nothing else is an identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// `[server.tls]`: where the material is and how it is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The server's certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// When set, client certificates are verified against this CA bundle.
    pub client_ca_file: Option<PathBuf>,
    /// Whether a client must present a certificate (with `client_ca_file`).
    pub client_cert: ClientCert,
    /// How often the files are checked for change.
    pub reload_interval: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            client_ca_file: None,
            client_cert: ClientCert::Required,
            reload_interval: Duration::from_secs(5),
        }
    }
}

/// `server.tls.client_cert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCert {
    /// The handshake fails without a certificate the CA vouches for.
    Required,
    /// A client may connect without a certificate (it is then anonymous);
    /// one it presents must still verify.
    Optional,
}

/// TLS material that cannot be used, naming the setting at fault. The reason
/// never quotes file content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct TlsError {
    pub field: &'static str,
    pub reason: String,
}

impl TlsError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

const CERT_FIELD: &str = "server.tls.cert_file";
const KEY_FIELD: &str = "server.tls.key_file";
const CA_FIELD: &str = "server.tls.client_ca_file";

/// The three files' bytes, as read at one check.
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

impl Files {
    fn read(s: &TlsSettings) -> Result<Self, TlsError> {
        fn one(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
            std::fs::read(path)
                .map_err(|e| TlsError::new(field, format!("cannot read {}: {e}", path.display())))
        }
        Ok(Self {
            cert: one(CERT_FIELD, &s.cert_file)?,
            key: one(KEY_FIELD, &s.key_file)?,
            ca: s
                .client_ca_file
                .as_deref()
                .map(|p| one(CA_FIELD, p))
                .transpose()?,
        })
    }

    /// A digest of all three, so that any change (same size and mtime
    /// included) is seen; never logged.
    fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [Some(&self.cert), Some(&self.key), self.ca.as_ref()] {
            let bytes = part.map_or(&[][..], Vec::as_slice);
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        }
        h.finalize().into()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certs(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            TlsError::new(
                field,
                format!("{} is not a PEM certificate file", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(TlsError::new(
            field,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert).map_err(|_| {
            TlsError::new(
                field,
                format!("{} holds a certificate that does not parse", path.display()),
            )
        })?;
    }
    Ok(certs)
}

fn build(s: &TlsSettings, files: &Files) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let chain = certs(CERT_FIELD, &s.cert_file, &files.cert)?;
    // The key's own parse errors may quote its bytes: say only what it is not.
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|_| {
        TlsError::new(
            KEY_FIELD,
            format!(
                "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                s.key_file.display()
            ),
        )
    })?;
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|_| {
            TlsError::new(
                KEY_FIELD,
                format!("{} is not a usable private key", s.key_file.display()),
            )
        })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new(CERT_FIELD, e.to_string()))?;
    let builder = match (&s.client_ca_file, &files.ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for ca in certs(CA_FIELD, path, pem)? {
                roots
                    .add(ca)
                    .map_err(|e| TlsError::new(CA_FIELD, format!("{}: {e}", path.display())))?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if s.client_cert == ClientCert::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::new(CA_FIELD, format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::new(
            KEY_FIELD,
            format!(
                "{} does not match the certificate in {}",
                s.key_file.display(),
                s.cert_file.display()
            ),
        ),
        other => TlsError::new(CERT_FIELD, format!("{}: {other}", s.cert_file.display())),
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Checks a client's TLS files (the `broker` source's) the way a
/// connection will use them: a CA bundle of certificates that parse and,
/// when given, a certificate chain with the private key of its first
/// certificate. Errors name `ca_file`, `cert_file` or `key_file` (the
/// caller prefixes its table) and never quote a file.
pub fn check_client_files(
    ca_file: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<(), TlsError> {
    let read = |field: &'static str, p: &Path| {
        std::fs::read(p)
            .map_err(|e| TlsError::new(field, format!("cannot read {}: {e}", p.display())))
    };
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for ca in certs("ca_file", ca_file, &read("ca_file", ca_file)?)? {
        roots
            .add(ca)
            .map_err(|e| TlsError::new("ca_file", format!("{}: {e}", ca_file.display())))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("ca_file", e.to_string()))?
        .with_root_certificates(roots);
    if let Some((cert_file, key_file)) = identity {
        let chain = certs("cert_file", cert_file, &read("cert_file", cert_file)?)?;
        let key = PrivateKeyDer::from_pem_slice(&read("key_file", key_file)?).map_err(|_| {
            TlsError::new(
                "key_file",
                format!(
                    "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                    key_file.display()
                ),
            )
        })?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => TlsError::new(
                    "key_file",
                    format!(
                        "{} does not match the certificate in {}",
                        key_file.display(),
                        cert_file.display()
                    ),
                ),
                other => TlsError::new("cert_file", format!("{}: {other}", cert_file.display())),
            })?;
    }
    Ok(())
}

/// Reads and checks the material `s` names: what config loading calls.
pub fn load(s: &TlsSettings) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    build(s, &Files::read(s)?)
}

/// The material in force, and the loop that replaces it when the files
/// change.
pub struct Reloader {
    settings: TlsSettings,
    current: watch::Sender<Arc<rustls::ServerConfig>>,
    /// What `current` was built from.
    serving: [u8; 32],
}

impl Reloader {
    /// Loads the material (errors name the field, as at config load).
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let files = Files::read(&settings)?;
        let config = build(&settings, &files)?;
        Ok(Self {
            serving: files.fingerprint(),
            current: watch::Sender::new(config),
            settings,
        })
    }

    /// The material in force now; each handshake takes it afresh.
    pub fn current(&self) -> watch::Receiver<Arc<rustls::ServerConfig>> {
        self.current.subscribe()
    }

    /// Checks the files every `reload_interval` until `shutdown`; `counted`
    /// is told of each reload (`true`) and each failed one (`false`).
    pub async fn run(mut self, counted: impl Fn(bool), shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        // The last failure reported, so that a bad file is reported once,
        // not at every check.
        let mut reported: Option<String> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let settings = self.settings.clone();
            let Ok(read) = tokio::task::spawn_blocking(move || Files::read(&settings)).await else {
                continue;
            };
            let files = match read {
                Ok(f) => f,
                Err(e) => {
                    self.report(&mut reported, e.to_string(), &e, &counted);
                    continue;
                }
            };
            let fingerprint = files.fingerprint();
            if fingerprint == self.serving {
                reported = None;
                continue;
            }
            let key = hex(&fingerprint);
            if reported.as_deref() == Some(key.as_str()) {
                continue;
            }
            match build(&self.settings, &files) {
                Ok(config) => {
                    self.current.send_replace(config);
                    self.serving = fingerprint;
                    reported = None;
                    counted(true);
                    info!(
                        cert_file = %self.settings.cert_file.display(),
                        "tls material changed; new connections use it"
                    );
                }
                Err(e) => self.report(&mut reported, key, &e, &counted),
            }
        }
    }

    fn report(
        &self,
        reported: &mut Option<String>,
        key: String,
        e: &TlsError,
        counted: &impl Fn(bool),
    ) {
        if reported.as_deref() == Some(key.as_str()) {
            return;
        }
        counted(false);
        warn!(
            field = e.field,
            error = %e.reason,
            "tls material changed but cannot be used; still serving the previous material"
        );
        *reported = Some(key);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The identities a (verified) client certificate names: each URI SAN as
/// written (`spiffe://...`) and each DNS SAN as `dns:<name>`, lower-cased.
/// A certificate that does not parse names none.
pub fn identities(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            GeneralName::DNSName(dns) => Some(format!("dns:{}", dns.to_ascii_lowercase())),
            _ => None,
        })
        .collect()
}
