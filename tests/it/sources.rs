//! The real upstream sources against fake upstream HTTP servers: OAuth2 client
//! credentials, refresh-token rotation (also across a broker restart on the
//! same store), OverDrive with its shared OAuth parent, `http_json`, and every
//! error class with the status a caller sees. Real time (the HTTP client's
//! timeouts must not fire early), so tokens here are long-lived and rotations
//! are forced through `InvalidateToken` or `min_remaining`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use token_broker::grpc::pb::token_broker_client::TokenBrokerClient;
use token_broker::grpc::pb::{self, GetCollectionTokenRequest, InvalidateTokenRequest};
use token_broker::store::MemoryStore;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::upstream::{
    ClientAuth, FakeHttp, OAuthConfig, OAuthServer, OverDriveServer, Reply,
};
use crate::support::{
    TestServer, assert_no_secret_logged, capture_logs, get, random_secret, secret_file, ts,
};

const WAIT: Duration = Duration::from_secs(10);

/// Test-friendly refresh numbers: forced refreshes are not held back, and
/// backoff is short unless a test wants it long.
fn fast_policy(collection: &str, backoff: &str) -> String {
    format!(
        "[collections.{collection}.policy]\nmin_refresh_interval = \"10ms\"\nbackoff_initial = \"{backoff}\"\nbackoff_max = \"{backoff}\"\nfetch_timeout = \"5s\"\n"
    )
}

fn client_credentials(oauth: &OAuthServer, secret_path: &str, extra: &str) -> String {
    format!(
        "[collections.api]\nprefetch = false\n[collections.api.source]\nkind = \"oauth2_client_credentials\"\ntoken_url = \"{}\"\nclient_id = \"client-1\"\nclient_secret_file = \"{secret_path}\"\n{extra}\n{}",
        oauth.token_url(),
        fast_policy("api", "20ms"),
    )
}

async fn invalidate(
    client: &mut TokenBrokerClient<Channel>,
    collection: &str,
    version: u64,
) -> Result<(pb::Token, bool), tonic::Status> {
    let mut req = tonic::Request::new(InvalidateTokenRequest {
        collection: collection.to_owned(),
        version,
        value: String::new(),
        reason: "test".into(),
    });
    req.set_timeout(WAIT);
    let r = client.invalidate_token(req).await?.into_inner();
    Ok((r.token.expect("token"), r.refreshed))
}

async fn get_with_min_remaining(
    client: &mut TokenBrokerClient<Channel>,
    collection: &str,
    min_remaining: Duration,
) -> pb::Token {
    let mut req = tonic::Request::new(GetCollectionTokenRequest {
        collection: collection.to_owned(),
        min_remaining: Some(min_remaining.try_into().unwrap()),
    });
    req.set_timeout(WAIT);
    client
        .get_collection_token(req)
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_with_basic_and_body_authentication() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let secret = random_secret("client-secret");
    let path = secret_file(&dir, "secret", &format!("{secret}\n"));
    let mut leaked_candidates = vec![secret.clone()];
    for (auth, name) in [(ClientAuth::Basic, "basic"), (ClientAuth::Body, "body")] {
        let oauth = OAuthServer::start(OAuthConfig {
            client_auth: auth.clone(),
            expires_in: Some(600),
            ..OAuthConfig::new("client-1", &secret)
        })
        .await;
        let text = client_credentials(
            &oauth,
            &path,
            &format!(
                "scope = \"read write\"\naudience = \"https://api.example\"\nclient_auth = \"{name}\"\n"
            ),
        );
        let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
        let mut client = server.client().await;
        let t = get(&mut client, "api", WAIT).await.unwrap();
        assert_eq!(oauth.issued(), vec![t.value.clone()], "{name}");
        assert_eq!(oauth.grants("client_credentials"), 1);
        assert_eq!(t.version, 1);
        // The lifetime comes from expires_in, minus the 30 s safety skew.
        let lifetime = ts(&t.expires_at).duration_since(ts(&t.fetched_at)).unwrap();
        assert_eq!(lifetime, Duration::from_secs(570), "{name}");
        let req = &oauth.requests()[0];
        let form = req.form();
        assert_eq!(form["grant_type"], "client_credentials");
        assert_eq!(form["scope"], "read write");
        assert_eq!(form["audience"], "https://api.example");
        assert_eq!(
            req.header("authorization").is_some(),
            auth == ClientAuth::Basic
        );
        assert_eq!(form.contains_key("client_secret"), auth == ClientAuth::Body);
        assert!(
            req.header("user-agent")
                .unwrap()
                .starts_with("token-broker/"),
            "{:?}",
            req.header("user-agent")
        );
        // Reads are served from memory: no second grant.
        for _ in 0..10 {
            assert_eq!(get(&mut client, "api", WAIT).await.unwrap().version, 1);
        }
        assert_eq!(oauth.calls(), 1);
        leaked_candidates.extend(oauth.issued());
        server.stop(WAIT).await;
    }
    assert_no_secret_logged(&leaked_candidates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_without_expires_in_uses_default_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let path = secret_file(&dir, "secret", "s3cret-value");
    let oauth = OAuthServer::start(OAuthConfig {
        expires_in: None,
        ..OAuthConfig::new("client-1", "s3cret-value")
    })
    .await;
    let text = client_credentials(&oauth, &path, "default_ttl = \"2m\"\n");
    let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
    let t = get(&mut server.client().await, "api", WAIT).await.unwrap();
    let lifetime = ts(&t.expires_at).duration_since(ts(&t.fetched_at)).unwrap();
    // 120 s minus the skew, which is 10% of a short lifetime.
    assert_eq!(lifetime, Duration::from_secs(108));
}

/// A refresh-token collection `mail` against a fake endpoint whose seed and
/// client secret are fresh random secrets (in files under the returned dir).
struct RefreshSetup {
    oauth: Arc<OAuthServer>,
    text: String,
    secret: String,
    seed: String,
    _dir: tempfile::TempDir,
}

async fn refresh_setup(expires_in: u64, backoff: &str) -> RefreshSetup {
    let dir = tempfile::tempdir().unwrap();
    let secret = random_secret("client-secret");
    let seed = random_secret("seed-refresh-token");
    let oauth = OAuthServer::start(OAuthConfig {
        refresh_token: Some(seed.clone()),
        expires_in: Some(expires_in),
        ..OAuthConfig::new("client-1", &secret)
    })
    .await;
    let text = format!(
        "[collections.mail.source]\nkind = \"oauth2_refresh_token\"\ntoken_url = \"{}\"\nclient_id = \"client-1\"\nclient_secret_file = \"{}\"\nrefresh_token_file = \"{}\"\n{}",
        oauth.token_url(),
        secret_file(&dir, "secret", &secret),
        secret_file(&dir, "seed", &seed),
        fast_policy("mail", backoff),
    );
    RefreshSetup {
        oauth,
        text,
        secret,
        seed,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_refresh_tokens_are_stored_and_survive_a_restart() {
    capture_logs();
    let RefreshSetup {
        oauth,
        text,
        secret,
        seed,
        _dir,
    } = refresh_setup(3600, "20ms").await;
    let store = Arc::new(MemoryStore::new());
    let server = TestServer::from_toml(&text, store.clone()).await;
    let mut client = server.client().await;
    let t1 = get(&mut client, "mail", WAIT).await.unwrap();
    assert_eq!(t1.version, 1);
    let sent = |i: usize| oauth.requests()[i].form()["refresh_token"].clone();
    assert_eq!(sent(0), seed, "the first refresh uses the configured seed");
    let rt1 = oauth.refresh_token().unwrap();
    assert_ne!(rt1, seed);
    // A forced refresh uses the refresh token issued with t1, not the seed
    // (which the upstream would now refuse).
    let (t2, replaced) = invalidate(&mut client, "mail", t1.version).await.unwrap();
    assert!(replaced);
    assert_eq!(t2.version, 2);
    assert_eq!(sent(1), rt1);
    let rt2 = oauth.refresh_token().unwrap();
    server.stop(WAIT).await;

    // A new broker on the same store: the store's refresh token wins over
    // the config's seed, which is dead by now.
    let server = TestServer::from_toml(&text, store.clone()).await;
    let mut client = server.client().await;
    let t = get(&mut client, "mail", WAIT).await.unwrap();
    assert_eq!(t.version, 2, "the stored token is served after the restart");
    let (t3, replaced) = invalidate(&mut client, "mail", 2).await.unwrap();
    assert!(replaced);
    assert_eq!(t3.version, 3);
    assert_eq!(sent(2), rt2);
    assert_eq!(oauth.grants("refresh_token"), 3);
    server.stop(WAIT).await;

    // The operator replaces the seed (say after invalid_grant, with a new
    // consent): the new seed wins over the stored refresh token, which
    // descends from the old one.
    let new_seed = random_secret("new-seed");
    oauth.set_refresh_token(&new_seed);
    std::fs::write(_dir.path().join("seed"), &new_seed).unwrap();
    let server = TestServer::from_toml(&text, store.clone()).await;
    let mut client = server.client().await;
    let (t4, replaced) = invalidate(&mut client, "mail", 3).await.unwrap();
    assert!(replaced, "{t4:?}");
    assert_eq!(sent(3), new_seed);
    // ...and the token it yields is stored and used from then on.
    let rt4 = oauth.refresh_token().unwrap();
    let (_, replaced) = invalidate(&mut client, "mail", t4.version).await.unwrap();
    assert!(replaced);
    assert_eq!(sent(4), rt4);
    let mut secrets = vec![secret, seed, rt1, rt2, new_seed, rt4];
    secrets.extend(oauth.issued());
    assert_no_secret_logged(&secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_refresh_token_is_permanent_and_the_last_good_token_is_served() {
    capture_logs();
    // Short-lived tokens, so that the test sees the end of the last good one.
    let RefreshSetup {
        oauth,
        text,
        secret,
        seed,
        _dir,
    } = refresh_setup(3, "500ms").await;
    let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
    let mut client = server.client().await;
    let good = get(&mut client, "mail", WAIT).await.unwrap();
    // Someone else uses the broker's refresh token: the upstream rotates it
    // away, and from now on the broker's copy is refused with invalid_grant.
    let stolen = oauth.refresh_token().unwrap();
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(oauth.token_url())
        .basic_auth("client-1", Some(&secret))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &stolen)])
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    // The forced refresh fails; the last good token keeps being served.
    let (t, replaced) = invalidate(&mut client, "mail", good.version).await.unwrap();
    assert!(!replaced);
    assert_eq!(t.value, good.value);
    let rejected = oauth
        .requests()
        .iter()
        .filter(|r| r.form().get("refresh_token") == Some(&stolen))
        .count();
    assert!(
        rejected >= 2,
        "the broker presented its (now dead) refresh token"
    );
    // Once it expires, callers get FAILED_PRECONDITION naming the class.
    let expiry = ts(&good.expires_at);
    tokio::time::sleep(
        expiry.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(50),
    )
    .await;
    let e = get(&mut client, "mail", WAIT).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("invalid_grant"), "{}", e.message());
    assert!(e.message().contains("\"mail\""), "{}", e.message());
    // The log says so plainly.
    assert!(
        crate::support::logs().contains("the refresh token was rejected (invalid_grant)"),
        "the log should say the refresh token was rejected"
    );
    let mut secrets = vec![secret, seed, stolen];
    secrets.extend(oauth.issued());
    assert_no_secret_logged(&secrets);
}

/// One upstream misbehaviour and what a caller sees for it.
struct Case {
    name: &'static str,
    reply: Option<Reply>,
    http: &'static str,
    code: Code,
    class: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_class_reaches_the_caller_with_its_status() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let secret = random_secret("client-secret");
    let path = secret_file(&dir, "secret", &secret);
    let big = format!("{{\"access_token\": \"{}\"}}", "x".repeat(1_200_000));
    let cases = [
        Case {
            name: "malformed JSON",
            reply: Some(Reply::raw(200, "application/json", "{\"access_token\": ")),
            http: "",
            code: Code::FailedPrecondition,
            class: "bad_response",
        },
        Case {
            name: "body over the 1 MiB cap",
            reply: Some(Reply::raw(200, "application/json", big)),
            http: "",
            code: Code::FailedPrecondition,
            class: "bad_response",
        },
        Case {
            name: "wrong content type",
            reply: Some(Reply::raw(
                200,
                "text/html",
                "{\"access_token\": \"looks-like-json\"}",
            )),
            http: "",
            code: Code::FailedPrecondition,
            class: "bad_response",
        },
        Case {
            name: "missing access_token",
            reply: Some(Reply::json(200, json!({"token_type": "Bearer"}))),
            http: "",
            code: Code::FailedPrecondition,
            class: "bad_response",
        },
        Case {
            name: "token with CR/LF",
            reply: Some(Reply::json(
                200,
                json!({"access_token": "abc\r\nX-Injected: 1", "expires_in": 3600}),
            )),
            http: "",
            code: Code::FailedPrecondition,
            class: "bad_response",
        },
        Case {
            name: "token larger than an answer can carry",
            reply: Some(Reply::json(
                200,
                json!({"access_token": "t".repeat(100 * 1024), "expires_in": 3600}),
            )),
            http: "",
            code: Code::FailedPrecondition,
            class: "bad_response",
        },
        Case {
            name: "invalid_grant",
            reply: Some(Reply::json(400, json!({"error": "invalid_grant"}))),
            http: "",
            code: Code::FailedPrecondition,
            class: "invalid_grant",
        },
        Case {
            name: "invalid_client",
            reply: Some(Reply::json(401, json!({"error": "invalid_client"}))),
            http: "",
            code: Code::FailedPrecondition,
            class: "invalid_credentials",
        },
        Case {
            name: "other 4xx",
            reply: Some(Reply::json(400, json!({"error": "invalid_scope"}))),
            http: "",
            code: Code::FailedPrecondition,
            class: "rejected",
        },
        Case {
            name: "slow response past the timeout",
            reply: Some(
                Reply::json(200, json!({"access_token": "late"})).delayed(Duration::from_secs(3)),
            ),
            http: "[http]\ntimeout = \"300ms\"\n",
            code: Code::Unavailable,
            class: "timeout",
        },
        Case {
            name: "429 with Retry-After",
            reply: Some(Reply::json(429, json!({})).header("retry-after", "7")),
            http: "",
            code: Code::Unavailable,
            class: "rate_limited",
        },
        Case {
            name: "500",
            reply: Some(Reply::raw(500, "text/plain", "oops")),
            http: "",
            code: Code::Unavailable,
            class: "upstream_error",
        },
        Case {
            name: "connection refused",
            reply: None,
            http: "",
            code: Code::Unavailable,
            class: "connect",
        },
    ];
    let mut secrets = vec![secret.clone()];
    for case in cases {
        let oauth = OAuthServer::start(OAuthConfig::new("client-1", &secret)).await;
        let mut text = client_credentials(&oauth, &path, "");
        // A long backoff: exactly one attempt during the check.
        text = text.replace("backoff_initial = \"20ms\"", "backoff_initial = \"30s\"");
        text = text.replace("backoff_max = \"20ms\"", "backoff_max = \"30s\"");
        text.push_str(case.http);
        match &case.reply {
            Some(r) => oauth.script([r.clone()]),
            None => {
                // A port that was just free: nothing listens there.
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let port = l.local_addr().unwrap().port();
                drop(l);
                text = text.replace(
                    &oauth.token_url(),
                    &format!("http://127.0.0.1:{port}/token"),
                );
            }
        }
        let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
        let mut client = server.client().await;
        let e = get(&mut client, "api", WAIT).await.unwrap_err();
        assert_eq!(e.code(), case.code, "{}: {e:?}", case.name);
        let expected = format!(
            "collection \"api\" has no servable token: upstream failing ({}, 1 consecutive failures); next attempt at ",
            case.class
        );
        assert!(
            e.message().starts_with(&expected),
            "{}: {}",
            case.name,
            e.message()
        );
        let pushback: u64 = e
            .metadata()
            .get("grpc-retry-pushback-ms")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        if case.class == "rate_limited" {
            assert!(pushback >= 6_000, "Retry-After is a minimum: {pushback} ms");
        }
        // Nothing was cached: the next call fails fast with the same error.
        let again = get(&mut client, "api", WAIT).await.unwrap_err();
        assert_eq!(again.code(), case.code, "{}", case.name);
        assert_eq!(oauth.grants("client_credentials"), 0, "{}", case.name);
        secrets.extend(oauth.issued());
        server.stop(WAIT).await;
    }
    assert_no_secret_logged(&secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_back_off_then_recover() {
    let dir = tempfile::tempdir().unwrap();
    let path = secret_file(&dir, "secret", "s3cret-value");
    let oauth = OAuthServer::start(OAuthConfig::new("client-1", "s3cret-value")).await;
    oauth.script([
        Reply::raw(500, "text/plain", "down"),
        Reply::raw(503, "text/plain", "down").header("retry-after", "0"),
    ]);
    let text = client_credentials(&oauth, &path, "");
    let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
    let mut client = server.client().await;
    let deadline = std::time::Instant::now() + WAIT;
    let token = loop {
        match get(&mut client, "api", WAIT).await {
            Ok(t) => break t,
            Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(oauth.calls(), 3, "two failures, then one success");
    assert_eq!(oauth.issued(), vec![token.value]);
}

fn overdrive_config(oauth: &OAuthServer, od: &OverDriveServer, secret_path: &str) -> String {
    let base = od.base_url();
    let mut text = format!(
        "[collections.od-oauth]\nprefetch = false\n[collections.od-oauth.source]\nkind = \"oauth2_client_credentials\"\ntoken_url = \"{}\"\nclient_id = \"library-key\"\nclient_secret_file = \"{secret_path}\"\n{}",
        oauth.token_url(),
        fast_policy("od-oauth", "20ms"),
    );
    for (name, library, account) in [
        ("od-main", "4425", None),
        ("od-branch", "77", None),
        ("od-advantage", "4425", Some("98")),
    ] {
        text.push_str(&format!(
            "[collections.{name}]\nprefetch = false\n[collections.{name}.source]\nkind = \"overdrive\"\noauth = \"od-oauth\"\napi_base = \"{base}\"\nlibrary_id = \"{library}\"\n"
        ));
        if let Some(a) = account {
            text.push_str(&format!("advantage_account_id = {a}\n"));
        }
        text.push_str(&fast_policy(name, "20ms"));
    }
    text
}

async fn overdrive_setup() -> (
    Arc<OAuthServer>,
    Arc<OverDriveServer>,
    String,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let secret = random_secret("od-secret");
    let oauth = OAuthServer::start(OAuthConfig::new("library-key", &secret)).await;
    let od = OverDriveServer::start(oauth.clone()).await;
    od.set_library("4425", &random_secret("collection-main"));
    od.set_library("77", &random_secret("collection-branch"));
    od.set_advantage("4425", "98", &random_secret("collection-adv"));
    od.set_advantage("4425", "99", &random_secret("collection-other"));
    let text = overdrive_config(&oauth, &od, &secret_file(&dir, "secret", &secret));
    (oauth, od, text, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdrive_children_share_one_oauth_token_and_a_401_refreshes_it_once() {
    capture_logs();
    let (oauth, od, text, _dir) = overdrive_setup().await;
    let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
    let children = ["od-main", "od-branch", "od-advantage"];
    // All three at once, cold: one OAuth grant serves them all.
    let tokens = futures_join(&server, &children).await;
    assert_eq!(oauth.grants("client_credentials"), 1);
    let collection_token =
        |r: &crate::support::upstream::Recorded| r.header("authorization").map(str::to_owned);
    let bearer = format!("Bearer {}", oauth.issued()[0]);
    assert!(
        od.requests()
            .iter()
            .all(|r| collection_token(r) == Some(bearer.clone()))
    );
    // The values are the library documents' collection tokens; the Advantage
    // one comes from the advantage account list.
    let docs = od.requests();
    assert_eq!(docs.len(), 3);
    assert_eq!(od.library_calls(), 2);
    assert_eq!(od.advantage_calls(), 1);
    assert!(tokens.iter().all(|t| t.value.starts_with("collection-")));
    assert!(
        tokens[2].value.starts_with("collection-adv"),
        "{:?}",
        tokens[2].value
    );

    // OverDrive stops accepting the OAuth token. Every child is refreshed
    // (forced by the app); each gets a 401, reports the OAuth token rejected
    // and retries: one OAuth refresh in all, not one per child.
    oauth.revoke_all();
    let mut client = server.client().await;
    let mut handles = Vec::new();
    for (name, t) in children.iter().zip(&tokens) {
        let mut client = client.clone();
        let (name, version) = (name.to_string(), t.version);
        handles.push(tokio::spawn(async move {
            invalidate(&mut client, &name, version).await.unwrap()
        }));
    }
    for h in handles {
        // The collection token itself did not change: same value, same
        // version (a refetch, not a rotation).
        let (t, _) = h.await.unwrap();
        assert_eq!(t.version, 1);
    }
    // Children whose refetch started after the first 401 already wait for
    // the new OAuth token (they were marked as fetched with the rejected
    // one), so 1 to 3 of them see a 401.
    let refused = od.unauthorized();
    assert!((1..=3).contains(&refused), "{refused}");
    assert_eq!(
        oauth.grants("client_credentials"),
        2,
        "one OAuth refresh for all the 401s"
    );
    let oauth_token = get(&mut client, "od-oauth", WAIT).await.unwrap();
    assert_eq!(oauth_token.version, 2);
    // Every request after the initial three and the refused ones carries the
    // new OAuth token. (An invalidate that arrives after the cascade already
    // refetched its child names a version that is still current, since the
    // refetch returned the same collection token, so it may refetch once more:
    // hence "at least" three.)
    let requests = od.requests();
    let new_bearer = format!("Bearer {}", oauth.issued()[1]);
    let with_new = requests
        .iter()
        .filter(|r| collection_token(r) == Some(new_bearer.clone()))
        .count();
    assert_eq!(requests.len() - with_new, 3 + refused, "old-token requests");
    assert!(
        with_new >= 3,
        "{with_new} requests with the new OAuth token"
    );
    let mut secrets: Vec<String> = tokens.iter().map(|t| t.value.clone()).collect();
    secrets.extend(oauth.issued());
    assert_no_secret_logged(&secrets);
}

async fn futures_join(server: &TestServer, names: &[&str]) -> Vec<pb::Token> {
    let mut handles = Vec::new();
    for name in names {
        let mut client = server.client().await;
        let name = name.to_string();
        handles.push(tokio::spawn(async move {
            get(&mut client, &name, WAIT).await.unwrap()
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdrive_error_documents_are_never_tokens() {
    capture_logs();
    let (oauth, od, text, _dir) = overdrive_setup().await;
    // Long backoff: one attempt per case.
    let text = text.replace("\"20ms\"", "\"30s\"");
    let cases = [
        (
            "errorCode with HTTP 200",
            Reply::json(
                200,
                json!({"errorCode": "InternalError", "message": "sorry", "collectionToken": "nope-123"}),
            ),
            Code::FailedPrecondition,
            "bad_response",
        ),
        (
            "404",
            Reply::json(404, json!({"errorCode": "NotFound"})),
            Code::FailedPrecondition,
            "rejected",
        ),
        (
            "missing collectionToken",
            Reply::json(200, json!({"id": 4425, "name": "Library"})),
            Code::FailedPrecondition,
            "bad_response",
        ),
        (
            "503",
            Reply::json(503, json!({"errorCode": "ServiceUnavailable"})),
            Code::Unavailable,
            "upstream_error",
        ),
    ];
    for (name, reply, code, class) in cases {
        let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
        let mut client = server.client().await;
        // The OAuth token first, so that the scripted reply meets the library call.
        get(&mut client, "od-oauth", WAIT).await.unwrap();
        od.script([reply]);
        let e = get(&mut client, "od-main", WAIT).await.unwrap_err();
        assert_eq!(e.code(), code, "{name}: {e:?}");
        assert!(
            e.message()
                .contains(&format!("({class}, 1 consecutive failures)")),
            "{name}: {}",
            e.message()
        );
        server.stop(WAIT).await;
    }
    // An Advantage account that the list does not hold is an error too.
    let text = text.replace("advantage_account_id = 98", "advantage_account_id = 12345");
    let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
    let e = get(&mut server.client().await, "od-advantage", WAIT)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("bad_response"), "{}", e.message());
    assert!(!crate::support::logs().contains("nope-123"));
    assert_no_secret_logged(oauth.issued());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_a_parent_refreshes_only_children_fetched_with_it() {
    let (oauth, od, text, _dir) = overdrive_setup().await;
    let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
    let mut client = server.client().await;
    // od-main is fetched with OAuth version 1.
    get(&mut client, "od-main", WAIT).await.unwrap();
    // The OAuth token rotates without a rejection (a caller wants a longer
    // lifetime): od-main keeps its token, fetched with version 1.
    let v2 = get_with_min_remaining(&mut client, "od-oauth", Duration::from_secs(7200)).await;
    assert_eq!(v2.version, 2);
    // od-branch is fetched with OAuth version 2.
    get(&mut client, "od-branch", WAIT).await.unwrap();
    assert_eq!(od.library_calls(), 2);
    // Version 2 is rejected: od-branch (fetched with it) is refreshed,
    // od-main (fetched with version 1) is not.
    let (v3, replaced) = invalidate(&mut client, "od-oauth", 2).await.unwrap();
    assert!(replaced);
    assert_eq!(v3.version, 3);
    let deadline = std::time::Instant::now() + WAIT;
    while od.library_calls() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "od-branch was not refreshed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fetched: Vec<String> = od.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        fetched,
        ["/v1/libraries/4425", "/v1/libraries/77", "/v1/libraries/77"],
        "only the child fetched with the rejected version is refetched"
    );
    let bearer = od.requests()[2].header("authorization").unwrap().to_owned();
    assert_eq!(
        bearer,
        format!("Bearer {}", oauth.issued()[2]),
        "with the new OAuth token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_json_sends_secrets_by_reference_and_reads_pointers() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let api_key = random_secret("api-key");
    let password = random_secret("password");
    let session = random_secret("session-token");
    let expires = SystemTime::now() + Duration::from_secs(3600);
    let expires_text = humantime::format_rfc3339_seconds(expires).to_string();
    let login = FakeHttp::start({
        let session = session.clone();
        move |req, n| {
            if req.path != "/login" {
                return Reply::json(404, json!({}));
            }
            Reply::json(
                200,
                json!({"session": {"token": format!("{session}-{n}"), "expires_at": expires_text}}),
            )
        }
    })
    .await;
    let download = FakeHttp::start(|req, n| {
        let bearer = req.header("authorization").unwrap_or("").to_owned();
        if !bearer.starts_with("Bearer session-token-") {
            return Reply::json(401, json!({"error": "unauthorized"}));
        }
        Reply::json(
            200,
            json!({"data": {"token": format!("download-token-{n:04}"), "ttl": 900}}),
        )
    })
    .await;
    let text = format!(
        r#"
[collections.session.source]
kind = "http_json"
url = "{login}"
headers = {{ "X-Api-Key" = {{ file = "{key_path}" }} }}
json = {{ username = "svc", password = {{ file = "{password_path}" }}, options = {{ remember = true }} }}
token_pointer = "/session/token"
expires_pointer = "/session/expires_at"
expires_format = "rfc3339"

[collections.download.source]
kind = "http_json"
method = "POST"
url = "{download}"
bearer_from = "session"
form = {{ purpose = "export", pin = {{ file = "{password_path}" }} }}
token_pointer = "/data/token"
expires_pointer = "/data/ttl"

{policy}"#,
        policy = fast_policy("download", "20ms"),
        login = login.url("/login"),
        download = download.url("/tokens"),
        key_path = secret_file(&dir, "key", &api_key),
        password_path = secret_file(&dir, "password", &password),
    );
    let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
    let mut client = server.client().await;
    let s = get(&mut client, "session", WAIT).await.unwrap();
    assert_eq!(s.value, format!("{session}-1"));
    let skew = Duration::from_secs(30);
    let want = expires - skew;
    let got = ts(&s.expires_at);
    assert!(
        got <= want + Duration::from_secs(1) && got + Duration::from_secs(1) >= want,
        "expiry from the RFC 3339 field"
    );
    let req = &login.requests()[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.header("x-api-key"), Some(api_key.as_str()));
    assert_eq!(
        req.json(),
        json!({"username": "svc", "password": password, "options": {"remember": true}})
    );
    let d = get(&mut client, "download", WAIT).await.unwrap();
    assert_eq!(d.value, "download-token-0001");
    let lifetime = ts(&d.expires_at).duration_since(ts(&d.fetched_at)).unwrap();
    assert_eq!(lifetime, Duration::from_secs(870));
    let req = &download.requests()[0];
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {}", s.value).as_str())
    );
    assert_eq!(req.form()["purpose"], "export");
    assert_eq!(req.form()["pin"], password);
    // The session token was fetched once and shared.
    assert_eq!(login.calls(), 1);

    // A body without the token field is an error, never a token.
    download.script([Reply::json(200, json!({"data": {"ttl": 900}}))]);
    let (t, replaced) = invalidate(&mut client, "download", d.version)
        .await
        .unwrap();
    assert!(!replaced, "the failed refresh left the old token in place");
    assert_eq!(t.value, d.value);
    assert_no_secret_logged([api_key, password, session]);
}

/// An upstream's absurd lifetime is capped at `max_lifetime`, and an expiry
/// past 9999 is a `bad_response` that a later sane answer recovers from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_expiries_are_capped_or_refused_never_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let secret = random_secret("client-secret");
    let path = secret_file(&dir, "secret", &secret);
    let oauth = OAuthServer::start(OAuthConfig::new("client-1", &secret)).await;
    oauth.script([Reply::json(
        200,
        json!({"access_token": "long-lived", "expires_in": 9_999_999_999u64}),
    )]);
    let text = client_credentials(&oauth, &path, "");
    let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
    let mut client = server.client().await;
    let t = get(&mut client, "api", WAIT).await.unwrap();
    let lives = ts(&t.expires_at)
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        lives <= Duration::from_secs(24 * 3600),
        "capped at max_lifetime (24 h), not 316 years: {lives:?}"
    );
    server.stop(WAIT).await;

    let expiry = std::sync::Arc::new(std::sync::Mutex::new(
        "9999-12-31T23:59:59-99:59".to_owned(),
    ));
    let upstream = FakeHttp::start({
        let expiry = expiry.clone();
        move |_, n| {
            Reply::json(
                200,
                json!({"token": format!("t-{n}"), "expires": expiry.lock().unwrap().clone()}),
            )
        }
    })
    .await;
    let text = format!(
        "[collections.j]\nprefetch = false\n[collections.j.source]\nkind = \"http_json\"\nurl = \"{}\"\ntoken_pointer = \"/token\"\nexpires_pointer = \"/expires\"\nexpires_format = \"rfc3339\"\n{}",
        upstream.url("/t"),
        fast_policy("j", "20ms"),
    );
    let server = TestServer::from_toml(&text, Arc::new(MemoryStore::new())).await;
    let mut client = server.client().await;
    let e = get(&mut client, "j", WAIT).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("bad_response"), "{}", e.message());
    // The refresher is alive: once the upstream is sane, the collection recovers.
    *expiry.lock().unwrap() =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600))
            .to_string();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match get(&mut client, "j", WAIT).await {
            Ok(t) => {
                assert!(t.value.starts_with("t-"));
                break;
            }
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never recovered: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    server.stop(WAIT).await;
}
