//! The Python client example (`examples/clients/python`) against the real
//! binary: `example.py --json` gets a token, calls a fake protected API that
//! refuses the first token it sees (401), invalidates that version and retries
//! with the replacement (200), then watches rotations in its background thread
//! across a restart of the broker on the same socket, resuming with
//! `after_version`. Its output must never hold a token value.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use serde_json::Value;
use token_broker::grpc::pb::WatchTokenRequest;
use tokio::sync::mpsc;

use crate::served::Served;

/// Rotates every 1.5 s or so; a forced refresh may follow the last within
/// 200 ms.
const CONFIG: &str = r#"
[collections.demo]
source = { kind = "demo", ttl = "2s" }

[collections.demo.policy]
min_refresh_interval = "200ms"
"#;

/// The protected API: 401 to the first bearer value it ever sees, 200 to any
/// other; records every (bearer, status).
#[derive(Default)]
struct Api {
    seen: Mutex<Vec<(String, u16)>>,
}

async fn protected(State(api): State<Arc<Api>>, headers: HeaderMap) -> StatusCode {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let mut seen = api.seen.lock().unwrap();
    let status = match seen.first() {
        Some((first, _)) if *first != bearer => StatusCode::OK,
        _ => StatusCode::UNAUTHORIZED,
    };
    seen.push((bearer, status.as_u16()));
    status
}

async fn start_api() -> (Arc<Api>, String) {
    let api = Arc::new(Api::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/protected", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/protected", get(protected))
        .with_state(api.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (api, url)
}

/// Every (version, value) the broker streams, from a Rust watcher on its own
/// connection; ends when the server shuts the stream.
fn collect(served: &Served) -> Arc<Mutex<BTreeMap<u64, String>>> {
    let tokens = Arc::new(Mutex::new(BTreeMap::new()));
    let addr = served.addr();
    let out = tokens.clone();
    tokio::spawn(async move {
        let mut client = token_broker::client::connect(&addr).await.unwrap();
        let req = WatchTokenRequest {
            collection: "demo".into(),
            after_version: 0,
        };
        let mut stream = client.watch_token(req).await.unwrap().into_inner();
        while let Ok(Some(msg)) = stream.message().await {
            let t = msg.token.unwrap();
            out.lock().unwrap().insert(t.version, t.value);
        }
    });
    tokens
}

/// The Python process, its stdout lines as parsed JSON on a channel, and all
/// of its stdout and stderr text for the leak check.
struct Py {
    child: Child,
    lines: mpsc::UnboundedReceiver<Value>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Py {
    fn spawn(args: &[&str], stubs: &Path) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/clients/python");
        let mut child = Command::new(crate::support::python())
            .arg("example.py")
            .args(args)
            .current_dir(&dir)
            .env("TOKEN_BROKER_STUBS_DIR", stubs)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let out = BufReader::new(child.stdout.take().unwrap());
        let text = stdout.clone();
        std::thread::spawn(move || {
            for line in out.lines() {
                let line = line.unwrap();
                text.lock().unwrap().push_str(&line);
                text.lock().unwrap().push('\n');
                let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let text = stderr.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            text.lock().unwrap().push_str(&s);
        });
        Self {
            child,
            lines,
            stdout,
            stderr,
        }
    }

    /// The next output line; fails after `within`.
    async fn next(&mut self, within: Duration) -> Value {
        match tokio::time::timeout(within, self.lines.recv()).await {
            Ok(Some(v)) => v,
            r => {
                let why = if r.is_ok() {
                    "example.py closed its output".to_owned()
                } else {
                    format!("no output from example.py within {within:?}")
                };
                let stdout = self.stdout.lock().unwrap().clone();
                let stderr = self.stderr.lock().unwrap().clone();
                panic!("{why}\nstdout:\n{stdout}\nstderr:\n{stderr}")
            }
        }
    }

    /// Reads lines until `want` holds for one; returns that and those before.
    async fn until(&mut self, mut want: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let v = self.next(Duration::from_secs(20)).await;
            assert!(v.is_object(), "not a JSON line: {v}");
            let done = want(&v);
            seen.push(v);
            if done {
                return seen;
            }
        }
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn event(v: &Value) -> &str {
    v["event"].as_str().unwrap_or_default()
}

fn version(v: &Value) -> u64 {
    v["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("no version: {v}"))
}

/// Versions of the `watch` lines among `lines`.
fn watched(lines: &[Value]) -> Vec<u64> {
    lines
        .iter()
        .filter(|v| event(v) == "watch")
        .map(version)
        .collect()
}

fn consecutive(versions: &[u64]) -> bool {
    versions.windows(2).all(|w| w[1] == w[0] + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_invalidates_on_401_and_watches_across_a_restart() {
    let mut served = Served::start(CONFIG, &[]).await;
    let first_run = collect(&served);
    let (api, url) = start_api().await;
    let stubs = tempfile::tempdir().unwrap();
    let target = format!("unix:{}", served.sock().display());
    let mut py = Py::spawn(
        &[
            "--json",
            "--target",
            &target,
            "--collection",
            "demo",
            "--api-url",
            &url,
            "--watch",
            "120",
        ],
        stubs.path(),
    );

    // Get, 401, invalidate, 200; then the watcher sees two rotations in order.
    let mut api_calls = 0;
    let mut lines = py
        .until(|v| {
            api_calls += usize::from(event(v) == "api");
            api_calls == 2 || event(v) == "error"
        })
        .await;
    let head: Vec<&str> = lines.iter().map(event).collect();
    assert_eq!(head, ["token", "api", "invalidated", "api"], "{lines:?}");
    let got = version(&lines[0]);
    assert_eq!(lines[1]["status"], 401);
    assert_eq!(version(&lines[1]), got);
    assert_eq!(lines[2]["rejected_version"], got);
    let replaced = version(&lines[2]);
    assert!(
        replaced > got,
        "the broker's version did not advance: {lines:?}"
    );
    assert_eq!(lines[3]["status"], 200);
    assert_eq!(version(&lines[3]), replaced);
    let log = served.log();
    assert!(
        log.contains(&format!(
            " collection=demo version={got}}}: token_broker::grpc::service: upstream rejected a token"
        )) && log.contains("upstream rejected a token reason=401 from 127.0.0.1:"),
        "no InvalidateToken for version {got} in the server log:\n{log}"
    );
    let mut before: Vec<u64> = vec![];
    while before.len() < 3 {
        let v = py.next(Duration::from_secs(20)).await;
        if event(&v) == "watch" {
            before.push(version(&v));
        }
        lines.push(v);
    }
    let all_before = watched(&lines);
    assert!(
        all_before.len() >= 3 && consecutive(&all_before) && all_before[0] >= replaced,
        "the watcher missed or reordered a rotation: {all_before:?}"
    );

    // Restart the broker on the same socket: the watcher reports the error,
    // reconnects with after_version = the last version it saw, and goes on
    // receiving the new process's tokens (its versions restart at 1).
    served.restart().await;
    let second_run = collect(&served);
    let mut after_restart = py.until(|v| event(v) == "watch_error").await;
    let last = *watched(&lines)
        .iter()
        .chain(watched(&after_restart).iter())
        .last()
        .unwrap();
    let error = after_restart.last().unwrap().clone();
    assert_eq!(error["code"], "UNAVAILABLE", "{error}");
    assert_eq!(error["after_version"], last, "{error}");
    lines.append(&mut after_restart);
    let mut resumed = vec![];
    while resumed.len() < 2 {
        let v = py.next(Duration::from_secs(20)).await;
        if event(&v) == "watch" {
            resumed.push(version(&v));
        }
        lines.push(v);
    }
    assert!(consecutive(&resumed), "after the restart: {resumed:?}");
    let log = served.log();
    assert!(
        log.contains(&format!(
            " collection=demo after_version={last}}}: token_broker::grpc::service: watch opened"
        )),
        "the watcher did not resume with after_version={last}:\n{log}"
    );

    // Ctrl-C stops the watcher thread and the example cleanly.
    let status = Command::new("kill")
        .args(["-INT", &py.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest = py.until(|v| event(v) == "stopped").await;
    let stopped = rest.last().unwrap();
    assert!(stopped["reconnects"].as_u64().unwrap() >= 1, "{stopped}");
    lines.extend(rest);
    let exit = py.child.wait().unwrap();
    let stderr = py.stderr.lock().unwrap().clone();
    assert!(exit.success(), "example.py: {exit:?}\n{stderr}");

    // The API saw the refused token, then a different one: the broker's token
    // for the version the invalidation returned.
    let first = first_run.lock().unwrap().clone();
    let second = second_run.lock().unwrap().clone();
    let seen = api.seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        [401, 200],
        "API calls"
    );
    assert!(
        first.get(&got) == Some(&seen[0].0),
        "the API's first bearer is not the broker's version {got}"
    );
    assert!(
        first.get(&replaced) == Some(&seen[1].0) && seen[0].0 != seen[1].0,
        "the API's second bearer is not the broker's version {replaced}"
    );

    // No token value, from either run, in anything the example printed.
    let values: HashSet<&String> = first
        .values()
        .chain(second.values())
        .chain(seen.iter().map(|(v, _)| v))
        .collect();
    assert!(
        values.len() >= 5,
        "too few tokens to check: {}",
        values.len()
    );
    let out = format!("{}{}", py.stdout.lock().unwrap(), py.stderr.lock().unwrap());
    for v in values {
        assert!(
            !out.contains(v.as_str()),
            "example.py printed a token value"
        );
    }
    served.stop();
}
