//! Fault tests on a fleet of real `token-broker` processes sharing one Postgres
//! database: the lease holder killed mid-call (a peer takes over once its
//! lease expires, at most one extra upstream call), the database cut and then
//! black-holed under read traffic (no read fails, every stream stays in version
//! order with one value per version, every sidecar converges after the
//! database returns), and every listener backend killed just before a
//! rotation (the rotation still reaches every sidecar, through the resync that
//! follows a reconnect). Each test prints what it measured. The outage test
//! also checks that a locally fetched token's `fetched_at` is when it was
//! fetched (not when the store call that failed before it began).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::json;
use sqlx::PgPool;
use token_broker::grpc::pb::{self, InvalidateTokenRequest};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::support::fault_proxy::FaultProxy;
use crate::support::fleet::{FleetEnv, Sidecar, fleet_config};
use crate::support::get;
use crate::support::load::{
    Readers, Seen, assert_in_order, assert_one_value_per_version, watch_each,
};
use crate::support::postgres::TestDb;
use crate::support::upstream::{OAuthConfig, OAuthServer, Reply};

type Client = pb::token_broker_client::TokenBrokerClient<Channel>;
type Record = Arc<Mutex<Vec<Seen>>>;

/// Polls `cond` every 20 ms until it holds; panics with `what` after `within`.
async fn eventually(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn lease_holder(pool: &PgPool) -> Option<String> {
    sqlx::query_scalar("SELECT lease_holder FROM token_broker_tokens WHERE collection = 'api'")
        .fetch_optional(pool)
        .await
        .unwrap()
        .flatten()
}

async fn row_version(pool: &PgPool) -> u64 {
    let v: Option<i64> =
        sqlx::query_scalar("SELECT version FROM token_broker_tokens WHERE collection = 'api'")
            .fetch_optional(pool)
            .await
            .unwrap();
    v.map_or(0, |v| u64::try_from(v).unwrap())
}

/// Invariant 4 for one stream: versions strictly increase. A gap is allowed
/// (the contract owes "the latest one after a gap": a token fetched while the
/// database is away takes a version a random distance above the next, and a
/// reconcile may commit a peer's); returns the gaps as `(from, to)`.
fn assert_increasing(seen: &[Seen], label: &str) -> Vec<(u64, u64)> {
    let versions: Vec<u64> = seen.iter().map(|s| s.version).collect();
    let mut gaps = Vec::new();
    for pair in versions.windows(2) {
        assert!(
            pair[1] > pair[0],
            "{label}: versions not strictly increasing: {versions:?}"
        );
        if pair[1] > pair[0] + 1 {
            gaps.push((pair[0], pair[1]));
        }
    }
    gaps
}

/// Secrets stay secret: neither the client secret nor any issued token is in
/// the sidecar's log.
fn assert_log_clean(sidecar: &Sidecar, env: &FleetEnv, issued: &[String]) {
    let log = sidecar.log();
    assert!(log.contains("token_broker"), "the sidecar logged nothing");
    assert!(
        !log.contains(&env.client_secret),
        "the client secret is in a log"
    );
    assert!(
        issued.iter().all(|t| !log.contains(t.as_str())),
        "a token is in a log"
    );
}

fn first_seen(w: &Record) -> Option<Seen> {
    w.lock().unwrap().first().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_lease_holder_mid_call_costs_at_most_one_extra_upstream_call() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let env = FleetEnv::new(db.url.clone());
    let oauth = OAuthServer::start(OAuthConfig::new("fleet", &env.client_secret)).await;
    // The first token request hangs (the holder is killed during it); later
    // ones get real tokens.
    oauth.script([Reply::json(
        200,
        json!({"access_token": "never-delivered", "token_type": "bearer", "expires_in": 3600}),
    )
    .delayed(Duration::from_secs(60))]);
    // The fetch may take up to 10 s; the lease (3 s) is renewed meanwhile.
    // Readers may wait longer than the default 10 s request cap.
    let config = format!(
        "{}\n[server]\nrequest_timeout = \"30s\"\n",
        fleet_config(&oauth.token_url(), r#", fetch_timeout = "10s""#)
    );
    let mut sidecars = env.start_fleet(&config, 3).await;
    let watchers: Vec<_> = watch_each(&sidecars, 1)
        .await
        .into_iter()
        .map(|(_, w)| w)
        .collect();

    // The lease holder is the sidecar whose pid ends the row's lease_holder,
    // once its (hanging) request reached the upstream.
    let mut holder = None;
    eventually(
        "a sidecar holds the lease and called the upstream",
        Duration::from_secs(10),
        async || {
            holder = lease_holder(&pool).await;
            holder.is_some() && oauth.calls() >= 1
        },
    )
    .await;
    let holder = holder.unwrap();
    let victim = sidecars
        .iter()
        .position(|s| holder.contains(&format!("/{}/", s.pid())))
        .unwrap_or_else(|| panic!("lease holder {holder} is none of the sidecars"));
    // The lease is short (3 s) and renewed while the call is pending: after
    // more than one lease TTL it is still the holder's, and nobody else
    // called the upstream.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        lease_holder(&pool).await.as_deref(),
        Some(holder.as_str()),
        "the holder renewed its lease past one TTL"
    );
    let lease_left: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM lease_until - clock_timestamp())::float8
           FROM token_broker_tokens WHERE collection = 'api'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(oauth.calls(), 1, "only the holder called the upstream");
    assert!(
        lease_left > 0.0 && lease_left <= 3.1,
        "the holder's renewed lease lives at most one TTL (3 s): {lease_left:.2}s left"
    );

    sidecars[victim].kill9();
    let killed_at = Instant::now();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();

    // What a reader sees meanwhile: one with a long deadline, one with 2 s.
    let mut patient = sidecars[survivors[0]].client().await;
    let long_get = tokio::spawn(async move {
        let r = get(&mut patient, "api", Duration::from_secs(25)).await;
        (r, killed_at.elapsed())
    });
    let mut hasty = sidecars[survivors[1]].client().await;
    let short_get = get(&mut hasty, "api", Duration::from_secs(2)).await;
    let short_after = killed_at.elapsed();

    // A survivor takes over after the lease expires and both serve version 1.
    eventually(
        "every survivor's watcher sees version 1",
        Duration::from_secs(20),
        async || {
            survivors
                .iter()
                .all(|i| first_seen(&watchers[*i]).is_some())
        },
    )
    .await;
    let (long_result, long_after) = long_get.await.unwrap();
    let long_token = long_result.expect("a Get with a long deadline succeeds after the takeover");
    assert_eq!(long_token.version, 1);
    let mut served = Vec::new();
    for i in &survivors {
        let mut c = sidecars[*i].client().await;
        let t = get(&mut c, "api", Duration::from_secs(5)).await.unwrap();
        assert_eq!(t.version, 1, "sidecar {i} serves version 1");
        served.push(Seen {
            version: t.version,
            value: t.value,
            at: Instant::now(),
        });
    }
    let mut all = served;
    for i in &survivors {
        let w = watchers[*i].lock().unwrap();
        assert_eq!(w[0].version, 1, "sidecar {i}'s watcher starts at version 1");
        all.extend(w.iter().cloned());
    }
    assert_one_value_per_version(&all);
    let issued = oauth.issued();
    assert!(all.iter().all(|s| issued.contains(&s.value)));
    assert_eq!(
        row_version(&pool).await,
        1,
        "the dead holder's fetch never committed"
    );

    let takeover: Vec<(usize, Duration)> = survivors
        .iter()
        .map(|i| (*i, first_seen(&watchers[*i]).unwrap().at - killed_at))
        .collect();
    // Not before the lease ran out (it is exclusive), and soon after: peers
    // re-read a held row at least every 2 s.
    for (i, t) in &takeover {
        let t = t.as_secs_f64();
        assert!(
            t > lease_left - 0.5 && t < lease_left + 3.0,
            "sidecar {i} got version 1 {t:.2}s after the kill, with {lease_left:.2}s of lease left"
        );
    }
    eprintln!(
        "lease holder: sidecar {victim} ({holder}), killed with {lease_left:.2}s of lease left"
    );
    eprintln!("takeover, kill -> version 1 on each survivor's watcher: {takeover:?}");
    eprintln!(
        "Get during the wait: deadline 25s -> version {} after {long_after:?}; deadline 2s -> {} after {short_after:?}",
        long_token.version,
        match &short_get {
            Ok(t) => format!("version {}", t.version),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        }
    );
    eprintln!(
        "upstream token requests: {} (successful grants {})",
        oauth.calls(),
        oauth.grants("client_credentials")
    );
    assert!(
        oauth.calls() <= 2,
        "at most one extra upstream call: {}",
        oauth.calls()
    );
    assert_eq!(oauth.grants("client_credentials"), 1);
    // No token existed before the takeover: a short deadline ends in
    // DEADLINE_EXCEEDED, not in a made-up token or another error.
    assert_eq!(
        short_get.as_ref().map_err(tonic::Status::code).err(),
        Some(tonic::Code::DeadlineExceeded),
        "a 2 s Get during the wait: {short_get:?}"
    );
    for i in &survivors {
        assert_log_clean(&sidecars[*i], &env, &issued);
    }
}

/// One outage: what the clients saw is checked at the end; this is what the
/// phase itself measured.
struct Outage {
    /// From the fault to convergence.
    window: (Instant, Instant),
    upstream_calls: usize,
    local_rotations: Vec<usize>,
    convergence: Duration,
    converged_at: u64,
}

/// Counts, per sidecar, the local rotations logged so far.
fn local_rotations(sidecars: &[Sidecar]) -> Vec<usize> {
    sidecars
        .iter()
        .map(|s| s.log().matches("token rotated locally").count())
        .collect()
}

/// Applies `fault` for `length`, restores, and measures how long until every
/// sidecar serves the same version and value as one another and the row.
async fn outage(
    proxy: &FaultProxy,
    fault: fn(&FaultProxy),
    length: Duration,
    sidecars: &[Sidecar],
    probes: &mut [Client],
    pool: &PgPool,
    oauth: &OAuthServer,
) -> Outage {
    let calls_before = oauth.calls();
    let rotations_before = local_rotations(sidecars);
    let fault_at = Instant::now();
    fault(proxy);
    tokio::time::sleep(length).await;
    proxy.restore();
    let restored_at = Instant::now();
    let upstream_calls = oauth.calls() - calls_before;
    let local_rotations: Vec<usize> = local_rotations(sidecars)
        .iter()
        .zip(&rotations_before)
        .map(|(after, before)| after - before)
        .collect();
    let mut converged_at = 0;
    eventually(
        "every sidecar serves the row's version with one value",
        Duration::from_secs(10),
        async || {
            let mut served = Vec::new();
            for p in probes.iter_mut() {
                let t = get(p, "api", Duration::from_secs(5)).await.unwrap();
                served.push((t.version, t.value));
            }
            converged_at = served[0].0;
            served.iter().all(|s| *s == served[0]) && row_version(pool).await == served[0].0
        },
    )
    .await;
    Outage {
        window: (fault_at, Instant::now()),
        upstream_calls,
        local_rotations,
        convergence: restored_at.elapsed(),
        converged_at,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_outage_during_traffic_loses_no_read_and_converges() {
    const SIDECARS: usize = 3;
    const CLIENTS: usize = 60;
    const WATCHERS_PER_SIDECAR: usize = 2;
    const OUTAGE: Duration = Duration::from_secs(6);
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let proxy = FaultProxy::start(db.server_addr()).await;
    let env = FleetEnv::new(db.url_via(proxy.addr()));
    let oauth = OAuthServer::start(OAuthConfig {
        expires_in: Some(3),
        ..OAuthConfig::new("fleet", &env.client_secret)
    })
    .await;
    let config = fleet_config(&oauth.token_url(), "");
    let sidecars = Arc::new(env.start_fleet(&config, SIDECARS).await);
    let watchers = watch_each(&sidecars, WATCHERS_PER_SIDECAR).await;

    // Clients, each on its own connection, reading in a loop; every read
    // is recorded with the sidecar it came from.
    let readers = Readers::start(&sidecars, CLIENTS);
    let mut probes = Vec::new();
    for s in sidecars.iter() {
        probes.push(s.client().await);
    }

    eventually(
        "version 2 on every watcher",
        Duration::from_secs(15),
        async || {
            watchers
                .iter()
                .all(|(_, w)| w.lock().unwrap().last().is_some_and(|s| s.version >= 2))
        },
    )
    .await;
    let cut = outage(
        &proxy,
        FaultProxy::cut,
        OUTAGE,
        &sidecars,
        &mut probes,
        &pool,
        &oauth,
    )
    .await;
    // A little normal traffic (and a shared rotation) in between.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let blackhole = outage(
        &proxy,
        FaultProxy::blackhole,
        OUTAGE,
        &sidecars,
        &mut probes,
        &pool,
        &oauth,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (reads, failures) = readers.stop().await;

    for (name, o) in [("cut", &cut), ("blackhole", &blackhole)] {
        let during: Vec<Duration> = reads
            .iter()
            .filter(|r| r.seen.at >= o.window.0 && r.seen.at <= o.window.1)
            .map(|r| r.latency)
            .collect();
        eprintln!(
            "{name} for {OUTAGE:?}: {} upstream calls during the outage, local rotations per sidecar {:?}; \
             all sidecars on version {} (same value, = row) {:?} after restore; \
             {} reads from fault to convergence, max latency {:?}, {} over 200 ms",
            o.upstream_calls,
            o.local_rotations,
            o.converged_at,
            o.convergence,
            during.len(),
            during.iter().max().unwrap(),
            during
                .iter()
                .filter(|d| **d > Duration::from_millis(200))
                .count()
        );
    }
    let mut latencies: Vec<Duration> = reads.iter().map(|r| r.latency).collect();
    latencies.sort();
    let slow = latencies
        .iter()
        .filter(|d| **d > Duration::from_millis(200))
        .count();
    eprintln!(
        "{} reads in all, {} failed; latency p50 {:?}, max {:?}, {slow} over 200 ms",
        reads.len(),
        failures,
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
    // fetched_at is "when the upstream issued this value (as observed by the
    // broker)": the first read of a value comes a fetch, a commit and a
    // publish after it, never a store timeout later.
    let mut first_read: HashMap<&str, (SystemTime, SystemTime, Instant)> = HashMap::new();
    for r in reads.iter() {
        let e = first_read.entry(r.seen.value.as_str()).or_insert((
            r.fetched_at,
            r.received,
            r.seen.at,
        ));
        if r.received < e.1 {
            *e = (r.fetched_at, r.received, r.seen.at);
        }
    }
    let lag = |(from, to): (Instant, Instant)| {
        first_read
            .values()
            .filter(|(_, _, at)| *at >= from && *at <= to)
            .map(|(fetched, received, _)| received.duration_since(*fetched).unwrap_or_default())
            .max()
            .unwrap_or_default()
    };
    // From the first fault on: the first token was fetched before the
    // clients started reading.
    let since_first_fault = (cut.window.0, Instant::now());
    eprintln!(
        "first read of a value - its fetched_at, max: cut {:?}, blackhole {:?}, since the first fault {:?}",
        lag(cut.window),
        lag(blackhole.window),
        lag(since_first_fault)
    );
    eprintln!(
        "upstream: {} calls, {} grants",
        oauth.calls(),
        oauth.grants("client_credentials")
    );

    for (name, o) in [("cut", &cut), ("blackhole", &blackhole)] {
        assert!(
            o.local_rotations.iter().all(|n| *n >= 1),
            "{name}: every sidecar refreshed locally at least once: {:?}",
            o.local_rotations
        );
    }
    assert_eq!(failures, 0, "failed reads");
    assert!(reads.len() > CLIENTS * 50, "too few reads: {}", reads.len());

    // Per stream: strictly increasing versions. Across the fleet (watchers and
    // clients' reads together): one value per version.
    let mut per_sidecar: HashMap<usize, Vec<Seen>> = HashMap::new();
    for (i, w) in &watchers {
        let w = w.lock().unwrap();
        let gaps = assert_increasing(&w, &format!("watcher on sidecar {i}"));
        eprintln!(
            "watcher on sidecar {i}: versions {}..={}, gaps {gaps:?}",
            w[0].version,
            w.last().unwrap().version
        );
        per_sidecar.entry(*i).or_default().extend(w.iter().cloned());
    }
    for r in reads.iter() {
        per_sidecar
            .entry(r.sidecar)
            .or_default()
            .push(r.seen.clone());
    }
    let issued = oauth.issued();
    // One value per version across the whole fleet, even for tokens fetched
    // locally by several sidecars through the same outage.
    assert_one_value_per_version(per_sidecar.values().flatten());
    for (i, seen) in &per_sidecar {
        assert!(
            seen.iter().all(|s| issued.contains(&s.value)),
            "sidecar {i} served a value the upstream never issued"
        );
    }
    for s in sidecars.iter() {
        assert_log_clean(s, &env, &issued);
    }
    // Last, as it names a known bug: a token fetched locally because the
    // store timed out is stamped with the time the store call began.
    assert!(
        lag(since_first_fault) < Duration::from_millis(500),
        "a token was first read {:?} after its fetched_at: fetched_at predates the fetch \
         (blackhole {:?}, cut {:?})",
        lag(since_first_fault),
        lag(blackhole.window),
        lag(cut.window)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_listener_backend_before_a_rotation_still_reaches_every_sidecar() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let env = FleetEnv::new(db.url.clone());
    let oauth = OAuthServer::start(OAuthConfig::new("fleet", &env.client_secret)).await;
    let config = fleet_config(&oauth.token_url(), "");
    let sidecars = env.start_fleet(&config, 3).await;
    let watchers: Vec<_> = watch_each(&sidecars, 1)
        .await
        .into_iter()
        .map(|(_, w)| w)
        .collect();
    eventually(
        "version 1 on every sidecar",
        Duration::from_secs(10),
        async || watchers.iter().all(|w| first_seen(w).is_some()),
    )
    .await;
    // Past the minimum refresh interval (1 s), so the forced rotation starts
    // at once and its NOTIFY lands while the listeners reconnect.
    let v1_at = first_seen(&watchers[0]).unwrap().at;
    tokio::time::sleep_until(v1_at + Duration::from_millis(1500)).await;
    let mut client = sidecars[0].client().await;

    // The listener backends, named apart from the pool's connections.
    macro_rules! listeners {
        () => {
            "FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()
                AND application_name LIKE 'token-broker listener %'"
        };
    }
    let count = |pool: &PgPool| {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(concat!("SELECT count(*) ", listeners!()))
                .fetch_one(&pool)
                .await
                .unwrap();
            n
        }
    };
    eventually(
        "three listener backends",
        Duration::from_secs(5),
        async || count(&pool).await == 3,
    )
    .await;
    let killed: Vec<bool> =
        sqlx::query_scalar(concat!("SELECT pg_terminate_backend(pid) ", listeners!()))
            .fetch_all(&pool)
            .await
            .unwrap();
    let invalidated_at = Instant::now();
    let mut req = tonic::Request::new(InvalidateTokenRequest {
        collection: "api".to_owned(),
        version: 1,
        value: String::new(),
        reason: "fault test: 401".to_owned(),
    });
    req.set_timeout(Duration::from_secs(5));
    let resp = client.invalidate_token(req).await.unwrap().into_inner();
    let answered = invalidated_at.elapsed();
    assert_eq!(
        killed.iter().filter(|k| **k).count(),
        3,
        "killed every listener"
    );
    assert!(resp.refreshed);
    assert_eq!(resp.token.as_ref().unwrap().version, 2);

    eventually(
        "version 2 on every sidecar's watcher",
        Duration::from_secs(5),
        async || {
            watchers
                .iter()
                .all(|w| w.lock().unwrap().iter().any(|s| s.version == 2))
        },
    )
    .await;
    let delays: Vec<Duration> = watchers
        .iter()
        .map(|w| {
            let w = w.lock().unwrap();
            w.iter().find(|s| s.version == 2).unwrap().at - invalidated_at
        })
        .collect();
    let reconnected = {
        let deadline = Instant::now() + Duration::from_secs(5);
        while count(&pool).await < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        count(&pool).await
    };
    eprintln!(
        "listener backends killed: {}; InvalidateToken answered after {answered:?}; \
         version 2 on each sidecar's watcher after {delays:?} (sidecar 0 rotated); \
         listener backends afterwards: {reconnected}",
        killed.len()
    );
    assert!(delays.iter().all(|d| *d < Duration::from_secs(5)));
    assert_eq!(
        oauth.grants("client_credentials"),
        2,
        "one upstream call per rotation"
    );
    let mut all = Vec::new();
    for (i, w) in watchers.iter().enumerate() {
        let w = w.lock().unwrap();
        assert_in_order(&w, &format!("watcher on sidecar {i}"));
        all.extend(w.iter().cloned());
    }
    assert_one_value_per_version(&all);
    let issued = oauth.issued();
    for s in &sidecars {
        assert_log_clean(s, &env, &issued);
    }
}

/// A graceful stop (SIGTERM, e.g. a rolling update) during an upstream call
/// lets the refresh finish and commit: the token (and with a rotating grant,
/// the refresh token the upstream already spent the old one for) reaches
/// the store instead of dying with the process. Found by the chaos run
/// (seed 11, 10 minutes): a key-rotation restart cut a rotating grant's
/// commit and the next holder reused the spent refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_lets_the_refresh_in_flight_commit() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let env = FleetEnv::new(db.url.clone());
    // The stop arrives while the first token request is in flight.
    let (oauth, sidecar) = in_a_slow_first_fetch(&env).await;
    assert_eq!(row_version(&pool).await, 0, "nothing committed yet");
    let log = sidecar.stop();
    assert_eq!(
        row_version(&pool).await,
        1,
        "the refresh in flight committed before the process exited:\n{log}"
    );
    assert_eq!(oauth.calls(), 1);
}

/// One sidecar of `env` whose first token request takes 2 s, returned once
/// that request is in flight.
async fn in_a_slow_first_fetch(env: &FleetEnv) -> (Arc<OAuthServer>, Sidecar) {
    let oauth = OAuthServer::start(OAuthConfig::new("fleet", &env.client_secret)).await;
    oauth.script([Reply::json(
        200,
        json!({"access_token": "slow-token", "token_type": "bearer", "expires_in": 3600}),
    )
    .delayed(Duration::from_secs(2))]);
    let sidecar = env
        .start(&fleet_config(
            &oauth.token_url(),
            r#", fetch_timeout = "10s""#,
        ))
        .await;
    eventually(
        "the sidecar called the upstream",
        Duration::from_secs(10),
        async || oauth.calls() >= 1,
    )
    .await;
    (oauth, sidecar)
}

/// Chaos seed 11 (10 min): a refresh's commit timed out (the database was
/// away), so its token, with a rotated refresh token that existed nowhere
/// else, was kept unshared; a rolling restart stopped the sidecar before it
/// reconciled, and the next holder presented the spent refresh token again.
/// A graceful stop now commits an unshared token first, retrying within the
/// shutdown grace while the database comes back.
#[tokio::test]
async fn a_graceful_stop_commits_a_token_kept_while_the_database_was_away() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let proxy = FaultProxy::start(db.server_addr()).await;
    let env = FleetEnv::new(db.url_via(proxy.addr()));
    // The database goes away while the first token request is in flight.
    let (oauth, sidecar) = in_a_slow_first_fetch(&env).await;
    proxy.blackhole();
    eventually(
        "the commit gave up and the token is served from memory",
        Duration::from_secs(10),
        async || sidecar.log().contains("keeping it locally"),
    )
    .await;
    assert_eq!(row_version(&pool).await, 0, "nothing committed yet");
    // Stop while the database is away; it comes back within the grace.
    let stopping = tokio::task::spawn_blocking(move || sidecar.stop());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.restore();
    let log = stopping.await.unwrap();
    // Its version is the one it was published under (a random step up).
    assert!(
        row_version(&pool).await >= 1,
        "the token kept unshared was committed before the process exited:\n{log}"
    );
    assert!(log.contains("token held locally is now shared"), "{log}");
    assert_eq!(oauth.calls(), 1);
}

/// Chaos seed 18 (10 min): a sidecar restarted while the database was away
/// fetched its own token (a random, lower version); when the database came
/// back it dropped that fresh token for the row's higher version, which
/// expired a second later, and its reads failed until the next refresh. A
/// servable unshared token that outlives a newer row token is now committed
/// above it instead: no read gets the short-lived row token, and no second
/// upstream call is made.
#[tokio::test]
async fn a_fresh_local_token_outlives_a_newer_row_token_about_to_expire() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let proxy = FaultProxy::start(db.server_addr()).await;
    let secret = crate::support::random_secret("fleet-secret");
    let oauth = OAuthServer::start(OAuthConfig::new("fleet", &secret)).await;
    // The schema is in place; the sidecar starts with its database cut off.
    token_broker::store::PgStore::migrate(&token_broker::store::PgSettings {
        url: token_broker::token::Secret::new(db.url.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    proxy.cut();
    let config = format!(
        r#"
[store]
database_url_env = "TB_DATABASE_URL"
heartbeat_interval = "1s"
query_timeout = "1s"
connect_timeout = "1s"
poll_interval = "5s"

[collections.api]
prefetch = true
source = {{ kind = "oauth2_client_credentials", token_url = "{}", client_id = "fleet", client_secret_env = "TB_CLIENT_SECRET" }}
policy = {{ min_refresh_interval = "1s" }}
"#,
        oauth.token_url()
    );
    let url = db.url_via(proxy.addr());
    let sidecar = Sidecar::start_logging(
        &config,
        &[("TB_DATABASE_URL", &url), ("TB_CLIENT_SECRET", &secret)],
        "info,token_broker=debug",
    )
    .await;
    let mut client = sidecar.client().await;
    let local = get(&mut client, "api", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        local.version < 1 << 21,
        "a local version: {}",
        local.version
    );
    // Meanwhile a peer's token, far higher in version, lives 4 s more.
    sqlx::query(
        "INSERT INTO token_broker_tokens
            (collection, version, value, fetched_at, expires_at, refresh_at, lease_fence)
         VALUES ('api', 1000000000000, 'row-token', now(), now() + interval '4 s',
                 now() + interval '2 s', 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO token_broker_versions (collection, max_version) VALUES ('api', 1000000000000)",
    )
    .execute(&pool)
    .await
    .unwrap();
    proxy.restore();
    // Reads through the reconnection and past the row token's expiry.
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let t = get(&mut client, "api", Duration::from_secs(3))
            .await
            .unwrap();
        assert_eq!(
            t.value,
            local.value,
            "version {}:\n{}",
            t.version,
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        row_version(&pool).await,
        1_000_000_000_001,
        "the local token was committed above the row:\n{}",
        sidecar.log()
    );
    assert_eq!(oauth.calls(), 1, "no second upstream call");
}

/// A database that takes connections but answers slowly at start-up (a fleet
/// started at once makes Postgres fork hundreds of backends) is waited for up
/// to `startup_timeout`, not taken for down: the new sidecar serves the shared
/// token, and the upstream is not asked again. Without the wait it would go
/// local after `connect_timeout` (1 s here) and fetch a token of its own.
#[tokio::test]
async fn a_slow_database_at_start_up_is_waited_for_not_taken_for_down() {
    let db = TestDb::create().await;
    let proxy = FaultProxy::start(db.server_addr()).await;
    let env = FleetEnv::new(db.url_via(proxy.addr()));
    let oauth = OAuthServer::start(OAuthConfig::new("fleet", &env.client_secret)).await;
    let config = fleet_config(&oauth.token_url(), "");
    let first = env.start(&config).await;
    let shared = get(&mut first.client().await, "api", Duration::from_secs(10))
        .await
        .unwrap();
    // A start-up storm: for 1.5 s, new sessions take 2.5 connect_timeouts to
    // start; the sidecar starts in it.
    proxy.delay_new(Duration::from_millis(2500));
    let (second, ()) = tokio::join!(env.start(&config), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.delay_new(Duration::ZERO);
    });
    let t = get(&mut second.client().await, "api", Duration::from_secs(10))
        .await
        .unwrap();
    let log = second.log();
    assert_eq!(
        (t.version, &t.value),
        (shared.version, &shared.value),
        "{log}"
    );
    assert_eq!(oauth.grants("client_credentials"), 1, "{log}");
    assert!(!log.contains("database unreachable"), "{log}");
    assert!(
        log.contains("waiting for it up to store.startup_timeout"),
        "{log}"
    );
}

/// A database that takes connections and never answers is down once
/// `startup_timeout` has passed: the sidecar then starts degraded and serves a
/// token of its own, as with a database that refuses connections.
#[tokio::test]
async fn a_database_that_never_answers_at_start_up_is_down_after_startup_timeout() {
    let db = TestDb::create().await;
    let proxy = FaultProxy::start(db.server_addr()).await;
    proxy.blackhole();
    let env = FleetEnv::new(db.url_via(proxy.addr()));
    let oauth = OAuthServer::start(OAuthConfig::new("fleet", &env.client_secret)).await;
    let config = fleet_config(&oauth.token_url(), "").replace(
        "connect_timeout = \"1s\"",
        "connect_timeout = \"1s\"\nstartup_timeout = \"2s\"",
    );
    let started = Instant::now();
    let sidecar = env.start(&config).await;
    let t = get(&mut sidecar.client().await, "api", Duration::from_secs(10))
        .await
        .unwrap();
    let waited = started.elapsed();
    let log = sidecar.log();
    assert!(t.version >= 1);
    assert_eq!(oauth.grants("client_credentials"), 1, "{log}");
    assert!(
        log.contains("waiting for it up to store.startup_timeout"),
        "{log}"
    );
    assert!(log.contains("database unreachable"), "{log}");
    assert!(
        waited >= Duration::from_secs(2),
        "served after {waited:?}, before startup_timeout"
    );
    println!("black-holed at start-up: served a local token after {waited:?}");
}
