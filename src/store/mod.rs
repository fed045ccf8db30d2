//! The shared tier (L2) seam: one row per collection holding the current token,
//! the refresh lease and the backoff state.
//!
//! Contract (every implementation):
//! - `version` only increases; a commit whose value equals the current value
//!   keeps the version (a refetch, not a rotation) unless the committing
//!   sidecar already holds a higher one.
//! - Writes are fenced: `commit_*` succeed only while the caller's lease is the
//!   current one (same fence and same holder), and they release it. A lease is
//!   short and renewed by its holder ([`Store::renew`]) while its fetch runs,
//!   and it expires on its own, so a holder that dies never blocks a collection
//!   for longer than the lease TTL. Fences never go backwards, even when a row
//!   is deleted and created again.
//! - A commit that rotates the value sets `version` to
//!   `max(row version + 1, min_version)`, whether or not the row's current value
//!   could be read (a value sealed with a key this sidecar lacks still counts),
//!   so a commit never lands at or below a version anyone held: see
//!   [`NewToken::version_over`].
//! - A spend ([`Row::spend`]), recorded under the lease before a rotating
//!   refresh token is presented, is cleared only by a commit that stores a
//!   refresh token or is the spender's, the spender's recorded failure, or
//!   its saved refresh token; a commit records its holder as
//!   [`Row::refreshed_by`].
//! - Errors never carry token values.
//! - [`Store::events`] tells the broker about rows changed by other processes
//!   (rotations, and "resync everything" after any gap in that news).
//!
//! The in-memory store is the embedded default; the Postgres store shares rows
//! across sidecars.

pub mod crypto;
mod memory;
pub mod migrate;
pub mod postgres;

use std::time::{Duration, SystemTime};

use crate::source::{BoxFuture, FailureClass};
use crate::token::{Secret, Token};

pub use memory::MemoryStore;
pub use postgres::{PgSettings, PgStore};

/// Shared backoff state after consecutive failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    pub failures: u32,
    pub next_attempt_at: SystemTime,
    pub class: FailureClass,
    /// Safe to log; never contains secrets or upstream bodies.
    pub detail: String,
}

/// A collection's row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub token: Option<Token>,
    /// The latest refresh token the upstream issued (rotation), committed with
    /// the access token it came with.
    pub refresh_token: Option<Secret>,
    /// Fingerprint of the configured seed `refresh_token` descends from.
    pub refresh_seed: Option<String>,
    /// The row holds a refresh token this sidecar cannot open (sealed with a
    /// key it lacks): `refresh_token` is `None`, but not because there is none.
    pub refresh_token_unreadable: bool,
    pub backoff: Option<Backoff>,
    /// Start of the last refresh attempt (success or failure), for the minimum
    /// interval between refreshes.
    pub last_attempt_at: Option<SystemTime>,
    /// A holder presented `refresh_token` to the upstream and has not stored
    /// the result yet ([`Store::mark_spending`]).
    pub spend: Option<Spend>,
    /// The lease holder that committed `token`: the one that makes its soft
    /// refresh while it lives (the others stand by).
    pub refreshed_by: Option<String>,
}

/// An unresolved presentation of a rotating refresh token: who presented it,
/// from which database session, and when. While that holder may be alive with
/// the rotated token, nobody else may present the spent one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spend {
    pub holder: String,
    /// The spender's session name, for [`Store::spender_alive`].
    pub session: String,
    pub at: SystemTime,
}

/// The right to call the upstream for one collection until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub collection: String,
    pub holder: String,
    /// Increases with every grant; writes carry it so a stale holder is refused.
    pub fence: u64,
    pub until: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The lease is ours; `row` is the row as of the grant.
    Granted { lease: Lease, row: Row },
    /// Someone else holds it until `until`; `row` is the row as it is.
    Held { until: SystemTime, row: Row },
}

/// A freshly fetched token, before the store assigns its version.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub value: Secret,
    pub fetched_at: SystemTime,
    pub expires_at: SystemTime,
    pub refresh_at: SystemTime,
    /// A rotated refresh token to store in the same write; `None` keeps the
    /// stored one.
    pub refresh_token: Option<Secret>,
    /// Fingerprint of the seed that refresh token descends from (written with it).
    pub refresh_seed: Option<String>,
    pub parent_version: Option<u64>,
    /// The lowest version this token may take (0: no constraint): the version
    /// under which this very token was already published locally, or one more
    /// than the committing sidecar's L1 version (so nothing it ever served is
    /// relabelled, even when the row went back in time).
    pub min_version: u64,
}

impl NewToken {
    /// The version this token takes over a row at `row_version` whose value
    /// is `row_value` (`None`: no value, or one this sidecar cannot read), and
    /// whether that is a rotation: the same value keeps its version (a
    /// refetch) unless `min_version` is above it; anything else takes
    /// `max(row_version + 1, min_version, 1)`. An unreadable value is never
    /// "the same", and its version still counts, so no commit reuses a version
    /// that carried another value. Every store and the broker's local path use
    /// this one rule.
    pub fn version_over(&self, row_version: u64, row_value: Option<&Secret>) -> (u64, bool) {
        match row_value {
            Some(value)
                if row_version > 0 && *value == self.value && row_version >= self.min_version =>
            {
                (row_version, false)
            }
            _ => (
                row_version.saturating_add(1).max(self.min_version).max(1),
                true,
            ),
        }
    }

    /// The token as committed under `version`.
    pub fn into_token(self, version: u64) -> Token {
        Token {
            value: self.value,
            version,
            fetched_at: self.fetched_at,
            expires_at: self.expires_at,
            refresh_at: self.refresh_at,
            parent_version: self.parent_version,
        }
    }
}

/// News about rows written by other processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// `collection` rotated to `version`; `committed_at` is the database's
    /// clock just before the commit, when the notification carried it;
    /// `arrived` is when the notice reached this sidecar (after the commit: a
    /// `NOTIFY` is delivered only once its transaction has committed).
    Rotated {
        collection: String,
        version: u64,
        committed_at: Option<SystemTime>,
        arrived: tokio::time::Instant,
    },
    /// A peer took the refresh lease of `collection` until `until` (its
    /// database clock), or gave it back (`until: None`) without committing a
    /// token. No acquire can succeed before `until`, so a sidecar told of it
    /// does not try: a rotation costs one lease attempt, not one per sidecar.
    /// Only a hint: the lease row stays the authority.
    Lease {
        collection: String,
        holder: String,
        until: Option<SystemTime>,
    },
    /// News may have been lost (the listener reconnected, or a periodic poll):
    /// re-read every row.
    Resync,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub token: Token,
    /// True when the value changed and the version went up.
    pub rotated: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("lease on collection {0} was lost before the write")]
    LeaseLost(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// L2 storage shared by every sidecar of a deployment.
pub trait Store: Send + Sync + 'static {
    /// Reads a collection's row (an empty row if there is none).
    fn load(&self, collection: &str) -> BoxFuture<'_, Result<Row, StoreError>>;

    /// Takes the lease if it is free or expired at `now`, or already held by
    /// `holder` (a grant whose answer was lost; the fence moves on, so that
    /// earlier grant can no longer write), recording `now` as the start of an
    /// attempt.
    fn acquire(
        &self,
        collection: &str,
        holder: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Acquired, StoreError>>;

    /// Writes a fetched token (and its refresh token, if any) under the lease
    /// (fenced), clears the backoff and releases the lease.
    fn commit_token(
        &self,
        lease: Lease,
        token: NewToken,
    ) -> BoxFuture<'_, Result<Committed, StoreError>>;

    /// Extends a held lease to `ttl` from now (the database's clock where the
    /// store has one, else `now`), fenced; the holder calls it while its fetch
    /// runs. `LeaseLost` when a peer took over.
    fn renew(
        &self,
        lease: &Lease,
        ttl: Duration,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// After a commit was refused (`LeaseLost`): stores `new`, a refresh token
    /// the upstream already rotated to, if and only if the row still holds
    /// `replaced` (the one spent to get it), so that the grant is not lost
    /// while no newer one was committed. True when it was stored.
    /// Also resolves `holder`'s spend, stored or not.
    fn save_refresh_token(
        &self,
        collection: &str,
        holder: &str,
        replaced: Option<Secret>,
        new: Secret,
        seed: Option<String>,
    ) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Records, under the lease (fenced), that its holder is about to present
    /// the row's refresh token to the upstream ([`Row::spend`]). The spend is
    /// resolved by a commit that stores a refresh token or is the spender's,
    /// by the spender's recorded failure, and by
    /// [`save_refresh_token`](Store::save_refresh_token).
    fn mark_spending(&self, lease: &Lease) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Whether the session that recorded `spend` (or the same process,
    /// reconnected) is still connected to the store: a holder cut off from
    /// the store after presenting a refresh token still holds its session
    /// there until the partition ends. A store without sessions says `false`.
    fn spender_alive(&self, spend: &Spend) -> BoxFuture<'_, Result<bool, StoreError>> {
        let _ = spend;
        Box::pin(async { Ok(false) })
    }

    /// How long the store has answered without interruption (since start-up
    /// or since the end of the last outage). A store that cannot be away says
    /// `Duration::MAX`.
    fn up_for(&self) -> Duration {
        Duration::MAX
    }

    /// Records a failed attempt under the lease (fenced) and releases it
    /// (resolving the holder's own spend).
    fn commit_failure(
        &self,
        lease: Lease,
        backoff: Backoff,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Gives the lease back without writing (a peer already did the work).
    fn release(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>>;

    /// News about rows changed by other processes. A lagging receiver must
    /// treat the lag as [`StoreEvent::Resync`].
    fn events(&self) -> tokio::sync::broadcast::Receiver<StoreEvent>;

    /// Waits for the store's own background work to end, once the shutdown
    /// token it was started with is cancelled (Postgres: the listener task).
    /// The store still answers operations afterwards. The in-memory store
    /// has nothing to wait for.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// True while the store is unreachable (reads are served from memory,
    /// refreshes happen locally). The in-memory store never is.
    fn degraded(&self) -> bool {
        false
    }

    /// The offset (microseconds) from this host's clock to the store's clock,
    /// kept up to date by the store, for a clock that
    /// [follows](crate::clock::Clock::following) it. `None`: the store has no
    /// clock of its own (the in-memory store).
    fn clock_offset(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicI64>> {
        None
    }
}
