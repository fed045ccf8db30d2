//! The real `token-broker` binary serving a config on a Unix socket in its
//! own temp dir, with its log captured to a file: used by the example tests
//! and by the multi-process (fleet and fault) tests. Killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use token_broker::grpc::pb::token_broker_client::TokenBrokerClient;
use token_broker::listen::ListenAddr;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

/// Arguments added to every `serve` this harness starts, so that no test binds
/// a fixed port: the admin listener takes a free port, which it logs
/// ([`Served::admin_addr`]).
pub const SERVE_EXTRA_ARGS: &[&str] = &["--admin-listen", "127.0.0.1:0"];

/// Sets `cmd` (the binary, maybe with more environment) up as
/// `serve <args> --listen unix:<sock>` plus [`SERVE_EXTRA_ARGS`], with `env`
/// and `RUST_LOG=rust_log`, no colour, stdout discarded and stderr to `log`.
pub fn serve_command<'c>(
    cmd: &'c mut Command,
    args: &[std::ffi::OsString],
    sock: &std::path::Path,
    env: &[(String, String)],
    rust_log: &str,
    log: std::fs::File,
) -> &'c mut Command {
    cmd.arg("serve")
        .args(args)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .args(SERVE_EXTRA_ARGS)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
}

pub struct Served {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The `serve` arguments before `--listen`, kept for `restart`.
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
    rust_log: String,
}

impl Served {
    /// Serves `config` with `env` set, logging at debug.
    pub async fn start(config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_logging(config, env, "debug").await
    }

    /// Serves `config` with `env` set and `RUST_LOG=rust_log`; returns once
    /// the socket exists.
    pub async fn start_logging(config: &str, env: &[(&str, &str)], rust_log: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).unwrap();
        let args = vec!["--config".into(), path.into_os_string()];
        Self::spawn(dir, args, env, rust_log).await
    }

    /// `serve --dev` with `args` (e.g. `["--dev-token-ttl", "5s"]`), logging
    /// at debug; returns once the socket exists.
    pub async fn start_dev(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let args = std::iter::once("--dev")
            .chain(args.iter().copied())
            .map(Into::into)
            .collect();
        Self::spawn(dir, args, &[], "debug").await
    }

    async fn spawn(
        dir: tempfile::TempDir,
        args: Vec<std::ffi::OsString>,
        env: &[(&str, &str)],
        rust_log: &str,
    ) -> Self {
        let mut served = Self {
            child: None,
            dir,
            args,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            rust_log: rust_log.to_owned(),
        };
        served.run().await;
        served
    }

    /// Starts the process (on `tb.sock`, logging to `server.log`) and waits
    /// for the socket.
    async fn run(&mut self) {
        let sock = self.dir.path().join("tb.sock");
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = serve_command(
            &mut Command::new(BIN),
            &self.args,
            &sock,
            &self.env,
            &self.rust_log,
            log,
        )
        .spawn()
        .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "server did not start: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server (SIGTERM, clean exit), starts the same command again
    /// on the same socket path, and returns the first run's log (`log()` then
    /// reads the new run's).
    pub async fn restart(&mut self) -> String {
        let child = self.child.take().unwrap();
        self.terminate(child);
        let log = self.log();
        self.run().await;
        log
    }

    pub fn addr(&self) -> ListenAddr {
        ListenAddr::Unix(self.dir.path().join("tb.sock"))
    }

    /// The admin listener's address, as the server logged it.
    pub async fn admin_addr(&self) -> std::net::SocketAddr {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if let Some(addr) = log
                .lines()
                .filter(|l| l.contains("admin listener serving"))
                .find_map(|l| {
                    l.split_once("admin=")?
                        .1
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })
            {
                return addr;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no admin listener in the log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The socket's path (the same across `restart`).
    pub fn sock(&self) -> std::path::PathBuf {
        self.dir.path().join("tb.sock")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub async fn client(&self) -> TokenBrokerClient<Channel> {
        token_broker::client::connect(&self.addr()).await.unwrap()
    }

    pub async fn try_get(&self, collection: &str) -> Result<String, tonic::Status> {
        let mut client = self.client().await;
        crate::support::get(&mut client, collection, Duration::from_secs(10))
            .await
            .map(|t| t.value)
    }

    pub async fn get(&self, collection: &str) -> String {
        match self.try_get(collection).await {
            Ok(value) => value,
            Err(e) => panic!("{collection}: {e:?}\nlog:\n{}", self.log()),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Stops the server (SIGTERM, clean exit) and returns its log.
    pub fn stop(mut self) -> String {
        let child = self.child.take().unwrap();
        self.terminate(child);
        self.log()
    }

    /// SIGTERM, then waits for a clean exit (the child is killed if the
    /// signal cannot be sent, so a failing test leaves no server behind).
    fn terminate(&self, mut child: Child) {
        if !crate::support::signal(child.id(), "TERM") {
            let _ = child.kill();
            let _ = child.wait();
            panic!("could not send SIGTERM to the server");
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "exit: {:?}\n{}",
            out.status,
            self.log()
        );
    }

    /// SIGKILL: no shutdown path runs (a lease it holds stays in the row).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
