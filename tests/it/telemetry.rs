//! Traces: the real binary exports its spans over OTLP/gRPC to a test
//! receiver on 127.0.0.1:0. A `GetCollectionToken` that carries a W3C
//! `traceparent` and triggers a refresh yields one trace: the RPC span (child
//! of the caller's span), its `refresh` span, and the upstream `HTTP POST`
//! span, with the documented attributes and no secret anywhere. A collector
//! that does not answer slows neither requests nor shutdown beyond the bound.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use token_broker::grpc::pb::GetCollectionTokenRequest;

use crate::support::binary::Served;
use crate::support::upstream::{OAuthConfig, OAuthServer};

/// An OTLP trace receiver that keeps every span with its resource's service name.
#[derive(Default, Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(|a| value(a.value.as_ref()))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> (Self, std::net::SocketAddr) {
        let receiver = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }
}

fn value(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .map(|a| value(a.value.as_ref()))
}

fn config(token_url: &str) -> String {
    format!(
        r#"
[collections.api]
prefetch = false
source = {{ kind = "oauth2_client_credentials", token_url = "{token_url}", client_id = "traced", client_secret_env = "TB_CLIENT_SECRET" }}
"#
    )
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_refreshing_get_exports_one_trace_with_rpc_refresh_and_http_spans() {
    let secret = crate::support::random_secret("otel-secret");
    let upstream = OAuthServer::start(OAuthConfig::new("traced", &secret)).await;
    let (receiver, addr) = Receiver::start().await;
    let endpoint = format!("http://{addr}");
    let served = Served::start(
        &config(&upstream.token_url()),
        &[
            ("TB_CLIENT_SECRET", secret.as_str()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SERVICE_NAME", "tb-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
    .await;
    let mut client = served.client().await;
    let mut req = tonic::Request::new(GetCollectionTokenRequest {
        collection: "api".into(),
        min_remaining: None,
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    let token = client
        .get_collection_token(req)
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_eq!(upstream.calls(), 1);

    // Wait for the three spans of our trace.
    let deadline = Instant::now() + Duration::from_secs(15);
    let ours = loop {
        let ours: Vec<(String, Span)> = receiver
            .spans()
            .into_iter()
            .filter(|(_, s)| hex(&s.trace_id) == TRACE_ID)
            .collect();
        let names: Vec<&str> = ours.iter().map(|(_, s)| s.name.as_str()).collect();
        if [
            "token_broker.v1.TokenBroker/GetCollectionToken",
            "refresh",
            "HTTP POST",
        ]
        .iter()
        .all(|n| names.contains(n))
        {
            break ours;
        }
        assert!(
            Instant::now() < deadline,
            "spans of our trace so far: {names:?}\nlog:\n{}",
            served.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let find = |name: &str| {
        ours.iter()
            .find(|(_, s)| s.name == name)
            .map(|(svc, s)| (svc.clone(), s.clone()))
            .unwrap()
    };
    let (service, rpc) = find("token_broker.v1.TokenBroker/GetCollectionToken");
    let (_, refresh) = find("refresh");
    let (_, http) = find("HTTP POST");
    assert_eq!(
        service, "tb-under-test",
        "OTEL_SERVICE_NAME names the resource"
    );

    // The caller's trace continues into the sidecar: RPC <- refresh <- HTTP.
    assert_eq!(hex(&rpc.parent_span_id), CALLER_SPAN);
    assert_eq!(refresh.parent_span_id, rpc.span_id);
    assert_eq!(http.parent_span_id, refresh.span_id);
    // Server and client span kinds (2 and 3 in OTLP).
    assert_eq!(rpc.kind, 2);
    assert_eq!(http.kind, 3);

    assert_eq!(attr(&rpc, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        attr(&rpc, "rpc.method").as_deref(),
        Some("GetCollectionToken")
    );
    assert_eq!(attr(&rpc, "rpc.grpc.status_code").as_deref(), Some("0"));
    assert_eq!(attr(&rpc, "collection").as_deref(), Some("api"));

    assert_eq!(attr(&refresh, "collection").as_deref(), Some("api"));
    assert_eq!(attr(&refresh, "version").as_deref(), Some("1"));
    assert_eq!(attr(&refresh, "outcome").as_deref(), Some("rotated"));
    assert_eq!(attr(&refresh, "lease").as_deref(), Some("held"));

    assert_eq!(attr(&http, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attr(&http, "server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        attr(&http, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(&http, "url.path").as_deref(), Some("/oauth2/token"));
    assert!(http.end_time_unix_nano > http.start_time_unix_nano);
    assert!(attr(&http, "duration_ms").is_some());

    // No secret and no token anywhere in any exported span.
    let everything = format!("{:?}", receiver.spans());
    assert!(!everything.contains(&secret), "client secret in a span");
    assert!(!everything.contains(&token.value), "token value in a span");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A TCP listener that accepts and then says nothing: a hung collector.
async fn black_hole() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    (addr, task)
}

// Multi-threaded: `Served::stop` blocks its thread while the client's
// connection task must still run to close the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_does_not_answer_delays_neither_requests_nor_shutdown() {
    let secret = crate::support::random_secret("otel-secret");
    let upstream = OAuthServer::start(OAuthConfig::new("traced", &secret)).await;
    // One collector address refuses connections (nothing listens), the
    // other accepts and never answers.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (hung, _task) = black_hole().await;
    // Without a collector first: the baseline the others are compared with.
    for collector in [None, Some(refused), Some(hung)] {
        let endpoint = collector.map(|c| format!("http://{c}")).unwrap_or_default();
        let served = Served::start(
            &config(&upstream.token_url()),
            &[
                ("TB_CLIENT_SECRET", secret.as_str()),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ],
        )
        .await;
        let mut client = served.client().await;
        // Many spans, many export attempts: each request still answers fast.
        let mut slowest = Duration::ZERO;
        let all = Instant::now();
        for _ in 0..200 {
            let started = Instant::now();
            crate::support::get(&mut client, "api", Duration::from_secs(5))
                .await
                .unwrap();
            slowest = slowest.max(started.elapsed());
        }
        assert!(
            slowest < Duration::from_secs(1),
            "{collector:?}: slowest Get {slowest:?}"
        );
        let all = all.elapsed();
        drop(client);
        let started = Instant::now();
        let log = served.stop();
        let took = started.elapsed();
        if took > Duration::from_secs(6) {
            eprintln!("{log}");
        }
        eprintln!(
            "collector {collector:?}: 200 Gets in {all:?}, slowest {slowest:?}, shutdown {took:?}"
        );
        // Shutdown waits for the export at most SHUTDOWN_BOUND (3 s) + 0.5 s.
        assert!(
            took < Duration::from_secs(6),
            "{collector:?}: shutdown took {took:?}"
        );
    }
}
