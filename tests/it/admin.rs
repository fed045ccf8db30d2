//! The admin listener of the real binary: `/metrics` after real traffic (RPCs
//! by method and code, memory hits, refreshes by outcome and class, upstream
//! durations, expiry, version, open watch streams, leases, readiness), `/livez`,
//! `/readyz` naming what it waits for, gRPC health (readiness and `liveness`)
//! on the same port, and the database-degraded gauge and notification lag of
//! a fleet on Postgres.

use std::collections::HashMap;
use std::time::Duration;

use token_broker::grpc::pb::{
    GetCollectionTokenRequest, InvalidateTokenRequest, WatchTokenRequest,
};
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::binary::Served;

/// The samples of a Prometheus text exposition: `name{labels}` -> value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (series.to_owned(), value)
        })
        .collect()
}

async fn get_text(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn health(addr: std::net::SocketAddr, service: &str) -> Result<i32, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

const CONFIG: &str = r#"
[collections.a]
required = true
source = { kind = "demo", ttl = "1h" }
policy = { min_refresh_interval = "10ms" }

[collections.b]
prefetch = false
source = { kind = "demo", ttl = "1h" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_traffic_and_health_endpoints() {
    let served = Served::start(CONFIG, &[]).await;
    let admin = served.admin_addr().await;
    let base = format!("http://{admin}");
    let mut client = served.client().await;
    // Wait for the required collection: readiness.
    let mut values = vec![served.get("a").await];
    let (code, body) = get_text(&format!("{base}/readyz")).await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    assert_eq!(
        get_text(&format!("{base}/livez")).await,
        (200, "ok\n".into())
    );

    // Traffic: 5 more reads, a bad name, an unknown collection, a rotation.
    for _ in 0..5 {
        values.push(served.get("a").await);
    }
    let bad = |name: &str| GetCollectionTokenRequest {
        collection: name.into(),
        min_remaining: None,
    };
    let e = client
        .get_collection_token(bad("bad name"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = client.get_collection_token(bad("nope")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let rotated = client
        .invalidate_token(InvalidateTokenRequest {
            collection: "a".into(),
            version: 1,
            value: String::new(),
            reason: "401 from upstream".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rotated.refreshed);
    values.push(rotated.token.unwrap().value);
    let mut watch = client
        .watch_token(WatchTokenRequest {
            collection: "a".into(),
            after_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    watch.next().await.unwrap().unwrap();

    let (code, text) = get_text(&format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    for v in &values {
        assert!(!text.contains(v.as_str()), "a token value in /metrics");
    }
    // Labels come from bounded sets: names sent by callers never become series.
    assert!(
        !text.contains("nope") && !text.contains("bad name"),
        "{text}"
    );
    let m = samples(&text);
    let at = |series: &str| -> f64 {
        *m.get(series)
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    let rpc = |method: &str, code: &str| {
        at(&format!(
            "token_broker_rpc_requests_total{{method=\"{method}\",code=\"{code}\"}}"
        ))
    };
    assert!(rpc("GetCollectionToken", "OK") >= 6.0);
    assert_eq!(rpc("GetCollectionToken", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(rpc("GetCollectionToken", "NOT_FOUND"), 1.0);
    assert_eq!(rpc("InvalidateToken", "OK"), 1.0);
    assert!(at("token_broker_rpc_duration_seconds_count{method=\"GetCollectionToken\"}") >= 8.0);
    assert!(at("token_broker_memory_hits_total{collection=\"a\"}") >= 5.0);
    assert_eq!(at("token_broker_stale_serves_total{collection=\"a\"}"), 0.0);
    assert_eq!(
        at("token_broker_refreshes_total{collection=\"a\",outcome=\"rotated\",class=\"none\"}"),
        2.0
    );
    assert_eq!(
        at("token_broker_upstream_request_duration_seconds_count{collection=\"a\",outcome=\"ok\"}"),
        2.0
    );
    assert_eq!(at("token_broker_token_version{collection=\"a\"}"), 2.0);
    let expires_in = at("token_broker_token_expires_in_seconds{collection=\"a\"}");
    assert!(
        expires_in > 3000.0 && expires_in <= 3600.0,
        "expires in {expires_in}"
    );
    // The lazy collection was never asked for: version 0, no expiry series.
    assert_eq!(at("token_broker_token_version{collection=\"b\"}"), 0.0);
    assert!(!m.contains_key("token_broker_token_expires_in_seconds{collection=\"b\"}"));
    assert_eq!(at("token_broker_watch_streams{collection=\"a\"}"), 1.0);
    assert_eq!(
        at("token_broker_lease_acquisitions_total{collection=\"a\"}"),
        2.0
    );
    assert_eq!(at("token_broker_lease_waits_total{collection=\"a\"}"), 0.0);
    assert_eq!(at("token_broker_store_degraded"), 0.0);
    assert_eq!(at("token_broker_ready"), 1.0);
    assert_eq!(at("token_broker_build_info{version=\"0.1.0\"}"), 1.0);
    assert!(m.contains_key("token_broker_notification_lag_seconds_count"));

    // The stream ends: the gauge goes down and the RPC is counted.
    drop(watch);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = samples(&get_text(&format!("{base}/metrics")).await.1);
        let open = m["token_broker_watch_streams{collection=\"a\"}"];
        let ended = m
            .get("token_broker_rpc_requests_total{method=\"WatchToken\",code=\"CANCELLED\"}")
            .copied();
        if open == 0.0 && ended == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "watch gauge {open}, ended {ended:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // gRPC health on the admin port: readiness and liveness.
    let serving = ServingStatus::Serving as i32;
    assert_eq!(health(admin, "").await.unwrap(), serving);
    assert_eq!(health(admin, "liveness").await.unwrap(), serving);
    assert_eq!(
        health(admin, "token_broker.v1.TokenBroker").await.unwrap(),
        serving
    );
    assert_eq!(
        health(admin, "nope").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    drop(client);
    served.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_names_the_required_collection_while_alive() {
    // The upstream refuses connections for ever: the required collection never
    // gets a token; the optional one is not waited for.
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = format!(
        r#"
[collections.needed]
required = true
source = {{ kind = "http_json", url = "http://{refused}/token", token_pointer = "/t" }}

[collections.optional]
source = {{ kind = "demo" }}
"#
    );
    let served = Served::start(&config, &[]).await;
    let admin = served.admin_addr().await;
    let base = format!("http://{admin}");
    let (code, body) = get_text(&format!("{base}/readyz")).await;
    assert_eq!(code, 503);
    assert_eq!(body, "not ready: no servable token yet for needed\n");
    assert_eq!(
        get_text(&format!("{base}/livez")).await,
        (200, "ok\n".into())
    );
    let not_serving = ServingStatus::NotServing as i32;
    assert_eq!(health(admin, "").await.unwrap(), not_serving);
    assert_eq!(
        health(admin, "liveness").await.unwrap(),
        ServingStatus::Serving as i32
    );
    // Failures are counted by class.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = get_text(&format!("{base}/metrics")).await.1;
        let m = samples(&text);
        let failed = m
            .get("token_broker_refreshes_total{collection=\"needed\",outcome=\"failed\",class=\"connect\"}")
            .copied()
            .unwrap_or(0.0);
        if failed >= 1.0 {
            assert_eq!(m["token_broker_ready"], 0.0);
            assert!(
                m["token_broker_upstream_request_duration_seconds_count{collection=\"needed\",outcome=\"error\"}"]
                    >= 1.0
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    served.stop();
}

/// `InvalidateToken` of version 1 of `api` on `sidecar`: the version it
/// answers with.
async fn invalidate_version_1(sidecar: &Served) -> u64 {
    sidecar
        .client()
        .await
        .invalidate_token(InvalidateTokenRequest {
            collection: "api".into(),
            version: 1,
            value: String::new(),
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .version
}

/// Polls `served`'s metrics until `series` satisfies `ok`.
async fn wait_metric(served: &Served, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let base = format!("http://{}", served.admin_addr().await);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let m = samples(&get_text(&format!("{base}/metrics")).await.1);
        if let Some(v) = m.get(series).copied()
            && ok(v)
        {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} = {:?}\n{}",
            m.get(series),
            served.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_metrics_show_notification_lag_lease_grants_and_a_degraded_database() {
    use crate::support::fault_proxy::FaultProxy;
    use crate::support::fleet::{FleetEnv, fleet_config};
    use crate::support::postgres::TestDb;
    use crate::support::upstream::{OAuthConfig, OAuthServer};

    let db = TestDb::create().await;
    let proxy = FaultProxy::start(db.server_addr()).await;
    let env = FleetEnv::new(db.url_via(proxy.addr()));
    let oauth = OAuthServer::start(OAuthConfig::new("fleet", &env.client_secret)).await;
    let config = fleet_config(&oauth.token_url(), "");
    let sidecars = env.start_fleet(&config, 2).await;
    for s in &sidecars {
        s.get("api").await;
    }
    // One rotation on the first sidecar reaches the second by notification.
    assert_eq!(invalidate_version_1(&sidecars[0]).await, 2);
    let lagged = wait_metric(
        &sidecars[1],
        "token_broker_notification_lag_seconds_count",
        |n| n >= 1.0,
    )
    .await;
    let lag_sum = wait_metric(
        &sidecars[1],
        "token_broker_notification_lag_seconds_sum",
        |_| true,
    )
    .await;
    eprintln!(
        "notification lag: {lagged} samples, mean {:.2} ms",
        lag_sum / lagged * 1e3
    );
    assert_eq!(oauth.calls(), 2, "one upstream call per rotation");
    // Two sidecars, two rotations: each grant was counted by the one that
    // got it.
    let mut grants = 0.0;
    for s in &sidecars {
        grants += wait_metric(
            s,
            "token_broker_lease_acquisitions_total{collection=\"api\"}",
            |_| true,
        )
        .await;
    }
    assert!(grants >= 2.0, "lease grants {grants}");

    // The database goes away: both report degraded, and recover.
    for s in &sidecars {
        assert_eq!(
            wait_metric(s, "token_broker_store_degraded", |_| true).await,
            0.0
        );
    }
    proxy.cut();
    for s in &sidecars {
        wait_metric(s, "token_broker_store_degraded", |v| v == 1.0).await;
        // Still ready: tokens are served from memory.
        assert_eq!(wait_metric(s, "token_broker_ready", |_| true).await, 1.0);
    }
    proxy.restore();
    for s in &sidecars {
        wait_metric(s, "token_broker_store_degraded", |v| v == 0.0).await;
    }
}

/// A slow commit does not count as notification lag: a deferred constraint
/// trigger makes every commit of the tokens table sleep 600 ms after the
/// holder's `NOTIFY` statement (which reads the database clock for the
/// payload). The peer's lag runs from the notice's arrival, after the commit,
/// so it stays well under the sleep; stamped from the payload it would not.
#[tokio::test]
async fn a_slow_commit_is_not_notification_lag() {
    use crate::support::fleet::{FleetEnv, fleet_config};
    use crate::support::postgres::TestDb;
    use crate::support::upstream::{OAuthConfig, OAuthServer};

    let db = TestDb::create().await;
    let env = FleetEnv::new(db.url.clone());
    let oauth = OAuthServer::start(OAuthConfig::new("fleet", &env.client_secret)).await;
    let sidecars = env
        .start_fleet(&fleet_config(&oauth.token_url(), ""), 2)
        .await;
    for s in &sidecars {
        s.get("api").await;
    }
    let pool = db.pool().await;
    for statement in [
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(0.6); RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON token_broker_tokens \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    assert_eq!(invalidate_version_1(&sidecars[0]).await, 2);
    let count = "token_broker_notification_lag_seconds_count";
    let lagged = wait_metric(&sidecars[1], count, |n| n >= 1.0).await;
    let sum = wait_metric(
        &sidecars[1],
        "token_broker_notification_lag_seconds_sum",
        |_| true,
    )
    .await;
    eprintln!("lag over a 600 ms commit: {:.1} ms", sum / lagged * 1e3);
    assert!(sum / lagged < 0.3, "mean lag {sum} s over {lagged} samples");
}

/// A flood of health `Watch` streams and connections on the admin port (which
/// may face the pod network) is bounded: past the caps they are refused, the
/// process keeps answering, and capacity comes back when they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watch_floods_and_connection_floods_are_bounded() {
    let served = Served::start(CONFIG, &[]).await;
    let admin = served.admin_addr().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{admin}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // 200 watches on one connection: at most 128 requests run at once.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..200 {
        let mut client = HealthClient::new(channel.clone());
        match client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Ok(stream) => open.push(stream.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(open.len(), 128, "{refused} refused");
    drop(channel);
    // Plain HTTP is refused too while every slot is taken (the cap is the
    // point); closing the watches frees them.
    assert_eq!(get_text(&format!("http://{admin}/livez")).await.0, 503);
    drop(open);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (code, _) = get_text(&format!("http://{admin}/livez")).await;
        if code == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 100 raw connections: at most 64 stay open; the others are closed at once.
    let mut conns = Vec::new();
    for _ in 0..100 {
        conns.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    let mut closed = 0;
    for c in &mut conns {
        let mut buf = [0u8; 1];
        use tokio::io::AsyncReadExt as _;
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    // At most 64 open at once (the test's own earlier connections may still
    // hold a slot or two while they close).
    assert!(
        (36..=40).contains(&closed),
        "connections past 64 are closed at once: {closed} of 100 closed"
    );
    drop(conns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while get_text(&format!("http://{admin}/livez")).await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    served.stop();
}
