//! Server assembly: the `TokenBroker` service with its limits, health and
//! reflection (v1 and v1alpha), HTTP/2 keepalive, and graceful shutdown.
//!
//! Contract: `serve` takes an already-bound listener (tests bind port 0) and a
//! cancellation token; connections are accepted by [`super::peer::accept`]
//! (TLS when configured, its material re-read by [`crate::tls::Reloader`]
//! for as long as the server runs). On cancellation it stops accepting, ends watch streams,
//! lets in-flight calls finish and returns within `shutdown_grace`. Health says
//! SERVING for `""` and `token_broker.v1.TokenBroker` exactly while every
//! required collection holds a servable token (readiness), and SERVING for
//! `liveness` while the process runs; the admin listener serves the same
//! statuses.

use std::future::Future;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tracing::{info, warn};

use super::authz::Authz;
use super::pb::token_broker_server::TokenBrokerServer;
use super::peer;
use super::service::TokenBrokerService;
use super::{DESCRIPTOR, SERVICE_NAME};
use crate::broker::Broker;
use crate::config::ServerConfig;
use crate::listen::Listener;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// The health service name that says the process is alive (for liveness
/// probes): SERVING from start to exit, whatever the upstream or database do.
pub const LIVENESS: &str = "liveness";

/// Starts keeping health statuses in step with the broker: readiness for
/// `""` and the service name, and [`LIVENESS`]. Readiness turns NOT_SERVING
/// for good once `draining` is cancelled (shutdown, or the drain delay before
/// it), while the server keeps answering.
pub async fn health(broker: &Broker, draining: &CancellationToken) -> HealthReporter {
    let reporter = HealthReporter::new();
    for name in ["", SERVICE_NAME] {
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    let task = {
        let (broker, reporter, draining) = (broker.clone(), reporter.clone(), draining.clone());
        crate::supervise::spawn("health", None, draining.clone(), move || {
            health_loop(broker.clone(), reporter.clone(), draining.clone())
        })
    };
    broker.own_task(task);
    reporter
}

/// The `grpc.health.v1.Health` service answering from `reporter`.
pub fn health_service(reporter: &HealthReporter) -> HealthServer<HealthService> {
    HealthServer::new(HealthService::from_health_reporter(reporter.clone()))
}

/// Serves the token API (with health from `reporter`, and reflection) on
/// `listener` until `shutdown`, then drains within `cfg.shutdown_grace`;
/// over TLS when `cfg.tls` is set, with `authz` deciding who reads what.
pub async fn serve(
    broker: Broker,
    cfg: &ServerConfig,
    authz: Authz,
    listener: Listener,
    reporter: &HealthReporter,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let health = health_service(reporter);

    // Both reflection versions advertise both reflection services (each builder
    // would otherwise list only its own), health, and ours.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(DESCRIPTOR)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let service = TokenBrokerServer::new(TokenBrokerService::new(broker.clone(), cfg, authz))
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes);
    let router = Server::builder()
        .http2_keepalive_interval(Some(cfg.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.http2_keepalive_timeout))
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(service);

    // TLS material is loaded again here (config loading checked it): the
    // files may have changed since.
    let reloader = cfg.tls.clone().map(crate::tls::Reloader::new).transpose()?;
    let tls = reloader.as_ref().map(crate::tls::Reloader::current);
    let reloading = async {
        if let Some(r) = reloader {
            let metrics = broker.metrics();
            r.run(|ok| metrics.tls_reload(ok), shutdown.clone()).await;
        }
    };
    match (&listener, tls.is_some()) {
        (Listener::Tcp(l), tls) => {
            let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            info!(listen = %addr, tls, "serving");
        }
        (Listener::Unix(_, socket_file), _) => info!(listen = ?socket_file, "serving"),
    }
    // Connections come from our own accept loop (TLS handshakes, caller
    // identities; see `peer`); the channel only hands them over.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let accepting = peer::accept(listener, tls, tx, shutdown.clone());
    let stop = shutdown.clone();
    let signal = async move { stop.cancelled().await };
    let serving = drain(
        router.serve_with_incoming_shutdown(ReceiverStream::new(rx), signal),
        &shutdown,
        cfg.shutdown_grace,
    );
    let (result, (), ()) = tokio::join!(serving, accepting, reloading);
    result
}

/// Runs the server; once shutdown starts, gives it at most `grace` to drain.
async fn drain(
    serving: impl Future<Output = Result<(), tonic::transport::Error>>,
    shutdown: &CancellationToken,
    grace: Duration,
) -> Result<(), ServeError> {
    tokio::select! {
        result = serving => {
            info!("server stopped");
            Ok(result?)
        }
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            warn!(grace = ?grace, "shutdown grace period elapsed; closing remaining connections");
            Ok(())
        }
    }
}

/// Keeps the health status in step with the broker's readiness until
/// `draining`.
async fn health_loop(broker: Broker, reporter: HealthReporter, draining: CancellationToken) {
    let clock = broker.clock();
    let mut changes = broker.changes();
    let mut last: Option<bool> = None;
    loop {
        let readiness = broker.readiness();
        let ready = readiness.ready;
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter.set_service_status(SERVICE_NAME, status).await;
            info!(ready, waiting = ?readiness.waiting, "readiness changed");
            last = Some(ready);
        }
        // Readiness can also change without any event: when a token expires.
        let sleep = readiness
            .earliest_expiry
            .map_or(Duration::from_secs(60), |t| {
                clock.until(t) + Duration::from_millis(1)
            });
        tokio::select! {
            biased;
            () = draining.cancelled() => {
                reporter.set_service_status("", ServingStatus::NotServing).await;
                reporter.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
                return;
            }
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(sleep) => {}
        }
    }
}
