//! `WatchToken`: every rotation in order, resumption with `after_version`, and
//! streams freed when their client goes away.

use std::time::Duration;

use token_broker::config::ServerConfig;
use token_broker::grpc::pb::WatchTokenRequest;
use tonic::Code;

use crate::support::{Scripted, TestServer, get, next_token, policy, spec, steady};

fn req(after_version: u64) -> WatchTokenRequest {
    WatchTokenRequest {
        collection: "c".into(),
        after_version,
    }
}

#[tokio::test(start_paused = true)]
async fn a_watcher_sees_every_rotation_in_order() {
    let source = Scripted::tokens(Duration::from_secs(40));
    let server = TestServer::start(vec![spec("c", source.clone(), policy(), true)]).await;
    let mut client = server.client().await;
    let mut stream = client.watch_token(req(0)).await.unwrap().into_inner();
    let mut versions = Vec::new();
    let mut values = Vec::new();
    while versions.len() < 6 {
        let token = next_token(&mut stream).await;
        versions.push(token.version);
        values.push(token.value);
    }
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        values,
        ["tok-1", "tok-2", "tok-3", "tok-4", "tok-5", "tok-6"]
    );
    assert_eq!(source.calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn reconnecting_with_after_version_misses_nothing() {
    let source = Scripted::tokens(Duration::from_secs(400));
    let server = TestServer::start(vec![spec("c", source.clone(), policy(), true)]).await;
    let mut client = server.client().await;
    let mut stream = client.watch_token(req(0)).await.unwrap().into_inner();
    let first = next_token(&mut stream).await;
    assert_eq!(first.version, 1);
    drop(stream);
    // Two rotations happen while the watcher is away (300 s apart each).
    tokio::time::sleep(Duration::from_secs(650)).await;
    assert_eq!(
        get(&mut client, "c", Duration::from_secs(5))
            .await
            .unwrap()
            .version,
        3
    );
    // Back with after_version = 1: versions 2 and 3 come, in order, then 4 live.
    let mut stream = client.watch_token(req(1)).await.unwrap().into_inner();
    for expected in 2..=4 {
        let token = next_token(&mut stream).await;
        assert_eq!(token.version, expected);
    }
    // A watcher already current waits for the next rotation instead of
    // re-sending what it has.
    let mut stream = client.watch_token(req(4)).await.unwrap().into_inner();
    let token = next_token(&mut stream).await;
    assert_eq!(token.version, 5);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_frees_its_stream() {
    let cfg = ServerConfig {
        max_streams: 1,
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(vec![steady("c")], cfg).await;
    let mut client = server.client().await;
    let mut first = client.watch_token(req(0)).await.unwrap().into_inner();
    first.message().await.unwrap().unwrap();
    // The limit holds while the first stream is open...
    let mut other = server.client().await;
    let err = other.watch_token(req(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // ...and the stream's slot comes back once its client hangs up.
    drop(first);
    drop(client);
    let mut reopened = None;
    for _ in 0..100 {
        match other.watch_token(req(0)).await {
            Ok(s) => {
                reopened = Some(s.into_inner());
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut stream = reopened.expect("the abandoned stream was never freed");
    assert_eq!(next_token(&mut stream).await.version, 1);
}

#[tokio::test(start_paused = true)]
async fn a_watch_on_a_lazy_collection_fetches_it() {
    let source = Scripted::tokens(Duration::from_secs(300));
    let server = TestServer::start(vec![spec("c", source.clone(), policy(), false)]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        source.calls(),
        0,
        "a lazy collection was fetched before anyone asked"
    );
    let mut client = server.client().await;
    let mut stream = client.watch_token(req(0)).await.unwrap().into_inner();
    assert_eq!(next_token(&mut stream).await.version, 1);
}

#[tokio::test(start_paused = true)]
async fn a_new_watcher_gets_only_the_current_token_first() {
    let source = Scripted::tokens(Duration::from_secs(400));
    let server = TestServer::start(vec![spec("c", source.clone(), policy(), true)]).await;
    let mut client = server.client().await;
    // Rotate once by invalidation: version 1 is superseded but not expired.
    get(&mut client, "c", Duration::from_secs(5)).await.unwrap();
    let resp = client
        .invalidate_token(token_broker::grpc::pb::InvalidateTokenRequest {
            collection: "c".into(),
            version: 1,
            value: String::new(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.token.unwrap().version, 2);
    let mut stream = client.watch_token(req(0)).await.unwrap().into_inner();
    assert_eq!(next_token(&mut stream).await.version, 2);
}
