//! A tree of brokers: leaves whose collections are `kind = "broker"` sources
//! following a mid-tier token-broker over its own gRPC API. In process here
//! (the mid tier on scripted sources, leaves built from config text, all over
//! real TCP sockets); `tree_processes` below runs real binaries on Postgres.

use std::sync::Arc;
use std::time::Duration;

use token_broker::grpc::pb::{GetCollectionTokenRequest, InvalidateTokenRequest};
use token_broker::listen::ListenAddr;
use token_broker::store::MemoryStore;
use tonic::Code;

use crate::support::scripted::{Scripted, policy, spec};
use crate::support::server::TestServer;
use crate::support::{get, next_token, ts, watch};

fn leaf_config(mid: &TestServer, extra: &str) -> String {
    let ListenAddr::Tcp(addr) = &mid.addr else {
        panic!("tcp mid tier")
    };
    format!(
        r#"
[collections.c]
source = {{ kind = "broker", addrs = ["http://{addr}"] {extra} }}
"#
    )
}

/// A collection `c` metric of `server`'s (0 when absent).
fn remote_metric(server: &TestServer, name: &str) -> u64 {
    let series = format!("{name}{{collection=\"c\"}} ");
    server
        .broker
        .metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
        .unwrap_or(0)
}

async fn leaf(mid: &TestServer, extra: &str) -> TestServer {
    TestServer::from_toml(&leaf_config(mid, extra), Arc::new(MemoryStore::new())).await
}

/// A leaf serves the mid tier's token with the same version and instants;
/// watchers on both tiers see the same versions in order; an invalidate of
/// the current version at many leaves causes one upstream call at the mid
/// tier; an older version returns the current token without a refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaf_serves_watches_and_invalidates_through_its_mid_tier_as_through_a_local_broker() {
    let source = Scripted::tokens(Duration::from_secs(300));
    let mid = TestServer::start(vec![spec("c", source.clone(), policy(), true)]).await;
    let mut leaves = Vec::new();
    for _ in 0..4 {
        leaves.push(leaf(&mid, "").await);
    }
    let mut mid_client = mid.client().await;
    let from_mid = get(&mut mid_client, "c", Duration::from_secs(5))
        .await
        .unwrap();
    let mut watches = Vec::new();
    for l in &leaves {
        let mut c = l.client().await;
        let t = get(&mut c, "c", Duration::from_secs(5)).await.unwrap();
        assert_eq!(t.version, from_mid.version);
        assert_eq!(t.value, from_mid.value);
        assert_eq!(ts(&t.expires_at), ts(&from_mid.expires_at));
        assert_eq!(ts(&t.refresh_at), ts(&from_mid.refresh_at));
        assert_eq!(ts(&t.fetched_at), ts(&from_mid.fetched_at));
        let stream = watch(&mut c, "c", 0).await;
        watches.push(stream);
    }
    let mut mid_watch = watch(&mut mid_client, "c", 0).await;
    assert_eq!(next_token(&mut mid_watch).await.version, from_mid.version);
    for w in &mut watches {
        assert_eq!(next_token(w).await.version, from_mid.version);
    }
    assert_eq!(source.calls(), 1);

    // Every leaf, three callers each, reports the current version at once.
    let v = from_mid.version;
    let mut calls = Vec::new();
    for l in &leaves {
        for _ in 0..3 {
            let mut c = l.client().await;
            calls.push(tokio::spawn(async move {
                c.invalidate_token(InvalidateTokenRequest {
                    collection: "c".into(),
                    version: v,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
            }));
        }
    }
    for call in calls {
        let r = call.await.unwrap();
        assert_eq!(r.token.unwrap().version, v + 1);
    }
    assert_eq!(
        source.calls(),
        2,
        "twelve reports of one version at four leaves cost one upstream call"
    );
    // Every tier's watchers get the new version, the same token.
    let at_mid = next_token(&mut mid_watch).await;
    assert_eq!(at_mid.version, v + 1);
    for w in &mut watches {
        let t = next_token(w).await;
        assert_eq!((t.version, &t.value), (at_mid.version, &at_mid.value));
    }
    // An older version: the current token, no refresh.
    let mut c = leaves[0].client().await;
    let r = c
        .invalidate_token(InvalidateTokenRequest {
            collection: "c".into(),
            version: v,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.refreshed);
    assert_eq!(r.token.unwrap().version, v + 1);
    assert_eq!(source.calls(), 2);
}

/// `min_remaining` that the leaf's token cannot meet is forwarded: the mid
/// tier refreshes, and the leaf serves the new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaf_forwards_min_remaining() {
    let source = Scripted::tokens(Duration::from_secs(60));
    let mid = TestServer::start(vec![spec("c", source.clone(), policy(), true)]).await;
    let leaf = leaf(&mid, "").await;
    let mut c = leaf.client().await;
    let first = get(&mut c, "c", Duration::from_secs(5)).await.unwrap();
    // Wait a little so the next token outlives this one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let remaining = ts(&first.expires_at)
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    let mut req = tonic::Request::new(GetCollectionTokenRequest {
        collection: "c".into(),
        min_remaining: Some(
            prost_types::Duration::try_from(remaining + Duration::from_millis(500)).unwrap(),
        ),
    });
    req.set_timeout(Duration::from_secs(5));
    let t = c
        .get_collection_token(req)
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert!(t.version > first.version, "min_remaining was not forwarded");
    assert_eq!(source.calls(), 2);
}

/// A leaf whose remote is unreachable keeps serving its token, fails over
/// to the next address, and never invents a token or a version: with no
/// remote at all it answers UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaf_fails_over_keeps_serving_and_never_invents_a_token() {
    // Nothing listens on this address: bind, note, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let source = Scripted::tokens(Duration::from_secs(300));
    let mid = TestServer::start(vec![spec("c", source.clone(), policy(), true)]).await;
    let ListenAddr::Tcp(mid_addr) = mid.addr.clone() else {
        panic!()
    };
    // The dead address first: the leaf fails over to the mid tier.
    let config = format!(
        r#"
[collections.c]
source = {{ kind = "broker", addrs = ["http://{dead}", "http://{mid_addr}"], connect_timeout = "200ms" }}
policy = {{ backoff_initial = "50ms", backoff_max = "200ms" }}
"#
    );
    let leaf = TestServer::from_toml(&config, Arc::new(MemoryStore::new())).await;
    let mut c = leaf.client().await;
    let t = get(&mut c, "c", Duration::from_secs(5)).await.unwrap();
    assert_eq!(t.version, 1);
    // The dead address counted as a break; the mid tier is followed.
    assert!(remote_metric(&leaf, "token_broker_remote_breaks_total") >= 1);
    assert_eq!(remote_metric(&leaf, "token_broker_remote_following"), 1);
    // The mid tier goes away: the leaf keeps serving the same token.
    mid.stop(Duration::from_secs(5)).await;
    for _ in 0..5 {
        let again = get(&mut c, "c", Duration::from_secs(2)).await.unwrap();
        assert_eq!((again.version, &again.value), (t.version, &t.value));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(remote_metric(&leaf, "token_broker_remote_following"), 0);

    // A leaf that never reached any remote: no token, UNAVAILABLE, fast.
    let config = format!(
        r#"
[collections.c]
source = {{ kind = "broker", addrs = ["http://{dead}"], connect_timeout = "200ms" }}
"#
    );
    let orphan = TestServer::from_toml(&config, Arc::new(MemoryStore::new())).await;
    let mut c = orphan.client().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let err = get(&mut c, "c", Duration::from_secs(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

/// A remote that does not have the collection: the leaf's callers get a
/// permanent failure (FAILED_PRECONDITION), not a token and not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaf_of_an_unknown_remote_collection_fails_permanently() {
    let mid = TestServer::start(vec![spec(
        "c",
        Scripted::tokens(Duration::from_secs(300)),
        policy(),
        true,
    )])
    .await;
    let leaf = leaf(&mid, r#", collection = "nope""#).await;
    let mut c = leaf.client().await;
    let err = get(&mut c, "c", Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("rejected"), "{}", err.message());
}

/// Real processes: two mid-tier brokers on one Postgres database, three
/// leaves (no database) following both, readers on every leaf. `kill -9` of
/// the mid tier that two leaves use first: they fail over, no read fails,
/// and every leaf's watchers keep seeing versions in order, one value per
/// version, the same across leaves; the upstream is asked once per rotation
/// (one more at most, for a lease holder killed mid-call).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_mid_tier_broker_its_leaves_fail_over_and_no_read_fails() {
    use crate::support::fleet::{FleetEnv, Sidecar, fleet_config};
    use crate::support::load::{
        Readers, assert_in_order, assert_one_value_per_version, watch_each,
    };
    use crate::support::postgres::TestDb;
    use crate::support::upstream::{OAuthConfig, OAuthServer};

    let db = TestDb::create().await;
    let env = FleetEnv::new(db.url.clone());
    let oauth = OAuthServer::start(OAuthConfig {
        expires_in: Some(6),
        ..OAuthConfig::new("fleet", &env.client_secret)
    })
    .await;
    let mut mids = env
        .start_fleet(&fleet_config(&oauth.token_url(), ""), 2)
        .await;
    let leaf_config = |first: &Sidecar, second: &Sidecar| {
        format!(
            r#"
[collections.api]
prefetch = true
source = {{ kind = "broker", addrs = ["unix:{}", "unix:{}"], connect_timeout = "500ms" }}
policy = {{ backoff_initial = "100ms", backoff_max = "1s" }}
"#,
            first.sock().display(),
            second.sock().display()
        )
    };
    let mut leaves = Vec::new();
    for (a, b) in [(0, 1), (0, 1), (1, 0)] {
        leaves.push(Sidecar::start(&leaf_config(&mids[a], &mids[b]), &[]).await);
    }
    let watchers = watch_each(&leaves, 2).await;
    let leaves = Arc::new(leaves);
    let readers = Readers::start(&leaves, 6);
    let low = |watchers: &[crate::support::load::Watched]| {
        watchers
            .iter()
            .map(|(_, w)| w.lock().unwrap().last().map_or(0, |s| s.version))
            .min()
            .unwrap()
    };
    let wait_for = |v: u64, what: &'static str| {
        let watchers = &watchers;
        let leaves = &leaves;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while low(watchers) < v {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{what}: leaves not at version {v} within 60 s; leaf 0 log:\n{}",
                    leaves[0].log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(2, "before the kill").await;
    let at_kill = low(&watchers);
    mids[0].kill9();
    wait_for(at_kill + 3, "after the kill").await;
    let (reads, failures) = readers.stop().await;
    assert_eq!(failures, 0, "reads failed while a token was servable");
    assert!(reads.len() > 50, "too few reads: {}", reads.len());
    for (i, w) in &watchers {
        assert_in_order(&w.lock().unwrap(), &format!("leaf {i}"));
    }
    let seen: Vec<_> = watchers
        .iter()
        .flat_map(|(_, w)| w.lock().unwrap().clone())
        .collect();
    assert_one_value_per_version(&seen);
    let top = seen.iter().map(|s| s.version).max().unwrap();
    assert!(
        oauth.calls() as u64 <= top + 1,
        "{} upstream calls for {top} versions",
        oauth.calls()
    );
}

/// A remote that answers garbage: each of its tokens is broken in one way
/// (no value, version 0, no expiry, refresh after expiry, an expiry a
/// century away). None is ever served or streamed by the leaf; callers get
/// `bad_response` (FAILED_PRECONDITION), and the leaf's log holds no value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_remote_is_an_error_never_a_token() {
    use std::time::SystemTime;
    use token_broker::grpc::pb;
    use token_broker::grpc::pb::token_broker_server::{TokenBroker, TokenBrokerServer};
    use tokio_stream::wrappers::TcpListenerStream;

    struct Hostile {
        token: pb::Token,
    }
    #[tonic::async_trait]
    impl TokenBroker for Hostile {
        async fn get_collection_token(
            &self,
            _: tonic::Request<pb::GetCollectionTokenRequest>,
        ) -> Result<tonic::Response<pb::GetCollectionTokenResponse>, tonic::Status> {
            Ok(tonic::Response::new(pb::GetCollectionTokenResponse {
                token: Some(self.token.clone()),
            }))
        }
        async fn invalidate_token(
            &self,
            _: tonic::Request<pb::InvalidateTokenRequest>,
        ) -> Result<tonic::Response<pb::InvalidateTokenResponse>, tonic::Status> {
            Ok(tonic::Response::new(pb::InvalidateTokenResponse {
                token: Some(self.token.clone()),
                refreshed: true,
            }))
        }
        type WatchTokenStream =
            tokio_stream::Iter<std::vec::IntoIter<Result<pb::WatchTokenResponse, tonic::Status>>>;
        async fn watch_token(
            &self,
            _: tonic::Request<pb::WatchTokenRequest>,
        ) -> Result<tonic::Response<Self::WatchTokenStream>, tonic::Status> {
            Ok(tonic::Response::new(tokio_stream::iter(vec![Ok(
                pb::WatchTokenResponse {
                    token: Some(self.token.clone()),
                },
            )])))
        }
    }

    crate::support::capture_logs();
    let now = SystemTime::now();
    let good = pb::Token {
        collection: "c".into(),
        value: crate::support::random_secret("hostile"),
        version: 7,
        fetched_at: Some(now.into()),
        expires_at: Some((now + Duration::from_secs(60)).into()),
        refresh_at: Some((now + Duration::from_secs(30)).into()),
        stale: false,
    };
    let breaks: Vec<(&str, pb::Token)> = vec![
        (
            "no value",
            pb::Token {
                value: String::new(),
                ..good.clone()
            },
        ),
        (
            "version 0",
            pb::Token {
                version: 0,
                ..good.clone()
            },
        ),
        (
            "no expiry",
            pb::Token {
                expires_at: None,
                ..good.clone()
            },
        ),
        (
            "refresh after expiry",
            pb::Token {
                refresh_at: good.expires_at,
                expires_at: good.refresh_at,
                ..good.clone()
            },
        ),
        (
            "a century",
            pb::Token {
                expires_at: Some((now + Duration::from_secs(100 * 365 * 86400)).into()),
                ..good.clone()
            },
        ),
    ];
    for (what, token) in breaks {
        let value = token.value.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TokenBrokerServer::new(Hostile { token }))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let config = format!(
            "[collections.c]\nsource = {{ kind = \"broker\", addrs = [\"http://{addr}\"] }}\n"
        );
        let leaf = TestServer::from_toml(&config, Arc::new(MemoryStore::new())).await;
        let mut c = leaf.client().await;
        let err = get(&mut c, "c", Duration::from_secs(3)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{what}: {err:?}");
        assert!(
            err.message().contains("bad_response"),
            "{what}: {}",
            err.message()
        );
        let mut stream = watch(&mut c, "c", 0).await;
        let next = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
        assert!(next.is_err(), "{what}: a hostile token was streamed");
        if !value.is_empty() {
            crate::support::assert_no_secret_logged([value.as_str()]);
        }
        server.abort();
    }
}

/// The tree over TLS, from the shipped example: a leaf built from
/// `examples/follower.toml` (its addresses and files pointed at a mid tier
/// here) presents its client certificate; the mid tier verifies it and its
/// `readers` decide. A collection the leaf's identity may read is served
/// with the mid tier's version; one it may not is a permanent failure at
/// the leaf (`rejected`, from PERMISSION_DENIED), never a token; a leaf
/// without a client certificate gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaf_over_tls_is_served_what_its_identity_may_read() {
    use crate::support::pki::{Ca, TlsDir};
    use token_broker::config::Config;
    use token_broker::listen::Listener;

    const WEB: &str = "spiffe://cluster.local/ns/app/sa/web";
    let (server_ca, client_ca) = (Ca::new("server ca"), Ca::new("client ca"));
    let mid_dir = TlsDir::new(&server_ca.server(), &client_ca);
    let mid_config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
{}
[collections.partner-api]
readers = ["{WEB}"]
source = {{ kind = "demo", ttl = "300s" }}

[collections.payroll]
readers = ["spiffe://cluster.local/ns/hr/sa/payroll"]
source = {{ kind = "demo", ttl = "300s" }}
"#,
        mid_dir.toml("")
    );
    let mid_config = Config::parse(&mid_config).unwrap();
    let listener = Listener::bind(&mid_config.server.listen).await.unwrap();
    let mid = TestServer::from_config(&mid_config, listener).await;
    let ListenAddr::Tcp(mid_addr) = mid.addr.clone() else {
        panic!()
    };
    // The leaf's own files: its certificate (identity WEB) and the CA that
    // signed the mid tier's.
    let leaf_dir = TlsDir::new(&client_ca.client(&[WEB], &[]), &server_ca);

    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/follower.toml"),
    )
    .unwrap();
    let mut table: toml::Table = example.parse().unwrap();
    table.remove("server");
    let follower = |collection: &str, with_cert: bool| {
        let mut table = table.clone();
        let c = table["collections"]["partner-api"]["source"]
            .as_table_mut()
            .unwrap();
        c.insert(
            "addrs".into(),
            toml::Value::Array(vec![toml::Value::String(format!("https://{mid_addr}"))]),
        );
        c.insert("collection".into(), collection.into());
        c.insert("server_name".into(), "localhost".into());
        c.insert("connect_timeout".into(), "500ms".into());
        c.insert(
            "ca_file".into(),
            leaf_dir.path("ca.crt").display().to_string().into(),
        );
        if with_cert {
            c.insert(
                "cert_file".into(),
                leaf_dir.path("tls.crt").display().to_string().into(),
            );
            c.insert(
                "key_file".into(),
                leaf_dir.path("tls.key").display().to_string().into(),
            );
        } else {
            c.remove("cert_file");
            c.remove("key_file");
        }
        toml::to_string(&table).unwrap()
    };

    let leaf =
        TestServer::from_toml(&follower("partner-api", true), Arc::new(MemoryStore::new())).await;
    let mut c = leaf.client().await;
    let t = get(&mut c, "partner-api", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(t.version, 1);

    let refused =
        TestServer::from_toml(&follower("payroll", true), Arc::new(MemoryStore::new())).await;
    let mut c = refused.client().await;
    let err = get(&mut c, "partner-api", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("rejected"), "{}", err.message());

    let anonymous = TestServer::from_toml(
        &follower("partner-api", false),
        Arc::new(MemoryStore::new()),
    )
    .await;
    let mut c = anonymous.client().await;
    let err = get(&mut c, "partner-api", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    drop(mid);
}

/// A leaf's client certificate rotated on disk is presented from its next
/// call on: a leaf whose first identity the mid tier refuses for a
/// collection gets it once its files hold a permitted identity, with no
/// restart and no connection failure to trigger it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaf_presents_a_rotated_client_certificate() {
    use crate::support::pki::{Ca, TlsDir};
    use token_broker::config::Config;
    use token_broker::listen::Listener;

    const OLD: &str = "spiffe://cluster.local/ns/app/sa/web";
    const NEW: &str = "spiffe://cluster.local/ns/app/sa/web-v2";
    let (server_ca, client_ca) = (Ca::new("server ca"), Ca::new("client ca"));
    let mid_dir = TlsDir::new(&server_ca.server(), &client_ca);
    let mid_config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}\n[collections.c]\nreaders = [\"{NEW}\"]\nsource = {{ kind = \"demo\", ttl = \"300s\" }}\n",
        mid_dir.toml("")
    );
    let mid_config = Config::parse(&mid_config).unwrap();
    let listener = Listener::bind(&mid_config.server.listen).await.unwrap();
    let mid = TestServer::from_config(&mid_config, listener).await;
    let ListenAddr::Tcp(mid_addr) = mid.addr.clone() else {
        panic!()
    };
    let old = client_ca.client(&[OLD], &[]);
    let mut leaf_dir = TlsDir::new(&old, &server_ca);
    let config = format!(
        r#"
[collections.c]
source = {{ kind = "broker", addrs = ["https://{mid_addr}"], server_name = "localhost", ca_file = {:?}, cert_file = {:?}, key_file = {:?} }}
policy = {{ backoff_initial = "100ms", backoff_max = "200ms" }}
"#,
        leaf_dir.path("ca.crt"),
        leaf_dir.path("tls.crt"),
        leaf_dir.path("tls.key"),
    );
    let leaf = TestServer::from_toml(&config, Arc::new(MemoryStore::new())).await;
    let mut c = leaf.client().await;
    let err = get(&mut c, "c", Duration::from_secs(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let new = client_ca.client(&[NEW], &[]);
    leaf_dir.write(&new.cert, &new.key, &server_ca.pem());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match get(&mut c, "c", Duration::from_secs(3)).await {
            Ok(t) => {
                assert_eq!(t.version, 1);
                break;
            }
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the rotated certificate was never presented: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(mid);
}

/// A remote that accepts connections and never answers (a black hole, a
/// hung process) is left within its connect timeout: the leaf fails over
/// to the next address and serves its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaf_leaves_a_silent_remote_for_the_next_address() {
    // Connections complete in the kernel's backlog; nothing ever reads them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let mid = TestServer::start(vec![spec(
        "c",
        Scripted::tokens(Duration::from_secs(300)),
        policy(),
        true,
    )])
    .await;
    let ListenAddr::Tcp(mid_addr) = mid.addr.clone() else {
        panic!()
    };
    let config = format!(
        r#"
[collections.c]
source = {{ kind = "broker", addrs = ["http://{silent_addr}", "http://{mid_addr}"], connect_timeout = "200ms" }}
"#
    );
    let leaf = TestServer::from_toml(&config, Arc::new(MemoryStore::new())).await;
    let mut c = leaf.client().await;
    // Within the caller's deadline: the silent remote is given up on.
    let t = get(&mut c, "c", Duration::from_secs(5)).await.unwrap();
    assert_eq!(t.version, 1);
    assert!(remote_metric(&leaf, "token_broker_remote_breaks_total") >= 1);
    drop(silent);
}
