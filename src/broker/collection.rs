//! One collection's state (L1) and every transition of it: what readers see
//! ([`Snapshot`]), what callers asked for ([`Demand`]), what the refresher
//! keeps beside it ([`Collection`]: the refresh token, an unshared token, a
//! peer's spend being waited for, standby, a peer's announced lease), and
//! the methods that move it.
//! The refresher (`refresher/`) and the follower (`follower.rs`) decide
//! *when*; this file says *what changes*, and each change is published
//! through [`Collection::publish`] (L1 and readiness watchers at once).
//!
//! | state (of the current token) | event | next state | invariant kept |
//! |---|---|---|---|
//! | none, or expired | a caller asks (`activate`), or prefetch | due: `wanted` | a token is never served at or after `expires_at` (`Snapshot::servable`) |
//! | fresh (`now < refresh_at`) | `refresh_at` passes; a forced refresh (`InvalidateToken` of this version, `min_remaining`, a rejected parent version: `forced`) | due, at `next_attempt`: the committer `committer_lead` early, standby sidecars later by `standby_delay` and not before a peer's announced lease ends (`PeerLease`) | one lease attempt per rotation, not one per sidecar |
//! | due | attempt starts (`begin`) | refreshing (`Snapshot::refreshing`, `started`) | waiting callers wait for an attempt that started after their demand |
//! | refreshing | fetch and commit succeed (`Snapshot::install`, `finish`) | fresh, one version up | versions only increase; one value per version (`install` refuses a lower version or a relabel) |
//! | refreshing | fetch fails (`backoff_after`) | backing off (`Snapshot::failure`) until `next_attempt_at` | a failure is never a token; the old token is served (stale) while servable |
//! | refreshing, store down | fetch succeeds (`keep_local`) | fresh but unshared, a random step above the next version | a watcher never sees two values under one version |
//! | unshared | the store answers (`refresher::local::reconcile`) | shared: the higher version wins | an unshared token is committed above the row, never dropped while it outlives the row's |
//! | any | a peer's commit arrives (`adopt`, from the follower or a re-read) | the peer's token when newer; standby when a peer committed it | L1 never moves back; a row behind L1 gets L1's token committed over it (`behind`) |
//! | any, rotating grant | a peer's spend is unresolved (`SpendWatch`) | holds; does not present the refresh token | a rotating refresh token is presented by one holder at a time |

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch as tokio_watch};
use tracing::{Span, warn};

use super::{BrokerError, HISTORY, Policy, Served, Shared};
use crate::metrics::{CollectionMetrics, RefreshOutcome};
use crate::source::{FetchError, Source};
use crate::store::{Backoff, NewToken, Row};
use crate::token::{Secret, Token};

/// A token fetched while the store is away takes a version this many apart
/// at random above the next one (see `keep_local`): two sidecars refreshing
/// through the same outage collide with a chance of one in this many.
const LOCAL_VERSION_SPREAD: u64 = 1 << 20;

/// A point-in-time view of one collection, published by its refresher.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The current token (servable or not: check `expires_at`).
    pub token: Option<Arc<Token>>,
    /// Recent tokens in ascending version order; the last one is `token`.
    pub history: VecDeque<Arc<Token>>,
    /// Set while refreshing fails; cleared by the next success.
    pub failure: Option<Backoff>,
    pub refreshing: bool,
    /// Attempts that reached the upstream: started / finished.
    pub started: u64,
    pub finished: u64,
    pub last_attempt_at: Option<SystemTime>,
}

impl Snapshot {
    pub(super) fn servable(&self, now: SystemTime) -> Option<&Arc<Token>> {
        self.token.as_ref().filter(|t| t.servable_at(now))
    }

    pub(super) fn served(&self, token: &Arc<Token>, now: SystemTime) -> Served {
        Served {
            token: token.clone(),
            stale: self.failure.is_some() && now >= token.refresh_at,
        }
    }

    /// The earliest instant a new attempt may start: the shared backoff always
    /// applies; the minimum interval applies only while a servable token exists.
    pub(super) fn attempt_allowed_at(&self, now: SystemTime, policy: &Policy) -> SystemTime {
        let mut at = now;
        if let Some(f) = &self.failure {
            at = at.max(f.next_attempt_at);
        }
        if self.servable(now).is_some()
            && let Some(last) = self.last_attempt_at
        {
            at = at.max(last + policy.min_refresh_interval);
        }
        at
    }

    pub(super) fn error(&self, collection: &str, now: SystemTime) -> BrokerError {
        match &self.failure {
            Some(f) => BrokerError::UpstreamFailing {
                collection: collection.to_owned(),
                class: f.class,
                failures: f.failures,
                next_attempt_at: f.next_attempt_at,
                retry_in: f.next_attempt_at.duration_since(now).unwrap_or_default(),
            },
            None => BrokerError::DeadlineExceeded {
                collection: collection.to_owned(),
            },
        }
    }

    /// Makes `token` current: a new version joins the history, a refetch of the
    /// current version (same value) replaces it in place. A lower version, or
    /// the current version with another value, is refused (logged): L1's
    /// versions only increase and each carries one value. True when installed.
    pub(super) fn install(&mut self, collection: &str, token: Arc<Token>) -> bool {
        if let Some(cur) = &self.token
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
        match self.history.back() {
            Some(last) if last.version == token.version => {
                self.history.pop_back();
            }
            _ => {}
        }
        self.history.push_back(token.clone());
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        self.token = Some(token);
        true
    }

    pub(super) fn finish(&mut self) {
        self.refreshing = false;
        self.finished = self.started;
    }
}

/// Demand recorded by callers for the refresher. Atomics, so recording demand
/// never waits on the refresher.
#[derive(Debug, Default)]
pub(super) struct Demand {
    /// Someone asked for this collection (prefetch collections start active).
    pub(super) active: AtomicBool,
    /// A forced refresh is wanted while the current version is <= this.
    pub(super) force_version: AtomicU64,
    /// A refresh is wanted while the current token expires before this
    /// (milliseconds since the Unix epoch).
    pub(super) want_until_ms: AtomicU64,
    /// The parent's token up to this version was reported rejected: a token
    /// fetched with one of those is refreshed (once the parent has a new one).
    pub(super) parent_rejected: AtomicU64,
}

pub(crate) struct Collection {
    pub(super) name: String,
    pub(super) source: Arc<dyn Source>,
    pub(super) policy: Policy,
    pub(super) required: bool,
    pub(super) metrics: CollectionMetrics,
    /// The span of a caller that is waiting for a refresh: the next attempt's
    /// `refresh` span becomes its child, so the caller's trace shows why it
    /// waited.
    pub(super) trigger: Mutex<Option<tracing::Span>>,
    pub(super) state: tokio_watch::Sender<Snapshot>,
    pub(super) demand: Demand,
    /// Wakes the refresher after demand was recorded. `notify_one` stores a
    /// permit, so a wake-up sent while the refresher is busy is not lost.
    pub(super) wake: Notify,
    /// The latest refresh token seen in the store (or fetched locally), for
    /// refreshes while the store is unreachable.
    pub(super) refresh_token: Mutex<Option<Secret>>,
    /// A token published while the store was unreachable, not yet committed.
    pub(super) unshared: Mutex<Option<Unshared>>,
    /// Set when the store answers again (a resync): reconcile without
    /// waiting for the next retry.
    pub(super) store_back: AtomicBool,
    /// Set while a due refresh of a rotating grant is held back for want of
    /// the store (so it is logged once per outage).
    pub(super) held_back: AtomicBool,
    /// What this refresher saw of a peer's unresolved spend of the rotating
    /// refresh token (see `refresher::leased::wait_for_spender`).
    pub(super) spend_watch: Mutex<Option<SpendWatch>>,
    /// Set while another sidecar committed the current token: that one makes
    /// the soft refresh, this one stands by (see `Collection::next_attempt`).
    pub(super) standby: AtomicBool,
    /// This process's spread of the standby delay, drawn once in `[0, 1)`.
    pub(super) standby_spread: f64,
    /// A peer's announced refresh lease (see [`PeerLease`]).
    pub(super) peer_lease: Mutex<PeerLease>,
}

/// What this sidecar was told of a peer's refresh lease by its `NOTIFY`: no
/// attempt before `until`, since no acquire could succeed. Any database
/// session may send such a notice, so it is a hint with limits: `until` is
/// capped at one `lease_ttl` from its arrival, and only one notice is taken
/// per L1 version (`taken_for`), so forged notices delay a refresh by at
/// most one `lease_ttl` per version, as a holder that dies would.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PeerLease {
    pub(super) until: Option<SystemTime>,
    pub(super) taken_for: Option<u64>,
}

/// A peer's spend being waited for: which one, whether its session was seen
/// connected, and since when it has not been.
#[derive(Debug, Clone)]
pub(super) struct SpendWatch {
    pub(super) spend: crate::store::Spend,
    pub(super) seen_alive: bool,
    pub(super) absent_since: Option<SystemTime>,
    pub(super) logged: bool,
}

/// A token published locally (L1 and watchers) but not yet in the store.
#[derive(Debug, Clone)]
pub(super) struct Unshared {
    pub(super) token: Token,
    pub(super) refresh_token: Option<Secret>,
    /// The refresh token spent to get `refresh_token` (`None`: the configured
    /// seed, or no rotation): the row may take `refresh_token` only while it
    /// still holds this one.
    pub(super) spent: Option<Secret>,
}

/// Locks a mutex that guards plain data written whole (a panic elsewhere
/// cannot leave it half-written, so a poisoned lock is safe to reuse).
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Collection {
    /// The parent version `token` was fetched with, when that version has
    /// been reported rejected (the token is then due for a refetch with a
    /// newer parent token).
    pub(super) fn rejected_parent(&self, token: &Token) -> Option<u64> {
        token
            .parent_version
            .filter(|v| *v <= self.demand.parent_rejected.load(Ordering::Relaxed))
    }

    pub(super) fn activate(&self) {
        if !self.demand.active.load(Ordering::Relaxed)
            && !self.demand.active.swap(true, Ordering::Relaxed)
        {
            self.wake.notify_one();
        }
    }

    pub(super) fn current_version(&self) -> u64 {
        self.state.borrow().token.as_ref().map_or(0, |t| t.version)
    }

    /// Whether a refresh is wanted at `now`, rate limits and backoff aside.
    pub(super) fn wanted(&self, now: SystemTime) -> bool {
        if !self.demand.active.load(Ordering::Relaxed) {
            return false;
        }
        let snap = self.state.borrow();
        match snap.servable(now) {
            None => true,
            Some(t) => self.forced(t) || self.soft_refresh_at(t) <= now,
        }
    }

    pub(super) fn forced(&self, t: &Token) -> bool {
        t.version <= self.demand.force_version.load(Ordering::Relaxed)
            || super::epoch_ms(t.expires_at) < self.demand.want_until_ms.load(Ordering::Relaxed)
            || self.rejected_parent(t).is_some()
    }

    /// When the next attempt is due, or `None` when nothing needs refreshing.
    pub(super) fn next_attempt(&self, now: SystemTime) -> Option<SystemTime> {
        if !self.demand.active.load(Ordering::Relaxed) {
            return None;
        }
        let snap = self.state.borrow();
        let allowed = snap.attempt_allowed_at(now, &self.policy);
        // No attempt before a peer's announced lease ends.
        let peer_lease = lock(&self.peer_lease).until;
        let after_lease = |at: SystemTime| peer_lease.map_or(at, |until| at.max(until));
        let Some(t) = snap.servable(now) else {
            return Some(after_lease(allowed));
        };
        let due = if self.forced(t) {
            now
        } else if self.standby.load(Ordering::Relaxed) {
            t.refresh_at + self.standby_delay(t)
        } else {
            self.soft_refresh_at(t)
        };
        Some(after_lease(due.max(allowed)))
    }

    /// When this sidecar's soft refresh of `t` is wanted: at `refresh_at`, or
    /// for the sidecar that committed `t` (not standby) `committer_lead`
    /// earlier, so that its lease notice reaches the others before their
    /// `refresh_at` and they do not try the lease at all.
    pub(super) fn soft_refresh_at(&self, t: &Token) -> SystemTime {
        if self.standby.load(Ordering::Relaxed) {
            t.refresh_at
        } else {
            t.refresh_at - committer_lead(t)
        }
    }

    /// A peer's lease notice (`until: None`: it gave the lease back), within
    /// the limits [`PeerLease`] states.
    pub(super) fn note_peer_lease(&self, until: Option<SystemTime>, now: SystemTime) {
        let version = self.current_version();
        let mut lease = lock(&self.peer_lease);
        match until {
            None => lease.until = None,
            Some(_) if lease.taken_for == Some(version) => return,
            Some(u) => {
                *lease = PeerLease {
                    until: Some(u.min(now + self.policy.lease_ttl)),
                    taken_for: Some(version),
                };
            }
        }
        drop(lease);
        self.wake.notify_one();
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
    /// less room every sidecar tries at `refresh_at`. (Waiting a quarter of a
    /// shorter room was tried and reverted: it spends slack a takeover may
    /// need; see docs/decisions.md.)
    pub(super) fn standby_delay(&self, t: &Token) -> Duration {
        let room = t
            .expires_at
            .duration_since(t.refresh_at)
            .unwrap_or_default();
        let ttl = self.policy.lease_ttl;
        if room < ttl.saturating_mul(4) {
            return Duration::ZERO;
        }
        ttl.mul_f64(1.0 + self.standby_spread / 2.0)
    }

    /// Records how an attempt that called the upstream ended: in the metrics and
    /// on the current `refresh` span.
    pub(super) fn record_outcome(&self, outcome: RefreshOutcome, version: Option<u64>) {
        self.metrics.refresh(outcome);
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

    /// A source whose refresh token rotates (an OAuth refresh-token grant): it
    /// must never be refreshed by several pods with the same refresh token.
    pub(super) fn rotating_grant(&self) -> bool {
        self.source.seed_fingerprint().is_some()
    }

    /// The lowest version `value` may be committed or published under: L1's
    /// version for the value L1 holds, one more for any other value.
    pub(super) fn min_version(&self, value: &Secret) -> u64 {
        self.state.borrow().token.as_ref().map_or(0, |t| {
            if t.value == *value {
                t.version
            } else {
                t.version + 1
            }
        })
    }

    /// Marks an attempt as started in L1; returns its number.
    pub(super) fn begin(&self, shared: &Shared, now: SystemTime) -> u64 {
        let attempt_no = self.state.borrow().started + 1;
        self.publish(shared, |s| {
            s.refreshing = true;
            s.started = attempt_no;
            s.last_attempt_at = Some(now);
        });
        attempt_no
    }

    /// Publishes a fetched token that the store could not take: the next version
    /// when the value changed, kept as unshared until reconciled.
    pub(super) fn keep_local(&self, shared: &Shared, mut new: NewToken, spent: Option<Secret>) {
        new.min_version = new.min_version.max(self.min_version(&new.value));
        let (mut version, rotated) = {
            let snap = self.state.borrow();
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
            *lock(&self.refresh_token) = Some(rt.clone());
        }
        let new_refresh_token = new.refresh_token.clone();
        let token = new.into_token(version);
        self.record_outcome(RefreshOutcome::Local, Some(version));
        {
            let mut unshared = lock(&self.unshared);
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
        self.standby.store(false, Ordering::Relaxed);
        self.publish(shared, |s| {
            s.failure = None;
            s.install(&self.name, Arc::new(token));
            s.finish();
        });
    }

    /// The row's refresh token, when it descends from the configured seed (a
    /// refresh token from another seed is ignored: the operator configured a new
    /// one, and the source then starts from it).
    pub(super) fn stored_refresh_token(&self, row: &Row) -> Option<Secret> {
        row.refresh_token
            .clone()
            .filter(|_| row.refresh_seed == self.source.seed_fingerprint())
    }

    pub(super) fn backoff_after(
        &self,
        shared: &Shared,
        failures: u32,
        err: &FetchError,
    ) -> Backoff {
        let mut delay = self.policy.backoff(failures, &mut rand::rng());
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
    pub(super) fn adopt(&self, shared: &Shared, row: Row) {
        if let Some(rt) = self.stored_refresh_token(&row) {
            *lock(&self.refresh_token) = Some(rt);
        }
        self.behind(shared, &row);
        let now = shared.clock.now();
        // An unshared token that outlives a newer row token is committed above it
        // (see `reconcile`) rather than dropped for it.
        let unshared_until = lock(&self.unshared)
            .as_ref()
            .filter(|u| u.token.servable_at(now))
            .map(|u| u.token.expires_at);
        let (newer, refetched) = {
            let snap = self.state.borrow();
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
                    self.wake.notify_one();
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
            && row.last_attempt_at <= self.state.borrow().last_attempt_at
        {
            return;
        }
        if newer.is_some() {
            // Its committer makes the next soft refresh; this sidecar stands by.
            let standby = row
                .refreshed_by
                .as_deref()
                .is_some_and(|by| by != &*shared.holder);
            self.standby.store(standby, Ordering::Relaxed);
            // Whoever held the lease for this rotation is done with it.
            lock(&self.peer_lease).until = None;
        }
        if newer.is_some() && !refetched {
            let mut unshared = lock(&self.unshared);
            if unshared
                .as_ref()
                .is_some_and(|u| newer.as_ref().is_some_and(|t| t.version > u.token.version))
            {
                *unshared = None;
            }
        }
        self.publish(shared, |s| {
            let installed = newer.is_some_and(|t| s.install(&self.name, Arc::new(t)));
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
    pub(super) fn behind(&self, shared: &Shared, row: &Row) {
        let Some(row_token) = &row.token else {
            return;
        };
        let l1 = self.state.borrow().token.clone();
        let Some(l1) = l1.filter(|t| t.servable_at(shared.clock.now())) else {
            return;
        };
        let behind = row_token.version < l1.version
            || (row_token.version == l1.version && row_token.value != l1.value)
            || (row_token.version > l1.version && !row_token.servable_at(shared.clock.now()));
        if !behind {
            return;
        }
        let mut unshared = lock(&self.unshared);
        if unshared
            .as_ref()
            .is_some_and(|u| u.token.version >= l1.version)
        {
            return;
        }
        warn!(
            collection = %self.name,
            stored = row_token.version,
            held = l1.version,
            "the stored token is behind the one this sidecar holds (a restore or a hand edit?); committing ours over it"
        );
        *unshared = Some(Unshared {
            token: (*l1).clone(),
            refresh_token: None,
            spent: None,
        });
        self.wake.notify_one();
    }

    /// Changes L1 and tells readiness watchers.
    pub(super) fn publish(&self, shared: &Shared, f: impl FnOnce(&mut Snapshot)) {
        self.state.send_modify(f);
        shared.epoch.send_modify(|e| *e = e.wrapping_add(1));
    }
}

/// How much earlier than `refresh_at` the sidecar that committed `t` starts
/// its soft refresh: an eighth of the room between `refresh_at` and hard
/// expiry, at most 500 ms. Enough for its lease notice to reach every
/// sidecar (measured: docs/benchmark.md), so the others, told the lease is
/// held, do not try it; it takes nothing from the room a takeover needs, as
/// the others' schedule is unchanged.
fn committer_lead(t: &Token) -> Duration {
    t.expires_at
        .duration_since(t.refresh_at)
        .unwrap_or_default()
        .checked_div(8)
        .unwrap_or_default()
        .min(COMMITTER_LEAD_MAX)
}

/// The most [`committer_lead`] moves a soft refresh forward.
const COMMITTER_LEAD_MAX: Duration = Duration::from_millis(500);
