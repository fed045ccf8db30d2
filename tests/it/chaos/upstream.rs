//! The chaos run's scripted upstream: one HTTP server on 127.0.0.1:0 serving,
//! per collection, an OAuth 2.0 token endpoint (`POST /c/NAME/token`,
//! `client_credentials` or a strictly rotating `refresh_token` grant) or an
//! `http_json` endpoint (`POST /c/NAME/json`).
//!
//! - Faults are drawn per call from the seed (latency, 503, 429 with
//!   `Retry-After`, a hang longer than any fetch timeout), so a run's upstream
//!   behaviour follows its seed given the same order of calls.
//! - The refresh grant rotates strictly: each refresh token works once. A
//!   spent one presented again revokes the whole grant (every later call gets
//!   `invalid_grant`), like a server following the OAuth 2.0 Security BCP,
//!   with one exception the driver announces: a refresh token spent by a
//!   sidecar that was then killed holding the answer uncommitted (in flight,
//!   or before the database was reachable for `ORPHAN_MS` after it:
//!   [`killed_holding`]) may be presented once more per such spender
//!   (many real servers have such a reuse grace), so one unlucky kill, or two
//!   holders killed in a row, does not end the run.
//! - Every call is recorded ([`Call`]: time, grant, sidecar from its
//!   `client_id` `chaos-sN` or header `x-chaos-sidecar`, refresh token
//!   presented and issued, as hashes), and calls in flight can be queried
//!   (which sidecar is the holder mid-call).
//! - Nothing here prints or records a token value or refresh token; only
//!   [`hash`]es leave this module.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::history::{Call, Kill, Ms, Outcome, Window, hash, killed_holding, now_ms};

/// What one collection's endpoint is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    ClientCredentials,
    /// Strictly rotating; the seed is the first refresh token.
    RefreshToken,
    HttpJson,
}

/// Per-call fault odds and latency; all drawn from the seed.
#[derive(Clone, Debug)]
pub struct Faults {
    pub latency_ms: (u64, u64),
    pub p_503: f64,
    pub p_429: f64,
    /// A hang (no answer for [`HANG`]): the sidecar's fetch times out.
    pub p_hang: f64,
}

impl Faults {
    pub fn none(latency: Duration) -> Self {
        let ms = latency.as_millis() as u64;
        Self {
            latency_ms: (ms, ms),
            p_503: 0.0,
            p_429: 0.0,
            p_hang: 0.0,
        }
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency_ms: (20, 400),
            p_503: 0.04,
            p_429: 0.03,
            p_hang: 0.02,
        }
    }
}

pub const HANG: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Endpoint {
    pub kind: Kind,
    /// Token lifetime in seconds, drawn per call from this range.
    pub ttl_secs: (u64, u64),
}

struct Coll {
    spec: Endpoint,
    /// The refresh token that works now; `None` once revoked.
    current_rt: Option<String>,
    /// Spent refresh token -> index of the call that spent it.
    spent: HashMap<String, usize>,
    /// (refresh token, spender) pairs whose one excused reuse is used.
    excused: HashSet<(String, usize)>,
    revoked: bool,
    /// The next call of this collection answers only after this long.
    slow_next: Option<Duration>,
    /// A value for `expires_in` (any JSON) the next http_json answers carry
    /// instead of a number (hostile input).
    hostile_expiry: Option<serde_json::Value>,
    serial: u64,
}

struct Inner {
    seed: u64,
    faults: Faults,
    colls: HashMap<String, Coll>,
    calls: Vec<Call>,
    kills: Vec<Kill>,
    /// Database outages the driver announced (the last one may be open).
    outages: Vec<Window>,
}

pub struct Upstream {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    _stop: DropGuard,
}

impl Upstream {
    /// Serves `endpoints` (name -> endpoint); refresh grants start from the
    /// seed refresh tokens returned by [`Upstream::seed_refresh_token`].
    pub async fn start(seed: u64, faults: Faults, endpoints: &[(&str, Endpoint)]) -> Arc<Self> {
        let colls = endpoints
            .iter()
            .map(|(name, spec)| {
                let current_rt = (spec.kind == Kind::RefreshToken)
                    .then(|| format!("rt-{name}-seed-{}", random_word()));
                (
                    (*name).to_owned(),
                    Coll {
                        spec: spec.clone(),
                        current_rt,
                        spent: HashMap::new(),
                        excused: HashSet::new(),
                        revoked: false,
                        slow_next: None,
                        hostile_expiry: None,
                        serial: 0,
                    },
                )
            })
            .collect();
        let inner = Arc::new(Mutex::new(Inner {
            seed,
            faults,
            colls,
            calls: Vec::new(),
            kills: Vec::new(),
            outages: Vec::new(),
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
        });
        Arc::new(Self {
            addr,
            inner,
            _stop: stop.drop_guard(),
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The refresh token a refresh-grant collection's configuration starts
    /// from (a secret: pass it by environment, never print it).
    pub fn seed_refresh_token(&self, collection: &str) -> String {
        let inner = self.inner.lock().unwrap();
        let c = &inner.colls[collection];
        c.current_rt.clone().unwrap_or_default()
    }

    /// Every call so far (in flight ones with `end: None`).
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    pub fn calls_of(&self, collection: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.collection == collection)
            .count()
    }

    /// The sidecar whose call of `collection` is in flight now, if any.
    pub fn in_flight(&self, collection: &str) -> Option<usize> {
        let inner = self.inner.lock().unwrap();
        inner
            .calls
            .iter()
            .rev()
            .find(|c| c.collection == collection && c.end.is_none())
            .and_then(|c| c.sidecar)
    }

    /// The next call of `collection` waits `d` before answering (so that a
    /// kill can land while it is in flight).
    pub fn slow_next(&self, collection: &str, d: Duration) {
        if let Some(c) = self.inner.lock().unwrap().colls.get_mut(collection) {
            c.slow_next = Some(d);
        }
    }

    /// http_json answers of `collection` carry this `expires_in` (any JSON)
    /// until set back to `None`.
    pub fn set_hostile_expiry(&self, collection: &str, v: Option<serde_json::Value>) {
        if let Some(c) = self.inner.lock().unwrap().colls.get_mut(collection) {
            c.hostile_expiry = v;
        }
    }

    /// The driver killed `sidecar` at `at`: refresh tokens it spent with the
    /// answer in flight may be presented once more.
    pub fn killed(&self, sidecar: usize, at: Ms) {
        self.inner.lock().unwrap().kills.push(Kill { sidecar, at });
    }

    /// The driver's database outages so far (the last one may be open).
    pub fn set_outages(&self, outages: &[Window]) {
        self.inner.lock().unwrap().outages = outages.to_vec();
    }

    /// Whether a refresh grant was revoked (a spent token was reused).
    pub fn revoked(&self, collection: &str) -> bool {
        self.inner.lock().unwrap().colls[collection].revoked
    }
}

fn random_word() -> String {
    let n: u128 = rand::random();
    format!("{n:032x}")
}

/// Which sidecar sent `req`: `client_id=chaos-sN` in the form, or the
/// `x-chaos-sidecar` header.
fn sidecar_of(form: &HashMap<String, String>, req_header: Option<&str>) -> Option<usize> {
    form.get("client_id")
        .and_then(|id| id.strip_prefix("chaos-s"))
        .or(req_header)
        .and_then(|n| n.parse().ok())
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// Marks a call ended when its answer is sent or the client gives up (the
/// handler's future is dropped).
struct Ending {
    inner: Arc<Mutex<Inner>>,
    index: usize,
}

impl Drop for Ending {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.calls[self.index].end = Some(now_ms());
        }
    }
}

/// What the handler decided under the lock: how long to wait, then what to
/// answer.
struct Plan {
    wait: Duration,
    response: Response,
}

async fn handle(State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let header = req
        .headers()
        .get("x-chaos-sidecar")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let Some(collection) = path
        .strip_prefix("/c/")
        .and_then(|p| p.split('/').next())
        .map(str::to_owned)
    else {
        return reply(StatusCode::NOT_FOUND, json!({"error": "not_found"}));
    };
    let (index, plan) = {
        let mut guard = inner.lock().unwrap();
        let inner_ref = &mut *guard;
        let Some(coll) = inner_ref.colls.get_mut(&collection) else {
            return reply(StatusCode::NOT_FOUND, json!({"error": "not_found"}));
        };
        let index = inner_ref.calls.len();
        let mut rng = StdRng::seed_from_u64(
            inner_ref.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let sidecar = sidecar_of(&form, header.as_deref());
        let mut call = Call {
            collection: collection.clone(),
            sidecar,
            grant: match coll.spec.kind {
                Kind::ClientCredentials => "client_credentials",
                Kind::RefreshToken => "refresh_token",
                Kind::HttpJson => "http_json",
            }
            .to_owned(),
            start: now_ms(),
            end: None,
            presented: None,
            issued_refresh: None,
            outcome: Outcome::Pending,
        };
        let f = &inner_ref.faults;
        let mut wait = Duration::from_millis(rng.random_range(f.latency_ms.0..=f.latency_ms.1));
        if let Some(slow) = coll.slow_next.take() {
            wait = slow;
        }
        let draw: f64 = rng.random();
        let response = if draw < f.p_503 {
            call.outcome = Outcome::Injected("503".into());
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "unavailable"}),
            )
        } else if draw < f.p_503 + f.p_429 {
            call.outcome = Outcome::Injected("429".into());
            let mut r = reply(StatusCode::TOO_MANY_REQUESTS, json!({"error": "slow_down"}));
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            r
        } else if draw < f.p_503 + f.p_429 + f.p_hang {
            call.outcome = Outcome::Injected("hang".into());
            wait = HANG;
            reply(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "hung"}))
        } else {
            let ttl = rng.random_range(coll.spec.ttl_secs.0..=coll.spec.ttl_secs.1);
            let (kills, outages) = (&inner_ref.kills, &inner_ref.outages);
            let calls = &inner_ref.calls;
            issue(coll, &collection, ttl, &form, &mut call, index, |spender| {
                let c: &Call = &calls[spender];
                c.sidecar.is_some_and(|s| {
                    kills
                        .iter()
                        .any(|k| k.sidecar == s && killed_holding(c, k.at, outages))
                })
            })
        };
        inner_ref.calls.push(call);
        (index, Plan { wait, response })
    };
    let _ending = Ending {
        inner: inner.clone(),
        index,
    };
    tokio::time::sleep(plan.wait).await;
    plan.response
}

/// Answers a non-faulty call: a token, or `invalid_grant`. For the refresh
/// grant it rotates, revokes or excuses; `orphaned(call index)` says whether
/// that call's sidecar was killed with its answer in flight.
fn issue(
    coll: &mut Coll,
    collection: &str,
    ttl: u64,
    form: &HashMap<String, String>,
    call: &mut Call,
    index: usize,
    orphaned: impl Fn(usize) -> bool,
) -> Response {
    coll.serial += 1;
    let value = format!("{collection}-{}-{}", coll.serial, random_word());
    let out_hash = hash(&value);
    match coll.spec.kind {
        Kind::ClientCredentials => {
            call.outcome = Outcome::Issued {
                hash: out_hash,
                expires_in: ttl,
            };
            reply(
                StatusCode::OK,
                json!({"access_token": value, "token_type": "bearer", "expires_in": ttl}),
            )
        }
        Kind::HttpJson => {
            let expires: serde_json::Value = match &coll.hostile_expiry {
                Some(v) => v.clone(),
                None => json!(ttl),
            };
            call.outcome = Outcome::Issued {
                hash: out_hash,
                expires_in: ttl,
            };
            reply(
                StatusCode::OK,
                json!({"access_token": value, "expires_in": expires}),
            )
        }
        Kind::RefreshToken => {
            let presented = form.get("refresh_token").cloned().unwrap_or_default();
            call.presented = Some(hash(&presented));
            let invalid = || reply(StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"}));
            if coll.revoked {
                call.outcome = Outcome::InvalidGrant;
                return invalid();
            }
            let ok = if coll.current_rt.as_deref() == Some(presented.as_str()) {
                true
            } else if let Some(&spender) = coll.spent.get(&presented) {
                if orphaned(spender) && coll.excused.insert((presented.clone(), spender)) {
                    true
                } else {
                    coll.revoked = true;
                    coll.current_rt = None;
                    false
                }
            } else {
                false
            };
            if !ok {
                call.outcome = Outcome::InvalidGrant;
                return invalid();
            }
            // The caller records `call` at `index`: the spender of `presented`.
            let next = format!("rt-{collection}-{}-{}", coll.serial, random_word());
            coll.spent.insert(presented, index);
            coll.current_rt = Some(next.clone());
            call.issued_refresh = Some(hash(&next));
            call.outcome = Outcome::Issued {
                hash: out_hash,
                expires_in: ttl,
            };
            reply(
                StatusCode::OK,
                json!({"access_token": value, "token_type": "bearer", "expires_in": ttl,
                       "refresh_token": next}),
            )
        }
    }
}
