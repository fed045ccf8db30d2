//! Fleet simulation: N real `token-broker serve` processes on one throwaway
//! Postgres cluster and one fake OAuth2 token endpoint, started at the same
//! instant and measured. Run it through `scripts/fleet-sim` (which builds it,
//! raises `ulimit -n` and kills the process group on exit); `--help` lists the
//! options.
//!
//! Contract:
//! - Everything it starts is its own and is removed at exit, also on Ctrl-C,
//!   SIGTERM or an error: a Postgres cluster (initdb in a temp dir under
//!   `/tmp`, run as user `postgres` when root, fsync off, `max_connections` =
//!   3N + 50, a free loopback port, its Unix socket in the temp dir), the fake
//!   upstream (`127.0.0.1:0`), and N sidecars (Unix sockets, admin on
//!   `127.0.0.1:0`, logs in the temp dir). No fixed port is used. The temp
//!   dir is kept when `--keep` is given or a violation was seen.
//! - Sidecars are spawned held (`sh` waiting for a newline on a pipe they all
//!   share) and then released together by one write; "ready" times count from
//!   that write's return and end when every sidecar answered
//!   `GetCollectionToken` for every collection.
//! - The commit instant of a rotation is the receipt, on this process's clock,
//!   of its `NOTIFY token_broker` by a probe connection that `LISTEN`s on
//!   Postgres directly (a notification is delivered only after its commit).
//!   A watcher's delay is the instant its `WatchToken` stream yielded the
//!   version minus that receipt.
//! - Counters: upstream calls (per collection, by the fake endpoint), lease
//!   attempts (`token_broker_lease_acquisitions_total` +
//!   `token_broker_lease_waits_total` summed over every sidecar's admin
//!   `/metrics`), transactions (`pg_stat_database` xact_commit + xact_rollback
//!   of the sidecars' database, sampled every second from another database so
//!   that the sampling itself is not counted), connections
//!   (`pg_stat_activity`), memory (`VmRSS` of every sidecar).
//! - CPU: utime + stime from `/proc/<pid>/stat` of every sidecar, of
//!   Postgres (the postmaster with its exited children's times, and its live
//!   children) and of this process (the fake upstream, the probe and the
//!   watch streams are in it; PgBouncer is not counted), sampled at the
//!   window's start and end and at the idle count's. Per rotation: the
//!   window's CPU less the idle rate over the window, per rotation, with one
//!   standard deviation of what truncation to whole clock ticks leaves.
//! - Token values are never printed or written: only 64-bit hashes are kept.
//! - `--notify-floor` starts no sidecar and no upstream: on the same cluster
//!   it holds N `LISTEN token_broker` connections itself (one `PgListener`
//!   each, tasks on this process's runtime) and commits R `pg_notify`s about
//!   1 s apart from a thread of its own. A commit's instant is when its
//!   `COMMIT` returned there; an arrival is when a listener's task had the
//!   notice (with `--notify-floor-select`, and then one primary-key read of a
//!   one-row table over a connection of its own, N more connections).
//! - Output: a markdown table row (with its header) and a short summary on
//!   stdout, progress on stderr, every number in `--json FILE`. Exit status 0
//!   when the run completed without violations (with `--notify-floor`:
//!   without a missed arrival or a listener error), 1 otherwise (2 on bad
//!   usage).
//!
//! The temp dir, Postgres, upstream, process tier, readiness, watcher, probe,
//! `/proc`, statistics and `main` code is shared with benches/tree_sim.rs in
//! benches/sim/common.rs.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use serde_json::json;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnection, PgListener, PgPool};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use token_broker::grpc::pb::token_broker_client::TokenBrokerClient;

#[path = "sim/common.rs"]
mod common;
use common::{
    FLEET_DB, Notice, Proc, SETTLE, Tier, Upstream, WorkDir, as_pg_user, await_ready,
    db_connections, diff_ms, dist, free_port, is_root, lock, ms, proc_times, rss_kib, run_quiet,
    say, start_postgres, start_probe, start_upstream, tick_ms, watch,
};

/// This driver's name, for the shared code (progress lines, the temp dir).
const SIM_NAME: &str = "fleet-sim";
/// The prefix of the environment variables the shared code reads
/// (`FLEET_SIM_PG_OPTS`, `FLEET_SIM_STATE`).
const SIM_ENV: &str = "FLEET_SIM";

/// Longest a backend's transaction counts wait before they reach
/// `pg_stat_database` (Postgres 15 flushes an idle backend's pending stats
/// after 10 s when it flushed less than 1 s before), plus a margin.
const STATS_LAG: Duration = Duration::from_secs(12);
/// Token lifetime the fake endpoint grants for the idle phase.
const IDLE_TOKEN_SECS: u64 = 3600;
#[derive(Parser, Debug)]
#[command(
    name = "fleet-sim",
    bin_name = "scripts/fleet-sim",
    about = "N real token-broker sidecars on a throwaway Postgres and a fake OAuth2 endpoint, started at once and measured \
             (or, with --notify-floor, N bare LISTEN connections: what Postgres alone costs a commit -> every listener)"
)]
struct Args {
    /// Number of sidecar processes (with --notify-floor: of listeners).
    #[arg(long)]
    sidecars: usize,
    /// Collections per sidecar (each its own oauth2_client_credentials endpoint path).
    #[arg(long, default_value_t = 2)]
    collections: usize,
    /// Measured window after every sidecar is ready and watched [default: 3.5 rotations].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Token lifetime the fake endpoint grants (`expires_in`, whole seconds).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    rotation: Duration,
    /// Idle phase after the window: the endpoint then grants 1 h tokens, and
    /// once every collection has rotated onto one (plus 12 s for Postgres'
    /// statistics to catch up) transactions are counted this long with no
    /// rotation at all. 0s skips it (then no per-rotation or idle
    /// transaction figures).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// Path to a pgbouncer (>= 1.21) binary: the pools then go through a
    /// transaction-mode PgBouncer this driver starts; listeners stay direct.
    #[arg(long)]
    pgbouncer: Option<PathBuf>,
    /// PgBouncer's `default_pool_size`: server connections for all the pools.
    #[arg(long, default_value_t = 20)]
    pgbouncer_pool_size: usize,
    /// The token-broker binary to run.
    #[arg(
        long,
        env = "FLEET_SIM_BIN",
        default_value = "target/release/token-broker"
    )]
    bin: PathBuf,
    /// Write every number to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the temp dir (sidecar logs, Postgres log) even without a violation.
    #[arg(long)]
    keep: bool,
    /// Give up when the fleet is not ready this long after the release.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// No sidecars and no upstream: --sidecars LISTEN connections in this
    /// process (one `PgListener` each, on `token_broker`) and --rotations
    /// committed `pg_notify`s about 1 s apart, measuring commit -> every
    /// listener: the floor that Postgres LISTEN/NOTIFY alone sets. Only
    /// --sidecars, --rotations, --json and --keep apply.
    #[arg(long)]
    notify_floor: bool,
    /// As --notify-floor, but each listener, on a notice, also reads one small
    /// row by primary key over a connection of its own (N more) before it
    /// counts as arrived, as a sidecar re-reads the row today.
    #[arg(long)]
    notify_floor_select: bool,
    /// Commits in a --notify-floor run.
    #[arg(long, default_value_t = 20)]
    rotations: usize,
    /// Ignored (`cargo bench` passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

/// A transaction-mode PgBouncer in front of the cluster; killed on drop.
struct PgBouncer {
    child: Child,
    port: u16,
}

impl PgBouncer {
    fn start(
        bin: &Path,
        work: &Path,
        pg_port: u16,
        pool_size: usize,
        root: bool,
    ) -> anyhow::Result<Self> {
        let dir = work.join("pgbouncer");
        std::fs::create_dir(&dir)?;
        let port = free_port()?;
        let ini = format!(
            "[databases]\n* = host=127.0.0.1 port={pg_port}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {auth}\npool_mode = transaction\n\
             max_client_conn = {clients}\ndefault_pool_size = {pool_size}\n\
             max_prepared_statements = 200\nignore_startup_parameters = extra_float_digits\n\
             logfile = {log}\n",
            auth = dir.join("users.txt").display(),
            clients = 4096,
            log = dir.join("pgbouncer.log").display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini)?;
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n")?;
        if root {
            run_quiet(Command::new("chown").args(["-R", "postgres:"]).arg(&dir))?;
        }
        let child = as_pg_user(root, bin)
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .context("starting pgbouncer")?;
        let b = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("pgbouncer did not listen on {port}; see {}", dir.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(b)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // SIGTERM: runuser (when root) passes it on; SIGKILL would orphan pgbouncer.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Sidecars (a `Tier` named "sidecars": their dirs are `<work>/sidecars/<i>`)

impl Proc {
    /// The admin address the sidecar logged.
    fn admin_addr(&self) -> Option<SocketAddr> {
        self.log()
            .lines()
            .filter(|l| l.contains("admin listener serving"))
            .find_map(|l| {
                l.split_once("admin=")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
    }
}

impl Tier {
    /// Every sidecar's pid, also of one that has exited (`pids` leaves
    /// those out).
    fn all_pids(&self) -> Vec<u32> {
        self.procs.iter().map(|s| s.child.id()).collect()
    }
}

fn sidecar_config(collections: &[String], upstream: SocketAddr, listener_url: bool) -> String {
    let mut c = String::from(
        "[store]\n\
         database_url_env = \"FLEET_SIM_DATABASE_URL\"\n\
         encryption_key_env = \"FLEET_SIM_ENCRYPTION_KEY\"\n\
         pool_size = 1\n",
    );
    if listener_url {
        c.push_str("listener_url_env = \"FLEET_SIM_LISTENER_URL\"\n");
    }
    for name in collections {
        c.push_str(&format!(
            "\n[collections.{name}]\nprefetch = true\nrequired = true\n\
             source = {{ kind = \"oauth2_client_credentials\", token_url = \"http://{upstream}/c/{name}/token\", \
             client_id = \"fleet-sim\", client_secret_env = \"FLEET_SIM_CLIENT_SECRET\" }}\n"
        ));
    }
    c
}

/// Sums `lease_acquisitions` + `lease_waits` over every sidecar's `/metrics`;
/// also returns how many sidecars could not be read or had neither series
/// (renamed metrics show up there, not as zero attempts).
async fn lease_attempts(admins: &[Option<SocketAddr>]) -> (f64, f64, usize) {
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(_) => return (0.0, 0.0, admins.len()),
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut set = JoinSet::new();
    for a in admins.iter().copied() {
        let (client, sem) = (client.clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            let text = client
                .get(format!("http://{}/metrics", a?))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let total = |name: &str| -> f64 {
                text.lines()
                    .filter(|l| l.starts_with(name))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum()
            };
            let known = [
                "token_broker_lease_acquisitions",
                "token_broker_lease_waits",
            ];
            if !known.iter().any(|k| text.contains(k)) {
                return None;
            }
            Some((
                total("token_broker_lease_acquisitions_total"),
                total("token_broker_lease_waits_total"),
            ))
        });
    }
    let (mut granted, mut held, mut failed) = (0.0, 0.0, 0);
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Some((g, h))) => {
                granted += g;
                held += h;
            }
            _ => failed += 1,
        }
    }
    (granted, held, failed)
}

#[derive(Clone, Copy, Default)]
struct DbSample {
    at: Option<Instant>,
    xacts: i64,
    listeners: i64,
    pool: i64,
    others: i64,
}

impl DbSample {
    fn total(&self) -> i64 {
        self.listeners + self.pool + self.others
    }
}

async fn db_sample(admin: &PgPool) -> anyhow::Result<DbSample> {
    let (xacts,): (i64,) = sqlx::query_as(
        "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datname = $1",
    )
    .bind(FLEET_DB)
    .fetch_one(admin)
    .await?;
    let (listeners, pool, others) = db_connections(admin).await?;
    Ok(DbSample {
        at: Some(Instant::now()),
        xacts,
        listeners,
        pool,
        others,
    })
}

fn start_sampler(
    admin: PgPool,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Vec<DbSample>>>, tokio::task::JoinHandle<()>) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let out = samples.clone();
    let h = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            if let Ok(s) = db_sample(&admin).await {
                lock(&out).push(s);
            }
        }
    });
    (samples, h)
}

/// CPU time (ms) used so far by each class of process.
#[derive(Clone, Copy)]
struct CpuSample {
    at: Instant,
    sidecars: f64,
    postgres: f64,
    driver: f64,
    /// Postgres processes counted (the postmaster and its children).
    pg_processes: usize,
    /// Sidecars (or the postmaster, or this process) whose stat was unreadable.
    unreadable: usize,
}

fn cpu_sample(sidecars: &[u32], postmaster: Option<u32>, tick_ms: f64) -> CpuSample {
    let mut unreadable = 0;
    let mut read = |pid: &str| match proc_times(pid) {
        Some((_, t, _)) => t,
        None => {
            unreadable += 1;
            0
        }
    };
    let sc: u64 = sidecars.iter().map(|p| read(&p.to_string())).sum();
    let driver = read("self");
    // A backend that exits moves its time to the postmaster's cutime + cstime.
    let (mut pg, mut pg_processes) = (0, 0);
    match postmaster.and_then(|pm| Some((pm, proc_times(&pm.to_string())?))) {
        Some((pm, (_, own, children))) => {
            (pg, pg_processes) = (own + children, 1);
            for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                if let Some((ppid, t, _)) = e.file_name().to_str().and_then(proc_times)
                    && ppid == pm
                {
                    pg += t;
                    pg_processes += 1;
                }
            }
        }
        None => unreadable += 1,
    }
    CpuSample {
        at: Instant::now(),
        sidecars: sc as f64 * tick_ms,
        postgres: pg as f64 * tick_ms,
        driver: driver as f64 * tick_ms,
        pg_processes,
        unreadable,
    }
}

#[derive(serde::Serialize, Clone, Copy)]
struct CpuClass {
    window_ms: f64,
    idle_ms_per_s: f64,
    per_rotation_ms: f64,
    /// One standard deviation of `per_rotation_ms` from the truncation of
    /// each process's times to whole ticks (a difference of two truncated
    /// readings has one of tick / sqrt(6); processes taken as independent).
    plus_minus_ms: f64,
}

/// One class (of `processes` processes): its window CPU, idle rate, and
/// window CPU less the idle rate per rotation.
fn cpu_class(
    class: fn(&CpuSample) -> f64,
    processes: usize,
    tick_ms: f64,
    window: (CpuSample, CpuSample),
    idle: Option<(CpuSample, CpuSample)>,
    rotations: usize,
) -> CpuClass {
    let used =
        |(a, b): (CpuSample, CpuSample)| (class(&b) - class(&a), (b.at - a.at).as_secs_f64());
    let (window_ms, window_s) = used(window);
    let (idle_ms, idle_s) = idle.map_or((f64::NAN, f64::NAN), used);
    let idle_ms_per_s = idle_ms / idle_s;
    let plus_minus_ms = tick_ms / 6f64.sqrt()
        * (processes as f64 * (1.0 + (window_s / idle_s).powi(2))).sqrt()
        / rotations as f64;
    CpuClass {
        window_ms,
        idle_ms_per_s,
        per_rotation_ms: (window_ms - idle_ms_per_s * window_s) / rotations as f64,
        plus_minus_ms,
    }
}

// ---------------------------------------------------------------------------
// The run

async fn run(args: Args, keep_flag: Arc<AtomicBool>, work: &WorkDir) -> anyhow::Result<bool> {
    let started = Instant::now();
    let n = args.sidecars;
    if n == 0 || args.collections == 0 {
        bail!("--sidecars and --collections must be at least 1");
    }
    if args.notify_floor || args.notify_floor_select {
        return notify_floor(args, work).await;
    }
    let ttl_secs = args.rotation.as_secs();
    if ttl_secs < 2 || args.rotation.subsec_nanos() != 0 {
        bail!("--rotation must be whole seconds, at least 2s");
    }
    let duration = args.duration.unwrap_or_else(|| args.rotation.mul_f64(3.5));
    let bin = std::fs::canonicalize(&args.bin).with_context(|| {
        format!(
            "--bin {}: not found (build with cargo build --release)",
            args.bin.display()
        )
    })?;
    let collections: Arc<Vec<String>> =
        Arc::new((0..args.collections).map(|i| format!("c{i}")).collect());
    let root = is_root();
    let workp = &work.path;
    say(format!("work dir {}", workp.display()));

    // 1. Postgres
    let (pg, admin, max_connections) = start_postgres(workp, n, root).await?;
    let bouncer = match &args.pgbouncer {
        Some(b) => {
            let b = PgBouncer::start(b, workp, pg.port, args.pgbouncer_pool_size, root)?;
            say(format!(
                "pgbouncer (transaction mode) on 127.0.0.1:{}",
                b.port
            ));
            Some(b)
        }
        None => None,
    };
    let direct_url = pg.url(FLEET_DB);
    let pool_url = match &bouncer {
        Some(b) => format!("postgres://postgres@127.0.0.1:{}/{FLEET_DB}", b.port),
        None => direct_url.clone(),
    };

    // 2. Upstream
    let upstream = Arc::new(Upstream {
        ttl_secs: ttl_secs.into(),
        calls: Mutex::new(Vec::new()),
        issued: Mutex::new(HashSet::new()),
    });
    let up_addr = start_upstream(upstream.clone()).await?;

    // 3. Config
    let config_path = workp.join("config.toml");
    std::fs::write(
        &config_path,
        sidecar_config(&collections, up_addr, bouncer.is_some()),
    )?;
    let key: [u8; 32] = rand::random();
    let secret: [u8; 24] = rand::random();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut env = vec![
        ("FLEET_SIM_DATABASE_URL", pool_url.clone()),
        (
            "FLEET_SIM_ENCRYPTION_KEY",
            format!("k1:{}", b64.encode(key)),
        ),
        ("FLEET_SIM_CLIENT_SECRET", b64.encode(secret)),
    ];
    if bouncer.is_some() {
        env.push(("FLEET_SIM_LISTENER_URL", direct_url.clone()));
    }

    // Probe and sampler before anything commits.
    let stop_bg = Arc::new(AtomicBool::new(false));
    let (notices, probe) = start_probe(direct_url.clone(), stop_bg.clone())?;
    let (samples, sampler) = start_sampler(admin.clone(), stop_bg.clone());

    // 4. Spawn held, release together.
    let t_spawn = Instant::now();
    let mut fleet = Tier::spawn("sidecars", n, &bin, workp, |_| config_path.clone(), &env)?;
    let spawn_time = t_spawn.elapsed();
    // One write releases them all (a sidecar left unreleased by a short
    // write exits on EOF and fails the run).
    fleet.release()?;
    let t0 = Instant::now();
    let release_time = t0 - t_spawn - spawn_time;
    say(format!(
        "{n} sidecars spawned in {:.0} ms, released in {:.1} ms",
        ms(spawn_time),
        ms(release_time)
    ));

    let until = t0 + args.ready_timeout;
    let mut set = JoinSet::new();
    for (i, s) in fleet.procs.iter().enumerate() {
        let (sock, cols) = (s.sock(), collections.clone());
        set.spawn(async move { (i, await_ready(sock, cols, until).await) });
    }
    let mut clients: Vec<Option<TokenBrokerClient<Channel>>> = vec![None; n];
    let mut ready_at = Vec::with_capacity(n);
    let mut start_tokens: HashMap<(String, u64), HashSet<u64>> = HashMap::new();
    let mut not_ready = Vec::new();
    let mut check = tokio::time::interval(Duration::from_millis(250));
    loop {
        let r = tokio::select! {
            r = set.join_next() => match r {
                Some(r) => r,
                None => break,
            },
            _ = check.tick() => {
                // A sidecar that exits before it is ready (a config the broker
                // refuses, a crash) fails the run now, not at --ready-timeout.
                if let Some((i, status, log)) = fleet.exited(&HashSet::new()) {
                    keep_flag.store(true, Ordering::Relaxed);
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    bail!(
                        "sidecar {i} exited ({status}) before the fleet was ready; the end of its log:\n{}\n(all logs kept in {})",
                        tail.join("\n"),
                        workp.display()
                    );
                }
                continue;
            }
        };
        match r {
            Ok((i, Ok((client, ready)))) => {
                clients[i] = Some(client);
                ready_at.push(diff_ms(ready.at, t0));
                for (c, v, h) in ready.tokens {
                    start_tokens.entry((c, v)).or_default().insert(h);
                }
            }
            Ok((i, Err(e))) => not_ready.push(format!("sidecar {i}: {e:#}")),
            Err(e) => not_ready.push(format!("readiness task: {e}")),
        }
    }
    let t_ready = Instant::now();
    let startup_calls = upstream.calls_between(t_spawn, t_ready);
    let ready = dist(ready_at);
    say(format!(
        "ready: {}/{n} after {:.2} s (p50 {:.2} s); {startup_calls} upstream calls",
        ready.count,
        ready.max_ms / 1000.0,
        ready.p50_ms / 1000.0
    ));
    if !not_ready.is_empty() {
        keep_flag.store(true, Ordering::Relaxed);
        for e in not_ready.iter().take(5) {
            say(format!("not ready: {e}"));
        }
        bail!(
            "{} of {n} sidecars not ready within {:?}; logs kept in {}",
            not_ready.len(),
            args.ready_timeout,
            workp.display()
        );
    }

    // 5. Watchers
    let mut set = JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let Some(c) = c else { continue };
        for col in collections.iter() {
            let (c, col) = (c.clone(), col.clone());
            set.spawn(watch(c, i, col));
        }
    }
    let mut watchers = Vec::with_capacity(n * collections.len());
    while let Some(r) = set.join_next().await {
        watchers.push(r.map_err(|e| anyhow!("watch task: {e}"))??);
    }
    let admins: Vec<Option<SocketAddr>> = fleet.procs.iter().map(Proc::admin_addr).collect();
    let admins_missing = admins.iter().filter(|a| a.is_none()).count();
    // Every watcher has its first token before the window opens.
    let deadline = Instant::now() + Duration::from_secs(30);
    while watchers.iter().any(|w| lock(&w.seen).is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 6. The window
    let (g0, h0, m0_failed) = lease_attempts(&admins).await;
    let x0 = db_sample(&admin).await?;
    let (postmaster, tick) = (pg.postmaster_pid(), tick_ms());
    let cpu0 = cpu_sample(&fleet.all_pids(), postmaster, tick);
    let t_w0 = Instant::now();
    say(format!(
        "{} watchers open; measuring for {}",
        watchers.len(),
        humantime::format_duration(duration)
    ));
    let mut conn_max = DbSample::default();
    let t_w1 = t_w0 + duration;
    while Instant::now() < t_w1 {
        tokio::time::sleep(
            Duration::from_millis(500).min(t_w1.saturating_duration_since(Instant::now())),
        )
        .await;
        if let Some(s) = lock(&samples).last().copied()
            && s.total() > conn_max.total()
        {
            conn_max = s;
        }
    }
    let conns = db_sample(&admin).await?;
    let (rss, rss_missing) = rss_kib(&fleet.all_pids());
    // Settle: every rotation whose upstream call fell in the window has
    // committed, and every watcher has seen the last version.
    let in_window = |ns: &[Notice], to: Instant| -> Vec<Notice> {
        ns.iter()
            .filter(|x| x.at >= t_w0 && x.at <= to)
            .cloned()
            .collect()
    };
    let settle_until = Instant::now() + SETTLE;
    loop {
        let now = Instant::now();
        let rot = in_window(&lock(&notices), now);
        let calls = upstream.calls_between(t_w0, t_w1);
        let latest: HashMap<&str, u64> = rot.iter().fold(HashMap::new(), |mut m, x| {
            let e = m.entry(x.collection.as_str()).or_insert(0);
            *e = (*e).max(x.version);
            m
        });
        let caught_up = watchers.iter().all(|w| {
            latest.get(w.collection.as_str()).is_none_or(|v| {
                lock(&w.seen).last().is_some_and(|s| s.version >= *v)
                    || w.ended.load(Ordering::Relaxed)
            })
        });
        if (rot.len() >= calls && caught_up) || now > settle_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t_end = Instant::now();
    let cpu1 = cpu_sample(&fleet.all_pids(), postmaster, tick);
    let (g1, h1, m1_failed) = lease_attempts(&admins).await;
    let x1 = db_sample(&admin).await?;

    // The idle phase: rotate every collection onto a long token, let the
    // statistics catch up, then count.
    let mut idle_phase: Option<(DbSample, DbSample)> = None;
    let mut idle_cpu = None;
    if !args.idle.is_zero() {
        upstream.ttl_secs.store(IDLE_TOKEN_SECS, Ordering::Relaxed);
        let t_switch = Instant::now();
        say(format!(
            "window done; idle phase: waiting for every collection to rotate onto a {IDLE_TOKEN_SECS} s token"
        ));
        let deadline = t_switch + args.rotation + Duration::from_secs(10);
        let t_last = loop {
            let calls = lock(&upstream.calls).clone();
            let switched: HashSet<&str> = calls
                .iter()
                .filter(|(_, t)| *t >= t_switch)
                .map(|(c, _)| c.as_str())
                .collect();
            let ns = lock(&notices).clone();
            let committed = collections.iter().all(|c| {
                switched.contains(c.as_str())
                    && ns.iter().any(|x| &x.collection == c && x.at >= t_switch)
            });
            if committed {
                break ns.iter().map(|x| x.at).max().unwrap_or(t_switch);
            }
            if Instant::now() > deadline {
                say("not every collection rotated onto the long token: idle figures are not idle");
                break Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tokio::time::sleep((t_last + STATS_LAG).saturating_duration_since(Instant::now())).await;
        let i0 = db_sample(&admin).await?;
        let c0 = cpu_sample(&fleet.all_pids(), postmaster, tick);
        say(format!(
            "counting idle transactions for {}",
            humantime::format_duration(args.idle)
        ));
        tokio::time::sleep(args.idle).await;
        let c1 = cpu_sample(&fleet.all_pids(), postmaster, tick);
        let i1 = db_sample(&admin).await?;
        idle_phase = Some((i0, i1));
        idle_cpu = Some((c0, c1));
    }
    stop_bg.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let probe_errors = tokio::task::spawn_blocking(move || probe.join().unwrap_or_default())
        .await
        .unwrap_or_default();

    let all_notices = lock(&notices).clone();
    let rotations = in_window(&all_notices, t_end);
    let window_calls = upstream.calls_between(t_w0, t_w1);
    let window_secs = (t_end - t_w0).as_secs_f64();

    // Propagation and violations.
    let mut by_version: HashMap<(String, u64), HashSet<u64>> = start_tokens;
    let (mut out_of_order, mut skipped, mut missed, mut ended) = (0usize, 0usize, 0usize, 0usize);
    let mut delays = Vec::new();
    let mut per_rotation_last = Vec::new();
    let mut per_rotation_spread = Vec::new();
    let mut seen_by: HashMap<(String, u64), Vec<Instant>> = HashMap::new();
    for w in &watchers {
        let seen = lock(&w.seen).clone();
        if w.ended.load(Ordering::Relaxed) {
            ended += 1;
        }
        for pair in seen.windows(2) {
            if pair[1].version <= pair[0].version {
                out_of_order += 1;
            } else if pair[1].version > pair[0].version + 1 {
                skipped += 1;
            }
        }
        for s in &seen {
            by_version
                .entry((w.collection.clone(), s.version))
                .or_default()
                .insert(s.hash);
            seen_by
                .entry((w.collection.clone(), s.version))
                .or_default()
                .push(s.at);
        }
        let _ = w.sidecar;
    }
    let two_values = by_version.values().filter(|v| v.len() > 1).count();
    let issued = lock(&upstream.issued).clone();
    let not_issued = by_version
        .values()
        .flatten()
        .filter(|h| !issued.contains(h))
        .count();
    let watchers_per_collection: HashMap<&str, usize> =
        watchers.iter().fold(HashMap::new(), |mut m, w| {
            *m.entry(w.collection.as_str()).or_insert(0) += 1;
            m
        });
    for r in &rotations {
        let Some(ats) = seen_by.get(&(r.collection.clone(), r.version)) else {
            missed += watchers_per_collection
                .get(r.collection.as_str())
                .copied()
                .unwrap_or(0);
            continue;
        };
        missed += watchers_per_collection
            .get(r.collection.as_str())
            .copied()
            .unwrap_or(0)
            .saturating_sub(ats.len());
        let d: Vec<f64> = ats.iter().map(|a| diff_ms(*a, r.at)).collect();
        let last = d.iter().copied().fold(f64::MIN, f64::max);
        let first = d.iter().copied().fold(f64::MAX, f64::min);
        per_rotation_last.push(last);
        per_rotation_spread.push(last - first);
        delays.extend(d);
    }
    let delays = dist(delays);
    let last = dist(per_rotation_last);
    let spread = dist(per_rotation_spread);
    let violations = out_of_order + skipped + two_values + not_issued + missed + ended;

    // Transactions. Idle: the idle phase's delta. Per rotation: from A (11 s
    // into the window, so that start-up counts have been flushed, unless a
    // commit comes first) to the idle phase's start B (every count of the
    // rotations since A flushed), minus the idle rate over that span, per
    // commit in [A, B].
    let samples = lock(&samples).clone();
    let window_xacts = x1.xacts - x0.xacts;
    let (idle_per_min, xacts_per_rotation, idle_s, per_rotation_basis) = match idle_phase {
        Some((i0, i1)) => {
            let (Some(i0_at), Some(i1_at)) = (i0.at, i1.at) else {
                bail!("sample without a time");
            };
            let idle_s = (i1_at - i0_at).as_secs_f64();
            let rate = (i1.xacts - i0.xacts) as f64 / idle_s;
            let first_commit = all_notices
                .iter()
                .filter(|x| x.at >= t_w0)
                .map(|x| x.at)
                .min()
                .unwrap_or(i0_at);
            let a_limit =
                (t_w0 + Duration::from_secs(11)).min(first_commit - Duration::from_secs(1));
            let a = samples
                .iter()
                .rfind(|x| x.at.is_some_and(|t| t >= t_w0 && t <= a_limit))
                .copied()
                .unwrap_or(x0);
            let a_at = a.at.unwrap_or(t_w0);
            let commits = all_notices
                .iter()
                .filter(|x| x.at >= a_at && x.at <= i0_at)
                .count();
            let span = (i0_at - a_at).as_secs_f64();
            let per = ((i0.xacts - a.xacts) as f64 - rate * span) / commits as f64;
            (
                rate * 60.0,
                per,
                idle_s,
                json!({"from_s_after_window_start": (a_at - t_w0).as_secs_f64(), "span_s": span, "transactions": i0.xacts - a.xacts, "commits": commits}),
            )
        }
        None => (f64::NAN, f64::NAN, 0.0, serde_json::Value::Null),
    };
    if rotations.is_empty() {
        say("no rotation committed in the window: make --duration longer than --rotation");
    }
    let calls_per_rotation = window_calls as f64 / rotations.len() as f64;
    let lease_per_rotation = ((g1 - g0) + (h1 - h0)) / rotations.len() as f64;
    let cpu_of = |class, processes| {
        cpu_class(
            class,
            processes,
            tick,
            (cpu0, cpu1),
            idle_cpu,
            rotations.len(),
        )
    };
    let (cpu_sc, cpu_pg, cpu_dr) = (
        cpu_of(|c| c.sidecars, n),
        cpu_of(|c| c.postgres, cpu1.pg_processes),
        cpu_of(|c| c.driver, 1),
    );
    let cpu_unreadable = [
        Some(cpu0),
        Some(cpu1),
        idle_cpu.map(|i| i.0),
        idle_cpu.map(|i| i.1),
    ]
    .iter()
    .flatten()
    .map(|c| c.unreadable)
    .max()
    .unwrap_or(0);

    // 7. Stop, logs.
    let (stop_time, stop_killed) = fleet.stop();
    let (warns, errors, warn_sidecars, top_logs) = fleet.log_summary();
    if violations > 0 {
        keep_flag.store(true, Ordering::Relaxed);
    }

    let mode = if bouncer.is_some() {
        "pgbouncer"
    } else {
        "direct"
    };
    let header = "| sidecars | collections | pool via | all ready after start | upstream calls at start-up | commit -> each watcher p50 / p99 / max | commit -> last watcher p50 / p99 / max | spread p99 | upstream calls / rotation | lease attempts / rotation | DB connections (listener + pool + other) | transactions / rotation | transactions / idle min | sidecar RSS total | violations | WARN / ERROR lines |";
    let sep = "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";
    let row = format!(
        "| {n} | {c} | {mode} | {ready:.2} s | {startup_calls} | {d50:.1} / {d99:.1} / {dmax:.1} ms | {l50:.1} / {l99:.1} / {lmax:.1} ms | {s99:.1} ms | {cpr:.2} | {lpr:.2} | {ct} ({cl} + {cp} + {co}) | {xpr:.1} | {xim:.0} | {rss:.0} MiB | {violations} | {warns} / {errors} |",
        c = collections.len(),
        ready = ready.max_ms / 1000.0,
        d50 = delays.p50_ms,
        d99 = delays.p99_ms,
        dmax = delays.max_ms,
        l50 = last.p50_ms,
        l99 = last.p99_ms,
        lmax = last.max_ms,
        s99 = spread.p99_ms,
        cpr = calls_per_rotation,
        lpr = lease_per_rotation,
        ct = conns.total(),
        cl = conns.listeners,
        cp = conns.pool,
        co = conns.others,
        xpr = xacts_per_rotation,
        xim = idle_per_min,
        rss = rss as f64 / 1024.0,
    );
    println!("{header}\n{sep}\n{row}\n");
    let per_col = upstream.calls_per_collection();
    println!(
        "{n} sidecars x {c} collections ({mode}), {ttl_secs} s tokens, window {:.1} s, run {:.1} s (wall).\n\
         - Start: spawned in {:.2} s, released in {:.1} ms; all ready {:.2} s after the release (p50 {:.2} s); \
         {startup_calls} upstream calls by then (expected {c}); distinct tokens at start-up per version: max {}.\n\
         - Rotations in the window: {} (from the probe's NOTIFY receipts); upstream calls in the window: {window_calls} \
         ({calls_per_rotation:.2} per rotation); upstream calls in all, per collection: {per_col:?}.\n\
         - Commit -> each watcher ({} deliveries): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (min {:.1} ms; negative = before the probe).\n\
         - Commit -> last watcher per rotation: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; first-to-last spread p99 {:.1} ms.\n\
         - Lease attempts (granted + found held, summed over /metrics): {:.0} + {:.0} in the window = {lease_per_rotation:.2} per rotation \
         ({} sidecars unreadable, {admins_missing} without an admin address).\n\
         - Database connections at the end: {} ({} listener, {} pool, {} other incl. this probe); peak sample {}.\n\
         - Transactions (pg_stat_database xact_commit + xact_rollback of `{FLEET_DB}`): {window_xacts} in {window_secs:.1} s \
         ({:.1}/s, idle included); idle: {idle_per_min:.0}/min (measured over {idle_s:.0} s with no rotation); \
         per rotation: {xacts_per_rotation:.1} (the excess over the idle rate, per commit).\n\
         - CPU (utime + stime from /proc; per rotation = the window's less the idle rate, per rotation): \
         sidecars {sc:.1} ms ({sc_each:.2} ms each), Postgres ({pgn} processes) {pgr:.1} ms, this driver (watch streams, \
         upstream, probe) {dr:.1} ms per rotation ({tick:.0} ms ticks: +- {scpm:.1}, {pgpm:.1}, {drpm:.1} ms); idle rate: sidecars {sci:.1}, Postgres {pgi:.1}, driver {dri:.1} ms/s; \
         in the window: {scw:.0}, {pgw:.0}, {drw:.0} ms in all{cpu_note}.\n\
         - Sidecar memory: {:.1} MiB VmRSS in all ({:.1} MiB each){}.\n\
         - Violations: {violations} (out of order {out_of_order}, skipped versions {skipped}, two values for one version {two_values}, \
         value never issued {not_issued}, deliveries missed {missed}, streams ended {ended}).\n\
         - Logs: {warns} WARN and {errors} ERROR lines on {warn_sidecars} sidecars{}.\n\
         - Stop: {:.2} s for SIGTERM to end all ({stop_killed} needed SIGKILL).{}",
        ms(t_end - t_w0) / 1000.0,
        started.elapsed().as_secs_f64(),
        spawn_time.as_secs_f64(),
        ms(release_time),
        ready.max_ms / 1000.0,
        ready.p50_ms / 1000.0,
        by_version.values().map(HashSet::len).max().unwrap_or(0),
        rotations.len(),
        delays.count,
        delays.p50_ms,
        delays.p99_ms,
        delays.max_ms,
        delays.min_ms,
        last.p50_ms,
        last.p99_ms,
        last.max_ms,
        spread.p99_ms,
        g1 - g0,
        h1 - h0,
        m0_failed.max(m1_failed),
        conns.total(),
        conns.listeners,
        conns.pool,
        conns.others,
        conn_max.total(),
        window_xacts as f64 / window_secs,
        rss as f64 / 1024.0,
        rss as f64 / 1024.0 / n as f64,
        if rss_missing > 0 {
            format!(" ({rss_missing} unreadable)")
        } else {
            String::new()
        },
        if top_logs.is_empty() {
            String::new()
        } else {
            format!(
                "; most frequent:\n{}",
                top_logs
                    .iter()
                    .map(|(k, c)| format!("    {c} x {k}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        },
        stop_time.as_secs_f64(),
        if probe_errors.is_empty() {
            String::new()
        } else {
            format!("\n- Probe errors: {probe_errors:?}")
        },
        c = collections.len(),
        sc = cpu_sc.per_rotation_ms,
        sc_each = cpu_sc.per_rotation_ms / n as f64,
        pgr = cpu_pg.per_rotation_ms,
        dr = cpu_dr.per_rotation_ms,
        pgn = cpu1.pg_processes,
        scpm = cpu_sc.plus_minus_ms,
        pgpm = cpu_pg.plus_minus_ms,
        drpm = cpu_dr.plus_minus_ms,
        sci = cpu_sc.idle_ms_per_s,
        pgi = cpu_pg.idle_ms_per_s,
        dri = cpu_dr.idle_ms_per_s,
        scw = cpu_sc.window_ms,
        pgw = cpu_pg.window_ms,
        drw = cpu_dr.window_ms,
        cpu_note = if cpu_unreadable > 0 {
            format!(" ({cpu_unreadable} processes unreadable in a sample)")
        } else {
            String::new()
        },
    );

    if let Some(path) = &args.json {
        let doc = json!({
            "sidecars": n,
            "collections": collections.len(),
            "pool_via": mode,
            "token_lifetime_s": ttl_secs,
            "window_s": window_secs,
            "wall_s": started.elapsed().as_secs_f64(),
            "spawn_s": spawn_time.as_secs_f64(),
            "release_ms": ms(release_time),
            "ready_after_start": ready,
            "upstream_calls_at_startup": startup_calls,
            "upstream_calls_per_collection_total": per_col,
            "rotations": rotations.len(),
            "upstream_calls_in_window": window_calls,
            "upstream_calls_per_rotation": calls_per_rotation,
            "commit_to_watcher": delays,
            "commit_to_last_watcher": last,
            "first_to_last_watcher_spread": spread,
            "lease_acquisitions_in_window": g1 - g0,
            "lease_waits_in_window": h1 - h0,
            "lease_attempts_per_rotation": lease_per_rotation,
            "metrics_unreadable": m0_failed.max(m1_failed),
            "db_connections": {"total": conns.total(), "listener": conns.listeners, "pool": conns.pool, "other": conns.others, "peak_sample_total": conn_max.total()},
            "max_connections": max_connections,
            "transactions_in_window": window_xacts,
            "transactions_per_second": window_xacts as f64 / window_secs,
            "transactions_per_idle_minute": idle_per_min,
            "idle_seconds_measured": idle_s,
            "transactions_per_rotation_basis": per_rotation_basis,
            "transactions_per_rotation": xacts_per_rotation,
            "cpu": {
                "window_s": (cpu1.at - cpu0.at).as_secs_f64(),
                "idle_s": idle_cpu.map(|(a, b)| (b.at - a.at).as_secs_f64()),
                "sidecars": cpu_sc,
                "sidecar_each_per_rotation_ms": cpu_sc.per_rotation_ms / n as f64,
                "postgres": cpu_pg,
                "postgres_processes": cpu1.pg_processes,
                "tick_ms": tick,
                "driver": cpu_dr,
                "unreadable": cpu_unreadable,
            },
            "rss_total_kib": rss,
            "rss_unreadable": rss_missing,
            "violations": {"total": violations, "out_of_order": out_of_order, "skipped": skipped, "two_values_one_version": two_values, "not_issued": not_issued, "missed": missed, "streams_ended": ended},
            "logs": {"warn": warns, "error": errors, "sidecars_with_any": warn_sidecars, "top": top_logs},
            "stop_s": stop_time.as_secs_f64(),
            "stop_killed": stop_killed,
            "probe_errors": probe_errors,
            "markdown_row": row,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(fleet);
    drop(bouncer);
    admin.close().await;
    drop(pg);
    Ok(violations == 0 && !rotations.is_empty())
}

// ---------------------------------------------------------------------------
// The notify floor

/// The row a --notify-floor-select listener reads on each notice.
async fn read_row(c: &mut PgConnection) -> Result<(i64, Vec<u8>), sqlx::Error> {
    sqlx::query_as("SELECT version, value FROM floor_row WHERE collection = $1")
        .bind("c0")
        .fetch_one(c)
        .await
}

/// --notify-floor[-select]: N listeners in this process, R commits of a
/// `pg_notify('token_broker', '<rotation>')`; each commit's instant is taken
/// when its `COMMIT` has returned, each arrival when the listener's task has
/// the notice (and, with the select, the row).
async fn notify_floor(args: Args, work: &WorkDir) -> anyhow::Result<bool> {
    let started = Instant::now();
    let (n, r, select) = (args.sidecars, args.rotations, args.notify_floor_select);
    if r == 0 {
        bail!("--rotations must be at least 1");
    }
    say(format!("work dir {}", work.path.display()));
    let (pg, admin, max_connections) = start_postgres(&work.path, n, is_root()).await?;
    let url = pg.url(FLEET_DB);
    if select {
        let mut c = PgConnection::connect(&url).await?;
        sqlx::query(
            "CREATE TABLE floor_row (collection text PRIMARY KEY, version bigint NOT NULL, value bytea NOT NULL)",
        )
        .execute(&mut c)
        .await?;
        sqlx::query("INSERT INTO floor_row VALUES ('c0', 1, $1)")
            .bind(vec![7u8; 120])
            .execute(&mut c)
            .await?;
        c.close().await?;
    }

    // Connect (32 at a time), LISTEN, and with the select prepare its statement.
    let t_connect = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let (url, sem) = (url.clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let mut l = PgListener::connect(&url).await?;
            l.listen("token_broker").await?;
            let mut reader = None;
            if select {
                let mut c = PgConnection::connect(&url).await?;
                read_row(&mut c).await?;
                reader = Some(c);
            }
            anyhow::Ok((l, reader))
        });
    }
    let mut listeners = Vec::with_capacity(n);
    while let Some(x) = set.join_next().await {
        listeners.push(x.map_err(|e| anyhow!("connect task: {e}"))??);
    }
    let connect_time = t_connect.elapsed();
    say(format!(
        "{n} listeners{} connected in {:.2} s; {r} commits about 1 s apart",
        if select { " and readers" } else { "" },
        connect_time.as_secs_f64()
    ));

    // arrivals[i]: the instants rotation i reached a listener.
    let arrivals = Arc::new(Mutex::new(vec![Vec::<Instant>::new(); r]));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = JoinSet::new();
    for (mut l, mut reader) in listeners {
        let (arrivals, errors) = (arrivals.clone(), errors.clone());
        tasks.spawn(async move {
            loop {
                match l.try_recv().await {
                    Ok(Some(note)) => {
                        if let Some(c) = reader.as_mut()
                            && let Err(e) = read_row(c).await
                        {
                            lock(&errors).push(format!("select: {e}"));
                            continue;
                        }
                        let at = Instant::now();
                        match note.payload().parse::<usize>() {
                            Ok(i) if i < r => lock(&arrivals)[i].push(at),
                            _ => {
                                lock(&errors).push(format!("unparsed payload {:?}", note.payload()))
                            }
                        }
                    }
                    Ok(None) => {
                        lock(&errors).push("listener connection lost (reconnecting)".into())
                    }
                    Err(e) => {
                        lock(&errors).push(format!("listener: {e}"));
                        return;
                    }
                }
            }
        });
    }

    // The committer runs on a thread of its own (as the probe does), so that
    // its stamps do not queue behind the listeners' tasks on this runtime.
    // It returns (COMMIT sent, COMMIT returned) per rotation and the
    // connections to the database after the last.
    let committer = {
        let (url, arrivals) = (url.clone(), arrivals.clone());
        std::thread::spawn(move || -> anyhow::Result<(Vec<(Instant, Instant)>, i64)> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut sender = PgConnection::connect(&url).await?;
                let mut commits = Vec::with_capacity(r);
                for i in 0..r {
                    let next = Instant::now() + Duration::from_secs(1);
                    let mut tx = sender.begin().await?;
                    sqlx::query("SELECT pg_notify('token_broker', $1)")
                        .bind(i.to_string())
                        .execute(&mut *tx)
                        .await?;
                    let sent = Instant::now();
                    tx.commit().await?;
                    let at = Instant::now();
                    commits.push((sent, at));
                    // Every listener has it (or SETTLE passed) before the next commit.
                    while lock(&arrivals)[i].len() < n && Instant::now() < at + SETTLE {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
                }
                let (conns,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
                )
                .fetch_one(&mut sender)
                .await?;
                Ok((commits, conns))
            })
        })
    };
    let (commits, conns) = tokio::task::spawn_blocking(move || committer.join())
        .await?
        .map_err(|_| anyhow!("the committer thread panicked"))??;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}

    let arrivals = lock(&arrivals).clone();
    let errors = lock(&errors).clone();
    let (mut each, mut last, mut missed) = (Vec::new(), Vec::new(), 0);
    let (mut rtt, mut sent_last, mut spread) = (Vec::new(), Vec::new(), Vec::new());
    for (ats, (sent, commit)) in arrivals.iter().zip(&commits) {
        let d: Vec<f64> = ats.iter().map(|a| diff_ms(*a, *commit)).collect();
        missed += n.saturating_sub(d.len());
        rtt.push(diff_ms(*commit, *sent));
        if let (Some(hi), Some(lo)) = (
            d.iter().copied().reduce(f64::max),
            d.iter().copied().reduce(f64::min),
        ) {
            last.push(hi);
            sent_last.push(hi + diff_ms(*commit, *sent));
            spread.push(hi - lo);
        }
        each.extend(d);
    }
    let (each, last) = (dist(each), dist(last));
    let (rtt, sent_last, spread) = (dist(rtt), dist(sent_last), dist(spread));
    let reread = if select { "yes" } else { "no" };
    let header = "| listeners | commits | re-read (SELECT) | commit -> each listener p50 / p99 / max | commit -> last listener p50 / p99 / max | DB connections | missed |";
    let sep = "|---:|---:|---|---:|---:|---:|---:|";
    let row = format!(
        "| {n} | {r} | {reread} | {:.1} / {:.1} / {:.1} ms | {:.1} / {:.1} / {:.1} ms | {conns} | {missed} |",
        each.p50_ms, each.p99_ms, each.max_ms, last.p50_ms, last.p99_ms, last.max_ms,
    );
    println!("{header}\n{sep}\n{row}\n");
    println!(
        "{n} LISTEN connections in one process (notify floor{}), {r} commits of pg_notify about 1 s apart, {}; run {:.1} s (wall).\n\
         - Listeners connected in {:.2} s; connections to `{FLEET_DB}` at the end: {conns} (listeners{}, the committer).\n\
         - Commit -> each listener ({} arrivals): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (min {:.1} ms; negative = before the COMMIT returned).\n\
         - Commit -> last listener per commit: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (min {:.1} ms).\n\
         - COMMIT round trip: p50 {:.1} ms, max {:.1} ms; COMMIT sent -> last listener (an upper bound on the above): \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; first-to-last listener spread: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms.\n\
         - Missed arrivals: {missed}; listener errors: {}{}.",
        if select {
            ", each re-reading one row"
        } else {
            ""
        },
        pg.version(),
        started.elapsed().as_secs_f64(),
        connect_time.as_secs_f64(),
        if select { ", readers" } else { "" },
        each.count,
        each.p50_ms,
        each.p99_ms,
        each.max_ms,
        each.min_ms,
        last.p50_ms,
        last.p99_ms,
        last.max_ms,
        last.min_ms,
        rtt.p50_ms,
        rtt.max_ms,
        sent_last.p50_ms,
        sent_last.p99_ms,
        sent_last.max_ms,
        spread.p50_ms,
        spread.p99_ms,
        spread.max_ms,
        errors.len(),
        errors
            .first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
    );
    if let Some(path) = &args.json {
        let doc = json!({
            "mode": if select { "notify_floor_select" } else { "notify_floor" },
            "listeners": n,
            "commits": r,
            "max_connections": max_connections,
            "connect_s": connect_time.as_secs_f64(),
            "wall_s": started.elapsed().as_secs_f64(),
            "commit_to_listener": each,
            "commit_to_last_listener": last,
            "commit_round_trip": rtt,
            "commit_sent_to_last_listener": sent_last,
            "first_to_last_listener_spread": spread,
            "db_connections": conns,
            "missed": missed,
            "listener_errors": errors,
            "markdown_row": row,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    admin.close().await;
    drop(pg);
    Ok(missed == 0 && errors.is_empty())
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::drive(args.keep, async |keep_flag, work| {
        run(args, keep_flag, work).await
    })
}
