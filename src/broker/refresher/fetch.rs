//! One call of the source: [`fetch_token`] runs it in its own task under the
//! collection's `fetch_timeout` (a panicking source is a failure of class
//! `internal`, not a dead refresher) and checks what came back
//! ([`deliverable`]: at most [`MAX_TOKEN_BYTES`], no control characters), so
//! upstream garbage is an error, never a token.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::Instrument;

use crate::broker::{Collection, Shared};
use crate::source::{FailureClass, FetchContext, FetchError};
use crate::store::NewToken;
use crate::token::Secret;

/// Fetches and schedules a token.
pub(super) async fn fetch_token(
    c: &Collection,
    shared: &Shared,
    now: SystemTime,
    refresh_token: Option<Secret>,
) -> Result<NewToken, FetchError> {
    let clock = &shared.clock;
    let fetched = fetch(c, shared, now, refresh_token).await?;
    deliverable(&fetched.value)?;
    if fetched.expires_at.is_some_and(|e| e > latest_instant()) {
        return Err(FetchError::new(
            FailureClass::BadResponse,
            "upstream expiry is out of range (after 9999-12-31)",
        ));
    }
    let schedule = c
        .policy
        .schedule(now, fetched.expires_at, &mut rand::rng())
        .filter(|s| s.expires_at > clock.now())
        .ok_or_else(|| {
            FetchError::new(
                FailureClass::BadResponse,
                "upstream returned an already expired token",
            )
        })?;
    Ok(NewToken {
        value: fetched.value,
        fetched_at: now,
        expires_at: schedule.expires_at,
        refresh_at: schedule.refresh_at,
        refresh_seed: fetched
            .refresh_token
            .as_ref()
            .and_then(|_| c.source.seed_fingerprint()),
        refresh_token: fetched.refresh_token,
        parent_version: fetched.parent_version,
        min_version: 0,
    })
}

/// The largest token value handed out: a `GetCollectionToken` answer must fit
/// the gRPC layer's default message limit (64 KiB) with room for the rest.
pub const MAX_TOKEN_BYTES: usize = 60 * 1024;

/// A token that cannot be delivered is a bad response, never a cached token:
/// too large for an answer, or carrying control characters (CR/LF would let a
/// token split a header line in the application's request).
pub(super) fn deliverable(value: &Secret) -> Result<(), FetchError> {
    let v = value.expose();
    if v.len() > MAX_TOKEN_BYTES {
        return Err(FetchError::new(
            FailureClass::BadResponse,
            format!(
                "token of {} bytes is larger than the {MAX_TOKEN_BYTES} bytes an answer can carry",
                v.len()
            ),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(FetchError::new(
            FailureClass::BadResponse,
            "token contains control characters",
        ));
    }
    Ok(())
}

/// 9999-12-31T23:59:59Z: no instant after it is accepted from an upstream.
pub(super) fn latest_instant() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)
}

/// Calls the source in its own task, under the fetch timeout.
pub(super) async fn fetch(
    c: &Collection,
    shared: &Shared,
    now: SystemTime,
    refresh_token: Option<Secret>,
) -> Result<crate::source::Fetched, FetchError> {
    let source = c.source.clone();
    let timeout = c.policy.fetch_timeout;
    let Some(broker) = shared.broker.upgrade() else {
        return Err(FetchError::new(FailureClass::Internal, "broker stopped"));
    };
    let rejected_parent = c
        .state
        .borrow()
        .token
        .as_ref()
        .and_then(|t| c.rejected_parent(t));
    let ctx = FetchContext {
        collection: c.name.clone(),
        now,
        refresh_token,
        // Parent waits end a little before the fetch timeout, so that their
        // own error (not a bare timeout) is what gets reported.
        parents: Arc::new(crate::broker::parents::BrokerParents::new(
            broker,
            rejected_parent,
            tokio::time::Instant::now() + timeout.mul_f64(0.9),
        )),
    };
    let started = std::time::Instant::now();
    // The source's HTTP spans are children of this refresh's span.
    let task = tokio::spawn(
        async move { tokio::time::timeout(timeout, source.fetch(ctx)).await }.in_current_span(),
    );
    let result = task.await;
    c.metrics
        .upstream(matches!(result, Ok(Ok(Ok(_)))), started.elapsed());
    match result {
        Ok(Ok(result)) => result,
        Ok(Err(_elapsed)) => Err(FetchError::new(
            FailureClass::Timeout,
            format!("no answer within {}", humantime::format_duration(timeout)),
        )),
        Err(join) => Err(FetchError::new(
            FailureClass::Internal,
            if join.is_panic() {
                "fetch panicked"
            } else {
                "fetch was cancelled"
            },
        )),
    }
}
