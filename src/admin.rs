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

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;
use tracing::info;

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
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(AdminState { broker, draining })
        .merge(health);
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
