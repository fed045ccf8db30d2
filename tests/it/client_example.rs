//! The shared scenario of the client examples (`examples/clients/*`), run as
//! their READMEs say: the README's `serve --dev ...` command starts the real
//! binary (on a Unix socket instead of 127.0.0.1:50051) and its `example`
//! command runs as written (`--demo-api`: the example serves a local API that
//! refuses the first token it sees). The text output must be the README's,
//! line by line: the same events, keys and values, except the times (which the
//! READMEs say vary). Then the scenario goes on past the README: the broker
//! restarts on the same socket and the example's watcher resumes with
//! `after_version`; Ctrl-C stops it cleanly; no token value appears in
//! anything it printed.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use token_broker::grpc::pb::WatchTokenRequest;
use tokio::sync::mpsc;

use crate::support::binary::Served;
use crate::walkthrough::blocks;

/// The address the READMEs' commands use; replaced by the Unix socket.
const README_ADDR: &str = "127.0.0.1:50051";

/// How a client example is run: where it lives, and how the README's
/// interpreter word becomes the test's.
pub struct Client {
    /// `examples/clients/<dir>`.
    pub dir: &'static str,
    /// The README's program word (e.g. `.venv/bin/python`, `node`).
    pub program: &'static str,
    /// What the test runs instead.
    pub run_with: PathBuf,
    /// Extra environment for the example.
    pub env: Vec<(&'static str, OsString)>,
}

impl Client {
    fn root(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/clients")
            .join(self.dir)
    }
}

/// What the README's "Run it" section says: the `serve` arguments, the
/// example's arguments and the output it shows.
struct Readme {
    serve: Vec<String>,
    example: Vec<String>,
    shown: Vec<Value>,
}

fn readme(client: &Client) -> Readme {
    let path = client.root().join("README.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text
        .find("\n## Run it\n")
        .unwrap_or_else(|| panic!("{}: no \"## Run it\" section", path.display()));
    let body = &text[start + 1..];
    let section = &body[..body[3..].find("\n## ").map_or(body.len(), |i| i + 3)];
    let mut commands = Vec::new();
    for block in blocks(section, "sh") {
        let mut lines = block.lines();
        while let Some(line) = lines.next() {
            let mut command = line.split(" #").next().unwrap().trim_end().to_owned();
            while command.ends_with('\\') {
                command.pop();
                command.push(' ');
                command.push_str(lines.next().expect("continuation line").trim());
            }
            commands.push(crate::walkthrough::split(&command));
        }
    }
    let serve = commands
        .iter()
        .find_map(|w| Some(w[w.iter().position(|w| w == "serve")? + 1..].to_vec()))
        .unwrap_or_else(|| panic!("{}: no `serve` command", path.display()));
    assert_eq!(
        serve.first().map(String::as_str),
        Some("--dev"),
        "{serve:?}"
    );
    let example = commands
        .iter()
        .find(|w| w.len() > 1 && w[0] == client.program && w[1].starts_with("example."))
        .unwrap_or_else(|| panic!("{}: no `{} ...` command", path.display(), client.program))
        .clone();
    let outputs = blocks(section, "text");
    assert_eq!(outputs.len(), 1, "want one ```text block (the output)");
    let shown = outputs[0]
        .lines()
        .map(|l| parse_line(l.trim_start_matches("^C")))
        .collect();
    Readme {
        serve,
        example,
        shown,
    }
}

/// One output line, `event  key=value ...`, as a JSON object: numbers,
/// booleans (`True`/`true`) and nulls (`None`/`null`) typed, the rest strings.
fn parse_line(line: &str) -> Value {
    let mut words = line.split_whitespace();
    let mut v = Map::new();
    v.insert("event".into(), words.next().unwrap_or_default().into());
    for w in words {
        let (k, raw) = w
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {w:?} in {line:?}"));
        let value = match raw {
            "True" | "true" => Value::Bool(true),
            "False" | "false" => Value::Bool(false),
            "None" | "null" => Value::Null,
            _ => raw
                .parse::<u64>()
                .map(Value::from)
                .or_else(|_| raw.parse::<f64>().map(Value::from))
                .unwrap_or_else(|_| raw.into()),
        };
        v.insert(k.into(), value);
    }
    Value::Object(v)
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

/// The example's process, its stdout lines parsed on a channel, and all of its
/// stdout and stderr text for the leak check.
struct Proc {
    child: Child,
    lines: mpsc::UnboundedReceiver<Value>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(client: &Client, argv: &[String]) -> Self {
        let mut child = Command::new(&client.run_with)
            .args(&argv[1..])
            .current_dir(client.root())
            .envs(client.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", client.run_with.display()));
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let out = BufReader::new(child.stdout.take().unwrap());
        let text = stdout.clone();
        std::thread::spawn(move || {
            for line in out.lines() {
                let line = line.unwrap();
                text.lock().unwrap().push_str(&line);
                text.lock().unwrap().push('\n');
                if tx.send(parse_line(&line)).is_err() {
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

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// The next output line; fails after `within`.
    async fn next(&mut self, within: Duration) -> Value {
        match tokio::time::timeout(within, self.lines.recv()).await {
            Ok(Some(v)) => v,
            r => {
                let why = if r.is_ok() {
                    "the example closed its output".to_owned()
                } else {
                    format!("no output from the example within {within:?}")
                };
                panic!("{why}\n{}", self.output())
            }
        }
    }

    /// Reads lines until `want` holds for one; returns that and those before.
    async fn until(&mut self, mut want: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let v = self.next(Duration::from_secs(20)).await;
            let done = want(&v);
            seen.push(v);
            if done {
                return seen;
            }
        }
    }
}

impl Drop for Proc {
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

/// Checks real output lines against the README's, key by key: `Err((raced,
/// why))` when they differ, `raced` when only in a version or `refreshed`,
/// which a rotation slipping in between two calls can explain.
fn same_lines(real: &[Value], shown: &[Value]) -> Result<(), (bool, String)> {
    for (i, (r, s)) in real.iter().zip(shown).enumerate() {
        let (r, s) = (r.as_object().unwrap(), s.as_object().unwrap());
        let keys = |m: &Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
        if event(&real[i]) != event(&shown[i]) || keys(r) != keys(s) {
            return Err((false, format!("line {}: {:?}, shown {:?}", i + 1, r, s)));
        }
        for (k, sv) in s {
            let rv = &r[k];
            if k.ends_with("_at") {
                if !rv.as_str().is_some_and(|t| t.contains('T')) {
                    return Err((false, format!("line {}: {k}={rv} is not a time", i + 1)));
                }
            } else if rv != sv {
                let raced = k.contains("version") || k == "refreshed";
                return Err((raced, format!("line {}: {k}={rv}, shown {k}={sv}", i + 1)));
            }
        }
    }
    Ok(())
}

/// Runs the README's commands and the restart scenario for `client`.
pub async fn readme_scenario(client: Client) {
    let readme = readme(&client);
    let (stopped_shown, head_shown) = readme.shown.split_last().expect("shown output");
    assert_eq!(event(stopped_shown), "stopped", "{stopped_shown}");
    let heads: Vec<&str> = head_shown.iter().map(event).collect();
    assert_eq!(
        heads,
        [
            "token",
            "api",
            "invalidated",
            "api",
            "watch",
            "watch",
            "watch"
        ],
        "the README's output lost a step"
    );
    assert!(
        readme.example.iter().any(|a| a == "--demo-api")
            && readme.example.iter().any(|a| a == README_ADDR),
        "the README's example command: {:?}",
        readme.example
    );
    let dev_args: Vec<&str> = readme.serve[1..].iter().map(String::as_str).collect();

    // The versions shown are a fresh server's; on a slow machine a rotation
    // can slip in between two calls, so a version mismatch is retried on a
    // fresh server.
    let mut attempt = 0;
    let (mut served, first_run, mut proc, mut lines) = loop {
        attempt += 1;
        let served = Served::start_dev(&dev_args).await;
        let first_run = collect(&served);
        let target = format!("unix:{}", served.sock().display());
        let argv: Vec<String> = readme
            .example
            .iter()
            .map(|a| {
                if a == README_ADDR {
                    target.clone()
                } else {
                    a.clone()
                }
            })
            .collect();
        let mut proc = Proc::spawn(&client, &argv);
        let mut n = 0;
        let lines = proc
            .until(|v| {
                n += 1;
                n == head_shown.len() || event(v) == "error"
            })
            .await;
        match same_lines(&lines, head_shown) {
            Ok(()) => break (served, first_run, proc, lines),
            Err((true, why)) if attempt < 3 => {
                eprintln!("a rotation raced the README's commands ({why}); again");
                drop(proc);
                served.stop();
            }
            Err((_, why)) => panic!(
                "{}: the output is not the README's: {why}\n{}\nserver log:\n{}",
                client.dir,
                proc.output(),
                served.log()
            ),
        }
    };

    // The invalidation reached the broker, with the local API as the reason.
    let got = version(&lines[0]);
    let log = served.log();
    assert!(
        log.contains(&format!(
            " collection=demo version={got}}}: token_broker::grpc::service: upstream rejected a token"
        )) && log.contains("upstream rejected a token reason=401 from 127.0.0.1:"),
        "no InvalidateToken for version {got} in the server log:\n{log}"
    );

    // Restart the broker on the same socket: the watcher reports the error,
    // reconnects with after_version = the last version it saw, and goes on
    // receiving the new process's tokens (its versions restart at 1).
    served.restart().await;
    let second_run = collect(&served);
    let mut after_restart = proc.until(|v| event(v) == "watch_error").await;
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
        let v = proc.next(Duration::from_secs(20)).await;
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

    // Ctrl-C stops the watcher and the example cleanly, with the README's
    // last line.
    assert!(crate::support::signal(proc.child.id(), "INT"));
    let rest = proc.until(|v| event(v) == "stopped").await;
    let stopped = rest.last().unwrap().clone();
    lines.extend(rest);
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&stopped), keys(stopped_shown), "{stopped}");
    assert!(stopped["reconnects"].as_u64().unwrap() >= 1, "{stopped}");
    assert_eq!(
        version(&stopped),
        *watched(&lines).last().unwrap(),
        "{stopped}"
    );
    let exit = proc.child.wait().unwrap();
    assert!(exit.success(), "example: {exit:?}\n{}", proc.output());

    // No token value, from either run, in anything the example printed.
    let first = first_run.lock().unwrap().clone();
    let second = second_run.lock().unwrap().clone();
    let values: HashSet<&String> = first.values().chain(second.values()).collect();
    assert!(
        values.len() >= 5,
        "too few tokens to check: {}",
        values.len()
    );
    let out = proc.output();
    for v in values {
        assert!(
            !out.contains(v.as_str()),
            "the example printed a token value"
        );
    }
    served.stop();
}
