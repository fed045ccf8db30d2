//! The `token-broker` binary: parses the command line, loads and validates the
//! config (exit 64 naming the field, before anything binds), sets up logging and
//! hands over to the library. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use token_broker::config::Config;
use token_broker::listen::{ListenAddr, Listener};
use token_broker::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

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
    Serve {
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
        #[arg(
            long,
            value_enum,
            default_value = "text",
            env = "TOKEN_BROKER_LOG_FORMAT"
        )]
        log_format: LogFormat,
    },
    /// Validate a config file and exit (64 when invalid).
    CheckConfig { file: PathBuf },
    /// Apply the database migrations of the config's [store] and exit.
    Migrate {
        /// The TOML config file (its [store] section names the database).
        #[arg(long)]
        config: PathBuf,
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
struct Conn {
    /// The broker's address: IP:PORT or unix:/path/to.sock.
    #[arg(long, default_value = "127.0.0.1:50051", env = "TOKEN_BROKER_ADDR")]
    addr: String,
    /// Deadline for the call.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
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
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(&e.field, &e.reason),
            };
            let Some(settings) = config.store else {
                return config_error(
                    "store",
                    "no [store] section: the in-memory store has nothing to migrate",
                );
            };
            telemetry::init(LogFormat::Text, false);
            run_async(async move {
                let applied = token_broker::store::PgStore::migrate(&settings).await?;
                if applied.is_empty() {
                    println!("database schema is up to date");
                } else {
                    println!("applied migrations: {applied:?}");
                }
                Ok(())
            })
        }
        Command::Serve {
            config,
            dev,
            dev_token_ttl,
            listen,
            admin_listen,
            no_admin,
            log_format,
        } => {
            let loaded = match (config, dev) {
                (Some(path), _) => Config::load(&path),
                (None, _) => Config::dev(dev_token_ttl),
            };
            let mut config = match loaded {
                Ok(c) => c,
                Err(e) => return config_error(&e.field, &e.reason),
            };
            if let Some(listen) = listen {
                match listen.parse::<ListenAddr>() {
                    Ok(a) => config.server.listen = a,
                    Err(e) => return config_error("--listen", e),
                }
            }
            if no_admin {
                config.admin = None;
            } else if let Some(a) = admin_listen {
                match token_broker::config::parse_admin_listen("--admin-listen", &a) {
                    Ok(listen) => config.admin = Some(token_broker::config::AdminConfig { listen }),
                    Err(e) => return config_error(&e.field, &e.reason),
                }
            }
            run_async(async move {
                // Inside the runtime: the trace exporter's channel lives on it.
                let telemetry = telemetry::init(log_format, true);
                let result = serve(config).await;
                tokio::task::spawn_blocking(move || telemetry.shutdown())
                    .await
                    .ok();
                result
            })
        }
        Command::Get {
            collection,
            conn,
            min_remaining,
            value,
        } => client_cmd(&conn, |addr| async move {
            token_broker::client::get(&addr, collection, min_remaining, conn.timeout, value).await
        }),
        Command::Watch {
            collection,
            conn,
            after_version,
            count,
            value,
        } => client_cmd(&conn, |addr| async move {
            token_broker::client::watch(&addr, collection, after_version, count, value).await
        }),
        Command::Invalidate {
            collection,
            conn,
            version,
            reason,
        } => client_cmd(&conn, |addr| async move {
            token_broker::client::invalidate(&addr, collection, version, reason, conn.timeout).await
        }),
    }
}

fn client_cmd<F, Fut>(conn: &Conn, f: F) -> ExitCode
where
    F: FnOnce(ListenAddr) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let addr = match conn.addr.parse::<ListenAddr>() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: --addr: {e}");
            return ExitCode::from(2);
        }
    };
    run_async(async move { f(addr).await })
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    // The store first: a database that refuses us fails before any port is bound.
    let store = token_broker::open_store(&config, &shutdown).await?;
    let listener = Listener::bind(&config.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
    let admin =
        match &config.admin {
            None => None,
            Some(a) => Some(tokio::net::TcpListener::bind(a.listen).await.map_err(|e| {
                anyhow::anyhow!("admin.listen: cannot listen on {}: {e}", a.listen)
            })?),
        };
    tokio::spawn(signals(shutdown.clone()));
    token_broker::run_on(config, store, listener, admin, shutdown).await
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT; a second one exits at
/// once without waiting for the grace period (a Unix socket file left behind
/// is replaced as stale at the next start).
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    async fn next(term: &mut Signal, int: &mut Signal) -> &'static str {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
    let name = next(&mut term, &mut int).await;
    tracing::info!(signal = name, "shutting down");
    shutdown.cancel();
    let name = next(&mut term, &mut int).await;
    tracing::warn!(signal = name, "second signal; exiting without draining");
    std::process::exit(130);
}
