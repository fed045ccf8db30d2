//! Prometheus metrics: one registry per broker, rendered as text by the admin
//! listener's `/metrics`.
//!
//! Contract: every label value comes from a bounded set (gRPC method names and
//! status codes, configured collection names, fixed outcome and failure-class
//! names), never from a request or an upstream answer, and no token, refresh
//! token or secret is ever a label or a value. Per-collection counters and
//! gauges are resolved once, so recording them is an atomic add; an RPC's
//! count and duration go through a family lookup (a shared read lock) and the
//! histogram's short mutex (measured: broker/bare throughput 0.98x over TCP,
//! docs/benchmark.md). Gauges that describe state (seconds until expiry, current
//! version, readiness, database degraded) are set from the broker's state
//! when scraped. Every metric is listed in README "Metrics".

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::source::FailureClass;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CollectionLabel {
    pub collection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabel {
    pub rpc: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub collection: String,
    pub outcome: &'static str,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub collection: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: &'static str,
    pub collection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// How a refresh attempt ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// A new token (new version) was committed and published.
    Rotated,
    /// The upstream returned the token already held: timestamps updated.
    Unchanged,
    /// The fetch failed; `class` says why.
    Failed(FailureClass),
    /// Fetched while the database was unreachable: published locally, committed later.
    Local,
    /// The lease was lost before the commit (a peer took over); the result was dropped.
    LeaseLost,
}

impl RefreshOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rotated => "rotated",
            Self::Unchanged => "unchanged",
            Self::Failed(_) => "failed",
            Self::Local => "local",
            Self::LeaseLost => "lease_lost",
        }
    }

    fn class(self) -> &'static str {
        match self {
            Self::Failed(class) => class.as_str(),
            _ => "none",
        }
    }
}

/// Histogram buckets in seconds: upstream calls take milliseconds to the
/// fetch timeout (15 s by default).
fn upstream_buckets() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    ])
}

/// RPCs answered from memory take microseconds; waits take up to the deadline.
fn rpc_buckets() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
    ])
}

/// Notification lag: sub-millisecond on a quiet network, seconds after a
/// reconnect.
fn lag_buckets() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
    ])
}

/// The broker's metrics. Cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Family<MethodLabel, Histogram, fn() -> Histogram>,
    memory_hits: Family<CollectionLabel, Counter>,
    get_waits: Family<CollectionLabel, Counter>,
    stale_serves: Family<CollectionLabel, Counter>,
    refreshes: Family<RefreshLabels, Counter>,
    upstream_duration: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    expires_in: Family<CollectionLabel, FloatGauge>,
    version: Family<CollectionLabel, Gauge>,
    watch_streams: Family<CollectionLabel, Gauge>,
    lease_acquired: Family<CollectionLabel, Counter>,
    lease_waits: Family<CollectionLabel, Counter>,
    notification_lag: Histogram,
    store_degraded: Gauge,
    ready: Gauge,
    task_restarts: Family<TaskLabels, Counter>,
    authz_refusals: Family<RpcLabel, Counter>,
    tls_reloads: Family<OutcomeLabel, Counter>,
    remote_following: Family<CollectionLabel, Gauge>,
    remote_breaks: Family<CollectionLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("token_broker");
        let m = Self {
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(rpc_buckets),
            memory_hits: Family::default(),
            get_waits: Family::default(),
            stale_serves: Family::default(),
            refreshes: Family::default(),
            upstream_duration: Family::new_with_constructor(upstream_buckets),
            expires_in: Family::default(),
            version: Family::default(),
            watch_streams: Family::default(),
            lease_acquired: Family::default(),
            lease_waits: Family::default(),
            notification_lag: lag_buckets(),
            store_degraded: Gauge::default(),
            ready: Gauge::default(),
            task_restarts: Family::default(),
            authz_refusals: Family::default(),
            tls_reloads: Family::default(),
            remote_following: Family::default(),
            remote_breaks: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "build",
            "Build information: the version label; always 1",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        registry.register(
            "rpc_requests",
            "TokenBroker RPCs finished, by method and gRPC status code (WatchToken counts when its stream ends)",
            m.rpc_requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "Time to answer a unary TokenBroker RPC, by method",
            m.rpc_duration.clone(),
        );
        registry.register(
            "memory_hits",
            "GetCollectionToken calls answered from memory without waiting",
            m.memory_hits.clone(),
        );
        registry.register(
            "get_waits",
            "GetCollectionToken calls that had to wait for a refresh (no servable token, or min_remaining not met)",
            m.get_waits.clone(),
        );
        registry.register(
            "stale_serves",
            "Tokens handed out past their refresh time because refreshing is failing (still before hard expiry or max_stale)",
            m.stale_serves.clone(),
        );
        registry.register(
            "refreshes",
            "Refresh attempts that called the upstream, by outcome (rotated, unchanged, failed, local, lease_lost) and failure class (none unless failed)",
            m.refreshes.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Duration of one upstream fetch (all HTTP calls of one refresh), by outcome (ok, error)",
            m.upstream_duration.clone(),
        );
        registry.register(
            "token_expires_in_seconds",
            "Seconds until the current token's hard expiry (negative once expired); absent before the first token",
            m.expires_in.clone(),
        );
        registry.register(
            "token_version",
            "Version of the current token (0 before the first token)",
            m.version.clone(),
        );
        registry.register(
            "watch_streams",
            "Open WatchToken streams",
            m.watch_streams.clone(),
        );
        registry.register(
            "lease_acquisitions",
            "Refresh leases this sidecar was granted",
            m.lease_acquired.clone(),
        );
        registry.register(
            "lease_waits",
            "Refresh attempts that found the lease held by a peer and waited for its result",
            m.lease_waits.clone(),
        );
        registry.register(
            "notification_lag_seconds",
            "From a peer's commit (database clock) to this sidecar publishing the rotation it was notified of (both on the database clock, which the sidecar follows)",
            m.notification_lag.clone(),
        );
        registry.register(
            "store_degraded",
            "1 while the shared database is unreachable (tokens are served from memory and refreshed locally), else 0",
            m.store_degraded.clone(),
        );
        registry.register(
            "ready",
            "1 while every required collection holds a servable token, else 0",
            m.ready.clone(),
        );
        registry.register(
            "task_restarts",
            "Background tasks restarted after a panic, by task (refresher, follower, listener, health) and collection (empty for tasks that serve none)",
            m.task_restarts.clone(),
        );
        registry.register(
            "authz_refusals",
            "TokenBroker calls refused because the caller is not among the collection's readers (or asked for an unknown collection while some are protected), by rpc",
            m.authz_refusals.clone(),
        );
        registry.register(
            "tls_reloads",
            "Changes of the token API's TLS files, by outcome: ok (new connections use them) or failed (the previous material stays)",
            m.tls_reloads.clone(),
        );
        registry.register(
            "remote_following",
            "For a collection whose source is another token-broker: 1 while its WatchToken stream is open, else 0",
            m.remote_following.clone(),
        );
        registry.register(
            "remote_breaks",
            "For a collection whose source is another token-broker: streams that broke or could not be opened (each followed by the next address)",
            m.remote_breaks.clone(),
        );
        Self { registry, ..m }
    }

    /// The handles one collection records through.
    pub fn collection(&self, name: &str) -> CollectionMetrics {
        let l = CollectionLabel {
            collection: name.to_owned(),
        };
        // Create the per-collection series at start, so they read 0 rather
        // than being absent until the first event.
        drop(self.version.get_or_create(&l));
        CollectionMetrics {
            name: name.to_owned(),
            memory_hits: self.memory_hits.get_or_create_owned(&l),
            get_waits: self.get_waits.get_or_create_owned(&l),
            stale_serves: self.stale_serves.get_or_create_owned(&l),
            watch_streams: self.watch_streams.get_or_create_owned(&l),
            lease_acquired: self.lease_acquired.get_or_create_owned(&l),
            lease_waits: self.lease_waits.get_or_create_owned(&l),
            refreshes: self.refreshes.clone(),
            upstream_duration: self.upstream_duration.clone(),
            remote_following: self.remote_following.clone(),
            remote_breaks: self.remote_breaks.clone(),
        }
    }

    /// One finished RPC.
    pub fn rpc(&self, method: &'static str, code: tonic::Code, elapsed: Option<Duration>) {
        self.rpc_requests
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
        if let Some(d) = elapsed {
            self.rpc_duration
                .get_or_create(&MethodLabel { method })
                .observe(d.as_secs_f64());
        }
    }

    /// One call refused by a collection's `readers`.
    pub fn authz_refusal(&self, rpc: &'static str) {
        self.authz_refusals.get_or_create(&RpcLabel { rpc }).inc();
    }

    /// One change of the TLS files: used (`true`) or kept out (`false`).
    pub fn tls_reload(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.tls_reloads
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn notification_lag(&self, lag: Duration) {
        self.notification_lag.observe(lag.as_secs_f64());
    }

    /// Sets the scrape-time state of one collection.
    pub fn set_token(&self, collection: &str, version: u64, expires_in_secs: Option<f64>) {
        let l = CollectionLabel {
            collection: collection.to_owned(),
        };
        self.version
            .get_or_create(&l)
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        match expires_in_secs {
            Some(s) => {
                self.expires_in.get_or_create(&l).set(s);
            }
            None => {
                self.expires_in.remove(&l);
            }
        }
    }

    pub fn set_state(&self, ready: bool, store_degraded: bool) {
        self.ready.set(i64::from(ready));
        self.store_degraded.set(i64::from(store_degraded));
    }

    /// The registry in the Prometheus text format (OpenMetrics flavour).
    pub fn encode(&self) -> String {
        for ((task, collection), n) in crate::supervise::restarts() {
            let c = self
                .task_restarts
                .get_or_create(&TaskLabels { task, collection });
            c.inc_by(n.saturating_sub(c.get()));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One collection's metric handles.
#[derive(Clone)]
pub struct CollectionMetrics {
    name: String,
    pub memory_hits: Counter,
    pub get_waits: Counter,
    pub stale_serves: Counter,
    pub watch_streams: Gauge,
    pub lease_acquired: Counter,
    pub lease_waits: Counter,
    refreshes: Family<RefreshLabels, Counter>,
    upstream_duration: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    remote_following: Family<CollectionLabel, Gauge>,
    remote_breaks: Family<CollectionLabel, Counter>,
}

impl CollectionMetrics {
    /// A broker-source collection's stream opened (`true`) or broke.
    pub fn remote_following(&self, following: bool) {
        let l = CollectionLabel {
            collection: self.name.clone(),
        };
        self.remote_following
            .get_or_create(&l)
            .set(i64::from(following));
        if !following {
            self.remote_breaks.get_or_create(&l).inc();
        }
    }

    pub fn refresh(&self, outcome: RefreshOutcome) {
        self.refreshes
            .get_or_create(&RefreshLabels {
                collection: self.name.clone(),
                outcome: outcome.as_str(),
                class: outcome.class(),
            })
            .inc();
    }

    pub fn upstream(&self, ok: bool, elapsed: Duration) {
        self.upstream_duration
            .get_or_create(&UpstreamLabels {
                collection: self.name.clone(),
                outcome: if ok { "ok" } else { "error" },
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// The gRPC status code's name as the `code` label (the canonical upper-case
/// names of the gRPC spec).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}
