//! [`TestServer`]: a real broker (on a `MemoryStore`) and its gRPC API
//! (`token_broker::app::serve_api`) on 127.0.0.1:0 or a given listener, in this
//! process, driven through the generated client; from specs (anyone may read
//! anything) or from a config (its TLS and `readers` too). Dropping it starts
//! shutdown; `stop` waits for the server to return.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use token_broker::broker::{Broker, CollectionSpec};
use token_broker::clock::Clock;
use token_broker::config::{Config, ServerConfig};
use token_broker::grpc::authz::Authz;
use token_broker::grpc::pb::token_broker_client::TokenBrokerClient;
use token_broker::listen::{ListenAddr, Listener};
use token_broker::store::MemoryStore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A running broker with its gRPC server on 127.0.0.1:0.
pub struct TestServer {
    pub addr: ListenAddr,
    pub clock: Clock,
    pub shutdown: CancellationToken,
    /// For its metrics (`broker.metrics().encode()`).
    pub broker: Broker,
    handle: Option<JoinHandle<()>>,
    /// Under `TB_TEST_THROUGH_LEAF`: the mid-tier broker this leaf follows.
    mid: Option<Box<TestServer>>,
}

/// Set (to anything) to run every [`TestServer`] built from specs as a leaf:
/// the specs run in a mid-tier broker, and the server the test talks to is
/// a broker whose collections are `kind = "broker"` sources following it, so
/// the same tests check that a leaf answers as a local broker does.
pub const THROUGH_LEAF: &str = "TB_TEST_THROUGH_LEAF";

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
        if std::env::var_os(THROUGH_LEAF).is_some() {
            return Self::leaf_of(specs, cfg, listener).await;
        }
        let store = Arc::new(MemoryStore::new());
        Self::start_full(specs, cfg, Authz::open(), listener, store).await
    }

    /// A server built from a parsed config (its `[server]`, TLS included,
    /// and its collections' `readers`) on `listener`.
    pub async fn from_config(config: &Config, listener: Listener) -> Self {
        let specs = token_broker::app::sources(config).unwrap();
        let authz = token_broker::app::authz(config);
        let store = Arc::new(MemoryStore::new());
        Self::start_full(specs, config.server.clone(), authz, listener, store).await
    }

    /// The specs in a mid-tier broker on 127.0.0.1:0, and a leaf following
    /// every collection of it (same names, same policies) on `listener`.
    async fn leaf_of(specs: Vec<CollectionSpec>, cfg: ServerConfig, listener: Listener) -> Self {
        let names: Vec<(String, bool, bool)> = specs
            .iter()
            .map(|s| (s.name.clone(), s.prefetch, s.required))
            .collect();
        let mid_listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mid = Self::start_full(
            specs,
            cfg.clone(),
            Authz::open(),
            mid_listener,
            Arc::new(MemoryStore::new()),
        )
        .await;
        let ListenAddr::Tcp(mid_addr) = &mid.addr else {
            unreachable!()
        };
        let mut text = String::new();
        for (name, prefetch, required) in names {
            text.push_str(&format!(
                "[collections.{name:?}]\nprefetch = {prefetch}\nrequired = {required}\n\
                 source = {{ kind = \"broker\", addrs = [\"http://{mid_addr}\"] }}\n"
            ));
        }
        let config = Config::parse(&text).unwrap_or_else(|e| panic!("config: {e}\n{text}"));
        let leaf_specs = token_broker::app::sources(&config).unwrap();
        // One clock for both tiers, as NTP keeps real hosts in step (two
        // anchors taken a few ms apart would be a skew of their own).
        let mut leaf = Self::start_clocked(
            leaf_specs,
            cfg,
            Authz::open(),
            listener,
            Arc::new(MemoryStore::new()),
            mid.clock.clone(),
        )
        .await;
        leaf.mid = Some(Box::new(mid));
        leaf
    }

    /// A server built from config text (as `serve --config` would), on a
    /// given store, so that a test can restart the broker on the same store.
    pub async fn from_toml(text: &str, store: Arc<MemoryStore>) -> Self {
        let config = Config::parse(text).unwrap_or_else(|e| panic!("config: {e}\n{text}"));
        let specs = token_broker::app::sources(&config).unwrap();
        let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let authz = token_broker::app::authz(&config);
        Self::start_full(specs, config.server, authz, listener, store).await
    }

    async fn start_full(
        specs: Vec<CollectionSpec>,
        cfg: ServerConfig,
        authz: Authz,
        listener: Listener,
        store: Arc<MemoryStore>,
    ) -> Self {
        let clock = Clock::tokio_anchored(SystemTime::now());
        Self::start_clocked(specs, cfg, authz, listener, store, clock).await
    }

    async fn start_clocked(
        specs: Vec<CollectionSpec>,
        cfg: ServerConfig,
        authz: Authz,
        listener: Listener,
        store: Arc<MemoryStore>,
        clock: Clock,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let broker = Broker::start(specs, store, clock.clone(), shutdown.clone());
        let stop = shutdown.clone();
        let served = broker.clone();
        let handle = tokio::spawn(async move {
            token_broker::app::serve_api(served, &cfg, authz, listener, stop)
                .await
                .unwrap();
        });
        Self {
            addr,
            clock,
            shutdown,
            broker,
            handle: Some(handle),
            mid: None,
        }
    }

    /// Starts shutdown and waits (at most `within`) for the server to return.
    pub async fn stop(mut self, within: Duration) {
        if let Some(mid) = self.mid.take() {
            mid.shutdown.cancel();
        }
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
