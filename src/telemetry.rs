//! Logging and tracing set-up: structured, lowercase log messages with data in
//! fields, to stderr, as text or JSON, filtered by `RUST_LOG` (default
//! [`DEFAULT_FILTER`]);
//! text is coloured only on a terminal without `NO_COLOR` (so a log file or a
//! pipe gets plain `key=value` fields);
//! plus OpenTelemetry traces over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.
//!
//! Contract: the project's own `tracing` spans (one per RPC, refresh and
//! upstream HTTP call) become OpenTelemetry spans; spans of other crates
//! (tonic, hyper, h2, the exporter itself) never do, so exporting cannot feed
//! on itself. Spans leave through a bounded batch queue on the exporter's own
//! thread: a slow or unreachable collector drops spans, never delays a request.
//! [`Telemetry::shutdown`] flushes within [`SHUTDOWN_BOUND`], collector up or
//! not. W3C trace context (`traceparent`, `tracestate`) is read from incoming
//! gRPC metadata by [`set_remote_parent`]. No token, refresh token or secret
//! is ever a span field (the modules that create spans keep that rule).

use std::ffi::OsStr;
use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The log filter without `RUST_LOG`: info, except sqlx's own warnings (a
/// slow statement, a pooled connection found dead on release), which a fleet
/// starting at once or a database outage turns into hundreds of lines saying
/// what the broker's own `database unreachable` line already says once.
pub const DEFAULT_FILTER: &str = "info,sqlx=error,sqlx_core=error";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Longest time [`Telemetry::shutdown`] waits for the last spans to leave.
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(3);
/// Per-export timeout unless `OTEL_EXPORTER_OTLP_TIMEOUT` says otherwise
/// (the SDK's default, 10 s, would hold a shutdown that long).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// The tracing pipeline; keep it until the process ends, then call
/// [`shutdown`](Self::shutdown).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter, waiting at most [`SHUTDOWN_BOUND`]
    /// (an unreachable collector loses the last spans, never the exit).
    pub fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // The SDK's shutdown blocks its caller; give it its own thread so
        // the bound holds even if the exporter ignores its own timeout.
        let spawned = std::thread::Builder::new()
            .name("otel-shutdown".into())
            .spawn(move || {
                let result = provider.shutdown_with_timeout(SHUTDOWN_BOUND);
                let _ = done_tx.send(result);
            });
        if spawned.is_err() {
            return;
        }
        match done_rx.recv_timeout(SHUTDOWN_BOUND + Duration::from_millis(500)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("trace export: shutdown: {e}"),
            Err(_) => eprintln!("trace export: collector did not answer; last spans dropped"),
        }
    }
}

/// The OTLP endpoint from the environment, when tracing is switched on.
fn otlp_endpoint() -> Option<String> {
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .filter_map(|k| std::env::var(k).ok())
    .find(|v| !v.trim().is_empty())
}

/// Builds the exporter pipeline. Must run inside a tokio runtime (the
/// gRPC channel lives on it).
fn provider() -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    let timeout_set = [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some());
    if !timeout_set {
        builder = builder.with_timeout(EXPORT_TIMEOUT);
    }
    let exporter = builder.build().map_err(|e| e.to_string())?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| {
            a.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    if !named {
        resource = resource.with_service_name("token-broker");
    }
    Ok(SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build())
}

/// Installs the global subscriber; with `traces`, and when the environment
/// names an OTLP endpoint, the trace exporter too (then call it inside the
/// tokio runtime). Call once, from `main`.
pub fn init(format: LogFormat, traces: bool) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt
            .with_ansi(colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
    .with_filter(filter);
    let endpoint = otlp_endpoint().filter(|_| traces);
    let (provider, problem) = match &endpoint {
        None => (None, None),
        Some(_) => match provider() {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        },
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("token-broker"))
            .with_filter(
                Targets::new()
                    .with_target("token_broker", LevelFilter::INFO)
                    .with_default(LevelFilter::OFF),
            )
    });
    tracing_subscriber::registry().with(fmt).with(otel).init();
    if let Some(e) = problem {
        tracing::warn!(error = %e, "cannot set up trace export; traces are off");
    } else if let Some(endpoint) = endpoint.filter(|_| provider.is_some()) {
        tracing::info!(endpoint = %redact_endpoint(&endpoint), "exporting traces over OTLP/gRPC");
    }
    Telemetry { provider }
}

/// Whether text logs carry ANSI colour codes: only on a terminal, and not when
/// `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
/// Log collectors and `grep` then see plain `key=value` fields.
fn colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// The endpoint without any user-info part (`http://user:pass@host`) or
/// query string.
fn redact_endpoint(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        Err(_) => "(unparsable)".to_owned(),
    }
}

/// Reads W3C trace context from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Makes the caller's trace (W3C `traceparent` in `metadata`) the parent of
/// `span`, so that the caller's trace continues into the sidecar. Without
/// trace export, or without a `traceparent`, this does nothing.
pub fn set_remote_parent(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    if metadata.get("traceparent").is_none() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default filter drops sqlx's warnings (a slow statement, a dead
    /// pooled connection) but keeps its errors and every broker line.
    #[test]
    fn the_default_filter_quiets_sqlx_warnings_only() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;

        #[derive(Clone, Default)]
        struct Targets(Arc<Mutex<Vec<String>>>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Targets {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                let m = event.metadata();
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("{} {}", m.level(), m.target()));
            }
        }
        let seen = Targets::default();
        let subscriber = tracing_subscriber::registry()
            .with(EnvFilter::new(DEFAULT_FILTER))
            .with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "sqlx::query", "slow statement");
            tracing::warn!(target: "sqlx_core::pool::connection", "error on release");
            tracing::error!(target: "sqlx::query", "a real error");
            tracing::info!(target: "token_broker::store::postgres", "database reachable again");
            tracing::debug!(target: "token_broker::broker", "not at info");
        });
        assert_eq!(
            *seen.0.lock().unwrap(),
            ["ERROR sqlx::query", "INFO token_broker::store::postgres"]
        );
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(true, Some(OsStr::new("false"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new(""))));
    }
}
