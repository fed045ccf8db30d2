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

use super::checks::{check_fraction, check_positive, check_range};
use super::secrets::{required_secret, secret_ref};
use super::sources::{RawDemo, RawHttpJson, RawOAuth, RawOverDrive, SOURCE_KINDS};
use super::{
    AdminConfig, CollectionConfig, Config, ConfigError, ServerConfig, SourceConfig,
    check_shutdown_delay, check_worker_threads, parse_admin_listen, validate_name,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    database_url_env: Option<String>,
    database_url_file: Option<PathBuf>,
    listener_url_env: Option<String>,
    listener_url_file: Option<PathBuf>,
    pool_size: Option<u32>,
    migrate: Option<bool>,
    encryption_key_env: Option<String>,
    encryption_key_file: Option<PathBuf>,
    connect_timeout: Option<HumanDuration>,
    startup_timeout: Option<HumanDuration>,
    query_timeout: Option<HumanDuration>,
    heartbeat_interval: Option<HumanDuration>,
    poll_interval: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<String>,
    request_timeout: Option<HumanDuration>,
    max_concurrent_requests: Option<usize>,
    max_streams: Option<usize>,
    max_message_bytes: Option<usize>,
    http2_keepalive_interval: Option<HumanDuration>,
    http2_keepalive_timeout: Option<HumanDuration>,
    shutdown_grace: Option<HumanDuration>,
    worker_threads: Option<usize>,
    shutdown_delay: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    connect_timeout: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
    max_response_bytes: Option<usize>,
    ca_file: Option<PathBuf>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    refresh_fraction: Option<f64>,
    refresh_jitter: Option<f64>,
    expiry_skew: Option<HumanDuration>,
    expiry_skew_fraction: Option<f64>,
    max_age: Option<HumanDuration>,
    max_stale: Option<HumanDuration>,
    min_refresh_interval: Option<HumanDuration>,
    backoff_initial: Option<HumanDuration>,
    backoff_max: Option<HumanDuration>,
    fetch_timeout: Option<HumanDuration>,
    lease_ttl: Option<HumanDuration>,
    max_lifetime: Option<HumanDuration>,
}

/// A duration written like `30s`, `5m`, `1h 30m`, `7d`.
#[derive(Debug, Clone, Copy)]
pub(super) struct HumanDuration(pub(super) Duration);

/// A duration setting as written, or its default: the one place a default
/// is picked for a duration.
pub(super) fn pick(v: Option<HumanDuration>, default: Duration) -> Duration {
    v.map_or(default, |h| h.0)
}

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
        let d = ServerConfig::default();
        let listen = match self.listen {
            Some(s) => s
                .parse::<ListenAddr>()
                .map_err(|e| ConfigError::new("server.listen", e))?,
            None => d.listen,
        };
        let server = ServerConfig {
            listen,
            request_timeout: pick(self.request_timeout, d.request_timeout),
            max_concurrent_requests: self
                .max_concurrent_requests
                .unwrap_or(d.max_concurrent_requests),
            max_streams: self.max_streams.unwrap_or(d.max_streams),
            max_message_bytes: self.max_message_bytes.unwrap_or(d.max_message_bytes),
            http2_keepalive_interval: pick(
                self.http2_keepalive_interval,
                d.http2_keepalive_interval,
            ),
            http2_keepalive_timeout: pick(self.http2_keepalive_timeout, d.http2_keepalive_timeout),
            shutdown_grace: pick(self.shutdown_grace, d.shutdown_grace),
            worker_threads: self.worker_threads.unwrap_or(d.worker_threads),
            shutdown_delay: pick(self.shutdown_delay, d.shutdown_delay),
        };
        let ms = Duration::from_millis;
        check_positive("server.request_timeout", server.request_timeout, ms(1))?;
        check_range(
            "server.max_concurrent_requests",
            server.max_concurrent_requests,
            1,
            1 << 20,
        )?;
        check_range("server.max_streams", server.max_streams, 1, 1 << 20)?;
        check_range(
            "server.max_message_bytes",
            server.max_message_bytes,
            1024,
            64 << 20,
        )?;
        check_positive(
            "server.http2_keepalive_interval",
            server.http2_keepalive_interval,
            ms(1000),
        )?;
        check_positive(
            "server.http2_keepalive_timeout",
            server.http2_keepalive_timeout,
            ms(1000),
        )?;
        check_worker_threads("server.worker_threads", server.worker_threads)?;
        check_shutdown_delay("server.shutdown_delay", server.shutdown_delay)?;
        Ok(server)
    }
}

impl RawCollection {
    pub(super) fn validate(self, name: String) -> Result<CollectionConfig, ConfigError> {
        let field = |f: &str| format!("collections.{name}.{f}");
        validate_name(&name).map_err(|r| {
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
        Ok(CollectionConfig {
            name,
            source,
            policy,
            prefetch: self.prefetch,
            required: self.required,
        })
    }
}

impl RawHttp {
    pub(super) fn validate(self) -> Result<HttpSettings, ConfigError> {
        let d = HttpSettings::default();
        let ca_pem = match self.ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    ConfigError::new(
                        "http.ca_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                parse_ca_bundle(&pem).map_err(|e| {
                    ConfigError::new("http.ca_file", format!("{} {e}", path.display()))
                })?;
                Some(pem)
            }
        };
        let http = HttpSettings {
            connect_timeout: pick(self.connect_timeout, d.connect_timeout),
            timeout: pick(self.timeout, d.timeout),
            max_response_bytes: self.max_response_bytes.unwrap_or(d.max_response_bytes),
            ca_pem,
        };
        let ms = Duration::from_millis;
        check_positive("http.connect_timeout", http.connect_timeout, ms(10))?;
        check_positive("http.timeout", http.timeout, ms(10))?;
        check_range(
            "http.max_response_bytes",
            http.max_response_bytes,
            1024,
            64 << 20,
        )?;
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
        let d = PgSettings::default();
        let url = required_secret(
            "store",
            "database_url",
            self.database_url_env,
            self.database_url_file,
        )?;
        let url_field = "store.database_url";
        crate::store::postgres::connect_options(&url)
            .map_err(|e| ConfigError::new(url_field, e))?;
        let listener_url = secret_ref(
            "store",
            "listener_url",
            self.listener_url_env,
            self.listener_url_file,
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
            self.encryption_key_env,
            self.encryption_key_file,
        )? {
            None => Keyring::plaintext(),
            Some(material) => {
                Keyring::parse(material.expose()).map_err(|e| ConfigError::new(key_field, e))?
            }
        };
        let settings = PgSettings {
            url,
            listener_url,
            pool_size: self.pool_size.unwrap_or(d.pool_size),
            migrate: self.migrate.unwrap_or(d.migrate),
            keyring,
            connect_timeout: pick(self.connect_timeout, d.connect_timeout),
            startup_timeout: pick(self.startup_timeout, d.startup_timeout),
            query_timeout: pick(self.query_timeout, d.query_timeout),
            heartbeat_interval: pick(self.heartbeat_interval, d.heartbeat_interval),
            poll_interval: pick(self.poll_interval, d.poll_interval),
        };
        check_range("store.pool_size", settings.pool_size as usize, 1, 64)?;
        let ms = Duration::from_millis;
        check_positive("store.connect_timeout", settings.connect_timeout, ms(100))?;
        if settings.startup_timeout < settings.connect_timeout {
            return Err(ConfigError::new(
                "store.startup_timeout",
                "must be at least store.connect_timeout",
            ));
        }
        check_positive("store.query_timeout", settings.query_timeout, ms(100))?;
        check_positive(
            "store.heartbeat_interval",
            settings.heartbeat_interval,
            ms(100),
        )?;
        check_positive("store.poll_interval", settings.poll_interval, ms(500))?;
        Ok(settings)
    }
}

impl RawPolicy {
    pub(super) fn validate(self, prefix: &str) -> Result<Policy, ConfigError> {
        let d = Policy::default();
        let p = Policy {
            refresh_fraction: self.refresh_fraction.unwrap_or(d.refresh_fraction),
            refresh_jitter: self.refresh_jitter.unwrap_or(d.refresh_jitter),
            expiry_skew: pick(self.expiry_skew, d.expiry_skew),
            expiry_skew_fraction: self.expiry_skew_fraction.unwrap_or(d.expiry_skew_fraction),
            max_age: pick(self.max_age, d.max_age),
            max_stale: pick(self.max_stale, d.max_stale),
            min_refresh_interval: pick(self.min_refresh_interval, d.min_refresh_interval),
            backoff_initial: pick(self.backoff_initial, d.backoff_initial),
            backoff_max: pick(self.backoff_max, d.backoff_max),
            fetch_timeout: pick(self.fetch_timeout, d.fetch_timeout),
            lease_ttl: pick(self.lease_ttl, d.lease_ttl),
            max_lifetime: pick(self.max_lifetime, d.max_lifetime),
        };
        let f = |name: &str| format!("{prefix}.{name}");
        check_fraction(&f("refresh_fraction"), p.refresh_fraction, 0.1, 0.95)?;
        check_fraction(&f("refresh_jitter"), p.refresh_jitter, 0.0, 0.3)?;
        if p.refresh_fraction + p.refresh_jitter > 0.99
            || p.refresh_fraction - p.refresh_jitter < 0.05
        {
            return Err(ConfigError::new(
                f("refresh_jitter"),
                "refresh_fraction plus or minus refresh_jitter must stay between 0.05 and 0.99",
            ));
        }
        check_fraction(&f("expiry_skew_fraction"), p.expiry_skew_fraction, 0.0, 0.5)?;
        let ms = Duration::from_millis;
        check_positive(&f("max_age"), p.max_age, ms(1000))?;
        check_positive(&f("backoff_initial"), p.backoff_initial, ms(10))?;
        check_positive(&f("fetch_timeout"), p.fetch_timeout, ms(10))?;
        check_positive(&f("lease_ttl"), p.lease_ttl, ms(500))?;
        if p.lease_ttl > Duration::from_secs(60) {
            return Err(ConfigError::new(
                f("lease_ttl"),
                "must be at most 60s: a dead holder blocks refreshes for this long",
            ));
        }
        check_positive(&f("max_lifetime"), p.max_lifetime, Duration::from_secs(1))?;
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
