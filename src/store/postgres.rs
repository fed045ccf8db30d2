//! The Postgres store: one row per collection in `token_broker_tokens`, shared
//! by every sidecar of a deployment, plus one `LISTEN` connection per sidecar
//! that turns other sidecars' commits into [`StoreEvent`]s.
//!
//! Contract:
//! - Connection budget: at most `pool_size` pooled connections for row reads
//!   and writes, plus exactly one listener connection (to `listener_url` when
//!   set, so the pool can go through a transaction-mode PgBouncer while
//!   `LISTEN` goes straight to Postgres). Nothing else connects. The pool
//!   keeps no session state: every statement is self-contained or inside
//!   one transaction (the migration lock is transaction-scoped).
//! - Start-up: a database that refuses or closes connections, or takes none
//!   within `connect_timeout`, is down (the sidecar starts degraded); one that
//!   takes connections but answers slowly is waited for up to
//!   `startup_timeout`, on a one-connection start-up pool closed before the
//!   store serves (see `prepare_at_start`).
//! - Every operation is bounded by `query_timeout`; a failure is
//!   `StoreError::Unavailable` (the broker then serves from memory).
//! - Leases are timed by the database's clock (`clock_timestamp()`), so clock
//!   skew between pods cannot make two holders. Writes are fenced by
//!   `lease_fence`, which increases with every grant. A holder asking again is
//!   granted again (its earlier grant's answer was lost), so a lease is never
//!   stranded by its own holder.
//! - After an operation finds the database unreachable, operations fail at
//!   once for a second, and until the listener reconnects: an outage costs
//!   one `query_timeout`, not one per operation.
//! - A new value's version is also above `token_broker_versions.max_version`,
//!   the highest version ever committed for the collection, which commits
//!   only raise: a row put back to an older state cannot make a commit reuse
//!   a version that named another value.
//! - A rotation commits the sealed value, its version, its refresh token and
//!   `NOTIFY token_broker, '<collection>:<version>'` in one transaction; the
//!   payload never carries a token. A refetch of the same value notifies no one.
//! - A lease grant is announced on its own channel,
//!   `NOTIFY token_broker_lease, '<collection>:<until micros>:<holder>'`, and
//!   so is a give-back (release or failure commit, until `0`), so that peers
//!   need not try a lease that is held. A hint only: the statement after the
//!   grant may fail (it is logged at debug and ignored), and any session may
//!   forge one, so the broker bounds what it takes from it
//!   (`broker::collection::PeerLease`). Older releases listen on
//!   `token_broker` alone and never see these payloads.
//! - Token timestamps are truncated to microseconds before they are written, and
//!   the committed token is built from what the database returned, so every
//!   sidecar holds identical instants (L1 expiry derives from the row).
//! - The listener sends `Resync` after every (re)connection, once `LISTEN` is in
//!   place, and on every poll tick; any error, a lost connection or a heartbeat
//!   that fails within `query_timeout` drops the connection and reconnects.
//!   Poll ticks and heartbeats are spread per process (a random phase, 80-100%
//!   of the heartbeat interval), so a fleet started at once does not read
//!   every row in one instant.
//! - Token values and refresh tokens are sealed with the [`Keyring`]; errors
//!   and logs carry neither.
//! - A spend of a rotating refresh token ([`Row::spend`]) names the spender's
//!   listener session (`application_name` `token-broker listener <random>`,
//!   one per store): [`Store::spender_alive`] looks for it in
//!   `pg_stat_activity`, which shows the sessions of the same role (every
//!   sidecar of a deployment normally uses one).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row as _, Transaction};
use time::OffsetDateTime;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::crypto::{Keyring, Sealed};
use super::{
    Acquired, Backoff, Committed, Lease, NewToken, Row, Spend, Store, StoreError, StoreEvent,
    migrate,
};
use crate::source::{BoxFuture, FailureClass};
use crate::token::{Secret, Token};

/// A timestamp column read as microseconds since the Unix epoch, or -1 when
/// it lies outside 1970..=9999 (`'infinity'`, a restore's or a hand edit's
/// garbage): decoding such a value into a date type would overflow, so it
/// is turned into a number the row check refuses.
macro_rules! us {
    ($c:literal) => {
        concat!(
            "CASE WHEN ", $c, " IS NULL THEN NULL WHEN ", $c,
            " BETWEEN '1970-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00' THEN (extract(epoch FROM ",
            $c, ") * 1000000)::bigint ELSE -1 END AS ", $c
        )
    };
}

/// The columns every row read decodes.
macro_rules! cols {
    () => {
        concat!(
            "version, value, value_key, ",
            us!("fetched_at"),
            ", ",
            us!("expires_at"),
            ", ",
            us!("refresh_at"),
            ", parent_version, refresh_token, refresh_token_key, refresh_seed, lease_holder, ",
            us!("lease_until"),
            ", lease_fence, ",
            us!("last_attempt_at"),
            ", ",
            us!("next_attempt_at"),
            ", failures, failure_class, failure_detail, refreshed_by, spend_holder, spend_session, ",
            us!("spend_at")
        )
    };
}

/// The longest `spend_holder` / `spend_session` a row may hold: a holder id
/// is at most 64 characters of host name, a pid and 8 hex digits.
const MAX_SPEND_FIELD: usize = 512;

/// The `NOTIFY` channel of commits: `COLLECTION:VERSION:MICROS`.
pub const CHANNEL: &str = "token_broker";

/// The `NOTIFY` channel of lease grants and give-backs:
/// `COLLECTION:UNTIL_MICROS:HOLDER` (`0`: given back). A channel of its own,
/// so a sidecar of an older release, which listens on [`CHANNEL`] only,
/// never sees a payload it cannot read.
pub const LEASE_CHANNEL: &str = "token_broker_lease";

/// The `application_name` of the listener connection, followed by a space
/// and eight random hex digits, one per store (the pool's is `token-broker`).
pub const LISTENER_APP_NAME: &str = "token-broker listener";

/// Validated `[store]` settings for Postgres.
#[derive(Debug, Clone)]
pub struct PgSettings {
    pub url: Secret,
    /// Where the one `LISTEN` connection goes (default: `url`): straight to
    /// Postgres when the pool goes through a transaction-mode PgBouncer.
    pub listener_url: Option<Secret>,
    /// Pooled connections for reads and writes (the listener is one more).
    pub pool_size: u32,
    /// Apply pending migrations at start-up.
    pub migrate: bool,
    pub keyring: Keyring,
    pub connect_timeout: Duration,
    /// How long a start-up waits for a database that takes connections but
    /// answers slowly before serving without it.
    pub startup_timeout: Duration,
    pub query_timeout: Duration,
    /// The listener checks its connection after this long without news.
    pub heartbeat_interval: Duration,
    /// Every this long, every row is re-read (the backstop for lost news).
    pub poll_interval: Duration,
}

impl Default for PgSettings {
    fn default() -> Self {
        Self {
            url: Secret::new(""),
            listener_url: None,
            pool_size: 2,
            migrate: true,
            keyring: Keyring::plaintext(),
            connect_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(20),
            query_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(5),
            poll_interval: Duration::from_secs(30),
        }
    }
}

/// Parses a `postgres://` URL; the error never repeats the URL (it may hold a
/// password).
pub fn connect_options(url: &Secret) -> Result<PgConnectOptions, String> {
    let url = url.expose();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be a postgres:// or postgresql:// URL".into());
    }
    url.parse::<PgConnectOptions>()
        .map(|o| o.application_name("token-broker"))
        .map_err(|_| {
            "not a valid postgres:// URL (e.g. postgres://user:password@host:5432/db)".to_owned()
        })
}

pub struct PgStore {
    pool: PgPool,
    keyring: Keyring,
    query_timeout: Duration,
    events: broadcast::Sender<StoreEvent>,
    /// Set while the database does not answer (logged on each change).
    degraded: AtomicBool,
    /// Set while the listener holds a live `LISTEN` connection.
    listening: AtomicBool,
    /// When an operation last found the database unreachable.
    last_failure: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// The database's clock minus this host's (microseconds), measured at
    /// start-up and on every heartbeat: the broker's clock follows it.
    clock_offset: Arc<AtomicI64>,
    /// The supervised listener task: awaited by [`Store::close`], aborted if
    /// the store is dropped first.
    listener: std::sync::Mutex<Option<crate::supervise::Supervised>>,
    /// The listener's `application_name`, unique to this store: a spend
    /// names it, and peers look for it to tell whether the spender lives.
    session: String,
    /// When the database last came back (or the store started).
    up_since: std::sync::Mutex<tokio::time::Instant>,
    /// Stops the listener; once cancelled, the listener is no longer the
    /// probe that ends an outage (operations try for themselves).
    shutdown: CancellationToken,
}

/// After an operation found no answer within `query_timeout`, further
/// operations fail at once for this long (and for as long as the listener
/// cannot reconnect), so that a black-holed database costs one
/// `query_timeout`, not one per operation, and due refreshes go local
/// without waiting.
const FAIL_FAST: Duration = Duration::from_secs(1);

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("degraded", &self.degraded.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Prepares the store and starts its listener task (stopped by
    /// `shutdown`). Migrates (or checks the schema) first: a database that
    /// answers but refuses (authentication, permissions, a missing schema with
    /// `migrate = false`) is an error; one that does not answer is logged and
    /// the sidecar starts degraded, serving from memory until it does.
    pub async fn start(
        settings: PgSettings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let options = connect_options(&settings.url)
            .map_err(|e| anyhow::anyhow!("store.database_url: {e}"))?;
        let listener_options = match &settings.listener_url {
            Some(url) => {
                connect_options(url).map_err(|e| anyhow::anyhow!("store.listener_url: {e}"))?
            }
            None => options.clone(),
        };
        let pool = PgPoolOptions::new()
            .max_connections(settings.pool_size)
            .min_connections(0)
            .acquire_timeout(settings.connect_timeout)
            .idle_timeout(Duration::from_secs(300))
            // No ping before each use: it would add a round trip to every
            // read on the push path. A connection that died since its last
            // use fails one operation and is replaced; callers retry.
            .test_before_acquire(false)
            .connect_lazy_with(options.clone());
        if settings.keyring.current_id().is_none() {
            warn!(
                "store.encryption_key_env/_file is not set: tokens and refresh tokens are stored in Postgres as plaintext"
            );
        }
        let store = Arc::new(Self {
            pool,
            keyring: settings.keyring.clone(),
            query_timeout: settings.query_timeout,
            events: broadcast::channel(1024).0,
            degraded: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            last_failure: std::sync::Mutex::new(None),
            clock_offset: Arc::new(AtomicI64::new(0)),
            listener: std::sync::Mutex::new(None),
            session: format!("{LISTENER_APP_NAME} {:08x}", rand::random::<u32>()),
            up_since: std::sync::Mutex::new(tokio::time::Instant::now()),
            shutdown: shutdown.clone(),
        });
        let prepared = store.prepare_at_start(&settings, &options).await?;
        // The task holds only a weak reference: it ends with the store.
        let listener = {
            let (weak, shutdown) = (Arc::downgrade(&store), shutdown.clone());
            let prepared = Arc::new(AtomicBool::new(prepared));
            move || {
                let (weak, settings, options) =
                    (weak.clone(), settings.clone(), listener_options.clone());
                let (prepared, shutdown) = (prepared.clone(), shutdown.clone());
                async move {
                    if let Some(store) = weak.upgrade() {
                        listen(store, settings, options, prepared, shutdown).await;
                    }
                }
            }
        };
        let task = crate::supervise::spawn("listener", None, shutdown, listener);
        *store
            .listener
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task);
        Ok(store)
    }

    /// Connects once and applies pending migrations (`token-broker migrate`);
    /// returns the versions applied.
    pub async fn migrate(settings: &PgSettings) -> anyhow::Result<Vec<i64>> {
        let options = connect_options(&settings.url)
            .map_err(|e| anyhow::anyhow!("store.database_url: {e}"))?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.connect_timeout)
            .connect_lazy_with(options);
        let applied = migrate::migrate(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("store: {}", describe(&e)))?;
        pool.close().await;
        Ok(applied)
    }

    /// Measures the database's clock against this host's over `conn`. The
    /// database read its clock somewhere within the round trip; the offset
    /// is taken as if it did so when the query was sent, the largest it can
    /// be, so this host errs towards believing it is later than it is (a
    /// token is dropped a round trip early rather than served late).
    async fn measure_clock<'c, E>(&self, conn: E) -> Result<(), sqlx::Error>
    where
        E: sqlx::Executor<'c, Database = Postgres>,
    {
        let sent = SystemTime::now();
        let db_us: i64 =
            sqlx::query("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS us")
                .fetch_one(conn)
                .await?
                .try_get("us")?;
        if let Some(db) = from_us(db_us) {
            let offset = crate::clock::offset_us(sent, db);
            let old = self.clock_offset.swap(offset, Ordering::Relaxed);
            if (offset - old).abs() > 1_000_000 {
                info!(
                    offset_ms = offset / 1000,
                    "this host's clock differs from the database's; following the database's"
                );
            }
        }
        Ok(())
    }

    /// The start-up [`prepare`](Self::prepare): true once done, false when
    /// the database is down (the sidecar then starts degraded), an error when
    /// it answers but refuses. A database that is slow is not down: when the
    /// first try gets no answer within `connect_timeout` but its address
    /// still takes connections ([`answers`]), one more try on a one-connection
    /// start-up pool (closed before the store serves) may take until
    /// `startup_timeout` from the start. A fleet started at once makes
    /// Postgres fork hundreds of backends, which takes seconds; a sidecar that
    /// went local then would fetch its own token and serve it beside its
    /// peers'.
    async fn prepare_at_start(
        &self,
        settings: &PgSettings,
        options: &PgConnectOptions,
    ) -> anyhow::Result<bool> {
        let started = tokio::time::Instant::now();
        let first =
            tokio::time::timeout(settings.connect_timeout, self.prepare(settings, &self.pool));
        let why = match first.await {
            Ok(Ok(())) => return Ok(true),
            Ok(Err(e)) if !unreachable(&e) => {
                return Err(anyhow::anyhow!("store: {}", describe(&e)));
            }
            Ok(Err(e)) if !matches!(e, sqlx::Error::PoolTimedOut) => {
                self.mark_down(&describe(&e), false);
                return Ok(false);
            }
            Ok(Err(_)) | Err(_) => "no answer within store.connect_timeout",
        };
        let remaining = settings.startup_timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() || !answers(options, settings.connect_timeout).await {
            self.mark_down(why, false);
            return Ok(false);
        }
        info!(
            startup_timeout = %humantime::format_duration(settings.startup_timeout),
            "the database takes connections but has not answered within store.connect_timeout; waiting for it up to store.startup_timeout"
        );
        let remaining = settings.startup_timeout.saturating_sub(started.elapsed());
        let boot = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(remaining)
            .connect_lazy_with(options.clone());
        let outcome = tokio::time::timeout(remaining, self.prepare(settings, &boot)).await;
        boot.close().await;
        match outcome {
            Ok(Ok(())) => Ok(true),
            Ok(Err(e)) if !unreachable(&e) => Err(anyhow::anyhow!("store: {}", describe(&e))),
            Ok(Err(e)) => {
                self.mark_down(&describe(&e), false);
                Ok(false)
            }
            Err(_) => {
                self.mark_down("no answer within store.startup_timeout", false);
                Ok(false)
            }
        }
    }

    /// Migrates, or checks that the schema is present, over `pool`.
    async fn prepare(&self, settings: &PgSettings, pool: &PgPool) -> Result<(), sqlx::Error> {
        // Connected first: a slow connect must not count as clock offset.
        self.measure_clock(&mut *pool.acquire().await?).await?;
        if settings.migrate {
            let applied = migrate::migrate(pool).await?;
            if !applied.is_empty() {
                info!(?applied, "applied database migrations");
            }
            return Ok(());
        }
        let current = migrate::current(pool).await?;
        if current < migrate::latest() {
            return Err(sqlx::Error::Configuration(format!(
                "the database schema is at version {current}, this binary needs {}; run `token-broker migrate` or set store.migrate = true",
                migrate::latest()
            ).into()));
        }
        Ok(())
    }

    /// Records an outage; `fail_fast` (after a timeout: the database may be
    /// black-holed) makes the next operations fail at once for `FAIL_FAST`.
    fn mark_down(&self, why: &str, fail_fast: bool) {
        if fail_fast {
            *self
                .last_failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(tokio::time::Instant::now());
        }
        if !self.degraded.swap(true, Ordering::Relaxed) {
            warn!(error = %why, "database unreachable: serving tokens from memory; due refreshes happen locally until it answers");
        }
    }

    fn mark_up(&self) {
        if self.degraded.swap(false, Ordering::Relaxed) {
            *self
                .up_since
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = tokio::time::Instant::now();
            info!("database reachable again");
        }
    }

    /// True while operations should not even try: the database was found
    /// unreachable, and either that was under `FAIL_FAST` ago or the listener
    /// has not reconnected since (it is the probe that ends an outage).
    fn failing_fast(&self) -> bool {
        if !self.degraded.load(Ordering::Relaxed) {
            return false;
        }
        let recent = self
            .last_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < FAIL_FAST);
        // While stopping, the listener is gone for good: waiting for it would
        // fail every last commit (an unshared token's flush).
        recent || (!self.listening.load(Ordering::Relaxed) && !self.shutdown.is_cancelled())
    }

    /// Runs `op` under the query timeout, recording reachability. An error
    /// that means "connection lost" (not a timeout) is retried once at once:
    /// a pooled connection that died since its last use (the database
    /// restarted, a proxy dropped it) fails one try, and the retry gets a new
    /// one. Every operation here is safe to repeat (acquire re-grants to its
    /// holder, commits are fenced and compare values).
    async fn timed<T, F>(&self, op: impl Fn() -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, sqlx::Error>>,
    {
        if self.failing_fast() {
            return Err(StoreError::Unavailable(
                "database unreachable (not retried until it answers again)".into(),
            ));
        }
        let mut retried = false;
        loop {
            match tokio::time::timeout(self.query_timeout, op()).await {
                Ok(Ok(v)) => {
                    self.mark_up();
                    return Ok(v);
                }
                Ok(Err(e)) if unreachable(&e) && !retried => {
                    debug!(error = %describe(&e), "database connection lost; retrying once");
                    retried = true;
                }
                Ok(Err(e)) => {
                    let why = describe(&e);
                    if unreachable(&e) {
                        self.mark_down(&why, false);
                    }
                    return Err(StoreError::Unavailable(why));
                }
                Err(_) => {
                    let why = format!(
                        "no answer within {}",
                        humantime::format_duration(self.query_timeout)
                    );
                    self.mark_down(&why, true);
                    return Err(StoreError::Unavailable(why));
                }
            }
        }
    }

    fn decode(&self, collection: &str, r: &PgRow) -> Result<(Row, LeaseCols), sqlx::Error> {
        let version = u64::try_from(r.try_get::<i64, _>("version")?).unwrap_or(0);
        let open = |field: &str, bytes: Option<Vec<u8>>, key: Option<String>| {
            bytes.and_then(|bytes| {
                let sealed = Sealed { bytes, key_id: key };
                self.keyring
                    .open(collection, field, &sealed)
                    .map_err(|e| {
                        warn!(collection, field, error = %e, "cannot read a stored secret; treating it as absent");
                    })
                    .ok()
            })
        };
        let value = open("value", r.try_get("value")?, r.try_get("value_key")?);
        // A timestamp outside 1970..=9999 makes the row hostile: its token
        // and backoff are ignored (logged), the rest of the row still counts.
        let hostile = std::cell::Cell::new(None);
        let time = |col: &'static str| -> Result<Option<SystemTime>, sqlx::Error> {
            Ok(r.try_get::<Option<i64>, _>(col)?.and_then(|us| {
                let t = from_us(us);
                if t.is_none() {
                    hostile.set(Some(col));
                }
                t
            }))
        };
        let stamps = (
            time("fetched_at")?,
            time("expires_at")?,
            time("refresh_at")?,
        );
        if let Some(col) = hostile.get() {
            warn!(
                collection,
                column = col,
                "row holds a timestamp out of range; ignoring its token"
            );
        }
        let token = match (value, stamps.0, stamps.1, stamps.2) {
            (Some(value), Some(fetched_at), Some(expires_at), Some(refresh_at)) if version > 0 => {
                Some(Token {
                    value,
                    version,
                    fetched_at,
                    expires_at,
                    refresh_at,
                    parent_version: r
                        .try_get::<Option<i64>, _>("parent_version")?
                        .and_then(|v| u64::try_from(v).ok()),
                })
            }
            _ => None,
        };
        let sealed_refresh: Option<Vec<u8>> = r.try_get("refresh_token")?;
        let refresh_present = sealed_refresh.is_some();
        let refresh_token = open(
            "refresh_token",
            sealed_refresh,
            r.try_get("refresh_token_key")?,
        );
        let refresh_token_unreadable = refresh_present && refresh_token.is_none();
        let failures = u32::try_from(r.try_get::<i32, _>("failures")?).unwrap_or(0);
        let backoff = match (
            time("next_attempt_at")?,
            r.try_get::<Option<String>, _>("failure_class")?,
        ) {
            (Some(next_attempt_at), Some(class)) if failures > 0 => Some(Backoff {
                failures,
                next_attempt_at,
                class: FailureClass::parse(&class).unwrap_or(FailureClass::Internal),
                detail: r
                    .try_get::<Option<String>, _>("failure_detail")?
                    .unwrap_or_default(),
            }),
            _ => None,
        };
        let token = token.filter(|_| hostile.get().is_none());
        let spend = match (
            r.try_get::<Option<String>, _>("spend_holder")?,
            r.try_get::<Option<String>, _>("spend_session")?,
            time("spend_at")?,
        ) {
            // Holder ids and session names are short; anything longer was not
            // written by a sidecar (and is not logged).
            (Some(holder), Some(session), Some(at))
                if holder.len() <= MAX_SPEND_FIELD && session.len() <= MAX_SPEND_FIELD =>
            {
                Some(Spend {
                    holder,
                    session,
                    at,
                })
            }
            _ => None,
        };
        let row = Row {
            token,
            refresh_token,
            refresh_seed: r.try_get("refresh_seed")?,
            backoff,
            last_attempt_at: time("last_attempt_at")?,
            spend,
            refreshed_by: r.try_get("refreshed_by")?,
            refresh_token_unreadable,
        };
        let lease = LeaseCols {
            holder: r.try_get("lease_holder")?,
            until: time("lease_until")?,
            fence: u64::try_from(r.try_get::<i64, _>("lease_fence")?).unwrap_or(0),
        };
        Ok((row, lease))
    }

    /// One row with every decoded column, if it exists.
    async fn select(&self, collection: &str) -> Result<Option<(Row, LeaseCols)>, sqlx::Error> {
        let row = sqlx::query(concat!(
            "SELECT ",
            cols!(),
            " FROM token_broker_tokens WHERE collection = $1"
        ))
        .bind(collection)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| self.decode(collection, &r)).transpose()
    }

    async fn load_row(&self, collection: &str) -> Result<Row, sqlx::Error> {
        Ok(self
            .select(collection)
            .await?
            .map(|(row, _)| row)
            .unwrap_or_default())
    }

    async fn try_acquire(
        &self,
        collection: &str,
        holder: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Acquired, sqlx::Error> {
        // A released lease can come free between the two statements; then try again.
        for _ in 0..3 {
            let granted = sqlx::query(concat!(
                "INSERT INTO token_broker_tokens AS t
                    (collection, lease_holder, lease_until, lease_fence, last_attempt_at)
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3),
                         nextval('token_broker_lease_fence'), $4)
                 ON CONFLICT (collection) DO UPDATE
                    SET lease_holder = EXCLUDED.lease_holder,
                        lease_until = EXCLUDED.lease_until,
                        lease_fence = greatest(nextval('token_broker_lease_fence'), t.lease_fence + 1),
                        last_attempt_at = EXCLUDED.last_attempt_at,
                        updated_at = now()
                  WHERE t.lease_until IS NULL OR t.lease_until <= clock_timestamp()
                     OR t.lease_holder = EXCLUDED.lease_holder
                 RETURNING ",
                cols!()
            ))
            .bind(collection)
            .bind(holder)
            .bind(ttl.as_secs_f64())
            .bind(to_db(now))
            .fetch_optional(&self.pool)
            .await?;
            if let Some(r) = granted {
                let (row, lease) = self.decode(collection, &r)?;
                return Ok(Acquired::Granted {
                    lease: Lease {
                        collection: collection.to_owned(),
                        holder: holder.to_owned(),
                        fence: lease.fence,
                        until: lease.until.unwrap_or(now + ttl),
                    },
                    row,
                });
            }
            if let Some((row, lease)) = self.select(collection).await?
                && let (Some(until), Some(_)) = (lease.until, lease.holder)
            {
                return Ok(Acquired::Held { until, row });
            }
        }
        Err(sqlx::Error::Protocol(
            "the refresh lease changed hands three times during one acquire".into(),
        ))
    }

    async fn try_commit_token(
        &self,
        lease: &Lease,
        new: NewToken,
    ) -> Result<Result<Committed, StoreError>, sqlx::Error> {
        let c = lease.collection.as_str();
        let mut tx: Transaction<'_, Postgres> = self.pool.begin().await?;
        let current = sqlx::query(
            "SELECT version, value, value_key FROM token_broker_tokens
              WHERE collection = $1 AND lease_fence = $2 AND lease_holder = $3 FOR UPDATE",
        )
        .bind(c)
        .bind(fence_i64(lease.fence))
        .bind(&lease.holder)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(current) = current else {
            return Ok(Err(StoreError::LeaseLost(c.to_owned())));
        };
        let old_version = u64::try_from(current.try_get::<i64, _>("version")?).unwrap_or(0);
        let old_value = current
            .try_get::<Option<Vec<u8>>, _>("value")?
            .and_then(|bytes| {
                let sealed = Sealed {
                    bytes,
                    key_id: current.try_get("value_key").ok().flatten(),
                };
                self.keyring.open(c, "value", &sealed).ok()
            });
        // An unreadable value (a key this sidecar lacks) still holds its
        // version: the rule then moves past it.
        let (mut version, rotated) = new.version_over(old_version, old_value.as_ref());
        // A new value also goes above every version ever committed, which a
        // row put back to an older state no longer shows.
        let high: Option<i64> = sqlx::query_scalar(
            "SELECT max_version FROM token_broker_versions WHERE collection = $1 FOR UPDATE",
        )
        .bind(c)
        .fetch_optional(&mut *tx)
        .await?;
        let high = high.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
        if rotated && version <= high {
            version = high.saturating_add(1);
        }
        sqlx::query(
            "INSERT INTO token_broker_versions AS v (collection, max_version) VALUES ($1, $2)
             ON CONFLICT (collection) DO UPDATE
                SET max_version = greatest(v.max_version, EXCLUDED.max_version)",
        )
        .bind(c)
        .bind(fence_i64(version))
        .execute(&mut *tx)
        .await?;
        let value = self.keyring.seal(c, "value", &new.value);
        let refresh = new
            .refresh_token
            .as_ref()
            .map(|rt| self.keyring.seal(c, "refresh_token", rt));
        let written = sqlx::query(
            "UPDATE token_broker_tokens SET
                version = $2, value = $3, value_key = $4,
                fetched_at = $5, expires_at = $6, refresh_at = $7, parent_version = $8,
                refresh_token = CASE WHEN $9::bytea IS NULL THEN refresh_token ELSE $9 END,
                refresh_token_key = CASE WHEN $9::bytea IS NULL THEN refresh_token_key ELSE $10 END,
                refresh_seed = CASE WHEN $9::bytea IS NULL THEN refresh_seed ELSE $11 END,
                spend_holder = CASE WHEN $9::bytea IS NULL AND spend_holder <> lease_holder
                                    THEN spend_holder END,
                spend_session = CASE WHEN $9::bytea IS NULL AND spend_holder <> lease_holder
                                     THEN spend_session END,
                spend_at = CASE WHEN $9::bytea IS NULL AND spend_holder <> lease_holder
                                THEN spend_at END,
                refreshed_by = lease_holder, lease_holder = NULL, lease_until = NULL,
                next_attempt_at = NULL, failures = 0, failure_class = NULL, failure_detail = NULL,
                updated_at = now()
              WHERE collection = $1
              RETURNING (extract(epoch FROM fetched_at) * 1000000)::bigint AS fetched_at,
                        (extract(epoch FROM expires_at) * 1000000)::bigint AS expires_at,
                        (extract(epoch FROM refresh_at) * 1000000)::bigint AS refresh_at",
        )
        .bind(c)
        .bind(fence_i64(version))
        .bind(&value.bytes)
        .bind(&value.key_id)
        .bind(to_db(new.fetched_at))
        .bind(to_db(new.expires_at))
        .bind(to_db(new.refresh_at))
        .bind(new.parent_version.map(fence_i64))
        .bind(refresh.as_ref().map(|s| s.bytes.clone()))
        .bind(refresh.and_then(|s| s.key_id))
        .bind(&new.refresh_seed)
        .fetch_one(&mut *tx)
        .await?;
        if rotated {
            // The database's clock at commit rides along (microseconds since
            // the epoch), for the notification-lag metric.
            sqlx::query(
                "SELECT pg_notify($1, $2 || ':' || \
                 (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)",
            )
            .bind(CHANNEL)
            .bind(format!("{c}:{version}"))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let at = |col: &str| -> Result<SystemTime, sqlx::Error> {
            from_us(written.try_get::<i64, _>(col)?)
                .ok_or_else(|| sqlx::Error::Protocol(format!("{col} written out of range")))
        };
        // The instants as stored (microseconds), so every sidecar holds the same.
        let (fetched_at, expires_at, refresh_at) =
            (at("fetched_at")?, at("expires_at")?, at("refresh_at")?);
        Ok(Ok(Committed {
            token: Token {
                fetched_at,
                expires_at,
                refresh_at,
                ..new.into_token(version)
            },
            rotated,
        }))
    }

    async fn try_commit_failure(&self, lease: &Lease, b: &Backoff) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(
            "UPDATE token_broker_tokens SET
                next_attempt_at = $3, failures = $4, failure_class = $5, failure_detail = $6,
                spend_holder = CASE WHEN spend_holder <> $7 THEN spend_holder END,
                spend_session = CASE WHEN spend_holder <> $7 THEN spend_session END,
                spend_at = CASE WHEN spend_holder <> $7 THEN spend_at END,
                lease_holder = NULL, lease_until = NULL, updated_at = now()
              WHERE collection = $1 AND lease_fence = $2 AND lease_holder = $7",
        )
        .bind(&lease.collection)
        .bind(fence_i64(lease.fence))
        .bind(to_db(b.next_attempt_at))
        .bind(i32::try_from(b.failures).unwrap_or(i32::MAX))
        .bind(b.class.as_str())
        .bind(&b.detail)
        .bind(&lease.holder)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn try_release(&self, lease: &Lease) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(
            "UPDATE token_broker_tokens SET lease_holder = NULL, lease_until = NULL, updated_at = now()
              WHERE collection = $1 AND lease_fence = $2 AND lease_holder = $3",
        )
        .bind(&lease.collection)
        .bind(fence_i64(lease.fence))
        .bind(&lease.holder)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// After a statement meant to give `lease` back changed `rows` rows:
    /// `LeaseLost` when it no longer held it, else the give-back is announced.
    async fn gave_back(&self, lease: &Lease, rows: u64) -> Result<(), StoreError> {
        if rows == 0 {
            return Err(StoreError::LeaseLost(lease.collection.clone()));
        }
        self.notify_lease(&lease.collection, &lease.holder, None)
            .await;
        Ok(())
    }

    /// Tells the fleet that `holder` took the lease of `collection` until
    /// `until`, or gave it back (`None`), on [`LEASE_CHANNEL`], after the
    /// statement that did it: a statement of its own under its own
    /// `query_timeout`, so that it can neither fail nor time out the grant
    /// or give-back it reports. A hint only: when it fails, peers try the
    /// lease and find it held, as without it.
    async fn notify_lease(&self, collection: &str, holder: &str, until: Option<SystemTime>) {
        let micros = until.map_or(0, |u| {
            u.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        });
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(LEASE_CHANNEL)
            .bind(format!("{collection}:{micros}:{holder}"))
            .execute(&self.pool);
        match tokio::time::timeout(self.query_timeout, sent).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(collection, error = %describe(&e), "could not announce the refresh lease");
            }
            Err(_) => debug!(collection, "could not announce the refresh lease in time"),
        }
    }

    async fn try_mark_spending(&self, lease: &Lease) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(
            "UPDATE token_broker_tokens
                SET spend_holder = $3, spend_session = $4, spend_at = clock_timestamp()
              WHERE collection = $1 AND lease_fence = $2 AND lease_holder = $3",
        )
        .bind(&lease.collection)
        .bind(fence_i64(lease.fence))
        .bind(&lease.holder)
        .bind(&self.session)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn try_spender_alive(&self, session: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                             WHERE datname = current_database() AND application_name = $1)",
        )
        .bind(session)
        .fetch_one(&self.pool)
        .await
    }

    async fn try_renew(&self, lease: &Lease, ttl: Duration) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(
            "UPDATE token_broker_tokens
                SET lease_until = clock_timestamp() + make_interval(secs => $4)
              WHERE collection = $1 AND lease_fence = $2 AND lease_holder = $3",
        )
        .bind(&lease.collection)
        .bind(fence_i64(lease.fence))
        .bind(&lease.holder)
        .bind(ttl.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn try_save_refresh_token(
        &self,
        collection: &str,
        holder: &str,
        replaced: Option<&Secret>,
        new: &Secret,
        seed: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        let mut tx: Transaction<'_, Postgres> = self.pool.begin().await?;
        // The spender reports back: its spend is resolved, kept token or not.
        sqlx::query(
            "UPDATE token_broker_tokens
                SET spend_holder = NULL, spend_session = NULL, spend_at = NULL
              WHERE collection = $1 AND spend_holder = $2",
        )
        .bind(collection)
        .bind(holder)
        .execute(&mut *tx)
        .await?;
        let Some(current) = sqlx::query(
            "SELECT refresh_token, refresh_token_key FROM token_broker_tokens
              WHERE collection = $1 FOR UPDATE",
        )
        .bind(collection)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(false);
        };
        let stored = current
            .try_get::<Option<Vec<u8>>, _>("refresh_token")?
            .map(|bytes| {
                let sealed = Sealed {
                    bytes,
                    key_id: current.try_get("refresh_token_key").ok().flatten(),
                };
                self.keyring.open(collection, "refresh_token", &sealed).ok()
            });
        // Only over the very token that was spent: a newer one committed by a
        // peer must not be overwritten, and an unreadable one is left alone.
        let same = match (stored, replaced) {
            (None, None) => true,
            (Some(Some(s)), Some(r)) => s == *r,
            _ => false,
        };
        if !same {
            tx.commit().await?;
            return Ok(false);
        }
        let sealed = self.keyring.seal(collection, "refresh_token", new);
        sqlx::query(
            "UPDATE token_broker_tokens
                SET refresh_token = $2, refresh_token_key = $3, refresh_seed = $4, updated_at = now()
              WHERE collection = $1",
        )
        .bind(collection)
        .bind(&sealed.bytes)
        .bind(&sealed.key_id)
        .bind(seed)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}

struct LeaseCols {
    holder: Option<String>,
    until: Option<SystemTime>,
    fence: u64,
}

fn fence_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Postgres keeps microseconds: truncate first, so what is written is what
/// every reader gets back. Never panics: an instant past what the database
/// holds is written as the last second of 9999 (the broker never produces
/// one: lifetimes are capped).
fn to_db(t: SystemTime) -> OffsetDateTime {
    let nanos = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_micros()).unwrap_or(i128::MAX) * 1_000,
        Err(_) => 0,
    };
    OffsetDateTime::from_unix_timestamp_nanos(nanos.min(MAX_US as i128 * 1_000))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// 9999-12-31T23:59:59Z in microseconds since the Unix epoch: the latest
/// instant read from or written to a row.
const MAX_US: i64 = 253_402_300_799_000_000;

/// Microseconds since the Unix epoch as an instant, when within 1970..=9999.
fn from_us(us: i64) -> Option<SystemTime> {
    let us = u64::try_from(us).ok().filter(|us| *us <= MAX_US as u64)?;
    std::time::UNIX_EPOCH.checked_add(Duration::from_micros(us))
}

/// True for errors that mean "the database does not answer (properly)"
/// rather than "it answered no": a database error is a refusal unless it says
/// the server is shutting down or the connection failed; a configuration error
/// (including a missing schema) is a refusal; anything else (I/O, TLS,
/// protocol garbage from a half-open path, pool timeouts) is unreachability.
/// Whether the database's address takes connections: connects (TCP or Unix
/// socket) within `within`, then sends an `SSLRequest` and waits up to a
/// second for the reply.
/// An answer, or a connection held open without one (a server busy forking
/// backends, a proxy waiting for its server), is a database that is there
/// but slow; a refused, failed or closed connection is one that is not.
/// Nothing but the 8-byte `SSLRequest` is sent: no credentials.
async fn answers(options: &PgConnectOptions, within: Duration) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    async fn ask<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) -> bool {
        // Length 8, code 80877103: "may we talk TLS?"; the server says S or N.
        const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        if s.write_all(&SSL_REQUEST).await.is_err() {
            return false;
        }
        let mut reply = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut reply)).await {
            Ok(Ok(1)) => matches!(reply[0], b'S' | b'N'),
            Ok(_) => false,
            Err(_) => true,
        }
    }
    let socket = options.get_socket().cloned().or_else(|| {
        let host = options.get_host();
        host.starts_with('/').then(|| host.into())
    });
    match socket {
        #[cfg(unix)]
        Some(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", options.get_port()));
            match tokio::time::timeout(within, tokio::net::UnixStream::connect(path)).await {
                Ok(Ok(s)) => ask(s).await,
                _ => false,
            }
        }
        #[cfg(not(unix))]
        Some(_) => false,
        None => {
            let connect = tokio::net::TcpStream::connect((options.get_host(), options.get_port()));
            match tokio::time::timeout(within, connect).await {
                Ok(Ok(s)) => ask(s).await,
                _ => false,
            }
        }
    }
}

fn unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
        sqlx::Error::Configuration(_) => false,
        _ => true,
    }
}

/// A one-line description that carries no secret (no URL, no parameters).
fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => format!(
            "database error {}: {}",
            d.code().as_deref().unwrap_or("?"),
            d.message()
        ),
        sqlx::Error::Io(io) => format!("connection: {io}"),
        sqlx::Error::PoolTimedOut => "no database connection available in time".into(),
        other => other.to_string(),
    }
}

impl Store for PgStore {
    fn load(&self, collection: &str) -> BoxFuture<'_, Result<Row, StoreError>> {
        let collection = collection.to_owned();
        Box::pin(async move { self.timed(|| self.load_row(&collection)).await })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        let task = self
            .listener
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        Box::pin(async move {
            if let Some(task) = task {
                task.join().await;
            }
        })
    }

    fn acquire(
        &self,
        collection: &str,
        holder: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Acquired, StoreError>> {
        let (collection, holder) = (collection.to_owned(), holder.to_owned());
        Box::pin(async move {
            let acquired = self
                .timed(|| self.try_acquire(&collection, &holder, ttl, now))
                .await?;
            if let Acquired::Granted { lease, .. } = &acquired {
                self.notify_lease(&collection, &holder, Some(lease.until))
                    .await;
            }
            Ok(acquired)
        })
    }

    fn commit_token(
        &self,
        lease: Lease,
        token: NewToken,
    ) -> BoxFuture<'_, Result<Committed, StoreError>> {
        Box::pin(async move {
            self.timed(|| self.try_commit_token(&lease, token.clone()))
                .await?
        })
    }

    fn commit_failure(
        &self,
        lease: Lease,
        backoff: Backoff,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let rows = self
                .timed(|| self.try_commit_failure(&lease, &backoff))
                .await?;
            self.gave_back(&lease, rows).await
        })
    }

    fn renew(
        &self,
        lease: &Lease,
        ttl: Duration,
        _now: SystemTime,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let lease = lease.clone();
        Box::pin(async move {
            match self.timed(|| self.try_renew(&lease, ttl)).await? {
                0 => Err(StoreError::LeaseLost(lease.collection)),
                _ => Ok(()),
            }
        })
    }

    fn save_refresh_token(
        &self,
        collection: &str,
        holder: &str,
        replaced: Option<Secret>,
        new: Secret,
        seed: Option<String>,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        let (collection, holder) = (collection.to_owned(), holder.to_owned());
        Box::pin(async move {
            self.timed(|| {
                self.try_save_refresh_token(
                    &collection,
                    &holder,
                    replaced.as_ref(),
                    &new,
                    seed.as_deref(),
                )
            })
            .await
        })
    }

    fn mark_spending(&self, lease: &Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        let lease = lease.clone();
        Box::pin(async move {
            match self.timed(|| self.try_mark_spending(&lease)).await? {
                0 => Err(StoreError::LeaseLost(lease.collection)),
                _ => Ok(()),
            }
        })
    }

    fn spender_alive(&self, spend: &Spend) -> BoxFuture<'_, Result<bool, StoreError>> {
        let session = spend.session.clone();
        Box::pin(async move { self.timed(|| self.try_spender_alive(&session)).await })
    }

    fn up_for(&self) -> Duration {
        if self.degraded.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        self.up_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .elapsed()
    }

    fn clock_offset(&self) -> Option<Arc<AtomicI64>> {
        Some(self.clock_offset.clone())
    }

    fn release(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let rows = self.timed(|| self.try_release(&lease)).await?;
            self.gave_back(&lease, rows).await
        })
    }

    fn events(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }
}

/// The listener task: one `LISTEN` connection, rebuilt after any trouble.
async fn listen(
    store: Arc<PgStore>,
    settings: PgSettings,
    options: PgConnectOptions,
    prepared: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let started = tokio::time::Instant::now();
        let (outcome, connected) = tokio::select! {
            () = shutdown.cancelled() => return,
            outcome = listen_once(&store, &settings, &options, &prepared) => outcome,
        };
        if connected {
            warn!(error = %outcome, "lost the notification connection; reconnecting, then re-reading every row");
        } else {
            store.mark_down(&outcome, false);
            debug!(error = %outcome, "could not open the notification connection; retrying");
        }
        // Back off briefly while the database stays away (the listener is the
        // probe that ends an outage, so keep it short), but reconnect at once
        // after a connection that had been up for a while.
        if started.elapsed() > Duration::from_secs(10) {
            delay = Duration::from_millis(100);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Connects, listens and forwards news until something goes wrong; returns
/// why, and whether `LISTEN` had been established.
async fn listen_once(
    store: &PgStore,
    settings: &PgSettings,
    options: &PgConnectOptions,
    prepared: &AtomicBool,
) -> (String, bool) {
    // A pool of one for this connection only: dropping it closes the
    // connection, so a dead one is never reused.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(settings.connect_timeout)
        .idle_timeout(None)
        .max_lifetime(None)
        // Named apart from the pool's, so an operator (or a test) can tell
        // the listener in pg_stat_activity.
        .connect_lazy_with(options.clone().application_name(&store.session));
    let mut connected = false;
    let outcome = async {
        if !prepared.load(Ordering::Relaxed) {
            match tokio::time::timeout(
                settings.connect_timeout,
                store.prepare(settings, &store.pool),
            )
            .await
            {
                Ok(Ok(())) => prepared.store(true, Ordering::Relaxed),
                Ok(Err(e)) => return format!("start-up migration: {}", describe(&e)),
                Err(_) => return "start-up migration: no answer in time".to_owned(),
            }
        }
        let connect = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.eager_reconnect(false);
            l.listen_all([CHANNEL, LEASE_CHANNEL]).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = match tokio::time::timeout(settings.connect_timeout, connect).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return describe(&e),
            Err(_) => return "no answer within store.connect_timeout".to_owned(),
        };
        // From here every commit is delivered; re-read rows to cover the gap.
        connected = true;
        store.listening.store(true, Ordering::Relaxed);
        store.mark_up();
        let _ = store.events.send(StoreEvent::Resync);
        // Periodic work is spread per process: a fleet started at once must
        // not read every row, or ping, in the same instant. The first poll
        // comes half to one and a half periods after connecting (the resync
        // above covers the start); heartbeats after 80-100% of the interval.
        let phase = settings.poll_interval.mul_f64(rand::random_range(0.5..1.5));
        let mut poll =
            tokio::time::interval_at(tokio::time::Instant::now() + phase, settings.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let heartbeat = settings
                .heartbeat_interval
                .mul_f64(rand::random_range(0.8..=1.0));
            tokio::select! {
                _ = poll.tick() => {
                    let _ = store.events.send(StoreEvent::Resync);
                }
                next = tokio::time::timeout(heartbeat, listener.try_recv()) => match next {
                    Ok(Ok(Some(n))) => {
                        let arrived = tokio::time::Instant::now();
                        if let Some(event) = parse_notification(n.channel(), n.payload(), arrived) {
                            let _ = store.events.send(event);
                        }
                    }
                    Ok(Ok(None)) => return "the notification connection was closed".to_owned(),
                    Ok(Err(e)) => return describe(&e),
                    Err(_) => {
                        // The heartbeat also keeps the clock offset current.
                        let ping = store.measure_clock(&mut listener);
                        match tokio::time::timeout(settings.query_timeout, ping).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return format!("heartbeat: {}", describe(&e)),
                            Err(_) => return "heartbeat: no answer in time".to_owned(),
                        }
                    }
                }
            }
        }
    }
    .await;
    store.listening.store(false, Ordering::Relaxed);
    // Close in the background: a black-holed socket must not hold us up.
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), pool.close()).await;
    });
    (outcome, connected)
}

/// A notification: on [`CHANNEL`], `COLLECTION:VERSION`, and since 0.1
/// `:MICROS` (the commit's database clock); on [`LEASE_CHANNEL`],
/// `COLLECTION:UNTIL_MICROS:HOLDER`. Collection names never contain `:`.
fn parse_notification(
    channel: &str,
    payload: &str,
    arrived: tokio::time::Instant,
) -> Option<StoreEvent> {
    if channel == LEASE_CHANNEL {
        let mut parts = payload.splitn(3, ':');
        let collection = parts.next()?;
        let micros: u64 = parts.next()?.parse().ok()?;
        let holder = parts.next()?;
        // Past 9999 is read as 9999, as for rows; the broker caps it anyway.
        let micros = i64::try_from(micros).unwrap_or(MAX_US).min(MAX_US);
        return Some(StoreEvent::Lease {
            collection: collection.to_owned(),
            holder: holder.to_owned(),
            until: (micros > 0).then(|| from_us(micros)).flatten(),
        });
    }
    let mut parts = payload.split(':');
    let collection = parts.next()?;
    let version = parts.next()?.parse().ok()?;
    let committed_at = parts
        .next()
        .and_then(|m| m.parse::<u64>().ok())
        .map(|m| std::time::UNIX_EPOCH + Duration::from_micros(m));
    Some(StoreEvent::Rotated {
        collection: collection.to_owned(),
        version,
        committed_at,
        arrived,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_parse_with_and_without_the_commit_time() {
        let arrived = tokio::time::Instant::now();
        let parse_notification = |payload| parse_notification(CHANNEL, payload, arrived);
        assert_eq!(
            parse_notification("a.b-c:7:1700000000000001"),
            Some(StoreEvent::Rotated {
                collection: "a.b-c".into(),
                version: 7,
                committed_at: Some(
                    std::time::UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_001)
                ),
                arrived,
            })
        );
        assert_eq!(
            parse_notification("x:3"),
            Some(StoreEvent::Rotated {
                collection: "x".into(),
                version: 3,
                committed_at: None,
                arrived,
            })
        );
        assert_eq!(parse_notification("x"), None);
        assert_eq!(parse_notification("x:y"), None);
    }

    #[test]
    fn lease_notifications_parse_grants_and_give_backs() {
        let arrived = tokio::time::Instant::now();
        let parse = |payload| parse_notification(LEASE_CHANNEL, payload, arrived);
        assert_eq!(
            parse("cc:1700000000000001:host:with/colons/1/0a0b0c0d"),
            Some(StoreEvent::Lease {
                collection: "cc".into(),
                holder: "host:with/colons/1/0a0b0c0d".into(),
                until: Some(std::time::UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_001)),
            })
        );
        assert_eq!(
            parse("cc:0:h/1/2"),
            Some(StoreEvent::Lease {
                collection: "cc".into(),
                holder: "h/1/2".into(),
                until: None,
            })
        );
        // Garbage from any session that may NOTIFY is dropped, not guessed at.
        assert_eq!(parse("cc:soon:h"), None);
        assert_eq!(parse("cc:1"), None);
        assert_eq!(parse("cc:-5:h"), None);
        assert_eq!(
            parse(&format!("cc:{}:h", u64::MAX)).map(|e| matches!(e, StoreEvent::Lease { .. })),
            Some(true)
        );
    }
}
