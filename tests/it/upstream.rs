//! Fake upstream HTTP servers for the broker's real HTTP sources.
//!
//! Every server binds `127.0.0.1:0`, is served by axum from a spawned tokio
//! task, and stops when its struct is dropped (a `CancellationToken` drop
//! guard triggers graceful shutdown and cuts short any scripted delay). They
//! run on real time: use them from `#[tokio::test(flavor = "multi_thread")]`
//! tests that do not pause the clock.
//!
//! Contract shared by all servers:
//! - every request is counted and recorded (a [`Recorded`]) when it arrives,
//!   before any scripted delay, whether it is answered by a script entry, the
//!   server's own logic, or rejected;
//! - `script(replies)` queues replies; the next N requests (any method, any
//!   path) get them verbatim and in order, then the server's own logic
//!   answers again;
//! - a [`Reply`] can carry a delay, slept before the response headers go out.
//!
//! The servers:
//! - [`FakeHttp`]: any method, any path, answered by a closure given the
//!   request and its 1-based call number;
//! - [`OAuthServer`]: an RFC 6749 token endpoint at `/oauth2/token` with
//!   client authentication (Basic or body), `client_credentials` and
//!   rotating `refresh_token` grants, and revocable access tokens;
//! - [`OverDriveServer`]: `GET /v1/libraries/{id}` and
//!   `GET /v1/libraries/{id}/advantageAccounts`, authorised by bearer tokens
//!   that an [`OAuthServer`] issued and has not revoked.
//!
//! Nothing here logs; the `Debug` output of [`OAuthConfig`] and [`Recorded`]
//! redacts secrets (client secret, refresh token, `Authorization` header,
//! request bodies).
#![expect(
    dead_code,
    reason = "shared by tests; not every test uses every helper"
)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Largest request body the fakes accept.
const BODY_LIMIT: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Reply
// ---------------------------------------------------------------------------

/// A scripted response.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
    /// Slept before the response headers are sent.
    pub delay: Duration,
}

impl Reply {
    /// A JSON reply (`content-type: application/json`).
    pub fn json(status: u16, body: Value) -> Self {
        Self::raw(status, "application/json", body.to_string())
    }

    /// A reply with this content type and body.
    pub fn raw(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            body: body.into(),
            content_type: Some(content_type.to_owned()),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    /// A reply with no body and no content type.
    pub fn empty(status: u16) -> Self {
        Self {
            status,
            body: Vec::new(),
            content_type: None,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sleeps `d` before sending the response headers.
    pub fn delayed(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status)
            .unwrap_or_else(|_| panic!("scripted reply has invalid status {}", self.status));
        let mut resp = Response::new(Body::from(self.body));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        if let Some(ct) = &self.content_type {
            headers.insert(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_str(ct).expect("content type is a valid header value"),
            );
        }
        for (name, value) in &self.headers {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("valid header name"),
                HeaderValue::from_str(value).expect("valid header value"),
            );
        }
        resp
    }
}

// ---------------------------------------------------------------------------
// Recorded
// ---------------------------------------------------------------------------

/// What a server received.
#[derive(Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Names lowercased, in arrival order (repeated headers appear repeatedly).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as `application/x-www-form-urlencoded` (`+` is a
    /// space, `%XX` is decoded); a repeated field keeps its last value.
    pub fn form(&self) -> HashMap<String, String> {
        url::form_urlencoded::parse(&self.body)
            .into_owned()
            .collect()
    }

    /// The body parsed as JSON; panics if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} {} request body is not JSON: {e}",
                self.method, self.path
            )
        })
    }

    /// The `Content-Type` without parameters, lowercased.
    fn media_type(&self) -> Option<String> {
        self.header("content-type").map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
    }

    /// Every form field name paired with how often it occurs.
    fn form_field_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (k, _) in url::form_urlencoded::parse(&self.body) {
            *counts.entry(k.into_owned()).or_insert(0) += 1;
        }
        counts
    }
}

impl fmt::Debug for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(n, v)| match n.as_str() {
                "authorization" | "proxy-authorization" | "cookie" => (n.as_str(), "<redacted>"),
                _ => (n.as_str(), v.as_str()),
            })
            .collect();
        f.debug_struct("Recorded")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("headers", &headers)
            .field("body", &format_args!("<{} bytes>", self.body.len()))
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Shared machinery
// ---------------------------------------------------------------------------

/// Counting, recording and scripting shared by every server.
#[derive(Default)]
struct Core {
    calls: AtomicUsize,
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Recorded>>,
}

impl Core {
    /// Records `rec`; returns its 1-based call number and the scripted reply
    /// for it, if one is queued.
    fn arrive(&self, rec: &Recorded) -> (usize, Option<Reply>) {
        self.requests.lock().unwrap().push(rec.clone());
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        (n, self.script.lock().unwrap().pop_front())
    }

    fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().unwrap().extend(replies);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

type Respond = Arc<dyn Fn(Recorded) -> Reply + Send + Sync>;

/// A running axum server; dropping it shuts the server down.
struct Running {
    addr: SocketAddr,
    _stop: DropGuard,
}

impl Running {
    /// Binds, then serves what `make(base_url)` returns.
    async fn start(make: impl FnOnce(&str) -> Respond) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let respond = make(&format!("http://{addr}"));
        let stop = CancellationToken::new();
        let cut = stop.clone();
        let app = Router::new().fallback(move |req: Request| {
            let respond = respond.clone();
            let cut = cut.clone();
            async move { handle(req, respond, cut).await }
        });
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            // An error here only means the accept loop died; requests then fail
            // with connection errors, which the test will notice.
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await;
        });
        Self {
            addr,
            _stop: stop.drop_guard(),
        }
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn handle(req: Request, respond: Respond, cut: CancellationToken) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b.to_vec(),
        Err(_) => return Reply::empty(413).into_response(),
    };
    let rec = Recorded {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    let reply = catch_unwind(AssertUnwindSafe(|| respond(rec)))
        .unwrap_or_else(|_| Reply::raw(500, "text/plain", "fake upstream handler panicked"));
    if !reply.delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(reply.delay) => {}
            () = cut.cancelled() => {}
        }
    }
    reply.into_response()
}

// ---------------------------------------------------------------------------
// FakeHttp
// ---------------------------------------------------------------------------

type Handler = Arc<dyn Fn(&Recorded, usize) -> Reply + Send + Sync>;

/// A generic scriptable server: any method, any path.
pub struct FakeHttp {
    core: Arc<Core>,
    running: Running,
}

impl FakeHttp {
    /// `handler` answers every request that no script entry answers; it gets
    /// the request and the 1-based call number (counting scripted calls too).
    pub async fn start(
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let core = Arc::new(Core::default());
        let handler: Handler = Arc::new(handler);
        let c = core.clone();
        let running = Running::start(|_| {
            Arc::new(move |rec: Recorded| {
                let (n, scripted) = c.arrive(&rec);
                scripted.unwrap_or_else(|| handler(&rec, n))
            })
        })
        .await;
        Self { core, running }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.running.base())
    }

    /// The next N requests get these replies, in order, before the handler
    /// answers again.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.core.script(replies);
    }

    /// All requests received.
    pub fn calls(&self) -> usize {
        self.core.calls()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.core.requests()
    }
}

// ---------------------------------------------------------------------------
// OAuthServer
// ---------------------------------------------------------------------------

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
struct OAuthState {
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
    fn is_valid(&self, token: &str) -> bool {
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
    state: Arc<OAuthState>,
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
                scripted.unwrap_or_else(|| s.respond(&rec))
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

/// Standard-alphabet base64, padding optional.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Decodes one `application/x-www-form-urlencoded` component.
fn form_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h << 4) | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------
// OverDriveServer
// ---------------------------------------------------------------------------

#[derive(Default)]
struct OverDriveData {
    /// library id -> collection token
    libraries: HashMap<String, String>,
    /// library id -> [(account id, collection token)] in insertion order
    advantage: HashMap<String, Vec<(String, String)>>,
}

struct OverDriveState {
    oauth: Arc<OAuthState>,
    base: String,
    data: Mutex<OverDriveData>,
    library_calls: AtomicUsize,
    advantage_calls: AtomicUsize,
    unauthorized: AtomicUsize,
}

enum OdRoute<'a> {
    Library(&'a str),
    Advantage(&'a str),
    Other,
}

fn od_route(path: &str) -> OdRoute<'_> {
    let Some(rest) = path.strip_prefix("/v1/libraries/") else {
        return OdRoute::Other;
    };
    match rest.split_once('/') {
        None if !rest.is_empty() => OdRoute::Library(rest),
        Some((id, "advantageAccounts")) if !id.is_empty() => OdRoute::Advantage(id),
        _ => OdRoute::Other,
    }
}

/// A number if `id` is all digits, else a string (OverDrive ids are numeric).
fn id_value(id: &str) -> Value {
    match id.parse::<u64>() {
        Ok(n) => json!(n),
        Err(_) => json!(id),
    }
}

fn od_json(status: u16, body: Value) -> Reply {
    Reply::json(status, body)
}

impl OverDriveState {
    fn respond(&self, rec: &Recorded) -> Reply {
        let route = od_route(&rec.path);
        if matches!(route, OdRoute::Other) {
            return od_json(
                404,
                json!({ "errorCode": "NotFound", "message": "The requested resource could not be found." }),
            );
        }
        if rec.method != "GET" {
            return od_json(
                405,
                json!({ "errorCode": "MethodNotAllowed", "message": "The requested method is not allowed." }),
            )
            .header("allow", "GET");
        }
        let bearer = rec.header("authorization").and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        if !bearer.is_some_and(|t| self.oauth.is_valid(t)) {
            return od_json(
                401,
                json!({ "errorCode": "Unauthorized", "message": "An unexpected error has occurred." }),
            );
        }
        let data = self.data.lock().unwrap();
        let not_found = || {
            od_json(
                404,
                json!({ "errorCode": "NotFound", "message": "The requested library could not be found." }),
            )
        };
        match route {
            OdRoute::Library(id) => match data.libraries.get(id) {
                Some(token) => od_json(200, self.library_doc(id, token)),
                None => not_found(),
            },
            OdRoute::Advantage(id) => {
                if !data.libraries.contains_key(id) {
                    return not_found();
                }
                let accounts: Vec<Value> = data
                    .advantage
                    .get(id)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|(acct, token)| self.advantage_doc(id, acct, token))
                    .collect();
                od_json(
                    200,
                    json!({
                        "totalItems": accounts.len(),
                        "links": {
                            "self": {
                                "href": format!("{}/v1/libraries/{id}/advantageAccounts", self.base),
                                "type": "application/vnd.overdrive.api+json",
                            }
                        },
                        "advantageAccounts": accounts,
                    }),
                )
            }
            OdRoute::Other => not_found(),
        }
    }

    fn library_doc(&self, id: &str, token: &str) -> Value {
        let base = &self.base;
        json!({
            "id": id_value(id),
            "name": format!("Library {id}"),
            "type": "Library",
            "collectionToken": token,
            "links": {
                "self": {
                    "href": format!("{base}/v1/libraries/{id}"),
                    "type": "application/vnd.overdrive.api+json",
                },
                "products": {
                    "href": format!("{base}/v1/collections/{token}/products"),
                    "type": "application/vnd.overdrive.api+json",
                },
                "advantageAccounts": {
                    "href": format!("{base}/v1/libraries/{id}/advantageAccounts"),
                    "type": "application/vnd.overdrive.api+json",
                },
                "dlrHomepage": {
                    "href": format!("https://library{id}.example.overdrive.com"),
                    "type": "text/html",
                },
            },
            "formats": [
                { "id": "audiobook-mp3", "name": "OverDrive MP3 Audiobook" },
                { "id": "ebook-epub-adobe", "name": "Adobe EPUB eBook" },
                { "id": "ebook-overdrive", "name": "OverDrive Read" },
                { "id": "ebook-kindle", "name": "Kindle Book" },
            ],
        })
    }

    fn advantage_doc(&self, library: &str, account: &str, token: &str) -> Value {
        let base = &self.base;
        json!({
            "id": id_value(account),
            "name": format!("Advantage {account} of Library {library}"),
            "collectionToken": token,
            "links": {
                "self": {
                    "href": format!("{base}/v1/libraries/{library}/advantageAccounts/{account}"),
                    "type": "application/vnd.overdrive.api+json",
                },
                "products": {
                    "href": format!("{base}/v1/collections/{token}/products"),
                    "type": "application/vnd.overdrive.api+json",
                },
            },
        })
    }
}

/// An OverDrive-shaped library API authorised by an [`OAuthServer`].
pub struct OverDriveServer {
    core: Arc<Core>,
    state: Arc<OverDriveState>,
    oauth: Arc<OAuthServer>,
    running: Running,
}

impl OverDriveServer {
    pub async fn start(oauth: Arc<OAuthServer>) -> Arc<Self> {
        let core = Arc::new(Core::default());
        let mut state = None;
        let running = Running::start(|base| {
            let st = Arc::new(OverDriveState {
                oauth: oauth.state.clone(),
                base: base.to_owned(),
                data: Mutex::new(OverDriveData::default()),
                library_calls: AtomicUsize::new(0),
                advantage_calls: AtomicUsize::new(0),
                unauthorized: AtomicUsize::new(0),
            });
            state = Some(st.clone());
            let c = core.clone();
            Arc::new(move |rec: Recorded| {
                match od_route(&rec.path) {
                    OdRoute::Library(_) => st.library_calls.fetch_add(1, Ordering::SeqCst),
                    OdRoute::Advantage(_) => st.advantage_calls.fetch_add(1, Ordering::SeqCst),
                    OdRoute::Other => 0,
                };
                let (_, scripted) = c.arrive(&rec);
                let reply = scripted.unwrap_or_else(|| st.respond(&rec));
                if reply.status == 401 {
                    st.unauthorized.fetch_add(1, Ordering::SeqCst);
                }
                reply
            })
        })
        .await;
        Arc::new(Self {
            core,
            state: state.expect("Running::start calls make"),
            oauth,
            running,
        })
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        self.running.base()
    }

    /// The OAuth server whose tokens this API accepts.
    pub fn oauth(&self) -> &Arc<OAuthServer> {
        &self.oauth
    }

    /// Adds (or replaces) a library.
    pub fn set_library(&self, library_id: &str, collection_token: &str) {
        self.state
            .data
            .lock()
            .unwrap()
            .libraries
            .insert(library_id.to_owned(), collection_token.to_owned());
    }

    /// Adds (or replaces) an Advantage account of a library; the library
    /// itself must also be set for the listing to answer 200.
    pub fn set_advantage(&self, library_id: &str, account_id: &str, collection_token: &str) {
        let mut data = self.state.data.lock().unwrap();
        let accounts = data.advantage.entry(library_id.to_owned()).or_default();
        match accounts.iter_mut().find(|(a, _)| a == account_id) {
            Some(entry) => entry.1 = collection_token.to_owned(),
            None => accounts.push((account_id.to_owned(), collection_token.to_owned())),
        }
    }

    /// The next N requests (to any endpoint) get these replies verbatim.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.core.script(replies);
    }

    /// `/v1/libraries/{id}` requests received (any method, scripted included).
    pub fn library_calls(&self) -> usize {
        self.state.library_calls.load(Ordering::SeqCst)
    }

    /// `/v1/libraries/{id}/advantageAccounts` requests received.
    pub fn advantage_calls(&self) -> usize {
        self.state.advantage_calls.load(Ordering::SeqCst)
    }

    /// Requests answered 401 (scripted 401s included).
    pub fn unauthorized(&self) -> usize {
        self.state.unauthorized.load(Ordering::SeqCst)
    }

    /// All requests received.
    pub fn calls(&self) -> usize {
        self.core.calls()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.core.requests()
    }
}

// ---------------------------------------------------------------------------
// Self-tests
// ---------------------------------------------------------------------------

mod selftest {
    use super::*;
    use std::time::Instant;

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    async fn body_json(resp: reqwest::Response) -> (u16, Value) {
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oauth_client_credentials_and_client_auth() {
        let oauth = OAuthServer::start(OAuthConfig::new("app", "s3cret")).await;
        let http = client();

        let resp = http
            .post(oauth.token_url())
            .basic_auth("app", Some("s3cret"))
            .form(&[("grant_type", "client_credentials"), ("scope", "read")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let (status, doc) = body_json(resp).await;
        assert_eq!(status, 200, "{doc}");
        let token = doc["access_token"].as_str().unwrap().to_owned();
        assert!(token.starts_with("at-1-"), "{token}");
        assert_eq!(doc["token_type"], "Bearer");
        assert_eq!(doc["expires_in"], 3600);
        assert_eq!(doc["scope"], "read");
        assert!(oauth.is_valid(&token));
        assert_eq!(oauth.issued(), vec![token.clone()]);
        assert_eq!(oauth.grants("client_credentials"), 1);
        let rec = &oauth.requests()[0];
        assert_eq!(rec.method, "POST");
        assert_eq!(rec.form()["grant_type"], "client_credentials");
        assert!(!format!("{rec:?}").contains("s3cret") && !format!("{rec:?}").contains("YXBw"));

        // Wrong secret.
        let resp = http
            .post(oauth.token_url())
            .basic_auth("app", Some("nope"))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["www-authenticate"], "Basic realm=\"fake\"");
        let (status, doc) = body_json(resp).await;
        assert_eq!(
            (status, doc["error"].as_str()),
            (401, Some("invalid_client"))
        );

        // Both Basic and body credentials.
        let resp = http
            .post(oauth.token_url())
            .basic_auth("app", Some("s3cret"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "app"),
                ("client_secret", "s3cret"),
            ])
            .send()
            .await
            .unwrap();
        let (status, doc) = body_json(resp).await;
        assert_eq!(
            (status, doc["error"].as_str()),
            (400, Some("invalid_request"))
        );

        // Unknown and missing grant types, wrong method.
        let resp = http
            .post(oauth.token_url())
            .basic_auth("app", Some("s3cret"))
            .form(&[("grant_type", "password")])
            .send()
            .await
            .unwrap();
        let (status, doc) = body_json(resp).await;
        assert_eq!(
            (status, doc["error"].as_str()),
            (400, Some("unsupported_grant_type"))
        );
        let resp = http
            .post(oauth.token_url())
            .basic_auth("app", Some("s3cret"))
            .form(&[("scope", "x")])
            .send()
            .await
            .unwrap();
        let (status, doc) = body_json(resp).await;
        assert_eq!(
            (status, doc["error"].as_str()),
            (400, Some("invalid_request"))
        );
        let resp = http.get(oauth.token_url()).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 405);

        // Body client auth; expires_in omitted.
        let mut cfg = OAuthConfig::new("body app", "p@ss");
        cfg.client_auth = ClientAuth::Body;
        cfg.expires_in = None;
        let body = OAuthServer::start(cfg).await;
        let resp = http
            .post(body.token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "body app"),
                ("client_secret", "p@ss"),
            ])
            .send()
            .await
            .unwrap();
        let (status, doc) = body_json(resp).await;
        assert_eq!(status, 200, "{doc}");
        assert!(doc.get("expires_in").is_none());
        // Basic is not accepted by a Body server.
        let resp = http
            .post(body.token_url())
            .basic_auth("body%20app", Some("p%40ss"))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);

        // Urlencoded Basic credentials are accepted by a Basic server.
        let enc = OAuthServer::start(OAuthConfig::new("my app", "p@ss:w")).await;
        let resp = http
            .post(enc.token_url())
            .basic_auth("my+app", Some("p%40ss%3Aw"))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);

        assert_eq!(oauth.calls(), 6);
        oauth.revoke_all();
        assert!(!oauth.is_valid(&token));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oauth_refresh_rotation_and_script() {
        let mut cfg = OAuthConfig::new("app", "s3cret");
        cfg.refresh_token = Some("rt-initial".to_owned());
        let oauth = OAuthServer::start(cfg).await;
        let http = client();
        let refresh = |rt: String| {
            http.post(oauth.token_url())
                .basic_auth("app", Some("s3cret"))
                .form(&[
                    ("grant_type", "refresh_token".to_owned()),
                    ("refresh_token", rt),
                ])
                .send()
        };

        let (status, doc) = body_json(refresh("rt-initial".into()).await.unwrap()).await;
        assert_eq!(status, 200, "{doc}");
        let next = doc["refresh_token"].as_str().unwrap().to_owned();
        assert!(next.starts_with("rt-1-"));
        assert_eq!(oauth.refresh_token().as_deref(), Some(next.as_str()));
        assert!(oauth.is_valid(doc["access_token"].as_str().unwrap()));

        // The used refresh token is dead.
        let (status, doc) = body_json(refresh("rt-initial".into()).await.unwrap()).await;
        assert_eq!(
            (status, doc["error"].as_str()),
            (400, Some("invalid_grant"))
        );
        assert_eq!(oauth.grants("refresh_token"), 1);

        // Scripted replies first, then back to normal.
        oauth.script([
            Reply::json(503, json!({"error": "temporarily_unavailable"})),
            Reply::raw(200, "text/html", "<html>proxy</html>").header("x-fake", "1"),
        ]);
        let r = refresh(next.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), 503);
        let r = refresh(next.clone()).await.unwrap();
        assert_eq!(r.headers()["x-fake"], "1");
        assert_eq!(r.text().await.unwrap(), "<html>proxy</html>");
        let (status, _) = body_json(refresh(next.clone()).await.unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(oauth.calls(), 5);
        assert_eq!(oauth.grants("refresh_token"), 2);
        assert_eq!(oauth.issued().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overdrive_auth_libraries_and_advantage() {
        let oauth = OAuthServer::start(OAuthConfig::new("app", "s3cret")).await;
        let od = OverDriveServer::start(oauth.clone()).await;
        od.set_library("1225", "v1L1BYwAAAA2Q");
        od.set_advantage("1225", "4", "v1L1BDAAAAA2R");
        od.set_advantage("1225", "7", "v1L1BDAAAAA2S");
        let http = client();
        let get = |path: &str, bearer: &str| {
            http.get(format!("{}{path}", od.base_url()))
                .bearer_auth(bearer)
                .send()
        };

        let (status, doc) = body_json(get("/v1/libraries/1225", "at-bogus").await.unwrap()).await;
        assert_eq!(
            (status, doc["errorCode"].as_str()),
            (401, Some("Unauthorized"))
        );

        let resp = http
            .post(oauth.token_url())
            .basic_auth("app", Some("s3cret"))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        let token = body_json(resp).await.1["access_token"]
            .as_str()
            .unwrap()
            .to_owned();

        let resp = get("/v1/libraries/1225", &token).await.unwrap();
        assert_eq!(resp.headers()["content-type"], "application/json");
        let (status, doc) = body_json(resp).await;
        assert_eq!(status, 200);
        assert_eq!(doc["id"], 1225);
        assert_eq!(doc["collectionToken"], "v1L1BYwAAAA2Q");

        let (status, doc) = body_json(
            get("/v1/libraries/1225/advantageAccounts", &token)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(doc["totalItems"], 2);
        assert_eq!(doc["advantageAccounts"][0]["id"], 4);
        assert_eq!(
            doc["advantageAccounts"][1]["collectionToken"],
            "v1L1BDAAAAA2S"
        );

        let (status, doc) = body_json(get("/v1/libraries/999", &token).await.unwrap()).await;
        assert_eq!((status, doc["errorCode"].as_str()), (404, Some("NotFound")));
        let (status, _) = body_json(
            get("/v1/libraries/999/advantageAccounts", &token)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 404);

        // Revocation makes the bearer invalid; scripted replies count too.
        oauth.revoke_all();
        assert_eq!(
            get("/v1/libraries/1225", &token)
                .await
                .unwrap()
                .status()
                .as_u16(),
            401
        );
        od.script([Reply::json(401, json!({}))]);
        assert_eq!(
            get("/v1/libraries/1225", "x")
                .await
                .unwrap()
                .status()
                .as_u16(),
            401
        );

        assert_eq!(od.library_calls(), 5);
        assert_eq!(od.advantage_calls(), 2);
        assert_eq!(od.unauthorized(), 3);
        assert_eq!(od.requests().len(), 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fake_http_script_delay_and_recording() {
        let fake =
            FakeHttp::start(|rec, n| Reply::json(200, json!({ "n": n, "path": rec.path }))).await;
        let http = client();
        fake.script([Reply::raw(500, "text/plain", "boom").delayed(Duration::from_millis(200))]);

        let started = Instant::now();
        let resp = http
            .put(fake.url("/x?y=1"))
            .header("X-Thing", "v")
            .body(r#"{"a":1}"#)
            .send()
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(resp.status().as_u16(), 500);
        assert_eq!(resp.text().await.unwrap(), "boom");

        let (status, doc) = body_json(http.get(fake.url("/y")).send().await.unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(doc, json!({ "n": 2, "path": "/y" }));

        assert_eq!(fake.calls(), 2);
        let reqs = fake.requests();
        assert_eq!(reqs[0].method, "PUT");
        assert_eq!(reqs[0].query.as_deref(), Some("y=1"));
        assert_eq!(reqs[0].header("x-thing"), Some("v"));
        assert_eq!(reqs[0].json(), json!({ "a": 1 }));

        // Dropping the server stops it.
        let url = fake.url("/z");
        drop(fake);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(http.get(url).send().await.is_err());
    }
}
