//! Hot-path benchmark: `GetCollectionToken` on a warm collection, the broker
//! against a bare tonic server that answers a pre-built response of the same
//! encoded size (the broker's first answer with the value replaced by one of
//! the same length; the sizes are checked equal).
//!
//! Same client, same machine, same run, over TCP loopback and over a Unix
//! socket. Each server runs in this process on its own tokio multi-thread
//! runtime (identical configuration); the load generator runs on a third one.
//! The load is `BENCH_CONNS` HTTP/2 connections (made with
//! `token_broker::client::connect`, as for real clients), each carrying
//! `BENCH_INFLIGHT` concurrent unary calls in a closed loop, for a 1 s warm-up
//! and then `BENCH_SECS` measured seconds. Every call carries a 2 s deadline
//! (`grpc-timeout`), like a well-behaved client. Each call's latency goes into an
//! HDR histogram; any non-OK status (or a response without a token) is an error
//! and makes the run fail after the report.
//!
//! To cancel drift on a noisy machine the variants are interleaved per
//! transport (bare, broker, bare, broker, ... for `BENCH_ROUNDS` rounds). The
//! report gives, per transport and server, the median throughput over rounds and
//! p50/p99 from the histogram merged over rounds, then broker/bare ratios (the
//! goal is a throughput ratio of at least 0.9).
//!
//! Run it with:
//!
//! ```text
//! cargo bench --bench hot_path
//! BENCH_SECS=10 BENCH_CONNS=4 BENCH_INFLIGHT=16 BENCH_ROUNDS=3 cargo bench --bench hot_path
//! ```
//!
//! Knobs (environment): `BENCH_SECS` (default 5), `BENCH_CONNS` (4),
//! `BENCH_INFLIGHT` (16), `BENCH_ROUNDS` (2), and `BENCH_LOG` (unset: no
//! tracing subscriber; `text` or `json`: install the binary's subscriber, as
//! `token-broker serve` does, filtered by `RUST_LOG`, default `info`).

#![expect(
    clippy::expect_used,
    reason = "benchmark harness: failing loudly is the right behaviour"
)]

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use prost::Message;
use tokio::runtime::Runtime;
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use token_broker::config::Config;
use token_broker::grpc::pb::token_broker_client::TokenBrokerClient;
use token_broker::grpc::pb::token_broker_server::{TokenBroker, TokenBrokerServer};
use token_broker::grpc::pb::{
    GetCollectionTokenRequest, GetCollectionTokenResponse, InvalidateTokenRequest,
    InvalidateTokenResponse, WatchTokenRequest, WatchTokenResponse,
};
use token_broker::listen::{ListenAddr, Listener};
use token_broker::telemetry::LogFormat;

const COLLECTION: &str = "demo";
/// Long enough that no rotation happens during the run.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
const WARMUP: Duration = Duration::from_secs(1);
/// Deadline sent with every call (both servers see the same header).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for a server to answer its first call.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a server's graceful shutdown before the runtime is torn down.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Configuration

struct Knobs {
    secs: u64,
    conns: usize,
    inflight: usize,
    rounds: usize,
    log: Option<LogFormat>,
    threads: usize,
}

fn env_or<T: FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(e) => Err(anyhow::anyhow!("{name}: {e}")),
    }
}

impl Knobs {
    fn from_env() -> anyhow::Result<Self> {
        let knobs = Self {
            secs: env_or("BENCH_SECS", 5)?,
            conns: env_or("BENCH_CONNS", 4)?,
            inflight: env_or("BENCH_INFLIGHT", 16)?,
            rounds: env_or("BENCH_ROUNDS", 2)?,
            log: match std::env::var("BENCH_LOG").ok().as_deref() {
                None | Some("" | "off" | "none") => None,
                Some("text") => Some(LogFormat::Text),
                Some("json") => Some(LogFormat::Json),
                Some(other) => bail!("BENCH_LOG={other:?}: use text, json or leave unset"),
            },
            threads: std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
        };
        for (name, v) in [
            (
                "BENCH_SECS",
                usize::try_from(knobs.secs).unwrap_or(usize::MAX),
            ),
            ("BENCH_CONNS", knobs.conns),
            ("BENCH_INFLIGHT", knobs.inflight),
            ("BENCH_ROUNDS", knobs.rounds),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if knobs.secs > 600 {
            bail!("BENCH_SECS must be at most 600");
        }
        Ok(knobs)
    }

    fn measure(&self) -> Duration {
        Duration::from_secs(self.secs)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Unix,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Unix => "unix",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Bare,
    Broker,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::Broker => "broker",
        }
    }
}

/// One multi-thread runtime; the same builder for every server and the load.
fn runtime(name: &str, threads: usize) -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("cannot build the {name} runtime"))
}

// ---------------------------------------------------------------------------
// The bare server

/// Answers every `GetCollectionToken` with a clone of one pre-built response.
struct Bare {
    response: GetCollectionTokenResponse,
}

/// A response of the same encoded size as the broker's `broker` answer: the
/// same collection, version and timestamps (their nanoseconds decide how many
/// bytes they take), `stale` false, and a different value of the same length.
fn bare_response(
    broker: &GetCollectionTokenResponse,
) -> anyhow::Result<GetCollectionTokenResponse> {
    let mut token = broker
        .token
        .clone()
        .context("broker answered without a token")?;
    let len = token.value.len();
    if len < 5 {
        bail!("broker token value has {len} bytes; expected a demo token");
    }
    token.value = format!("demo-{}", "x".repeat(len - 5));
    token.stale = false;
    Ok(GetCollectionTokenResponse { token: Some(token) })
}

#[tonic::async_trait]
impl TokenBroker for Bare {
    async fn get_collection_token(
        &self,
        _request: Request<GetCollectionTokenRequest>,
    ) -> Result<Response<GetCollectionTokenResponse>, Status> {
        Ok(Response::new(self.response.clone()))
    }

    async fn invalidate_token(
        &self,
        _request: Request<InvalidateTokenRequest>,
    ) -> Result<Response<InvalidateTokenResponse>, Status> {
        Err(Status::unimplemented("bare server"))
    }

    type WatchTokenStream = tokio_stream::Empty<Result<WatchTokenResponse, Status>>;

    async fn watch_token(
        &self,
        _request: Request<WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        Err(Status::unimplemented("bare server"))
    }
}

async fn serve_bare(
    response: GetCollectionTokenResponse,
    listener: Listener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let router = Server::builder().add_service(TokenBrokerServer::new(Bare { response }));
    let signal = stop.cancelled_owned();
    match listener {
        Listener::Tcp(l) => {
            let incoming = TcpIncoming::from(l).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, signal)
                .await?;
        }
        Listener::Unix(l, socket_file) => {
            let incoming = UnixListenerStream::new(l);
            router
                .serve_with_incoming_shutdown(incoming, signal)
                .await?;
            drop(socket_file);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Running servers

/// What to serve.
enum Serve {
    /// The bare server, answering this response.
    Bare(GetCollectionTokenResponse),
    /// The broker, as `token-broker serve --dev` runs it.
    Broker,
}

impl Serve {
    fn variant(&self) -> Variant {
        match self {
            Self::Bare(_) => Variant::Bare,
            Self::Broker => Variant::Broker,
        }
    }
}

/// A server on its own runtime; `stop` shuts it down and then the runtime.
struct Running {
    variant: Variant,
    addr: ListenAddr,
    rt: Runtime,
    cancel: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn start(
        serve: Serve,
        transport: Transport,
        dir: &Path,
        threads: usize,
    ) -> anyhow::Result<Self> {
        let variant = serve.variant();
        let rt = runtime(&format!("srv-{}", variant.name()), threads)?;
        let want = match transport {
            Transport::Tcp => ListenAddr::Tcp("127.0.0.1:0".parse()?),
            Transport::Unix => ListenAddr::Unix(dir.join(format!("{}.sock", variant.name()))),
        };
        let listener = rt
            .block_on(Listener::bind(&want))
            .with_context(|| format!("cannot bind {want}"))?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let task = match serve {
            Serve::Bare(response) => rt.spawn(serve_bare(response, listener, cancel.clone())),
            Serve::Broker => rt.spawn(serve_dev(listener, cancel.clone())),
        };
        Ok(Self {
            variant,
            addr,
            rt,
            cancel,
            task,
        })
    }

    fn stop(self) -> anyhow::Result<()> {
        let Self {
            variant,
            rt,
            cancel,
            task,
            ..
        } = self;
        let name = variant.name();
        cancel.cancel();
        let result = rt.block_on(async { tokio::time::timeout(STOP_TIMEOUT, task).await });
        rt.shutdown_timeout(Duration::from_secs(1));
        match result {
            Ok(Ok(served)) => served.with_context(|| format!("{name} server")),
            Ok(Err(join)) => bail!("{name} server task failed: {join}"),
            Err(_) => bail!("{name} server did not stop in time"),
        }
    }
}

fn request() -> Request<GetCollectionTokenRequest> {
    let mut req = Request::new(GetCollectionTokenRequest {
        collection: COLLECTION.to_owned(),
        min_remaining: None,
    });
    req.set_timeout(CALL_TIMEOUT);
    req
}

/// Calls until the server answers OK (the broker: until `demo` is warm);
/// returns that first response.
async fn wait_ready(addr: &ListenAddr) -> anyhow::Result<GetCollectionTokenResponse> {
    let give_up = Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < give_up {
        match token_broker::client::connect(addr).await {
            Ok(mut client) => match client.get_collection_token(request()).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(s) => last = format!("{:?}: {}", s.code(), s.message()),
            },
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{addr} not ready after {READY_TIMEOUT:?}: {last}")
}

// ---------------------------------------------------------------------------
// Load

/// What one run (or one worker) measured.
struct Sample {
    /// Successful calls started inside the measured window.
    ok: u64,
    /// Failed calls, warm-up included.
    errors: u64,
    first_error: Option<String>,
    /// Latency of the measured calls, in nanoseconds.
    hist: Histogram<u64>,
}

impl Sample {
    fn new() -> Self {
        Self {
            ok: 0,
            errors: 0,
            first_error: None,
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds"),
        }
    }

    fn merge(&mut self, other: &Self) -> anyhow::Result<()> {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.hist
            .add(&other.hist)
            .map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))
    }

    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }

    fn quantile_us(&self, q: f64) -> f64 {
        #[expect(
            clippy::cast_precision_loss,
            reason = "nanoseconds well below 2^52 in a benchmark"
        )]
        let ns = self.hist.value_at_quantile(q) as f64;
        ns / 1000.0
    }
}

/// One closed-loop caller: a call, then the next, until `until`.
async fn worker(
    mut client: TokenBrokerClient<Channel>,
    measure_from: Instant,
    until: Instant,
) -> Sample {
    let mut sample = Sample::new();
    loop {
        let started = Instant::now();
        if started >= until {
            break;
        }
        let result = client.get_collection_token(request()).await;
        let elapsed = started.elapsed();
        match result {
            Ok(resp) if resp.get_ref().token.is_some() => {
                if started >= measure_from {
                    sample.ok += 1;
                    sample
                        .hist
                        .saturating_record(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
                }
            }
            Ok(_) => sample.error("OK without a token".to_owned()),
            Err(s) => sample.error(format!("{:?}: {}", s.code(), s.message())),
        }
    }
    sample
}

/// One run against one server: fresh connections, warm-up, measured window.
async fn load(addr: &ListenAddr, knobs: &Knobs) -> anyhow::Result<Sample> {
    let mut clients = Vec::with_capacity(knobs.conns);
    for _ in 0..knobs.conns {
        clients.push(token_broker::client::connect(addr).await?);
    }
    let measure_from = Instant::now() + WARMUP;
    let until = measure_from + knobs.measure();
    let mut workers = JoinSet::new();
    for client in &clients {
        for _ in 0..knobs.inflight {
            workers.spawn(worker(client.clone(), measure_from, until));
        }
    }
    let mut total = Sample::new();
    // Bounded: every call has a deadline, so workers end soon after `until`.
    let collect = async {
        while let Some(done) = workers.join_next().await {
            total.merge(&done.context("load worker panicked")?)?;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(WARMUP + knobs.measure() + CALL_TIMEOUT * 4, collect)
        .await
        .context("load workers did not finish in time")??;
    Ok(total)
}

// ---------------------------------------------------------------------------
// Report

struct Row {
    transport: Transport,
    variant: Variant,
    /// Requests per second of each round.
    rounds: Vec<f64>,
    merged: Sample,
}

impl Row {
    fn median_rps(&self) -> f64 {
        let mut v = self.rounds.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let knobs = Knobs::from_env()?;
    if let Some(format) = knobs.log {
        token_broker::telemetry::init(format, false);
    }
    println!("# token-broker hot path: GetCollectionToken(\"{COLLECTION}\"), warm collection");
    println!();
    println!(
        "config: {} s measured after {} s warm-up, {} connections x {} in flight = {} concurrent calls, {} rounds per transport (interleaved bare/broker)",
        knobs.secs,
        WARMUP.as_secs(),
        knobs.conns,
        knobs.inflight,
        knobs.conns * knobs.inflight,
        knobs.rounds,
    );
    println!(
        "runtimes: each server on its own multi-thread runtime ({t} workers), load on another ({t} workers); {t} CPUs available; tracing subscriber: {log}",
        t = knobs.threads,
        log = knobs.log.map_or("none", |f| match f {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }),
    );

    let load_rt = runtime("load", knobs.threads)?;
    let dir = tempfile::tempdir().context("cannot create a temp dir for Unix sockets")?;
    let mut rows: Vec<Row> = Vec::new();
    let mut sizes = Vec::new();

    for transport in [Transport::Tcp, Transport::Unix] {
        // The broker first: the bare server mirrors the size of its answer.
        let broker = Running::start(Serve::Broker, transport, dir.path(), knobs.threads)?;
        let broker_resp = load_rt.block_on(wait_ready(&broker.addr))?;
        let bare = Running::start(
            Serve::Bare(bare_response(&broker_resp)?),
            transport,
            dir.path(),
            knobs.threads,
        )?;
        let bare_resp = load_rt.block_on(wait_ready(&bare.addr))?;
        let (bare_len, broker_len) = (bare_resp.encoded_len(), broker_resp.encoded_len());
        if bare_len != broker_len {
            bail!("response sizes differ: bare {bare_len} bytes, broker {broker_len} bytes");
        }
        sizes.push((transport, broker_len));
        let servers = [bare, broker];
        for s in &servers {
            rows.push(Row {
                transport,
                variant: s.variant,
                rounds: Vec::with_capacity(knobs.rounds),
                merged: Sample::new(),
            });
        }
        for round in 1..=knobs.rounds {
            for s in &servers {
                let sample = load_rt.block_on(load(&s.addr, &knobs))?;
                #[expect(clippy::cast_precision_loss, reason = "request counts well below 2^52")]
                let rps = sample.ok as f64 / knobs.measure().as_secs_f64();
                eprintln!(
                    "{} {} round {round}: {rps:.0} req/s, p50 {:.1} µs, p99 {:.1} µs, errors {}",
                    transport.name(),
                    s.variant.name(),
                    sample.quantile_us(0.5),
                    sample.quantile_us(0.99),
                    sample.errors,
                );
                let row = rows
                    .iter_mut()
                    .find(|r| r.transport == transport && r.variant == s.variant)
                    .expect("a row per server");
                row.rounds.push(rps);
                row.merged.merge(&sample)?;
            }
        }
        for s in servers {
            s.stop()?;
        }
    }
    load_rt.shutdown_timeout(Duration::from_secs(1));

    println!(
        "response size, encoded, identical for both servers: {} bytes",
        sizes
            .iter()
            .map(|(t, n)| format!("{} {n}", t.name()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!("| transport | server | req/s | p50 µs | p99 µs | errors |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {} |",
            r.transport.name(),
            r.variant.name(),
            r.median_rps(),
            r.merged.quantile_us(0.5),
            r.merged.quantile_us(0.99),
            r.merged.errors,
        );
    }
    println!();
    for transport in [Transport::Tcp, Transport::Unix] {
        let find = |v: Variant| {
            rows.iter()
                .find(|r| r.transport == transport && r.variant == v)
                .expect("a row per server")
        };
        let (bare, broker) = (find(Variant::Bare), find(Variant::Broker));
        let ratio = |q: f64| broker.merged.quantile_us(q) / bare.merged.quantile_us(q);
        println!(
            "ratio {}: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x (throughput goal >= 0.90x)",
            transport.name(),
            broker.median_rps() / bare.median_rps(),
            ratio(0.5),
            ratio(0.99),
        );
    }

    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r.merged.errors > 0)
        .map(|r| {
            format!(
                "{} {}: {} errors, first: {}",
                r.transport.name(),
                r.variant.name(),
                r.merged.errors,
                r.merged.first_error.as_deref().unwrap_or("?"),
            )
        })
        .collect();
    if !failed.is_empty() {
        bail!("calls failed: {}", failed.join("; "));
    }
    Ok(())
}

/// The sidecar as `serve --dev` assembles it, on `listener`, without admin.
async fn serve_dev(listener: Listener, shutdown: CancellationToken) -> anyhow::Result<()> {
    use token_broker::app;
    let config = Config::dev(TOKEN_TTL)?;
    let store = app::open_store(&config, &shutdown).await?;
    let listeners = app::Listeners {
        api: listener,
        admin: None,
    };
    let draining = shutdown.child_token();
    app::run(config, store, listeners, shutdown, draining).await
}
