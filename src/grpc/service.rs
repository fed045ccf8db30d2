//! The `TokenBroker` service: admission control, deadlines, validation, then one
//! call into the broker per RPC.
//!
//! Admission: unary calls take a permit from a process-wide semaphore with
//! `try_acquire` (load shedding: over the limit is RESOURCE_EXHAUSTED at once,
//! never a queue); streams take one from a separate semaphore for their whole
//! life. Health and reflection are not limited.
//!
//! Authorization: after a request is validated and before the broker is
//! called, the caller (the connection's [`Caller`]) must be allowed by the
//! collection's `readers` ([`Authz`]); a refusal is PERMISSION_DENIED with
//! one message for every refused name, logged at warn and counted
//! (`token_broker_authz_refusals_total{rpc}`).
//!
//! Telemetry: each RPC runs in a span named after its method, continuing the
//! caller's W3C trace context when the metadata carries one, with the gRPC
//! status code recorded on it; each finished RPC is counted by method and code
//! (a `WatchToken` when its stream ends).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use super::authz::Authz;
use super::convert;
use super::pb;
use super::peer::Caller;
use super::status::ApiError;
use crate::broker::{Broker, BrokerError, Rejected};
use crate::config::ServerConfig;

pub struct TokenBrokerService {
    broker: Broker,
    authz: Authz,
    request_timeout: Duration,
    unary: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    /// `reason` lines at info level: at most one a second; the rest at debug,
    /// counted in the next info line.
    reasons: LogLimit,
}

/// A log line allowed at most once per `REASON_LOG_EVERY`.
#[derive(Default)]
struct LogLimit {
    /// When the last line went out, in ms since `epoch`.
    last_ms: AtomicU64,
    /// Lines held back since then.
    suppressed: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

const REASON_LOG_EVERY: Duration = Duration::from_secs(1);

impl LogLimit {
    /// `Some(lines suppressed since the last one)` when a line may go out now.
    fn admit(&self) -> Option<u64> {
        let epoch = *self.epoch.get_or_init(Instant::now);
        // +1 so that the first call (at 0 ms) is never mistaken for "just logged".
        let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        let every = u64::try_from(REASON_LOG_EVERY.as_millis()).unwrap_or(1000);
        if last != 0 && now.saturating_sub(last) < every {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

impl TokenBrokerService {
    pub fn new(broker: Broker, cfg: &ServerConfig, authz: Authz) -> Self {
        Self {
            broker,
            authz,
            request_timeout: cfg.request_timeout,
            unary: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
            streams: Arc::new(Semaphore::new(cfg.max_streams)),
            reasons: LogLimit::default(),
        }
    }
}

impl TokenBrokerService {
    /// Refuses `caller` unless `collection`'s readers allow it (see the
    /// module doc); the name is logged as asked, never echoed to the caller.
    fn authorize(
        &self,
        rpc: &'static str,
        collection: &str,
        caller: Option<&Caller>,
    ) -> Result<(), ApiError> {
        // Every connection carries a caller (`peer::accept`); one without is
        // anonymous. Built only then: this runs on every call.
        let anonymous;
        let caller = match caller {
            Some(c) => c,
            None => {
                anonymous = Caller::default();
                &anonymous
            }
        };
        if self.authz.allows(collection, caller) {
            return Ok(());
        }
        warn!(
            rpc,
            collection = %convert::Loggable(collection),
            caller = %caller,
            "caller refused: not among the collection's readers"
        );
        self.broker.metrics().authz_refusal(rpc);
        Err(ApiError::PermissionDenied)
    }
}

fn admit(sem: &Arc<Semaphore>, what: &'static str) -> Result<OwnedSemaphorePermit, ApiError> {
    sem.clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded(what))
}

/// An RPC's span: the caller's trace continues into it.
macro_rules! rpc_span {
    ($name:literal, $method:literal, $metadata:expr, $($field:tt)*) => {{
        let span = info_span!(
            $name,
            otel.name = concat!("token_broker.v1.TokenBroker/", $method),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = "token_broker.v1.TokenBroker",
            rpc.method = $method,
            rpc.grpc.status_code = Empty,
            $($field)*
        );
        crate::telemetry::set_remote_parent(&span, $metadata);
        span
    }};
}

/// Logs the outcome of an RPC inside its span, records it on the span and in
/// the metrics, and converts the error.
fn finish<T>(
    broker: &Broker,
    method: &'static str,
    started: Option<Instant>,
    result: Result<T, ApiError>,
) -> Result<T, Status> {
    let result = result.map_err(Status::from);
    let code = result
        .as_ref()
        .map_or_else(Status::code, |_| tonic::Code::Ok);
    record_code(code);
    broker
        .metrics()
        .rpc(method, code, started.map(|s| s.elapsed()));
    match result {
        Ok(v) => {
            debug!(code = "OK", "rpc done");
            Ok(v)
        }
        Err(status) => {
            info!(code = ?status.code(), error = status.message(), "rpc failed");
            Err(status)
        }
    }
}

/// Puts the status code on the current RPC span.
fn record_code(code: tonic::Code) {
    let span = Span::current();
    span.record("rpc.grpc.status_code", code as i32);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "ERROR");
    }
}

#[tonic::async_trait]
impl pb::token_broker_server::TokenBroker for TokenBrokerService {
    async fn get_collection_token(
        &self,
        request: Request<pb::GetCollectionTokenRequest>,
    ) -> Result<Response<pb::GetCollectionTokenResponse>, Status> {
        let started = Instant::now();
        let deadline = convert::deadline(request.metadata(), self.request_timeout);
        let (metadata, extensions, req) = request.into_parts();
        let span = rpc_span!(
            "get_collection_token",
            "GetCollectionToken",
            &metadata,
            collection = %convert::Loggable(&req.collection),
        );
        let result = async {
            let _permit = admit(
                &self.unary,
                "too many requests in progress; retry with backoff",
            )?;
            let name = convert::collection(&req.collection)?.as_str();
            let min_remaining = convert::min_remaining(req.min_remaining)?;
            self.authorize("GetCollectionToken", name, extensions.get())?;
            let served = self.broker.get(name, min_remaining, deadline).await?;
            Ok(Response::new(pb::GetCollectionTokenResponse {
                token: Some(convert::token(name, &served)),
            }))
        }
        .instrument(span.clone())
        .await;
        span.in_scope(|| finish(&self.broker, "GetCollectionToken", Some(started), result))
    }

    async fn invalidate_token(
        &self,
        request: Request<pb::InvalidateTokenRequest>,
    ) -> Result<Response<pb::InvalidateTokenResponse>, Status> {
        let started = Instant::now();
        let deadline = convert::deadline(request.metadata(), self.request_timeout);
        let (metadata, extensions, req) = request.into_parts();
        let span = rpc_span!(
            "invalidate_token",
            "InvalidateToken",
            &metadata,
            collection = %convert::Loggable(&req.collection),
            version = req.version,
        );
        let result = async {
            let _permit = admit(
                &self.unary,
                "too many requests in progress; retry with backoff",
            )?;
            let name = convert::collection(&req.collection)?.as_str();
            let reason = convert::reason(&req.reason)?;
            let rejected = match (req.version, req.value.as_str()) {
                (0, "") => {
                    return Err(ApiError::invalid(
                        "version",
                        "give the rejected token's version (or its value)",
                    ));
                }
                (v, "") => Rejected::Version(v),
                (0, value) => Rejected::Value(value),
                (v, value) => Rejected::Both(v, value),
            };
            self.authorize("InvalidateToken", name, extensions.get())?;
            match self.reasons.admit() {
                Some(suppressed) => {
                    info!(reason = %reason.escape_debug(), suppressed, "upstream rejected a token");
                }
                None => debug!(reason = %reason.escape_debug(), "upstream rejected a token"),
            }
            let (served, refreshed) = self.broker.invalidate(name, rejected, deadline).await?;
            info!(
                refreshed,
                current_version = served.token.version,
                "invalidation handled"
            );
            Ok(Response::new(pb::InvalidateTokenResponse {
                token: Some(convert::token(name, &served)),
                refreshed,
            }))
        }
        .instrument(span.clone())
        .await;
        span.in_scope(|| finish(&self.broker, "InvalidateToken", Some(started), result))
    }

    type WatchTokenStream = ReceiverStream<Result<pb::WatchTokenResponse, Status>>;

    async fn watch_token(
        &self,
        request: Request<pb::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let (metadata, extensions, req) = request.into_parts();
        let span = rpc_span!(
            "watch_token",
            "WatchToken",
            &metadata,
            collection = %convert::Loggable(&req.collection),
            after_version = req.after_version,
        );
        let opened = span.in_scope(|| {
            let permit = admit(&self.streams, "too many watch streams open")?;
            let name = convert::collection(&req.collection)?.as_str().to_owned();
            self.authorize("WatchToken", &name, extensions.get())?;
            let watch = self.broker.watch(&name, req.after_version)?;
            Ok::<_, ApiError>((permit, name, watch))
        });
        let (permit, name, mut watch) = match opened {
            Ok(v) => v,
            Err(e) => return span.in_scope(|| finish(&self.broker, "WatchToken", None, Err(e))),
        };
        let (tx, rx) = mpsc::channel(4);
        let broker = self.broker.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                debug!("watch opened");
                let code = loop {
                    let batch = tokio::select! {
                        biased;
                        () = tx.closed() => break tonic::Code::Cancelled,
                        batch = watch.next() => batch,
                    };
                    let Some(batch) = batch else {
                        let status = Status::from(ApiError::Broker(BrokerError::ShuttingDown));
                        let code = status.code();
                        let _ = tx.send(Err(status)).await;
                        break code;
                    };
                    let mut closed = false;
                    for served in batch {
                        let msg = pb::WatchTokenResponse {
                            token: Some(convert::token(&name, &served)),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            closed = true;
                            break;
                        }
                        debug!(version = served.token.version, "watch sent a token");
                    }
                    if closed {
                        break tonic::Code::Cancelled;
                    }
                };
                // The stream's gauge goes down with the watch, before the count.
                drop(watch);
                record_code(code);
                broker.metrics().rpc("WatchToken", code, None);
                debug!(code = ?code, "watch ended");
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
