//! The leased path of a refresh: what happens between a granted lease and the
//! commit of its result. Before presenting a rotating refresh token the holder
//! waits out a peer's unresolved spend and records its own
//! ([`before_spending`], [`wait_for_spender`]); the fetch runs while the lease
//! is renewed every third of `lease_ttl` ([`renewing`]); the token, or the
//! failure as shared backoff, is committed under the lease's fence
//! ([`commit_token`], [`commit_failure`]: a holder whose lease was taken over
//! is refused by the store and publishes nothing).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{Span, debug, info, warn};

use super::{HELD_RECHECK, Next, STORE_RETRY};
use crate::broker::{Collection, Shared, Snapshot, SpendWatch, lock};

use crate::metrics::RefreshOutcome;
use crate::source::FetchError;
use crate::store::{Lease, NewToken, Row, Spend, Store, StoreError};
use crate::token::Secret;

/// A peer that presented the rotating refresh token and has not stored the
/// result is presumed dead (and the token presented again) only once its
/// session has been gone for this long after it was seen, and this sidecar's
/// store has answered for this long (an outage that cut everyone just ended:
/// the spender is reconnecting too).
pub(super) const SPEND_CONFIRM: Duration = Duration::from_secs(3);

/// A spender is waited for at most this long after its spend: a partition
/// that outlasts it costs the grant (if the upstream is strict), not the
/// fleet's token for good.
pub(super) const SPEND_MAX_WAIT: Duration = Duration::from_secs(60);

/// Before presenting a rotating refresh token: waits (gives the lease back)
/// while a peer that presented it may still hold its successor, then records
/// our own spend. `None`: go ahead.
pub(super) async fn before_spending(
    c: &Collection,
    store: &dyn Store,
    shared: &Shared,
    lease: &Lease,
    row: &Row,
) -> Option<Next> {
    let span = Span::current();
    let give_back = async |next: Next| {
        if let Err(e) = store.release(lease.clone()).await {
            debug!(collection = %c.name, error = %e, "could not give back the refresh lease");
        }
        Some(next)
    };
    if row.refresh_token_unreadable {
        // Presenting the one this sidecar last saw instead could spend a
        // token a peer already rotated away from; a peer that holds the key
        // refreshes instead.
        warn!(collection = %c.name, "the stored refresh token cannot be read with this sidecar's keys; leaving the refresh to a peer that can");
        return give_back(Next::HeldUntil(shared.clock.now() + HELD_RECHECK)).await;
    }
    if let Some(spend) = row.spend.as_ref().filter(|s| *s.holder != *shared.holder) {
        match wait_for_spender(c, store, shared, spend).await {
            Ok(false) => {}
            Ok(true) => {
                span.record("outcome", "spender");
                return give_back(Next::HeldUntil(shared.clock.now() + STORE_RETRY)).await;
            }
            Err(e) => {
                debug!(collection = %c.name, error = %e, "could not tell whether the spender lives");
                return give_back(Next::StoreDown).await;
            }
        }
    }
    *lock(&c.spend_watch) = None;
    match store.mark_spending(lease).await {
        Ok(()) => None,
        Err(StoreError::LeaseLost(_)) => Some(Next::Continue),
        Err(e @ StoreError::Unavailable(_)) => {
            debug!(collection = %c.name, error = %e, "could not record the spend; not refreshing yet");
            Some(Next::StoreDown)
        }
    }
}

/// Whether to keep waiting for the peer that presented the rotating refresh
/// token in `spend` and has not stored what it got: true while its session
/// is connected, for [`SPEND_CONFIRM`] after it was last seen (it may be
/// reconnecting after a partition), and while this sidecar's own store came
/// back less than `SPEND_CONFIRM` ago; at most [`SPEND_MAX_WAIT`] after the
/// spend. A spender that was never seen (killed: its sessions closed with
/// it) is presumed dead at once, so a takeover costs nothing extra.
pub(super) async fn wait_for_spender(
    c: &Collection,
    store: &dyn Store,
    shared: &Shared,
    spend: &Spend,
) -> Result<bool, StoreError> {
    let now = shared.clock.now();
    // A spend dated past the wait from now is not one any sidecar wrote (both
    // are on the database's clock): a hand edit must not hold refreshes back.
    if now >= spend.at + SPEND_MAX_WAIT || spend.at > now + SPEND_MAX_WAIT {
        warn!(collection = %c.name, spender = ?spend.holder, "a peer presented the refresh token and never stored the result; presenting it again");
        return Ok(false);
    }
    let alive = store.spender_alive(spend).await?;
    let mut watch = lock(&c.spend_watch);
    let w = match watch.as_mut() {
        Some(w) if w.spend == *spend => w,
        _ => watch.insert(SpendWatch {
            spend: spend.clone(),
            seen_alive: false,
            absent_since: None,
            logged: false,
        }),
    };
    let wait = if alive {
        w.seen_alive = true;
        w.absent_since = None;
        true
    } else if store.up_for() < SPEND_CONFIRM {
        true
    } else if w.seen_alive {
        let since = *w.absent_since.get_or_insert(now);
        now < since + SPEND_CONFIRM
    } else {
        false
    };
    if wait && !std::mem::replace(&mut w.logged, true) {
        warn!(collection = %c.name, spender = ?spend.holder, "a peer presented the refresh token and has not stored the result (cut off from the database?); waiting for it rather than presenting the token again");
    }
    Ok(wait)
}

/// Runs `work` while renewing `lease` every third of its TTL, so that the
/// lease outlives a live holder's fetch of any length and a dead holder's by
/// at most one TTL. A renewal refused (a peer took over) stops the renewals;
/// the commit will be refused too.
pub(super) async fn renewing<T>(
    c: &Collection,
    store: &dyn Store,
    shared: &Shared,
    lease: &Lease,
    work: impl Future<Output = T>,
) -> T {
    let ttl = c.policy.lease_ttl;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + ttl / 3, ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(work);
    let mut renew = true;
    loop {
        tokio::select! {
            biased;
            out = &mut work => return out,
            _ = tick.tick(), if renew => {
                match store.renew(lease, ttl, shared.clock.now()).await {
                    Ok(()) => {}
                    Err(StoreError::LeaseLost(_)) => {
                        warn!(collection = %c.name, "refresh lease taken over by a peer during the fetch");
                        renew = false;
                    }
                    Err(e) => debug!(collection = %c.name, error = %e, "could not renew the refresh lease"),
                }
            }
        }
    }
}

pub(super) async fn commit_token(
    c: &Collection,
    store: &dyn Store,
    shared: &Shared,
    lease: Lease,
    mut new: NewToken,
    spent: Option<Secret>,
) -> Next {
    new.min_version = new.min_version.max(c.min_version(&new.value));
    let refresh_token = new.refresh_token.clone();
    let lease_holder = lease.holder.clone();
    match store.commit_token(lease, new.clone()).await {
        Ok(committed) => {
            c.standby.store(false, Ordering::Relaxed);
            if let Some(rt) = refresh_token {
                *lock(&c.refresh_token) = Some(rt);
            }
            let token = Arc::new(committed.token);
            let kind = if committed.rotated {
                RefreshOutcome::Rotated
            } else {
                RefreshOutcome::Unchanged
            };
            c.record_outcome(kind, Some(token.version));
            let recovered = c.state.borrow().failure.as_ref().map(|f| f.failures);
            if committed.rotated {
                info!(version = token.version, expires_in = ?shared.clock.until(token.expires_at), "token rotated");
            } else {
                debug!(
                    version = token.version,
                    "upstream returned the same token; timestamps updated"
                );
            }
            if let Some(n) = recovered {
                info!(failures = n, "refresh recovered");
            }
            c.publish(shared, |s| {
                s.failure = None;
                s.install(&c.name, token);
                s.finish();
            });
            Next::Continue
        }
        Err(StoreError::Unavailable(e)) => {
            // The token is good and may carry a rotated refresh token: keep
            // it, publish it locally and commit it when the store answers.
            warn!(error = %e, "could not store the refreshed token; keeping it locally");
            c.keep_local(shared, new, spent);
            Next::StoreDown
        }
        Err(e @ StoreError::LeaseLost(_)) => {
            // A peer took over after our lease ran out; its result arrives
            // through the store.
            c.record_outcome(RefreshOutcome::LeaseLost, None);
            warn!(error = %e, "could not store the refreshed token");
            // The upstream already spent the old refresh token: keep the new
            // one, unless a peer committed a newer grant meanwhile.
            if let Some(rt) = refresh_token {
                let seed = new.refresh_seed.clone();
                match store
                    .save_refresh_token(&c.name, &lease_holder, spent, rt.clone(), seed)
                    .await
                {
                    Ok(true) => {
                        *lock(&c.refresh_token) = Some(rt);
                        info!("kept the rotated refresh token of the refused commit");
                    }
                    Ok(false) => debug!("a peer stored a newer refresh token; dropping ours"),
                    Err(e) => warn!(error = %e, "could not keep the rotated refresh token"),
                }
            }
            c.publish(shared, Snapshot::finish);
            Next::Continue
        }
    }
}

pub(super) async fn commit_failure(
    c: &Collection,
    store: &dyn Store,
    shared: &Shared,
    lease: Lease,
    row: Row,
    err: FetchError,
) {
    c.record_outcome(RefreshOutcome::Failed(err.class), None);
    let failures = row.backoff.as_ref().map_or(0, |b| b.failures) + 1;
    let backoff = c.backoff_after(shared, failures, &err);
    // The first failure is news; repeats are noise until the class changes.
    let repeated = row.backoff.as_ref().is_some_and(|b| b.class == err.class);
    let retry_in = shared.clock.until(backoff.next_attempt_at);
    if repeated {
        debug!(class = %err.class, detail = %err.detail, failures, ?retry_in, "refresh failed again");
    } else {
        warn!(class = %err.class, detail = %err.detail, failures, ?retry_in, "refresh failed");
    }
    if let Err(e) = store.commit_failure(lease, backoff.clone()).await {
        warn!(error = %e, "could not record the failure in the store");
    }
    c.publish(shared, |s| {
        s.failure = Some(backoff);
        s.finish();
    });
}
