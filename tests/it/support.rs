//! Test support: a scripted upstream source that counts calls, and a real
//! broker + gRPC server on 127.0.0.1:0 driven through the generated client.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use token_broker::broker::{Broker, CollectionSpec, Policy};
use token_broker::clock::Clock;
use token_broker::config::{Config, ServerConfig};
use token_broker::grpc::pb::token_broker_client::TokenBrokerClient;
use token_broker::grpc::pb::{self, GetCollectionTokenRequest};
use token_broker::listen::{ListenAddr, Listener};
use token_broker::source::{BoxFuture, FailureClass, FetchContext, FetchError, Fetched, Source};
use token_broker::store::MemoryStore;
use token_broker::token::Secret;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// What the scripted upstream does on one call.
#[derive(Debug, Clone)]
pub enum Step {
    /// A fresh token `tok-N` (N = call number) living `ttl` (None: opaque).
    Token(Option<Duration>),
    /// A token with this exact value, living `ttl`.
    Value(&'static str, Duration),
    Fail(FailureClass),
    Panic,
}

/// An upstream that counts calls, follows a script (then repeats `then`), can
/// be slowed down, and can be gated so calls block until the test opens it.
pub struct Scripted {
    calls: AtomicUsize,
    script: Mutex<VecDeque<Step>>,
    then: Mutex<Step>,
    delay: Mutex<Duration>,
    gate: Option<Arc<Semaphore>>,
    /// Wall-clock time of each call, as the broker saw it.
    pub call_times: Mutex<Vec<SystemTime>>,
}

impl Scripted {
    pub fn new(script: impl IntoIterator<Item = Step>, then: Step) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            script: Mutex::new(script.into_iter().collect()),
            then: Mutex::new(then),
            delay: Mutex::new(Duration::ZERO),
            gate: None,
            call_times: Mutex::new(Vec::new()),
        })
    }

    /// Tokens living `ttl`, forever.
    pub fn tokens(ttl: Duration) -> Arc<Self> {
        Self::new([], Step::Token(Some(ttl)))
    }

    /// Like `new`, but every call waits for a permit from the returned gate.
    pub fn gated(
        script: impl IntoIterator<Item = Step>,
        then: Step,
    ) -> (Arc<Self>, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let mut s = Arc::into_inner(Self::new(script, then)).unwrap();
        s.gate = Some(gate.clone());
        (Arc::new(s), gate)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }
}

impl Source for Scripted {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    fn fetch(&self, ctx: FetchContext) -> BoxFuture<'_, Result<Fetched, FetchError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.call_times.lock().unwrap().push(ctx.now);
            let step = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| self.then.lock().unwrap().clone());
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            let delay = *self.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            match step {
                Step::Token(ttl) => Ok(Fetched::token(
                    Secret::new(format!("tok-{n}")),
                    ttl.map(|t| ctx.now + t),
                )),
                Step::Value(v, ttl) => Ok(Fetched::token(Secret::new(v), Some(ctx.now + ttl))),
                Step::Fail(class) => Err(FetchError::new(class, format!("scripted failure {n}"))),
                Step::Panic => panic!("scripted panic"),
            }
        })
    }
}

/// A prefetched collection whose upstream always answers with a 300 s token.
pub fn steady(name: &str) -> CollectionSpec {
    spec(
        name,
        Scripted::tokens(Duration::from_secs(300)),
        policy(),
        true,
    )
}

/// The next token on a watch stream (panics on an error or end of stream).
pub async fn next_token(stream: &mut tonic::Streaming<pb::WatchTokenResponse>) -> pb::Token {
    stream
        .message()
        .await
        .expect("stream error")
        .expect("stream ended")
        .token
        .expect("token")
}

pub fn spec(name: &str, source: Arc<Scripted>, policy: Policy, prefetch: bool) -> CollectionSpec {
    CollectionSpec {
        name: name.to_owned(),
        source,
        policy,
        prefetch,
        required: false,
    }
}

/// `spec` marked required: readiness waits for its token.
pub fn required(spec: CollectionSpec) -> CollectionSpec {
    CollectionSpec {
        required: true,
        ..spec
    }
}

/// A running broker with its gRPC server on 127.0.0.1:0.
pub struct TestServer {
    pub addr: ListenAddr,
    pub clock: Clock,
    pub shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(specs: Vec<CollectionSpec>) -> Self {
        Self::start_with(specs, ServerConfig::default()).await
    }

    pub async fn start_with(specs: Vec<CollectionSpec>, cfg: ServerConfig) -> Self {
        let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Self::start_on(specs, cfg, listener).await
    }

    pub async fn start_on(
        specs: Vec<CollectionSpec>,
        cfg: ServerConfig,
        listener: Listener,
    ) -> Self {
        Self::start_full(specs, cfg, listener, Arc::new(MemoryStore::new())).await
    }

    /// A server built from config text (as `serve --config` would), on a
    /// given store, so that a test can restart the broker on the same store.
    pub async fn from_toml(text: &str, store: Arc<MemoryStore>) -> Self {
        let config = Config::parse(text).unwrap_or_else(|e| panic!("config: {e}\n{text}"));
        let specs = token_broker::app::sources(&config).unwrap();
        let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Self::start_full(specs, config.server, listener, store).await
    }

    async fn start_full(
        specs: Vec<CollectionSpec>,
        cfg: ServerConfig,
        listener: Listener,
        store: Arc<MemoryStore>,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let clock = Clock::tokio_anchored(SystemTime::now());
        let shutdown = CancellationToken::new();
        let broker = Broker::start(specs, store, clock.clone(), shutdown.clone());
        let stop = shutdown.clone();
        let handle = tokio::spawn(async move {
            token_broker::app::serve_api(broker, &cfg, listener, stop)
                .await
                .unwrap();
        });
        Self {
            addr,
            clock,
            shutdown,
            handle: Some(handle),
        }
    }

    /// Starts shutdown and waits (at most `within`) for the server to return.
    pub async fn stop(mut self, within: Duration) {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(within, handle)
            .await
            .expect("server did not stop in time")
            .expect("server task failed");
    }

    /// A client on a new connection.
    pub async fn client(&self) -> TokenBrokerClient<Channel> {
        token_broker::client::connect(&self.addr).await.unwrap()
    }

    pub async fn channel(&self) -> Channel {
        match &self.addr {
            ListenAddr::Tcp(a) => tonic::transport::Endpoint::from_shared(format!("http://{a}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
            ListenAddr::Unix(_) => panic!("tcp only"),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `GetCollectionToken` with a deadline.
pub async fn get(
    client: &mut TokenBrokerClient<Channel>,
    collection: &str,
    timeout: Duration,
) -> Result<pb::Token, tonic::Status> {
    let mut req = tonic::Request::new(GetCollectionTokenRequest {
        collection: collection.to_owned(),
        min_remaining: None,
    });
    req.set_timeout(timeout);
    client
        .get_collection_token(req)
        .await
        .map(|r| r.into_inner().token.expect("token"))
}

pub fn ts(t: &Option<prost_types::Timestamp>) -> SystemTime {
    SystemTime::try_from(t.expect("timestamp")).unwrap()
}

/// A policy with short, test-friendly numbers and no refresh jitter.
pub fn policy() -> Policy {
    Policy {
        refresh_jitter: 0.0,
        ..Policy::default()
    }
}

/// Lets spawned tasks run without letting (paused) time move much.
pub async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Every log line of this test process, from every level of this crate and
/// `debug` of the libraries (HTTP client and server included). Installed once;
/// under nextest each test is its own process, under `cargo test` the buffer
/// is shared, which only makes the leak checks stricter.
pub fn capture_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,token_broker=trace",
            ))
            .with_writer(|| LogWriter)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
}

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured logs so far.
pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

/// Fails if any of `secrets` appears in the captured logs; also checks that
/// logging was captured at all, so the check cannot pass vacuously.
pub fn assert_no_secret_logged<S: AsRef<str>>(secrets: impl IntoIterator<Item = S>) {
    let logs = logs();
    assert!(
        logs.contains("token_broker"),
        "no log lines were captured; call capture_logs() first"
    );
    let mut checked = 0;
    for s in secrets {
        let s = s.as_ref();
        assert!(s.len() >= 6, "secret {s:?} too short to check for");
        assert!(!logs.contains(s), "a secret appears in the logs");
        checked += 1;
    }
    assert!(checked > 0, "no secrets to check");
}

/// A file holding `value`, in `dir`; returns its path for `..._file` fields.
pub fn secret_file(dir: &tempfile::TempDir, name: &str, value: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, value).unwrap();
    p.display().to_string()
}

/// A random secret-looking string, unique per call.
pub fn random_secret(prefix: &str) -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{prefix}-{n:016x}")
}

/// The Python interpreter of the test tools' virtualenv (`scripts/py-env`):
/// `TOKEN_BROKER_TEST_PYTHON`, else `target/py/bin/python`. Panics with the
/// way to get one, so a missing tool is a failure, never a skipped test.
pub fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TOKEN_BROKER_TEST_PYTHON") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python");
    assert!(
        p.exists(),
        "the Python test tools are missing: run scripts/test (or `source scripts/py-env`)"
    );
    p
}

/// Sends `signal` (`TERM`, `INT`, ...) to process `pid` through `sh`'s
/// built-in `kill`: a fresh Debian has `/bin/sh` but not always `procps`'
/// `/bin/kill`. True when the signal was delivered.
pub fn signal(pid: u32, signal: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", "kill -s \"$0\" \"$1\"", signal, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}
