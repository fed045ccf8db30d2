//! The one assembly point: everything a running token-broker is made of is
//! built here, from a validated [`Config`], and nowhere else. `main` parses
//! arguments and calls [`serve`]; the tests and the bench call [`run`] (or
//! [`serve_api`] with a broker of their own specs) on listeners they bound.
//!
//! Contract:
//! - Order of a start: the store first (a database that refuses us fails
//!   before any port is bound), then the listeners, then the broker and its
//!   tasks, then the servers.
//! - Ownership: the broker owns every background task it and the servers
//!   start (refreshers, the follower, the health loop; supervised, see
//!   [`crate::supervise`]); the store owns its listener task. A stop cancels
//!   `shutdown`, the gRPC server drains within `shutdown_grace` while the
//!   broker's tasks finish (a refresh in flight commits), the admin listener
//!   stops after them, so liveness holds while calls drain, and [`run`]
//!   awaits the store's listener last ([`Store::close`], bounded). Every
//!   background task is awaited, except the signal task (see [`serve`]).
//! - Nothing under `broker/` reads the configuration: sources are built here
//!   ([`sources`]) and handed to the broker as [`CollectionSpec`]s.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, CollectionSpec};
use crate::clock::Clock;
use crate::config::{Config, ServerConfig, SourceConfig};
use crate::grpc::authz::Authz;
use crate::grpc::remote::BrokerSource;
use crate::listen::{BindError, Listener, Origin};
use crate::source::http::HttpClient;
use crate::source::{DemoSource, HttpJsonSource, OAuthSource, OverDriveSource, Source};
use crate::store::{MemoryStore, PgStore, Store};

/// Builds every collection's source from the config, sharing one HTTP client.
pub fn sources(config: &Config) -> anyhow::Result<Vec<CollectionSpec>> {
    let http = HttpClient::new(&config.http)?;
    config
        .collections
        .iter()
        .map(|c| {
            let source: Arc<dyn Source> = match &c.source {
                SourceConfig::Demo { ttl } => Arc::new(DemoSource::new(*ttl)),
                SourceConfig::OAuth(spec) => Arc::new(OAuthSource::new(spec.clone(), http.clone())),
                SourceConfig::OverDrive(spec) => Arc::new(
                    OverDriveSource::new(spec.clone(), http.clone())
                        .map_err(|e| anyhow::anyhow!("collections.{}.source: {e}", c.name))?,
                ),
                SourceConfig::HttpJson(spec) => {
                    Arc::new(HttpJsonSource::new(spec.clone(), http.clone()))
                }
                SourceConfig::Broker(spec) => Arc::new(BrokerSource::new(spec.clone())),
            };
            Ok(CollectionSpec {
                name: c.name.clone(),
                source,
                policy: c.policy.clone(),
                prefetch: c.prefetch,
                required: c.required,
            })
        })
        .collect()
}

/// Who may read which collection, from each collection's `readers`; the
/// gRPC layer enforces it (the broker never sees it).
pub fn authz(config: &Config) -> Authz {
    Authz::new(
        config
            .collections
            .iter()
            .map(|c| (c.name.as_str(), c.readers.as_deref())),
    )
}

/// Opens the configured store: Postgres when `[store]` is set (migrated or
/// checked, its listener started), else the in-memory store.
pub async fn open_store(
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &config.store {
        None => Arc::new(MemoryStore::new()),
        Some(settings) => PgStore::start(settings.clone(), shutdown.clone()).await?,
    })
}

/// The bound listeners of one sidecar: the token API and, when configured,
/// the admin listener.
pub struct Listeners {
    pub api: Listener,
    pub admin: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Binds the configured addresses; `api` and `admin` say where each came
    /// from (file or flag), for the error that names what to change.
    pub async fn bind(config: &Config, api: Origin, admin: Origin) -> Result<Self, BindError> {
        let listener = Listener::bind(&config.server.listen)
            .await
            .map_err(|e| BindError::new(api, &config.server.listen, &e))?;
        let admin_listener = match &config.admin {
            None => None,
            Some(a) => Some(
                tokio::net::TcpListener::bind(a.listen)
                    .await
                    .map_err(|e| BindError::new(admin, &a.listen, &e))?,
            ),
        };
        Ok(Self {
            api: listener,
            admin: admin_listener,
        })
    }
}

/// `token-broker serve`: opens the store, binds, and serves until the first
/// SIGTERM or SIGINT has drained (see `signals`: a second signal exits at once).
pub async fn serve(config: Config, api: Origin, admin: Origin) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    // Cancelled at the first signal, and with `shutdown` at the latest.
    let draining = shutdown.child_token();
    let store = open_store(&config, &shutdown).await?;
    let listeners = Listeners::bind(&config, api, admin).await?;
    // Not joined: it lives until the process exits, so that a second signal
    // during the last flush (telemetry, after `run`) still exits at once.
    tokio::spawn(signals(
        shutdown.clone(),
        draining.clone(),
        config.server.shutdown_delay,
    ));
    run(config, store, listeners, shutdown, draining).await
}

/// Builds the broker from a validated config on `store` and serves it on
/// `listeners` (see [`serve_broker`]).
pub async fn run(
    config: Config,
    store: Arc<dyn Store>,
    listeners: Listeners,
    shutdown: CancellationToken,
    draining: CancellationToken,
) -> anyhow::Result<()> {
    let broker = Broker::start(
        sources(&config)?,
        store.clone(),
        Clock::system(),
        shutdown.clone(),
    );
    let authz = authz(&config);
    let served = serve_broker(broker, &config.server, authz, listeners, shutdown, draining).await;
    // The store's listener ends with `shutdown`; whatever it is stuck on
    // (a black-holed connection) must not hold the exit up for long.
    if tokio::time::timeout(Duration::from_secs(2), store.close())
        .await
        .is_err()
    {
        tracing::warn!("the store's listener did not stop within 2 s; exiting without it");
    }
    served
}

/// Serves `broker` until `shutdown` is cancelled, then drains within
/// `server.shutdown_grace`. `draining` turns readiness NOT_SERVING (gRPC
/// health on both listeners, `/readyz`) while everything keeps serving:
/// cancel it before `shutdown` for a drain delay; it must be cancelled no
/// later than `shutdown` (pass `shutdown.child_token()`). The admin listener,
/// if any, stops last, so liveness holds while calls drain.
pub async fn serve_broker(
    broker: Broker,
    server: &ServerConfig,
    authz: Authz,
    listeners: Listeners,
    shutdown: CancellationToken,
    draining: CancellationToken,
) -> anyhow::Result<()> {
    let reporter = crate::grpc::server::health(&broker, &draining).await;
    let admin_stop = CancellationToken::new();
    let admin_task = listeners.admin.map(|l| {
        let (broker, reporter, stop) = (broker.clone(), reporter.clone(), admin_stop.clone());
        let draining = draining.clone();
        tokio::spawn(async move { crate::admin::serve(l, broker, &reporter, draining, stop).await })
    });
    // While calls drain, a refresh in flight finishes (its commit carries a
    // rotated refresh token the upstream already spent the old one for),
    // within the same grace.
    let (served, stopped) = tokio::join!(
        crate::grpc::server::serve(
            broker.clone(),
            server,
            authz,
            listeners.api,
            &reporter,
            shutdown,
        ),
        broker.stopped(server.shutdown_grace),
    );
    if !stopped {
        tracing::warn!(
            grace = ?server.shutdown_grace,
            "a refresh in flight did not finish within shutdown_grace; exiting without it"
        );
    }
    admin_stop.cancel();
    if let Some(task) = admin_task {
        // Open health watches could hold the admin server: bound the wait.
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    served?;
    Ok(())
}

/// The token API alone (with its health statuses) on `listener` until
/// `shutdown`, then drained within `server.shutdown_grace`: no admin listener,
/// and no wait for the broker's tasks (a refresh in flight is abandoned, not
/// committed). For tests of the gRPC layer with a broker of scripted sources
/// (`authz`: [`Authz::open`], or [`authz`] of a config).
pub async fn serve_api(
    broker: Broker,
    server: &ServerConfig,
    authz: Authz,
    listener: Listener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let reporter = crate::grpc::server::health(&broker, &shutdown).await;
    crate::grpc::server::serve(broker, server, authz, listener, &reporter, shutdown).await?;
    Ok(())
}

/// On the first SIGTERM or SIGINT: with a `delay`, cancels `draining` at once
/// (readiness turns NOT_SERVING; the token API keeps answering) and
/// `shutdown` after the delay; without one, `shutdown` at once. A second
/// signal exits at once without waiting for the delay or the grace period
/// (a Unix socket file left behind is replaced as stale at the next start).
async fn signals(shutdown: CancellationToken, draining: CancellationToken, delay: Duration) {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    async fn next(term: &mut Signal, int: &mut Signal) -> &'static str {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
    let name = next(&mut term, &mut int).await;
    if delay.is_zero() {
        tracing::info!(signal = name, "shutting down");
    } else {
        tracing::info!(
            signal = name,
            delay = %humantime::format_duration(delay),
            "draining: readiness is NOT_SERVING, tokens are still served until the delay ends"
        );
        draining.cancel();
        tokio::select! {
            () = tokio::time::sleep(delay) => tracing::info!("drain delay over; shutting down"),
            name = next(&mut term, &mut int) => second_signal(name),
        }
    }
    shutdown.cancel();
    let name = next(&mut term, &mut int).await;
    second_signal(name);
}

fn second_signal(name: &str) -> ! {
    tracing::warn!(signal = name, "second signal; exiting without draining");
    std::process::exit(130);
}
