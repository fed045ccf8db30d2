//! The paths for a store that does not answer. A due refresh is fetched
//! locally ([`local_refresh`]: still single-flight and rate-limited) and kept
//! as an unshared token (`Collection::keep_local`), except for a rotating
//! refresh token, which waits for the store. When the store answers again,
//! [`reconcile`] commits the unshared token above the row, or adopts the
//! row's when that is newer.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use tracing::{Span, debug, info, warn};

use super::Next;
use super::fetch::fetch_token;
use crate::broker::{Collection, Shared, Unshared, lock};

use crate::metrics::RefreshOutcome;
use crate::store::{Lease, NewToken, Row, Store, StoreError};

/// A due refresh while the store does not answer: fetch, publish locally as
/// unshared, or back off locally.
pub(super) async fn local_refresh(c: &Collection, shared: &Shared, now: SystemTime) {
    c.demand.force_version.store(0, Ordering::Relaxed);
    c.demand.want_until_ms.store(0, Ordering::Relaxed);
    let attempt_no = c.begin(shared, now);
    Span::current().record("attempt", attempt_no);
    let refresh_token = lock(&c.refresh_token).clone();
    let spent = refresh_token.clone();
    match fetch_token(c, shared, now, refresh_token).await {
        Ok(new) => c.keep_local(shared, new, spent),
        Err(err) => {
            c.record_outcome(RefreshOutcome::Failed(err.class), None);
            let failures = c.state.borrow().failure.as_ref().map_or(0, |f| f.failures) + 1;
            let backoff = c.backoff_after(shared, failures, &err);
            warn!(class = %err.class, detail = %err.detail, failures, "local refresh failed");
            c.publish(shared, |s| {
                s.failure = Some(backoff);
                s.finish();
            });
        }
    }
}

/// Commits (or gives up) an unshared token under a fresh lease: the higher
/// version wins; a tie with a different value is committed one version higher.
pub(super) async fn reconcile(
    c: &Collection,
    store: &dyn Store,
    shared: &Shared,
    lease: Lease,
    row: Row,
    local: Unshared,
) -> Next {
    let now = shared.clock.now();
    let row_version = row.token.as_ref().map_or(0, |t| t.version);
    // A newer row token wins unless ours is servable and outlives it (a row
    // put back to an old state, or a peer's token near its end while ours
    // was just fetched): ours is then committed above it, so the fleet gets
    // the longer-lived token and nobody calls the upstream for a new one.
    let local_servable = local.token.servable_at(now);
    let row_wins = row.token.as_ref().is_some_and(|t| {
        t.version > local.token.version
            && (!local_servable || (t.servable_at(now) && t.expires_at >= local.token.expires_at))
    });
    if row_wins {
        info!(collection = %c.name, local = local.token.version, stored = row_version, "store holds a newer token than the one fetched locally; adopting it");
        c.adopt(shared, row);
        if let Err(e) = store.release(lease).await {
            debug!(collection = %c.name, error = %e, "could not give back the refresh lease");
        }
        return Next::Continue;
    }
    let t = &local.token;
    // Versions drawn at random during an outage do not say which refresh
    // token is newer: ours is written only over the very one spent for it,
    // never over one a peer already rotated to.
    let refresh_token = match &local.refresh_token {
        Some(_) if c.stored_refresh_token(&row) != local.spent => {
            info!(collection = %c.name, "the store holds a newer refresh token than the one fetched locally; keeping it");
            None
        }
        rt => rt.clone(),
    };
    let new = NewToken {
        value: t.value.clone(),
        fetched_at: t.fetched_at,
        expires_at: t.expires_at,
        refresh_at: t.refresh_at,
        refresh_seed: refresh_token
            .as_ref()
            .and_then(|_| c.source.seed_fingerprint()),
        refresh_token,
        parent_version: t.parent_version,
        min_version: t.version,
    };
    match store.commit_token(lease, new).await {
        Ok(committed) => {
            c.standby.store(false, Ordering::Relaxed);
            info!(collection = %c.name, version = committed.token.version, "token held locally is now shared");
            c.publish(shared, |s| {
                s.install(&c.name, Arc::new(committed.token));
            });
            Next::Continue
        }
        Err(e) => {
            debug!(collection = %c.name, error = %e, "could not reconcile yet");
            // Put it back, over anything queued meanwhile that is not newer
            // (`behind` may have queued a copy of the same token without the
            // refresh token this one carries).
            let mut unshared = lock(&c.unshared);
            if unshared
                .as_ref()
                .is_none_or(|u| u.token.version <= local.token.version)
            {
                *unshared = Some(local);
            }
            match e {
                StoreError::Unavailable(_) => Next::StoreDown,
                StoreError::LeaseLost(_) => Next::Continue,
            }
        }
    }
}
