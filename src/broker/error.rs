//! Errors the broker reports to its callers. Messages are safe to show a client:
//! collection names, failure classes and times, never tokens or upstream bodies.

use std::time::{Duration, SystemTime};

use crate::source::FailureClass;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("collection {0:?} is not configured")]
    UnknownCollection(String),

    /// No servable token, and the last refresh attempt failed.
    #[error(
        "collection {collection:?} has no servable token: upstream failing ({class}, {failures} consecutive failures); next attempt at {}",
        humantime::format_rfc3339_seconds(*next_attempt_at)
    )]
    UpstreamFailing {
        collection: String,
        class: FailureClass,
        failures: u32,
        next_attempt_at: SystemTime,
        /// `next_attempt_at` measured from the broker's clock when the error arose.
        retry_in: Duration,
    },

    /// The caller's deadline passed while waiting for a refresh.
    #[error("collection {collection:?}: deadline exceeded while waiting for a refresh")]
    DeadlineExceeded { collection: String },

    #[error("server is shutting down")]
    ShuttingDown,
}
