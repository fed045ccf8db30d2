//! Schema migrations, embedded in the binary and applied in order.
//!
//! Contract: [`migrate`] applies every migration not yet recorded in
//! `token_broker_migrations`, all in one transaction that first takes a
//! transaction-scoped advisory lock, so sidecars starting at once apply each
//! migration exactly once (the others wait, then find nothing to do) and a
//! failed migration leaves no trace. A schema found current by a plain read
//! takes no lock at all: a fleet starting at once on a migrated database is
//! not serialized behind one lock. [`current`] reads, without writing, the
//! schema version recorded (the store compares it with [`latest`] when
//! `migrate = false`).

use sqlx::{PgPool, Row as _};

/// `(version, description, sql)`, in ascending version order.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "tokens table",
        include_str!("../../migrations/0001_tokens.sql"),
    ),
    (
        2,
        "lease fence sequence",
        include_str!("../../migrations/0002_lease_fence_sequence.sql"),
    ),
    (
        3,
        "version high-water mark",
        include_str!("../../migrations/0003_version_high_water_mark.sql"),
    ),
    (
        4,
        "refresh token spend",
        include_str!("../../migrations/0004_refresh_token_spend.sql"),
    ),
];

/// Arbitrary, fixed: "tokenbro" in ASCII.
const LOCK_KEY: i64 = 0x746f_6b65_6e62_726f;

/// The newest schema version this binary knows.
pub fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Applies pending migrations; returns the versions applied by this call.
pub async fn migrate(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    if current(pool).await? >= latest() {
        return Ok(Vec::new());
    }
    let mut tx = pool.begin().await?;
    // `CREATE ... IF NOT EXISTS` would otherwise log a notice on every start.
    sqlx::query("SET LOCAL client_min_messages = warning")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS token_broker_migrations (
            version     bigint PRIMARY KEY,
            description text        NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )",
    )
    .execute(&mut *tx)
    .await?;
    let current: i64 =
        sqlx::query("SELECT coalesce(max(version), 0) AS v FROM token_broker_migrations")
            .fetch_one(&mut *tx)
            .await?
            .try_get("v")?;
    let mut applied = Vec::new();
    for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        sqlx::raw_sql(*sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO token_broker_migrations (version, description) VALUES ($1, $2)")
            .bind(version)
            .bind(description)
            .execute(&mut *tx)
            .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

/// The schema version recorded in the database (0: none).
pub async fn current(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let exists: bool =
        sqlx::query("SELECT to_regclass('token_broker_migrations') IS NOT NULL AS e")
            .fetch_one(pool)
            .await?
            .try_get("e")?;
    if !exists {
        return Ok(0);
    }
    sqlx::query("SELECT coalesce(max(version), 0) AS v FROM token_broker_migrations")
        .fetch_one(pool)
        .await?
        .try_get("v")
}
