//! token-broker: a gRPC sidecar that hands short-lived upstream credentials to
//! the application beside it.
//!
//! Module map (see ARCHITECTURE.md for the invariants each one keeps):
//! - [`config`]: the TOML file, parsed once into typed values and validated
//!   before anything binds.
//! - [`broker`]: the core: per-collection state (L1), single-flight refresh,
//!   refresh policy, watch fan-out. Knows nothing of protobuf or SQL.
//! - [`store`]: the shared tier (L2) seam, the in-memory store and the
//!   Postgres store (rows, lease, encryption, migrations, LISTEN/NOTIFY).
//! - [`source`]: the upstream seam and its implementations.
//! - [`grpc`]: the only module that sees generated protobuf types: the service,
//!   validation, error-to-status mapping and server assembly.
//! - [`listen`]: listen addresses (TCP loopback or Unix socket).
//! - [`client`]: the human-facing client subcommands.
//! - [`telemetry`]: logging and OpenTelemetry trace set-up.
//! - [`metrics`]: the Prometheus metrics the broker and the gRPC layer record.
//! - [`admin`]: the admin listener (`/metrics`, `/livez`, `/readyz`, gRPC health).
//! - [`clock`]: the single wall-clock seam.
//! - [`supervise`]: background tasks restarted after a panic, with backoff.

pub mod admin;
pub mod broker;
pub mod client;
pub mod clock;
pub mod config;
pub mod grpc;
pub mod listen;
pub mod metrics;
pub mod source;
pub mod store;
pub mod supervise;
pub mod telemetry;
pub mod token;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// Opens the configured store: Postgres when `[store]` is set (migrated or
/// checked, its listener started), else the in-memory store.
pub async fn open_store(
    config: &config::Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<dyn store::Store>> {
    Ok(match &config.store {
        None => Arc::new(store::MemoryStore::new()),
        Some(settings) => store::PgStore::start(settings.clone(), shutdown.clone()).await?,
    })
}

/// Builds the broker from a validated config on `store` and serves it on
/// already-bound listeners until `shutdown` is cancelled (then drains within
/// the configured grace period). `draining` turns readiness NOT_SERVING (gRPC
/// health on both listeners, `/readyz`) while everything keeps serving: cancel
/// it before `shutdown` for a drain delay; it must be cancelled no later than
/// `shutdown` (pass `shutdown.child_token()`). The admin listener, if any,
/// stops last, so liveness holds while calls drain.
pub async fn run_on(
    config: config::Config,
    store: Arc<dyn store::Store>,
    listener: listen::Listener,
    admin: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
    draining: CancellationToken,
) -> anyhow::Result<()> {
    let broker =
        broker::Broker::from_config(&config, store, clock::Clock::system(), shutdown.clone())?;
    let reporter = grpc::server::health(&broker, &draining).await;
    let admin_stop = CancellationToken::new();
    let admin_task = admin.map(|l| {
        let (broker, reporter, stop) = (broker.clone(), reporter.clone(), admin_stop.clone());
        let draining = draining.clone();
        tokio::spawn(async move { admin::serve(l, broker, &reporter, draining, stop).await })
    });
    // While calls drain, a refresh in flight finishes (its commit carries a
    // rotated refresh token the upstream already spent the old one for),
    // within the same grace.
    let (served, stopped) = tokio::join!(
        grpc::server::serve_with(
            broker.clone(),
            &config.server,
            listener,
            &reporter,
            shutdown,
        ),
        broker.stopped(config.server.shutdown_grace),
    );
    if !stopped {
        tracing::warn!(
            grace = ?config.server.shutdown_grace,
            "a refresh in flight did not finish within shutdown_grace; exiting without it"
        );
    }
    admin_stop.cancel();
    if let Some(task) = admin_task {
        // Open health watches could hold the admin server: bound the wait.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), task).await;
    }
    served?;
    Ok(())
}

/// [`open_store`] then [`run_on`]: what the tests drive.
pub async fn run(
    config: config::Config,
    listener: listen::Listener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = open_store(&config, &shutdown).await?;
    let draining = shutdown.child_token();
    run_on(config, store, listener, None, shutdown, draining).await
}
