//! Per-test Postgres databases on a real server.
//!
//! The server is the one at `admin_url()`: `TOKEN_BROKER_TEST_DATABASE_URL`
//! (set by `scripts/pg-env`, which `scripts/test` sources) or the local default.
//! `TestDb::create()` makes an empty database whose name is unique across
//! concurrent test processes, even on a server shared between machines
//! (`tb_test_<pid>_<n>_<random hex>`); dropping the `TestDb` drops the database,
//! ending any session still on it.
//!
//! Database administration runs on a thread of its own with its own runtime,
//! so it works from any runtime flavour and under a paused clock, and `Drop`
//! can wait for it (a few seconds at most, then it gives up with a warning).
//! Each database is commented with its creation time; the first `create()` in a
//! process drops `tb_test_` databases created more than an hour ago that nobody
//! is connected to: those of test processes killed before their `Drop` ran.
//!
//! PgBouncer: `pgbouncer_url()` is `TOKEN_BROKER_TEST_PGBOUNCER_URL` (set by
//! `scripts/pgbouncer-env`: a transaction-mode PgBouncer in front of the same
//! server that routes every database name to it); `TestDb::url_through_pgbouncer()`
//! reaches the test's database through it, and `pgbouncer_servers()` reads its
//! console's `SHOW SERVERS`. They panic, naming the script, when it is unset.

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgPool};
use url::{Host, Url};

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Bounds each administration job (connect and statements).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `Drop` waits for its `DROP DATABASE`.
const DROP_TIMEOUT: Duration = Duration::from_secs(5);
/// Older leftovers are dropped; no test runs this long.
const STALE_AFTER: Duration = Duration::from_secs(3600);
const CREATED_AT: &str = "token-broker test database, created at unix time ";

/// The admin URL: `TOKEN_BROKER_TEST_DATABASE_URL`, or
/// `postgres://postgres@127.0.0.1:5432/postgres`.
pub fn admin_url() -> String {
    std::env::var("TOKEN_BROKER_TEST_DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_owned())
}

/// A fresh, empty database, dropped with this value.
pub struct TestDb {
    /// Connects to this database as the admin URL's user.
    pub url: String,
    pub name: String,
}

impl TestDb {
    /// Creates a fresh, empty database with a unique name
    /// `tb_test_<pid>_<n>_<random hex>`; `url` points at it.
    pub async fn create() -> TestDb {
        let admin = admin_url();
        let name = unique_name();
        let url = with_path(&admin, &format!("/{name}"));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = {
            let (admin, name) = (admin.clone(), name.clone());
            move || async move { create_database(&admin, &name).await }
        };
        on_own_runtime(job, move |result| {
            let _ = tx.send(result);
        })
        .expect("spawn the database admin thread");
        match rx.await {
            Ok(Ok(())) => TestDb { url, name },
            Ok(Err(e)) => panic!(
                "cannot create a test database on {}: {e:#}\n(run the tests with scripts/test, \
                 or `source scripts/pg-env` first, or set TOKEN_BROKER_TEST_DATABASE_URL)",
                redacted(&admin)
            ),
            Err(_) => panic!("the database admin thread ended without an answer"),
        }
    }

    /// A small pool (at most 4 connections) on this database, for assertions.
    /// It lives on the caller's runtime.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", redacted(&self.url)))
    }

    /// The url with host:port replaced (e.g. to route through a `FaultProxy`),
    /// keeping user, database and parameters.
    pub fn url_via(&self, addr: SocketAddr) -> String {
        let mut url = parse(&self.url);
        url.set_ip_host(addr.ip())
            .and_then(|()| url.set_port(Some(addr.port())))
            .unwrap_or_else(|()| panic!("cannot set the address of {}", redacted(&self.url)));
        url.into()
    }

    /// The server's address, parsed from the url (names resolved, IPv4
    /// preferred; port 5432 if none), e.g. as a `FaultProxy` target.
    pub fn server_addr(&self) -> SocketAddr {
        addr_of(&self.url)
    }

    /// This database through the PgBouncer of `scripts/pgbouncer-env`
    /// (transaction pooling; its `*` entry routes the name to this server).
    pub fn url_through_pgbouncer(&self) -> String {
        with_path(&pgbouncer_url(), &format!("/{}", self.name))
    }
}

/// `TOKEN_BROKER_TEST_PGBOUNCER_URL`: an admin URL (database `postgres`)
/// through a transaction-mode PgBouncer in front of the `admin_url()` server.
/// Panics when it is unset.
pub fn pgbouncer_url() -> String {
    std::env::var("TOKEN_BROKER_TEST_PGBOUNCER_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "TOKEN_BROKER_TEST_PGBOUNCER_URL is not set: the PgBouncer tests need the \
                 PgBouncer that scripts/pgbouncer-env starts (run the tests with scripts/test, \
                 or `source scripts/pg-env && source scripts/pgbouncer-env` first)"
            )
        })
}

/// PgBouncer's listening address (e.g. as a `FaultProxy` target).
pub fn pgbouncer_addr() -> SocketAddr {
    addr_of(&pgbouncer_url())
}

/// One server connection in PgBouncer's `SHOW SERVERS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBouncerServer {
    /// The Postgres backend's pid (`pg_stat_activity.pid`).
    pub remote_pid: i32,
    /// PgBouncer's end of the connection (`pg_stat_activity.client_port`).
    pub local_port: i32,
    /// Statements PgBouncer has prepared on this connection.
    pub prepared_statements: i32,
}

/// PgBouncer's server connections to `database`, from its admin console
/// (database `pgbouncer`, simple query protocol only, hence `raw_sql`).
pub async fn pgbouncer_servers(database: &str) -> Vec<PgBouncerServer> {
    use sqlx::Row as _;
    let console = with_path(&pgbouncer_url(), "/pgbouncer");
    let mut conn = PgConnection::connect(&console)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", redacted(&console)));
    let rows = sqlx::raw_sql(AssertSqlSafe("SHOW SERVERS"))
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("SHOW SERVERS on PgBouncer's console: {e}"));
    let _ = conn.close().await;
    rows.iter()
        .filter(|row| row.get::<String, _>("database") == database)
        .map(|row| PgBouncerServer {
            remote_pid: row.get("remote_pid"),
            local_port: row.get("local_port"),
            prepared_statements: row.get("prepared_statements"),
        })
        .collect()
}

impl Drop for TestDb {
    /// Best effort, never panics: a database left behind is dropped by a later
    /// run (see the module doc).
    fn drop(&mut self) {
        let (admin, name) = (admin_url(), self.name.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let job = move || async move { drop_database(&admin, &name).await };
        let outcome = match on_own_runtime(job, move |result| {
            let _ = tx.send(result);
        }) {
            Ok(()) => match rx.recv_timeout(DROP_TIMEOUT + Duration::from_secs(1)) {
                Ok(result) => result,
                Err(e) => Err(anyhow::anyhow!("no answer: {e}")),
            },
            Err(e) => Err(anyhow::anyhow!("cannot spawn a thread: {e}")),
        };
        if let Err(e) = outcome {
            eprintln!("warning: test database {} not dropped: {e:#}", self.name);
        }
    }
}

/// Runs `job()` on a new thread with a current-thread runtime of its own and
/// hands its output to `reply`, bounded by `ADMIN_TIMEOUT`.
fn on_own_runtime<F, Fut>(
    job: F,
    reply: impl FnOnce(anyhow::Result<()>) + Send + 'static,
) -> std::io::Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>>,
{
    std::thread::Builder::new()
        .name("test-db-admin".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("build a runtime")
                .and_then(|rt| {
                    rt.block_on(async { tokio::time::timeout(ADMIN_TIMEOUT, job()).await })
                        .context("timed out")?
                });
            reply(result);
        })
        .map(drop)
}

async fn admin_connection(admin: &str) -> anyhow::Result<PgConnection> {
    PgConnection::connect(admin)
        .await
        .with_context(|| format!("connect to {}", redacted(admin)))
}

async fn create_database(admin: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = admin_connection(admin).await?;
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if !SWEPT.swap(true, Ordering::SeqCst)
        && let Err(e) = drop_stale_databases(&mut conn).await
    {
        eprintln!("warning: leftover test databases not dropped: {e:#}");
    }
    // Two statements: CREATE DATABASE cannot share a (implicit) transaction.
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {}", ident(name))))
        .execute(&mut conn)
        .await
        .context("create database")?;
    let comment = format!(
        "COMMENT ON DATABASE {} IS '{CREATED_AT}{}'",
        ident(name),
        unix_now()
    );
    if let Err(e) = sqlx::raw_sql(AssertSqlSafe(comment))
        .execute(&mut conn)
        .await
    {
        let _ = drop_database(admin, name).await;
        return Err(e).context("comment on database");
    }
    let _ = conn.close().await;
    Ok(())
}

async fn drop_database(admin: &str, name: &str) -> anyhow::Result<()> {
    let mut conn = admin_connection(admin).await?;
    let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(name));
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .context("drop database")?;
    let _ = conn.close().await;
    Ok(())
}

/// Drops `tb_test_` databases that their comment dates older than
/// `STALE_AFTER`. A database someone is connected to stays: it is skipped, and
/// the DROP has no FORCE for one connected to since (Postgres then waits 5 s
/// for the session to end before it fails).
async fn drop_stale_databases(conn: &mut PgConnection) -> anyhow::Result<()> {
    let databases: Vec<(String, Option<String>)> = sqlx::query_as(
        r"SELECT d.datname, shobj_description(d.oid, 'pg_database')
          FROM pg_database d
          WHERE d.datname LIKE 'tb\_test\_%'
            AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datid = d.oid)",
    )
    .fetch_all(&mut *conn)
    .await?;
    let now = unix_now();
    for (name, comment) in databases {
        let created = comment
            .as_deref()
            .and_then(|c| c.strip_prefix(CREATED_AT))
            .and_then(|t| t.parse::<u64>().ok());
        if created.is_some_and(|t| now.saturating_sub(t) > STALE_AFTER.as_secs()) {
            let sql = format!("DROP DATABASE IF EXISTS {}", ident(&name));
            let _ = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn).await;
        }
    }
    Ok(())
}

fn unique_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "tb_test_{}_{}_{:08x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst),
        rand::random::<u32>()
    )
}

/// A quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The address in `url` (names resolved, IPv4 preferred; port 5432 if none).
fn addr_of(url: &str) -> SocketAddr {
    let parsed = parse(url);
    let port = parsed.port().unwrap_or(5432);
    match parsed.host() {
        Some(Host::Ipv4(ip)) => (ip, port).into(),
        Some(Host::Ipv6(ip)) => (ip, port).into(),
        Some(Host::Domain(name)) => (name, port)
            .to_socket_addrs()
            .ok()
            .and_then(|addrs| addrs.min_by_key(SocketAddr::is_ipv6))
            .unwrap_or_else(|| panic!("cannot resolve {name}:{port}")),
        None => panic!("{} names no TCP host", redacted(url)),
    }
}

fn parse(url: &str) -> Url {
    Url::parse(url).unwrap_or_else(|e| panic!("{}: not a URL: {e}", redacted(url)))
}

fn with_path(url: &str, path: &str) -> String {
    let mut url = parse(url);
    url.set_path(path);
    url.into()
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut url) => {
            let _ = url.set_password(None);
            url.into()
        }
        Err(_) => "the database URL".to_owned(),
    }
}

// ---------------------------------------------------------------------------
// Self-test
// ---------------------------------------------------------------------------

mod selftest {
    use std::time::Duration;

    use sqlx::Connection;
    use sqlx::postgres::PgConnection;
    use tokio::time::timeout;

    use super::{TestDb, admin_url};
    use crate::support::fault_proxy::FaultProxy;

    const T: Duration = Duration::from_secs(10);

    async fn select_one(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
        sqlx::query_scalar("SELECT 1").fetch_one(conn).await
    }

    #[tokio::test]
    async fn test_dbs_are_separate_reachable_through_a_fault_proxy_and_dropped() {
        let a = TestDb::create().await;
        let b = TestDb::create().await;
        assert!(a.name.starts_with("tb_test_"), "{}", a.name);
        assert_ne!(a.name, b.name);
        assert_ne!(a.url, b.url);

        // Each url reaches its own database: a table made in one is not in the other.
        let pool_a = a.pool().await;
        let current: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&pool_a)
            .await
            .unwrap();
        assert_eq!(current, a.name);
        sqlx::query("CREATE TABLE marker (id int)")
            .execute(&pool_a)
            .await
            .unwrap();
        let pool_b = b.pool().await;
        let markers: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'marker'")
                .fetch_one(&pool_b)
                .await
                .unwrap();
        assert_eq!(markers, 0);

        // Through a FaultProxy: works, fails once cut, works on a new connection once restored.
        let proxy = FaultProxy::start(a.server_addr()).await;
        let via = a.url_via(proxy.addr());
        let mut conn = PgConnection::connect(&via).await.unwrap();
        assert_eq!(select_one(&mut conn).await.unwrap(), 1);
        let current: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(current, a.name, "url_via keeps the database");
        assert_eq!(proxy.live_connections(), 1);

        proxy.cut();
        let after_cut = timeout(T, select_one(&mut conn)).await;
        assert!(
            matches!(after_cut, Ok(Err(_))),
            "a query on a cut connection fails: {after_cut:?}"
        );
        let connect_while_cut = timeout(T, PgConnection::connect(&via)).await;
        assert!(
            matches!(connect_while_cut, Ok(Err(_))),
            "connecting through a cut proxy fails"
        );

        proxy.restore();
        let mut conn = PgConnection::connect(&via).await.unwrap();
        assert_eq!(select_one(&mut conn).await.unwrap(), 1);

        // Dropping a TestDb drops its database, though a session is still open on it.
        let _session = pool_b.acquire().await.unwrap();
        let gone = b.name.clone();
        drop(b);
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(&gone)
            .fetch_one(&mut admin)
            .await
            .unwrap();
        assert_eq!(left, 0, "{gone} is dropped");
    }
}
