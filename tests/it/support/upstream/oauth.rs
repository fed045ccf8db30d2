//! [`OAuthServer`]: an RFC 6749 token endpoint at `/oauth2/token` with client
//! authentication (Basic or body), `client_credentials` and rotating
//! `refresh_token` grants, and revocable access tokens.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::http::{Core, Recorded, Reply, Running};

/// Which client authentication the token endpoint accepts (RFC 6749 §2.3.1).
#[derive(Clone, Debug, PartialEq)]
pub enum ClientAuth {
    /// `Authorization: Basic base64(urlencode(id):urlencode(secret))`.
    Basic,
    /// Form fields `client_id` and `client_secret`.
    Body,
}

#[derive(Clone)]
pub struct OAuthConfig {
    pub client_id: String,
    pub client_secret: String,
    pub client_auth: ClientAuth,
    /// Seconds; `None` omits `expires_in` from token responses.
    pub expires_in: Option<u64>,
    /// The initial valid refresh token; `Some` enables the `refresh_token`
    /// grant.
    pub refresh_token: Option<String>,
    /// Slept before every answer the server's own logic gives (a slow
    /// upstream); scripted replies carry their own delay.
    pub latency: Duration,
}

impl OAuthConfig {
    /// Basic client auth, `expires_in` 3600, no refresh grant.
    pub fn new(client_id: &str, client_secret: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            client_auth: ClientAuth::Basic,
            expires_in: Some(3600),
            refresh_token: None,
            latency: Duration::ZERO,
        }
    }
}

impl fmt::Debug for OAuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("client_auth", &self.client_auth)
            .field("expires_in", &self.expires_in)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

const TOKEN_PATH: &str = "/oauth2/token";

/// Token-issuing state, shared with [`OverDriveServer`] for bearer checks.
pub(super) struct OAuthState {
    cfg: OAuthConfig,
    m: Mutex<OAuthMut>,
}

struct OAuthMut {
    expires_in: Option<u64>,
    issued: Vec<String>,
    valid: HashSet<String>,
    refresh: Option<String>,
    refresh_serial: usize,
    grants: HashMap<String, usize>,
}

impl OAuthState {
    pub(super) fn is_valid(&self, token: &str) -> bool {
        self.m.lock().unwrap().valid.contains(token)
    }

    fn respond(&self, rec: &Recorded) -> Reply {
        if rec.path != TOKEN_PATH {
            return oauth_error(404, "not_found", Some("no such endpoint"));
        }
        if rec.method != "POST" {
            return oauth_error(
                405,
                "invalid_request",
                Some("the token endpoint only accepts POST"),
            )
            .header("allow", "POST");
        }
        if rec.media_type().as_deref() != Some("application/x-www-form-urlencoded") {
            return oauth_error(
                400,
                "invalid_request",
                Some("content-type must be application/x-www-form-urlencoded"),
            );
        }
        let counts = rec.form_field_counts();
        if counts.values().any(|&c| c > 1) {
            return oauth_error(400, "invalid_request", Some("a parameter is repeated"));
        }
        let form = rec.form();

        let basic = rec.header("authorization").and_then(basic_credentials);
        let body_creds = form.contains_key("client_id") || form.contains_key("client_secret");
        if basic.is_some() && body_creds {
            return oauth_error(
                400,
                "invalid_request",
                Some("more than one client authentication method"),
            );
        }
        let authenticated = match self.cfg.client_auth {
            ClientAuth::Basic => basic.is_some_and(|(id, secret)| {
                lenient_eq(&id, &self.cfg.client_id) && lenient_eq(&secret, &self.cfg.client_secret)
            }),
            ClientAuth::Body => {
                form.get("client_id") == Some(&self.cfg.client_id)
                    && form.get("client_secret") == Some(&self.cfg.client_secret)
            }
        };
        if !authenticated {
            return oauth_error(401, "invalid_client", None)
                .header("www-authenticate", "Basic realm=\"fake\"");
        }

        match form.get("grant_type").map(String::as_str) {
            None => oauth_error(400, "invalid_request", Some("grant_type is missing")),
            Some("client_credentials") => {
                let mut m = self.m.lock().unwrap();
                let mut doc = m.issue("client_credentials");
                if let Some(scope) = form.get("scope") {
                    doc["scope"] = json!(scope);
                }
                token_reply(doc)
            }
            Some("refresh_token") if self.cfg.refresh_token.is_some() => {
                let Some(presented) = form.get("refresh_token") else {
                    return oauth_error(400, "invalid_request", Some("refresh_token is missing"));
                };
                let mut m = self.m.lock().unwrap();
                if m.refresh.as_ref() != Some(presented) {
                    return oauth_error(
                        400,
                        "invalid_grant",
                        Some("refresh token is invalid or was already used"),
                    );
                }
                m.refresh_serial += 1;
                let next = format!("rt-{}-{:08x}", m.refresh_serial, rand::random::<u32>());
                m.refresh = Some(next.clone());
                let mut doc = m.issue("refresh_token");
                doc["refresh_token"] = json!(next);
                token_reply(doc)
            }
            Some(_) => oauth_error(400, "unsupported_grant_type", None),
        }
    }
}

impl OAuthMut {
    /// Issues an access token and counts a successful grant; returns the
    /// token response document.
    fn issue(&mut self, grant_type: &str) -> Value {
        let token = format!("at-{}-{:08x}", self.issued.len() + 1, rand::random::<u32>());
        self.issued.push(token.clone());
        self.valid.insert(token.clone());
        *self.grants.entry(grant_type.to_owned()).or_insert(0) += 1;
        let mut doc = json!({ "access_token": token, "token_type": "Bearer" });
        if let Some(secs) = self.expires_in {
            doc["expires_in"] = json!(secs);
        }
        doc
    }
}

fn token_reply(doc: Value) -> Reply {
    Reply::json(200, doc)
        .header("cache-control", "no-store")
        .header("pragma", "no-cache")
}

fn oauth_error(status: u16, error: &str, description: Option<&str>) -> Reply {
    let mut doc = json!({ "error": error });
    if let Some(d) = description {
        doc["error_description"] = json!(d);
    }
    Reply::json(status, doc)
        .header("cache-control", "no-store")
        .header("pragma", "no-cache")
}

/// An OAuth2 token endpoint (RFC 6749) at `/oauth2/token`.
pub struct OAuthServer {
    core: Arc<Core>,
    pub(super) state: Arc<OAuthState>,
    running: Running,
}

impl OAuthServer {
    pub async fn start(cfg: OAuthConfig) -> Arc<Self> {
        let state = Arc::new(OAuthState {
            m: Mutex::new(OAuthMut {
                expires_in: cfg.expires_in,
                issued: Vec::new(),
                valid: HashSet::new(),
                refresh: cfg.refresh_token.clone(),
                refresh_serial: 0,
                grants: HashMap::new(),
            }),
            cfg,
        });
        let core = Arc::new(Core::default());
        let (c, s) = (core.clone(), state.clone());
        let running = Running::start(|_| {
            Arc::new(move |rec: Recorded| {
                let (_, scripted) = c.arrive(&rec);
                scripted.unwrap_or_else(|| s.respond(&rec).delayed(s.cfg.latency))
            })
        })
        .await;
        Arc::new(Self {
            core,
            state,
            running,
        })
    }

    /// `http://127.0.0.1:PORT/oauth2/token`.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.running.base())
    }

    /// Requests received (scripted and rejected ones included).
    pub fn calls(&self) -> usize {
        self.core.calls()
    }

    /// Successful (non-scripted) grants of this type.
    pub fn grants(&self, grant_type: &str) -> usize {
        let m = self.state.m.lock().unwrap();
        m.grants.get(grant_type).copied().unwrap_or(0)
    }

    /// The next N requests get these replies verbatim (still counted and
    /// recorded); scripted replies issue no tokens.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.core.script(replies);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.core.requests()
    }

    /// `expires_in` for tokens issued from now on (`None` omits it).
    pub fn set_expires_in(&self, v: Option<u64>) {
        self.state.m.lock().unwrap().expires_in = v;
    }

    /// Issued by this server and not revoked (expiry is ignored).
    pub fn is_valid(&self, access_token: &str) -> bool {
        self.state.is_valid(access_token)
    }

    /// Every access token issued so far becomes invalid.
    pub fn revoke_all(&self) {
        self.state.m.lock().unwrap().valid.clear();
    }

    /// Access tokens issued, in order.
    pub fn issued(&self) -> Vec<String> {
        self.state.m.lock().unwrap().issued.clone()
    }

    /// The currently valid refresh token.
    pub fn refresh_token(&self) -> Option<String> {
        self.state.m.lock().unwrap().refresh.clone()
    }

    /// Replaces the valid refresh token (as if issued out of band, e.g. a
    /// new consent): the previous one is refused from now on.
    pub fn set_refresh_token(&self, rt: &str) {
        self.state.m.lock().unwrap().refresh = Some(rt.to_owned());
    }
}

/// `(id, secret)` from an `Authorization: Basic ...` value, as sent (still
/// urlencoded); `None` if the header is not well-formed Basic.
fn basic_credentials(value: &str) -> Option<(String, String)> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(rest.trim())?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// `sent` equals `expected` either raw or after form-urldecoding.
fn lenient_eq(sent: &str, expected: &str) -> bool {
    sent == expected || form_decode(sent) == expected
}

/// Standard-alphabet base64; trailing `=` optional (any number is trimmed)
/// and unused trailing bits ignored, as lenient servers accept. `None` for
/// any other character, or a length no encoding produces (4k+1 symbols).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::RequireNone)
            .with_decode_allow_trailing_bits(true),
    );
    LENIENT.decode(s.trim_end_matches('=')).ok()
}

/// Decodes one `application/x-www-form-urlencoded` component: `+` is a space,
/// `%XX` a byte, a `%` not followed by two hex digits stays as it is, invalid
/// UTF-8 becomes U+FFFD. Inside one component `&` and `=` are literal, so they
/// are escaped before the form parser (which splits on them) sees them.
fn form_decode(s: &str) -> String {
    let component = s.replace('&', "%26").replace('=', "%3D");
    url::form_urlencoded::parse(component.as_bytes())
        .map(|(name, _)| name)
        .collect()
}
