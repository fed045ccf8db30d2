//! The broker core: per-collection state (L1), single-flight refresh, the
//! refresh policy, and fan-out to watchers.
//!
//! Contract:
//! - Reads take a snapshot (`watch::Sender::borrow`, a read lock held for a few
//!   field reads, never across `.await`) and do no I/O while a servable token
//!   exists; a token is never handed out at or after its `expires_at`.
//! - Exactly one task per collection (the refresher) ever calls the source, so
//!   refreshes are single-flight by construction. Callers only record demand and
//!   wait, bounded by their deadline, for the attempt that serves it.
//! - L1 timestamps are copied from the store's row: no clock is restarted here.
//! - Rows changed by other sidecars arrive as store events; a follower task
//!   reads the row and installs it when it is newer (`follower.rs`,
//!   `Collection::adopt`).
//! - A token fetched while the store is unreachable is published locally
//!   under the next version and kept as "unshared" until the refresher
//!   reconciles it with the row (the higher version wins; a tie with a
//!   different value is committed one version higher), so a watcher never
//!   sees two different tokens under one version.
//! - This module knows nothing of protobuf, SQL or the configuration.
//!
//! Layout: `mod.rs` is the read side (`Broker::get`, `invalidate`, `watch`,
//! `readiness`) and the start-up of the tasks; `collection.rs` is one
//! collection's state and its transitions (with the state table);
//! `refresher/` decides when to refresh and by which path; `follower.rs`
//! turns peers' commits into L1 changes; `relay.rs` runs a collection whose
//! source is another token-broker (followed, not fetched: the remote's
//! versions and instants are kept); `watch.rs` streams them.

mod collection;
mod error;
mod follower;
mod parents;
pub mod policy;
mod refresher;
mod relay;
mod watch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, watch as tokio_watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::source::Source;
use crate::store::Store;
use crate::token::Token;

use collection::{Collection, Demand, PeerLease, Snapshot, SpendWatch, Unshared, lock};
pub use error::BrokerError;
pub use policy::Policy;
pub use watch::TokenWatch;

/// How many rotated tokens each collection keeps for watchers that fall behind
/// or reconnect with `after_version`.
const HISTORY: usize = 16;

/// What one collection needs to run.
pub struct CollectionSpec {
    pub name: String,
    pub source: Arc<dyn Source>,
    pub policy: Policy,
    /// Fetch at start-up and keep refreshed even before anyone asks.
    pub prefetch: bool,
    /// Readiness waits for this collection to hold a servable token.
    pub required: bool,
}

/// A token as handed to a caller.
#[derive(Debug, Clone)]
pub struct Served {
    pub token: Arc<Token>,
    /// Served past `refresh_at` because refreshing is failing.
    pub stale: bool,
}

/// What a caller of `InvalidateToken` says the upstream rejected.
#[derive(Debug, Clone, Copy)]
pub enum Rejected<'a> {
    Version(u64),
    Value(&'a str),
    Both(u64, &'a str),
}

/// The broker: a cheap handle, clone it freely.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    collections: HashMap<String, Arc<Collection>>,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    /// Parent name -> the collections whose source depends on it.
    children: HashMap<String, Vec<Arc<Collection>>>,
    clock: Clock,
    /// Bumped after any collection's state changes (for readiness).
    epoch: tokio_watch::Sender<u64>,
    shutdown: CancellationToken,
    /// The follower and every refresher, supervised (restarted after a
    /// panic); aborted when the broker is dropped.
    tasks: Mutex<Vec<crate::supervise::Supervised>>,
    /// This process's name in lease rows.
    holder: Arc<str>,
}

impl Broker {
    /// Starts a broker with one refresher task per collection. Must be called
    /// inside a tokio runtime; the tasks stop when `shutdown` is cancelled.
    /// With a store that has a clock of its own (Postgres), `clock` follows
    /// it, so every instant shared through the store is on one clock.
    pub fn start(
        specs: Vec<CollectionSpec>,
        store: Arc<dyn Store>,
        clock: Clock,
        shutdown: CancellationToken,
    ) -> Self {
        let clock = match store.clock_offset() {
            Some(offset) => clock.following(offset),
            None => clock,
        };
        let (epoch, _) = tokio_watch::channel(0);
        let metrics = Arc::new(Metrics::new());
        let collections = specs
            .into_iter()
            .map(|spec| {
                let (state, _) = tokio_watch::channel(Snapshot::default());
                let c = Collection {
                    demand: Demand {
                        active: AtomicBool::new(spec.prefetch),
                        ..Demand::default()
                    },
                    metrics: metrics.collection(&spec.name),
                    trigger: Mutex::new(None),
                    name: spec.name,
                    source: spec.source,
                    policy: spec.policy,
                    required: spec.required,
                    state,
                    wake: Notify::new(),
                    refresh_token: Mutex::new(None),
                    unshared: Mutex::new(None),
                    store_back: AtomicBool::new(false),
                    held_back: AtomicBool::new(false),
                    spend_watch: Mutex::new(None),
                    standby: AtomicBool::new(false),
                    standby_spread: rand::random_range(0.0..1.0),
                    peer_lease: Mutex::new(PeerLease::default()),
                };
                (c.name.clone(), Arc::new(c))
            })
            .collect::<HashMap<_, _>>();
        let mut children: HashMap<String, Vec<Arc<Collection>>> = HashMap::new();
        for c in collections.values() {
            if let Some(parent) = c.source.parent() {
                children
                    .entry(parent.to_owned())
                    .or_default()
                    .push(c.clone());
            }
        }
        let inner = Arc::new(Inner {
            collections,
            metrics,
            store: store.clone(),
            children,
            clock,
            epoch,
            shutdown: shutdown.clone(),
            tasks: Mutex::new(Vec::new()),
            holder: refresher::holder_id().into(),
        });
        let mut tasks = Vec::new();
        {
            // Followed collections (a remote broker's) have no rows to follow.
            let collections: Vec<_> = inner
                .collections
                .values()
                .filter(|c| c.source.remote().is_none())
                .cloned()
                .collect();
            let (shared, store) = (Inner::shared(&inner), store.clone());
            let mut started = false;
            tasks.push(crate::supervise::spawn(
                "follower",
                None,
                shutdown.clone(),
                move || {
                    let restarted = std::mem::replace(&mut started, true);
                    follower::follow(
                        collections.clone(),
                        store.events(),
                        shared.clone(),
                        store.clone(),
                        restarted,
                    )
                },
            ));
        }
        for c in inner.collections.values() {
            let (c, store, shared) = (c.clone(), store.clone(), Inner::shared(&inner));
            if let Some(remote) = c.source.remote() {
                tasks.push(crate::supervise::spawn(
                    "relay",
                    Some(c.name.clone()),
                    shutdown.clone(),
                    move || relay::run(c.clone(), remote.clone(), shared.clone()),
                ));
                continue;
            }
            tasks.push(crate::supervise::spawn(
                "refresher",
                Some(c.name.clone()),
                shutdown.clone(),
                move || refresher::run(c.clone(), store.clone(), shared.clone()),
            ));
        }
        *lock(&inner.tasks) = tasks;
        Self { inner }
    }

    /// Keeps a supervised task alive as long as the broker (it is aborted
    /// when the broker is dropped).
    pub fn own_task(&self, task: crate::supervise::Supervised) {
        lock(&self.inner.tasks).push(task);
    }

    /// Once shutdown is cancelled, waits (at most `within` from then) for the
    /// background tasks to end, so that a refresh in flight commits its token
    /// (and a rotated refresh token) instead of dying with the process. True
    /// when they all ended in time.
    pub async fn stopped(&self, within: Duration) -> bool {
        self.inner.shutdown.cancelled().await;
        let tasks = std::mem::take(&mut *lock(&self.inner.tasks));
        tokio::time::timeout(within, async {
            for t in tasks {
                t.join().await;
            }
        })
        .await
        .is_ok()
    }

    pub fn clock(&self) -> Clock {
        self.inner.clock.clone()
    }

    fn collection(&self, name: &str) -> Result<&Arc<Collection>, BrokerError> {
        self.inner
            .collections
            .get(name)
            .ok_or_else(|| BrokerError::UnknownCollection(name.to_owned()))
    }

    /// A servable token for `name`. Without one (or when `min_remaining` asks for
    /// a longer-lived one), waits until `deadline` for the refresh that serves it.
    pub async fn get(
        &self,
        name: &str,
        min_remaining: Option<Duration>,
        deadline: Instant,
    ) -> Result<Served, BrokerError> {
        let c = self.collection(name)?;
        let now = self.inner.clock.now();
        let want_until = min_remaining.map(|d| now + d);
        {
            let snap = c.state.borrow();
            if let Some(t) = snap.servable(now)
                && want_until.is_none_or(|u| t.expires_at >= u)
            {
                c.activate();
                c.metrics.memory_hits.inc();
                let served = snap.served(t, now);
                if served.stale {
                    c.metrics.stale_serves.inc();
                }
                return Ok(served);
            }
        }
        c.activate();
        c.metrics.get_waits.inc();
        let need = match want_until {
            Some(u) => Need::ExpiringAfter(u),
            None => Need::Servable,
        };
        self.refresh_and_wait(c, need, deadline)
            .await
            .map(|(served, _)| served)
    }

    /// Compare-and-invalidate: when `rejected` names the current token, forces
    /// one (rate-limited) refresh and waits for it; otherwise returns the current
    /// token at once. The bool says whether the token was replaced.
    pub async fn invalidate(
        &self,
        name: &str,
        rejected: Rejected<'_>,
        deadline: Instant,
    ) -> Result<(Served, bool), BrokerError> {
        let c = self.collection(name)?;
        c.activate();
        let current_version = {
            let snap = c.state.borrow();
            snap.token.as_ref().and_then(|t| {
                let matches = match rejected {
                    Rejected::Version(v) => t.version == v,
                    Rejected::Value(value) => t.value.ct_eq(value),
                    Rejected::Both(v, value) => t.version == v && t.value.ct_eq(value),
                };
                matches.then_some(t.version)
            })
        };
        match current_version {
            Some(version) => {
                c.demand.force_version.fetch_max(version, Ordering::Relaxed);
                self.mark_children(name, version);
                self.refresh_and_wait(c, Need::NewerThan(version), deadline)
                    .await
            }
            None => {
                // Not the current token (an older version, or a value we never
                // served): hand out the current one without a refresh.
                let served = self.get(name, None, deadline).await?;
                Ok((served, false))
            }
        }
    }

    /// After `version` of `parent` was rejected: marks for refresh the children
    /// whose current token was fetched with exactly that version.
    fn mark_children(&self, parent: &str, version: u64) {
        for child in self.inner.children.get(parent).into_iter().flatten() {
            let fetched_with = child
                .state
                .borrow()
                .token
                .as_ref()
                .and_then(|t| t.parent_version);
            if fetched_with == Some(version) {
                child
                    .demand
                    .parent_rejected
                    .fetch_max(version, Ordering::Relaxed);
                child.wake.notify_one();
            }
        }
    }

    /// A stream of the tokens owed to a watcher that has seen `after_version`.
    pub fn watch(&self, name: &str, after_version: u64) -> Result<TokenWatch, BrokerError> {
        let c = self.collection(name)?;
        c.activate();
        Ok(TokenWatch::new(
            c.state.subscribe(),
            after_version,
            self.inner.clock.clone(),
            self.inner.shutdown.clone(),
            c.metrics.watch_streams.clone(),
        ))
    }

    /// Ready when every required collection holds a servable token.
    pub fn readiness(&self) -> Readiness {
        let now = self.inner.clock.now();
        let mut waiting = Vec::new();
        let mut earliest: Option<SystemTime> = None;
        for c in self.inner.collections.values().filter(|c| c.required) {
            match c.state.borrow().servable(now) {
                Some(t) => earliest = Some(earliest.map_or(t.expires_at, |e| e.min(t.expires_at))),
                None => waiting.push(c.name.clone()),
            }
        }
        waiting.sort();
        Readiness {
            ready: waiting.is_empty(),
            waiting,
            earliest_expiry: earliest,
        }
    }

    /// The metrics in the Prometheus text format, with the state gauges
    /// (expiry, version, readiness, database degraded) set from now.
    pub fn metrics_text(&self) -> String {
        let now = self.inner.clock.now();
        let m = &self.inner.metrics;
        for c in self.inner.collections.values() {
            let snap = c.state.borrow();
            let version = snap.token.as_ref().map_or(0, |t| t.version);
            let expires_in = snap
                .token
                .as_ref()
                .map(|t| match t.expires_at.duration_since(now) {
                    Ok(d) => d.as_secs_f64(),
                    Err(e) => -e.duration().as_secs_f64(),
                });
            m.set_token(&c.name, version, expires_in);
        }
        m.set_state(self.readiness().ready, self.inner.store.degraded());
        m.encode()
    }

    /// The metrics the gRPC layer records RPCs in.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Changes whenever any collection's state changes.
    pub fn changes(&self) -> tokio_watch::Receiver<u64> {
        self.inner.epoch.subscribe()
    }

    /// Records the demand `need`, wakes the refresher and waits (until
    /// `deadline`) for an attempt that started after the demand was recorded.
    async fn refresh_and_wait(
        &self,
        c: &Collection,
        need: Need,
        deadline: Instant,
    ) -> Result<(Served, bool), BrokerError> {
        let clock = &self.inner.clock;
        if let Need::ExpiringAfter(u) = need {
            c.demand
                .want_until_ms
                .fetch_max(epoch_ms(u), Ordering::Relaxed);
        }
        let target = {
            let now = clock.now();
            let snap = c.state.borrow();
            if let Some(t) = snap.servable(now) {
                if need.satisfied_by(t) {
                    return Ok((snap.served(t, now), need.replaced(t)));
                }
                // A servable token exists: wait only if a refresh can start
                // before the caller gives up; otherwise answer now.
                if snap.attempt_allowed_at(now, &c.policy) > clock.wall_at(deadline) {
                    return Ok((snap.served(t, now), false));
                }
            } else if let Some(f) = &snap.failure
                && f.next_attempt_at > now
                && !snap.refreshing
            {
                // Backing off with nothing to serve: fail fast, do not queue.
                return Err(snap.error(&c.name, now));
            }
            snap.started + 1
        };
        {
            let mut trigger = lock(&c.trigger);
            if trigger.is_none() {
                *trigger = Some(tracing::Span::current());
            }
        }
        c.wake.notify_one();
        let mut rx = c.state.subscribe();
        let wait = tokio::time::timeout_at(
            deadline,
            rx.wait_for(|s| {
                let now = clock.now();
                s.finished >= target
                    || s.servable(now).is_some_and(|t| need.satisfied_by(t))
                    // A peer's failure came in through the store: backing off
                    // with nothing to serve fails fast, as on arrival.
                    || (s.servable(now).is_none()
                        && !s.refreshing
                        && s.failure.as_ref().is_some_and(|f| f.next_attempt_at > now))
            }),
        );
        // Reduce the outcome to a bool at once: `wait_for` returns a `Ref` that
        // holds the channel's read lock, and the snapshot is borrowed again below.
        let timed_out = tokio::select! {
            waited = wait => waited.is_err(),
            () = self.inner.shutdown.cancelled() => return Err(BrokerError::ShuttingDown),
        };
        let now = clock.now();
        let snap = c.state.borrow();
        match snap.servable(now) {
            Some(t) => Ok((snap.served(t, now), need.replaced(t))),
            None if timed_out => Err(BrokerError::DeadlineExceeded {
                collection: c.name.clone(),
            }),
            None => Err(snap.error(&c.name, now)),
        }
    }
}

/// What a waiting caller needs from a refresh.
#[derive(Debug, Clone, Copy)]
enum Need {
    Servable,
    NewerThan(u64),
    ExpiringAfter(SystemTime),
}

impl Need {
    fn satisfied_by(self, t: &Token) -> bool {
        match self {
            Need::Servable => true,
            Need::NewerThan(v) => t.version > v,
            Need::ExpiringAfter(u) => t.expires_at >= u,
        }
    }

    fn replaced(self, t: &Token) -> bool {
        matches!(self, Need::NewerThan(v) if t.version > v)
    }
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Whether the sidecar is ready, and what it waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// Required collections without a servable token, sorted.
    pub waiting: Vec<String>,
    /// The earliest hard expiry among the required tokens (readiness changes then).
    pub earliest_expiry: Option<SystemTime>,
}

/// What refresher tasks share with the broker.
#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    clock: Clock,
    epoch: tokio_watch::Sender<u64>,
    shutdown: CancellationToken,
    /// The broker itself, for sources that depend on other collections. Weak:
    /// the refreshers must not keep the broker alive.
    broker: Weak<Inner>,
    /// This process's name in lease rows.
    holder: Arc<str>,
}

impl Inner {
    fn shared(this: &Arc<Self>) -> Shared {
        Shared {
            metrics: this.metrics.clone(),
            clock: this.clock.clone(),
            epoch: this.epoch.clone(),
            shutdown: this.shutdown.clone(),
            broker: Arc::downgrade(this),
            holder: this.holder.clone(),
        }
    }
}
