//! The refresher: one supervised task per collection, the only caller of its
//! source.
//!
//! Contract: sleeps until the next attempt is due (soft refresh, recorded demand,
//! backoff end) and never busy-loops; each attempt takes the store's lease,
//! fetches under a timeout in its own task (a panicking source is a failure of
//! class `internal`, not a dead refresher), commits through the store and only
//! then publishes to L1. A failure is recorded as backoff, never as a token.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tracing::{Instrument, debug, info, info_span, warn};

use super::{Collection, HISTORY, Shared, Snapshot};
use crate::source::{FailureClass, FetchContext, FetchError};
use crate::store::{Acquired, Backoff, Lease, NewToken, Row, Store};
use crate::token::Token;

/// The refresher re-evaluates at least this often, so that a wall-clock jump
/// cannot leave it asleep past a deadline for long.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// The lease outlives the fetch timeout by this much.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// A name for this process in lease rows: host name and process id.
pub(super) fn holder_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!("{host}/{}", std::process::id())
}

pub(super) async fn run(c: Arc<Collection>, store: Arc<dyn Store>, shared: Shared, holder: String) {
    let clock = shared.clock;
    // Start from what the store already holds (a previous run's or a peer's token).
    match store.load(&c.name).await {
        Ok(row) => adopt(&c, &shared, row),
        Err(e) => warn!(collection = %c.name, error = %e, "could not read the store at start-up"),
    }
    // A peer holds the lease: do not try again before this.
    let mut not_before: Option<SystemTime> = None;
    loop {
        let now = clock.now();
        let next = next_attempt(&c, now).map(|at| not_before.map_or(at, |nb| at.max(nb)));
        if let Some(at) = next
            && at <= now
        {
            not_before = attempt(&c, store.as_ref(), &shared, &holder).await;
            continue;
        }
        let sleep = next.map_or(MAX_SLEEP, |at| clock.until(at).min(MAX_SLEEP));
        tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => return,
            () = c.wake.notified() => {}
            () = tokio::time::sleep(sleep) => {}
        }
    }
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
    let forced = t.version <= c.demand.force_version.load(Ordering::Relaxed)
        || super::epoch_ms(t.expires_at) < c.demand.want_until_ms.load(Ordering::Relaxed)
        || c.rejected_parent(t).is_some();
    let due = if forced { now } else { t.refresh_at };
    Some(due.max(allowed))
}

/// One refresh attempt. Returns the instant before which no new attempt should
/// start when a peer holds the lease.
async fn attempt(
    c: &Collection,
    store: &dyn Store,
    shared: &Shared,
    holder: &str,
) -> Option<SystemTime> {
    let clock = shared.clock;
    let now = clock.now();
    let ttl = c.policy.fetch_timeout + LEASE_MARGIN;
    let (lease, row) = match store.acquire(&c.name, holder, ttl, now).await {
        Ok(Acquired::Granted { lease, row }) => (lease, row),
        Ok(Acquired::Held { until, row }) => {
            debug!(collection = %c.name, "refresh lease held by a peer; waiting for its result");
            adopt(c, shared, row);
            return Some(until);
        }
        Err(e) => {
            // Without the store there is no lease to take; back off locally.
            let failures = c.state.borrow().failure.as_ref().map_or(0, |f| f.failures) + 1;
            let err = FetchError::new(FailureClass::Store, e.to_string());
            let backoff = backoff_after(c, shared, failures, &err);
            warn!(collection = %c.name, error = %e, "could not take the refresh lease");
            // Counts as a finished attempt so that waiting callers see the error.
            publish(c, shared, |s| {
                s.started += 1;
                s.failure = Some(backoff);
                finish(s);
            });
            return None;
        }
    };
    // Demand recorded up to here is served by this attempt.
    c.demand.force_version.store(0, Ordering::Relaxed);
    c.demand.want_until_ms.store(0, Ordering::Relaxed);
    let attempt_no = c.state.borrow().started + 1;
    publish(c, shared, |s| {
        s.refreshing = true;
        s.started = attempt_no;
        s.last_attempt_at = Some(now);
    });
    let span =
        info_span!("refresh", collection = %c.name, source = c.source.kind(), attempt = attempt_no);
    async {
        let result = fetch(c, shared, now, row.refresh_token.clone())
            .await
            .and_then(|fetched| {
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
                    refresh_token: fetched.refresh_token,
                    parent_version: fetched.parent_version,
                })
            });
        match result {
            Ok(new) => commit_token(c, store, shared, lease, new).await,
            Err(err) => commit_failure(c, store, shared, lease, row, err).await,
        }
    }
    .instrument(span)
    .await;
    None
}

/// Calls the source in its own task, under the fetch timeout.
async fn fetch(
    c: &Collection,
    shared: &Shared,
    now: SystemTime,
    refresh_token: Option<crate::token::Secret>,
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
    let task = tokio::spawn(async move { tokio::time::timeout(timeout, source.fetch(ctx)).await });
    match task.await {
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
    new: NewToken,
) {
    match store.commit_token(lease, new).await {
        Ok(committed) => {
            let token = Arc::new(committed.token);
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
                install(s, token);
                finish(s);
            });
        }
        Err(e) => {
            warn!(error = %e, "could not store the refreshed token");
            let failures = c.state.borrow().failure.as_ref().map_or(0, |f| f.failures) + 1;
            let err = FetchError::new(FailureClass::Store, e.to_string());
            let backoff = backoff_after(c, shared, failures, &err);
            publish(c, shared, |s| {
                s.failure = Some(backoff);
                finish(s);
            });
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

/// Takes a row read from the store into L1 when it is newer than what L1 holds.
fn adopt(c: &Collection, shared: &Shared, row: Row) {
    let current = c.state.borrow().token.as_ref().map_or(0, |t| t.version);
    let newer = row.token.filter(|t| t.version > current);
    if newer.is_none() && row.backoff.is_none() {
        return;
    }
    publish(c, shared, |s| {
        if let Some(t) = newer {
            install(s, Arc::new(t));
        }
        if row.backoff.is_some() {
            s.failure = row.backoff;
        }
        if row.last_attempt_at > s.last_attempt_at {
            s.last_attempt_at = row.last_attempt_at;
        }
    });
}

/// Makes `token` current: a new version joins the history, a refetch of the
/// current version replaces it in place.
fn install(s: &mut Snapshot, token: Arc<Token>) {
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
