//! token-broker: a gRPC sidecar that hands short-lived upstream credentials to
//! the application beside it.
//!
//! Module map (see ARCHITECTURE.md for the invariants each one keeps):
//! - [`config`]: the TOML file, parsed once into typed values and validated
//!   before anything binds.
//! - [`broker`]: the core: per-collection state (L1), single-flight refresh,
//!   refresh policy, watch fan-out. Knows nothing of protobuf or SQL.
//! - [`store`]: the shared tier (L2) seam and its in-memory implementation.
//! - [`source`]: the upstream seam and its implementations.
//! - [`grpc`]: the only module that sees generated protobuf types: the service,
//!   validation, error-to-status mapping and server assembly.
//! - [`listen`]: listen addresses (TCP loopback or Unix socket).
//! - [`client`]: the human-facing client subcommands.
//! - [`telemetry`]: logging set-up.
//! - [`clock`]: the single wall-clock seam.

pub mod broker;
pub mod client;
pub mod clock;
pub mod config;
pub mod grpc;
pub mod listen;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod token;

use tokio_util::sync::CancellationToken;

/// Builds the broker from a validated config and serves it on an already-bound
/// listener until `shutdown` is cancelled (then drains within the configured
/// grace period). `main` and the tests both drive this one function.
pub async fn run(
    config: config::Config,
    listener: listen::Listener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let broker = broker::Broker::from_config(&config, clock::Clock::system(), shutdown.clone())?;
    grpc::serve(broker, &config.server, listener, shutdown).await?;
    Ok(())
}
