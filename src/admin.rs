//! The admin listener: Prometheus metrics, liveness and readiness for
//! operators and Kubernetes, on its own TCP port apart from the token API.
//!
//! Contract: one port speaks HTTP/1.1 and h2c. `GET /metrics` is the Prometheus
//! text format; `GET /livez` is 200 while the process runs (it depends on
//! neither the upstream nor the database); `GET /readyz` is 200 when every
//! required collection holds a servable token, else 503 naming the
//! collections still waiting (or saying that the server is draining); and `grpc.health.v1.Health` answers the same
//! statuses as on the token API (`""` and `token_broker.v1.TokenBroker`:
//! readiness; `liveness`: alive), so Kubernetes `grpc:` probes can reach it on
//! the pod IP while the token API stays on loopback or a Unix socket. Nothing
//! served here carries a token or a secret.
//!
//! Bounded: the port may face the pod network, so at most
//! `MAX_CONNECTIONS` connections are open at once (more are closed as soon as
//! they are accepted) and at most `MAX_IN_FLIGHT` requests run at once,
//! counting an open health `Watch` stream for its whole life (more get 503,
//! or `UNAVAILABLE` for gRPC). A flood of watches cannot grow
//! the sidecar's memory past a few MiB.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;
use tracing::{debug, info};

use crate::broker::Broker;

/// The Content-Type of `/metrics` (the encoder writes the OpenMetrics text
/// flavour, which Prometheus negotiates and parses).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the handlers read.
#[derive(Clone)]
struct AdminState {
    broker: Broker,
    /// Cancelled when a shutdown drain starts: `/readyz` answers 503 from then.
    draining: CancellationToken,
}

/// Serves the admin endpoints on `listener` until `stop` is cancelled;
/// `/readyz` says not ready once `draining` is cancelled.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    reporter: &HealthReporter,
    draining: CancellationToken,
    stop: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(admin = %addr, "admin listener serving /metrics, /livez, /readyz and gRPC health");
    }
    let health = tonic::service::Routes::new(crate::grpc::server::health_service(reporter))
        .into_axum_router();
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(AdminState { broker, draining })
        .merge(health)
        .layer(axum::middleware::from_fn(move |req, next| {
            limit(in_flight.clone(), req, next)
        }));
    let listener = Capped {
        inner: listener,
        open: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.broker.metrics_text(),
    )
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    if state.draining.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".to_owned(),
        );
    }
    let r = state.broker.readiness();
    if r.ready {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: no servable token yet for {}\n",
                r.waiting.join(", ")
            ),
        )
    }
}

/// Open connections at most; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Requests in progress at most (a health `Watch` counts while open).
pub const MAX_IN_FLIGHT: usize = 128;

/// Runs the request with a permit held until its response body ends (for a
/// stream, until it closes); 503 when none is left.
async fn limit(sem: Arc<Semaphore>, req: Request, next: Next) -> Response {
    let Ok(permit) = sem.try_acquire_owned() else {
        const BUSY: &str = "too many admin requests in progress";
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        // A gRPC client reads a trailers-only UNAVAILABLE; others get 503.
        return if grpc {
            tonic::Status::unavailable(BUSY).into_http::<Body>()
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{BUSY}\n")).into_response()
        };
    };
    next.run(req).await.map(|body| {
        Body::new(Permitted {
            body,
            _permit: permit,
        })
    })
}

/// A response body that holds a permit until it is dropped.
struct Permitted {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for Permitted {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The admin listener with a cap on open connections.
struct Capped {
    inner: TcpListener,
    open: Arc<Semaphore>,
}

impl axum::serve::Listener for Capped {
    type Io = CappedIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.open.clone().try_acquire_owned() {
                Ok(permit) => {
                    return (
                        CappedIo {
                            io,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                Err(_) => debug!(peer = %addr, "admin connection refused: too many open"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection holding one of the listener's permits.
struct CappedIo {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for CappedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CappedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
