//! A generic HTTP source for upstreams that are neither OAuth nor OverDrive:
//! one request (method, URL, headers, a form or JSON body, optional bearer
//! token from another collection), the token at a JSON pointer, the expiry at
//! another (seconds from now, epoch seconds or RFC 3339; or none: `max_age`).
//!
//! Contract: secret header and body values are resolved before start-up and
//! live only in [`Secret`]s; a missing or malformed field is `bad_response`;
//! with `bearer_from`, a 401 reports the parent token rejected (compare-and-
//! invalidate) and retries once, as the OverDrive source does.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderName;
use reqwest::{Method, StatusCode, Url};

use super::http::{HttpClient, Response, describe, seconds, string_at};
use super::{BoxFuture, FailureClass, FetchContext, FetchError, Fetched, ParentToken, Source};
use crate::token::Secret;

/// A header or body value: written in the config, or a secret by reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSpec {
    Literal(String),
    Secret(Secret),
}

impl ValueSpec {
    /// The value as sent (a secret's plaintext included).
    pub fn expose(&self) -> &str {
        match self {
            Self::Literal(s) => s,
            Self::Secret(s) => s.expose(),
        }
    }
}

/// A JSON body whose leaves may be secrets.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonSpec {
    /// A JSON value without secrets.
    Plain(serde_json::Value),
    Secret(Secret),
    Object(Vec<(String, JsonSpec)>),
    Array(Vec<JsonSpec>),
}

impl JsonSpec {
    fn render(&self) -> serde_json::Value {
        match self {
            Self::Plain(v) => v.clone(),
            Self::Secret(s) => serde_json::Value::String(s.expose().to_owned()),
            Self::Object(fields) => serde_json::Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.render()))
                    .collect(),
            ),
            Self::Array(items) => {
                serde_json::Value::Array(items.iter().map(Self::render).collect())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    None,
    Form(Vec<(String, ValueSpec)>),
    Json(JsonSpec),
}

/// How the expiry field is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpiresFormat {
    /// A number of seconds from now (like OAuth's `expires_in`).
    #[default]
    SecondsFromNow,
    /// Seconds since the Unix epoch.
    EpochSeconds,
    /// An RFC 3339 timestamp.
    Rfc3339,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpJsonSpec {
    pub method: Method,
    pub url: Url,
    pub headers: Vec<(HeaderName, ValueSpec)>,
    pub body: Body,
    /// Send `Authorization: Bearer` with this collection's token.
    pub bearer_from: Option<String>,
    /// JSON pointer (RFC 6901) to the token, e.g. `/access_token`.
    pub token_pointer: String,
    /// JSON pointer to the expiry; `None`: the token is opaque.
    pub expires_pointer: Option<String>,
    pub expires_format: ExpiresFormat,
}

pub struct HttpJsonSource {
    spec: HttpJsonSpec,
    http: HttpClient,
}

impl HttpJsonSource {
    pub fn new(spec: HttpJsonSpec, http: HttpClient) -> Self {
        Self { spec, http }
    }

    async fn send(&self, bearer: Option<&ParentToken>) -> Result<Response, FetchError> {
        let spec = &self.spec;
        let mut req = self
            .http
            .request(spec.method.clone(), spec.url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        for (name, value) in &spec.headers {
            let mut v = reqwest::header::HeaderValue::from_str(value.expose()).map_err(|_| {
                FetchError::new(
                    FailureClass::Internal,
                    format!("header {name} has a value that is not valid in HTTP"),
                )
            })?;
            if matches!(value, ValueSpec::Secret(_)) {
                v.set_sensitive(true);
            }
            req = req.header(name, v);
        }
        if let Some(parent) = bearer {
            req = req.bearer_auth(parent.value.expose());
        }
        req = match &spec.body {
            Body::None => req,
            Body::Form(fields) => {
                let pairs: Vec<(&str, &str)> = fields
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.expose()))
                    .collect();
                req.form(&pairs)
            }
            Body::Json(json) => req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json.render().to_string()),
        };
        self.http.send(req).await
    }

    fn parse(&self, resp: &Response, now: SystemTime) -> Result<Fetched, FetchError> {
        if !resp.is_success() {
            return Err(resp.status_error(now));
        }
        let doc = resp.json()?;
        let value = string_at(resp, &doc, &self.spec.token_pointer)?;
        let expires_at = match &self.spec.expires_pointer {
            None => None,
            Some(p) => {
                let v = doc
                    .pointer(p)
                    .filter(|v| !v.is_null())
                    .ok_or_else(|| resp.bad(format!("field {p} is missing")))?;
                Some(expiry(v, self.spec.expires_format, now).ok_or_else(|| {
                    resp.bad(format!(
                        "field {p} is not a valid {}",
                        match self.spec.expires_format {
                            ExpiresFormat::SecondsFromNow => "number of seconds",
                            ExpiresFormat::EpochSeconds => "epoch time in seconds",
                            ExpiresFormat::Rfc3339 => "RFC 3339 timestamp",
                        }
                    ))
                })?)
            }
        };
        Ok(Fetched::token(Secret::new(value), expires_at))
    }
}

/// Reads an expiry field; `None` when it is not in the expected format.
fn expiry(v: &serde_json::Value, format: ExpiresFormat, now: SystemTime) -> Option<SystemTime> {
    let secs = |v| seconds(v).filter(|s| *s >= 0.0 && *s < 1e11);
    match format {
        ExpiresFormat::SecondsFromNow => Some(now + Duration::from_secs_f64(secs(v)?)),
        ExpiresFormat::EpochSeconds => {
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs(v)?))
        }
        ExpiresFormat::Rfc3339 => parse_rfc3339(v.as_str()?),
    }
}

/// RFC 3339 with any offset (`Z`, `+02:00`, `-0530`); humantime handles the
/// UTC part.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let t = s.find(['T', 't', ' '])?;
    let (date, time) = (&s[..t], &s[t + 1..]);
    let (clock, offset_secs) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0i64)
    } else {
        let pos = time.rfind(['+', '-'])?;
        let (clock, off) = time.split_at(pos);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let digits: String = off[1..].chars().filter(|c| *c != ':').collect();
        if digits.len() != 4 || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let h: i64 = digits[..2].parse().ok()?;
        let m: i64 = digits[2..].parse().ok()?;
        (clock, sign * (h * 3600 + m * 60))
    };
    let utc = humantime::parse_rfc3339_weak(&format!("{date}T{clock}")).ok()?;
    let shift = Duration::from_secs(offset_secs.unsigned_abs());
    // Local time minus the offset is UTC.
    if offset_secs >= 0 {
        utc.checked_sub(shift)
    } else {
        utc.checked_add(shift)
    }
}

impl Source for HttpJsonSource {
    fn kind(&self) -> &'static str {
        "http_json"
    }

    fn parent(&self) -> Option<&str> {
        self.spec.bearer_from.as_deref()
    }

    fn fetch(&self, ctx: FetchContext) -> BoxFuture<'_, Result<Fetched, FetchError>> {
        Box::pin(async move {
            let Some(parent) = &self.spec.bearer_from else {
                let resp = self.send(None).await?;
                return self.parse(&resp, ctx.now);
            };
            let bearer = ctx.parents.token(parent).await?;
            let resp = self.send(Some(&bearer)).await?;
            let (resp, used) = if resp.status == StatusCode::UNAUTHORIZED {
                let fresh = ctx.parents.reject(parent, bearer.version).await?;
                let again = self.send(Some(&fresh)).await?;
                if again.status == StatusCode::UNAUTHORIZED {
                    return Err(FetchError::new(
                        FailureClass::InvalidCredentials,
                        format!(
                            "{}: HTTP 401 twice: rejected a fresh token of collection {parent:?}",
                            describe(&self.spec.url)
                        ),
                    ));
                }
                (again, fresh.version)
            } else {
                (resp, bearer.version)
            };
            let mut fetched = self.parse(&resp, ctx.now)?;
            fetched.parent_version = Some(used);
            Ok(fetched)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_offsets() {
        let z = parse_rfc3339("2026-11-21T10:00:00Z").unwrap();
        assert_eq!(parse_rfc3339("2026-11-21T12:00:00+02:00"), Some(z));
        assert_eq!(parse_rfc3339("2026-11-21T04:30:00-05:30"), Some(z));
        assert_eq!(
            parse_rfc3339("2026-11-21T10:00:00.5Z"),
            Some(z + Duration::from_millis(500))
        );
        assert_eq!(parse_rfc3339("tomorrow"), None);
        assert_eq!(parse_rfc3339("2026-11-21T10:00:00+2"), None);
    }

    #[test]
    fn expiry_formats() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(
            expiry(&serde_json::json!(60), ExpiresFormat::SecondsFromNow, now),
            Some(now + Duration::from_secs(60))
        );
        assert_eq!(
            expiry(&serde_json::json!("2000"), ExpiresFormat::EpochSeconds, now),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2000))
        );
        assert_eq!(
            expiry(&serde_json::json!(-5), ExpiresFormat::SecondsFromNow, now),
            None
        );
        assert_eq!(
            expiry(&serde_json::json!(true), ExpiresFormat::EpochSeconds, now),
            None
        );
        assert!(
            expiry(
                &serde_json::json!("1970-01-01T00:33:20Z"),
                ExpiresFormat::Rfc3339,
                now
            )
            .is_some()
        );
    }
}
