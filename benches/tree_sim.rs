//! Tree-of-brokers simulation: one throwaway Postgres, M mid-tier
//! `token-broker serve` processes with `[store]` on it (each with the OAuth
//! collections fleet-sim configures), L leaf processes with no `[store]`
//! whose collections are `kind = "broker"` sources listing every mid (leaf k
//! lists mid k % M first, then the others in turn), and one fake OAuth2
//! endpoint; measured. Run it through `scripts/tree-sim` (which builds it,
//! raises `ulimit -n` and kills the process group on exit); `--help` lists
//! the options.
//!
//! Contract:
//! - Everything it starts is its own and removed at exit, also on Ctrl-C,
//!   SIGTERM or an error: the Postgres cluster (initdb in a temp dir under
//!   `/tmp`, as fleet-sim starts it), the fake upstream (`127.0.0.1:0`), the
//!   mids and the leaves (Unix sockets in the temp dir, admin on
//!   `127.0.0.1:0`). No fixed port. The temp dir is kept with `--keep` or
//!   when a violation was seen.
//! - The mids are spawned held and released together, then (once every mid
//!   answers `GetCollectionToken`) the leaves likewise; a tier's "ready" time
//!   counts from its release until every process of it answered for every
//!   collection.
//! - The commit instant of a rotation is the receipt of its `NOTIFY
//!   token_broker` by a probe connection LISTENing on Postgres (as in
//!   fleet-sim); a watcher's delay is when its `WatchToken` stream yielded
//!   the version minus that receipt. Watchers run on every leaf and on every
//!   mid (for comparison).
//! - Database connections: `pg_stat_activity` of the sidecars' database, and
//!   per class the established TCP connections to Postgres' port held by the
//!   mids' and by the leaves' processes (`/proc/<pid>/fd` against
//!   `/proc/net/tcp`).
//! - CPU per class over the window (gross: the idle rate is not
//!   subtracted, unlike fleet-sim's per-rotation figure): the mids', the
//!   leaves' and this driver's from `/proc/<pid>/task/*/schedstat`
//!   (nanoseconds: a leaf runs well under one clock tick per rotation, so
//!   whole ticks summed over the leaves are mostly truncation); Postgres'
//!   as fleet-sim counts it (utime + stime of the postmaster with its exited
//!   children and of its live children, in ticks).
//! - `--kill-mid`: readers (one `GetCollectionToken` client per leaf, 50-150
//!   ms pause, as tests/it/support/load.rs `Readers`) run through the window;
//!   halfway, mid 0 (leaf 0's primary) gets SIGKILL. Any failed read is a
//!   violation; the time from the kill until every orphaned leaf's watcher
//!   had the next rotation is reported.
//! - `--tls`: the driver makes a throwaway PKI in its temp dir (`pki/`,
//!   rcgen): a CA, one server certificate for `localhost` and 127.0.0.1
//!   that every mid presents, one client certificate per leaf (URI SAN
//!   `spiffe://tree-sim/leaf/<k>`) and one for the driver
//!   (`spiffe://tree-sim/driver`). Each mid listens on `127.0.0.1:<free
//!   port>` with `[server.tls]` requiring a client certificate from that CA,
//!   and every collection's `readers` lists the 200 leaves and the driver;
//!   the leaves follow `https://127.0.0.1:<port>` addresses with their own
//!   certificate. The driver's watchers and readiness probes on the mids
//!   connect over TLS as itself; on the leaves they keep the Unix sockets.
//!   Keys are written to files (mode 0600) only, never printed.
//! - Token values are never printed or written: only 64-bit hashes are kept.
//! - Output: a markdown row (with its header) and a summary on stdout,
//!   progress on stderr, every number in `--json FILE`. Exit status 0 when
//!   the run completed without violations, 1 otherwise (2 on bad usage).
//!
//! The temp dir, Postgres, upstream, process tier, readiness, watcher, probe,
//! `/proc`, statistics and `main` code is shared with benches/fleet_sim.rs in
//! benches/sim/common.rs.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use serde_json::json;
use tokio::task::JoinSet;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use token_broker::grpc::pb::GetCollectionTokenRequest;
use token_broker::grpc::pb::token_broker_client::TokenBrokerClient;

#[path = "sim/common.rs"]
mod common;
use common::{
    Dial, FLEET_DB, Notice, Proc, SETTLE, Seen, Tier, Upstream, Watcher, WorkDir, await_ready,
    connect, db_connections, diff_ms, dist, free_port, hash_value, is_root, lock, proc_times,
    rss_kib, say, start_postgres, start_probe, start_upstream, tick_ms, watch,
};

/// This driver's name, for the shared code (progress lines, the temp dir).
const SIM_NAME: &str = "tree-sim";
/// The prefix of the environment variables the shared code reads
/// (`TREE_SIM_PG_OPTS`, `TREE_SIM_STATE`).
const SIM_ENV: &str = "TREE_SIM";

#[derive(Parser, Debug)]
#[command(
    name = "tree-sim",
    bin_name = "scripts/tree-sim",
    about = "A tree of real token-broker processes: mids on a throwaway Postgres and a fake OAuth2 endpoint, \
             leaves following the mids (kind = \"broker\", no database), measured"
)]
struct Args {
    /// Mid-tier brokers (with `[store]` on the throwaway Postgres).
    #[arg(long, default_value_t = 5)]
    mids: usize,
    /// Leaf sidecars (no `[store]`; every collection follows all the mids).
    #[arg(long, default_value_t = 200)]
    leaves: usize,
    /// Collections per broker (each its own oauth2_client_credentials endpoint path at the mids).
    #[arg(long, default_value_t = 1)]
    collections: usize,
    /// Measured window after every leaf is ready and watched [default: 3.5 rotations].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Token lifetime the fake endpoint grants (`expires_in`, whole seconds).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    rotation: Duration,
    /// Readers on every leaf through the window, and SIGKILL of mid 0 (leaf 0's primary) halfway.
    #[arg(long)]
    kill_mid: bool,
    /// Readers on every leaf through the window (implied by --kill-mid).
    #[arg(long)]
    readers: bool,
    /// Mids serve TLS on 127.0.0.1 TCP ports and require client certificates (a throwaway PKI:
    /// one certificate per leaf); the leaves follow them over https:// instead of Unix sockets.
    #[arg(long)]
    tls: bool,
    /// The leaves' `connect_timeout` (per mid address: connecting and opening the watch).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    leaf_connect_timeout: Duration,
    /// The token-broker binary to run.
    #[arg(
        long,
        env = "TREE_SIM_BIN",
        default_value = "target/release/token-broker"
    )]
    bin: PathBuf,
    /// Write every number to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the temp dir (logs, Postgres log) even without a violation.
    #[arg(long)]
    keep: bool,
    /// Give up when a tier is not ready this long after its release.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// Ignored (`cargo bench` passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

// ---------------------------------------------------------------------------
// Configs and readiness

/// A mid's config; with `tls`, its TLS listener on `port` and every
/// collection readable by the PKI's identities only.
fn mid_config(collections: &[String], upstream: SocketAddr, tls: Option<(&Pki, u16)>) -> String {
    let mut c = String::new();
    if let Some((pki, port)) = tls {
        c.push_str(&format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [server.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\nclient_cert = \"required\"\n\n",
            pki.mid_cert, pki.mid_key, pki.ca,
        ));
    }
    c.push_str(
        "[store]\n\
         database_url_env = \"TREE_SIM_DATABASE_URL\"\n\
         encryption_key_env = \"TREE_SIM_ENCRYPTION_KEY\"\n\
         pool_size = 1\n",
    );
    let readers = tls.map(|(pki, _)| {
        let ids: Vec<String> = pki.readers.iter().map(|r| format!("{r:?}")).collect();
        format!("readers = [{}]\n", ids.join(", "))
    });
    for name in collections {
        c.push_str(&format!(
            "\n[collections.{name}]\nprefetch = true\nrequired = true\n{}\
             source = {{ kind = \"oauth2_client_credentials\", token_url = \"http://{upstream}/c/{name}/token\", \
             client_id = \"tree-sim\", client_secret_env = \"TREE_SIM_CLIENT_SECRET\" }}\n",
            readers.as_deref().unwrap_or_default()
        ));
    }
    c
}

/// How the leaves reach the mids.
enum MidAddrs {
    Unix(Vec<PathBuf>),
    /// The mids' TLS ports, with the PKI.
    Tls(Vec<u16>, Arc<Pki>),
}

impl MidAddrs {
    fn len(&self) -> usize {
        match self {
            Self::Unix(s) => s.len(),
            Self::Tls(p, _) => p.len(),
        }
    }

    /// Where the driver reaches mid `j` (`sock`: its Unix socket).
    fn target(&self, j: usize, sock: PathBuf) -> anyhow::Result<To> {
        Ok(match self {
            Self::Unix(_) => To::Unix(sock),
            Self::Tls(ports, pki) => To::Tls {
                uri: format!("https://127.0.0.1:{}", ports[j]),
                config: pki.driver_tls()?,
            },
        })
    }
}

/// Where the driver reaches a broker: a Unix socket, or a mid over TLS as
/// the driver's identity.
#[derive(Clone)]
enum To {
    Unix(PathBuf),
    Tls {
        uri: String,
        config: ClientTlsConfig,
    },
}

impl Dial for To {
    fn open(&self) -> impl Future<Output = anyhow::Result<TokenBrokerClient<Channel>>> + Send {
        let this = self.clone();
        async move {
            match this {
                To::Unix(sock) => sock.open().await,
                To::Tls { uri, config } => Ok(TokenBrokerClient::new(
                    Endpoint::from_shared(uri)?
                        .tls_config(config)?
                        .connect()
                        .await?,
                )),
            }
        }
    }
}

/// Leaf `k`'s config: every collection follows all the mids, mid `k % M`
/// first (over TLS: as `spiffe://tree-sim/leaf/<k>`).
fn leaf_config(
    collections: &[String],
    mids: &MidAddrs,
    k: usize,
    connect_timeout: Duration,
) -> String {
    let m = mids.len();
    let first = k % m;
    let addrs: Vec<String> = (0..m)
        .map(|j| match mids {
            MidAddrs::Unix(socks) => format!("\"unix:{}\"", socks[(first + j) % m].display()),
            MidAddrs::Tls(ports, _) => format!("\"https://127.0.0.1:{}\"", ports[(first + j) % m]),
        })
        .collect();
    let tls = match mids {
        MidAddrs::Unix(_) => String::new(),
        MidAddrs::Tls(_, pki) => {
            let (cert, key) = pki.leaf(k);
            format!(
                "ca_file = {:?}, cert_file = {:?}, key_file = {:?}, server_name = \"localhost\", ",
                pki.ca, cert, key
            )
        }
    };
    let mut c = String::new();
    for name in collections {
        c.push_str(&format!(
            "[collections.{name}]\nprefetch = true\nrequired = true\n\
             source = {{ kind = \"broker\", addrs = [{}], {tls}connect_timeout = \"{}ms\" }}\n\
             policy = {{ backoff_initial = \"100ms\", backoff_max = \"1s\" }}\n\n",
            addrs.join(", "),
            connect_timeout.as_millis()
        ));
    }
    c
}

// ---------------------------------------------------------------------------
// The throwaway PKI (--tls)

/// Paths of the PKI's files in `<work>/pki` (keys mode 0600, never printed).
struct Pki {
    ca: PathBuf,
    mid_cert: PathBuf,
    mid_key: PathBuf,
    driver_cert: PathBuf,
    driver_key: PathBuf,
    dir: PathBuf,
    /// The identities the mids' collections list: every leaf's, then the driver's.
    readers: Vec<String>,
}

impl Pki {
    /// A CA; a server certificate for `localhost` and 127.0.0.1; a client
    /// certificate for the driver and one per leaf.
    fn create(work: &Path, leaves: usize) -> anyhow::Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose, SanType,
        };
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = work.join("pki");
        std::fs::create_dir(&dir)?;
        let write = |name: &str, pem: &str, mode: u32| -> anyhow::Result<PathBuf> {
            use std::io::Write as _;
            let p = dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&p)
                .and_then(|mut f| f.write_all(pem.as_bytes()))
                .with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "tree-sim CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca = write("ca.crt", &issuer.pem(), 0o644)?;
        let sign = |params: CertificateParams, name: &str| -> anyhow::Result<(PathBuf, PathBuf)> {
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            Ok((
                write(&format!("{name}.crt"), &cert.pem(), 0o644)?,
                write(&format!("{name}.key"), &key.serialize_pem(), 0o600)?,
            ))
        };
        let mut server =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (mid_cert, mid_key) = sign(server, "mid")?;
        let client = |uri: &str, name: &str| -> anyhow::Result<(PathBuf, PathBuf)> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            sign(params, name)
        };
        let mut readers = Vec::with_capacity(leaves + 1);
        for k in 0..leaves {
            let id = format!("spiffe://tree-sim/leaf/{k}");
            client(&id, &format!("leaf-{k}"))?;
            readers.push(id);
        }
        let driver_id = "spiffe://tree-sim/driver";
        let (driver_cert, driver_key) = client(driver_id, "driver")?;
        readers.push(driver_id.to_owned());
        Ok(Self {
            ca,
            mid_cert,
            mid_key,
            driver_cert,
            driver_key,
            dir,
            readers,
        })
    }

    /// The driver's client TLS: trusting the CA, presenting its own
    /// certificate, verifying the mids' as `localhost`.
    fn driver_tls(&self) -> anyhow::Result<ClientTlsConfig> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(
                read(&self.driver_cert)?,
                read(&self.driver_key)?,
            ))
            .domain_name("localhost"))
    }

    /// Leaf `k`'s certificate and key.
    fn leaf(&self, k: usize) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("leaf-{k}.crt")),
            self.dir.join(format!("leaf-{k}.key")),
        )
    }
}

/// `n` distinct free ports on 127.0.0.1, found as Postgres' is.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let p = free_port()?;
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    Ok(ports)
}

/// Waits until every process of `tier` answers for every collection; fails
/// early when one exits. Returns the clients, each one's ready delay (ms,
/// from `t0`) and the tokens seen.
async fn await_tier(
    tier: &mut Tier,
    targets: Vec<To>,
    collections: &Arc<Vec<String>>,
    t0: Instant,
    timeout: Duration,
    keep_flag: &AtomicBool,
    workp: &Path,
) -> anyhow::Result<(
    Vec<TokenBrokerClient<Channel>>,
    Vec<f64>,
    Vec<(String, u64, u64)>,
)> {
    let n = tier.procs.len();
    let until = t0 + timeout;
    let mut set = JoinSet::new();
    for (i, target) in targets.into_iter().enumerate() {
        let cols = collections.clone();
        set.spawn(async move { (i, await_ready(target, cols, until).await) });
    }
    let mut clients: Vec<Option<TokenBrokerClient<Channel>>> = vec![None; n];
    let mut ready_at = Vec::with_capacity(n);
    let mut tokens = Vec::new();
    let mut not_ready = Vec::new();
    let mut check = tokio::time::interval(Duration::from_millis(250));
    loop {
        let r = tokio::select! {
            r = set.join_next() => match r {
                Some(r) => r,
                None => break,
            },
            _ = check.tick() => {
                if let Some((i, status, log)) = tier.exited(&HashSet::new()) {
                    keep_flag.store(true, Ordering::Relaxed);
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    bail!(
                        "{} {i} exited ({status}) before its tier was ready; the end of its log:\n{}\n(all logs kept in {})",
                        tier.name,
                        tail.join("\n"),
                        workp.display()
                    );
                }
                continue;
            }
        };
        match r {
            Ok((i, Ok((client, ready)))) => {
                clients[i] = Some(client);
                ready_at.push(diff_ms(ready.at, t0));
                tokens.extend(ready.tokens);
            }
            Ok((i, Err(e))) => not_ready.push(format!("{} {i}: {e:#}", tier.name)),
            Err(e) => not_ready.push(format!("readiness task: {e}")),
        }
    }
    if !not_ready.is_empty() {
        keep_flag.store(true, Ordering::Relaxed);
        for e in not_ready.iter().take(5) {
            say(format!("not ready: {e}"));
        }
        bail!(
            "{} of {n} {} not ready within {timeout:?}; logs kept in {}",
            not_ready.len(),
            tier.name,
            workp.display()
        );
    }
    Ok((clients.into_iter().flatten().collect(), ready_at, tokens))
}

async fn open_watchers(
    clients: &[TokenBrokerClient<Channel>],
    collections: &[String],
) -> anyhow::Result<Vec<Watcher>> {
    let mut set = JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        for col in collections {
            set.spawn(watch(c.clone(), i, col.clone()));
        }
    }
    let mut watchers = Vec::new();
    while let Some(r) = set.join_next().await {
        watchers.push(r.map_err(|e| anyhow!("watch task: {e}"))??);
    }
    watchers.sort_by(|a, b| (a.sidecar, &a.collection).cmp(&(b.sidecar, &b.collection)));
    Ok(watchers)
}

// ---------------------------------------------------------------------------
// Readers

/// One answer a reader had.
#[derive(Clone, Copy)]
struct Read {
    version: u64,
    hash: u64,
}

/// Each reader's answers for one collection, in order, by leaf.
type ReaderReads = Vec<(usize, Vec<Read>)>;

struct Readers {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
    /// Failures while the reader's last token had not expired yet.
    failures_servable: Arc<AtomicUsize>,
    first_errors: Arc<Mutex<Vec<String>>>,
    /// Every reader's answers, in order.
    reads: Arc<Mutex<ReaderReads>>,
    tasks: JoinSet<()>,
}

impl Readers {
    /// One client per leaf (a connection of its own), each reading every collection in turn with a
    /// 50-150 ms pause (a 5 s deadline per call).
    fn start(socks: Vec<PathBuf>, collections: &Arc<Vec<String>>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicUsize::new(0));
        let failures_servable = Arc::new(AtomicUsize::new(0));
        let first_errors = Arc::new(Mutex::new(Vec::new()));
        let reads = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = JoinSet::new();
        for (i, sock) in socks.into_iter().enumerate() {
            let (stop, failures, failures_servable, first_errors, reads, cols) = (
                stop.clone(),
                failures.clone(),
                failures_servable.clone(),
                first_errors.clone(),
                reads.clone(),
                collections.clone(),
            );
            tasks.spawn(async move {
                let mut client = match connect(sock, Instant::now() + Duration::from_secs(10)).await
                {
                    Ok(c) => c,
                    Err(e) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        lock(&first_errors)
                            .push(format!("leaf {i}: reader could not connect: {e:#}"));
                        return;
                    }
                };
                let mut mine = Vec::new();
                let mut expires: HashMap<String, SystemTime> = HashMap::new();
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let col = &cols[k % cols.len()];
                    k += 1;
                    let mut req = tonic::Request::new(GetCollectionTokenRequest {
                        collection: col.clone(),
                        min_remaining: None,
                    });
                    req.set_timeout(Duration::from_secs(5));
                    match client.get_collection_token(req).await {
                        Ok(r) => match r.into_inner().token {
                            Some(t) => {
                                if let Some(e) = t.expires_at.as_ref() {
                                    let at = SystemTime::UNIX_EPOCH
                                        + Duration::new(
                                            e.seconds.max(0) as u64,
                                            e.nanos.max(0) as u32,
                                        );
                                    expires.insert(col.clone(), at);
                                }
                                mine.push((
                                    col.clone(),
                                    Read {
                                        version: t.version,
                                        hash: hash_value(&t.value),
                                    },
                                ));
                            }
                            None => {
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                        Err(e) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            if expires.get(col).is_some_and(|x| *x > SystemTime::now()) {
                                failures_servable.fetch_add(1, Ordering::Relaxed);
                            }
                            let mut fe = lock(&first_errors);
                            if fe.len() < 5 {
                                fe.push(format!("leaf {i} {col}: {} {}", e.code(), e.message()));
                            }
                        }
                    }
                    let pause = 50 + rand::random::<u64>() % 100;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                let mut by_col: HashMap<String, Vec<Read>> = HashMap::new();
                for (c, r) in mine {
                    by_col.entry(c).or_default().push(r);
                }
                let mut out = lock(&reads);
                for (_, rs) in by_col {
                    out.push((i, rs));
                }
            });
        }
        Readers {
            stop,
            failures,
            failures_servable,
            first_errors,
            reads,
            tasks,
        }
    }

    async fn finish(mut self) -> (usize, usize, Vec<String>, ReaderReads) {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        (
            self.failures.load(Ordering::Relaxed),
            self.failures_servable.load(Ordering::Relaxed),
            lock(&self.first_errors).clone(),
            std::mem::take(&mut *lock(&self.reads)),
        )
    }
}

// ---------------------------------------------------------------------------
// Connections and CPU per class

/// An instant as the brokers' log lines begin (UTC, microseconds), so that
/// the two compare as strings.
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// The timestamps of a leaf's "remote broker failed ... failing over" WARN lines.
fn failover_lines(log: &str) -> impl Iterator<Item = &str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") && l.contains("remote broker failed"))
        .filter_map(|l| l.split_whitespace().next())
}

/// Inodes of the established TCP connections to `port` on 127.0.0.1
/// (Postgres', or a TLS mid's).
fn tcp_inodes_to(port: u16) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(text) = std::fs::read_to_string("/proc/net/tcp") else {
        return out;
    };
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "01" {
            continue;
        }
        let rport = f[2]
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        if rport == Some(port)
            && let Ok(inode) = f[9].parse()
        {
            out.insert(inode);
        }
    }
    out
}

/// How many of `inodes` the processes `pids` hold.
fn held_by(pids: &[u32], inodes: &HashSet<u64>) -> usize {
    let mut n = 0;
    for pid in pids {
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(e.path())
                && let Some(s) = target.to_str()
                && let Some(inode) = s.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']'))
                && inode.parse::<u64>().is_ok_and(|i| inodes.contains(&i))
            {
                n += 1;
            }
        }
    }
    n
}

/// CPU time (ms) used so far by each class: the brokers' and this
/// process's from schedstat, Postgres' from utime + stime in ticks (with its
/// exited backends' times, as fleet-sim counts it).
#[derive(Clone, Copy, serde::Serialize)]
struct Cpu {
    mids: f64,
    leaves: f64,
    postgres: f64,
    driver: f64,
    unreadable: usize,
}

/// Time (ms) a live process's threads have run, from each thread's
/// `/proc/<pid>/task/<tid>/schedstat` (nanoseconds, not whole ticks: a leaf
/// runs well under one 10 ms tick per rotation, so tick counts summed over
/// 200 leaves are mostly truncation).
fn run_ms(pid: &str) -> Option<f64> {
    let mut ns = 0u64;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let s = std::fs::read_to_string(e.path().join("schedstat")).ok()?;
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e6)
}

fn cpu_now(mids: &[u32], leaves: &[u32], postmaster: Option<u32>, tick: f64) -> Cpu {
    let mut unreadable = 0;
    let mut read = |pid: &str| match run_ms(pid) {
        Some(t) => t,
        None => {
            unreadable += 1;
            0.0
        }
    };
    let m: f64 = mids.iter().map(|p| read(&p.to_string())).sum();
    let l: f64 = leaves.iter().map(|p| read(&p.to_string())).sum();
    let d = read("self");
    let mut pg = 0;
    if let Some(pm) = postmaster
        && let Some((_, own, children)) = proc_times(&pm.to_string())
    {
        pg = own + children;
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            if let Some((ppid, t, _)) = e.file_name().to_str().and_then(proc_times)
                && ppid == pm
            {
                pg += t;
            }
        }
    } else {
        unreadable += 1;
    }
    Cpu {
        mids: m,
        leaves: l,
        postgres: pg as f64 * tick,
        driver: d,
        unreadable,
    }
}

// ---------------------------------------------------------------------------
// Propagation

/// Per-watcher checks and commit -> watcher delays over `rotations`.
#[derive(Default, serde::Serialize)]
struct Propagation {
    #[serde(skip)]
    delays: Vec<f64>,
    #[serde(skip)]
    last_per_rotation: Vec<f64>,
    /// (rotation, watcher) pairs never delivered.
    missed: usize,
    out_of_order: usize,
    /// Watchers whose last version is not the latest committed.
    not_latest: usize,
    streams_ended: usize,
}

/// `exempt(watcher, notice)`: a pair that is not expected (a killed mid's
/// own watcher after the kill).
fn propagation(
    watchers: &[Watcher],
    rotations: &[Notice],
    latest: &HashMap<String, u64>,
    exempt: impl Fn(&Watcher, &Notice) -> bool,
    ended_ok: impl Fn(&Watcher) -> bool,
    by_version: &mut HashMap<(String, u64), HashSet<u64>>,
) -> Propagation {
    let mut p = Propagation::default();
    let seen: Vec<Vec<Seen>> = watchers.iter().map(|w| lock(&w.seen).clone()).collect();
    for (w, s) in watchers.iter().zip(&seen) {
        if w.ended.load(Ordering::Relaxed) && !ended_ok(w) {
            p.streams_ended += 1;
        }
        for pair in s.windows(2) {
            if pair[1].version <= pair[0].version {
                p.out_of_order += 1;
            }
        }
        for x in s {
            by_version
                .entry((w.collection.clone(), x.version))
                .or_default()
                .insert(x.hash);
        }
        if !ended_ok(w)
            && let Some(v) = latest.get(&w.collection)
            && s.last().is_none_or(|x| x.version < *v)
        {
            p.not_latest += 1;
        }
    }
    for r in rotations {
        let mut last = f64::MIN;
        for (w, s) in watchers.iter().zip(&seen) {
            if w.collection != r.collection || exempt(w, r) {
                continue;
            }
            match s.iter().find(|x| x.version == r.version) {
                Some(x) => {
                    let d = diff_ms(x.at, r.at);
                    last = last.max(d);
                    p.delays.push(d);
                }
                None => p.missed += 1,
            }
        }
        if last > f64::MIN {
            p.last_per_rotation.push(last);
        }
    }
    p
}

// ---------------------------------------------------------------------------
// The run

async fn run(args: Args, keep_flag: Arc<AtomicBool>, work: &WorkDir) -> anyhow::Result<bool> {
    let started = Instant::now();
    let (m, n) = (args.mids, args.leaves);
    if m == 0 || n == 0 || args.collections == 0 {
        bail!("--mids, --leaves and --collections must be at least 1");
    }
    let ttl_secs = args.rotation.as_secs();
    if ttl_secs < 2 || args.rotation.subsec_nanos() != 0 {
        bail!("--rotation must be whole seconds, at least 2s");
    }
    let duration = args.duration.unwrap_or_else(|| args.rotation.mul_f64(3.5));
    let bin = std::fs::canonicalize(&args.bin).with_context(|| {
        format!(
            "--bin {}: not found (build with cargo build --release)",
            args.bin.display()
        )
    })?;
    let readers_on = args.readers || args.kill_mid;
    let collections: Arc<Vec<String>> =
        Arc::new((0..args.collections).map(|i| format!("c{i}")).collect());
    let root = is_root();
    let workp = &work.path;
    say(format!("work dir {}", workp.display()));

    // 1. Postgres (room for the mids' listener + pool and more).
    let (pg, admin, max_connections) = start_postgres(workp, m + 5, root).await?;
    let url = pg.url(FLEET_DB);

    // 2. Upstream
    let upstream = Arc::new(Upstream {
        ttl_secs: ttl_secs.into(),
        calls: Mutex::new(Vec::new()),
        issued: Mutex::new(HashSet::new()),
    });
    let up_addr = start_upstream(upstream.clone()).await?;

    // 3. Configs. Over Unix sockets: one for the mids, one per rotation of
    // the mids' list (leaf k uses k % M). With --tls: one per mid (its port)
    // and one per leaf (its certificate).
    let mid_socks: Vec<PathBuf> = (0..m)
        .map(|i| workp.join("mid").join(i.to_string()).join("tb.sock"))
        .collect();
    let mid_addrs = if args.tls {
        let t = Instant::now();
        let pki = Arc::new(Pki::create(workp, n)?);
        say(format!(
            "PKI in {}: a CA, the mids' server certificate, {n} leaf + 1 driver client certificates ({:.2} s)",
            pki.dir.display(),
            t.elapsed().as_secs_f64()
        ));
        MidAddrs::Tls(free_ports(m)?, pki)
    } else {
        MidAddrs::Unix(mid_socks.clone())
    };
    let mid_cfgs: Vec<PathBuf> = match &mid_addrs {
        MidAddrs::Unix(_) => {
            let p = workp.join("mid.toml");
            std::fs::write(&p, mid_config(&collections, up_addr, None))?;
            vec![p; m]
        }
        MidAddrs::Tls(ports, pki) => {
            let mut v = Vec::with_capacity(m);
            for (i, port) in ports.iter().enumerate() {
                let p = workp.join(format!("mid{i}.toml"));
                std::fs::write(&p, mid_config(&collections, up_addr, Some((pki, *port))))?;
                v.push(p);
            }
            v
        }
    };
    let leaf_cfgs: Vec<PathBuf> = match &mid_addrs {
        MidAddrs::Unix(_) => (0..n)
            .map(|k| workp.join(format!("leaf{}.toml", k % m)))
            .collect(),
        MidAddrs::Tls(..) => (0..n)
            .map(|k| workp.join(format!("leaf{k}.toml")))
            .collect(),
    };
    for (k, p) in leaf_cfgs.iter().enumerate() {
        if !p.exists() {
            std::fs::write(
                p,
                leaf_config(&collections, &mid_addrs, k, args.leaf_connect_timeout),
            )?;
        }
    }
    let key: [u8; 32] = rand::random();
    let secret: [u8; 24] = rand::random();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mid_env = vec![
        ("TREE_SIM_DATABASE_URL", url.clone()),
        ("TREE_SIM_ENCRYPTION_KEY", format!("k1:{}", b64.encode(key))),
        ("TREE_SIM_CLIENT_SECRET", b64.encode(secret)),
    ];

    let stop_bg = Arc::new(AtomicBool::new(false));
    let (notices, probe) = start_probe(url.clone(), stop_bg.clone())?;

    // 4. The mids, then the leaves.
    let t_spawn = Instant::now();
    let mut mids = Tier::spawn_with(
        "mid",
        m,
        &bin,
        workp,
        |i| mid_cfgs[i].clone(),
        |_| !args.tls,
        &mid_env,
    )?;
    mids.release()?;
    let t_mids = Instant::now();
    let mid_targets = (0..m)
        .map(|j| mid_addrs.target(j, mids.procs[j].sock()))
        .collect::<anyhow::Result<_>>()?;
    let (mid_clients, mid_ready, mid_tokens) = await_tier(
        &mut mids,
        mid_targets,
        &collections,
        t_mids,
        args.ready_timeout,
        &keep_flag,
        workp,
    )
    .await?;
    let mid_ready = dist(mid_ready);
    say(format!(
        "{m} mids ready after {:.2} s",
        mid_ready.max_ms / 1000.0
    ));

    let t_spawn_leaves = Instant::now();
    let mut leaves = Tier::spawn("leaf", n, &bin, workp, |k| leaf_cfgs[k].clone(), &[])?;
    let leaf_spawn_time = t_spawn_leaves.elapsed();
    leaves.release()?;
    let t_leaves = Instant::now();
    let leaf_targets = leaves.procs.iter().map(|p| To::Unix(p.sock())).collect();
    let (leaf_clients, leaf_ready, leaf_tokens) = await_tier(
        &mut leaves,
        leaf_targets,
        &collections,
        t_leaves,
        args.ready_timeout,
        &keep_flag,
        workp,
    )
    .await?;
    let t_ready = Instant::now();
    let leaf_ready = dist(leaf_ready);
    let startup_calls = upstream.calls_between(t_spawn, t_ready);
    say(format!(
        "{n} leaves spawned in {:.2} s, all ready {:.2} s after their release (p50 {:.2} s); {startup_calls} upstream calls",
        leaf_spawn_time.as_secs_f64(),
        leaf_ready.max_ms / 1000.0,
        leaf_ready.p50_ms / 1000.0
    ));

    // 5. Watchers on every leaf and every mid.
    let leaf_watchers = open_watchers(&leaf_clients, &collections).await?;
    let mid_watchers = open_watchers(&mid_clients, &collections).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while leaf_watchers
        .iter()
        .chain(&mid_watchers)
        .any(|w| lock(&w.seen).is_empty())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Connections once everything is up.
    let (postmaster, tick) = (pg.postmaster_pid(), tick_ms());
    let inodes = tcp_inodes_to(pg.port);
    let (mid_conns_start, leaf_conns_start) = (
        held_by(&mids.pids(), &inodes),
        held_by(&leaves.pids(), &inodes),
    );

    // 6. The window.
    let readers = readers_on
        .then(|| Readers::start(leaves.procs.iter().map(Proc::sock).collect(), &collections));
    let cpu0 = cpu_now(&mids.pids(), &leaves.pids(), postmaster, tick);
    // The mid to kill drops out of the later samples, while `cpu0` counts its
    // time before the window: once killed, its time in the window is added
    // and its time before (in `cpu0`) is taken back out of the difference.
    let killed_pid = mids.procs[0].child.id().to_string();
    let killed_t0 = run_ms(&killed_pid).unwrap_or(0.0);
    let mut killed_ms = 0.0;
    let t_w0 = Instant::now();
    let wall_w0 = SystemTime::now();
    let mut wall_kill = None;
    // The leaves following the mid to kill when it is killed (TLS: holding a
    // TCP connection to its port; Unix sockets: by configuration, its primaries).
    let mut followers: Vec<usize> = Vec::new();
    say(format!(
        "{} leaf + {} mid watchers open{}; measuring for {}",
        leaf_watchers.len(),
        mid_watchers.len(),
        if readers_on {
            format!(", {n} readers")
        } else {
            String::new()
        },
        humantime::format_duration(duration)
    ));
    let t_w1 = t_w0 + duration;
    let killed: usize = 0;
    let mut t_kill: Option<Instant> = None;
    let mut conn_peak = (0i64, 0i64, 0i64);
    let mut leaf_conns_peak = leaf_conns_start;
    let mut cpu_before_kill = None;
    let mut polls = 0u64;
    while Instant::now() < t_w1 {
        tokio::time::sleep(
            Duration::from_millis(500).min(t_w1.saturating_duration_since(Instant::now())),
        )
        .await;
        if let Ok(c) = db_connections(&admin).await
            && c.0 + c.1 + c.2 > conn_peak.0 + conn_peak.1 + conn_peak.2
        {
            conn_peak = c;
        }
        polls += 1;
        if polls.is_multiple_of(10) {
            leaf_conns_peak = leaf_conns_peak.max(held_by(&leaves.pids(), &tcp_inodes_to(pg.port)));
        }
        if args.kill_mid && t_kill.is_none() && Instant::now() >= t_w0 + duration / 2 {
            cpu_before_kill = Some(cpu_now(&mids.pids(), &leaves.pids(), postmaster, tick));
            killed_ms = run_ms(&killed_pid).unwrap_or(killed_t0) - killed_t0;
            followers = match &mid_addrs {
                MidAddrs::Tls(ports, _) => {
                    let inodes = tcp_inodes_to(ports[killed]);
                    (0..n)
                        .filter(|&k| held_by(&[leaves.procs[k].child.id()], &inodes) > 0)
                        .collect()
                }
                MidAddrs::Unix(_) => (0..n).filter(|k| k % m == killed).collect(),
            };
            let p = &mut mids.procs[killed];
            p.child.kill().context("SIGKILL of the mid")?;
            t_kill = Some(Instant::now());
            wall_kill = Some(SystemTime::now());
            let _ = p.child.wait();
            say(format!(
                "SIGKILLed mid {killed} (followed by {} leaves{}; the primary of {})",
                followers.len(),
                if args.tls { "" } else { " by configuration" },
                n.div_ceil(m)
            ));
        }
    }
    let conns = db_connections(&admin).await?;
    let inodes = tcp_inodes_to(pg.port);
    let (mid_conns, leaf_conns) = (
        held_by(&mids.pids(), &inodes),
        held_by(&leaves.pids(), &inodes),
    );
    let leaf_pids = leaves.pids();
    let (leaf_rss, leaf_rss_missing) = rss_kib(&leaf_pids);
    let (mid_rss, _) = rss_kib(&mids.pids());

    // Settle: every rotation whose upstream call fell in the window has
    // committed, and every live watcher has the latest version.
    let in_window = |ns: &[Notice], to: Instant| -> Vec<Notice> {
        ns.iter()
            .filter(|x| x.at >= t_w0 && x.at <= to)
            .cloned()
            .collect()
    };
    let is_dead_mid_watcher = |w: &Watcher| t_kill.is_some() && w.sidecar == killed;
    let settle_until = Instant::now() + SETTLE;
    loop {
        let now = Instant::now();
        let rot = in_window(&lock(&notices), now);
        let calls = upstream.calls_between(t_w0, t_w1);
        let latest: HashMap<&str, u64> = rot.iter().fold(HashMap::new(), |mut acc, x| {
            let e = acc.entry(x.collection.as_str()).or_insert(0);
            *e = (*e).max(x.version);
            acc
        });
        let caught_up = leaf_watchers
            .iter()
            .chain(mid_watchers.iter().filter(|w| !is_dead_mid_watcher(w)))
            .all(|w| {
                latest.get(w.collection.as_str()).is_none_or(|v| {
                    lock(&w.seen).last().is_some_and(|s| s.version >= *v)
                        || w.ended.load(Ordering::Relaxed)
                })
            });
        if (rot.len() >= calls && caught_up) || now > settle_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t_end = Instant::now();
    let cpu1 = cpu_now(&mids.pids(), &leaf_pids, postmaster, tick);
    let reader_out = match readers {
        Some(r) => Some(r.finish().await),
        None => None,
    };
    stop_bg.store(true, Ordering::Relaxed);
    let probe_errors = tokio::task::spawn_blocking(move || probe.join().unwrap_or_default())
        .await
        .unwrap_or_default();

    // 7. Analysis.
    let all_notices = lock(&notices).clone();
    let rotations = in_window(&all_notices, t_end);
    let window_calls = upstream.calls_between(t_w0, t_w1);
    let window_secs = (t_end - t_w0).as_secs_f64();
    let latest: HashMap<String, u64> = all_notices.iter().fold(HashMap::new(), |mut acc, x| {
        let e = acc.entry(x.collection.clone()).or_insert(0);
        *e = (*e).max(x.version);
        acc
    });
    let mut by_version: HashMap<(String, u64), HashSet<u64>> = HashMap::new();
    for (c, v, h) in mid_tokens.iter().chain(&leaf_tokens) {
        by_version.entry((c.clone(), *v)).or_default().insert(*h);
    }
    let leaf_p = propagation(
        &leaf_watchers,
        &rotations,
        &latest,
        |_, _| false,
        |_| false,
        &mut by_version,
    );
    let mid_p = propagation(
        &mid_watchers,
        &rotations,
        &latest,
        |w, r| t_kill.is_some_and(|k| w.sidecar == killed && r.at >= k),
        |w| is_dead_mid_watcher(w),
        &mut by_version,
    );
    // Readers: in order per (reader, collection), and their values too.
    let (read_failures, read_failures_servable, read_errors, reads) =
        reader_out.unwrap_or((0, 0, Vec::new(), Vec::new()));
    let mut reads_total = 0;
    let mut reads_backwards = 0;
    for (_, rs) in &reads {
        reads_total += rs.len();
        reads_backwards += rs
            .windows(2)
            .filter(|p| p[1].version < p[0].version)
            .count();
    }
    // (The reader's collection is not kept per read; values are checked per
    // version across collections, which is stricter.)
    let mut reader_versions: HashMap<u64, HashSet<u64>> = HashMap::new();
    for (_, rs) in &reads {
        for r in rs {
            reader_versions.entry(r.version).or_default().insert(r.hash);
        }
    }
    let two_values_reads = if collections.len() == 1 {
        reader_versions.values().filter(|v| v.len() > 1).count()
    } else {
        0
    };
    if collections.len() == 1 {
        for (v, hs) in &reader_versions {
            by_version
                .entry((collections[0].clone(), *v))
                .or_default()
                .extend(hs);
        }
    }
    let two_values = by_version
        .values()
        .filter(|v| v.len() > 1)
        .count()
        .max(two_values_reads);
    let issued = lock(&upstream.issued).clone();
    let not_issued = by_version
        .values()
        .flatten()
        .filter(|h| !issued.contains(h))
        .count();

    // The kill: the next rotation after it, at the orphaned leaves.
    let mut kill_doc = serde_json::Value::Null;
    let mut kill_line = String::new();
    let mut orphan_missing = 0;
    if let Some(k) = t_kill {
        let orphans: Vec<&Watcher> = leaf_watchers
            .iter()
            .filter(|w| followers.contains(&w.sidecar))
            .collect();
        let mut next_all = Vec::new();
        let mut next_commit = Vec::new();
        let mut commit_after_kill = Vec::new();
        for c in collections.iter() {
            let Some(r) = rotations.iter().find(|x| &x.collection == c && x.at > k) else {
                continue;
            };
            commit_after_kill.push(diff_ms(r.at, k));
            for w in orphans.iter().filter(|w| &w.collection == c) {
                match lock(&w.seen).iter().find(|x| x.version >= r.version) {
                    Some(x) => {
                        next_all.push(diff_ms(x.at, k));
                        next_commit.push(diff_ms(x.at, r.at));
                    }
                    None => orphan_missing += 1,
                }
            }
        }
        let (to_all, from_commit) = (dist(next_all), dist(next_commit));
        let after_kill = wall_kill.map(rfc3339).unwrap_or_default();
        let failover_warns: usize = followers
            .iter()
            .map(|&k| {
                failover_lines(&leaves.procs[k].log())
                    .filter(|at| *at >= after_kill.as_str())
                    .count()
            })
            .sum();
        kill_line = format!(
            "\n- Kill: mid {killed} SIGKILLed {:.1} s into the window ({} orphaned leaves); the next commit came {:.1} s later; \
             every orphaned leaf's watcher had it {:.2} s after the kill ({:.1} ms after its commit; p50 {:.1} ms); \
             {orphan_missing} orphaned watchers never had it; {failover_warns} failover WARN lines on the orphans after the kill.",
            diff_ms(k, t_w0) / 1000.0,
            orphans.len() / collections.len(),
            commit_after_kill.iter().copied().fold(f64::NAN, f64::max) / 1000.0,
            to_all.max_ms / 1000.0,
            from_commit.max_ms,
            from_commit.p50_ms,
        );
        kill_doc = json!({
            "killed_mid": killed,
            "at_s_into_window": diff_ms(k, t_w0) / 1000.0,
            "orphaned_leaves": orphans.len() / collections.len(),
            "next_commit_after_kill_ms": commit_after_kill,
            "kill_to_orphan_watcher": to_all,
            "next_commit_to_orphan_watcher": from_commit,
            "orphan_watchers_without_next": orphan_missing,
            "failover_warn_lines_after_kill": failover_warns,
            "orphans_found_by": if args.tls { "tcp_connection_to_the_mid" } else { "configuration" },
            "cpu_before_kill": cpu_before_kill,
        });
    }

    let violations = leaf_p.missed
        + leaf_p.out_of_order
        + leaf_p.not_latest
        + leaf_p.streams_ended
        + mid_p.missed
        + mid_p.out_of_order
        + mid_p.not_latest
        + mid_p.streams_ended
        + two_values
        + not_issued
        + read_failures
        + reads_backwards
        + orphan_missing
        + leaf_conns.max(leaf_conns_peak)
        + usize::from(rotations.is_empty())
        + usize::from(window_calls != rotations.len());
    if rotations.is_empty() {
        say("no rotation committed in the window: make --duration longer than --rotation");
    }
    let calls_per_rotation = window_calls as f64 / rotations.len() as f64;
    let cpu_s = (
        cpu1.mids - cpu0.mids + killed_ms + if t_kill.is_some() { killed_t0 } else { 0.0 },
        cpu1.leaves - cpu0.leaves,
        cpu1.postgres - cpu0.postgres,
        cpu1.driver - cpu0.driver,
    );
    let nrot = rotations.len().max(1) as f64;

    let leaf_d = dist(leaf_p.delays.clone());
    let leaf_last = dist(leaf_p.last_per_rotation.clone());
    let mid_d = dist(mid_p.delays.clone());
    let mid_last = dist(mid_p.last_per_rotation.clone());

    // 8. Stop, logs.
    let (leaf_stop, leaf_killed) = leaves.stop();
    let (mid_stop, mid_killed) = mids.stop();
    let (lw, le, lwith, ltop) = leaves.log_summary();
    // Failovers before the window: at start-up (a first mid not answering within
    // --leaf-connect-timeout).
    let before_window = rfc3339(wall_w0);
    let startup_failovers: Vec<usize> = leaves
        .procs
        .iter()
        .map(|p| {
            failover_lines(&p.log())
                .filter(|at| *at < before_window.as_str())
                .count()
        })
        .collect();
    let (sf_lines, sf_leaves) = (
        startup_failovers.iter().sum::<usize>(),
        startup_failovers.iter().filter(|c| **c > 0).count(),
    );
    let (mw, me, mwith, mtop) = mids.log_summary();
    if violations > 0 {
        keep_flag.store(true, Ordering::Relaxed);
    }

    let header = "| tree | collections | kill a mid | leaves ready after release | upstream calls at start-up | upstream calls / rotation | commit -> leaf watcher p50 / p99 / max | commit -> last leaf watcher p50 / p99 / max | commit -> mid watcher p50 / p99 / max | DB connections (mids + leaves; pg_stat_activity total) | missed | failed reads | leaf RSS each | CPU ms/s mids / leaves / Postgres / driver | violations |";
    let sep = "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";
    let row = format!(
        "| {m} mids x {n} leaves{transport} | {c} | {kill} | {ready:.2} s | {startup_calls} | {calls_per_rotation:.2} | {a:.1} / {b:.1} / {cc:.1} ms | {d:.1} / {e:.1} / {f:.1} ms | {g:.1} / {h:.1} / {i:.1} ms | {mid_conns} + {leaf_conns} ({pgt}) | {missed} | {rf} | {rss:.1} MiB | {cm:.0} / {cl:.0} / {cp:.0} / {cd:.0} | {violations} |",
        c = collections.len(),
        kill = if args.kill_mid { "yes" } else { "no" },
        transport = if args.tls { ", TLS" } else { "" },
        ready = leaf_ready.max_ms / 1000.0,
        a = leaf_d.p50_ms,
        b = leaf_d.p99_ms,
        cc = leaf_d.max_ms,
        d = leaf_last.p50_ms,
        e = leaf_last.p99_ms,
        f = leaf_last.max_ms,
        g = mid_d.p50_ms,
        h = mid_d.p99_ms,
        i = mid_d.max_ms,
        pgt = conns.0 + conns.1 + conns.2,
        missed = leaf_p.missed + mid_p.missed,
        rf = if readers_on {
            read_failures.to_string()
        } else {
            "-".into()
        },
        rss = leaf_rss as f64 / 1024.0 / leaf_pids.len().max(1) as f64,
        cm = cpu_s.0 / window_secs,
        cl = cpu_s.1 / window_secs,
        cp = cpu_s.2 / window_secs,
        cd = cpu_s.3 / window_secs,
    );
    println!("{header}\n{sep}\n{row}\n");
    let top = |t: &[(String, usize)]| {
        t.iter()
            .map(|(k, c)| format!("    {c} x {k}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    println!(
        "{m} mids x {n} leaves x {c} collections, {}, {ttl_secs} s tokens, window {window_secs:.1} s, run {:.1} s (wall); {}.\n\
         - Start: mids ready {:.2} s after their release; {n} leaves spawned in {:.2} s, all ready {:.2} s after their release (p50 {:.2} s); \
         {startup_calls} upstream calls by then (expected {c}).\n\
         - Rotations in the window: {} (probe NOTIFY receipts); upstream calls in the window: {window_calls} ({calls_per_rotation:.2} per rotation); \
         in all, per collection: {:?}.\n\
         - Commit -> leaf watcher ({} deliveries): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (min {:.1} ms); last leaf per rotation: p50 {:.1}, p99 {:.1}, max {:.1} ms.\n\
         - Commit -> mid watcher ({} deliveries): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (min {:.1} ms); last mid per rotation: p50 {:.1}, max {:.1} ms.\n\
         - Database connections: held by the mids {mid_conns} (at start {mid_conns_start}), by the leaves {leaf_conns} (at start {leaf_conns_start}, peak {leaf_conns_peak}); \
         pg_stat_activity of `{FLEET_DB}` at the end: {} token-broker listener + {} token-broker pool + {} other (this probe); peak sample {} (max_connections {max_connections}).\n\
         - CPU in the window ({window_secs:.1} s, gross; brokers and driver from schedstat, Postgres in {tick:.0} ms ticks): mids {:.0} ms ({:.1} ms/s), leaves {:.0} ms ({:.1} ms/s, {:.2} ms per leaf per rotation), \
         Postgres {:.0} ms ({:.1} ms/s), driver {:.0} ms ({:.1} ms/s; watchers{}, upstream, probe); per rotation: mids {:.0}, leaves {:.0}, Postgres {:.0}, driver {:.0} ms{}.\n\
         - Memory (VmRSS): leaves {:.1} MiB in all, {:.1} MiB each{}; mids {:.1} MiB in all.\n\
         - Readers: {}.\n\
         - Violations: {violations} (leaf: missed {}, out of order {}, not at the latest {}, streams ended {}; mid: missed {}, out of order {}, not at the latest {}, streams ended {}; \
         two values for one version {two_values}; value never issued {not_issued}; failed reads {read_failures}; reads going back {reads_backwards}; \
         leaf DB connections {leaf_conns} (peak {leaf_conns_peak}); upstream calls != rotations: {}).{kill_line}\n\
         - Failovers before the window (start-up): {sf_lines} WARN lines on {sf_leaves} leaves (leaf connect_timeout {} ms).\n\
         - Logs: leaves {lw} WARN / {le} ERROR on {lwith}{}; mids {mw} WARN / {me} ERROR on {mwith}{}.\n\
         - Stop: leaves {:.2} s ({leaf_killed} SIGKILLed), mids {:.2} s ({mid_killed} SIGKILLed).{}",
        if args.tls {
            "mids on TLS (127.0.0.1 TCP, client certificates required, one per leaf)"
        } else {
            "mids on Unix sockets"
        },
        started.elapsed().as_secs_f64(),
        pg.version(),
        mid_ready.max_ms / 1000.0,
        leaf_spawn_time.as_secs_f64(),
        leaf_ready.max_ms / 1000.0,
        leaf_ready.p50_ms / 1000.0,
        rotations.len(),
        upstream.calls_per_collection(),
        leaf_d.count,
        leaf_d.p50_ms,
        leaf_d.p99_ms,
        leaf_d.max_ms,
        leaf_d.min_ms,
        leaf_last.p50_ms,
        leaf_last.p99_ms,
        leaf_last.max_ms,
        mid_d.count,
        mid_d.p50_ms,
        mid_d.p99_ms,
        mid_d.max_ms,
        mid_d.min_ms,
        mid_last.p50_ms,
        mid_last.max_ms,
        conns.0,
        conns.1,
        conns.2,
        conn_peak.0 + conn_peak.1 + conn_peak.2,
        cpu_s.0,
        cpu_s.0 / window_secs,
        cpu_s.1,
        cpu_s.1 / window_secs,
        cpu_s.1 / nrot / n as f64,
        cpu_s.2,
        cpu_s.2 / window_secs,
        cpu_s.3,
        cpu_s.3 / window_secs,
        if readers_on { ", readers" } else { "" },
        cpu_s.0 / nrot,
        cpu_s.1 / nrot,
        cpu_s.2 / nrot,
        cpu_s.3 / nrot,
        if cpu1.unreadable > usize::from(t_kill.is_some()) {
            format!(" ({} unreadable)", cpu1.unreadable)
        } else {
            String::new()
        },
        leaf_rss as f64 / 1024.0,
        leaf_rss as f64 / 1024.0 / leaf_pids.len().max(1) as f64,
        if leaf_rss_missing > 0 {
            format!(" ({leaf_rss_missing} unreadable)")
        } else {
            String::new()
        },
        mid_rss as f64 / 1024.0,
        if readers_on {
            format!(
                "{reads_total} reads on {n} leaves, {read_failures} failed ({read_failures_servable} while the reader's last token was unexpired){}",
                read_errors
                    .first()
                    .map(|e| format!("; first: {e}"))
                    .unwrap_or_default()
            )
        } else {
            "none (--kill-mid or --readers runs them)".into()
        },
        leaf_p.missed,
        leaf_p.out_of_order,
        leaf_p.not_latest,
        leaf_p.streams_ended,
        mid_p.missed,
        mid_p.out_of_order,
        mid_p.not_latest,
        mid_p.streams_ended,
        window_calls != rotations.len(),
        args.leaf_connect_timeout.as_millis(),
        if ltop.is_empty() {
            String::new()
        } else {
            format!(" (most frequent:\n{})\n ", top(&ltop))
        },
        if mtop.is_empty() {
            String::new()
        } else {
            format!(" (most frequent:\n{})\n ", top(&mtop))
        },
        leaf_stop.as_secs_f64(),
        mid_stop.as_secs_f64(),
        if probe_errors.is_empty() {
            String::new()
        } else {
            format!("\n- Probe errors: {probe_errors:?}")
        },
        c = collections.len(),
    );

    if let Some(path) = &args.json {
        let doc = json!({
            "mids": m,
            "leaves": n,
            "collections": collections.len(),
            "token_lifetime_s": ttl_secs,
            "kill_mid": args.kill_mid,
            "tls": args.tls,
            "readers": readers_on,
            "window_s": window_secs,
            "wall_s": started.elapsed().as_secs_f64(),
            "mids_ready": mid_ready,
            "leaves_spawn_s": leaf_spawn_time.as_secs_f64(),
            "leaves_ready": leaf_ready,
            "upstream_calls_at_startup": startup_calls,
            "upstream_calls_per_collection_total": upstream.calls_per_collection(),
            "rotations": rotations.len(),
            "upstream_calls_in_window": window_calls,
            "upstream_calls_per_rotation": calls_per_rotation,
            "commit_to_leaf_watcher": leaf_d,
            "commit_to_last_leaf_watcher": leaf_last,
            "commit_to_mid_watcher": mid_d,
            "commit_to_last_mid_watcher": mid_last,
            "leaf_checks": leaf_p,
            "mid_checks": mid_p,
            "db_connections": {
                "held_by_mids": mid_conns, "held_by_mids_at_start": mid_conns_start,
                "held_by_leaves": leaf_conns, "held_by_leaves_at_start": leaf_conns_start, "held_by_leaves_peak": leaf_conns_peak,
                "pg_stat_activity": {"listener": conns.0, "pool": conns.1, "other": conns.2},
                "pg_stat_activity_peak_total": conn_peak.0 + conn_peak.1 + conn_peak.2,
            },
            "max_connections": max_connections,
            "cpu_window_ms": {"mids": cpu_s.0, "leaves": cpu_s.1, "postgres": cpu_s.2, "driver": cpu_s.3, "tick_ms": tick},
            "rss_kib": {"leaves": leaf_rss, "leaves_each": leaf_rss as f64 / leaf_pids.len().max(1) as f64, "mids": mid_rss},
            "readers": {"reads": reads_total, "failed": read_failures, "failed_while_servable": read_failures_servable, "backwards": reads_backwards, "first_errors": read_errors},
            "kill": kill_doc,
            "violations": {"total": violations, "two_values_one_version": two_values, "not_issued": not_issued},
            "leaf_connect_timeout_ms": args.leaf_connect_timeout.as_millis() as u64,
            "startup_failovers": {"warn_lines": sf_lines, "leaves": sf_leaves},
            "logs": {"leaves": {"warn": lw, "error": le, "top": ltop}, "mids": {"warn": mw, "error": me, "top": mtop}},
            "probe_errors": probe_errors,
            "markdown_row": row,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(leaves);
    drop(mids);
    admin.close().await;
    drop(pg);
    Ok(violations == 0)
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::drive(args.keep, async |keep_flag, work| {
        run(args, keep_flag, work).await
    })
}
