//! Serving over a Unix socket, and graceful shutdown.

use std::time::Duration;

use token_broker::config::ServerConfig;
use token_broker::grpc::pb::WatchTokenRequest;
use token_broker::listen::{ListenAddr, Listener};
use tonic::Code;

use crate::support::{TestServer, get, steady};

#[tokio::test]
async fn serves_over_a_unix_socket_and_removes_it_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sock");
    let listener = Listener::bind(&ListenAddr::Unix(path.clone()))
        .await
        .unwrap();
    let server = TestServer::start_on(vec![steady("c")], ServerConfig::default(), listener).await;
    let mut client = server.client().await;
    assert_eq!(
        get(&mut client, "c", Duration::from_secs(10))
            .await
            .unwrap()
            .version,
        1
    );
    drop(client);
    server.stop(Duration::from_secs(10)).await;
    assert!(!path.exists(), "socket file left behind");
}

#[tokio::test]
async fn shutdown_ends_streams_cleanly_and_returns() {
    let cfg = ServerConfig {
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(vec![steady("c")], cfg).await;
    let mut client = server.client().await;
    let mut stream = client
        .watch_token(WatchTokenRequest {
            collection: "c".into(),
            after_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    let started = tokio::time::Instant::now();
    server.shutdown.cancel();
    // The stream ends with a status that tells the client to reconnect.
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap();
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"));
    drop(stream);
    drop(client);
    server.stop(Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited for the whole grace period"
    );
}

#[tokio::test]
async fn shutdown_releases_callers_waiting_for_a_refresh() {
    let (source, _gate) = crate::support::Scripted::gated(
        [],
        crate::support::Step::Token(Some(Duration::from_secs(60))),
    );
    let server = TestServer::start(vec![crate::support::spec(
        "cold",
        source,
        crate::support::policy(),
        false,
    )])
    .await;
    let mut client = server.client().await;
    let waiting =
        tokio::spawn(async move { get(&mut client, "cold", Duration::from_secs(60)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    server.stop(Duration::from_secs(5)).await;
    let err = waiting.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("shutting down"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(2));
}
