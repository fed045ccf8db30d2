//! OAuth 2.0 token endpoints (RFC 6749): the client-credentials grant
//! (section 4.4) and the refresh-token grant with rotation (section 6).
//!
//! Contract:
//! - Client authentication is HTTP Basic with the form-urlencoded id and
//!   secret (section 2.3.1, the default) or the two form fields; a public
//!   client (refresh grant without a secret) sends its `client_id` in the body.
//! - The refresh grant uses the refresh token the store holds (the latest the
//!   upstream issued) and falls back to the configured seed only while the
//!   store holds none. A refresh token in the response travels back in
//!   [`Fetched::refresh_token`] so the store commits it with its access token.
//! - The lifetime comes from `expires_in`; without it, `default_ttl`.
//! - OAuth error responses are classified by their `error` code:
//!   `invalid_client`/`unauthorized_client` -> `invalid_credentials`,
//!   `invalid_grant` -> `invalid_grant`, any other 4xx -> `rejected`; 429 and
//!   5xx are transient. Only standard error codes are repeated in messages;
//!   `error_description` and the rest of the body never are.

use std::time::{Duration, SystemTime};

use reqwest::{Method, Url};

use super::http::{HttpClient, Response, seconds, string_at};
use super::{BoxFuture, FailureClass, FetchContext, FetchError, Fetched, Source};
use crate::token::Secret;

/// How the client authenticates to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// `Authorization: Basic` (RFC 6749 section 2.3.1).
    #[default]
    Basic,
    /// `client_id` and `client_secret` form fields.
    Body,
}

/// Which grant the source uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    ClientCredentials,
    /// The refresh-token grant; `seed` is the configured refresh token, used
    /// until the upstream issues another.
    RefreshToken {
        seed: Secret,
    },
}

/// One OAuth source's settings (secrets already resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthSpec {
    pub token_url: Url,
    pub client_id: String,
    /// Required for client credentials; optional (public client) for refresh.
    pub client_secret: Option<Secret>,
    pub client_auth: ClientAuth,
    pub scope: Option<String>,
    pub audience: Option<String>,
    /// Lifetime of a token whose response has no `expires_in`.
    pub default_ttl: Duration,
    pub grant: Grant,
}

pub struct OAuthSource {
    spec: OAuthSpec,
    http: HttpClient,
}

/// RFC 6749 section 5.2 error codes, the only upstream words repeated in messages.
const OAUTH_ERRORS: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
];

impl OAuthSource {
    pub fn new(spec: OAuthSpec, http: HttpClient) -> Self {
        Self { spec, http }
    }

    async fn request(&self, ctx: &FetchContext) -> Result<Fetched, FetchError> {
        let spec = &self.spec;
        let mut form: Vec<(&str, &str)> = Vec::with_capacity(6);
        let refresh_token;
        match &spec.grant {
            Grant::ClientCredentials => form.push(("grant_type", "client_credentials")),
            Grant::RefreshToken { seed } => {
                refresh_token = ctx.refresh_token.clone().unwrap_or_else(|| seed.clone());
                form.push(("grant_type", "refresh_token"));
                form.push(("refresh_token", refresh_token.expose()));
            }
        }
        if let Some(scope) = &spec.scope {
            form.push(("scope", scope));
        }
        if let Some(audience) = &spec.audience {
            form.push(("audience", audience));
        }
        let mut req = self
            .http
            .request(Method::POST, spec.token_url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        match (&spec.client_secret, spec.client_auth) {
            (Some(secret), ClientAuth::Basic) => {
                req = req.basic_auth(urlencode(&spec.client_id), Some(urlencode(secret.expose())));
            }
            (Some(secret), ClientAuth::Body) => {
                form.push(("client_id", &spec.client_id));
                form.push(("client_secret", secret.expose()));
            }
            (None, _) => form.push(("client_id", &spec.client_id)),
        }
        let resp = self.http.send(req.form(&form)).await?;
        self.parse(&resp, ctx.now)
    }

    fn parse(&self, resp: &Response, now: SystemTime) -> Result<Fetched, FetchError> {
        if !resp.is_success() {
            return Err(self.error(resp, now));
        }
        let doc = resp.json()?;
        let access = string_at(resp, &doc, "/access_token")?;
        let lifetime = match doc.get("expires_in") {
            None | Some(serde_json::Value::Null) => self.spec.default_ttl,
            Some(v) => match seconds(v) {
                Some(s) if s > 0.0 && s < 1e10 => Duration::from_secs_f64(s),
                Some(_) => return Err(resp.bad("expires_in is not positive")),
                None => return Err(resp.bad("expires_in is not a number")),
            },
        };
        let refresh_token = match doc.get("refresh_token") {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(Secret::new(s.clone())),
            None | Some(serde_json::Value::Null) => None,
            Some(_) => return Err(resp.bad("refresh_token is not a string")),
        };
        Ok(Fetched {
            refresh_token,
            ..Fetched::token(Secret::new(access), Some(now + lifetime))
        })
    }

    fn error(&self, resp: &Response, now: SystemTime) -> FetchError {
        let code = resp.status.as_u16();
        if code == 429 || resp.status.is_server_error() {
            return resp.status_error(now);
        }
        // RFC 6749 section 5.2: 400 (or 401) with a JSON `error` code.
        let oauth_error = resp
            .json()
            .ok()
            .and_then(|doc| doc.get("error").and_then(|e| e.as_str()).map(str::to_owned));
        let known = oauth_error
            .as_deref()
            .and_then(|e| OAUTH_ERRORS.iter().find(|k| **k == e).copied());
        let target = &resp.target;
        match known {
            Some("invalid_grant") => {
                let what = match self.spec.grant {
                    Grant::RefreshToken { .. } => {
                        "the refresh token was rejected (invalid_grant): it expired, was revoked or was already used; configure a new one"
                    }
                    Grant::ClientCredentials => "the grant was rejected (invalid_grant)",
                };
                FetchError::new(
                    FailureClass::InvalidGrant,
                    format!("{target}: HTTP {code}: {what}"),
                )
            }
            Some(e @ ("invalid_client" | "unauthorized_client")) => FetchError::new(
                FailureClass::InvalidCredentials,
                format!(
                    "{target}: HTTP {code}: client authentication failed ({e}); check client_id and the client secret"
                ),
            ),
            Some(e) => FetchError::new(
                FailureClass::Rejected,
                format!("{target}: HTTP {code}: request rejected ({e})"),
            ),
            None if code == 401 => FetchError::new(
                FailureClass::InvalidCredentials,
                format!("{target}: HTTP 401: client authentication failed"),
            ),
            None => resp.status_error(now),
        }
    }
}

/// `application/x-www-form-urlencoded` encoding, as RFC 6749 section 2.3.1
/// asks for the id and secret inside the Basic header.
fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Source for OAuthSource {
    fn kind(&self) -> &'static str {
        match self.spec.grant {
            Grant::ClientCredentials => "oauth2_client_credentials",
            Grant::RefreshToken { .. } => "oauth2_refresh_token",
        }
    }

    fn seed_fingerprint(&self) -> Option<String> {
        match &self.spec.grant {
            Grant::ClientCredentials => None,
            Grant::RefreshToken { seed } => Some(seed.fingerprint()),
        }
    }

    fn fetch(&self, ctx: FetchContext) -> BoxFuture<'_, Result<Fetched, FetchError>> {
        Box::pin(async move { self.request(&ctx).await })
    }
}
