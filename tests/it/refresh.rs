//! The refresh path and its invariants (design.md section 4), through the real
//! server, with tokio's clock paused so that expiry and backoff are exact.

use std::time::Duration;

use token_broker::broker::Policy;
use token_broker::grpc::pb::{GetCollectionTokenRequest, InvalidateTokenRequest};
use token_broker::source::FailureClass;
use tokio::time::{Instant, advance, sleep};
use tonic::Code;

use crate::support::{Scripted, Step, TestServer, get, policy, settle, spec, ts};

const T: Duration = Duration::from_secs(30);

#[tokio::test(start_paused = true)]
async fn thousand_concurrent_cold_reads_make_one_upstream_call() {
    let (source, gate) = Scripted::gated([], Step::Token(Some(Duration::from_secs(300))));
    let server = TestServer::start(vec![spec("cold", source.clone(), policy(), false)]).await;
    // Ten connections, a hundred calls each, all in flight together.
    let mut calls = Vec::new();
    for _ in 0..10 {
        let channel = server.channel().await;
        for _ in 0..100 {
            let mut c = token_broker::grpc::pb::token_broker_client::TokenBrokerClient::new(
                channel.clone(),
            );
            calls.push(tokio::spawn(async move { get(&mut c, "cold", T).await }));
        }
    }
    // Let every call reach the broker and park, then let the upstream answer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        source.calls(),
        1,
        "the cold collection was fetched more than once"
    );
    assert!(
        calls.iter().all(|c| !c.is_finished()),
        "every reader must be parked on the one refresh in flight"
    );
    gate.add_permits(1);
    for call in calls {
        let token = call.await.unwrap().unwrap();
        assert_eq!((token.version, token.value.as_str()), (1, "tok-1"));
    }
    assert_eq!(source.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn never_serves_at_or_after_hard_expiry() {
    // One good token living 100 s, then the upstream fails for ever.
    let source = Scripted::new(
        [Step::Token(Some(Duration::from_secs(100)))],
        Step::Fail(FailureClass::Timeout),
    );
    let server = TestServer::start(vec![spec("c", source.clone(), policy(), true)]).await;
    let mut client = server.client().await;
    let token = get(&mut client, "c", T).await.unwrap();
    let expires_at = ts(&token.expires_at);
    // Hard expiry is 10% of the lifetime (shorter than 30 s) before the upstream's.
    assert_eq!(expires_at, ts(&token.fetched_at) + Duration::from_secs(90));

    // Just before the hard expiry: still served, flagged stale (refresh failing).
    // (sleep, not advance: paused time then moves timer by timer, so the
    // refresher's retries happen at their own instants.)
    sleep(server.clock.until(expires_at) - Duration::from_millis(1)).await;
    let token = get(&mut client, "c", T).await.unwrap();
    assert_eq!(token.version, 1);
    assert!(
        token.stale,
        "served past refresh_at while failing must be stale"
    );
    assert!(
        source.calls() > 1,
        "refresh-ahead should have been retrying"
    );

    // At the hard expiry: never served; the failure is reported instead.
    advance(Duration::from_millis(1)).await;
    assert_eq!(server.clock.now(), expires_at);
    let err = get(&mut client, "c", T).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );
    // And the watch stream does not hand it out either.
    let mut stream = client
        .watch_token(token_broker::grpc::pb::WatchTokenRequest {
            collection: "c".into(),
            after_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let next = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
    assert!(next.is_err(), "an expired token was streamed: {next:?}");
}

#[tokio::test(start_paused = true)]
async fn soft_refresh_serves_the_old_token_while_fetching() {
    let source = Scripted::tokens(Duration::from_secs(100));
    let server = TestServer::start(vec![spec("c", source.clone(), policy(), true)]).await;
    let mut client = server.client().await;
    let first = get(&mut client, "c", T).await.unwrap();
    assert_eq!(
        ts(&first.refresh_at),
        ts(&first.fetched_at) + Duration::from_secs(75)
    );
    // Past refresh_at, the refresher starts a slow fetch...
    source.set_delay(Duration::from_secs(5));
    advance(server.clock.until(ts(&first.refresh_at)) + Duration::from_millis(10)).await;
    settle().await;
    assert_eq!(source.calls(), 2, "the soft refresh should have started");
    // ...and readers get the current token at once, not stale (nothing failed).
    let before = Instant::now();
    let during = get(&mut client, "c", T).await.unwrap();
    assert_eq!(
        Instant::now(),
        before,
        "a reader waited although a token was servable"
    );
    assert_eq!((during.version, during.stale), (1, false));
    advance(Duration::from_secs(5)).await;
    settle().await;
    let after = get(&mut client, "c", T).await.unwrap();
    assert_eq!((after.version, after.value.as_str()), (2, "tok-2"));
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_with_jitter_and_are_never_cached() {
    let source = Scripted::new(
        [
            Step::Fail(FailureClass::UpstreamError),
            Step::Fail(FailureClass::UpstreamError),
            Step::Fail(FailureClass::UpstreamError),
            Step::Fail(FailureClass::UpstreamError),
        ],
        Step::Token(Some(Duration::from_secs(300))),
    );
    let server = TestServer::start(vec![spec("c", source.clone(), policy(), false)]).await;
    let mut client = server.client().await;

    // The cold read waits for the one attempt, which fails: UNAVAILABLE naming
    // the class and the next attempt, never a token.
    let err = get(&mut client, "c", T).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("upstream_error"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("next attempt at"),
        "{}",
        err.message()
    );
    assert!(
        !err.message().contains("scripted failure"),
        "upstream detail leaked: {}",
        err.message()
    );
    assert_eq!(source.calls(), 1);
    // While backing off, callers fail fast and do not trigger upstream calls.
    for _ in 0..20 {
        let e = get(&mut client, "c", T).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
    }
    assert!(
        source.calls() <= 2,
        "callers hammered a failing upstream: {}",
        source.calls()
    );

    // The refresher retries on its own until the upstream recovers.
    sleep(Duration::from_secs(20)).await;
    settle().await;
    let token = get(&mut client, "c", T).await.unwrap();
    assert_eq!(
        (token.value.as_str(), token.version, token.stale),
        ("tok-5", 1, false)
    );
    assert_eq!(source.calls(), 5);
    // Each gap is within its full-jitter cap: 1 s, 2 s, 4 s, 8 s.
    let times = source.call_times.lock().unwrap().clone();
    for (i, w) in times.windows(2).enumerate() {
        let gap = w[1].duration_since(w[0]).unwrap();
        assert!(gap <= Duration::from_secs(1 << i), "gap {i} is {gap:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn permanent_failures_are_failed_precondition() {
    let source = Scripted::new([], Step::Fail(FailureClass::InvalidCredentials));
    let server = TestServer::start(vec![spec("c", source, policy(), false)]).await;
    let mut client = server.client().await;
    let err = get(&mut client, "c", T).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("invalid_credentials"),
        "{}",
        err.message()
    );
    assert!(err.metadata().get("grpc-retry-pushback-ms").is_some());
}

#[tokio::test(start_paused = true)]
async fn upstream_garbage_is_an_error_not_a_token() {
    // An already-expired token, then a source that panics: both are failures.
    let source = Scripted::new(
        [Step::Token(Some(Duration::ZERO)), Step::Panic],
        Step::Token(Some(Duration::from_secs(300))),
    );
    let server = TestServer::start(vec![spec("c", source.clone(), policy(), false)]).await;
    let mut client = server.client().await;
    let err = get(&mut client, "c", T).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("bad_response"), "{}", err.message());
    advance(Duration::from_secs(2)).await;
    let err = get(&mut client, "c", T).await.unwrap_err();
    assert!(err.message().contains("internal"), "{}", err.message());
    // The refresher survived the panic and recovers.
    advance(Duration::from_secs(5)).await;
    let token = get(&mut client, "c", T).await.unwrap();
    assert_eq!(token.value, "tok-3");
}

#[tokio::test(start_paused = true)]
async fn stale_serving_of_opaque_tokens_stops_at_max_stale() {
    let p = Policy {
        max_age: Duration::from_secs(100),
        max_stale: Duration::from_secs(50),
        ..policy()
    };
    let source = Scripted::new([Step::Token(None)], Step::Fail(FailureClass::Connect));
    let server = TestServer::start(vec![spec("opaque", source.clone(), p, true)]).await;
    let mut client = server.client().await;
    let token = get(&mut client, "opaque", T).await.unwrap();
    assert_eq!(
        ts(&token.refresh_at),
        ts(&token.fetched_at) + Duration::from_secs(100)
    );
    assert_eq!(
        ts(&token.expires_at),
        ts(&token.fetched_at) + Duration::from_secs(150)
    );
    advance(Duration::from_secs(120)).await;
    // (A leaf learns of its remote's failure by asking, a round trip after
    // the advance: `settle` lets that happen; a local broker knew already.)
    settle().await;
    let stale = get(&mut client, "opaque", T).await.unwrap();
    assert!(stale.stale && stale.version == 1);
    advance(server.clock.until(ts(&token.expires_at))).await;
    let err = get(&mut client, "opaque", T).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn refetch_of_the_same_value_is_not_a_rotation() {
    let source = Scripted::new([], Step::Value("same", Duration::from_secs(100)));
    let server = TestServer::start(vec![spec("c", source.clone(), policy(), true)]).await;
    let mut client = server.client().await;
    let first = get(&mut client, "c", T).await.unwrap();
    advance(Duration::from_secs(80)).await;
    settle().await;
    let second = get(&mut client, "c", T).await.unwrap();
    assert_eq!(source.calls(), 2);
    assert_eq!(second.version, 1, "same value must keep its version");
    assert!(
        ts(&second.fetched_at) > ts(&first.fetched_at),
        "timestamps must move"
    );
}

#[tokio::test(start_paused = true)]
async fn min_remaining_forces_one_refresh() {
    let source = Scripted::tokens(Duration::from_secs(100));
    let server = TestServer::start(vec![spec("c", source.clone(), policy(), true)]).await;
    let mut client = server.client().await;
    get(&mut client, "c", T).await.unwrap();
    advance(Duration::from_secs(30)).await;
    // 60 s left, 80 s wanted: refresh first.
    let req = GetCollectionTokenRequest {
        collection: "c".into(),
        min_remaining: Some(Duration::from_secs(80).try_into().unwrap()),
    };
    let token = client
        .get_collection_token(req.clone())
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_eq!((token.version, source.calls()), (2, 2));
    // Satisfied now: no further call.
    client.get_collection_token(req).await.unwrap();
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn hundred_concurrent_invalidations_force_one_refresh() {
    let source = Scripted::tokens(Duration::from_secs(300));
    let server = TestServer::start(vec![spec("c", source.clone(), policy(), true)]).await;
    let mut client = server.client().await;
    let v1 = get(&mut client, "c", T).await.unwrap();
    assert_eq!(source.calls(), 1);
    let channel = server.channel().await;
    let mut calls = Vec::new();
    for _ in 0..100 {
        let mut c =
            token_broker::grpc::pb::token_broker_client::TokenBrokerClient::new(channel.clone());
        calls.push(tokio::spawn(async move {
            c.invalidate_token(InvalidateTokenRequest {
                collection: "c".into(),
                version: 1,
                value: String::new(),
                reason: "401 from upstream".into(),
            })
            .await
        }));
    }
    for call in calls {
        let resp = call.await.unwrap().unwrap().into_inner();
        let token = resp.token.unwrap();
        assert_eq!(token.version, 2);
        assert!(resp.refreshed);
    }
    assert_eq!(
        source.calls(),
        2,
        "one forced refresh for a hundred reports"
    );

    // A report about an old version (by version or by value) forces nothing.
    advance(Duration::from_secs(10)).await;
    for (version, value) in [(1, String::new()), (0, v1.value.clone())] {
        let resp = client
            .invalidate_token(InvalidateTokenRequest {
                collection: "c".into(),
                version,
                value,
                reason: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((resp.token.unwrap().version, resp.refreshed), (2, false));
    }
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn forced_refreshes_are_rate_limited() {
    let p = Policy {
        min_refresh_interval: Duration::from_secs(5),
        ..policy()
    };
    let source = Scripted::tokens(Duration::from_secs(300));
    let server = TestServer::start(vec![spec("c", source.clone(), p, true)]).await;
    let mut client = server.client().await;
    get(&mut client, "c", T).await.unwrap();
    let start = Instant::now();
    for version in 1..=3u64 {
        let resp = client
            .invalidate_token(InvalidateTokenRequest {
                collection: "c".into(),
                version,
                value: String::new(),
                reason: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.token.unwrap().version, version + 1);
    }
    // Three forced refreshes after the first fetch need three intervals.
    assert!(Instant::now() - start >= Duration::from_secs(15));
    let times = source.call_times.lock().unwrap().clone();
    for w in times.windows(2) {
        assert!(w[1].duration_since(w[0]).unwrap() >= Duration::from_secs(5));
    }
    // A deadline shorter than the remaining interval gets the current token back
    // at once (not refreshed) instead of an error.
    let mut req = tonic::Request::new(InvalidateTokenRequest {
        collection: "c".into(),
        version: 4,
        value: String::new(),
        reason: String::new(),
    });
    req.set_timeout(Duration::from_secs(1));
    let resp = client.invalidate_token(req).await.unwrap().into_inner();
    assert_eq!((resp.token.unwrap().version, resp.refreshed), (4, false));
}

#[tokio::test(start_paused = true)]
async fn waiting_past_the_deadline_is_deadline_exceeded() {
    let (source, _gate) = Scripted::gated([], Step::Token(Some(Duration::from_secs(60))));
    let server = TestServer::start(vec![spec("c", source, policy(), false)]).await;
    let mut client = server.client().await;
    let err = get(&mut client, "c", Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
}
