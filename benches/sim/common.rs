//! What benches/fleet_sim.rs (`scripts/fleet-sim`) and benches/tree_sim.rs
//! (`scripts/tree-sim`) share: the temp dir, the throwaway Postgres cluster,
//! the fake OAuth2 endpoint, tiers of held-then-released broker processes,
//! connecting to a broker and waiting until it is ready, `WatchToken`
//! watchers, the `LISTEN token_broker` probe, `/proc` readings, the
//! statistics and `main`'s runtime, signal and exit-status handling
//! (`drive`). Each bench is its own crate and includes this file with
//! `#[path = "sim/common.rs"] mod common;`; it sits in a folder so that cargo
//! does not take it for a bench target of its own.
//!
//! Contract:
//! - The including crate defines `SIM_NAME` (`"fleet-sim"`, `"tree-sim"`:
//!   the prefix of progress lines on stderr and of the temp dir under `/tmp`)
//!   and `SIM_ENV` (`"FLEET_SIM"`, `"TREE_SIM"`: the prefix of the
//!   environment variables read here, `<SIM_ENV>_PG_OPTS` for further
//!   Postgres server options and `<SIM_ENV>_STATE`, the file its script reads
//!   to stop the Postgres of a driver that died without cleaning up).
//! - Everything started here is stopped or removed on drop: `WorkDir` (unless
//!   kept), `PgCluster` (stopped immediate), `Tier` (SIGTERM, then SIGKILL
//!   after 10 s). The fake upstream and the watchers are tasks on the
//!   caller's runtime; the probe is a thread of its own that ends on `stop`.
//! - Token values are never printed or kept: only their 64-bit hashes
//!   (`hash_value`).
//! - Only what both benches use belongs here: each crate's dead-code lint
//!   reads this file, so an item one bench alone needs fails the other's
//!   `clippy -D warnings`; such an item stays in that bench (an inherent
//!   `impl` block there may add methods to a type from here).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::json;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tonic::transport::Channel;

use token_broker::grpc::pb::token_broker_client::TokenBrokerClient;
use token_broker::grpc::pb::{GetCollectionTokenRequest, WatchTokenRequest};
use token_broker::listen::ListenAddr;

/// The database the brokers with a `[store]` use (fleet-sim's sidecars,
/// tree-sim's mids); the driver watches it from `postgres`.
pub const FLEET_DB: &str = "fleet";
/// Longest wait, after the window, for watchers (and fleet-sim's counters)
/// to settle.
pub const SETTLE: Duration = Duration::from_secs(5);

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn hash_value(v: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

pub fn say(msg: impl std::fmt::Display) {
    eprintln!("{}: {msg}", crate::SIM_NAME);
}

// ---------------------------------------------------------------------------
// Work dir

/// The temp dir holding the cluster, sockets and logs; removed on drop unless kept.
pub struct WorkDir {
    pub path: PathBuf,
    pub keep: Arc<AtomicBool>,
}

impl WorkDir {
    pub fn create() -> anyhow::Result<Self> {
        // Under /tmp: Unix socket paths must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}.", crate::SIM_NAME))
            .tempdir_in("/tmp")
            .context("creating the temp dir")?;
        let path = dir.keep();
        // Traversable by the postgres user when we run it as root.
        run_quiet(Command::new("chmod").arg("0711").arg(&path))?;
        Ok(Self {
            path,
            keep: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep.load(Ordering::Relaxed) {
            say(format!("kept {}", self.path.display()));
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A command run as the `postgres` user when we are root (initdb, postgres
/// and pgbouncer refuse to run as root), else as ourselves.
pub fn as_pg_user(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

// ---------------------------------------------------------------------------
// Postgres

/// Newest `/usr/lib/postgresql/*/bin` with initdb and pg_ctl, else pg_ctl's
/// dir on PATH (as scripts/pg-env finds them).
pub fn pg_bin() -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .collect();
    dirs.sort();
    if let Some((_, d)) = dirs.pop() {
        return Ok(d);
    }
    let out = Command::new("sh")
        .args(["-c", "readlink -f \"$(command -v pg_ctl)\""])
        .output()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    match p.parent() {
        Some(d) if d.join("initdb").exists() => Ok(d.to_owned()),
        _ => bail!("no initdb/pg_ctl found (install Debian's postgresql package)"),
    }
}

/// A throwaway cluster; stopped (immediate) on drop.
pub struct PgCluster {
    pub bin: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub root: bool,
}

impl PgCluster {
    pub fn start(work: &Path, max_connections: usize, root: bool) -> anyhow::Result<Self> {
        let bin = pg_bin()?;
        let dir = work.join("pg");
        std::fs::create_dir(&dir)?;
        if root {
            run_quiet(Command::new("chown").arg("postgres:").arg(&dir))?;
        }
        let data = dir.join("data");
        run_quiet(
            as_pg_user(root, &bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]),
        )
        .context("initdb")?;
        let mut last = anyhow!("no attempt");
        for _ in 0..3 {
            let port = free_port()?;
            // <SIM_ENV>_PG_OPTS: further server options, for a diagnosis
            // (e.g. `-c log_statement=all`; the log is postgres.log in --keep's dir).
            let opts = format!(
                "-F -c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections={max_connections} \
                 -c fsync=off -c full_page_writes=off {}",
                dir.display(),
                std::env::var(format!("{}_PG_OPTS", crate::SIM_ENV)).unwrap_or_default()
            );
            let cluster = Self {
                bin: bin.clone(),
                data: data.clone(),
                port,
                root,
            };
            match run_quiet(
                as_pg_user(root, &bin.join("pg_ctl"))
                    .arg("-D")
                    .arg(&data)
                    .arg("-l")
                    .arg(dir.join("postgres.log"))
                    .args(["-w", "-t", "60", "-o", &opts, "start"]),
            ) {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    drop(cluster);
                    last = e;
                }
            }
        }
        let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
        Err(last.context(format!("postgres did not start; its log:\n{log}")))
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The postmaster's pid, from the first line of `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    pub fn version(&self) -> String {
        Command::new(self.bin.join("postgres"))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = as_pg_user(self.root, &self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
// ---------------------------------------------------------------------------
// Fake upstream

pub struct Upstream {
    pub ttl_secs: std::sync::atomic::AtomicU64,
    /// (collection, arrival) of every token request.
    pub calls: Mutex<Vec<(String, Instant)>>,
    /// Hashes of every token issued.
    pub issued: Mutex<HashSet<u64>>,
}

impl Upstream {
    pub fn calls_between(&self, from: Instant, to: Instant) -> usize {
        lock(&self.calls)
            .iter()
            .filter(|(_, t)| *t >= from && *t <= to)
            .count()
    }

    pub fn calls_per_collection(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (c, _) in lock(&self.calls).iter() {
            *m.entry(c.clone()).or_insert(0) += 1;
        }
        m
    }
}

pub async fn token_endpoint(
    axum::extract::State(up): axum::extract::State<Arc<Upstream>>,
    axum::extract::Path(collection): axum::extract::Path<String>,
) -> impl axum::response::IntoResponse {
    use rand::Rng as _;
    lock(&up.calls).push((collection, Instant::now()));
    let token: String = rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    lock(&up.issued).insert(hash_value(&token));
    let body = json!({"access_token": token, "token_type": "Bearer", "expires_in": up.ttl_secs.load(Ordering::Relaxed)});
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

pub async fn start_upstream(up: Arc<Upstream>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/c/{collection}/token", axum::routing::post(token_endpoint))
        .with_state(up);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            say(format!("fake upstream stopped: {e}"));
        }
    });
    Ok(addr)
}
/// Where the driver reaches a broker: a Unix socket path (`PathBuf`), or a
/// type of the including bench (tree-sim's mids over TLS).
pub trait Dial: Send + Sync + 'static {
    /// One connection attempt.
    fn open(&self) -> impl Future<Output = anyhow::Result<TokenBrokerClient<Channel>>> + Send;
}

impl Dial for PathBuf {
    fn open(&self) -> impl Future<Output = anyhow::Result<TokenBrokerClient<Channel>>> + Send {
        let addr = ListenAddr::Unix(self.clone());
        async move { token_broker::client::connect(&addr).await }
    }
}

/// Connects to `to`, retrying every 25 ms until `until`.
pub async fn connect(to: impl Dial, until: Instant) -> anyhow::Result<TokenBrokerClient<Channel>> {
    loop {
        match to.open().await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// What one sidecar's readiness probe saw: when it had every collection, and
/// each collection's (version, value hash).
pub struct Ready {
    pub at: Instant,
    pub tokens: Vec<(String, u64, u64)>,
}

pub async fn await_ready(
    to: impl Dial,
    collections: Arc<Vec<String>>,
    until: Instant,
) -> anyhow::Result<(TokenBrokerClient<Channel>, Ready)> {
    let mut client = connect(to, until).await?;
    let mut tokens = Vec::new();
    for c in collections.iter() {
        loop {
            let mut req = tonic::Request::new(GetCollectionTokenRequest {
                collection: c.clone(),
                min_remaining: None,
            });
            req.set_timeout(
                until
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(100)),
            );
            match client.get_collection_token(req).await {
                Ok(r) => {
                    let t = r
                        .into_inner()
                        .token
                        .ok_or_else(|| anyhow!("answer without a token"))?;
                    tokens.push((c.clone(), t.version, hash_value(&t.value)));
                    break;
                }
                Err(e) if Instant::now() > until => bail!("{c}: {}", e.code()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    Ok((
        client,
        Ready {
            at: Instant::now(),
            tokens,
        },
    ))
}

/// One token as a watcher received it.
#[derive(Clone, Copy)]
pub struct Seen {
    pub version: u64,
    pub hash: u64,
    pub at: Instant,
}

pub struct Watcher {
    pub sidecar: usize,
    pub collection: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub ended: Arc<AtomicBool>,
}

pub async fn watch(
    mut client: TokenBrokerClient<Channel>,
    sidecar: usize,
    collection: String,
) -> anyhow::Result<Watcher> {
    let mut stream = client
        .watch_token(WatchTokenRequest {
            collection: collection.clone(),
            after_version: 0,
        })
        .await
        .with_context(|| format!("WatchToken {collection} on sidecar {sidecar}"))?
        .into_inner();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ended = Arc::new(AtomicBool::new(false));
    let (out, end) = (seen.clone(), ended.clone());
    tokio::spawn(async move {
        while let Ok(Some(msg)) = stream.message().await {
            let at = Instant::now();
            if let Some(t) = msg.token {
                lock(&out).push(Seen {
                    version: t.version,
                    hash: hash_value(&t.value),
                    at,
                });
            }
        }
        end.store(true, Ordering::Relaxed);
    });
    Ok(Watcher {
        sidecar,
        collection,
        seen,
        ended,
    })
}
// ---------------------------------------------------------------------------
// Probe and database samples

/// The commits the probe saw, in arrival order.
pub type Notices = Arc<Mutex<Vec<Notice>>>;

/// A commit as the probe saw it.
#[derive(Clone)]
pub struct Notice {
    pub collection: String,
    pub version: u64,
    pub at: Instant,
}

/// LISTENs on `token_broker` from its own thread (so that the watchers'
/// work does not delay its stamps) until `stop`.
pub fn start_probe(
    url: String,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(Notices, std::thread::JoinHandle<Vec<String>>)> {
    let notices = Arc::new(Mutex::new(Vec::new()));
    let out = notices.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let mut errors = Vec::new();
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(anyhow!(e)));
                return errors;
            }
        };
        rt.block_on(async {
            let mut l = match PgListener::connect(&url).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!(e)));
                    return;
                }
            };
            if let Err(e) = l.listen("token_broker").await {
                let _ = ready_tx.send(Err(anyhow!(e)));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), l.try_recv()).await {
                    Err(_) => {}
                    Ok(Ok(Some(n))) => {
                        let at = Instant::now();
                        let mut parts = n.payload().split(':');
                        let c = parts.next().unwrap_or_default().to_owned();
                        match parts.next().and_then(|v| v.parse().ok()) {
                            Some(version) => lock(&out).push(Notice {
                                collection: c,
                                version,
                                at,
                            }),
                            None => errors.push(format!("unparsed payload {:?}", n.payload())),
                        }
                    }
                    Ok(Ok(None)) => errors.push("probe connection lost (reconnecting)".into()),
                    Ok(Err(e)) => {
                        errors.push(format!("probe: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        errors
    });
    ready_rx
        .recv_timeout(Duration::from_secs(15))
        .map_err(|_| anyhow!("the probe did not connect within 15 s"))??;
    Ok((notices, handle))
}
pub fn rss_kib(pids: &[u32]) -> (u64, usize) {
    let mut total = 0;
    let mut missing = 0;
    for pid in pids {
        let kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            });
        match kib {
            Some(k) => total += k,
            None => missing += 1,
        }
    }
    (total, missing)
}

/// (ppid, utime + stime, cutime + cstime) of a process, in clock ticks.
pub fn proc_times(pid: &str) -> Option<(u32, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces): state, ppid, ..
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let num = |i: usize| f.get(i)?.parse::<u64>().ok();
    Some((
        f.get(1)?.parse().ok()?,
        num(11)? + num(12)?,
        num(13)? + num(14)?,
    ))
}

/// Milliseconds per clock tick, the unit of `/proc/<pid>/stat` times.
pub fn tick_ms() -> f64 {
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|hz| *hz > 0.0)
        .unwrap_or(100.0);
    1000.0 / hz
}

/// `pg_stat_activity` of `FLEET_DB`: connections of (token-broker listeners,
/// token-broker pools, anything else).
pub async fn db_connections(admin: &PgPool) -> anyhow::Result<(i64, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE application_name LIKE 'token-broker listener%'),
                count(*) FILTER (WHERE application_name = 'token-broker'),
                count(*) FILTER (WHERE application_name NOT LIKE 'token-broker%')
           FROM pg_stat_activity WHERE datname = $1",
    )
    .bind(FLEET_DB)
    .fetch_one(admin)
    .await?)
}

// ---------------------------------------------------------------------------
// Statistics

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(serde::Serialize, Clone, Copy, Default)]
pub struct Dist {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub min_ms: f64,
}

pub fn dist(mut v: Vec<f64>) -> Dist {
    v.sort_by(|a, b| a.total_cmp(b));
    Dist {
        count: v.len(),
        p50_ms: percentile(&v, 0.5),
        p99_ms: percentile(&v, 0.99),
        max_ms: v.last().copied().unwrap_or(f64::NAN),
        min_ms: v.first().copied().unwrap_or(f64::NAN),
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Signed `a - b` in milliseconds.
pub fn diff_ms(a: Instant, b: Instant) -> f64 {
    if a >= b { ms(a - b) } else { -ms(b - a) }
}

/// A log line's text from its target on (`target::path: message fields`),
/// without the span prefix (`refresh{collection=..}: `) that comes before.
pub fn without_spans(rest: &str) -> &str {
    let mut from = 0;
    while let Some(i) = rest[from..].find(": ") {
        let at = from + i + 2;
        let word = rest[at..].split_whitespace().next().unwrap_or_default();
        if word.contains("::") && !word.contains('{') {
            return &rest[at..];
        }
        from = at;
    }
    rest
}
// ---------------------------------------------------------------------------
// The run

/// The throwaway cluster (`max_connections` = 3N + 50) with database
/// `FLEET_DB` created, and a small pool on database `postgres`.
pub async fn start_postgres(
    workp: &Path,
    n: usize,
    root: bool,
) -> anyhow::Result<(PgCluster, PgPool, usize)> {
    let max_connections = 3 * n + 50;
    let pg = PgCluster::start(workp, max_connections, root)?;
    // For the script (scripts/fleet-sim, scripts/tree-sim): what to stop should this process
    // die without cleaning up
    // (postgres runs in a session of its own, outside our process group).
    if let Some(state) = std::env::var_os(format!("{}_STATE", crate::SIM_ENV)) {
        std::fs::write(
            state,
            format!(
                "{}\n{}\n{}\n",
                workp.display(),
                pg.bin.display(),
                u8::from(root)
            ),
        )?;
    }
    say(format!(
        "{} on 127.0.0.1:{} (max_connections {max_connections})",
        pg.version(),
        pg.port
    ));
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url("postgres"))
        .await
        .context("connecting to the cluster")?;
    // A literal: sqlx refuses unaudited dynamic SQL (FLEET_DB is "fleet").
    sqlx::query("CREATE DATABASE fleet").execute(&admin).await?;
    Ok((pg, admin, max_connections))
}

// ---------------------------------------------------------------------------
// Tiers of processes

/// One broker process: its dir holds its socket (`tb.sock`) and its log
/// (`server.log`).
pub struct Proc {
    pub dir: PathBuf,
    pub child: Child,
}

impl Proc {
    pub fn sock(&self) -> PathBuf {
        self.dir.join("tb.sock")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

/// One tier's `token-broker serve` processes (fleet-sim's sidecars, tree-sim's
/// mids or leaves) in `<work>/<name>/<i>`, spawned held at a gate: `sh`
/// reading one newline from a pipe they all share (`read` takes one byte at
/// a time from a pipe, so each takes exactly one), then exec'ing the broker.
/// All stopped on drop (SIGTERM, then SIGKILL after 10 s).
pub struct Tier {
    pub name: &'static str,
    pub procs: Vec<Proc>,
    /// The write end of the pipe every held `sh` reads one newline from
    /// before it execs the broker; closing it unreleased makes them exit.
    pub gate: Option<std::io::PipeWriter>,
}

impl Tier {
    /// Every process listens on its Unix socket (`--listen unix:<dir>/tb.sock`).
    pub fn spawn(
        name: &'static str,
        n: usize,
        bin: &Path,
        work: &Path,
        config: impl Fn(usize) -> PathBuf,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        Self::spawn_with(name, n, bin, work, config, |_| true, env)
    }

    /// As `spawn`, but process `i` gets `--listen unix:<dir>/tb.sock` only
    /// when `unix(i)`; otherwise its config's `[server] listen` applies (and
    /// `Proc::sock` names no socket).
    pub fn spawn_with(
        name: &'static str,
        n: usize,
        bin: &Path,
        work: &Path,
        config: impl Fn(usize) -> PathBuf,
        unix: impl Fn(usize) -> bool,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let (gate_r, gate_w) = std::io::pipe().context("creating the start gate")?;
        let mut tier = Tier {
            name,
            procs: Vec::with_capacity(n),
            gate: Some(gate_w),
        };
        for i in 0..n {
            // Short names: Unix socket paths must stay under 108 bytes.
            let dir = work.join(name).join(i.to_string());
            std::fs::create_dir_all(&dir)?;
            let log = std::fs::File::create(dir.join("server.log"))?;
            let mut cmd = Command::new("sh");
            cmd.arg("-c")
                .arg("read -r _ && exec \"$0\" \"$@\"")
                .arg(bin)
                .arg("serve")
                .arg("--config")
                .arg(config(i));
            if unix(i) {
                cmd.arg("--listen")
                    .arg(format!("unix:{}", dir.join("tb.sock").display()));
            }
            let child = cmd
                .args(["--admin-listen", "127.0.0.1:0"])
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .env_remove("RUST_LOG")
                .env("NO_COLOR", "1")
                .stdin(Stdio::from(gate_r.try_clone()?))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("spawning {name} {i}"))?;
            tier.procs.push(Proc { dir, child });
        }
        Ok(tier)
    }

    /// Releases every held process with one write.
    pub fn release(&mut self) -> anyhow::Result<()> {
        if let Some(mut g) = self.gate.take() {
            g.write_all("\n".repeat(self.procs.len()).as_bytes())
                .with_context(|| format!("releasing the {}", self.name))?;
        }
        Ok(())
    }

    /// Pids of the processes still running (a killed or crashed one drops out).
    pub fn pids(&mut self) -> Vec<u32> {
        self.procs
            .iter_mut()
            .filter_map(|p| matches!(p.child.try_wait(), Ok(None)).then(|| p.child.id()))
            .collect()
    }

    pub fn exited(
        &mut self,
        except: &HashSet<usize>,
    ) -> Option<(usize, std::process::ExitStatus, String)> {
        self.procs.iter_mut().enumerate().find_map(|(i, p)| {
            if except.contains(&i) {
                return None;
            }
            let status = p.child.try_wait().ok()??;
            Some((i, status, p.log()))
        })
    }

    /// Stops every process; returns how long it took and how many needed SIGKILL.
    pub fn stop(&mut self) -> (Duration, usize) {
        let t = Instant::now();
        self.gate = None;
        let pids: Vec<String> = self.pids().iter().map(u32::to_string).collect();
        for chunk in pids.chunks(500) {
            let _ = Command::new("kill")
                .arg("-TERM")
                .args(chunk)
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut killed = 0;
        while !self.pids().is_empty() {
            if Instant::now() > deadline {
                for p in &mut self.procs {
                    if matches!(p.child.try_wait(), Ok(None)) {
                        killed += 1;
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (t.elapsed(), killed)
    }

    /// WARN and ERROR lines over the tier's logs, with the most frequent.
    pub fn log_summary(&self) -> (usize, usize, usize, Vec<(String, usize)>) {
        let (mut warns, mut errors, mut with_any) = (0, 0, 0);
        let mut kinds: HashMap<String, usize> = HashMap::new();
        for p in &self.procs {
            let mut any = false;
            for line in p.log().lines() {
                let level = if line.contains(" WARN ") {
                    warns += 1;
                    "WARN"
                } else if line.contains(" ERROR ") {
                    errors += 1;
                    "ERROR"
                } else {
                    continue;
                };
                any = true;
                let rest = line
                    .split_once(&format!(" {level} "))
                    .map_or(line, |(_, r)| r.trim());
                let key: String = format!("{level} {}", without_spans(rest))
                    .chars()
                    .take(160)
                    .collect();
                *kinds.entry(key).or_insert(0) += 1;
            }
            if any {
                with_any += 1;
            }
        }
        let mut kinds: Vec<_> = kinds.into_iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        kinds.truncate(5);
        (warns, errors, with_any, kinds)
    }
}

impl Drop for Tier {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// main

/// A driver's `main` once its arguments are parsed: a 2-thread runtime, the
/// temp dir (kept from the start with `keep`), then `run` until it returns or
/// SIGINT / SIGTERM arrives (then its guards are dropped, stopping what it
/// started). Success when `run` returned `Ok(true)`; the temp dir goes last.
pub fn drive(
    keep: bool,
    run: impl AsyncFnOnce(Arc<AtomicBool>, &WorkDir) -> anyhow::Result<bool>,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(format!("cannot build the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let work = match WorkDir::create() {
        Ok(w) => w,
        Err(e) => {
            say(format!("{e:#}"));
            return ExitCode::FAILURE;
        }
    };
    if keep {
        work.keep.store(true, Ordering::Relaxed);
    }
    let keep_flag = work.keep.clone();
    let result = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(keep_flag, &work) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (SIGINT): stopping everything")),
            _ = term.recv() => Err(anyhow!("terminated (SIGTERM): stopping everything")),
        }
    });
    let code = match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            say("violations seen, or nothing measured (see above)");
            ExitCode::FAILURE
        }
        Err(e) => {
            say(format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    };
    rt.shutdown_timeout(Duration::from_secs(2));
    // The run's guards (brokers, Postgres) are dropped by now; the work dir next.
    drop(work);
    code
}
