//! The refresher: one supervised task per collection, the only caller of its
//! source.
//!
//! Contract: sleeps until the next attempt is due (soft refresh, recorded demand,
//! backoff end) and never busy-loops; each attempt takes the store's lease,
//! fetches under a timeout in its own task (a panicking source is a failure of
//! class `internal`, not a dead refresher), commits through the store and only
//! then publishes to L1. A failure is recorded as backoff, never as a token.
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
//! successor ([`wait_for_spender`]); at shutdown an unshared token is
//! committed first ([`flush`]).
//!
//! No herd: the sidecar that committed the current token makes its soft
//! refresh; the others stand by ([`standby_delay`]) and get it by push.
//!
//! Versions: a commit asks for at least the L1 version (the same value) or
//! one above it (a new value), so nothing this sidecar served is relabelled;
//! [`install`] never lowers L1's version; a row found below L1 (a restore, a
//! failover to a lagging replica, a hand edit) gets L1's token committed
//! over it (as an unshared token is), so the fleet moves forward from the
//! highest version any sidecar held.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tracing::field::Empty;
use tracing::{Instrument, Span, debug, info, info_span, warn};

use tokio::sync::broadcast;

use super::{Collection, HISTORY, Shared, Snapshot, SpendWatch, Unshared, lock};
use crate::metrics::RefreshOutcome;
use crate::source::{FailureClass, FetchContext, FetchError};
use crate::store::{Acquired, Backoff, Lease, NewToken, Row, Spend, Store, StoreError, StoreEvent};
use crate::token::{Secret, Token};

/// The refresher re-evaluates at least this often, so that a wall-clock jump
/// cannot leave it asleep past a deadline for long.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// A token fetched while the store is away takes a version this many apart
/// at random above the next one (see `keep_local`): two sidecars refreshing
/// through the same outage collide with a chance of one in this many.
const LOCAL_VERSION_SPREAD: u64 = 1 << 20;

/// The least time between two attempts when a peer holds the lease, so a
/// pod whose idea of the lease's end is off cannot spin.
const HELD_MIN_WAIT: Duration = Duration::from_millis(100);
/// While a peer holds the lease, re-read the row at least this often (in case
/// its notification is lost).
const HELD_RECHECK: Duration = Duration::from_secs(2);
/// While the store does not answer and an unshared token waits, try again
/// this often.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// A peer that presented the rotating refresh token and has not stored the
/// result is presumed dead (and the token presented again) only once its
/// session has been gone for this long after it was seen, and this sidecar's
/// store has answered for this long (an outage that cut everyone just ended:
/// the spender is reconnecting too).
const SPEND_CONFIRM: Duration = Duration::from_secs(3);
/// A spender is waited for at most this long after its spend: a partition
/// that outlasts it costs the grant (if the upstream is strict), not the
/// fleet's token for good.
const SPEND_MAX_WAIT: Duration = Duration::from_secs(60);

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
        Ok(row) => adopt(&c, &shared, row),
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
        let refresh = next_attempt(&c, now).map(|at| not_before.map_or(at, |nb| at.max(nb)));
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

/// Follows the store's news about other sidecars' writes: reads the rows
/// concerned and adopts them, then wakes their refreshers.
pub(super) async fn follow(
    collections: Vec<Arc<Collection>>,
    mut events: broadcast::Receiver<StoreEvent>,
    shared: Shared,
    store: Arc<dyn Store>,
    restarted: bool,
) {
    // A follower started again after a panic may have missed news: re-read
    // everything first.
    let mut first = restarted.then_some(Ok(StoreEvent::Resync));
    loop {
        let event = match first.take() {
            Some(event) => event,
            None => tokio::select! {
                biased;
                () = shared.shutdown.cancelled() => return,
                event = events.recv() => event,
            },
        };
        // For a rotation: its version and when its commit notice arrived.
        let (stale, rotation): (Vec<&Arc<Collection>>, _) = match event {
            Ok(StoreEvent::Rotated {
                collection,
                version,
                arrived,
                ..
            }) => (
                collections
                    .iter()
                    .filter(|c| c.name == collection && current_version(c) < version)
                    .collect(),
                Some((version, arrived)),
            ),
            Ok(StoreEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                for c in &collections {
                    c.store_back.store(true, Ordering::Relaxed);
                }
                (collections.iter().collect(), None)
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        for c in stale {
            match store.load(&c.name).await {
                Ok(row) => adopt(c, &shared, row),
                Err(e) => debug!(collection = %c.name, error = %e, "could not re-read a row"),
            }
            c.wake.notify_one();
            // From a peer's commit notice arriving to this sidecar serving
            // its token: after the commit by construction, so neither a slow
            // commit nor a skewed clock counts.
            if let Some((version, arrived)) = rotation
                && current_version(c) >= version
            {
                shared.metrics.notification_lag(arrived.elapsed());
            }
        }
    }
}

fn current_version(c: &Collection) -> u64 {
    c.state.borrow().token.as_ref().map_or(0, |t| t.version)
}

/// Whether a refresh is wanted at `now`, rate limits and backoff aside.
fn wanted(c: &Collection, now: SystemTime) -> bool {
    if !c.demand.active.load(Ordering::Relaxed) {
        return false;
    }
    let snap = c.state.borrow();
    match snap.servable(now) {
        None => true,
        Some(t) => forced(c, t) || t.refresh_at <= now,
    }
}

fn forced(c: &Collection, t: &Token) -> bool {
    t.version <= c.demand.force_version.load(Ordering::Relaxed)
        || super::epoch_ms(t.expires_at) < c.demand.want_until_ms.load(Ordering::Relaxed)
        || c.rejected_parent(t).is_some()
}

/// When the next attempt is due, or `None` when nothing needs refreshing.
fn next_attempt(c: &Collection, now: SystemTime) -> Option<SystemTime> {
    if !c.demand.active.load(Ordering::Relaxed) {
        return None;
    }
    let snap = c.state.borrow();
    let allowed = snap.attempt_allowed_at(now, &c.policy);
    let Some(t) = snap.servable(now) else {
        return Some(allowed);
    };
    let due = if forced(c, t) {
        now
    } else if c.standby.load(Ordering::Relaxed) {
        t.refresh_at + standby_delay(c, t)
    } else {
        t.refresh_at
    };
    Some(due.max(allowed))
}

/// How long a sidecar that did not commit the current token waits past its
/// `refresh_at` before trying the lease itself, so that a rotation costs one
/// lease attempt (the committer's) however many sidecars there are:
/// `lease_ttl`, spread per process by up to half again (standbys taking over
/// from a committer that is gone do not all try at one instant). The
/// committer's token arrives by push long before that in the common case.
/// Only when the room left before hard expiry holds at least four
/// `lease_ttl`s, so that after the wait there is still room for two
/// takeovers (a dead committer, then a standby that dies mid-call); with
/// less room (very short-lived tokens) every sidecar tries at `refresh_at`.
fn standby_delay(c: &Collection, t: &Token) -> Duration {
    let room = t
        .expires_at
        .duration_since(t.refresh_at)
        .unwrap_or_default();
    let ttl = c.policy.lease_ttl;
    if room < ttl.saturating_mul(4) {
        return Duration::ZERO;
    }
    ttl.mul_f64(1.0 + c.standby_spread / 2.0)
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

/// Records how an attempt that called the upstream ended: in the metrics and
/// on the current `refresh` span.
fn outcome(c: &Collection, outcome: RefreshOutcome, version: Option<u64>) {
    c.metrics.refresh(outcome);
    let span = Span::current();
    span.record("outcome", outcome.as_str());
    if let Some(v) = version {
        span.record("version", v);
    }
    if let RefreshOutcome::Failed(class) = outcome {
        span.record("class", class.as_str());
        span.record("otel.status_code", "ERROR");
    }
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
            adopt(c, shared, row);
            return Next::HeldUntil(until.min(now + HELD_RECHECK));
        }
        Err(e) => {
            span.record("lease", "store_down");
            if due && rotating_grant(c) {
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
    adopt(c, shared, row.clone());
    if !due || backing_off || !wanted(c, now) {
        // A peer committed (or failed) just before our grant: its result
        // serves this demand, so the upstream is not asked again.
        if let Err(e) = store.release(lease).await {
            debug!(collection = %c.name, error = %e, "could not give back the refresh lease");
        }
        span.record("outcome", if backing_off { "peer_failed" } else { "peer" });
        if backing_off {
            // A peer's attempt failed: it counts as the attempt callers wait
            // for, so they get its error now instead of at their deadline.
            publish(c, shared, |s| {
                s.started += 1;
                finish(s);
            });
        }
        return Next::Continue;
    }
    if rotating_grant(c)
        && let Some(next) = before_spending(c, store, shared, &lease, &row).await
    {
        return next;
    }
    // Demand recorded up to here is served by this attempt.
    c.demand.force_version.store(0, Ordering::Relaxed);
    c.demand.want_until_ms.store(0, Ordering::Relaxed);
    let attempt_no = begin(c, shared, now);
    span.record("attempt", attempt_no);
    let refresh_token = stored_refresh_token(c, &row).or_else(|| lock(&c.refresh_token).clone());
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

/// Before presenting a rotating refresh token: waits (gives the lease back)
/// while a peer that presented it may still hold its successor, then records
/// our own spend. `None`: go ahead.
async fn before_spending(
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
async fn wait_for_spender(
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
async fn renewing<T>(
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

/// A source whose refresh token rotates (an OAuth refresh-token grant): it
/// must never be refreshed by several pods with the same refresh token.
fn rotating_grant(c: &Collection) -> bool {
    c.source.seed_fingerprint().is_some()
}

/// The lowest version `value` may be committed or published under: L1's
/// version for the value L1 holds, one more for any other value.
fn min_version(c: &Collection, value: &Secret) -> u64 {
    c.state.borrow().token.as_ref().map_or(0, |t| {
        if t.value == *value {
            t.version
        } else {
            t.version + 1
        }
    })
}

/// Marks an attempt as started in L1; returns its number.
fn begin(c: &Collection, shared: &Shared, now: SystemTime) -> u64 {
    let attempt_no = c.state.borrow().started + 1;
    publish(c, shared, |s| {
        s.refreshing = true;
        s.started = attempt_no;
        s.last_attempt_at = Some(now);
    });
    attempt_no
}

/// A due refresh while the store does not answer: fetch, publish locally as
/// unshared, or back off locally.
async fn local_refresh(c: &Collection, shared: &Shared, now: SystemTime) {
    c.demand.force_version.store(0, Ordering::Relaxed);
    c.demand.want_until_ms.store(0, Ordering::Relaxed);
    let attempt_no = begin(c, shared, now);
    Span::current().record("attempt", attempt_no);
    let refresh_token = lock(&c.refresh_token).clone();
    let spent = refresh_token.clone();
    match fetch_token(c, shared, now, refresh_token).await {
        Ok(new) => keep_local(c, shared, new, spent),
        Err(err) => {
            outcome(c, RefreshOutcome::Failed(err.class), None);
            let failures = c.state.borrow().failure.as_ref().map_or(0, |f| f.failures) + 1;
            let backoff = backoff_after(c, shared, failures, &err);
            warn!(class = %err.class, detail = %err.detail, failures, "local refresh failed");
            publish(c, shared, |s| {
                s.failure = Some(backoff);
                finish(s);
            });
        }
    }
}

/// Publishes a fetched token that the store could not take: the next version
/// when the value changed, kept as unshared until reconciled.
fn keep_local(c: &Collection, shared: &Shared, mut new: NewToken, spent: Option<Secret>) {
    new.min_version = new.min_version.max(min_version(c, &new.value));
    let (mut version, rotated) = {
        let snap = c.state.borrow();
        let current = snap.token.as_ref();
        new.version_over(current.map_or(0, |t| t.version), current.map(|t| &t.value))
    };
    if rotated {
        // Other sidecars may be fetching locally through the same outage and
        // cannot be asked: a random gap keeps their versions apart, so no
        // version carries two values anywhere in the fleet.
        version = version.saturating_add(rand::random_range(0..LOCAL_VERSION_SPREAD));
    }
    if let Some(rt) = &new.refresh_token {
        *lock(&c.refresh_token) = Some(rt.clone());
    }
    let new_refresh_token = new.refresh_token.clone();
    let token = new.into_token(version);
    outcome(c, RefreshOutcome::Local, Some(version));
    {
        let mut unshared = lock(&c.unshared);
        // A new refresh token travels with the one spent for it; without
        // one, an earlier unshared pair is kept.
        let (refresh_token, spent) = match new_refresh_token {
            Some(rt) => (Some(rt), spent),
            None => unshared
                .as_ref()
                .map_or((None, None), |u| (u.refresh_token.clone(), u.spent.clone())),
        };
        *unshared = Some(Unshared {
            token: token.clone(),
            refresh_token,
            spent,
        });
    }
    if rotated {
        warn!(
            version,
            "token rotated locally (store unavailable); it is committed when the store answers"
        );
    }
    c.standby.store(false, Ordering::Relaxed);
    publish(c, shared, |s| {
        s.failure = None;
        install(&c.name, s, Arc::new(token));
        finish(s);
    });
}

/// Commits (or gives up) an unshared token under a fresh lease: the higher
/// version wins; a tie with a different value is committed one version higher.
async fn reconcile(
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
        adopt(c, shared, row);
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
        Some(_) if stored_refresh_token(c, &row) != local.spent => {
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
            publish(c, shared, |s| {
                install(&c.name, s, Arc::new(committed.token));
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

/// Fetches and schedules a token.
async fn fetch_token(
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
fn deliverable(value: &Secret) -> Result<(), FetchError> {
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
fn latest_instant() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799)
}

/// The row's refresh token, when it descends from the configured seed (a
/// refresh token from another seed is ignored: the operator configured a new
/// one, and the source then starts from it).
fn stored_refresh_token(c: &Collection, row: &Row) -> Option<Secret> {
    row.refresh_token
        .clone()
        .filter(|_| row.refresh_seed == c.source.seed_fingerprint())
}

/// Calls the source in its own task, under the fetch timeout.
async fn fetch(
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
        parents: Arc::new(super::parents::BrokerParents::new(
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

async fn commit_token(
    c: &Collection,
    store: &dyn Store,
    shared: &Shared,
    lease: Lease,
    mut new: NewToken,
    spent: Option<Secret>,
) -> Next {
    new.min_version = new.min_version.max(min_version(c, &new.value));
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
            outcome(c, kind, Some(token.version));
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
            publish(c, shared, |s| {
                s.failure = None;
                install(&c.name, s, token);
                finish(s);
            });
            Next::Continue
        }
        Err(StoreError::Unavailable(e)) => {
            // The token is good and may carry a rotated refresh token: keep
            // it, publish it locally and commit it when the store answers.
            warn!(error = %e, "could not store the refreshed token; keeping it locally");
            keep_local(c, shared, new, spent);
            Next::StoreDown
        }
        Err(e @ StoreError::LeaseLost(_)) => {
            // A peer took over after our lease ran out; its result arrives
            // through the store.
            outcome(c, RefreshOutcome::LeaseLost, None);
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
            publish(c, shared, finish);
            Next::Continue
        }
    }
}

async fn commit_failure(
    c: &Collection,
    store: &dyn Store,
    shared: &Shared,
    lease: Lease,
    row: Row,
    err: FetchError,
) {
    outcome(c, RefreshOutcome::Failed(err.class), None);
    let failures = row.backoff.as_ref().map_or(0, |b| b.failures) + 1;
    let backoff = backoff_after(c, shared, failures, &err);
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
    publish(c, shared, |s| {
        s.failure = Some(backoff);
        finish(s);
    });
}

fn backoff_after(c: &Collection, shared: &Shared, failures: u32, err: &FetchError) -> Backoff {
    let mut delay = c.policy.backoff(failures, &mut rand::rng());
    if let Some(min) = err.retry_after {
        delay = delay.max(min);
    }
    Backoff {
        failures,
        next_attempt_at: shared.clock.now() + delay,
        class: err.class,
        detail: err.detail.clone(),
    }
}

/// Takes a row read from the store into L1: a newer version replaces the
/// current token (and any unshared one: the higher version wins); the same
/// version with the same value and later timestamps (a refetch) updates it in
/// place; the row's backoff and last attempt are taken over.
pub(super) fn adopt(c: &Collection, shared: &Shared, row: Row) {
    if let Some(rt) = stored_refresh_token(c, &row) {
        *lock(&c.refresh_token) = Some(rt);
    }
    behind(c, shared, &row);
    let now = shared.clock.now();
    // An unshared token that outlives a newer row token is committed above it
    // (see `reconcile`) rather than dropped for it.
    let unshared_until = lock(&c.unshared)
        .as_ref()
        .filter(|u| u.token.servable_at(now))
        .map(|u| u.token.expires_at);
    let (newer, refetched) = {
        let snap = c.state.borrow();
        let current = snap.token.as_deref();
        let version = current.map_or(0, |t| t.version);
        // A newer version replaces ours unless it is already expired while
        // ours is servable (`behind` then commits ours above it).
        let held = current.is_some_and(|t| t.servable_at(now));
        match row.token {
            Some(t)
                if t.version > version
                    && unshared_until.is_some_and(|until| t.expires_at < until) =>
            {
                c.wake.notify_one();
                (None, false)
            }
            Some(t) if t.version > version && (t.servable_at(now) || !held) => (Some(t), false),
            Some(t)
                if current.is_some_and(|cur| {
                    cur.version == t.version
                        && cur.value == t.value
                        && cur.fetched_at < t.fetched_at
                }) =>
            {
                (Some(t), true)
            }
            _ => (None, false),
        }
    };
    if newer.is_none()
        && row.backoff.is_none()
        && row.last_attempt_at <= c.state.borrow().last_attempt_at
    {
        return;
    }
    if newer.is_some() {
        // Its committer makes the next soft refresh; this sidecar stands by.
        let standby = row
            .refreshed_by
            .as_deref()
            .is_some_and(|by| by != &*shared.holder);
        c.standby.store(standby, Ordering::Relaxed);
    }
    if newer.is_some() && !refetched {
        let mut unshared = lock(&c.unshared);
        if unshared
            .as_ref()
            .is_some_and(|u| newer.as_ref().is_some_and(|t| t.version > u.token.version))
        {
            *unshared = None;
        }
    }
    publish(c, shared, |s| {
        let installed = newer.is_some_and(|t| install(&c.name, s, Arc::new(t)));
        match row.backoff {
            Some(b) => s.failure = Some(b),
            None if installed => s.failure = None,
            None => {}
        }
        if row.last_attempt_at > s.last_attempt_at {
            s.last_attempt_at = row.last_attempt_at;
        }
    });
}

/// When the row's token is behind L1's (a lower version, or L1's version
/// with another value: a restore, a lagging replica, a hand edit; or a
/// higher version that has already expired, e.g. an old row put back), L1's
/// token, while servable, is queued to be committed over it like a token
/// fetched while the store was away, so the fleet moves forward from the
/// highest version any sidecar held.
fn behind(c: &Collection, shared: &Shared, row: &Row) {
    let Some(row_token) = &row.token else {
        return;
    };
    let l1 = c.state.borrow().token.clone();
    let Some(l1) = l1.filter(|t| t.servable_at(shared.clock.now())) else {
        return;
    };
    let behind = row_token.version < l1.version
        || (row_token.version == l1.version && row_token.value != l1.value)
        || (row_token.version > l1.version && !row_token.servable_at(shared.clock.now()));
    if !behind {
        return;
    }
    let mut unshared = lock(&c.unshared);
    if unshared
        .as_ref()
        .is_some_and(|u| u.token.version >= l1.version)
    {
        return;
    }
    warn!(
        collection = %c.name,
        stored = row_token.version,
        held = l1.version,
        "the stored token is behind the one this sidecar holds (a restore or a hand edit?); committing ours over it"
    );
    *unshared = Some(Unshared {
        token: (*l1).clone(),
        refresh_token: None,
        spent: None,
    });
    c.wake.notify_one();
}

/// Makes `token` current: a new version joins the history, a refetch of the
/// current version (same value) replaces it in place. A lower version, or
/// the current version with another value, is refused (logged): L1's
/// versions only increase and each carries one value. True when installed.
fn install(collection: &str, s: &mut Snapshot, token: Arc<Token>) -> bool {
    if let Some(cur) = &s.token
        && (token.version < cur.version
            || (token.version == cur.version && token.value != cur.value))
    {
        warn!(
            collection,
            held = cur.version,
            offered = token.version,
            "refusing a token that would move this sidecar's version backwards or relabel it"
        );
        return false;
    }
    match s.history.back() {
        Some(last) if last.version == token.version => {
            s.history.pop_back();
        }
        _ => {}
    }
    s.history.push_back(token.clone());
    while s.history.len() > HISTORY {
        s.history.pop_front();
    }
    s.token = Some(token);
    true
}

fn finish(s: &mut Snapshot) {
    s.refreshing = false;
    s.finished = s.started;
}

/// Changes L1 and tells readiness watchers.
fn publish(c: &Collection, shared: &Shared, f: impl FnOnce(&mut Snapshot)) {
    c.state.send_modify(f);
    shared.epoch.send_modify(|e| *e = e.wrapping_add(1));
}
