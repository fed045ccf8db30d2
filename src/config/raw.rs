//! The serde layer: the file as written (every field optional, unknown
//! fields refused), and its validation into the typed sections of
//! [`Config`](super::Config): defaults applied, bounds checked, errors naming
//! the dotted field.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::broker::Policy;
use crate::listen::ListenAddr;
use crate::source::http::{HttpSettings, parse_ca_bundle};
use crate::store::PgSettings;
use crate::store::crypto::Keyring;
use crate::tls::{ClientCert, TlsSettings};

use super::checks::{check_fraction, check_positive, check_range};
use super::secrets::{required_secret, secret_ref};
use super::sources::{RawBroker, RawDemo, RawHttpJson, RawOAuth, RawOverDrive, SOURCE_KINDS};
use super::{
    AdminConfig, CollectionConfig, CollectionName, Config, ConfigError, ServerConfig, SourceConfig,
    WORKER_THREADS, check_listen, check_shutdown_delay, parse_admin_listen,
};

/// toml errors are multi-line with a source excerpt; keep logs and exit messages
/// on one line.
pub(super) fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.contains(" | "))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Declares a section's settings once: each line is a field as written in
/// the file and its bound (`duration`, `duration(min)`, `count(lo, hi)`,
/// `count32(lo, hi)`, `fraction(lo, hi)`, `flag`); its default is the typed
/// section's `Default`, its documentation the README's table. Generates the
/// raw (serde) struct, with `extra` fields that need more than a bound
/// (addresses, secrets, files), and `apply`, which writes each setting that
/// is present into the typed section and checks every declared one against
/// its bound under `prefix.field`.
macro_rules! section {
    (
        $raw:ident => $typed:ty {
            $( $field:ident : $kind:ident $( ( $($arg:expr),* ) )? ),* $(,)?
        }
        $( extra { $( $xfield:ident : $xty:ty ),* $(,)? } )?
    ) => {
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct $raw {
            $( $field: Option<section!(@raw $kind)>, )*
            $( $( $xfield: $xty, )* )?
        }

        impl $raw {
            /// Writes each declared setting that is present into `out` and
            /// checks every declared setting against its bound.
            fn apply(&self, prefix: &str, out: &mut $typed) -> Result<(), ConfigError> {
                $(
                    if let Some(v) = self.$field {
                        out.$field = section!(@value $kind v);
                    }
                    section!(@check $kind, &format!("{prefix}.{}", stringify!($field)), out.$field $(, $($arg),*)?)?;
                )*
                Ok(())
            }
        }
    };
    (@raw duration) => { HumanDuration };
    (@raw count) => { usize };
    (@raw count32) => { u32 };
    (@raw fraction) => { f64 };
    (@raw flag) => { bool };
    (@value duration $v:ident) => { $v.0 };
    (@value $kind:ident $v:ident) => { $v };
    (@check duration, $f:expr, $v:expr) => { Ok::<(), ConfigError>(()) };
    (@check duration, $f:expr, $v:expr, $min:expr) => { check_positive($f, $v, $min) };
    (@check count, $f:expr, $v:expr, $lo:expr, $hi:expr) => { check_range($f, $v, $lo, $hi) };
    (@check count32, $f:expr, $v:expr, $lo:expr, $hi:expr) => { check_range($f, $v as usize, $lo, $hi) };
    (@check fraction, $f:expr, $v:expr, $lo:expr, $hi:expr) => { check_fraction($f, $v, $lo, $hi) };
    (@check flag, $f:expr, $v:expr) => { Ok::<(), ConfigError>(()) };
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

section! {
    RawServer => ServerConfig {
        request_timeout: duration(ms(1)),
        max_concurrent_requests: count(1, 1 << 20),
        max_streams: count(1, 1 << 20),
        max_message_bytes: count(1024, 64 << 20),
        http2_keepalive_interval: duration(ms(1000)),
        http2_keepalive_timeout: duration(ms(1000)),
        shutdown_grace: duration,
        worker_threads: count(*WORKER_THREADS.start(), *WORKER_THREADS.end()),
        shutdown_delay: duration,
        insecure: flag,
    }
    extra { listen: Option<String>, tls: Option<RawTls> }
}

section! {
    RawTls => TlsSettings {
        reload_interval: duration(ms(100)),
    }
    extra {
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
        client_ca_file: Option<PathBuf>,
        client_cert: Option<String>,
    }
}

section! {
    RawHttp => HttpSettings {
        connect_timeout: duration(ms(10)),
        timeout: duration(ms(10)),
        max_response_bytes: count(1024, 64 << 20),
    }
    extra { ca_file: Option<PathBuf> }
}

section! {
    RawStore => PgSettings {
        pool_size: count32(1, 64),
        migrate: flag,
        connect_timeout: duration(ms(100)),
        startup_timeout: duration,
        query_timeout: duration(ms(100)),
        heartbeat_interval: duration(ms(100)),
        poll_interval: duration(ms(500)),
    }
    extra {
        database_url_env: Option<String>,
        database_url_file: Option<PathBuf>,
        listener_url_env: Option<String>,
        listener_url_file: Option<PathBuf>,
        encryption_key_env: Option<String>,
        encryption_key_file: Option<PathBuf>,
    }
}

section! {
    RawPolicy => Policy {
        refresh_fraction: fraction(0.1, 0.95),
        refresh_jitter: fraction(0.0, 0.3),
        expiry_skew: duration,
        expiry_skew_fraction: fraction(0.0, 0.5),
        max_age: duration(ms(1000)),
        max_stale: duration,
        min_refresh_interval: duration,
        backoff_initial: duration(ms(10)),
        backoff_max: duration,
        fetch_timeout: duration(ms(10)),
        lease_ttl: duration(ms(500)),
        max_lifetime: duration(ms(1000)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    collections: BTreeMap<String, RawCollection>,
    store: Option<RawStore>,
    #[serde(default)]
    admin: RawAdmin,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    enabled: Option<bool>,
    listen: Option<String>,
}

impl RawAdmin {
    pub(super) fn validate(self) -> Result<Option<AdminConfig>, ConfigError> {
        let listen = match self.listen {
            Some(s) => parse_admin_listen("admin.listen", &s)?,
            None => AdminConfig::default().listen,
        };
        Ok(self
            .enabled
            .unwrap_or(true)
            .then_some(AdminConfig { listen }))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCollection {
    /// Read as a table and dispatched on `kind` by hand, so that errors inside
    /// it keep their exact path (serde's tagged enums lose it).
    source: toml::Table,
    #[serde(default = "yes")]
    prefetch: bool,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    policy: RawPolicy,
    /// Who may read the collection; absent: anyone who can connect.
    readers: Option<Vec<String>>,
}

pub(super) fn yes() -> bool {
    true
}

/// Deserializes `table` as `T`, reporting errors under `prefix`.
pub(super) fn deserialize_at<T: serde::de::DeserializeOwned>(
    table: toml::Table,
    prefix: &str,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            prefix.to_owned()
        } else {
            format!("{prefix}.{path}")
        };
        ConfigError::new(field, one_line(e.inner()))
    })
}

/// A duration written like `30s`, `5m`, `1h 30m`, `7d`.
#[derive(Debug, Clone, Copy)]
pub(super) struct HumanDuration(pub(super) Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?} ({e}); write e.g. \"30s\", \"5m\", \"24h\""
                ))
            })
    }
}

impl RawConfig {
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let server = self.server.validate()?;
        let http = self.http.validate()?;
        if self.collections.is_empty() {
            return Err(ConfigError::new(
                "collections",
                "at least one collection is required (e.g. [collections.demo] with source = { kind = \"demo\" })",
            ));
        }
        let collections = self
            .collections
            .into_iter()
            .map(|(name, raw)| raw.validate(name))
            .collect::<Result<Vec<_>, _>>()?;
        check_dependencies(&collections)?;
        let store = self.store.map(RawStore::validate).transpose()?;
        let admin = self.admin.validate()?;
        Ok(Config {
            server,
            http,
            collections,
            store,
            admin,
        })
    }
}

/// Every parent named by a source exists, and the dependency graph has no
/// cycle. `collections` is sorted by name, so errors are deterministic.
pub(super) fn check_dependencies(collections: &[CollectionConfig]) -> Result<(), ConfigError> {
    let parent_of = |name: &str| {
        collections
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.source.parent())
    };
    for c in collections {
        if let Some((parent, field)) = c.source.parent()
            && !collections.iter().any(|p| p.name == parent)
        {
            let known: Vec<&str> = collections.iter().map(|c| c.name.as_str()).collect();
            return Err(ConfigError::new(
                format!("collections.{}.source.{field}", c.name),
                format!(
                    "unknown collection {parent:?}; configured: {}",
                    known.join(", ")
                ),
            ));
        }
    }
    // Each source has at most one parent, so following parents from any
    // collection either ends or comes back to a collection already on the path.
    for c in collections {
        let mut path = vec![c.name.as_str()];
        let mut at = c.name.as_str();
        while let Some((parent, _)) = parent_of(at) {
            if let Some(start) = path.iter().position(|p| *p == parent) {
                let mut cycle = path[start..].to_vec();
                cycle.push(parent);
                let field = parent_of(parent).map_or("oauth", |(_, f)| f);
                let first = cycle[0];
                return Err(ConfigError::new(
                    format!("collections.{first}.source.{field}"),
                    format!("dependency cycle: {}", cycle.join(" -> ")),
                ));
            }
            path.push(parent);
            at = parent;
        }
    }
    Ok(())
}

impl RawServer {
    pub(super) fn validate(self) -> Result<ServerConfig, ConfigError> {
        let mut server = ServerConfig::default();
        if let Some(listen) = &self.listen {
            server.listen = listen
                .parse::<ListenAddr>()
                .map_err(|e| ConfigError::new("server.listen", e))?;
        }
        self.apply("server", &mut server)?;
        check_shutdown_delay("server.shutdown_delay", server.shutdown_delay)?;
        server.tls = self.tls.map(RawTls::validate).transpose()?;
        check_listen("server.listen", &server)?;
        Ok(server)
    }
}

impl RawTls {
    /// Checks the fields and loads the material once, so that a missing
    /// file, a key that does not match or a bad CA fails at start.
    pub(super) fn validate(self) -> Result<TlsSettings, ConfigError> {
        let mut tls = TlsSettings::default();
        self.apply("server.tls", &mut tls)?;
        let required = |v: Option<PathBuf>, field: &str, what: &str| {
            v.ok_or_else(|| {
                ConfigError::new(format!("server.tls.{field}"), format!("missing: {what}"))
            })
        };
        tls.cert_file = required(
            self.cert_file,
            "cert_file",
            "the PEM certificate chain the token API presents",
        )?;
        tls.key_file = required(
            self.key_file,
            "key_file",
            "the PEM private key of cert_file",
        )?;
        tls.client_ca_file = self.client_ca_file;
        tls.client_cert = match self.client_cert.as_deref() {
            None | Some("required") => ClientCert::Required,
            Some("optional") => ClientCert::Optional,
            Some(other) => {
                return Err(ConfigError::new(
                    "server.tls.client_cert",
                    format!("must be \"required\" or \"optional\", got {other:?}"),
                ));
            }
        };
        if self.client_cert.is_some() && tls.client_ca_file.is_none() {
            return Err(ConfigError::new(
                "server.tls.client_cert",
                "needs server.tls.client_ca_file (the CA that client certificates are verified against)",
            ));
        }
        crate::tls::load(&tls).map_err(|e| ConfigError::new(e.field, e.reason))?;
        Ok(tls)
    }
}

impl RawCollection {
    pub(super) fn validate(self, name: String) -> Result<CollectionConfig, ConfigError> {
        let field = |f: &str| format!("collections.{name}.{f}");
        CollectionName::parse(&name).map_err(|r| {
            ConfigError::new(
                format!("collections.{name:?}"),
                format!("collection name {r}"),
            )
        })?;
        let kind = match self.source.get("kind") {
            Some(toml::Value::String(k)) => k.clone(),
            Some(_) => return Err(ConfigError::new(field("source.kind"), "must be a string")),
            None => {
                return Err(ConfigError::new(
                    field("source.kind"),
                    format!("missing; one of: {}", SOURCE_KINDS.join(", ")),
                ));
            }
        };
        let at = field("source");
        // `kind` is read here; the kind's own struct sees the other fields.
        let mut table = self.source;
        table.remove("kind");
        let source = match kind.as_str() {
            "demo" => {
                let RawDemo { ttl } = deserialize_at(table, &at)?;
                let ttl = ttl.map_or(Duration::from_secs(30), |h| h.0);
                check_positive(&field("source.ttl"), ttl, Duration::from_millis(100))?;
                SourceConfig::Demo { ttl }
            }
            "oauth2_client_credentials" | "oauth2_refresh_token" => {
                let raw: RawOAuth = deserialize_at(table, &at)?;
                SourceConfig::OAuth(raw.validate(&at, kind == "oauth2_refresh_token")?)
            }
            "overdrive" => {
                let raw: RawOverDrive = deserialize_at(table, &at)?;
                SourceConfig::OverDrive(raw.validate(&at)?)
            }
            "http_json" => {
                let raw: RawHttpJson = deserialize_at(table, &at)?;
                SourceConfig::HttpJson(raw.validate(&at)?)
            }
            "broker" => {
                let raw: RawBroker = deserialize_at(table, &at)?;
                SourceConfig::Broker(raw.validate(&at, &name)?)
            }
            other => {
                return Err(ConfigError::new(
                    field("source.kind"),
                    format!(
                        "unknown source kind {other:?}; one of: {}",
                        SOURCE_KINDS.join(", ")
                    ),
                ));
            }
        };
        let policy = self.policy.validate(&field("policy"))?;
        if self.required && !self.prefetch {
            return Err(ConfigError::new(
                field("required"),
                "a required collection must be prefetched (remove prefetch = false)",
            ));
        }
        if let Some(readers) = &self.readers {
            if readers.is_empty() {
                return Err(ConfigError::new(
                    field("readers"),
                    "must not be empty: list the identities allowed to read this collection, or remove readers to let anyone who can connect read it",
                ));
            }
            for r in readers {
                crate::grpc::authz::check_reader(r)
                    .map_err(|reason| ConfigError::new(field("readers"), reason))?;
            }
        }
        Ok(CollectionConfig {
            name,
            source,
            policy,
            prefetch: self.prefetch,
            required: self.required,
            readers: self.readers,
        })
    }
}

impl RawHttp {
    pub(super) fn validate(self) -> Result<HttpSettings, ConfigError> {
        let mut http = HttpSettings::default();
        self.apply("http", &mut http)?;
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                ConfigError::new(
                    "http.ca_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            parse_ca_bundle(&pem)
                .map_err(|e| ConfigError::new("http.ca_file", format!("{} {e}", path.display())))?;
            http.ca_pem = Some(pem);
        }
        Ok(http)
    }
}

/// The `[store]` section alone, for `migrate`: every other section is
/// ignored (neither checked nor resolved), so that a migration Job needs no
/// upstream secret.
#[derive(Debug, Deserialize)]
pub(super) struct RawStoreOnly {
    pub(super) store: Option<RawStore>,
}

/// TOML text into a raw config type; an error names the field it is about.
pub(super) fn deserialize<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text)
        .map_err(|e| ConfigError::new("config", format!("invalid TOML: {}", one_line(&e))))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            "config".to_owned()
        } else {
            path
        };
        ConfigError::new(field, one_line(e.inner()))
    })
}

impl RawStore {
    pub(super) fn validate(self) -> Result<PgSettings, ConfigError> {
        let url = required_secret(
            "store",
            "database_url",
            self.database_url_env.clone(),
            self.database_url_file.clone(),
        )?;
        let url_field = "store.database_url";
        crate::store::postgres::connect_options(&url)
            .map_err(|e| ConfigError::new(url_field, e))?;
        let listener_url = secret_ref(
            "store",
            "listener_url",
            self.listener_url_env.clone(),
            self.listener_url_file.clone(),
        )?;
        if let Some(listener) = &listener_url {
            crate::store::postgres::connect_options(listener)
                .map_err(|e| ConfigError::new("store.listener_url", e))?;
        }
        let key_field = if self.encryption_key_file.is_some() {
            "store.encryption_key_file"
        } else {
            "store.encryption_key_env"
        };
        let keyring = match secret_ref(
            "store",
            "encryption_key",
            self.encryption_key_env.clone(),
            self.encryption_key_file.clone(),
        )? {
            None => Keyring::plaintext(),
            Some(material) => {
                Keyring::parse(material.expose()).map_err(|e| ConfigError::new(key_field, e))?
            }
        };
        let mut settings = PgSettings {
            url,
            listener_url,
            keyring,
            ..PgSettings::default()
        };
        self.apply("store", &mut settings)?;
        if settings.startup_timeout < settings.connect_timeout {
            return Err(ConfigError::new(
                "store.startup_timeout",
                "must be at least store.connect_timeout",
            ));
        }
        Ok(settings)
    }
}

impl RawPolicy {
    pub(super) fn validate(&self, prefix: &str) -> Result<Policy, ConfigError> {
        let mut p = Policy::default();
        self.apply(prefix, &mut p)?;
        let f = |name: &str| format!("{prefix}.{name}");
        if p.refresh_fraction + p.refresh_jitter > 0.99
            || p.refresh_fraction - p.refresh_jitter < 0.05
        {
            return Err(ConfigError::new(
                f("refresh_jitter"),
                "refresh_fraction plus or minus refresh_jitter must stay between 0.05 and 0.99",
            ));
        }
        if p.lease_ttl > Duration::from_secs(60) {
            return Err(ConfigError::new(
                f("lease_ttl"),
                "must be at most 60s: a dead holder blocks refreshes for this long",
            ));
        }
        if p.max_lifetime > Duration::from_secs(10 * 365 * 24 * 3600) {
            return Err(ConfigError::new(f("max_lifetime"), "must be at most 3650d"));
        }
        if p.backoff_max < p.backoff_initial {
            return Err(ConfigError::new(
                f("backoff_max"),
                "must not be less than backoff_initial",
            ));
        }
        Ok(p)
    }
}
