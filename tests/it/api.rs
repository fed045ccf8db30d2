//! The API contract: validation, error codes, limits, health and reflection.

use std::time::Duration;

use token_broker::config::ServerConfig;
use token_broker::grpc::pb::{
    GetCollectionTokenRequest, InvalidateTokenRequest, WatchTokenRequest,
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::support::{Scripted, Step, TestServer, get, policy, required, spec, steady};

const T: Duration = Duration::from_secs(30);

async fn demo_server() -> TestServer {
    TestServer::start(vec![steady("demo")]).await
}

#[tokio::test]
async fn malformed_names_are_invalid_argument_naming_the_field() {
    let server = demo_server().await;
    let mut client = server.client().await;
    for bad in [
        "".to_owned(),
        "a/b".into(),
        "with space".into(),
        "ü".into(),
        "x".repeat(129),
    ] {
        let err = get(&mut client, &bad, T).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
        assert!(
            err.message().starts_with("collection: "),
            "{}",
            err.message()
        );
        let err = client
            .watch_token(WatchTokenRequest {
                collection: bad.clone(),
                after_version: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = client
            .invalidate_token(InvalidateTokenRequest {
                collection: bad,
                version: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    // 128 characters is fine (and unknown).
    let err = get(&mut client, &"x".repeat(128), T).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn unknown_collections_are_not_found() {
    let server = demo_server().await;
    let mut client = server.client().await;
    let err = get(&mut client, "nope", T).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("\"nope\""), "{}", err.message());
    let err = client
        .watch_token(WatchTokenRequest {
            collection: "nope".into(),
            after_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn other_bad_fields_are_named() {
    let server = demo_server().await;
    let mut client = server.client().await;
    let err = client
        .invalidate_token(InvalidateTokenRequest {
            collection: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("version: "), "{}", err.message());
    let err = client
        .invalidate_token(InvalidateTokenRequest {
            collection: "demo".into(),
            version: 1,
            reason: "r".repeat(1025),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("reason: "), "{}", err.message());
    let err = client
        .get_collection_token(GetCollectionTokenRequest {
            collection: "demo".into(),
            min_remaining: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("min_remaining: "),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn oversized_messages_are_rejected_and_the_server_keeps_serving() {
    let cfg = ServerConfig {
        max_message_bytes: 4096,
        ..ServerConfig::default()
    };
    let server = TestServer::start_with(vec![steady("demo")], cfg).await;
    let mut client = server.client().await;
    let err = client
        .invalidate_token(InvalidateTokenRequest {
            collection: "demo".into(),
            version: 1,
            value: "v".repeat(8000),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
    assert!(!err.message().contains("vvvv"));
    get(&mut client, "demo", T).await.unwrap();
}

#[tokio::test]
async fn concurrency_limit_sheds_load_but_not_health() {
    let cfg = ServerConfig {
        max_concurrent_requests: 2,
        ..ServerConfig::default()
    };
    let (source, gate) = Scripted::gated([], Step::Token(Some(Duration::from_secs(300))));
    let server = TestServer::start_with(vec![spec("slow", source, policy(), false)], cfg).await;
    let channel = server.channel().await;
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut c =
            token_broker::grpc::pb::token_broker_client::TokenBrokerClient::new(channel.clone());
        waiting.push(tokio::spawn(async move { get(&mut c, "slow", T).await }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut client = server.client().await;
    let err = get(&mut client, "slow", T).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Health and reflection are outside the limit.
    let mut health = HealthClient::new(channel.clone());
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    gate.add_permits(1);
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    get(&mut client, "slow", T).await.unwrap();
}

#[tokio::test]
async fn health_is_serving_once_required_collections_hold_a_token() {
    let (source, gate) = Scripted::gated([], Step::Token(Some(Duration::from_secs(300))));
    let server = TestServer::start(vec![
        required(spec("pre", source, policy(), true)),
        spec(
            "lazy",
            Scripted::tokens(Duration::from_secs(300)),
            policy(),
            false,
        ),
        // Prefetched but not required: its failing upstream does not hold
        // readiness back.
        spec(
            "optional",
            Scripted::new([], Step::Fail(token_broker::source::FailureClass::Connect)),
            policy(),
            true,
        ),
    ])
    .await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "token_broker.v1.TokenBroker"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::NotServing as i32, "{service:?}");
    }
    let mut updates = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        updates.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    gate.add_permits(1);
    let next = tokio::time::timeout(T, updates.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn reflection_lists_every_service_in_v1_and_v1alpha() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as V1;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest as V1Req;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse as V1Resp;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as V1a;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as V1aReq;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as V1aResp;

    let server = demo_server().await;
    let channel = server.channel().await;
    let expected = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "token_broker.v1.TokenBroker",
    ];

    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(V1Req::ListServices(String::new())),
    };
    let mut resp = V1::new(channel.clone())
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let Some(V1Resp::ListServicesResponse(list)) =
        resp.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a list")
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, expected);

    let req = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(V1aReq::FileContainingSymbol("grpc.health.v1.Health".into())),
    };
    let mut resp = V1a::new(channel)
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.next().await.unwrap().unwrap().message_response;
    assert!(
        matches!(msg, Some(V1aResp::FileDescriptorResponse(_))),
        "{msg:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn health_drops_to_not_serving_when_a_required_token_expires() {
    // One 100 s token (hard expiry after 90 s), then the upstream fails for ever.
    let source = Scripted::new(
        [Step::Token(Some(Duration::from_secs(100)))],
        Step::Fail(token_broker::source::FailureClass::Timeout),
    );
    let started = tokio::time::Instant::now();
    let server = TestServer::start(vec![required(spec("c", source, policy(), true))]).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut updates = health
        .watch(HealthCheckRequest {
            service: "token_broker.v1.TokenBroker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let serving = ServingStatus::Serving as i32;
    while updates.next().await.unwrap().unwrap().status != serving {}
    let next = updates.next().await.unwrap().unwrap().status;
    assert_eq!(next, ServingStatus::NotServing as i32);
    let at = started.elapsed();
    assert!(
        at >= Duration::from_secs(90) && at < Duration::from_secs(91),
        "readiness changed at {at:?}, the token expired at 90 s"
    );
}
