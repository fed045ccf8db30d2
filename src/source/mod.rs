//! The upstream seam: a [`Source`] turns "give me a fresh credential" into a
//! [`Fetched`] value or a classified [`FetchError`].
//!
//! Contract: a source never returns an error document as a token; it classifies
//! every failure as transient or permanent ([`FailureClass`]); error details it
//! returns are safe to log and never contain secrets or upstream bodies. Sources
//! hold no refresh state of their own: single-flight, backoff and caching live in
//! the broker.

mod demo;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use crate::token::Secret;

pub use demo::DemoSource;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a source got from its upstream.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub value: Secret,
    /// The upstream's own absolute expiry; `None` for opaque tokens (the
    /// collection's `max_age` then decides when to refresh).
    pub expires_at: Option<SystemTime>,
}

/// Context handed to each fetch.
#[derive(Debug, Clone)]
pub struct FetchContext {
    pub collection: String,
    /// The broker's wall-clock time at the start of the fetch.
    pub now: SystemTime,
}

/// Why a fetch failed. A small, bounded set: it is used in messages to callers
/// and (later) as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// Could not connect to the upstream.
    Connect,
    /// The upstream did not answer within the fetch timeout.
    Timeout,
    /// The upstream answered 5xx.
    UpstreamError,
    /// The upstream answered 429.
    RateLimited,
    /// The store could not be read or written.
    Store,
    /// The upstream refused our credentials (e.g. `invalid_client`, 401 on the token endpoint).
    InvalidCredentials,
    /// The upstream rejected the refresh token (`invalid_grant`).
    InvalidGrant,
    /// The upstream answered another 4xx.
    Rejected,
    /// The upstream answered something that is not a usable token
    /// (malformed, missing field, error document, already expired).
    BadResponse,
    /// A bug: the fetch panicked.
    Internal,
}

impl FailureClass {
    /// Permanent failures will not fix themselves by retrying soon; callers see
    /// `FAILED_PRECONDITION` instead of `UNAVAILABLE`. Both still back off and retry.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            Self::InvalidCredentials | Self::InvalidGrant | Self::Rejected | Self::BadResponse
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::UpstreamError => "upstream_error",
            Self::RateLimited => "rate_limited",
            Self::Store => "store",
            Self::InvalidCredentials => "invalid_credentials",
            Self::InvalidGrant => "invalid_grant",
            Self::Rejected => "rejected",
            Self::BadResponse => "bad_response",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified fetch failure. `detail` is safe to log (no secrets, no bodies).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{class}: {detail}")]
pub struct FetchError {
    pub class: FailureClass,
    pub detail: String,
    /// A minimum delay before the next attempt that the upstream asked for
    /// (e.g. `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl FetchError {
    pub fn new(class: FailureClass, detail: impl Into<String>) -> Self {
        Self {
            class,
            detail: detail.into(),
            retry_after: None,
        }
    }
}

/// An upstream that mints credentials for one collection.
pub trait Source: Send + Sync + 'static {
    /// A short name of the source kind, for logs.
    fn kind(&self) -> &'static str;

    /// Fetches a fresh credential. Called by at most one task per collection at
    /// a time, under the broker's fetch timeout.
    fn fetch(&self, ctx: FetchContext) -> BoxFuture<'_, Result<Fetched, FetchError>>;
}
