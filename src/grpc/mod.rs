//! The gRPC edge: the only module that sees generated protobuf types.
//!
//! Contract: requests are validated and converted to domain values here (a bad
//! field is INVALID_ARGUMENT naming it); domain errors become statuses in exactly
//! one place ([`status`]); nothing below this module knows about protobuf.

mod convert;
pub mod server;
mod service;
pub mod status;

/// Generated types and stubs of `token_broker.v1` (clients use them too).
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("token_broker.v1");
}

/// The encoded descriptor set of our proto, served by reflection.
pub const DESCRIPTOR: &[u8] = tonic::include_file_descriptor_set!("token_broker_descriptor");

/// The fully qualified service name, as health checks use it.
pub const SERVICE_NAME: &str = "token_broker.v1.TokenBroker";
