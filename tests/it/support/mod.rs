//! The shared test harness. This module holds the general helpers (a
//! deadline-bound `get`, `next_token`, `ts`, `settle`, log capture and the
//! no-secret-in-logs check, `random_secret`, `secret_file`, `python`,
//! `signal`); each submodule holds one kind of fixture:
//!
//! - `scripted`: scripted upstream sources and the collection specs over them;
//! - `server`: `TestServer`, a broker and its gRPC API in this process;
//! - `binary`: the real `token-broker` binary on a Unix socket (`Served`);
//! - `upstream`: fake HTTP upstreams (OAuth2, OverDrive, any JSON endpoint);
//! - `pki`: a throwaway CA, server and client certificates, and TLS files
//!   rotated by symlink swap;
//! - `postgres`: a fresh database per test, PgBouncer helpers;
//! - `fault_proxy`: a TCP proxy that cuts, black-holes or delays connections;
//! - `fleet`: several real sidecars on one database (`FleetEnv`, `Route`);
//! - `load`: clients and watchers of a fleet that record every token they
//!   see, and the checks on what they saw.

pub mod binary;
pub mod fault_proxy;
pub mod fleet;
pub mod load;
pub mod pki;
pub mod postgres;
pub mod scripted;
pub mod server;
pub mod upstream;

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use token_broker::grpc::pb::token_broker_client::TokenBrokerClient;
use token_broker::grpc::pb::{self, GetCollectionTokenRequest};
use tonic::transport::Channel;

pub use scripted::{Scripted, Step, policy, required, spec, steady};
pub use server::TestServer;

/// A `WatchToken` stream of `collection` after `after_version` (panics when
/// it is refused).
pub async fn watch(
    client: &mut TokenBrokerClient<Channel>,
    collection: &str,
    after_version: u64,
) -> tonic::Streaming<pb::WatchTokenResponse> {
    client
        .watch_token(pb::WatchTokenRequest {
            collection: collection.to_owned(),
            after_version,
        })
        .await
        .expect("watch refused")
        .into_inner()
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

/// Lets spawned tasks run without letting (paused) time move much. Through
/// a leaf (`server::THROUGH_LEAF`), news crosses a socket between two
/// brokers: a few 1 ms sleeps let the runtime poll its sockets (a yield
/// does not).
pub async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    if std::env::var_os(server::THROUGH_LEAF).is_some() {
        for _ in 0..20 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            tokio::task::yield_now().await;
        }
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
