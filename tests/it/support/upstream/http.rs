//! The plumbing every fake upstream shares: a scripted [`Reply`], the
//! [`Recorded`] request, the counting and scripting `Core`, and `Running`, an
//! axum server on 127.0.0.1:0 that records each request before any scripted
//! delay and stops when dropped.

use std::collections::{HashMap, VecDeque};
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
use serde_json::Value;
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
    pub(super) fn media_type(&self) -> Option<String> {
        self.header("content-type").map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
    }

    /// Every form field name paired with how often it occurs.
    pub(super) fn form_field_counts(&self) -> HashMap<String, usize> {
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
pub(super) struct Core {
    calls: AtomicUsize,
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Recorded>>,
}

impl Core {
    /// Records `rec`; returns its 1-based call number and the scripted reply
    /// for it, if one is queued.
    pub(super) fn arrive(&self, rec: &Recorded) -> (usize, Option<Reply>) {
        self.requests.lock().unwrap().push(rec.clone());
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        (n, self.script.lock().unwrap().pop_front())
    }

    pub(super) fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().unwrap().extend(replies);
    }

    pub(super) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub(super) fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

pub(super) type Respond = Arc<dyn Fn(Recorded) -> Reply + Send + Sync>;

/// A running axum server; dropping it shuts the server down.
pub(super) struct Running {
    addr: SocketAddr,
    _stop: DropGuard,
}

impl Running {
    /// Binds, then serves what `make(base_url)` returns.
    pub(super) async fn start(make: impl FnOnce(&str) -> Respond) -> Self {
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

    pub(super) fn base(&self) -> String {
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
