//! The fakes' own tests: each server answers as its contract says.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{ClientAuth, FakeHttp, OAuthConfig, OAuthServer, OverDriveServer, Reply};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn body_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_client_credentials_and_client_auth() {
    let oauth = OAuthServer::start(OAuthConfig::new("app", "s3cret")).await;
    let http = client();

    let resp = http
        .post(oauth.token_url())
        .basic_auth("app", Some("s3cret"))
        .form(&[("grant_type", "client_credentials"), ("scope", "read")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let (status, doc) = body_json(resp).await;
    assert_eq!(status, 200, "{doc}");
    let token = doc["access_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("at-1-"), "{token}");
    assert_eq!(doc["token_type"], "Bearer");
    assert_eq!(doc["expires_in"], 3600);
    assert_eq!(doc["scope"], "read");
    assert!(oauth.is_valid(&token));
    assert_eq!(oauth.issued(), vec![token.clone()]);
    assert_eq!(oauth.grants("client_credentials"), 1);
    let rec = &oauth.requests()[0];
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.form()["grant_type"], "client_credentials");
    assert!(!format!("{rec:?}").contains("s3cret") && !format!("{rec:?}").contains("YXBw"));

    // Wrong secret.
    let resp = http
        .post(oauth.token_url())
        .basic_auth("app", Some("nope"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Basic realm=\"fake\"");
    let (status, doc) = body_json(resp).await;
    assert_eq!(
        (status, doc["error"].as_str()),
        (401, Some("invalid_client"))
    );

    // Both Basic and body credentials.
    let resp = http
        .post(oauth.token_url())
        .basic_auth("app", Some("s3cret"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "app"),
            ("client_secret", "s3cret"),
        ])
        .send()
        .await
        .unwrap();
    let (status, doc) = body_json(resp).await;
    assert_eq!(
        (status, doc["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // Unknown and missing grant types, wrong method.
    let resp = http
        .post(oauth.token_url())
        .basic_auth("app", Some("s3cret"))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    let (status, doc) = body_json(resp).await;
    assert_eq!(
        (status, doc["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    let resp = http
        .post(oauth.token_url())
        .basic_auth("app", Some("s3cret"))
        .form(&[("scope", "x")])
        .send()
        .await
        .unwrap();
    let (status, doc) = body_json(resp).await;
    assert_eq!(
        (status, doc["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let resp = http.get(oauth.token_url()).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);

    // Body client auth; expires_in omitted.
    let mut cfg = OAuthConfig::new("body app", "p@ss");
    cfg.client_auth = ClientAuth::Body;
    cfg.expires_in = None;
    let body = OAuthServer::start(cfg).await;
    let resp = http
        .post(body.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "body app"),
            ("client_secret", "p@ss"),
        ])
        .send()
        .await
        .unwrap();
    let (status, doc) = body_json(resp).await;
    assert_eq!(status, 200, "{doc}");
    assert!(doc.get("expires_in").is_none());
    // Basic is not accepted by a Body server.
    let resp = http
        .post(body.token_url())
        .basic_auth("body%20app", Some("p%40ss"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    // Urlencoded Basic credentials are accepted by a Basic server.
    let enc = OAuthServer::start(OAuthConfig::new("my app", "p@ss:w")).await;
    let resp = http
        .post(enc.token_url())
        .basic_auth("my+app", Some("p%40ss%3Aw"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    assert_eq!(oauth.calls(), 6);
    oauth.revoke_all();
    assert!(!oauth.is_valid(&token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_refresh_rotation_and_script() {
    let mut cfg = OAuthConfig::new("app", "s3cret");
    cfg.refresh_token = Some("rt-initial".to_owned());
    let oauth = OAuthServer::start(cfg).await;
    let http = client();
    let refresh = |rt: String| {
        http.post(oauth.token_url())
            .basic_auth("app", Some("s3cret"))
            .form(&[
                ("grant_type", "refresh_token".to_owned()),
                ("refresh_token", rt),
            ])
            .send()
    };

    let (status, doc) = body_json(refresh("rt-initial".into()).await.unwrap()).await;
    assert_eq!(status, 200, "{doc}");
    let next = doc["refresh_token"].as_str().unwrap().to_owned();
    assert!(next.starts_with("rt-1-"));
    assert_eq!(oauth.refresh_token().as_deref(), Some(next.as_str()));
    assert!(oauth.is_valid(doc["access_token"].as_str().unwrap()));

    // The used refresh token is dead.
    let (status, doc) = body_json(refresh("rt-initial".into()).await.unwrap()).await;
    assert_eq!(
        (status, doc["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(oauth.grants("refresh_token"), 1);

    // Scripted replies first, then back to normal.
    oauth.script([
        Reply::json(503, json!({"error": "temporarily_unavailable"})),
        Reply::raw(200, "text/html", "<html>proxy</html>").header("x-fake", "1"),
    ]);
    let r = refresh(next.clone()).await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let r = refresh(next.clone()).await.unwrap();
    assert_eq!(r.headers()["x-fake"], "1");
    assert_eq!(r.text().await.unwrap(), "<html>proxy</html>");
    let (status, _) = body_json(refresh(next.clone()).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(oauth.calls(), 5);
    assert_eq!(oauth.grants("refresh_token"), 2);
    assert_eq!(oauth.issued().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdrive_auth_libraries_and_advantage() {
    let oauth = OAuthServer::start(OAuthConfig::new("app", "s3cret")).await;
    let od = OverDriveServer::start(oauth.clone()).await;
    od.set_library("1225", "v1L1BYwAAAA2Q");
    od.set_advantage("1225", "4", "v1L1BDAAAAA2R");
    od.set_advantage("1225", "7", "v1L1BDAAAAA2S");
    let http = client();
    let get = |path: &str, bearer: &str| {
        http.get(format!("{}{path}", od.base_url()))
            .bearer_auth(bearer)
            .send()
    };

    let (status, doc) = body_json(get("/v1/libraries/1225", "at-bogus").await.unwrap()).await;
    assert_eq!(
        (status, doc["errorCode"].as_str()),
        (401, Some("Unauthorized"))
    );

    let resp = http
        .post(oauth.token_url())
        .basic_auth("app", Some("s3cret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    let token = body_json(resp).await.1["access_token"]
        .as_str()
        .unwrap()
        .to_owned();

    let resp = get("/v1/libraries/1225", &token).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let (status, doc) = body_json(resp).await;
    assert_eq!(status, 200);
    assert_eq!(doc["id"], 1225);
    assert_eq!(doc["collectionToken"], "v1L1BYwAAAA2Q");

    let (status, doc) = body_json(
        get("/v1/libraries/1225/advantageAccounts", &token)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(doc["totalItems"], 2);
    assert_eq!(doc["advantageAccounts"][0]["id"], 4);
    assert_eq!(
        doc["advantageAccounts"][1]["collectionToken"],
        "v1L1BDAAAAA2S"
    );

    let (status, doc) = body_json(get("/v1/libraries/999", &token).await.unwrap()).await;
    assert_eq!((status, doc["errorCode"].as_str()), (404, Some("NotFound")));
    let (status, _) = body_json(
        get("/v1/libraries/999/advantageAccounts", &token)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);

    // Revocation makes the bearer invalid; scripted replies count too.
    oauth.revoke_all();
    assert_eq!(
        get("/v1/libraries/1225", &token)
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    od.script([Reply::json(401, json!({}))]);
    assert_eq!(
        get("/v1/libraries/1225", "x")
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );

    assert_eq!(od.library_calls(), 5);
    assert_eq!(od.advantage_calls(), 2);
    assert_eq!(od.unauthorized(), 3);
    assert_eq!(od.requests().len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_http_script_delay_and_recording() {
    let fake =
        FakeHttp::start(|rec, n| Reply::json(200, json!({ "n": n, "path": rec.path }))).await;
    let http = client();
    fake.script([Reply::raw(500, "text/plain", "boom").delayed(Duration::from_millis(200))]);

    let started = Instant::now();
    let resp = http
        .put(fake.url("/x?y=1"))
        .header("X-Thing", "v")
        .body(r#"{"a":1}"#)
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(resp.status().as_u16(), 500);
    assert_eq!(resp.text().await.unwrap(), "boom");

    let (status, doc) = body_json(http.get(fake.url("/y")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(doc, json!({ "n": 2, "path": "/y" }));

    assert_eq!(fake.calls(), 2);
    let reqs = fake.requests();
    assert_eq!(reqs[0].method, "PUT");
    assert_eq!(reqs[0].query.as_deref(), Some("y=1"));
    assert_eq!(reqs[0].header("x-thing"), Some("v"));
    assert_eq!(reqs[0].json(), json!({ "a": 1 }));

    // Dropping the server stops it.
    let url = fake.url("/z");
    drop(fake);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(http.get(url).send().await.is_err());
}
