//! The `source` table of a collection: one raw (serde) struct per `kind`,
//! dispatched on `kind` by hand (so errors keep their exact path), each
//! validated into the source spec the source module takes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::grpc::remote::{BrokerSpec, ClientTls, RemoteAddr};
use crate::source::{
    Body, ClientAuth, ExpiresFormat, Grant, HttpJsonSpec, JsonSpec, OAuthSpec, OverDriveSpec,
    ValueSpec,
};

use super::checks::check_positive;
use super::raw::{HumanDuration, deserialize_at};
use super::secrets::{inline_secret_ref, required_secret, secret_ref};
use super::{CollectionName, ConfigError};

/// Source kinds, by the name used in `kind`.
pub(super) const SOURCE_KINDS: &[&str] = &[
    "demo",
    "oauth2_client_credentials",
    "oauth2_refresh_token",
    "overdrive",
    "http_json",
    "broker",
];

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawClientAuth {
    Basic,
    Body,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth {
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
pub(super) enum StringOrInt {
    String(String),
    Int(i64),
}

impl StringOrInt {
    pub(super) fn into_string(self) -> String {
        match self {
            Self::String(s) => s,
            Self::Int(i) => i.to_string(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOverDrive {
    oauth: String,
    api_base: Option<String>,
    library_id: StringOrInt,
    advantage_account_id: Option<StringOrInt>,
}

/// A header or form value: a literal string, or `{ env = "VAR" }` /
/// `{ file = "/path" }` for a secret.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawValue {
    Literal(String),
    Ref(RawRef),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRef {
    pub(super) env: Option<String>,
    pub(super) file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawExpiresFormat {
    Seconds,
    EpochSeconds,
    Rfc3339,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttpJson {
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

/// `kind = "broker"`: another token-broker, followed over its gRPC API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroker {
    addrs: Vec<String>,
    collection: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    server_name: Option<String>,
    connect_timeout: Option<HumanDuration>,
    /// Allows `http://` to a host that is not loopback (tokens in clear).
    #[serde(default)]
    insecure: bool,
}

impl RawBroker {
    pub(super) fn validate(self, at: &str, name: &str) -> Result<BrokerSpec, ConfigError> {
        let f = |n: &str| format!("{at}.{n}");
        if self.addrs.is_empty() {
            return Err(ConfigError::new(
                f("addrs"),
                "needs at least one address (https://host:port, http://host:port or unix:/path)",
            ));
        }
        let mut addrs = Vec::with_capacity(self.addrs.len());
        for (i, a) in self.addrs.iter().enumerate() {
            let field = format!("{at}.addrs[{i}]");
            let addr = remote_addr(&field, a)?;
            if let RemoteAddr::Http(u) = &addr
                && !self.insecure
                && !loopback(u)
            {
                return Err(ConfigError::new(
                    field,
                    "http:// to a host that is not loopback sends tokens in clear: use https:// \
                     (with ca_file), or set insecure = true",
                ));
            }
            addrs.push(addr);
        }
        let collection = self.collection.unwrap_or_else(|| name.to_owned());
        CollectionName::parse(&collection)
            .map_err(|r| ConfigError::new(f("collection"), format!("collection name {r}")))?;
        let https = addrs.iter().any(|a| matches!(a, RemoteAddr::Https(_)));
        for (field, path) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if path.is_some() && !https {
                return Err(ConfigError::new(
                    f(field),
                    "only used with an https:// address",
                ));
            }
        }
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (Some(_), None) => {
                return Err(ConfigError::new(f("key_file"), "needs cert_file's key"));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    f("cert_file"),
                    "needs key_file's certificate",
                ));
            }
            (None, None) => None,
        };
        match &self.ca_file {
            // Read and checked as a connection will use them.
            Some(ca) => crate::tls::check_client_files(ca, identity)
                .map_err(|e| ConfigError::new(f(e.field), e.reason))?,
            None if https => {
                return Err(ConfigError::new(
                    f("ca_file"),
                    "an https:// address needs the CA bundle that signed the remote's certificate",
                ));
            }
            None => {}
        }
        if let Some(n) = &self.server_name {
            non_empty(&f("server_name"), n)?;
        }
        let connect_timeout = self.connect_timeout.map_or(Duration::from_secs(2), |h| h.0);
        check_positive(
            &f("connect_timeout"),
            connect_timeout,
            Duration::from_millis(10),
        )?;
        Ok(BrokerSpec {
            addrs,
            collection,
            tls: ClientTls {
                ca_file: self.ca_file,
                cert_file: self.cert_file,
                key_file: self.key_file,
                server_name: self.server_name,
            },
            connect_timeout,
        })
    }
}

/// Whether an `http://` address names this host's loopback.
fn loopback(url: &str) -> bool {
    Url::parse(url).ok().is_some_and(|u| match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    })
}

/// A remote broker's address: `https://host:port`, `http://host:port` or
/// `unix:/path`.
fn remote_addr(field: &str, s: &str) -> Result<RemoteAddr, ConfigError> {
    if let Some(path) = s.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(ConfigError::new(
                field,
                "unix: needs an absolute socket path",
            ));
        }
        return Ok(RemoteAddr::Unix(PathBuf::from(path)));
    }
    let url =
        Url::parse(s).map_err(|e| ConfigError::new(field, format!("invalid address: {e}")))?;
    let plain = match url.scheme() {
        "https" => false,
        "http" => true,
        _ => {
            return Err(ConfigError::new(
                field,
                "must be https://host:port, http://host:port or unix:/path",
            ));
        }
    };
    if url.host_str().is_none() || url.port_or_known_default().is_none() {
        return Err(ConfigError::new(field, "needs a host"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || !url.username().is_empty() {
        return Err(ConfigError::new(field, "must be only scheme://host:port"));
    }
    let s = s.trim_end_matches('/').to_owned();
    Ok(if plain {
        RemoteAddr::Http(s)
    } else {
        RemoteAddr::Https(s)
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDemo {
    pub(super) ttl: Option<HumanDuration>,
}

pub(super) fn http_url(field: &str, s: &str) -> Result<Url, ConfigError> {
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

pub(super) fn non_empty(field: &str, s: &str) -> Result<(), ConfigError> {
    if s.trim().is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    Ok(())
}

pub(super) fn json_pointer(field: &str, p: &str) -> Result<(), ConfigError> {
    if !p.starts_with('/') {
        return Err(ConfigError::new(
            field,
            format!("must be a JSON pointer starting with '/', e.g. \"/access_token\", got {p:?}"),
        ));
    }
    Ok(())
}

impl RawOAuth {
    pub(super) fn validate(self, at: &str, refresh: bool) -> Result<OAuthSpec, ConfigError> {
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
    pub(super) fn validate(self, at: &str) -> Result<OverDriveSpec, ConfigError> {
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
        CollectionName::parse(&self.oauth)
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
    pub(super) fn resolve(self, field: &str) -> Result<ValueSpec, ConfigError> {
        match self {
            Self::Literal(s) => Ok(ValueSpec::Literal(s)),
            Self::Ref(r) => Ok(ValueSpec::Secret(inline_secret_ref(field, r)?)),
        }
    }
}

/// A TOML value as a JSON body; a table that is exactly `{ env = "..." }` or
/// `{ file = "..." }` is a secret by reference.
pub(super) fn json_spec(field: &str, v: toml::Value) -> Result<JsonSpec, ConfigError> {
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
    pub(super) fn validate(self, at: &str) -> Result<HttpJsonSpec, ConfigError> {
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
            CollectionName::parse(parent)
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
