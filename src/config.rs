//! The configuration: one TOML file, parsed once into typed values.
//!
//! Contract: [`Config::load`] and [`Config::parse`] either return a fully
//! validated config or a [`ConfigError`] naming the offending field (a dotted
//! path such as `collections.demo.policy.refresh_fraction`) and the reason.
//! Unknown fields are errors (typos must not pass silently). Nothing here binds a
//! port or touches the network. Secrets are never written inline: later source
//! kinds take them by reference (`..._env` / `..._file`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::broker::Policy;
use crate::listen::ListenAddr;
use crate::source::http::{HttpSettings, parse_ca_bundle};
use crate::source::{
    Body, ClientAuth, ExpiresFormat, Grant, HttpJsonSpec, JsonSpec, OAuthSpec, OverDriveSpec,
    ValueSpec,
};
use crate::store::PgSettings;
use crate::store::crypto::Keyring;
use crate::token::Secret;

/// A config problem, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// The shared outbound HTTP client.
    pub http: HttpSettings,
    /// Sorted by name.
    pub collections: Vec<CollectionConfig>,
    /// The shared tier; `None`: the in-memory store (one sidecar only).
    pub store: Option<PgSettings>,
    /// The admin HTTP listener (metrics, liveness, readiness); `None`: off.
    pub admin: Option<AdminConfig>,
}

/// The admin listener: `/metrics`, `/livez`, `/readyz` and gRPC health over
/// HTTP/1.1 and h2c on one TCP port, apart from the token API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: std::net::SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 9464)),
        }
    }
}

/// Parses an admin listen address (`IP:PORT`), naming `field` on error.
pub fn parse_admin_listen(field: &str, s: &str) -> Result<std::net::SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        ConfigError::new(
            field,
            format!("must be IP:PORT (e.g. 127.0.0.1:9464 or 0.0.0.0:9464), got {s:?}"),
        )
    })
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: ListenAddr,
    /// Upper bound on a unary call, also when the caller sets no deadline.
    pub request_timeout: Duration,
    /// Process-wide cap on unary `TokenBroker` calls in progress; beyond it calls
    /// are rejected with RESOURCE_EXHAUSTED rather than queued.
    pub max_concurrent_requests: usize,
    /// Cap on open `WatchToken` streams.
    pub max_streams: usize,
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// After SIGTERM/SIGINT, how long in-flight calls get before the process exits.
    pub shutdown_grace: Duration,
    /// Tokio worker threads of `serve` ([`WORKER_THREADS`]).
    pub worker_threads: usize,
    /// After the first SIGTERM/SIGINT, how long to keep serving (readiness
    /// NOT_SERVING) before shutting down; at most [`MAX_SHUTDOWN_DELAY`].
    pub shutdown_delay: Duration,
}

/// Bounds of `server.worker_threads` (and `serve --worker-threads`): a sidecar
/// needs few threads, and one per node CPU wastes memory on big nodes.
pub const WORKER_THREADS: std::ops::RangeInclusive<usize> = 1..=64;

/// Upper bound of `server.shutdown_delay` (and `serve --shutdown-delay`).
pub const MAX_SHUTDOWN_DELAY: Duration = Duration::from_secs(300);

/// Checks a worker thread count, naming `field` (`server.worker_threads` or
/// the flag that set it).
pub fn check_worker_threads(field: &str, n: usize) -> Result<(), ConfigError> {
    check_range(field, n, *WORKER_THREADS.start(), *WORKER_THREADS.end())
}

/// Checks a shutdown delay, naming `field` (`server.shutdown_delay` or the
/// flag that set it).
pub fn check_shutdown_delay(field: &str, d: Duration) -> Result<(), ConfigError> {
    if d > MAX_SHUTDOWN_DELAY {
        return Err(ConfigError::new(
            field,
            format!(
                "must be at most {}, got {}",
                humantime::format_duration(MAX_SHUTDOWN_DELAY),
                humantime::format_duration(d)
            ),
        ));
    }
    Ok(())
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: ListenAddr::default(),
            request_timeout: Duration::from_secs(10),
            max_concurrent_requests: 1024,
            max_streams: 1024,
            max_message_bytes: 64 * 1024,
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            worker_threads: 2,
            shutdown_delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CollectionConfig {
    pub name: String,
    pub source: SourceConfig,
    pub policy: Policy,
    pub prefetch: bool,
    /// Readiness waits for this collection to hold a servable token.
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// Mints a random token that lives `ttl`.
    Demo {
        ttl: Duration,
    },
    /// `oauth2_client_credentials` and `oauth2_refresh_token`.
    OAuth(OAuthSpec),
    OverDrive(OverDriveSpec),
    HttpJson(HttpJsonSpec),
}

impl SourceConfig {
    /// The collection this source depends on, and the field that names it.
    fn parent(&self) -> Option<(&str, &'static str)> {
        match self {
            Self::OverDrive(o) => Some((&o.oauth, "oauth")),
            Self::HttpJson(h) => h.bearer_from.as_deref().map(|p| (p, "bearer_from")),
            Self::Demo { .. } | Self::OAuth(_) => None,
        }
    }
}

/// Longest collection name.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a collection name: 1 to 128 characters of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "must be at most {MAX_NAME_LEN} characters, got {}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("must contain only [A-Za-z0-9._-], found {bad:?}"));
    }
    Ok(())
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = deserialize(text)?;
        raw.validate()
    }

    /// The zero-config `serve --dev` setup: one prefetched `demo` collection.
    pub fn dev(ttl: Duration) -> Result<Self, ConfigError> {
        check_positive("--dev-token-ttl", ttl, Duration::from_millis(100))?;
        // Keep the demo's soft refresh from being held back past its expiry by
        // the minimum interval when the lifetime is short.
        let policy = Policy {
            min_refresh_interval: Policy::default().min_refresh_interval.min(ttl / 4),
            ..Policy::default()
        };
        Ok(Self {
            server: ServerConfig::default(),
            http: HttpSettings::default(),
            collections: vec![CollectionConfig {
                name: "demo".into(),
                source: SourceConfig::Demo { ttl },
                policy,
                prefetch: true,
                required: true,
            }],
            store: None,
            admin: Some(AdminConfig::default()),
        })
    }
}

/// toml errors are multi-line with a source excerpt; keep logs and exit messages
/// on one line.
fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.contains(" | "))
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
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
struct RawAdmin {
    enabled: Option<bool>,
    listen: Option<String>,
}

impl RawAdmin {
    fn validate(self) -> Result<Option<AdminConfig>, ConfigError> {
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
struct RawStore {
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
struct RawServer {
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
struct RawHttp {
    connect_timeout: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
    max_response_bytes: Option<usize>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCollection {
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

fn yes() -> bool {
    true
}

/// Source kinds, by the name used in `kind`.
const SOURCE_KINDS: &[&str] = &[
    "demo",
    "oauth2_client_credentials",
    "oauth2_refresh_token",
    "overdrive",
    "http_json",
];

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawClientAuth {
    Basic,
    Body,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth {
    /// Present so that `deny_unknown_fields` accepts it; dispatch reads it.
    #[expect(dead_code, reason = "read by dispatch")]
    kind: String,
    token_url: String,
    client_id: String,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    /// Only for `oauth2_refresh_token` (checked in dispatch).
    refresh_token_env: Option<String>,
    refresh_token_file: Option<PathBuf>,
    scope: Option<String>,
    audience: Option<String>,
    client_auth: Option<RawClientAuth>,
    default_ttl: Option<HumanDuration>,
}

/// A string, or an integer written without quotes (`library_id = 4425`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrInt {
    String(String),
    Int(i64),
}

impl StringOrInt {
    fn into_string(self) -> String {
        match self {
            Self::String(s) => s,
            Self::Int(i) => i.to_string(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverDrive {
    /// Present so that `deny_unknown_fields` accepts it; dispatch reads it.
    #[expect(dead_code, reason = "read by dispatch")]
    kind: String,
    oauth: String,
    api_base: Option<String>,
    library_id: StringOrInt,
    advantage_account_id: Option<StringOrInt>,
}

/// A header or form value: a literal string, or `{ env = "VAR" }` /
/// `{ file = "/path" }` for a secret.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawValue {
    Literal(String),
    Ref(RawRef),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRef {
    env: Option<String>,
    file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawExpiresFormat {
    Seconds,
    EpochSeconds,
    Rfc3339,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpJson {
    /// Present so that `deny_unknown_fields` accepts it; dispatch reads it.
    #[expect(dead_code, reason = "read by dispatch")]
    kind: String,
    method: Option<String>,
    url: String,
    #[serde(default)]
    headers: BTreeMap<String, RawValue>,
    form: Option<BTreeMap<String, RawValue>>,
    json: Option<toml::Value>,
    bearer_from: Option<String>,
    token_pointer: Option<String>,
    expires_pointer: Option<String>,
    expires_format: Option<RawExpiresFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDemo {
    /// Present so that `deny_unknown_fields` accepts it; dispatch reads it.
    #[expect(dead_code, reason = "read by dispatch")]
    kind: String,
    ttl: Option<HumanDuration>,
}

/// Deserializes `table` as `T`, reporting errors under `prefix`.
fn deserialize_at<T: serde::de::DeserializeOwned>(
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
struct RawPolicy {
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
struct HumanDuration(Duration);

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

fn check_positive(field: &str, d: Duration, min: Duration) -> Result<(), ConfigError> {
    if d < min {
        return Err(ConfigError::new(
            field,
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    Ok(())
}

fn check_fraction(field: &str, v: f64, lo: f64, hi: f64) -> Result<(), ConfigError> {
    if !(v.is_finite() && v >= lo && v <= hi) {
        return Err(ConfigError::new(
            field,
            format!("must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(())
}

fn check_range(field: &str, v: usize, lo: usize, hi: usize) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::new(
            field,
            format!("must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(())
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
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
fn check_dependencies(collections: &[CollectionConfig]) -> Result<(), ConfigError> {
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
    fn validate(self) -> Result<ServerConfig, ConfigError> {
        let d = ServerConfig::default();
        let listen = match self.listen {
            Some(s) => s
                .parse::<ListenAddr>()
                .map_err(|e| ConfigError::new("server.listen", e))?,
            None => d.listen,
        };
        let pick = |v: Option<HumanDuration>, default: Duration| v.map_or(default, |h| h.0);
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
    fn validate(self, name: String) -> Result<CollectionConfig, ConfigError> {
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
        let source = match kind.as_str() {
            "demo" => {
                let RawDemo { ttl, .. } = deserialize_at(self.source, &at)?;
                let ttl = ttl.map_or(Duration::from_secs(30), |h| h.0);
                check_positive(&field("source.ttl"), ttl, Duration::from_millis(100))?;
                SourceConfig::Demo { ttl }
            }
            "oauth2_client_credentials" | "oauth2_refresh_token" => {
                let raw: RawOAuth = deserialize_at(self.source, &at)?;
                SourceConfig::OAuth(raw.validate(&at, kind == "oauth2_refresh_token")?)
            }
            "overdrive" => {
                let raw: RawOverDrive = deserialize_at(self.source, &at)?;
                SourceConfig::OverDrive(raw.validate(&at)?)
            }
            "http_json" => {
                let raw: RawHttpJson = deserialize_at(self.source, &at)?;
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
    fn validate(self) -> Result<HttpSettings, ConfigError> {
        let d = HttpSettings::default();
        let pick = |v: Option<HumanDuration>, default: Duration| v.map_or(default, |h| h.0);
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
struct RawStoreOnly {
    store: Option<RawStore>,
}

/// Reads a config file's `[store]` section only (`None` when absent): the
/// rest of the file must be TOML but is neither checked nor resolved, so
/// collections' secrets are not needed. Errors name the field, as
/// [`Config::load`]'s do.
pub fn load_store(path: &Path) -> Result<Option<PgSettings>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("config", format!("cannot read {}: {e}", path.display())))?;
    parse_store(&text)
}

/// TOML text into a raw config type; an error names the field it is about.
fn deserialize<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
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

/// [`load_store`] on config text.
pub fn parse_store(text: &str) -> Result<Option<PgSettings>, ConfigError> {
    let raw: RawStoreOnly = deserialize(text)?;
    raw.store.map(RawStore::validate).transpose()
}

impl RawStore {
    fn validate(self) -> Result<PgSettings, ConfigError> {
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
        let pick = |v: Option<HumanDuration>, default: Duration| v.map_or(default, |h| h.0);
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

/// Reads a secret given by reference: `{name}_env` (an environment variable)
/// or `{name}_file` (a file; surrounding whitespace is trimmed). Read once,
/// at load. Errors name the field and the variable or path, never the value.
fn secret_ref(
    prefix: &str,
    name: &str,
    env: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    read_secret(prefix, name, "_", env, file)
}

/// Like [`secret_ref`] for the `{ env = "..." }` / `{ file = "..." }` form,
/// whose fields are `name.env` and `name.file`.
fn inline_secret_ref(field: &str, r: RawRef) -> Result<Secret, ConfigError> {
    let (prefix, name) = field.rsplit_once('.').unwrap_or(("", field));
    read_secret(prefix, name, ".", r.env, r.file)?.ok_or_else(|| {
        ConfigError::new(
            field,
            "give a string, or { env = \"VAR\" } or { file = \"/path\" }",
        )
    })
}

fn read_secret(
    prefix: &str,
    name: &str,
    sep: &str,
    env: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    let field = |suffix: &str| format!("{prefix}.{name}{sep}{suffix}");
    let value = match (env, file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                field("env"),
                format!("set only one of {name}{sep}env and {name}{sep}file"),
            ));
        }
        (None, None) => return Ok(None),
        (Some(var), None) => std::env::var(&var).map_err(|e| {
            ConfigError::new(
                field("env"),
                match e {
                    std::env::VarError::NotPresent => {
                        format!("environment variable {var} is not set")
                    }
                    std::env::VarError::NotUnicode(_) => {
                        format!("environment variable {var} is not valid UTF-8")
                    }
                },
            )
        })?,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map_err(|e| {
                ConfigError::new(
                    field("file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
            .trim()
            .to_owned(),
    };
    if value.trim().is_empty() {
        return Err(ConfigError::new(
            format!("{prefix}.{name}"),
            "the referenced secret is empty",
        ));
    }
    Ok(Some(Secret::new(value)))
}

fn required_secret(
    prefix: &str,
    name: &str,
    env: Option<String>,
    file: Option<PathBuf>,
) -> Result<Secret, ConfigError> {
    secret_ref(prefix, name, env, file)?.ok_or_else(|| {
        ConfigError::new(
            format!("{prefix}.{name}_env"),
            format!(
                "missing; give the {name} by reference: {name}_env (an environment variable) or {name}_file (a file)"
            ),
        )
    })
}

fn http_url(field: &str, s: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(s).map_err(|e| ConfigError::new(field, format!("invalid URL: {e}")))?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(ConfigError::new(
            field,
            "must be an http:// or https:// URL with a host",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            field,
            "must not carry credentials; use the secret fields",
        ));
    }
    Ok(url)
}

fn non_empty(field: &str, s: &str) -> Result<(), ConfigError> {
    if s.trim().is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    Ok(())
}

fn json_pointer(field: &str, p: &str) -> Result<(), ConfigError> {
    if !p.starts_with('/') {
        return Err(ConfigError::new(
            field,
            format!("must be a JSON pointer starting with '/', e.g. \"/access_token\", got {p:?}"),
        ));
    }
    Ok(())
}

impl RawOAuth {
    fn validate(self, at: &str, refresh: bool) -> Result<OAuthSpec, ConfigError> {
        let f = |name: &str| format!("{at}.{name}");
        let token_url = http_url(&f("token_url"), &self.token_url)?;
        non_empty(&f("client_id"), &self.client_id)?;
        let (secret_env, secret_file) = (self.client_secret_env, self.client_secret_file);
        let (client_secret, grant) = if refresh {
            // A public client may have no secret.
            let client_secret = secret_ref(at, "client_secret", secret_env, secret_file)?;
            let seed = required_secret(
                at,
                "refresh_token",
                self.refresh_token_env,
                self.refresh_token_file,
            )?;
            (client_secret, Grant::RefreshToken { seed })
        } else {
            if self.refresh_token_env.is_some() || self.refresh_token_file.is_some() {
                let name = if self.refresh_token_env.is_some() {
                    "refresh_token_env"
                } else {
                    "refresh_token_file"
                };
                return Err(ConfigError::new(
                    f(name),
                    "only for kind = \"oauth2_refresh_token\"",
                ));
            }
            let client_secret = required_secret(at, "client_secret", secret_env, secret_file)?;
            (Some(client_secret), Grant::ClientCredentials)
        };
        if let Some(scope) = &self.scope {
            non_empty(&f("scope"), scope)?;
        }
        if let Some(audience) = &self.audience {
            non_empty(&f("audience"), audience)?;
        }
        let client_auth = match self.client_auth {
            None | Some(RawClientAuth::Basic) => ClientAuth::Basic,
            Some(RawClientAuth::Body) => ClientAuth::Body,
        };
        let default_ttl = self.default_ttl.map_or(Duration::from_secs(3600), |h| h.0);
        check_positive(&f("default_ttl"), default_ttl, Duration::from_secs(1))?;
        Ok(OAuthSpec {
            token_url,
            client_id: self.client_id,
            client_secret,
            client_auth,
            scope: self.scope,
            audience: self.audience,
            default_ttl,
            grant,
        })
    }
}

impl RawOverDrive {
    fn validate(self, at: &str) -> Result<OverDriveSpec, ConfigError> {
        let f = |name: &str| format!("{at}.{name}");
        let api_base = http_url(
            &f("api_base"),
            self.api_base
                .as_deref()
                .unwrap_or("https://api.overdrive.com"),
        )?;
        let library_id = self.library_id.into_string();
        non_empty(&f("library_id"), &library_id)?;
        let advantage_account_id = self.advantage_account_id.map(StringOrInt::into_string);
        if let Some(id) = &advantage_account_id {
            non_empty(&f("advantage_account_id"), id)?;
        }
        validate_name(&self.oauth)
            .map_err(|r| ConfigError::new(f("oauth"), format!("collection name {r}")))?;
        Ok(OverDriveSpec {
            oauth: self.oauth,
            api_base,
            library_id,
            advantage_account_id,
        })
    }
}

impl RawValue {
    fn resolve(self, field: &str) -> Result<ValueSpec, ConfigError> {
        match self {
            Self::Literal(s) => Ok(ValueSpec::Literal(s)),
            Self::Ref(r) => Ok(ValueSpec::Secret(inline_secret_ref(field, r)?)),
        }
    }
}

/// A TOML value as a JSON body; a table that is exactly `{ env = "..." }` or
/// `{ file = "..." }` is a secret by reference.
fn json_spec(field: &str, v: toml::Value) -> Result<JsonSpec, ConfigError> {
    Ok(match v {
        toml::Value::String(s) => JsonSpec::Plain(serde_json::Value::String(s)),
        toml::Value::Integer(i) => JsonSpec::Plain(i.into()),
        toml::Value::Float(x) => JsonSpec::Plain(
            serde_json::Number::from_f64(x)
                .map(serde_json::Value::Number)
                .ok_or_else(|| ConfigError::new(field, "not a finite number"))?,
        ),
        toml::Value::Boolean(b) => JsonSpec::Plain(b.into()),
        toml::Value::Datetime(d) => JsonSpec::Plain(serde_json::Value::String(d.to_string())),
        toml::Value::Array(items) => JsonSpec::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| json_spec(&format!("{field}[{i}]"), v))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(t) => {
            let is_ref = t.len() == 1 && (t.contains_key("env") || t.contains_key("file"));
            if is_ref {
                let value: RawRef = deserialize_at(t, field)?;
                JsonSpec::Secret(inline_secret_ref(field, value)?)
            } else {
                JsonSpec::Object(
                    t.into_iter()
                        .map(|(k, v)| {
                            let spec = json_spec(&format!("{field}.{k}"), v)?;
                            Ok((k, spec))
                        })
                        .collect::<Result<_, ConfigError>>()?,
                )
            }
        }
    })
}

impl RawHttpJson {
    fn validate(self, at: &str) -> Result<HttpJsonSpec, ConfigError> {
        let f = |name: &str| format!("{at}.{name}");
        let url = http_url(&f("url"), &self.url)?;
        let body = match (self.form, self.json) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(f("json"), "set only one of form and json"));
            }
            (Some(form), None) => Body::Form(
                form.into_iter()
                    .map(|(k, v)| {
                        let spec = v.resolve(&format!("{at}.form.{k}"))?;
                        Ok((k, spec))
                    })
                    .collect::<Result<_, ConfigError>>()?,
            ),
            (None, Some(json)) => Body::Json(json_spec(&f("json"), json)?),
            (None, None) => Body::None,
        };
        let method = match self.method {
            Some(m) => reqwest::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| ConfigError::new(f("method"), format!("invalid HTTP method {m:?}")))?,
            None if body == Body::None => reqwest::Method::GET,
            None => reqwest::Method::POST,
        };
        let mut headers = Vec::new();
        for (name, value) in self.headers {
            let field = format!("{at}.headers.{name}");
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ConfigError::new(&field, "invalid header name"))?;
            let value = value.resolve(&field)?;
            if HeaderValue::from_str(value.expose()).is_err() {
                return Err(ConfigError::new(
                    &field,
                    "value is not valid in an HTTP header",
                ));
            }
            headers.push((header, value));
        }
        if let Some(parent) = &self.bearer_from {
            validate_name(parent)
                .map_err(|r| ConfigError::new(f("bearer_from"), format!("collection name {r}")))?;
        }
        let token_pointer = self
            .token_pointer
            .unwrap_or_else(|| "/access_token".to_owned());
        json_pointer(&f("token_pointer"), &token_pointer)?;
        if let Some(p) = &self.expires_pointer {
            json_pointer(&f("expires_pointer"), p)?;
        } else if self.expires_format.is_some() {
            return Err(ConfigError::new(
                f("expires_format"),
                "needs expires_pointer",
            ));
        }
        let expires_format = match self.expires_format {
            None | Some(RawExpiresFormat::Seconds) => ExpiresFormat::SecondsFromNow,
            Some(RawExpiresFormat::EpochSeconds) => ExpiresFormat::EpochSeconds,
            Some(RawExpiresFormat::Rfc3339) => ExpiresFormat::Rfc3339,
        };
        Ok(HttpJsonSpec {
            method,
            url,
            headers,
            body,
            bearer_from: self.bearer_from,
            token_pointer,
            expires_pointer: self.expires_pointer,
            expires_format,
        })
    }
}

impl RawPolicy {
    fn validate(self, prefix: &str) -> Result<Policy, ConfigError> {
        let d = Policy::default();
        let pick = |v: Option<HumanDuration>, default: Duration| v.map_or(default, |h| h.0);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse("[collections.demo]\nsource = { kind = \"demo\" }\n").unwrap();
        assert_eq!(c.collections.len(), 1);
        assert_eq!(
            c.collections[0].source,
            SourceConfig::Demo {
                ttl: Duration::from_secs(30)
            }
        );
        assert!(c.collections[0].prefetch);
        assert_eq!(c.collections[0].policy, Policy::default());
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:50051");
    }

    fn err(text: &str) -> ConfigError {
        Config::parse(text).unwrap_err()
    }

    #[test]
    fn admin_listener_and_required_collections() {
        let demo = "[collections.a]\nsource = { kind = \"demo\" }\n";
        let c = Config::parse(demo).unwrap();
        assert_eq!(c.admin, Some(AdminConfig::default()));
        assert_eq!(c.admin.unwrap().listen.to_string(), "127.0.0.1:9464");
        assert!(!c.collections[0].required);
        let c = Config::parse(&format!("[admin]\nlisten = \"0.0.0.0:9500\"\n{demo}")).unwrap();
        assert_eq!(c.admin.unwrap().listen.to_string(), "0.0.0.0:9500");
        let c = Config::parse(&format!("[admin]\nenabled = false\n{demo}")).unwrap();
        assert_eq!(c.admin, None);
        let e = err(&format!("[admin]\nlisten = \"unix:/x.sock\"\n{demo}"));
        assert_eq!(e.field, "admin.listen", "{e}");
        let e = err(&format!("[admin]\nport = 1\n{demo}"));
        assert_eq!(e.field, "admin.port", "{e}");
        let c = Config::parse("[collections.a]\nrequired = true\nsource = { kind = \"demo\" }\n")
            .unwrap();
        assert!(c.collections[0].required);
        let e = err(
            "[collections.a]\nrequired = true\nprefetch = false\nsource = { kind = \"demo\" }\n",
        );
        assert_eq!(e.field, "collections.a.required", "{e}");
        // The demo of `serve --dev` is required: health waits for its token.
        assert!(Config::dev(Duration::from_secs(30)).unwrap().collections[0].required);
    }

    #[test]
    fn worker_threads_and_shutdown_delay_are_bounded() {
        let demo = "[collections.a]\nsource = { kind = \"demo\" }\n";
        let c = Config::parse(demo).unwrap();
        assert_eq!(c.server.worker_threads, 2);
        assert_eq!(c.server.shutdown_delay, Duration::ZERO);
        let c = Config::parse(&format!(
            "[server]\nworker_threads = 64\nshutdown_delay = \"5m\"\n{demo}"
        ))
        .unwrap();
        assert_eq!(c.server.worker_threads, 64);
        assert_eq!(c.server.shutdown_delay, Duration::from_secs(300));
        for n in [0, 65] {
            let e = err(&format!("[server]\nworker_threads = {n}\n{demo}"));
            assert_eq!(e.field, "server.worker_threads", "{e}");
            assert!(e.reason.contains("between 1 and 64"), "{e}");
        }
        let e = err(&format!("[server]\nshutdown_delay = \"301s\"\n{demo}"));
        assert_eq!(e.field, "server.shutdown_delay", "{e}");
        assert!(e.reason.contains("at most 5m"), "{e}");
    }

    #[test]
    fn the_store_section_loads_without_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let url = secret_file(&dir, "url", "postgres://u:pw@127.0.0.1:5432/db");
        // A collection whose secret variable is unset, and an unknown field
        // elsewhere: neither matters to the store section alone.
        let text = format!(
            "[store]\ndatabase_url_file = \"{url}\"\npool_size = 3\n[server]\nnonsense = 1\n\
             [collections.o]\nsource = {{ kind = \"oauth2_client_credentials\", token_url = \"https://x.example/t\", \
             client_id = \"i\", client_secret_env = \"TB_TEST_SURELY_UNSET_SECRET\" }}\n"
        );
        assert!(Config::parse(&text).is_err());
        let store = parse_store(&text).unwrap().unwrap();
        assert_eq!(store.pool_size, 3);
        assert!(parse_store("[collections.a]\n").unwrap().is_none());
        let e = parse_store(&format!(
            "[store]\ndatabase_url_file = \"{url}\"\npool_size = 0\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "store.pool_size", "{e}");
        let e = parse_store(&format!(
            "[store]\ndatabase_url_file = \"{url}\"\nconnect_timeout = \"5s\"\nstartup_timeout = \"2s\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "store.startup_timeout", "{e}");
        assert_eq!(store.startup_timeout, Duration::from_secs(20));
        let e = parse_store("[store]\nbogus = 1\n").unwrap_err();
        assert_eq!(e.field, "store.bogus", "{e}");
        let e = parse_store("[store]\n").unwrap_err();
        assert_eq!(e.field, "store.database_url_env", "{e}");
        assert_eq!(parse_store("not toml").unwrap_err().field, "config");
    }

    #[test]
    fn errors_name_the_field() {
        let e = err("[collections.demo]\nsource = { kind = \"demo\", ttl = \"5x\" }\n");
        assert_eq!(e.field, "collections.demo.source.ttl", "{e}");
        let e = err(
            "[collections.demo]\nsource = { kind = \"demo\" }\n[collections.demo.policy]\nrefresh_fractio = 0.5\n",
        );
        assert_eq!(e.field, "collections.demo.policy.refresh_fractio", "{e}");
        assert!(e.reason.contains("unknown field"), "{e}");
        let e = err(
            "[collections.demo]\nsource = { kind = \"demo\" }\n[collections.demo.policy]\nrefresh_fraction = 1.5\n",
        );
        assert_eq!(e.field, "collections.demo.policy.refresh_fraction");
        let e = err("[collections.\"bad name\"]\nsource = { kind = \"demo\" }\n");
        assert!(e.field.starts_with("collections."), "{e}");
        let e = err("[collections.x]\nsource = { kind = \"nope\" }\n");
        assert_eq!(e.field, "collections.x.source.kind", "{e}");
        let e = err("[collections.x]\nsource = { kind = \"demo\", secret = \"s\" }\n");
        assert_eq!(e.field, "collections.x.source.secret", "{e}");
        assert!(e.reason.contains("unknown field `secret`"), "{e}");
        let e = err(
            "[server]\nlisten = \"0.0.0.0:x\"\n[collections.x]\nsource = { kind = \"demo\" }\n",
        );
        assert_eq!(e.field, "server.listen", "{e}");
        let e = err("[server]\n");
        assert_eq!(e.field, "collections");
        let e = err("this is not toml");
        assert_eq!(e.field, "config");
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("overdrive-main.v1_x").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"a".repeat(128)).is_ok());
        assert!(validate_name(&"a".repeat(129)).is_err());
    }

    /// A secret file in a temp dir, so no test touches the environment.
    fn secret_file(dir: &tempfile::TempDir, name: &str, value: &str) -> String {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{value}\n")).unwrap();
        p.display().to_string()
    }

    #[test]
    fn every_source_kind_parses() {
        let dir = tempfile::tempdir().unwrap();
        let secret = secret_file(&dir, "secret", "s3cret");
        let rt = secret_file(&dir, "rt", "seed-rt");
        let text = format!(
            r#"
[http]
timeout = "3s"
max_response_bytes = 4096

[collections.od-oauth.source]
kind = "oauth2_client_credentials"
token_url = "https://login.example.com/token"
client_id = "id"
client_secret_file = "{secret}"
scope = "a b"
client_auth = "body"

[collections.mail.source]
kind = "oauth2_refresh_token"
token_url = "https://login.example.com/token"
client_id = "public"
refresh_token_file = "{rt}"

[collections.od-main.source]
kind = "overdrive"
oauth = "od-oauth"
library_id = 4425
advantage_account_id = "12"

[collections.api.source]
kind = "http_json"
url = "https://api.example.com/session"
headers = {{ "X-Api-Key" = {{ file = "{secret}" }}, Accept = "application/json" }}
json = {{ user = "svc", password = {{ file = "{secret}" }}, opts = {{ ttl = 60 }} }}
bearer_from = "mail"
token_pointer = "/data/token"
expires_pointer = "/data/expires_at"
expires_format = "rfc3339"
"#
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.http.timeout, Duration::from_secs(3));
        assert_eq!(c.http.max_response_bytes, 4096);
        let by = |n: &str| &c.collections.iter().find(|c| c.name == n).unwrap().source;
        let SourceConfig::OAuth(o) = by("od-oauth") else {
            panic!()
        };
        assert_eq!(o.client_secret.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(o.client_auth, ClientAuth::Body);
        assert_eq!(o.grant, Grant::ClientCredentials);
        let SourceConfig::OAuth(m) = by("mail") else {
            panic!()
        };
        assert!(m.client_secret.is_none());
        assert_eq!(
            m.grant,
            Grant::RefreshToken {
                seed: Secret::new("seed-rt")
            }
        );
        let SourceConfig::OverDrive(od) = by("od-main") else {
            panic!()
        };
        assert_eq!(od.library_id, "4425");
        assert_eq!(od.api_base.as_str(), "https://api.overdrive.com/");
        let SourceConfig::HttpJson(h) = by("api") else {
            panic!()
        };
        assert_eq!(h.method, reqwest::Method::POST);
        assert_eq!(h.expires_format, ExpiresFormat::Rfc3339);
        let Body::Json(JsonSpec::Object(fields)) = &h.body else {
            panic!()
        };
        assert!(
            fields
                .iter()
                .any(|(k, v)| k == "password" && matches!(v, JsonSpec::Secret(_)))
        );
        // The config's Debug output never holds a secret.
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!format!("{c:?}").contains("seed-rt"));
    }

    #[test]
    fn secrets_are_by_reference_and_must_resolve() {
        let base = |extra: &str| {
            format!(
                "[collections.o.source]\nkind = \"oauth2_client_credentials\"\ntoken_url = \"https://x.example/t\"\nclient_id = \"id\"\n{extra}"
            )
        };
        let e = err(&base(""));
        assert_eq!(e.field, "collections.o.source.client_secret_env", "{e}");
        let e = err(&base("client_secret = \"inline\"\n"));
        assert_eq!(e.field, "collections.o.source.client_secret", "{e}");
        assert!(e.reason.contains("unknown field"), "{e}");
        let e = err(&base(
            "client_secret_env = \"TOKEN_BROKER_TEST_SURELY_UNSET\"\n",
        ));
        assert_eq!(e.field, "collections.o.source.client_secret_env", "{e}");
        assert!(
            e.reason
                .contains("TOKEN_BROKER_TEST_SURELY_UNSET is not set"),
            "{e}"
        );
        let e = err(&base("client_secret_file = \"/nonexistent/secret\"\n"));
        assert_eq!(e.field, "collections.o.source.client_secret_file", "{e}");
        let e = err(&base(
            "client_secret_file = \"/x\"\nclient_secret_env = \"Y\"\n",
        ));
        assert!(e.reason.contains("only one"), "{e}");
        let e =
            err(&base("client_secret_env = \"PATH\"\n").replace("https://x.example/t", "ftp://x"));
        assert_eq!(e.field, "collections.o.source.token_url", "{e}");
    }

    #[test]
    fn dependencies_must_exist_and_not_cycle() {
        let od = |name: &str, oauth: &str| {
            format!(
                "[collections.{name}.source]\nkind = \"overdrive\"\noauth = \"{oauth}\"\nlibrary_id = \"1\"\n"
            )
        };
        let e = err(&od("a", "nope"));
        assert_eq!(e.field, "collections.a.source.oauth", "{e}");
        assert!(e.reason.contains("unknown collection \"nope\""), "{e}");
        let e = err(&od("a", "a"));
        assert_eq!(e.field, "collections.a.source.oauth", "{e}");
        assert!(e.reason.contains("a -> a"), "{e}");
        let json = "[collections.c.source]\nkind = \"http_json\"\nurl = \"https://x.example/\"\nbearer_from = \"a\"\n";
        let e = err(&format!("{}{}{json}", od("a", "b"), od("b", "c")));
        assert!(
            e.reason.contains("dependency cycle: a -> b -> c -> a"),
            "{e}"
        );
        // A chain without a cycle is fine.
        let ok = format!("{}[collections.b.source]\nkind = \"demo\"\n", od("a", "b"));
        assert!(Config::parse(&ok).is_ok());
    }

    #[test]
    fn http_section_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let bad = secret_file(&dir, "ca.pem", "not a certificate");
        let demo = "[collections.d.source]\nkind = \"demo\"\n";
        let e = err(&format!("[http]\nca_file = \"{bad}\"\n{demo}"));
        assert_eq!(e.field, "http.ca_file", "{e}");
        let e = err(&format!("[http]\nca_file = \"/nonexistent.pem\"\n{demo}"));
        assert_eq!(e.field, "http.ca_file", "{e}");
        let e = err(&format!("[http]\nmax_response_bytes = 10\n{demo}"));
        assert_eq!(e.field, "http.max_response_bytes", "{e}");
        let e = err(&format!("[http]\nproxy = \"x\"\n{demo}"));
        assert_eq!(e.field, "http.proxy", "{e}");
    }

    #[test]
    fn store_section_is_checked_and_secrets_stay_out_of_errors() {
        let dir = tempfile::tempdir().unwrap();
        let demo = "[collections.d.source]\nkind = \"demo\"\n";
        let password = "pw-4f1c9a77";
        let url = secret_file(
            &dir,
            "url",
            &format!("postgres://tb:{password}@db.internal:5432/tokens"),
        );
        let key = format!(
            "k2:{}\nk1:{}",
            "A".repeat(43) + "=",
            "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
        );
        let key_file = secret_file(&dir, "key", &key);
        let ok = Config::parse(&format!(
            "[store]\ndatabase_url_file = \"{url}\"\nencryption_key_file = \"{key_file}\"\npool_size = 3\n{demo}"
        ))
        .unwrap();
        let store = ok.store.as_ref().unwrap();
        assert_eq!(store.pool_size, 3);
        assert_eq!(store.keyring.current_id(), Some("k2"));
        assert!(store.migrate);
        let debug = format!("{ok:?}");
        assert!(
            !debug.contains(password) && !debug.contains(&"A".repeat(43)),
            "{debug}"
        );
        assert!(Config::parse(demo).unwrap().store.is_none());

        let e = err(&format!("[store]\npool_size = 2\n{demo}"));
        assert_eq!(e.field, "store.database_url_env", "{e}");
        let not_pg = secret_file(&dir, "bad-url", &format!("mysql://root:{password}@x/db"));
        let e = err(&format!(
            "[store]\ndatabase_url_file = \"{not_pg}\"\n{demo}"
        ));
        assert_eq!(e.field, "store.database_url", "{e}");
        assert!(!e.to_string().contains(password), "{e}");
        // The listener's own URL: optional, checked like the pool's.
        assert!(store.listener_url.is_none());
        let direct = secret_file(
            &dir,
            "direct",
            &format!("postgres://u:{password}@pg:5432/db"),
        );
        let ok = Config::parse(&format!(
            "[store]\ndatabase_url_file = \"{url}\"\nlistener_url_file = \"{direct}\"\n{demo}"
        ))
        .unwrap();
        let listener = ok.store.as_ref().unwrap().listener_url.as_ref().unwrap();
        assert!(listener.expose().ends_with("@pg:5432/db"));
        let e = err(&format!(
            "[store]\ndatabase_url_file = \"{url}\"\nlistener_url_file = \"{not_pg}\"\n{demo}"
        ));
        assert_eq!(e.field, "store.listener_url", "{e}");
        assert!(!e.to_string().contains(password), "{e}");
        let short = secret_file(&dir, "short-key", "k1:AAAA");
        let e = err(&format!(
            "[store]\ndatabase_url_file = \"{url}\"\nencryption_key_file = \"{short}\"\n{demo}"
        ));
        assert_eq!(e.field, "store.encryption_key_file", "{e}");
        assert!(e.reason.contains("32 bytes"), "{e}");
        let e = err(&format!(
            "[store]\ndatabase_url_file = \"{url}\"\npool_size = 0\n{demo}"
        ));
        assert_eq!(e.field, "store.pool_size", "{e}");
        let e = err(&format!(
            "[store]\ndatabase_url_file = \"{url}\"\nheartbeat_interval = \"1ms\"\n{demo}"
        ));
        assert_eq!(e.field, "store.heartbeat_interval", "{e}");
        let e = err(&format!("[store]\ndatabase_url = \"postgres://x\"\n{demo}"));
        assert_eq!(
            e.field, "store.database_url",
            "inline URLs are refused: {e}"
        );
    }
}
