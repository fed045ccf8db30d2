//! A chaos sidecar: the real `token-broker serve` on a Unix socket, whose
//! environment (encryption keys) and clock (libfaketime) can change between
//! runs, killed with SIGKILL or stopped with SIGTERM. Each run appends to one
//! log file per sidecar. Killed on drop.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use token_broker::grpc::pb::token_broker_client::TokenBrokerClient;
use token_broker::listen::ListenAddr;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

/// libfaketime (Debian's `faketime` package) when installed, else `None`.
/// It is preloaded into the sidecar itself rather than run through the
/// `faketime` wrapper: the wrapper forks and waits, so a SIGKILL would hit
/// the wrapper and leave the sidecar running.
pub fn libfaketime() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime"))
        .collect();
    dirs.push(PathBuf::from("/usr/lib/faketime"));
    dirs.into_iter()
        .map(|d| d.join("libfaketime.so.1"))
        .find(|p| p.exists())
}

/// The binary the sidecars run: `CHAOS_BIN` when set (e.g. an older build to
/// compare against), else this package's.
pub fn bin() -> PathBuf {
    std::env::var_os("CHAOS_BIN")
        .filter(|b| !b.is_empty())
        .map_or_else(|| PathBuf::from(BIN), PathBuf::from)
}

pub struct Proc {
    pub index: usize,
    dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    pub env: Vec<(String, String)>,
    /// A clock offset for the next runs (libfaketime's `FAKETIME`, e.g. `+3s`).
    pub clock_offset: Option<String>,
    pub runs: usize,
}

impl Proc {
    /// Writes `config` to `dir/sN.toml`; does not start.
    pub fn new(index: usize, dir: &Path, config: &str, env: Vec<(String, String)>) -> Self {
        let config_path = dir.join(format!("s{index}.toml"));
        std::fs::write(&config_path, config).unwrap();
        Self {
            index,
            dir: dir.to_owned(),
            config: config_path,
            child: None,
            env,
            clock_offset: None,
            runs: 0,
        }
    }

    pub fn sock(&self) -> PathBuf {
        self.dir.join(format!("s{}.sock", self.index))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("s{}.log", self.index))
    }

    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the process and waits (up to 30 s) for its socket.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "sidecar {} already runs", self.index);
        let sock = self.sock();
        let _ = std::fs::remove_file(&sock);
        self.runs += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        writeln!(
            log,
            "===== chaos: run {} of sidecar {}{}",
            self.runs,
            self.index,
            self.clock_offset
                .as_deref()
                .map(|o| format!(" with FAKETIME={o}"))
                .unwrap_or_default()
        )
        .unwrap();
        let mut cmd = Command::new(bin());
        if let (Some(offset), Some(lib)) = (&self.clock_offset, libfaketime()) {
            cmd.env("LD_PRELOAD", lib).env("FAKETIME", offset);
        }
        let args = ["--config".into(), self.config.as_os_str().to_owned()];
        let child =
            crate::support::binary::serve_command(&mut cmd, &args, &sock, &self.env, "info", log)
                .spawn()
                .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "sidecar {} exited at start ({status}); log {}",
                    self.index,
                    self.log_path().display()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sidecar {} did not start within 30 s; log {}",
                self.index,
                self.log_path().display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit (SIGKILL after 20 s); the exit status,
    /// or `None` when it had to be killed.
    pub async fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        if !crate::support::signal(c.id(), "TERM") {
            let _ = c.kill();
            let _ = c.wait();
            panic!("could not send SIGTERM to sidecar {}", self.index);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

/// A client on `sock` (connects lazily; fails fast while the socket is gone).
pub async fn client(sock: &Path) -> Result<TokenBrokerClient<Channel>, String> {
    token_broker::client::connect(&ListenAddr::Unix(sock.to_owned()))
        .await
        .map_err(|e| e.to_string())
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}
