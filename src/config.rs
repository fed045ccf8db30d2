//! The configuration: one TOML file, parsed once into typed values.
//!
//! Contract: [`Config::load`] and [`Config::parse`] either return a fully
//! validated config or a [`ConfigError`] naming the offending field (a dotted
//! path such as `collections.demo.policy.refresh_fraction`) and the reason.
//! Unknown fields are errors (typos must not pass silently). Nothing here binds a
//! port or touches the network. Secrets are never written inline: later source
//! kinds take them by reference (`..._env` / `..._file`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::broker::Policy;
use crate::listen::ListenAddr;

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
    /// Sorted by name.
    pub collections: Vec<CollectionConfig>,
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
        }
    }
}

#[derive(Debug, Clone)]
pub struct CollectionConfig {
    pub name: String,
    pub source: SourceConfig,
    pub policy: Policy,
    pub prefetch: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// Mints a random token that lives `ttl`.
    Demo { ttl: Duration },
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
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::new("config", format!("invalid TOML: {}", one_line(&e))))?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." || path.is_empty() {
                "config".to_owned()
            } else {
                path
            };
            ConfigError::new(field, one_line(e.inner()))
        })?;
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
            collections: vec![CollectionConfig {
                name: "demo".into(),
                source: SourceConfig::Demo { ttl },
                policy,
                prefetch: true,
            }],
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
    collections: BTreeMap<String, RawCollection>,
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
    policy: RawPolicy,
}

fn yes() -> bool {
    true
}

/// Source kinds, by the name used in `kind`.
const SOURCE_KINDS: &[&str] = &["demo"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDemo {
    #[allow(
        dead_code,
        reason = "read by dispatch; present so deny_unknown_fields accepts it"
    )]
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
        Ok(Config {
            server,
            collections,
        })
    }
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
        let source = match kind.as_str() {
            "demo" => {
                let RawDemo { ttl, .. } = deserialize_at(self.source, &field("source"))?;
                let ttl = ttl.map_or(Duration::from_secs(30), |h| h.0);
                check_positive(&field("source.ttl"), ttl, Duration::from_millis(100))?;
                SourceConfig::Demo { ttl }
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
        Ok(CollectionConfig {
            name,
            source,
            policy,
            prefetch: self.prefetch,
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
}
