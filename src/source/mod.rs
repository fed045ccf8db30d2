//! The upstream seam: a [`Source`] turns "give me a fresh credential" into a
//! [`Fetched`] value or a classified [`FetchError`].
//!
//! Contract: a source never returns an error document as a token; it classifies
//! every failure as transient or permanent ([`FailureClass`]); error details it
//! returns are safe to log and never contain secrets or upstream bodies. Sources
//! hold no refresh state of their own: single-flight, backoff and caching live in
//! the broker.

mod demo;
pub mod http;
mod http_json;
mod oauth;
mod overdrive;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use crate::token::Secret;

pub use demo::DemoSource;
pub use http_json::{Body, ExpiresFormat, HttpJsonSource, HttpJsonSpec, JsonSpec, ValueSpec};
pub use oauth::{ClientAuth, Grant, OAuthSource, OAuthSpec};
pub use overdrive::{OverDriveSource, OverDriveSpec};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a source got from its upstream.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub value: Secret,
    /// The upstream's own absolute expiry; `None` for opaque tokens (the
    /// collection's `max_age` then decides when to refresh).
    pub expires_at: Option<SystemTime>,
    /// A refresh token the upstream issued with this token (rotation). The
    /// store commits it in the same write as the token, before it is served.
    pub refresh_token: Option<Secret>,
    /// The version of the parent collection's token this one was fetched with.
    pub parent_version: Option<u64>,
}

impl Fetched {
    /// A token with nothing attached.
    pub fn token(value: Secret, expires_at: Option<SystemTime>) -> Self {
        Self {
            value,
            expires_at,
            refresh_token: None,
            parent_version: None,
        }
    }
}

/// A parent collection's token as a dependent source sees it.
#[derive(Debug, Clone)]
pub struct ParentToken {
    pub value: Secret,
    pub version: u64,
}

/// How a dependent source reaches the collection it depends on. The broker
/// implements it: tokens are shared with every other reader of the parent,
/// never minted per use.
pub trait Parents: Send + Sync {
    /// A servable token of `collection`, waiting (within the fetch's time) for
    /// its refresh when there is none. When the parent token this source last
    /// used was reported rejected, waits for its replacement instead.
    fn token<'a>(&'a self, collection: &'a str) -> BoxFuture<'a, Result<ParentToken, FetchError>>;

    /// Compare-and-invalidate: reports that the upstream rejected `version` of
    /// `collection`, and returns a newer token. Many children reporting the
    /// same version cause one refresh of the parent.
    fn reject<'a>(
        &'a self,
        collection: &'a str,
        version: u64,
    ) -> BoxFuture<'a, Result<ParentToken, FetchError>>;
}

/// Context handed to each fetch.
#[derive(Clone)]
pub struct FetchContext {
    pub collection: String,
    /// The broker's wall-clock time at the start of the fetch.
    pub now: SystemTime,
    /// The refresh token the store holds for this collection (the latest one
    /// the upstream issued); `None` before the first rotation.
    pub refresh_token: Option<Secret>,
    /// Access to the collections this source depends on.
    pub parents: std::sync::Arc<dyn Parents>,
}

impl fmt::Debug for FetchContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchContext")
            .field("collection", &self.collection)
            .field("now", &self.now)
            .field("refresh_token", &self.refresh_token)
            .finish_non_exhaustive()
    }
}

/// Why a fetch failed. A small, bounded set: it is used in messages to callers
/// and as a metric label. (A store that cannot be read or written is not a
/// failed fetch: the broker serves from memory and refreshes locally.)
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
    /// The upstream refused our credentials (e.g. `invalid_client`, 401 on the token endpoint).
    InvalidCredentials,
    /// The upstream rejected the refresh token (`invalid_grant`).
    InvalidGrant,
    /// The upstream answered another 4xx.
    Rejected,
    /// The upstream answered something that is not a usable token
    /// (malformed, missing field, error document, already expired).
    BadResponse,
    /// The collection this one depends on has no usable token yet.
    Dependency,
    /// A bug: the fetch panicked.
    Internal,
}

impl FailureClass {
    pub const ALL: [FailureClass; 10] = [
        Self::Connect,
        Self::Timeout,
        Self::UpstreamError,
        Self::RateLimited,
        Self::InvalidCredentials,
        Self::InvalidGrant,
        Self::Rejected,
        Self::BadResponse,
        Self::Dependency,
        Self::Internal,
    ];

    /// The class named by [`as_str`](Self::as_str) (as stored in the shared tier).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }

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
            Self::InvalidCredentials => "invalid_credentials",
            Self::InvalidGrant => "invalid_grant",
            Self::Rejected => "rejected",
            Self::BadResponse => "bad_response",
            Self::Dependency => "dependency",
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

    /// The collection this source depends on, if any.
    fn parent(&self) -> Option<&str> {
        None
    }

    /// For sources that rotate refresh tokens: a fingerprint of the configured
    /// seed. A stored refresh token that descends from another seed is ignored,
    /// so a new seed configured after `invalid_grant` takes effect.
    fn seed_fingerprint(&self) -> Option<String> {
        None
    }

    /// Fetches a fresh credential. Called by at most one task per collection at
    /// a time, under the broker's fetch timeout.
    fn fetch(&self, ctx: FetchContext) -> BoxFuture<'_, Result<Fetched, FetchError>>;

    /// For a source that is another token-broker: the remote, which the
    /// broker follows instead of fetching (no refresher, no store).
    fn remote(&self) -> Option<std::sync::Arc<dyn Remote>> {
        None
    }
}

/// A token stream from another token-broker (`WatchToken`), each token with
/// the version and instants the remote gave it.
pub type TokenStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<crate::token::Token, FetchError>> + Send>>;

/// A source that is another token-broker: followed, not fetched. Its tokens
/// keep the version and the instants the remote assigned, so a version means
/// the same token at every tier. Endpoints are indexed `0..endpoints()`, in
/// the configured order; the broker chooses which one to use (failover and
/// backoff live in the broker, as for every source).
///
/// Contract: a token that is malformed (no value, version 0, missing or
/// inconsistent instants) is a `BadResponse` error, never a token; error
/// details are safe to log.
pub trait Remote: Send + Sync + 'static {
    /// How many addresses there are (at least one).
    fn endpoints(&self) -> usize;

    /// Address `i`, for logs.
    fn endpoint(&self, i: usize) -> String;

    /// Opens `WatchToken` on endpoint `i` for the tokens after
    /// `after_version`; resolves once the remote has accepted the stream.
    fn watch(&self, i: usize, after_version: u64)
    -> BoxFuture<'_, Result<TokenStream, FetchError>>;

    /// `GetCollectionToken` on endpoint `i`, within `timeout`.
    fn get(
        &self,
        i: usize,
        min_remaining: Option<Duration>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<RemoteToken, FetchError>>;

    /// `InvalidateToken` of `version` (compare-and-invalidate at the remote)
    /// on endpoint `i`, within `timeout`.
    fn invalidate(
        &self,
        i: usize,
        version: u64,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<RemoteToken, FetchError>>;
}

/// A remote broker's answer to a unary call.
#[derive(Debug, Clone)]
pub struct RemoteToken {
    pub token: crate::token::Token,
    /// The remote serves it past `refresh_at` because its refresh is failing.
    pub stale: bool,
}
