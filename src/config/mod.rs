//! The configuration: one TOML file, parsed once into typed values.
//!
//! Contract: [`Config::load`] and [`Config::parse`] either return a fully
//! validated config or a [`ConfigError`] naming the offending field (a dotted
//! path such as `collections.demo.policy.refresh_fraction`) and the reason.
//! Unknown fields are errors (typos must not pass silently). Nothing here binds a
//! port or touches the network. Secrets are never written inline: later source
//! kinds take them by reference (`..._env` / `..._file`).
//!
//! Layout: this file holds the typed result (what the rest of the crate
//! reads) and the entry points; `raw.rs` the serde layer and its validation
//! into typed sections (defaults picked, bounds checked); `sources.rs` each
//! source kind's table; `secrets.rs` secrets by reference; `checks.rs` the
//! bounds checks; `tests.rs` the tests.

mod checks;
mod raw;
mod secrets;
mod sources;
#[cfg(test)]
mod tests;

use checks::{check_positive, check_range};
use raw::{RawConfig, RawStore, RawStoreOnly, deserialize};

use std::path::Path;
use std::time::Duration;

use crate::broker::Policy;
use crate::listen::ListenAddr;
use crate::source::http::HttpSettings;
use crate::source::{HttpJsonSpec, OAuthSpec, OverDriveSpec};
use crate::store::PgSettings;
use crate::tls::TlsSettings;

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
    /// `[server.tls]`: serve TLS on the TCP listener.
    pub tls: Option<TlsSettings>,
    /// Allows plain TCP on an address other hosts can reach ([`check_listen`]).
    pub insecure: bool,
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
            tls: None,
            insecure: false,
        }
    }
}

/// Checks that the token API's address fits its transport, naming `field`
/// (`server.listen`, or `--listen` when the flag set it): plain TCP on an
/// address other hosts can reach needs TLS or `insecure = true` (tokens
/// would cross the network in clear), and a Unix socket takes no TLS (its
/// callers are identified by uid and gid).
pub fn check_listen(field: &str, server: &ServerConfig) -> Result<(), ConfigError> {
    match &server.listen {
        ListenAddr::Tcp(a)
            if server.tls.is_none() && !server.insecure && !a.ip().to_canonical().is_loopback() =>
        {
            Err(ConfigError::new(
                field,
                format!(
                    "plain TCP on {a} is reachable from other hosts: configure [server.tls], \
                     listen on loopback or a Unix socket, or set server.insecure = true"
                ),
            ))
        }
        ListenAddr::Unix(_) if server.tls.is_some() => Err(ConfigError::new(
            field,
            "a Unix socket does not take [server.tls] (callers are identified by uid and gid): \
             listen on IP:PORT or remove [server.tls]",
        )),
        _ => Ok(()),
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
    /// The caller identities allowed to read it; `None`: anyone who can
    /// connect. Enforced by the gRPC layer only.
    pub readers: Option<Vec<String>>,
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
    /// Another token-broker, followed over its gRPC API.
    Broker(crate::grpc::remote::BrokerSpec),
}

impl SourceConfig {
    /// The collection this source depends on, and the field that names it.
    fn parent(&self) -> Option<(&str, &'static str)> {
        match self {
            Self::OverDrive(o) => Some((&o.oauth, "oauth")),
            Self::HttpJson(h) => h.bearer_from.as_deref().map(|p| (p, "bearer_from")),
            Self::Demo { .. } | Self::OAuth(_) | Self::Broker(_) => None,
        }
    }
}

/// Longest collection name.
pub const MAX_NAME_LEN: usize = 128;

/// A collection name known to follow the rules (1 to [`MAX_NAME_LEN`]
/// characters of `[A-Za-z0-9._-]`). [`CollectionName::parse`] is the only way
/// to make one and the one place the rules are checked, for names in the
/// config file and in requests alike; it borrows, so a request pays no
/// allocation for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollectionName<'a>(&'a str);

impl<'a> CollectionName<'a> {
    /// Checks `name`; the error says which rule it breaks (never echoing a
    /// long name).
    pub fn parse(name: &'a str) -> Result<Self, String> {
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
        Ok(Self(name))
    }

    pub fn as_str(self) -> &'a str {
        self.0
    }
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
                readers: None,
            }],
            store: None,
            admin: Some(AdminConfig::default()),
        })
    }
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

/// [`load_store`] on config text.
pub fn parse_store(text: &str) -> Result<Option<PgSettings>, ConfigError> {
    let raw: RawStoreOnly = deserialize(text)?;
    raw.store.map(RawStore::validate).transpose()
}
