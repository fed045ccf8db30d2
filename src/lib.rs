//! token-broker: a gRPC sidecar that hands short-lived upstream credentials to
//! the application beside it.
//!
//! Module map (see ARCHITECTURE.md for the invariants each one keeps):
//! - [`app`]: the one assembly point: store, sources, broker, listeners and
//!   servers, built from a validated config (`main`, tests and bench use it).
//! - [`config`]: the TOML file, parsed once into typed values and validated
//!   before anything binds.
//! - [`broker`]: the core: per-collection state (L1), single-flight refresh,
//!   refresh policy, watch fan-out. Knows nothing of protobuf or SQL.
//! - [`store`]: the shared tier (L2) seam, the in-memory store and the
//!   Postgres store (rows, lease, encryption, migrations, LISTEN/NOTIFY).
//! - [`source`]: the upstream seam and its implementations.
//! - [`grpc`]: the only module that sees generated protobuf types: the service,
//!   validation, error-to-status mapping and server assembly.
//! - [`listen`]: listen addresses (TCP or Unix socket).
//! - [`tls`]: the token API's TLS material (loaded, re-read on change) and
//!   the identities a client certificate names.
//! - [`client`]: the human-facing client subcommands.
//! - [`telemetry`]: logging and OpenTelemetry trace set-up.
//! - [`metrics`]: the Prometheus metrics the broker and the gRPC layer record.
//! - [`admin`]: the admin listener (`/metrics`, `/livez`, `/readyz`, gRPC health).
//! - [`clock`]: the single wall-clock seam.
//! - [`supervise`]: background tasks restarted after a panic, with backoff.

pub mod admin;
pub mod app;
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
pub mod tls;
pub mod token;
