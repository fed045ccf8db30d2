//! The chaos driver: N real sidecars on one Postgres database reached through
//! the fault proxy, the scripted upstream, clients on every sidecar, and a
//! schedule of events drawn from a seed. [`run`] returns the recorded
//! [`History`] judged by the checker; the tests print seed, events and verdict.
//!
//! `short_seeded_chaos_run` (seed 1, about 60 s) runs with the other tests;
//! `chaos_run_from_env` (ignored) is what `scripts/chaos` runs:
//! `CHAOS_SEED`, `CHAOS_DURATION` (e.g. `10m`), `CHAOS_SIDECARS`,
//! `CHAOS_EXTRA_POLICY` (appended to every collection's inline policy table,
//! e.g. `, lease_ttl = "3s"`), `CHAOS_CLOCK_OFFSET` (libfaketime's
//! `FAKETIME` for the clock-offset event, default `+3s`), `CHAOS_ONLY`
//! (comma-separated event kinds to run, e.g. `kill,kill-holder`; `none` runs
//! none), `CHAOS_BIN` (the sidecar binary, default this package's).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::clients::{Recorder, caller, watcher};
use super::history::{self, History, Kill, Ms, Window, now_ms};
use super::proc::{self, Proc};
use super::upstream::{Endpoint, Faults, Kind, Upstream};
use crate::support::fault_proxy::FaultProxy;
use crate::support::postgres::TestDb;

/// The collections every chaos sidecar serves: one per upstream kind, with
/// short tokens (lifetimes drawn per call from the range, in seconds).
pub const COLLECTIONS: &[(&str, Kind, (u64, u64))] = &[
    ("cc", Kind::ClientCredentials, (6, 12)),
    ("rt", Kind::RefreshToken, (8, 20)),
    ("hj", Kind::HttpJson, (6, 20)),
];

/// Warm-up before the first event and quiet time after the last one.
const WARM_UP: Duration = Duration::from_secs(8);
const COOL_DOWN: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct ChaosConfig {
    pub seed: u64,
    pub duration: Duration,
    pub sidecars: usize,
    /// Appended inside every collection's inline `policy = { ... }` table.
    pub extra_policy: String,
    pub faults: Faults,
    /// The clock offset (libfaketime's `FAKETIME`) of the clock-offset event.
    pub clock_offset: String,
    /// Run only events of these kinds ([`Event::kind`]; snapshots always
    /// run); the schedule stays the seed's, the others are skipped.
    pub only: Option<Vec<String>>,
}

impl ChaosConfig {
    pub fn new(seed: u64, duration: Duration, sidecars: usize) -> Self {
        Self {
            seed,
            duration,
            sidecars,
            extra_policy: String::new(),
            faults: Faults::default(),
            clock_offset: "+3s".to_owned(),
            only: None,
        }
    }
}

/// The encryption keys of each rolling key-rotation step, in order, as the
/// sidecars' `TB_ENCRYPTION_KEY` lists them: key ids, each optionally with
/// `:decrypt-only` (the key material is added by the driver). The README's
/// three roll-outs per new key: add it decrypt-only after the current one;
/// make it the encrypting one, the old one second; drop the old one once no
/// row names it (the driver defers a drop while a row still does). Change
/// this table, and only it, when the documented steps change.
pub fn key_steps(step: usize) -> Vec<String> {
    if step == 0 {
        return vec!["k1".to_owned()];
    }
    let old = format!("k{}", (step - 1) / 3 + 1);
    let new = format!("k{}", (step - 1) / 3 + 2);
    match (step - 1) % 3 {
        0 => vec![old, format!("{new}:decrypt-only")],
        1 => vec![new, old],
        _ => vec![new],
    }
}

/// A key entry's id (`k2` of `k2:decrypt-only`).
fn key_id(entry: &str) -> &str {
    entry.split(':').next().unwrap_or(entry)
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// `kill -9` a sidecar, restart it after `down`.
    Kill {
        sidecar: usize,
        down: Duration,
    },
    /// Slow the next upstream call of `collection` to 3 s, `kill -9` the
    /// sidecar making it while it is in flight, restart it after `down`.
    KillHolder {
        collection: &'static str,
        down: Duration,
    },
    DbCut {
        length: Duration,
    },
    DbBlackhole {
        length: Duration,
    },
    /// Every sidecar's database sessions terminated at once: what a Postgres
    /// restart looks like to them (the shared server is not restarted).
    DbRestart,
    /// The next step of [`key_steps`], rolled out one sidecar at a time.
    KeyRotation,
    /// Saves a copy of a collection's row.
    Snapshot {
        collection: &'static str,
    },
    /// Writes the saved token columns (version, value, key, times) back, with
    /// or without a NOTIFY. The refresh token is left as is: a spent one
    /// restored would revoke a strict grant, which no broker can prevent.
    Rollback {
        collection: &'static str,
        notify: bool,
    },
    /// Restarts a sidecar with libfaketime preloaded (`FAKETIME` = the run's
    /// offset); skipped, loudly, when libfaketime is missing.
    ClockOffset {
        sidecar: usize,
    },
}

impl Event {
    /// The name `--only` selects this event by.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Kill { .. } => "kill",
            Event::KillHolder { .. } => "kill-holder",
            Event::DbCut { .. } => "db-cut",
            Event::DbBlackhole { .. } => "db-blackhole",
            Event::DbRestart => "db-restart",
            Event::KeyRotation => "key-rotation",
            Event::Snapshot { .. } => "snapshot",
            Event::Rollback { .. } => "rollback",
            Event::ClockOffset { .. } => "clock-offset",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Kill { sidecar, down } => {
                write!(f, "kill -9 sidecar {sidecar}, restart after {down:.1?}")
            }
            Event::KillHolder { collection, down } => write!(
                f,
                "kill -9 the sidecar calling the upstream for {collection} mid-call, restart after {down:.1?}"
            ),
            Event::DbCut { length } => write!(f, "database cut for {length:.1?}"),
            Event::DbBlackhole { length } => write!(f, "database black hole for {length:.1?}"),
            Event::DbRestart => write!(f, "database restart (all sessions terminated)"),
            Event::KeyRotation => write!(f, "rolling key rotation (next step)"),
            Event::Snapshot { collection } => write!(f, "snapshot row {collection}"),
            Event::Rollback { collection, notify } => write!(
                f,
                "roll row {collection} back to the snapshot{}",
                if *notify { " + NOTIFY" } else { "" }
            ),
            Event::ClockOffset { sidecar } => {
                write!(
                    f,
                    "restart sidecar {sidecar} with its clock offset (faketime)"
                )
            }
        }
    }
}

/// The events of a run, each with its planned start; a pure function of
/// (seed, duration, sidecars).
pub fn schedule(seed: u64, duration: Duration, sidecars: usize) -> Vec<(Duration, Event)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut at = WARM_UP;
    let mut events = Vec::new();
    let end = duration.saturating_sub(COOL_DOWN);
    let secs =
        |rng: &mut StdRng, lo: f64, hi: f64| Duration::from_secs_f64(rng.random_range(lo..hi));
    let mut snapshots: Vec<&'static str> = Vec::new();
    let mut clock_offset_done = false;
    while at < end {
        let collection = COLLECTIONS[rng.random_range(0..COLLECTIONS.len())].0;
        let roll = rng.random_range(0..100);
        let event = match roll {
            0..18 => Event::Kill {
                sidecar: rng.random_range(0..sidecars),
                down: secs(&mut rng, 1.0, 6.0),
            },
            18..36 => Event::KillHolder {
                collection,
                down: secs(&mut rng, 1.0, 6.0),
            },
            36..46 => Event::DbCut {
                length: secs(&mut rng, 2.0, 8.0),
            },
            46..56 => Event::DbBlackhole {
                length: secs(&mut rng, 2.0, 8.0),
            },
            56..62 => Event::DbRestart,
            62..72 => Event::KeyRotation,
            72..90 => {
                if snapshots.contains(&collection) {
                    Event::Rollback {
                        collection,
                        notify: rng.random_bool(0.5),
                    }
                } else {
                    snapshots.push(collection);
                    Event::Snapshot { collection }
                }
            }
            _ => {
                if clock_offset_done {
                    Event::Kill {
                        sidecar: rng.random_range(0..sidecars),
                        down: secs(&mut rng, 1.0, 6.0),
                    }
                } else {
                    clock_offset_done = true;
                    Event::ClockOffset {
                        sidecar: rng.random_range(0..sidecars),
                    }
                }
            }
        };
        events.push((at, event));
        at += secs(&mut rng, 3.0, 8.0);
    }
    events
}

pub fn config(upstream: &str, sidecar: usize, extra_policy: &str) -> String {
    let policy = format!(
        r#"policy = {{ min_refresh_interval = "1s", refresh_fraction = 0.5, fetch_timeout = "5s" {extra_policy} }}"#
    );
    format!(
        r#"
[server]
request_timeout = "30s"

[http]
timeout = "4s"
connect_timeout = "1s"

[store]
database_url_env = "TB_DATABASE_URL"
encryption_key_env = "TB_ENCRYPTION_KEY"
heartbeat_interval = "1s"
query_timeout = "1s"
connect_timeout = "1s"
poll_interval = "5s"

[collections.cc]
source = {{ kind = "oauth2_client_credentials", token_url = "{upstream}/c/cc/token", client_id = "chaos-s{sidecar}", client_secret_env = "TB_CLIENT_SECRET", client_auth = "body" }}
{policy}

[collections.rt]
source = {{ kind = "oauth2_refresh_token", token_url = "{upstream}/c/rt/token", client_id = "chaos-s{sidecar}", refresh_token_env = "TB_REFRESH_TOKEN" }}
{policy}

[collections.hj]
source = {{ kind = "http_json", url = "{upstream}/c/hj/json", method = "POST", form = {{ who = "chaos" }}, headers = {{ x-chaos-sidecar = "{sidecar}" }}, expires_pointer = "/expires_in" }}
{policy}
"#
    )
}

/// Key material for key ids, made once per run.
struct Keys(HashMap<String, String>);

impl Keys {
    fn env(&mut self, ids: &[String]) -> String {
        use base64::Engine as _;
        ids.iter()
            .map(|entry| {
                let (id, flags) = entry.split_once(':').unwrap_or((entry, ""));
                let key = self.0.entry(id.to_owned()).or_insert_with(|| {
                    let k: [u8; 32] = rand::random();
                    base64::engine::general_purpose::STANDARD.encode(k)
                });
                if flags.is_empty() {
                    format!("{id}:{key}")
                } else {
                    format!("{id}:{key}:{flags}")
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What a run leaves: the history, the log of executed events, the verdict
/// and the directory holding the sidecars' logs.
pub struct Outcome {
    pub history: History,
    pub events: Vec<String>,
    pub violations: Vec<history::Violation>,
    pub dir: tempfile::TempDir,
}

struct Driver {
    procs: Vec<Proc>,
    up: Vec<Vec<Window>>,
    outages: Vec<Window>,
    kills: Vec<Kill>,
    extra: HashMap<String, usize>,
    log: Vec<String>,
    started: Instant,
    keys: Keys,
    key_step: usize,
    upstream: Arc<Upstream>,
    clock_offset: String,
    proxy: FaultProxy,
    pool: PgPool,
}

impl Driver {
    fn note(&mut self, line: String) {
        let line = format!("[+{:6.1}s] {line}", self.started.elapsed().as_secs_f64());
        eprintln!("chaos: {line}");
        self.log.push(line);
    }

    async fn start(&mut self, i: usize) {
        self.up[i].push(Window {
            from: now_ms(),
            to: None,
        });
        self.procs[i].start().await;
    }

    fn close(&mut self, i: usize, at: Ms) {
        if let Some(w) = self.up[i].last_mut() {
            w.to.get_or_insert(at);
        }
    }

    fn kill(&mut self, i: usize) {
        let at = now_ms();
        self.close(i, at);
        self.procs[i].kill9();
        self.kills.push(Kill { sidecar: i, at });
        self.upstream.killed(i, at);
    }

    async fn stop(&mut self, i: usize) {
        self.close(i, now_ms());
        let started = Instant::now();
        match self.procs[i].stop().await {
            Some(status) if status.success() => {}
            Some(status) => self.note(format!("  sidecar {i} exited with {status} on SIGTERM")),
            None => self.note(format!(
                "  !!! sidecar {i} did not exit within {:.0?} of SIGTERM: killed",
                started.elapsed()
            )),
        }
    }

    async fn outage(&mut self, cut: bool, length: Duration) {
        let from = now_ms();
        if cut {
            self.proxy.cut();
        } else {
            self.proxy.blackhole();
        }
        // The upstream's reuse grace needs to know the database is away.
        self.outages.push(Window { from, to: None });
        self.upstream.set_outages(&self.outages);
        tokio::time::sleep(length).await;
        self.proxy.restore();
        if let Some(w) = self.outages.last_mut() {
            w.to = Some(now_ms());
        }
        self.upstream.set_outages(&self.outages);
    }

    async fn apply(&mut self, event: &Event) {
        match event {
            Event::Kill { sidecar, down } => {
                self.kill(*sidecar);
                tokio::time::sleep(*down).await;
                self.start(*sidecar).await;
            }
            Event::KillHolder { collection, down } => {
                self.upstream.slow_next(collection, Duration::from_secs(3));
                let deadline = Instant::now() + Duration::from_secs(30);
                let victim = loop {
                    if let Some(s) = self.upstream.in_flight(collection)
                        && self.procs[s].running()
                    {
                        break Some(s);
                    }
                    if Instant::now() > deadline {
                        break None;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                let Some(victim) = victim else {
                    self.note(format!("  no call of {collection} within 30 s: skipped"));
                    return;
                };
                // Let the call be well under way (the upstream answers after 3 s).
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.kill(victim);
                self.note(format!("  killed sidecar {victim} mid-call"));
                tokio::time::sleep(*down).await;
                self.start(victim).await;
            }
            Event::DbCut { length } => self.outage(true, *length).await,
            Event::DbBlackhole { length } => self.outage(false, *length).await,
            Event::DbRestart => {
                let from = now_ms();
                let n: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE datname = current_database() AND pid <> pg_backend_pid()
                        AND application_name = 'token-broker'",
                )
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
                self.outages.push(Window {
                    from,
                    to: Some(now_ms() + 1_000),
                });
                self.upstream.set_outages(&self.outages);
                self.note(format!("  terminated {} sessions", n.len()));
            }
            Event::KeyRotation => {
                let next = key_steps(self.key_step + 1);
                let dropped: Vec<String> = key_steps(self.key_step)
                    .iter()
                    .map(|k| key_id(k).to_owned())
                    .filter(|k| !next.iter().any(|n| key_id(n) == k))
                    .collect();
                for k in &dropped {
                    let still: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM token_broker_tokens
                          WHERE value_key = $1 OR refresh_token_key = $1",
                    )
                    .bind(k)
                    .fetch_one(&self.pool)
                    .await
                    .unwrap_or(1);
                    if still > 0 {
                        self.note(format!(
                            "  {still} row(s) still use {k}: dropping it deferred"
                        ));
                        return;
                    }
                }
                self.key_step += 1;
                let env = self.keys.env(&next);
                self.note(format!("  keys now {next:?}, one sidecar at a time"));
                for c in COLLECTIONS {
                    *self.extra.entry(c.0.to_owned()).or_default() += 1;
                }
                for i in 0..self.procs.len() {
                    if !self.procs[i].running() {
                        self.procs[i].set_env("TB_ENCRYPTION_KEY", &env);
                        continue;
                    }
                    self.stop(i).await;
                    self.procs[i].set_env("TB_ENCRYPTION_KEY", &env);
                    self.start(i).await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
            Event::Snapshot { collection } => {
                let r = async {
                    sqlx::query(
                        "CREATE TABLE IF NOT EXISTS chaos_snapshot
                           AS SELECT * FROM token_broker_tokens WITH NO DATA",
                    )
                    .execute(&self.pool)
                    .await?;
                    sqlx::query("DELETE FROM chaos_snapshot WHERE collection = $1")
                        .bind(collection)
                        .execute(&self.pool)
                        .await?;
                    sqlx::query_scalar::<_, i64>(
                        "WITH s AS (INSERT INTO chaos_snapshot
                           SELECT * FROM token_broker_tokens WHERE collection = $1 RETURNING version)
                         SELECT version FROM s",
                    )
                    .bind(collection)
                    .fetch_optional(&self.pool)
                    .await
                }
                .await;
                self.note(format!(
                    "  saved version {:?}",
                    r.map_err(|e| e.to_string())
                ));
            }
            Event::Rollback { collection, notify } => {
                let r = sqlx::query_scalar::<_, i64>(
                    "UPDATE token_broker_tokens t
                        SET version = s.version, value = s.value, value_key = s.value_key,
                            fetched_at = s.fetched_at, expires_at = s.expires_at,
                            refresh_at = s.refresh_at, updated_at = now()
                       FROM chaos_snapshot s
                      WHERE t.collection = s.collection AND t.collection = $1
                  RETURNING t.version",
                )
                .bind(collection)
                .fetch_optional(&self.pool)
                .await;
                let version = r.ok().flatten();
                if let (Some(v), true) = (version, notify) {
                    let _ = sqlx::query("SELECT pg_notify('token_broker', $1)")
                        .bind(format!("{collection}:{v}"))
                        .execute(&self.pool)
                        .await;
                }
                *self.extra.entry((*collection).to_owned()).or_default() += 1;
                self.note(format!("  row {collection} now at version {version:?}"));
            }
            Event::ClockOffset { sidecar } => {
                if proc::libfaketime().is_none() {
                    self.note(
                        "  !!! faketime is not installed (apt-get install faketime): \
                         clock offset SKIPPED"
                            .to_owned(),
                    );
                    return;
                }
                self.stop(*sidecar).await;
                self.procs[*sidecar].clock_offset = Some(self.clock_offset.clone());
                self.note(format!("  FAKETIME={} (libfaketime)", self.clock_offset));
                self.start(*sidecar).await;
            }
        }
    }
}

/// Runs one chaos run and judges it.
pub async fn run(cfg: &ChaosConfig) -> Outcome {
    let events = schedule(cfg.seed, cfg.duration, cfg.sidecars);
    eprintln!(
        "chaos: seed {} duration {:?} sidecars {}; {} events scheduled:",
        cfg.seed,
        cfg.duration,
        cfg.sidecars,
        events.len()
    );
    for (at, e) in &events {
        eprintln!("chaos:   at {:6.1}s  {e}", at.as_secs_f64());
    }
    if proc::libfaketime().is_none() {
        eprintln!("chaos: !!! faketime is not installed: clock offset events will be SKIPPED");
    }
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let proxy = FaultProxy::start(db.server_addr()).await;
    let endpoints: Vec<(&str, Endpoint)> = COLLECTIONS
        .iter()
        .map(|(name, kind, ttl)| {
            (
                *name,
                Endpoint {
                    kind: kind.clone(),
                    ttl_secs: *ttl,
                },
            )
        })
        .collect();
    let upstream = Upstream::start(cfg.seed, cfg.faults.clone(), &endpoints).await;
    let dir = tempfile::Builder::new()
        .prefix("tb-chaos-")
        .tempdir()
        .unwrap();
    let mut keys = Keys(HashMap::new());
    let env = vec![
        ("TB_DATABASE_URL".to_owned(), db.url_via(proxy.addr())),
        ("TB_ENCRYPTION_KEY".to_owned(), keys.env(&key_steps(0))),
        (
            "TB_CLIENT_SECRET".to_owned(),
            crate::support::random_secret("chaos"),
        ),
        (
            "TB_REFRESH_TOKEN".to_owned(),
            upstream.seed_refresh_token("rt"),
        ),
    ];
    let procs = (0..cfg.sidecars)
        .map(|i| {
            Proc::new(
                i,
                dir.path(),
                &config(&upstream.base_url(), i, &cfg.extra_policy),
                env.clone(),
            )
        })
        .collect();
    let mut d = Driver {
        procs,
        up: vec![Vec::new(); cfg.sidecars],
        outages: Vec::new(),
        kills: Vec::new(),
        extra: HashMap::new(),
        log: Vec::new(),
        started: Instant::now(),
        keys,
        key_step: 0,
        upstream: upstream.clone(),
        clock_offset: cfg.clock_offset.clone(),
        proxy,
        pool,
    };
    for i in 0..cfg.sidecars {
        d.start(i).await;
    }
    d.started = Instant::now();
    let run_start = now_ms();
    let rec = Arc::new(Recorder::default());
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..cfg.sidecars {
        for (n, (c, _, _)) in COLLECTIONS.iter().enumerate() {
            let sock = d.procs[i].sock();
            tasks.push(caller(
                i,
                sock.clone(),
                (*c).to_owned(),
                rec.clone(),
                stop.clone(),
            ));
            let id = i * COLLECTIONS.len() + n;
            tasks.push(watcher(
                id,
                i,
                sock,
                (*c).to_owned(),
                rec.clone(),
                stop.clone(),
            ));
        }
    }
    for (at, event) in &events {
        tokio::time::sleep_until(d.started + *at).await;
        let kind = event.kind();
        if cfg
            .only
            .as_ref()
            .is_some_and(|only| kind != "snapshot" && !only.iter().any(|k| k == kind))
        {
            d.note(format!("{event}: skipped (not in --only)"));
            continue;
        }
        d.note(format!("{event}"));
        d.apply(event).await;
    }
    tokio::time::sleep_until(d.started + cfg.duration).await;
    d.note("end: stopping clients".to_owned());
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let end = now_ms();
    for i in 0..cfg.sidecars {
        d.close(i, end);
    }
    let history = History {
        start: run_start,
        end,
        sidecars: cfg.sidecars,
        received: std::mem::take(&mut *rec.received.lock().unwrap()),
        failed: std::mem::take(&mut *rec.failed.lock().unwrap()),
        calls: upstream.calls(),
        up: d.up.clone(),
        outages: d.outages.clone(),
        kills: d.kills.clone(),
        extra_calls: d.extra.clone(),
    };
    for p in &mut d.procs {
        p.kill9();
    }
    let violations = history::check(&history);
    for (c, _, _) in COLLECTIONS {
        if upstream.revoked(c) {
            d.note(format!(
                "the upstream revoked the {c} grant (a spent refresh token came back)"
            ));
        }
    }
    Outcome {
        history,
        events: d.log.clone(),
        violations,
        dir,
    }
}

/// Prints the run's summary and verdict; on failure keeps the sidecars' logs
/// and panics naming the first violation.
pub fn report(cfg: &ChaosConfig, out: Outcome) {
    let h = &out.history;
    eprintln!(
        "chaos: seed {}: {} tokens received, {} failed reads, {} upstream calls, {} kills, {} outages",
        cfg.seed,
        h.received.len(),
        h.failed.len(),
        h.calls.len(),
        h.kills.len(),
        h.outages.len()
    );
    eprintln!("chaos: {}", history::failed_summary(h));
    eprintln!("chaos: events executed:");
    for e in &out.events {
        eprintln!("chaos:   {e}");
    }
    let verdict = history::verdict(&out.violations);
    eprintln!("chaos: seed {} verdict: {verdict}", cfg.seed);
    if !out.violations.is_empty() {
        let kept = out.dir.keep();
        eprintln!("chaos: sidecar logs kept in {}", kept.display());
        panic!(
            "chaos run with seed {} failed (replay: scripts/chaos --seed {} --duration {}s --sidecars {}): {verdict}",
            cfg.seed,
            cfg.seed,
            cfg.duration.as_secs(),
            cfg.sidecars
        );
    }
}

#[test]
fn the_same_seed_draws_the_same_schedule() {
    let a = schedule(7, Duration::from_secs(600), 3);
    assert_eq!(a, schedule(7, Duration::from_secs(600), 3));
    assert_ne!(a, schedule(8, Duration::from_secs(600), 3));
    assert!(a.len() > 50, "{}", a.len());
    assert_eq!(key_steps(0), ["k1"]);
    assert_eq!(key_steps(1), ["k1", "k2:decrypt-only"]);
    assert_eq!(key_steps(2), ["k2", "k1"]);
    assert_eq!(key_steps(3), ["k2"]);
    assert_eq!(key_steps(4), ["k2", "k3:decrypt-only"]);
    assert_eq!(key_steps(6), ["k3"]);
    let mut keys = Keys(HashMap::new());
    let env = keys.env(&key_steps(1));
    // Not printed: it holds key material.
    assert!(env.starts_with("k1:") && env.ends_with(":decrypt-only"));
    assert_eq!(env.matches(' ').count(), 1);
}

/// About a minute with seed 1, with every `scripts/test` (and so CI). It
/// fails on the code before the issue 11 fix (c5889a1) and on the two
/// intermediate states docs/chaos.md ("What it found") describes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_seeded_chaos_run() {
    let cfg = ChaosConfig::new(1, Duration::from_secs(60), 3);
    let out = run(&cfg).await;
    report(&cfg, out);
}

/// `scripts/chaos --seed N --duration 10m [--sidecars 3]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long; run by scripts/chaos"]
async fn chaos_run_from_env() {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let seed = var("CHAOS_SEED").map_or(1, |s| s.parse().expect("CHAOS_SEED: a number"));
    let duration = var("CHAOS_DURATION").map_or(Duration::from_secs(600), |s| {
        humantime::parse_duration(&s).expect("CHAOS_DURATION: e.g. 10m")
    });
    let sidecars = var("CHAOS_SIDECARS").map_or(3, |s| s.parse().expect("CHAOS_SIDECARS"));
    let mut cfg = ChaosConfig::new(seed, duration, sidecars);
    cfg.extra_policy = var("CHAOS_EXTRA_POLICY").unwrap_or_default();
    cfg.only = var("CHAOS_ONLY").map(|s| s.split(',').map(|k| k.trim().to_owned()).collect());
    if let Some(offset) = var("CHAOS_CLOCK_OFFSET") {
        cfg.clock_offset = offset;
    }
    let out = run(&cfg).await;
    report(&cfg, out);
}
