//! The refresher: one supervised task per collection, the only caller of its
//! source. It decides *when* to attempt and which path to take; the state it
//! moves lives in `collection.rs`.
//!
//! - `mod.rs` (here): the loop ([`run`]: sleeps until the next attempt is due,
//!   never busy-loops), one attempt ([`attempt_in`]: takes the store's lease,
//!   or finds a peer holding it, or the store down) and the shutdown
//!   [`flush`] of an unshared token.
//! - `leased.rs`: the granted path: a rotating refresh token's spend,
//!   renewing the lease while the fetch runs, the fenced commit.
//! - `local.rs`: a store that does not answer: local refresh, then
//!   reconciliation once it answers.
//! - `fetch.rs`: one call of the source, under a timeout, checked.
//!
//! Contract: each attempt takes the store's lease, fetches under a timeout in
//! its own task (a panicking source is a failure of class `internal`, not a
//! dead refresher), commits through the store and only then publishes to L1.
//! A failure is recorded as backoff, never as a token.
//!
//! Shared tier: on a grant, the row is adopted first and the lease given back
//! when a peer already did the work (one upstream call per rotation). The
//! lease is short (`lease_ttl`) and renewed every third of it while the
//! fetch runs, so a holder that dies loses it within one `lease_ttl`. When a
//! peer holds the lease, the refresher waits for its news, re-reading the row
//! every `HELD_RECHECK` or when the lease ends, whichever is first. When the
//! store does not answer, a due refresh is fetched locally (still
//! single-flight and rate-limited), published as "unshared" and reconciled
//! once the store answers again; except for a source whose refresh token
//! rotates (every pod spending the same refresh token would get all but one
//! refused and may get the grant revoked): it serves its current token while
//! it is servable and waits for the store. Such a source's holder records its
//! spend under the lease before the upstream call, and a peer does not
//! present the same refresh token while that spender may still hold its
//! successor (`leased::wait_for_spender`); at shutdown an unshared token is
//! committed first ([`flush`]).
//!
//! No herd: the sidecar that committed the current token makes its soft
//! refresh, a little early (`committer_lead`); the others stand by
//! (`Collection::standby_delay`) and get it by push. Its lease grant is
//! announced (`StoreEvent::Lease`), and a sidecar told of a held lease does
//! not try it before the lease ends (`Collection::next_attempt`), so even
//! with too little room to stand by, a rotation costs one lease attempt.
//!
//! Versions: a commit asks for at least the L1 version (the same value) or
//! one above it (a new value), so nothing this sidecar served is relabelled;
//! `Snapshot::install` never lowers L1's version; a row found below L1 (a
//! restore, a failover to a lagging replica, a hand edit) gets L1's token
//! committed over it (as an unshared token is), so the fleet moves forward
//! from the highest version any sidecar held.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tracing::field::Empty;
use tracing::{Instrument, Span, debug, info_span, warn};

mod fetch;
mod leased;
mod local;

use fetch::fetch_token;
use leased::{before_spending, commit_failure, commit_token, renewing};
use local::{local_refresh, reconcile};

use super::{Collection, Shared, lock};
use crate::store::{Acquired, Store};

/// The refresher re-evaluates at least this often, so that a wall-clock jump
/// cannot leave it asleep past a deadline for long.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// The least time between two attempts when a peer holds the lease, so a
/// pod whose idea of the lease's end is off cannot spin.
const HELD_MIN_WAIT: Duration = Duration::from_millis(100);
/// While a peer holds the lease, re-read the row at least this often (in case
/// its notification is lost).
const HELD_RECHECK: Duration = Duration::from_secs(2);
/// While the store does not answer and an unshared token waits, try again
/// this often.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// What the refresher does after an attempt.
enum Next {
    /// Re-evaluate at once.
    Continue,
    /// A peer holds the lease: no attempt before this instant.
    HeldUntil(SystemTime),
    /// The store did not answer.
    StoreDown,
}

/// A name for this process in lease rows: host name, process id and a random
/// part (two containers with the same host name, both pid 1, must differ).
pub(super) fn holder_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    let host: String = host.chars().take(64).collect();
    format!(
        "{host}/{}/{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

pub(super) async fn run(c: Arc<Collection>, store: Arc<dyn Store>, shared: Shared) {
    let clock = shared.clock.clone();
    // Start from what the store already holds (a previous run's or a peer's token).
    match store.load(&c.name).await {
        Ok(row) => c.adopt(&shared, row),
        Err(e) => warn!(collection = %c.name, error = %e, "could not read the store at start-up"),
    }
    // A peer holds the lease: do not try again before this.
    let mut not_before: Option<SystemTime> = None;
    // The store did not answer: do not retry a reconciliation before this.
    let mut store_retry_at: Option<SystemTime> = None;
    loop {
        // Shutdown: no new attempt (one in flight has finished by now, so a
        // rotated refresh token it got is committed, not lost).
        if shared.shutdown.is_cancelled() {
            return flush(&c, store.as_ref(), &shared).await;
        }
        let now = clock.now();
        if c.store_back.swap(false, Ordering::Relaxed) {
            store_retry_at = None;
        }
        let refresh = c
            .next_attempt(now)
            .map(|at| not_before.map_or(at, |nb| at.max(nb)));
        let reconcile = lock(&c.unshared)
            .is_some()
            .then(|| store_retry_at.unwrap_or(now));
        let next = refresh.into_iter().chain(reconcile).min();
        if let Some(at) = next
            && at <= now
        {
            let due = refresh.is_some_and(|at| at <= now);
            match attempt(&c, store.as_ref(), &shared, due).await {
                Next::Continue => (not_before, store_retry_at) = (None, None),
                Next::HeldUntil(until) => {
                    let until = until.max(clock.now() + HELD_MIN_WAIT);
                    (not_before, store_retry_at) = (Some(until), None);
                }
                Next::StoreDown => {
                    // Neither a due refresh nor a reconciliation is tried
                    // again before the retry delay: a refresh the store's
                    // absence held back must not spin.
                    let retry = clock.now() + STORE_RETRY;
                    (not_before, store_retry_at) = (Some(retry), Some(retry));
                }
            }
            continue;
        }
        let sleep = next.map_or(MAX_SLEEP, |at| clock.until(at).min(MAX_SLEEP));
        tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => return flush(&c, store.as_ref(), &shared).await,
            () = c.wake.notified() => {}
            () = tokio::time::sleep(sleep) => {}
        }
    }
}

/// At shutdown: a token kept unshared (its commit found the store away)
/// carries what the upstream issued, perhaps a rotated refresh token that
/// exists nowhere else, so it is committed before the refresher ends: tried
/// again every `STORE_RETRY` (or when a peer's lease ends) until it is
/// shared or superseded, within the shutdown grace (the broker's stop
/// aborts the task after that).
async fn flush(c: &Collection, store: &dyn Store, shared: &Shared) {
    while lock(&c.unshared).is_some() {
        let retry = match attempt(c, store, shared, false).await {
            Next::Continue => continue,
            Next::HeldUntil(until) => until.max(shared.clock.now() + HELD_MIN_WAIT),
            Next::StoreDown => shared.clock.now() + STORE_RETRY,
        };
        tokio::time::sleep(shared.clock.until(retry)).await;
    }
}

/// One pass, in a `refresh` span (a child of the span of a caller waiting for
/// it, if any) that records whether the lease was held or waited for, the
/// outcome and the version: see [`attempt_in`].
async fn attempt(c: &Collection, store: &dyn Store, shared: &Shared, due: bool) -> Next {
    let trigger = lock(&c.trigger).take();
    let span = info_span!(
        parent: trigger.as_ref().and_then(Span::id),
        "refresh",
        collection = %c.name,
        source = c.source.kind(),
        attempt = Empty,
        lease = Empty,
        outcome = Empty,
        version = Empty,
        class = Empty,
        otel.status_code = Empty,
    );
    drop(trigger);
    attempt_in(c, store, shared, due).instrument(span).await
}

/// Takes the lease (or finds a peer holding it, or the store down),
/// reconciles an unshared token, and refreshes when `due` and still wanted
/// once the row is adopted.
async fn attempt_in(c: &Collection, store: &dyn Store, shared: &Shared, due: bool) -> Next {
    let clock = &shared.clock;
    let now = clock.now();
    let ttl = c.policy.lease_ttl;
    let span = Span::current();
    let (lease, row) = match store.acquire(&c.name, &shared.holder, ttl, now).await {
        Ok(Acquired::Granted { lease, row }) => {
            c.held_back.store(false, Ordering::Relaxed);
            c.metrics.lease_acquired.inc();
            span.record("lease", "held");
            (lease, row)
        }
        Ok(Acquired::Held { until, row }) => {
            c.held_back.store(false, Ordering::Relaxed);
            c.metrics.lease_waits.inc();
            span.record("lease", "waited");
            span.record("outcome", "peer");
            debug!(collection = %c.name, "refresh lease held by a peer; waiting for its result");
            c.adopt(shared, row);
            return Next::HeldUntil(until.min(now + HELD_RECHECK));
        }
        Err(e) => {
            span.record("lease", "store_down");
            if due && c.rotating_grant() {
                // Every pod would spend the same refresh token: the upstream
                // would refuse all but one and may revoke the grant. Said
                // once per outage.
                if !c.held_back.swap(true, Ordering::Relaxed) {
                    warn!(collection = %c.name, error = %e, "store unavailable: not refreshing locally (the refresh token rotates); serving the current token while it is servable");
                } else {
                    debug!(collection = %c.name, "store still unavailable; refresh still held back");
                }
                return Next::StoreDown;
            }
            if due {
                warn!(collection = %c.name, error = %e, "store unavailable: refreshing locally");
                // The acquire may have taken the whole query timeout: stamp
                // the token with the time of its own fetch.
                local_refresh(c, shared, clock.now()).await;
            }
            return Next::StoreDown;
        }
    };
    let pending = lock(&c.unshared).take();
    if let Some(local) = pending {
        return reconcile(c, store, shared, lease, row, local).await;
    }
    let backing_off = row
        .backoff
        .as_ref()
        .is_some_and(|b| b.next_attempt_at > now);
    c.adopt(shared, row.clone());
    if !due || backing_off || !c.wanted(now) {
        // A peer committed (or failed) just before our grant: its result
        // serves this demand, so the upstream is not asked again.
        if let Err(e) = store.release(lease).await {
            debug!(collection = %c.name, error = %e, "could not give back the refresh lease");
        }
        span.record("outcome", if backing_off { "peer_failed" } else { "peer" });
        if backing_off {
            // A peer's attempt failed: it counts as the attempt callers wait
            // for, so they get its error now instead of at their deadline.
            c.publish(shared, |s| {
                s.started += 1;
                s.finish();
            });
        }
        return Next::Continue;
    }
    if c.rotating_grant()
        && let Some(next) = before_spending(c, store, shared, &lease, &row).await
    {
        return next;
    }
    // Demand recorded up to here is served by this attempt.
    c.demand.force_version.store(0, Ordering::Relaxed);
    c.demand.want_until_ms.store(0, Ordering::Relaxed);
    let attempt_no = c.begin(shared, now);
    span.record("attempt", attempt_no);
    let refresh_token = c
        .stored_refresh_token(&row)
        .or_else(|| lock(&c.refresh_token).clone());
    let spent = refresh_token.clone();
    let fetched = renewing(
        c,
        store,
        shared,
        &lease,
        fetch_token(c, shared, now, refresh_token),
    )
    .await;
    match fetched {
        Ok(new) => commit_token(c, store, shared, lease, new, spent).await,
        Err(err) => {
            commit_failure(c, store, shared, lease, row, err).await;
            Next::Continue
        }
    }
}
