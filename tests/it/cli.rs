//! The real binary: `serve --dev`, the client subcommands, `check-config`,
//! `wait`, exit codes, signals (the drain delay too), bind errors, the
//! runtime's size, plain logs, and that no token value reaches the logs.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Kills the child if a test fails half-way.
struct Server(Option<Child>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "server did not create {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    assert!(crate::support::signal(child.id(), "TERM"));
}

#[test]
fn dev_server_answers_the_client_subcommands_without_leaking_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tb.sock");
    let addr = format!("unix:{}", sock.display());
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--dev-token-ttl",
            "2s",
            "--listen",
            &addr,
            "--no-admin",
        ])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = Server(Some(child));
    wait_for_socket(&sock);

    let out = run(&["get", "demo", "--addr", &addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("collection: demo") && text.contains("version:"),
        "{text}"
    );
    assert!(
        !text.contains("demo-"),
        "the summary printed the token value: {text}"
    );

    let out = run(&["get", "demo", "--addr", &addr, "--value"]);
    let value = stdout(&out).trim().to_owned();
    assert!(value.starts_with("demo-") && value.len() == 37, "{value:?}");

    // Two rotations of a 2 s token, printed as they happen.
    let out = run(&["watch", "demo", "--addr", &addr, "--count", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let versions: Vec<u64> = stdout(&out)
        .lines()
        .map(|l| {
            l.split_whitespace()
                .next()
                .unwrap()
                .trim_start_matches("version=")
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(versions.len(), 3);
    assert!(
        versions.windows(2).all(|w| w[1] == w[0] + 1),
        "{versions:?}"
    );

    let out = run(&[
        "invalidate",
        "demo",
        "--addr",
        &addr,
        "--version",
        "1",
        "--reason",
        "test",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("refreshed:  false"),
        "{}",
        stdout(&out)
    );

    let out = run(&["get", "nope", "--addr", &addr]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));

    // SIGTERM: a clean exit, socket removed.
    // The child stays in the guard, so a failed assertion still kills it.
    let child = server.0.as_mut().unwrap();
    sigterm(child);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists());

    // No token value appears in the debug logs.
    let logs = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(logs.contains("token rotated"), "logs missing: {logs}");
    assert!(!logs.contains(&value), "a token value leaked into the logs");
    assert!(
        !logs.contains("demo-"),
        "a token value leaked into the logs"
    );
}

#[test]
fn check_config_accepts_good_files_and_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[collections.demo]\nsource = { kind = \"demo\", ttl = \"10s\" }\n",
    )
    .unwrap();
    let out = run(&["check-config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("config ok: 1 collection(s): demo"));

    let cases = [
        (
            "[collections.demo]\nsource = { kind = \"demo\", ttl = \"soon\" }\n",
            "collections.demo.source.ttl",
        ),
        (
            "[collections.demo]\nsource = { kind = \"oauth9\" }\n",
            "collections.demo.source.kind",
        ),
        (
            "[server]\nlisten = \"nowhere\"\n[collections.a]\nsource = { kind = \"demo\" }\n",
            "server.listen",
        ),
        (
            "[server]\nmax_message_bytes = 10\n[collections.a]\nsource = { kind = \"demo\" }\n",
            "server.max_message_bytes",
        ),
        (
            "[collections.a]\nsource = { kind = \"demo\" }\npolicy = { backoff_initial = \"10s\", backoff_max = \"1s\" }\n",
            "collections.a.policy.backoff_max",
        ),
        (
            "[collections.a]\nsource = { kind = \"demo\" }\nprefetch = \"yes\"\n",
            "collections.a.prefetch",
        ),
        (
            "[collections.a]\nsource = { kind = \"demo\" }\ncolour = 1\n",
            "collections.a.colour",
        ),
        ("[server]\n", "collections"),
        (
            "[collections.od]\nsource = { kind = \"overdrive\", oauth = \"nope\", library_id = 1 }\n",
            "collections.od.source.oauth",
        ),
        (
            "[collections.a]\nsource = { kind = \"http_json\", url = \"https://x.example/\", bearer_from = \"b\" }\n[collections.b]\nsource = { kind = \"overdrive\", oauth = \"a\", library_id = 1 }\n",
            "collections.a.source.bearer_from",
        ),
        (
            "[collections.o]\nsource = { kind = \"oauth2_client_credentials\", token_url = \"https://x.example/t\", client_id = \"i\", client_secret = \"inline\" }\n",
            "collections.o.source.client_secret",
        ),
    ];
    for (text, field) in cases {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text).unwrap();
        let out = run(&["check-config", bad.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(64), "{text}");
        let err = stderr(&out);
        assert!(
            err.starts_with(&format!("config error: {field}: ")),
            "{text}\n=> {err}"
        );
    }
    let out = run(&["check-config", "/nonexistent/x.toml"]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn serve_with_a_bad_config_exits_64_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("never.sock");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[server]\nlisten = \"unix:{}\"\n[collections.a]\nsource = {{ kind = \"demo\" }}\npolicy = {{ refresh_fraction = 2.0 }}\n",
            sock.display()
        ),
    )
    .unwrap();
    let out = run(&["serve", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("collections.a.policy.refresh_fraction"),
        "{}",
        stderr(&out)
    );
    assert!(
        !sock.exists(),
        "a socket was bound before the config was validated"
    );

    let out = run(&["serve", "--dev", "--listen", "0.0.0.0"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("--listen"), "{}", stderr(&out));
}

#[test]
fn serve_runs_from_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("cfg.sock");
    let cfg = dir.path().join("tb.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"unix:{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[collections.lazy]\nprefetch = false\nsource = {{ kind = \"demo\", ttl = \"1h\" }}\n",
            sock.display()
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Server(Some(child));
    wait_for_socket(&sock);
    let out = run(&["get", "lazy", "--addr", &format!("unix:{}", sock.display())]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("version:    1"));
}

#[test]
fn a_bad_or_busy_admin_address_fails_at_start_naming_it() {
    let out = run(&["serve", "--dev", "--admin-listen", "nope"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("--admin-listen"), "{}", stderr(&out));
    // A port someone else holds: no half-started sidecar.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix:{}", dir.path().join("tb.sock").display());
    let out = run(&["serve", "--dev", "--listen", &sock, "--admin-listen", &addr]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("--admin-listen: cannot listen on {addr}")),
        "{}",
        stderr(&out)
    );
}

/// Waits up to `within` for `child` to exit.
fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit in {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port bound by this test: nobody else can listen on it while it lives.
fn busy_port() -> (std::net::TcpListener, String) {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    (busy, addr)
}

#[test]
fn an_address_in_use_fails_the_same_way_for_every_listener_and_source() {
    let (_busy, busy) = busy_port();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tb.sock");
    let unix = format!("unix:{}", sock.display());
    let demo = "[collections.a]\nsource = { kind = \"demo\" }\n";
    let config = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let token_cfg = config(
        "token.toml",
        format!("[server]\nlisten = \"{busy}\"\n[admin]\nenabled = false\n{demo}"),
    );
    let admin_cfg = config(
        "admin.toml",
        format!("[server]\nlisten = \"{unix}\"\n[admin]\nlisten = \"{busy}\"\n{demo}"),
    );
    let in_use = |field: &str, flag: &str| {
        format!(
            "cannot listen on {busy}: address already in use (another process holds it; \
             set {field} or {flag} to another address)"
        )
    };
    let cases: [(Vec<&str>, String); 4] = [
        (
            vec!["serve", "--config", &token_cfg],
            format!(
                "error: server.listen: {}",
                in_use("server.listen", "--listen")
            ),
        ),
        (
            vec!["serve", "--dev", "--no-admin", "--listen", &busy],
            format!("error: --listen: {}", in_use("server.listen", "--listen")),
        ),
        (
            vec!["serve", "--config", &admin_cfg],
            format!(
                "error: admin.listen: {}",
                in_use("admin.listen", "--admin-listen")
            ),
        ),
        (
            vec!["serve", "--dev", "--listen", &unix, "--admin-listen", &busy],
            format!(
                "error: --admin-listen: {}",
                in_use("admin.listen", "--admin-listen")
            ),
        ),
    ];
    for (args, expected) in cases {
        let out = Command::new(BIN)
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).trim_end(), expected, "{args:?}");
        assert!(!sock.exists(), "{args:?} left its socket behind");
    }
}

#[test]
fn worker_threads_size_the_runtime_and_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tb.sock");
    let cfg = dir.path().join("tb.toml");
    let write = |threads: usize| {
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"unix:{}\"\nworker_threads = {threads}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [collections.demo]\nsource = {{ kind = \"demo\", ttl = \"1h\" }}\n",
                sock.display()
            ),
        )
        .unwrap();
    };
    let cfg_arg = cfg.to_str().unwrap();

    // Out of range: exit 64 naming the field or the flag, nothing bound.
    write(65);
    let out = run(&["serve", "--config", cfg_arg]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("config error: server.worker_threads: must be between 1 and 64"),
        "{}",
        stderr(&out)
    );
    assert!(!sock.exists());
    write(1);
    let out = run(&["serve", "--config", cfg_arg, "--worker-threads", "0"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("config error: --worker-threads: must be between 1 and 64"),
        "{}",
        stderr(&out)
    );
    let out = Command::new(BIN)
        .args(["serve", "--config", cfg_arg])
        .env("TOKEN_BROKER_WORKER_THREADS", "100")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--worker-threads"),
        "{}",
        stderr(&out)
    );
    assert!(!sock.exists());

    // One worker thread serves.
    let child = Command::new(BIN)
        .args(["serve", "--config", cfg_arg])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(Some(child));
    wait_for_socket(&sock);
    let addr = format!("unix:{}", sock.display());
    for _ in 0..3 {
        let out = run(&["get", "demo", "--addr", &addr]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stdout(&out).contains("collection: demo"),
            "{}",
            stdout(&out)
        );
    }
    // The runtime's threads are named `token-broker-worker` (15 bytes in
    // /proc); `serve --dev` starts no blocking-pool thread (which would
    // share the name) before shutdown.
    let pid = server.0.as_ref().unwrap().id();
    let workers = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm"));
            comm.is_ok_and(|c| c.trim() == "token-broker-wo")
        })
        .count();
    assert_eq!(workers, 1);
}

#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tb.sock");
    let addr = format!("unix:{}", sock.display());
    let child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--listen",
            &addr,
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("TOKEN_BROKER_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = Server(Some(child));
    wait_for_socket(&sock);
    let out = run(&["get", "demo", "--addr", &addr]);
    assert!(out.status.success(), "{}", stderr(&out));
    sigterm(server.0.as_ref().unwrap());
    let out = server.0.take().unwrap().wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let logs = stderr(&out);
    assert!(
        !logs.contains("\x1b["),
        "colour codes in piped logs:\n{logs:?}"
    );
    // Fields are plain key=value, so `grep 'version=1'` finds them.
    for field in [
        "version=1",
        "admin=127.0.0.1:",
        "ready=true",
        "signal=\"SIGTERM\"",
    ] {
        assert!(
            logs.lines().any(|l| l.contains(field)),
            "no line with {field}:\n{logs}"
        );
    }
}

#[test]
fn wait_returns_once_the_broker_is_ready_and_times_out_on_a_closed_address() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tb.sock");
    let addr = format!("unix:{}", sock.display());
    // Started before the server: it polls until the socket answers SERVING.
    let waiter = Command::new(BIN)
        .args(["wait", "--timeout", "30s", "--interval", "50ms"])
        .env("TOKEN_BROKER_ADDR", &addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let child = Command::new(BIN)
        .args(["serve", "--dev", "--no-admin", "--listen", &addr])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Server(Some(child));
    let out = waiter.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(&format!("{addr} is serving (waited ")),
        "{}",
        stdout(&out)
    );
    // Ready means a token is there.
    let out = run(&["get", "demo", "--addr", &addr, "--timeout", "1s"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Nobody listens there.
    let closed = {
        let (l, a) = busy_port();
        drop(l);
        a
    };
    let started = Instant::now();
    let out = run(&[
        "wait",
        "--addr",
        &closed,
        "--timeout",
        "1s",
        "--interval",
        "100ms",
    ]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with(&format!(
            "error: {closed} not serving after 1s (last: cannot connect to {closed}"
        )),
        "{}",
        stderr(&out)
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    let out = run(&["wait", "--interval", "0s"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn a_shutdown_delay_keeps_serving_tokens_after_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("tb.sock");
    let addr = format!("unix:{}", sock.display());
    let log = dir.path().join("server.log");
    let delay = Duration::from_secs(3);
    let child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--no-admin",
            "--listen",
            &addr,
            "--shutdown-delay",
            "3s",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server(Some(child));
    let out = run(&["wait", "--addr", &addr, "--timeout", "20s"]);
    assert!(out.status.success(), "{}", stderr(&out));

    sigterm(server.0.as_ref().unwrap());
    let signalled = Instant::now();
    // Readiness is off at once; tokens are still served.
    let out = run(&["wait", "--addr", &addr, "--timeout", "500ms"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("NOT_SERVING"), "{}", stderr(&out));
    let out = run(&["get", "demo", "--addr", &addr, "--timeout", "1s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        signalled.elapsed() < delay,
        "too slow to test within the delay"
    );
    let mut child = server.0.take().unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= delay,
        "exited {took:?} after SIGTERM, before the delay"
    );
    assert!(!sock.exists());
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("draining"), "{logs}");
    assert!(logs.contains("drain delay over; shutting down"), "{logs}");

    // A second signal ends the delay at once.
    let child = Command::new(BIN)
        .args(["serve", "--dev", "--no-admin", "--listen", &addr])
        .args(["--shutdown-delay", "5m"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Server(Some(child));
    let out = run(&["wait", "--addr", &addr, "--timeout", "20s"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let child = server.0.as_mut().unwrap();
    sigterm(child);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited during the delay"
    );
    sigterm(child);
    let status = wait_exit(child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(130));

    let out = run(&["serve", "--dev", "--shutdown-delay", "6m"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("config error: --shutdown-delay: must be at most 5m"),
        "{}",
        stderr(&out)
    );
}
