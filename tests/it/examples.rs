//! The example configs under `examples/`, each run by the real binary against
//! fake upstreams: the file as shipped passes `check-config`; the same file
//! with its upstream URLs pointed at the fakes serves the tokens the fakes
//! issue; the server's debug log holds none of the secrets.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::support::binary::Served;
use crate::support::random_secret;
use crate::support::upstream::{FakeHttp, OAuthConfig, OAuthServer, OverDriveServer, Reply};

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name)
}

/// The example with `collections.<c>.source.<field>` replaced, for each edit.
fn rewritten(name: &str, edits: &[(&str, &str, String)]) -> String {
    let text = std::fs::read_to_string(example(name)).unwrap();
    let mut table: toml::Table = text.parse().unwrap();
    for (collection, field, value) in edits {
        let source = table["collections"][*collection]["source"]
            .as_table_mut()
            .unwrap();
        assert!(
            source.contains_key(*field),
            "{name}: no {collection}.{field}"
        );
        source.insert((*field).to_owned(), toml::Value::String(value.clone()));
    }
    toml::to_string(&table).unwrap()
}

fn check_config(name: &str, env: &[(&str, &str)]) {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(example(name))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the secrets' variables the same file fails, naming the field.
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(example(name))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{name}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("env: environment variable") && err.contains(" is not set"),
        "{name}: {err}"
    );
}

fn assert_clean(log: &str, secrets: &[String]) {
    assert!(
        log.contains("token rotated"),
        "no refresh in the log:\n{log}"
    );
    for s in secrets {
        assert!(
            !log.contains(s.as_str()),
            "a secret appears in the server log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_example() {
    let secret = random_secret("partner-secret");
    let env = [("PARTNER_CLIENT_SECRET", secret.as_str())];
    check_config("oauth2.toml", &env);
    let oauth = OAuthServer::start(OAuthConfig::new("token-broker", &secret)).await;
    let config = rewritten(
        "oauth2.toml",
        &[("partner-api", "token_url", oauth.token_url())],
    );
    let served = Served::start(&config, &env).await;
    let token = served.get("partner-api").await;
    assert_eq!(oauth.issued(), vec![token]);
    // Standard fields only: the provider-specific `audience` is commented out.
    let form = oauth.requests()[0].form();
    assert_eq!(form["scope"], "orders:read orders:write");
    assert!(!form.contains_key("audience"), "{form:?}");
    let log = served.stop();
    let mut secrets = vec![secret];
    secrets.extend(oauth.issued());
    assert_clean(&log, &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_example() {
    let secret = random_secret("mail-secret");
    let seed = random_secret("mail-refresh");
    let env = [
        ("MAILBOX_CLIENT_SECRET", secret.as_str()),
        ("MAILBOX_REFRESH_TOKEN", seed.as_str()),
    ];
    check_config("refresh-token.toml", &env);
    let oauth = OAuthServer::start(OAuthConfig {
        refresh_token: Some(seed.clone()),
        ..OAuthConfig::new("sidecar", &secret)
    })
    .await;
    let config = rewritten(
        "refresh-token.toml",
        &[("mailbox", "token_url", oauth.token_url())],
    );
    let served = Served::start(&config, &env).await;
    let token = served.get("mailbox").await;
    assert_eq!(oauth.issued(), vec![token]);
    assert_eq!(oauth.grants("refresh_token"), 1);
    // No scope on the refresh: the original grant's scopes (a standards-following server
    // refuses a wider one with invalid_scope).
    let form = oauth.requests()[0].form();
    assert_eq!(form["grant_type"], "refresh_token");
    assert!(!form.contains_key("scope"), "{form:?}");
    let rotated = oauth.refresh_token().unwrap();
    let log = served.stop();
    let mut secrets = vec![secret, seed, rotated];
    secrets.extend(oauth.issued());
    assert_clean(&log, &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdrive_example() {
    let secret = random_secret("od-secret");
    let env = [("OVERDRIVE_CLIENT_SECRET", secret.as_str())];
    check_config("overdrive.toml", &env);
    let oauth = OAuthServer::start(OAuthConfig::new("my-library-key", &secret)).await;
    let od = OverDriveServer::start(oauth.clone()).await;
    let main = random_secret("collection-main");
    let advantage = random_secret("collection-advantage");
    od.set_library("4425", &main);
    od.set_advantage("4425", "98", &advantage);
    od.set_advantage("4425", "99", &random_secret("collection-other"));
    let config = rewritten(
        "overdrive.toml",
        &[
            ("overdrive-oauth", "token_url", oauth.token_url()),
            ("overdrive-main", "api_base", od.base_url()),
            ("overdrive-advantage", "api_base", od.base_url()),
        ],
    );
    let served = Served::start(&config, &env).await;
    assert_eq!(served.get("overdrive-main").await, main);
    assert_eq!(served.get("overdrive-advantage").await, advantage);
    assert_eq!(
        oauth.grants("client_credentials"),
        1,
        "one OAuth token shared by both"
    );
    let log = served.stop();
    let mut secrets = vec![secret, main, advantage];
    secrets.extend(oauth.issued());
    assert_clean(&log, &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_json_example() {
    let api_key = random_secret("reporting-key");
    let password = random_secret("reporting-password");
    let env = [
        ("REPORTING_API_KEY", api_key.as_str()),
        ("REPORTING_PASSWORD", password.as_str()),
    ];
    check_config("http-json.toml", &env);
    let session = random_secret("session");
    let expires =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600))
            .to_string();
    let login = FakeHttp::start({
        let (session, api_key, password) = (session.clone(), api_key.clone(), password.clone());
        move |req, _| {
            let body = req.json();
            if req.header("x-api-key") != Some(api_key.as_str()) || body["password"] != *password {
                return Reply::json(401, json!({"error": "bad login"}));
            }
            Reply::json(
                200,
                json!({"session": {"token": session, "expires_at": expires}}),
            )
        }
    })
    .await;
    let download = FakeHttp::start({
        let session = session.clone();
        move |req, n| {
            if req.header("authorization") != Some(format!("Bearer {session}").as_str()) {
                return Reply::json(401, json!({}));
            }
            Reply::json(
                200,
                json!({"data": {"token": format!("download-{n:08}"), "ttl": 900}}),
            )
        }
    })
    .await;
    let config = rewritten(
        "http-json.toml",
        &[
            ("reporting-session", "url", login.url("/api/v2/login")),
            (
                "reporting-download",
                "url",
                download.url("/api/v2/download-tokens"),
            ),
        ],
    );
    let served = Served::start(&config, &env).await;
    assert_eq!(served.get("reporting-download").await, "download-00000001");
    assert_eq!(served.get("reporting-session").await, session);
    assert_eq!(login.calls(), 1);
    assert_eq!(download.requests()[0].form()["purpose"], "export");
    let log = served.stop();
    assert_clean(&log, &[api_key, password, session]);
}

/// `HTTP_PROXY` (and, the same way, `HTTPS_PROXY`) routes upstream calls
/// through a proxy; `NO_PROXY` exempts hosts. The proxied upstream's name is
/// never resolved (the proxy gets the whole URL), so no traffic leaves
/// loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_calls_honour_proxy_variables() {
    let secret = random_secret("proxied-secret");
    let proxy = FakeHttp::start(|req, n| {
        if req.path != "/oauth2/token" || req.form()["grant_type"] != "client_credentials" {
            return Reply::json(400, json!({"error": "invalid_request"}));
        }
        Reply::json(
            200,
            json!({"access_token": format!("via-proxy-{n:06}"), "expires_in": 600}),
        )
    })
    .await;
    let config = rewritten(
        "oauth2.toml",
        &[(
            "partner-api",
            "token_url",
            "http://login.upstream.invalid/oauth2/token".to_owned(),
        )],
    );
    let proxy_url = proxy.url("");
    let env = [
        ("PARTNER_CLIENT_SECRET", secret.as_str()),
        ("HTTP_PROXY", proxy_url.as_str()),
        ("NO_PROXY", ""),
    ];
    let served = Served::start(&config, &env).await;
    assert_eq!(served.get("partner-api").await, "via-proxy-000001");
    let seen = &proxy.requests()[0];
    assert_eq!(seen.header("host"), Some("login.upstream.invalid"));
    drop(served);

    // With the host in NO_PROXY the proxy is bypassed: the broker connects
    // directly to a loopback port where nothing listens (class `connect`).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = rewritten(
        "oauth2.toml",
        &[(
            "partner-api",
            "token_url",
            format!("http://localhost:{port}/oauth2/token"),
        )],
    );
    let env = [
        ("PARTNER_CLIENT_SECRET", secret.as_str()),
        ("HTTP_PROXY", proxy_url.as_str()),
        ("NO_PROXY", "localhost"),
    ];
    let served = Served::start(&config, &env).await;
    let e = served.try_get("partner-api").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("(connect, "), "{}", e.message());
    assert_eq!(proxy.calls(), 1, "NO_PROXY bypassed the proxy");
}
