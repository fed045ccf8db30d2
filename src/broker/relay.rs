//! The relay: the task that runs a collection whose source is another
//! token-broker ([`Remote`]) instead of a refresher. It follows the remote
//! collection with `WatchToken` and installs each token as the remote gave
//! it (version, `fetched_at`, `refresh_at`, `expires_at`), so a version means
//! the same token at every tier; it forwards demand it cannot serve from L1:
//! an `InvalidateToken` of the current version (as a compare-and-invalidate
//! of that version at the remote: many leaves reporting one version cause one
//! refresh at the root), a `min_remaining` the current token does not meet,
//! and a caller waiting with nothing servable (which also brings the remote's
//! failure back to the caller instead of a timeout).
//!
//! | state | event | next state | invariant kept |
//! |---|---|---|---|
//! | following endpoint `i` | a token arrives | installed (`Snapshot::install`: never a lower version, never a relabel) | versions only increase; one value per version |
//! | following endpoint `i` | the stream breaks or cannot open | following endpoint `i + 1` at once; after a whole round of failures, backing off (full jitter) | the current token is served until its hard expiry; nothing is invented |
//! | not yet asked for (lazy) | the first demand (`activate`) | following | a lazy collection is not fetched at the root before anyone asks |
//! | any | demand (`wake`) | one forwarded call; its token installed, or its failure recorded as backoff | a failure is never a token; callers with nothing servable fail fast while backing off |
//! | current token `PROBE_GRACE` past `refresh_at`, nothing newer | probe (`GetCollectionToken`), again every `PROBE_EVERY` | the same token with the remote's new instants (a refetch of one value is not pushed), and `stale` when the remote says so | a follower serves stale when its root does (learned within `PROBE_GRACE` and a round trip), and never past the remote's hard expiry |
//!
//! Contract: no store is touched (a leaf needs no database); the token
//! instants are the remote's, read on this sidecar's clock (tiers should
//! keep their clocks in step, as for any expiry); a stream that resumes
//! asks for the versions after L1's (`after_version`), so a break loses at
//! most intermediate versions the remote no longer holds, and the latest
//! always arrives.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use super::collection::Collection;
use super::{Shared, epoch_ms};
use crate::metrics::RefreshOutcome;
use crate::source::{FailureClass, FetchError, Remote, RemoteToken};
use crate::store::Backoff;
use crate::token::Token;

/// A stream that ends sooner than this after opening counts as a failure of
/// its endpoint (a remote that accepts and drops at once must not be
/// reconnected to in a tight loop).
const SHORT_LIVED: Duration = Duration::from_secs(2);

/// How long past the current token's `refresh_at` a follower waits for the
/// remote's next version before it asks the remote (`Call::Probe`): the
/// remote may be failing (its answer says `stale`), or have refetched the
/// same value with new instants (which no watch stream carries).
const PROBE_GRACE: Duration = Duration::from_secs(1);
/// How often it asks again while no newer token arrives.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Runs `c` from `remote` until shutdown: from the start when it is
/// prefetched, else from the first caller's demand (so a lazy collection
/// is not fetched at the root before anyone asks).
pub(super) async fn run(c: Arc<Collection>, remote: Arc<dyn Remote>, shared: Shared) {
    while !c.demand.active.load(Ordering::Relaxed) {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = c.wake.notified() => {}
        }
    }
    // The permit this wake-up consumed may have carried demand.
    c.wake.notify_one();
    let n = remote.endpoints().max(1);
    let mut relay = Relay {
        c,
        remote,
        shared,
        endpoint: 0,
        n,
        failures: 0,
        logged: false,
        probed: None,
    };
    relay.follow().await;
}

struct Relay {
    c: Arc<Collection>,
    remote: Arc<dyn Remote>,
    shared: Shared,
    /// The endpoint in use: where the stream is opened and demand is sent.
    endpoint: usize,
    n: usize,
    /// Consecutive failed endpoints (a whole round of them means back off).
    failures: u32,
    /// A failure was logged at warn since the last success (the first
    /// failure of an outage warns, the rest are debug).
    logged: bool,
    /// The last probe: of which token (version, `fetched_at`), and when.
    probed: Option<(u64, SystemTime, Instant)>,
}

impl Relay {
    async fn follow(&mut self) {
        let shutdown = self.shared.shutdown.clone();
        loop {
            let after = self.c.current_version();
            let opened = tokio::select! {
                () = shutdown.cancelled() => return,
                opened = self.remote.watch(self.endpoint, after) => opened,
            };
            match opened {
                Ok(stream) => {
                    let opened_at = tokio::time::Instant::now();
                    let outcome = self.pump(stream).await;
                    if shutdown.is_cancelled() {
                        return;
                    }
                    let err = match outcome {
                        Err(e) => e,
                        Ok(()) if opened_at.elapsed() >= SHORT_LIVED => {
                            // A long stream that ended (the remote drained):
                            // not a failure, but move on to the next address.
                            debug!(collection = %self.c.name, endpoint = %self.remote.endpoint(self.endpoint), "remote ended the watch; reconnecting");
                            self.failures = 0;
                            self.c.metrics.remote_following(false);
                            self.endpoint = (self.endpoint + 1) % self.n;
                            continue;
                        }
                        Ok(()) => FetchError::new(
                            FailureClass::Connect,
                            "the remote ended the watch at once",
                        ),
                    };
                    self.failed(&err);
                }
                Err(e) => self.failed(&e),
            }
            self.endpoint = (self.endpoint + 1) % self.n;
            if self.failures as usize >= self.n {
                // A whole round failed: back off (full jitter), still
                // serving demand meanwhile.
                let delay = self.c.policy.backoff(
                    self.failures / u32::try_from(self.n).unwrap_or(u32::MAX),
                    &mut rand::rng(),
                );
                let until = tokio::time::Instant::now() + delay;
                loop {
                    let probe = self.probe_at();
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep_until(until) => break,
                        () = self.c.wake.notified() => self.serve(false).await,
                        () = sleep_until(probe) => self.serve(true).await,
                    }
                }
            }
        }
    }

    /// Installs the stream's tokens and serves demand until the stream ends.
    async fn pump(&mut self, mut stream: crate::source::TokenStream) -> Result<(), FetchError> {
        self.succeeded();
        // Demand recorded while the stream was down left a wake-up permit:
        // the first turn of the loop serves it.
        let shutdown = self.shared.shutdown.clone();
        loop {
            let probe = self.probe_at();
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = self.c.wake.notified() => self.serve(false).await,
                () = sleep_until(probe) => self.serve(true).await,
                item = stream.next() => match item {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(e),
                    Some(Ok(token)) => match self.checked(token) {
                        Ok(token) => {
                            self.install(token);
                        }
                        Err(e) => return Err(e),
                    },
                },
            }
        }
    }

    /// When to ask the remote about the current token: `PROBE_GRACE` past
    /// its `refresh_at`, then every `PROBE_EVERY` while it stays current.
    fn probe_at(&self) -> Option<Instant> {
        // Only a servable token is asked about: without one, callers'
        // demand asks (and a probe would find nothing to ask about).
        let (version, fetched_at, refresh_at) = {
            let snap = self.c.state.borrow();
            let t = snap.servable(self.shared.clock.now())?;
            (t.version, t.fetched_at, t.refresh_at)
        };
        let mut at = Instant::now() + self.shared.clock.until(refresh_at + PROBE_GRACE);
        if let Some((v, f, when)) = self.probed
            && (v, f) == (version, fetched_at)
        {
            at = at.max(when + PROBE_EVERY);
        }
        Some(at)
    }

    /// Forwards the demand L1 cannot meet (or, with `probe`, asks about the
    /// current token): one call, on the endpoint in use first and then on
    /// the others when it cannot be reached.
    async fn serve(&mut self, probe: bool) {
        let now = self.shared.clock.now();
        let want_until_ms = self.c.demand.want_until_ms.load(Ordering::Relaxed);
        let call = {
            let snap = self.c.state.borrow();
            let force = self.c.demand.force_version.load(Ordering::Relaxed);
            let backing_off = snap
                .failure
                .as_ref()
                .is_some_and(|f| f.next_attempt_at > now);
            match snap.servable(now) {
                Some(t) if t.version <= force => Call::Invalidate(t.version),
                Some(t) if epoch_ms(t.expires_at) < want_until_ms => {
                    let until = UNIX_EPOCH + Duration::from_millis(want_until_ms);
                    Call::Get(Some(until.duration_since(now).unwrap_or_default()))
                }
                Some(t) if probe => {
                    self.probed = Some((t.version, t.fetched_at, Instant::now()));
                    Call::Get(None)
                }
                Some(_) => return,
                None if backing_off => return,
                None if want_until_ms > 0 => {
                    let until = UNIX_EPOCH + Duration::from_millis(want_until_ms);
                    Call::Get(Some(until.duration_since(now).unwrap_or_default()))
                }
                None => Call::Get(None),
            }
        };
        self.c.publish(&self.shared, |s| {
            s.refreshing = true;
            s.started += 1;
        });
        let timeout = self.c.policy.fetch_timeout;
        let shutdown = self.shared.shutdown.clone();
        let mut result = Err(FetchError::new(FailureClass::Connect, "no endpoint"));
        for step in 0..self.n {
            let i = (self.endpoint + step) % self.n;
            let answer = async {
                match call {
                    Call::Invalidate(v) => self.remote.invalidate(i, v, timeout).await,
                    Call::Get(min) => self.remote.get(i, min, timeout).await,
                }
            };
            // A stop does not wait for a forwarded call (callers waiting
            // for it are answered "shutting down" by the broker).
            let answer = tokio::select! {
                () = shutdown.cancelled() => return,
                answer = answer => answer,
            };
            result = answer.and_then(|r| {
                Ok(RemoteToken {
                    token: self.checked(r.token)?,
                    stale: r.stale,
                })
            });
            match &result {
                Err(e) if matches!(e.class, FailureClass::Connect | FailureClass::Timeout) => {
                    continue;
                }
                _ => break,
            }
        }
        match result {
            Ok(RemoteToken { token, stale }) => {
                if let Call::Invalidate(v) = call {
                    let _ = self.c.demand.force_version.compare_exchange(
                        v,
                        0,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                self.clear_want(want_until_ms);
                let version = token.version;
                let outcome = if self.install(token) {
                    RefreshOutcome::Rotated
                } else {
                    RefreshOutcome::Unchanged
                };
                self.c.record_outcome(outcome, Some(version));
                // The remote's failing refresh shows here as its `stale`.
                let failure = stale.then(|| Backoff {
                    failures: 1,
                    next_attempt_at: now + PROBE_EVERY,
                    class: FailureClass::UpstreamError,
                    detail: "the remote broker serves this token stale (its refresh is failing)"
                        .to_owned(),
                });
                self.c.publish(&self.shared, |s| {
                    s.failure = failure;
                    s.finish();
                });
            }
            Err(e) => {
                self.clear_want(want_until_ms);
                let failures = self
                    .c
                    .state
                    .borrow()
                    .failure
                    .as_ref()
                    .map_or(1, |f| f.failures.saturating_add(1));
                let backoff = self.c.backoff_after(&self.shared, failures, &e);
                self.log_failure(&e);
                self.c.record_outcome(RefreshOutcome::Failed(e.class), None);
                self.c.publish(&self.shared, |s| {
                    s.failure = Some(backoff);
                    s.finish();
                });
            }
        }
    }

    /// What the remote could give for a `min_remaining` is what there is:
    /// the demand recorded up to the call is served (a caller who asks
    /// again records it again); a longer one recorded meanwhile stays.
    fn clear_want(&self, asked: u64) {
        let _ = self.c.demand.want_until_ms.compare_exchange(
            asked,
            0,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// A remote token this sidecar will serve: one that claims to live
    /// longer than `max_lifetime` from now is a hostile or broken remote's
    /// (every broker caps its tokens there), an error rather than a token.
    fn checked(&self, token: Token) -> Result<Token, FetchError> {
        let now = self.shared.clock.now();
        if token.expires_at > now + self.c.policy.max_lifetime {
            return Err(FetchError::new(
                FailureClass::BadResponse,
                format!(
                    "remote token version {} expires further ahead than max_lifetime",
                    token.version
                ),
            ));
        }
        Ok(token)
    }

    /// Installs a remote token as it came; true when it is a new version.
    fn install(&self, token: Token) -> bool {
        let version = token.version;
        let token = Arc::new(token);
        let mut newer = false;
        self.c.publish(&self.shared, |s| {
            newer = s.token.as_ref().is_none_or(|t| t.version < version);
            if s.install(&self.c.name, token) {
                s.failure = None;
            } else {
                newer = false;
            }
        });
        newer
    }

    fn succeeded(&mut self) {
        if self.failures > 0 || self.logged {
            info!(collection = %self.c.name, endpoint = %self.remote.endpoint(self.endpoint), "following the remote broker again");
        }
        self.failures = 0;
        self.logged = false;
        self.c.metrics.remote_following(true);
        // A stream is open: a caller with nothing servable waits for it
        // instead of failing fast on an earlier failure.
        self.c.publish(&self.shared, |s| {
            if s.failure.is_some() {
                s.failure = None;
            }
        });
    }

    /// Records a failed endpoint: the collection backs off only when there
    /// is nothing to serve (readers then fail fast with the remote's error).
    fn failed(&mut self, e: &FetchError) {
        self.failures = self.failures.saturating_add(1);
        self.c.metrics.remote_following(false);
        self.log_failure(e);
        let now = self.shared.clock.now();
        let servable = self.c.state.borrow().servable(now).is_some();
        if !servable && self.failures as usize >= self.n {
            let backoff: Backoff = self.c.backoff_after(&self.shared, self.failures, e);
            self.c.publish(&self.shared, |s| s.failure = Some(backoff));
        }
    }

    fn log_failure(&mut self, e: &FetchError) {
        let endpoint = self.remote.endpoint(self.endpoint);
        if self.logged {
            debug!(collection = %self.c.name, %endpoint, error = %e, "remote broker still failing");
        } else {
            self.logged = true;
            warn!(collection = %self.c.name, %endpoint, error = %e, "remote broker failed; serving the current token while it is servable and failing over");
        }
    }
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, Copy)]
enum Call {
    Invalidate(u64),
    Get(Option<Duration>),
}
