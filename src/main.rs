//! The `token-broker` binary: parses the command line, loads and validates the
//! config (exit 64 naming the field, before anything binds), builds the tokio
//! runtime it asks for, sets up logging and hands over to the library's
//! assembly point (`token_broker::app::serve`, which also handles signals).
//! Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use token_broker::client::Target;
use token_broker::config::{self, Config};
use token_broker::grpc::remote::ClientTls;
use token_broker::listen::{ListenAddr, Origin};
use token_broker::telemetry::{self, LogFormat};

/// `EX_CONFIG` from sysexits.h: the configuration is invalid.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "token-broker",
    version,
    about = "A gRPC sidecar that hands upstream credentials to the application in its pod"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Serve(ServeArgs),
    /// Validate a config file and exit (64 when invalid).
    CheckConfig { file: PathBuf },
    /// Apply the database migrations of the config's [store] and exit (reads
    /// only [store]: collections' secrets are not needed).
    Migrate {
        /// The TOML config file (its [store] section names the database).
        #[arg(long)]
        config: PathBuf,
    },
    /// Wait until the broker at ADDR is ready (gRPC health SERVING), for
    /// entrypoints, init containers and postStart hooks; exit 1 on timeout.
    Wait {
        /// The broker's address: IP:PORT or unix:/path/to.sock.
        #[arg(long, default_value = "127.0.0.1:50051", env = "TOKEN_BROKER_ADDR")]
        addr: String,
        #[command(flatten)]
        tls: TlsArgs,
        /// Give up after this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Time between two health checks.
        #[arg(long, default_value = "200ms", value_parser = positive_duration)]
        interval: Duration,
    },
    /// Print a collection's token (the value only with --value).
    Get {
        collection: String,
        #[command(flatten)]
        conn: Conn,
        /// Refresh first if the token would expire sooner than this.
        #[arg(long, value_parser = humantime::parse_duration)]
        min_remaining: Option<Duration>,
        /// Print only the token value (for scripts).
        #[arg(long)]
        value: bool,
    },
    /// Print every rotation of a collection's token as it happens.
    Watch {
        collection: String,
        #[command(flatten)]
        conn: Conn,
        /// Start after this version (0: send the current token first).
        #[arg(long, default_value_t = 0)]
        after_version: u64,
        /// Exit after this many tokens.
        #[arg(long)]
        count: Option<u64>,
        /// Also print token values.
        #[arg(long)]
        value: bool,
    },
    /// Report that the upstream rejected a token version.
    Invalidate {
        collection: String,
        #[command(flatten)]
        conn: Conn,
        /// The rejected token's version.
        #[arg(long)]
        version: u64,
        #[arg(long, default_value = "reported from the command line")]
        reason: String,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The TOML config file.
    #[arg(long, required_unless_present = "dev", conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Zero-config demo: one collection `demo` with random tokens, no database.
    #[arg(long)]
    dev: bool,
    /// Lifetime of the demo tokens with --dev.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, requires = "dev")]
    dev_token_ttl: Duration,
    /// Where to listen: IP:PORT or unix:/path/to.sock (overrides server.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Where the admin listener (metrics, livez, readyz, gRPC health)
    /// listens: IP:PORT (overrides admin.listen; port 0 picks one).
    #[arg(long, conflicts_with = "no_admin")]
    admin_listen: Option<String>,
    /// No admin listener (overrides admin.enabled).
    #[arg(long)]
    no_admin: bool,
    /// Tokio worker threads, 1 to 64 (overrides server.worker_threads).
    #[arg(long, env = "TOKEN_BROKER_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// After SIGTERM/SIGINT, keep serving this long before shutting down,
    /// at most 5m (overrides server.shutdown_delay).
    #[arg(long, value_parser = humantime::parse_duration)]
    shutdown_delay: Option<Duration>,
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "TOKEN_BROKER_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

/// A duration above zero (`wait --interval`).
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(clap::Args)]
struct Conn {
    /// The broker's address: IP:PORT or unix:/path/to.sock.
    #[arg(long, default_value = "127.0.0.1:50051", env = "TOKEN_BROKER_ADDR")]
    addr: String,
    /// Deadline for the call.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    tls: TlsArgs,
}

/// TLS to a broker that serves `[server.tls]` (an IP:PORT address).
#[derive(clap::Args)]
struct TlsArgs {
    /// Connect with TLS, trusting this CA bundle (PEM).
    #[arg(long, env = "TOKEN_BROKER_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// This client's certificate (PEM), for a broker that verifies callers.
    #[arg(
        long,
        env = "TOKEN_BROKER_CERT_FILE",
        requires = "key_file",
        requires = "ca_file"
    )]
    cert_file: Option<PathBuf>,
    /// The private key of --cert-file (PEM).
    #[arg(long, env = "TOKEN_BROKER_KEY_FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// The name to verify in the broker's certificate (default: the address's IP).
    #[arg(long, requires = "ca_file")]
    server_name: Option<String>,
}

impl TlsArgs {
    /// `--addr` with these TLS settings: a target, or a usage error (exit 2).
    fn target(self, addr: &str) -> Result<Target, ExitCode> {
        let addr = addr.parse::<ListenAddr>().map_err(|e| {
            eprintln!("error: --addr: {e}");
            ExitCode::from(2)
        })?;
        let tls = self.ca_file.map(|ca| ClientTls {
            ca_file: Some(ca),
            cert_file: self.cert_file,
            key_file: self.key_file,
            server_name: self.server_name,
        });
        if tls.is_some() && matches!(addr, ListenAddr::Unix(_)) {
            eprintln!("error: --ca-file: TLS needs an IP:PORT address, not a Unix socket");
            return Err(ExitCode::from(2));
        }
        Ok(Target { addr, tls })
    }
}

fn config_error(field: &str, reason: impl std::fmt::Display) -> ExitCode {
    eprintln!("config error: {field}: {reason}");
    ExitCode::from(EXIT_CONFIG)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                let names: Vec<_> = c.collections.iter().map(|c| c.name.as_str()).collect();
                println!(
                    "config ok: {} collection(s): {}",
                    names.len(),
                    names.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e.field, &e.reason),
        },
        Command::Migrate { config } => {
            // Only [store]: a migration Job has no upstream secrets to give.
            let settings = match config::load_store(&config) {
                Ok(Some(s)) => s,
                Ok(None) => {
                    return config_error(
                        "store",
                        "no [store] section: the in-memory store has nothing to migrate",
                    );
                }
                Err(e) => return config_error(&e.field, &e.reason),
            };
            telemetry::init(LogFormat::Text, false);
            run_current_thread(async move {
                let applied = token_broker::store::PgStore::migrate(&settings).await?;
                if applied.is_empty() {
                    println!("database schema is up to date");
                } else {
                    println!("applied migrations: {applied:?}");
                }
                Ok(())
            })
        }
        Command::Serve(args) => serve_cmd(args),
        Command::Wait {
            addr,
            tls,
            timeout,
            interval,
        } => match tls.target(&addr) {
            Ok(target) => run_current_thread(async move {
                token_broker::client::wait(&target, timeout, interval).await
            }),
            Err(code) => code,
        },
        Command::Get {
            collection,
            conn,
            min_remaining,
            value,
        } => client_cmd(conn, |target, timeout| async move {
            token_broker::client::get(&target, collection, min_remaining, timeout, value).await
        }),
        Command::Watch {
            collection,
            conn,
            after_version,
            count,
            value,
        } => client_cmd(conn, |target, _| async move {
            token_broker::client::watch(&target, collection, after_version, count, value).await
        }),
        Command::Invalidate {
            collection,
            conn,
            version,
            reason,
        } => client_cmd(conn, |target, timeout| async move {
            token_broker::client::invalidate(&target, collection, version, reason, timeout).await
        }),
    }
}

fn client_cmd<F, Fut>(conn: Conn, f: F) -> ExitCode
where
    F: FnOnce(Target, Duration) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let timeout = conn.timeout;
    match conn.tls.target(&conn.addr) {
        Ok(target) => run_current_thread(async move { f(target, timeout).await }),
        Err(code) => code,
    }
}

/// The validated config of `serve`, with the command line's overrides
/// applied, and where each listen address came from (for bind errors).
struct Serving {
    config: Config,
    listen: Origin,
    admin: Origin,
}

/// Loads the config and applies the flags; every problem names the field or
/// the flag (exit 64), before a runtime exists or anything binds.
fn configure(args: ServeArgs) -> Result<Serving, config::ConfigError> {
    let mut config = match args.config {
        Some(path) => Config::load(&path)?,
        None => Config::dev(args.dev_token_ttl)?,
    };
    let flag_error = |flag: &str, reason: String| config::ConfigError {
        field: flag.to_owned(),
        reason,
    };
    let listen = Origin::token_api(args.listen.is_some());
    if let Some(listen) = args.listen {
        config.server.listen = listen
            .parse::<ListenAddr>()
            .map_err(|e| flag_error("--listen", e))?;
        config::check_listen("--listen", &config.server)?;
    }
    let admin = Origin::admin(args.admin_listen.is_some());
    if args.no_admin {
        config.admin = None;
    } else if let Some(a) = args.admin_listen {
        let listen = config::parse_admin_listen("--admin-listen", &a)?;
        config.admin = Some(config::AdminConfig { listen });
    }
    if let Some(n) = args.worker_threads {
        config::check_worker_threads("--worker-threads", n)?;
        config.server.worker_threads = n;
    }
    if let Some(d) = args.shutdown_delay {
        config::check_shutdown_delay("--shutdown-delay", d)?;
        config.server.shutdown_delay = d;
    }
    Ok(Serving {
        config,
        listen,
        admin,
    })
}

fn serve_cmd(args: ServeArgs) -> ExitCode {
    let log_format = args.log_format;
    let serving = match configure(args) {
        Ok(s) => s,
        Err(e) => return config_error(&e.field, &e.reason),
    };
    // Sized by the config, not by the node's CPU count: a sidecar on a
    // 64-core node would otherwise start 64 workers it never needs.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(serving.config.server.worker_threads)
        .thread_name("token-broker-worker")
        .enable_all()
        .build();
    run_on(runtime, async move {
        // Inside the runtime: the trace exporter's channel lives on it.
        let telemetry = telemetry::init(log_format, true);
        let Serving {
            config,
            listen,
            admin,
        } = serving;
        let result = token_broker::app::serve(config, listen, admin).await;
        tokio::task::spawn_blocking(move || telemetry.shutdown())
            .await
            .ok();
        result
    })
}

/// The client commands and `migrate` do one thing at a time: one thread.
fn run_current_thread(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    run_on(runtime, fut)
}

fn run_on(
    runtime: std::io::Result<tokio::runtime::Runtime>,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
