//! The one shared outbound HTTP client, and the classification of what comes
//! back into [`FetchError`]s.
//!
//! Contract:
//! - One `reqwest` client (rustls) for every source: connect and total
//!   timeouts, a response size cap (a larger body is an error, never
//!   truncated), `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` from the environment, an
//!   optional extra CA bundle, a `User-Agent` naming this program and version,
//!   and no redirects (a token endpoint that redirects is misconfigured, and
//!   following it could carry credentials elsewhere).
//! - Transient failures (connect, timeout, 5xx, 429) and permanent ones (other
//!   4xx, a body that is not the expected JSON) are told apart here, once.
//!   `Retry-After` (seconds or an HTTP date) becomes the error's minimum delay.
//! - Error details name the upstream by host and path only (never the query
//!   string or user info), the HTTP status and the class: never a secret, a
//!   token or a response body.

use std::time::{Duration, SystemTime};

use tracing::Instrument;

use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};

use super::{FailureClass, FetchError};

/// Settings of the shared client (the `[http]` config section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub connect_timeout: Duration,
    /// Upper bound on one request, from sending it to the last body byte.
    pub timeout: Duration,
    /// Largest response body accepted.
    pub max_response_bytes: usize,
    /// Extra trusted roots (a PEM bundle), in addition to the system's.
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
            max_response_bytes: 1024 * 1024,
            ca_pem: None,
        }
    }
}

/// A `Retry-After` longer than this is read as this: an upstream's typo must
/// not stop refreshes for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

pub const USER_AGENT: &str = concat!(env!("CARGO_PKG_NAME"), "/", env!("CARGO_PKG_VERSION"));

/// The shared client: cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: reqwest::Client,
    max_bytes: usize,
}

/// A response whose body was read in full (within the size cap).
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The upstream as named in errors: host, port and path.
    pub target: String,
}

/// The certificates of a PEM bundle, which must hold at least one (config
/// validation checks with this; the client is built with it).
pub fn parse_ca_bundle(pem: &[u8]) -> Result<Vec<reqwest::Certificate>, String> {
    match reqwest::Certificate::from_pem_bundle(pem) {
        Ok(certs) if certs.is_empty() => Err("contains no PEM certificate".into()),
        Ok(certs) => Ok(certs),
        Err(e) => Err(format!("is not a PEM certificate bundle ({e})")),
    }
}

impl HttpClient {
    pub fn new(settings: &HttpSettings) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &settings.ca_pem {
            let certs = parse_ca_bundle(pem).map_err(|e| anyhow::anyhow!("http.ca_file {e}"))?;
            builder = builder.tls_certs_merge(certs);
        }
        Ok(Self {
            inner: builder.build()?,
            max_bytes: settings.max_response_bytes,
        })
    }

    pub fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        self.inner.request(method, url)
    }

    /// Sends `req` and reads the whole body (up to the size cap). Only transport
    /// problems are errors here; the caller classifies the status.
    ///
    /// Runs in an `http` span: method, host, port and path (never the query
    /// string), the response status, the error class and the duration.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<Response, FetchError> {
        let req = req
            .build()
            .map_err(|e| FetchError::new(FailureClass::Internal, transport_detail("?", &e)))?;
        let method = req.method().as_str().to_owned();
        let span = tracing::info_span!(
            "http",
            otel.name = %format_args!("HTTP {method}"),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            http.request.method = %method,
            server.address = req.url().host_str().unwrap_or("?"),
            server.port = req.url().port_or_known_default(),
            url.path = req.url().path(),
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let started = std::time::Instant::now();
        let result = self.send_built(req).instrument(span.clone()).await;
        span.record("duration_ms", started.elapsed().as_secs_f64() * 1e3);
        match &result {
            Ok(r) => {
                span.record("http.response.status_code", r.status.as_u16());
                if !r.status.is_success() {
                    span.record("otel.status_code", "ERROR");
                }
            }
            Err(e) => {
                span.record("error.type", e.class.as_str());
                span.record("otel.status_code", "ERROR");
            }
        }
        result
    }

    async fn send_built(&self, req: reqwest::Request) -> Result<Response, FetchError> {
        let target = describe(req.url());
        let mut resp = self
            .inner
            .execute(req)
            .await
            .map_err(|e| transport_error(&target, &e))?;
        let status = resp.status();
        let headers = std::mem::take(resp.headers_mut());
        let too_big = || {
            FetchError::new(
                FailureClass::BadResponse,
                format!(
                    "{target}: response body larger than {} bytes (HTTP {})",
                    self.max_bytes,
                    status.as_u16()
                ),
            )
        };
        if resp
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(too_big());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| transport_error(&target, &e))?
        {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Response {
            status,
            headers,
            body,
            target,
        })
    }
}

/// `host:port/path` of a URL: never the query string or user info, which may
/// carry secrets.
pub fn describe(url: &Url) -> String {
    let host = url.host_str().unwrap_or("?");
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}{}", url.path()),
        None => format!("{host}{}", url.path()),
    }
}

fn transport_error(target: &str, e: &reqwest::Error) -> FetchError {
    let class = if e.is_timeout() {
        FailureClass::Timeout
    } else {
        FailureClass::Connect
    };
    FetchError::new(class, transport_detail(target, e))
}

/// The error's own words without its URL, plus its innermost cause (such as
/// "Connection refused"), which carries no request data.
fn transport_detail(target: &str, e: &reqwest::Error) -> String {
    let mut root: &dyn std::error::Error = e;
    while let Some(next) = root.source() {
        root = next;
    }
    let what = if e.is_timeout() {
        "request timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_body() || e.is_decode() {
        "reading the response failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let root = root.to_string();
    if root.is_empty() || root.contains("://") {
        // Never echo anything that looks like it carries a URL.
        format!("{target}: {what}")
    } else {
        format!("{target}: {what} ({root})")
    }
}

impl Response {
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    /// The delay a `Retry-After` header asks for (delta-seconds or HTTP
    /// date), at most an hour.
    pub fn retry_after(&self, now: SystemTime) -> Option<Duration> {
        let v = self.headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
        let delay = match v.parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => {
                let at = httpdate::parse_http_date(v).ok()?;
                at.duration_since(now).unwrap_or_default()
            }
        };
        Some(delay.min(MAX_RETRY_AFTER))
    }

    /// The generic classification of a non-success status: 429 and 5xx are
    /// transient (with `Retry-After` as a minimum delay); 401 and 403 are
    /// `invalid_credentials`, anything else `rejected` (both permanent).
    pub fn status_error(&self, now: SystemTime) -> FetchError {
        let code = self.status.as_u16();
        let class = match self.status {
            StatusCode::TOO_MANY_REQUESTS => FailureClass::RateLimited,
            s if s.is_server_error() => FailureClass::UpstreamError,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => FailureClass::InvalidCredentials,
            _ => FailureClass::Rejected,
        };
        let what = match class {
            FailureClass::RateLimited => "rate limited",
            FailureClass::UpstreamError => "server error",
            FailureClass::InvalidCredentials => "credentials refused",
            _ if self.status.is_redirection() => "unexpected redirect",
            _ => "request rejected",
        };
        let mut err = FetchError::new(class, format!("{}: HTTP {code} ({what})", self.target));
        if !class.is_permanent() {
            err.retry_after = self.retry_after(now);
        }
        err
    }

    /// The body as JSON. The content type must be JSON (`application/json` or
    /// `…+json`) when the upstream names one.
    pub fn json(&self) -> Result<serde_json::Value, FetchError> {
        if let Some(ct) = self.headers.get(CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            let media = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if media != "application/json" && !media.ends_with("+json") {
                return Err(self.bad(format!(
                    "expected a JSON response, got content type {:?}",
                    media.chars().take(64).collect::<String>()
                )));
            }
        }
        serde_json::from_slice(&self.body).map_err(|e| {
            // serde_json's message holds a position, not the input.
            self.bad(format!("response is not valid JSON ({e})"))
        })
    }

    /// A `bad_response` error about this response.
    pub fn bad(&self, what: impl std::fmt::Display) -> FetchError {
        FetchError::new(
            FailureClass::BadResponse,
            format!("{}: HTTP {}: {what}", self.target, self.status.as_u16()),
        )
    }
}

/// The string at `pointer` in `doc`, non-empty, or an error naming the field.
pub fn string_at(
    resp: &Response,
    doc: &serde_json::Value,
    pointer: &str,
) -> Result<String, FetchError> {
    match doc.pointer(pointer) {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(serde_json::Value::String(_)) => Err(resp.bad(format!("field {pointer} is empty"))),
        Some(_) => Err(resp.bad(format!("field {pointer} is not a string"))),
        None => Err(resp.bad(format!("field {pointer} is missing"))),
    }
}

/// A JSON value that should be a number of seconds: a number or a numeric
/// string (some servers send `"3600"`).
pub fn seconds(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|s: &f64| s.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_drops_query_and_userinfo() {
        let u = Url::parse("https://user:pw@api.example.com/v1/x?key=secret").unwrap();
        assert_eq!(describe(&u), "api.example.com:443/v1/x");
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        let r = Response {
            status: StatusCode::TOO_MANY_REQUESTS,
            headers,
            body: vec![],
            target: "h:1/".into(),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(r.retry_after(now), Some(Duration::from_secs(7)));
        let e = r.status_error(now);
        assert_eq!(e.class, FailureClass::RateLimited);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        let mut headers = HeaderMap::new();
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        headers.insert(RETRY_AFTER, date.parse().unwrap());
        let r = Response {
            status: StatusCode::SERVICE_UNAVAILABLE,
            headers,
            body: vec![],
            target: "h:1/".into(),
        };
        assert_eq!(r.retry_after(now), Some(Duration::from_secs(30)));
        assert_eq!(r.status_error(now).class, FailureClass::UpstreamError);
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "99999999".parse().unwrap());
        let r = Response {
            status: StatusCode::TOO_MANY_REQUESTS,
            headers,
            body: vec![],
            target: "h:1/".into(),
        };
        assert_eq!(r.retry_after(now), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn seconds_accepts_numbers_and_numeric_strings() {
        assert_eq!(seconds(&serde_json::json!(3600)), Some(3600.0));
        assert_eq!(seconds(&serde_json::json!("3600")), Some(3600.0));
        assert_eq!(seconds(&serde_json::json!("soon")), None);
        assert_eq!(seconds(&serde_json::json!(null)), None);
    }
}
