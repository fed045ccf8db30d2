//! Client subcommands for people at a terminal: `get`, `watch`, `invalidate`,
//! and `wait` for entrypoints and init containers.
//!
//! Contract: token values are printed only when asked for (`--value`); every
//! other line is safe to paste into a ticket. `watch` reconnects after a
//! transport error or UNAVAILABLE, resuming with `after_version` so that no
//! rotation is missed. `wait` returns once gRPC health says SERVING for `""`
//! (readiness) and fails, naming the last answer, when its timeout passes.

use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tonic::transport::{Channel, Endpoint};

use crate::grpc::pb::token_broker_client::TokenBrokerClient;
use crate::grpc::pb::{self, GetCollectionTokenRequest, InvalidateTokenRequest, WatchTokenRequest};
use crate::grpc::remote::{ClientTls, unix_connector};
use crate::listen::ListenAddr;

/// Where a client command connects: a broker's address and, for TLS, the
/// files to trust it and to present (see `ClientTls`).
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: ListenAddr,
    /// `Some`: TLS (an IP:PORT address only).
    pub tls: Option<ClientTls>,
}

impl From<ListenAddr> for Target {
    fn from(addr: ListenAddr) -> Self {
        Self { addr, tls: None }
    }
}

/// Connects to a broker at `addr` (TCP or `unix:` path), without TLS.
pub async fn connect(addr: &ListenAddr) -> anyhow::Result<TokenBrokerClient<Channel>> {
    Ok(TokenBrokerClient::new(
        channel(&Target::from(addr.clone())).await?,
    ))
}

/// Connects to `target`, over TLS when it says so.
pub async fn connect_to(target: &Target) -> anyhow::Result<TokenBrokerClient<Channel>> {
    Ok(TokenBrokerClient::new(channel(target).await?))
}

/// A gRPC channel to `target` (TCP, TCP with TLS, or `unix:` path).
async fn channel(target: &Target) -> anyhow::Result<Channel> {
    let addr = &target.addr;
    Ok(match (addr, &target.tls) {
        (ListenAddr::Tcp(a), Some(tls)) => {
            let config = tls.config().map_err(|e| anyhow::anyhow!(e))?;
            Endpoint::from_shared(format!("https://{a}"))?
                .tls_config(config)?
                .connect()
                .await
                .with_context(|| format!("cannot connect to {addr} (TLS)"))?
        }
        (ListenAddr::Unix(_), Some(_)) => {
            anyhow::bail!("--ca-file: TLS needs an IP:PORT address, not a Unix socket")
        }
        (ListenAddr::Tcp(a), None) => Endpoint::from_shared(format!("http://{a}"))?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?,
        (ListenAddr::Unix(path), None) => {
            // The URI is required by the API but unused: the connector decides.
            Endpoint::try_from("http://localhost")?
                .connect_with_connector(unix_connector(path.clone()))
                .await
                .with_context(|| format!("cannot connect to {addr}"))?
        }
    })
}

/// Longest wait for one health check of [`wait`] (unless the interval is
/// longer): a server that accepts but does not answer is asked again.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Polls `grpc.health.v1.Health/Check` for service `""` (readiness) at
/// `addr` every `interval` until it answers SERVING, then prints how long it
/// took. Fails after `timeout`, naming the last answer (cannot connect,
/// NOT_SERVING, ...).
pub async fn wait(target: &Target, timeout: Duration, interval: Duration) -> anyhow::Result<()> {
    let addr = &target.addr;
    use tokio::time::Instant;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let start = Instant::now();
    let deadline = start + timeout;
    let mut last = "no answer yet".to_owned();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            anyhow::bail!(
                "{addr} not serving after {} (last: {last})",
                humantime::format_duration(timeout)
            );
        }
        let bound = remaining.min(CHECK_TIMEOUT.max(interval));
        let check = async {
            let mut client = HealthClient::new(channel(target).await?);
            let req = with_timeout(
                HealthCheckRequest {
                    service: String::new(),
                },
                bound,
            );
            let status = client.check(req).await.map_err(status_error)?;
            anyhow::Ok(status.into_inner().status())
        };
        match tokio::time::timeout(bound, check).await {
            Ok(Ok(ServingStatus::Serving)) => {
                let took = Duration::from_millis(
                    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                );
                println!(
                    "{addr} is serving (waited {})",
                    humantime::format_duration(took)
                );
                return Ok(());
            }
            Ok(Ok(status)) => last = format!("health status {}", status.as_str_name()),
            Ok(Err(e)) => last = format!("{e:#}"),
            Err(_) => {
                last = format!("no answer within {}", humantime::format_duration(bound));
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(interval.min(remaining)).await;
    }
}

fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    req
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

pub async fn get(
    target: &Target,
    collection: String,
    min_remaining: Option<Duration>,
    timeout: Duration,
    value_only: bool,
) -> anyhow::Result<()> {
    let mut client = connect_to(target).await?;
    let msg = GetCollectionTokenRequest {
        collection,
        min_remaining: min_remaining.map(|d| d.try_into()).transpose()?,
    };
    let resp = client
        .get_collection_token(with_timeout(msg, timeout))
        .await
        .map_err(status_error)?;
    let token = resp.into_inner().token.context("response has no token")?;
    let mut out = std::io::stdout().lock();
    if value_only {
        writeln!(out, "{}", token.value)?;
    } else {
        write!(out, "{}", describe(&token))?;
    }
    Ok(())
}

pub async fn invalidate(
    target: &Target,
    collection: String,
    version: u64,
    reason: String,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut client = connect_to(target).await?;
    let msg = InvalidateTokenRequest {
        collection,
        version,
        value: String::new(),
        reason,
    };
    let resp = client
        .invalidate_token(with_timeout(msg, timeout))
        .await
        .map_err(status_error)?
        .into_inner();
    let token = resp.token.context("response has no token")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "refreshed:  {}", resp.refreshed)?;
    write!(out, "{}", describe(&token))?;
    Ok(())
}

pub async fn watch(
    target: &Target,
    collection: String,
    mut after_version: u64,
    count: Option<u64>,
    show_value: bool,
) -> anyhow::Result<()> {
    let mut seen = 0u64;
    let mut delay = Duration::from_millis(250);
    loop {
        let result: anyhow::Result<()> = async {
            let mut client = connect_to(target).await?;
            let req = WatchTokenRequest {
                collection: collection.clone(),
                after_version,
            };
            let mut stream = client
                .watch_token(req)
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(msg) = stream.message().await.map_err(status_error)? {
                let token = msg.token.context("response has no token")?;
                after_version = token.version;
                delay = Duration::from_millis(250);
                let mut out = std::io::stdout().lock();
                write!(
                    out,
                    "version={} expires_at={} refresh_at={} stale={}",
                    token.version,
                    ts(&token.expires_at),
                    ts(&token.refresh_at),
                    token.stale
                )?;
                if show_value {
                    write!(out, " value={}", token.value)?;
                }
                writeln!(out)?;
                out.flush()?;
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
            }
            anyhow::bail!("stream ended by the server")
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if is_retryable(&e) => {
                eprintln!(
                    "watch interrupted ({e}); reconnecting in {delay:?} after version {after_version}"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_retryable(e: &anyhow::Error) -> bool {
    let text = e.to_string();
    text.starts_with("Unavailable")
        || text.starts_with("cannot connect")
        || text.starts_with("stream ended")
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    match t {
        None => "-".to_owned(),
        Some(t) => match SystemTime::try_from(*t) {
            Ok(at) => rfc3339(at).unwrap_or_else(|| format!("{}s since the Unix epoch", t.seconds)),
            Err(_) => format!("{}s since the Unix epoch (out of range)", t.seconds),
        },
    }
}

/// RFC 3339 with milliseconds, for instants humantime can print (1970 to
/// 9999; it panics past that).
fn rfc3339(t: SystemTime) -> Option<String> {
    const LAST: Duration = Duration::from_secs(253_402_300_799);
    let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    (since <= LAST).then(|| humantime::format_rfc3339_millis(t).to_string())
}

fn describe(t: &pb::Token) -> String {
    let rel = |ts: &Option<prost_types::Timestamp>| {
        let at = ts.as_ref().and_then(|t| SystemTime::try_from(*t).ok());
        match at.map(|at| at.duration_since(SystemTime::now())) {
            Some(Ok(d)) => format!(
                " (in {})",
                humantime::format_duration(Duration::from_secs(d.as_secs()))
            ),
            Some(Err(e)) => format!(
                " ({} ago)",
                humantime::format_duration(Duration::from_secs(e.duration().as_secs()))
            ),
            None => String::new(),
        }
    };
    format!(
        "collection: {}\nversion:    {}\nvalue:      <{} characters; --value prints it>\nfetched_at: {}\nrefresh_at: {}{}\nexpires_at: {}{}\nstale:      {}\n",
        t.collection,
        t.version,
        t.value.chars().count(),
        ts(&t.fetched_at),
        ts(&t.refresh_at),
        rel(&t.refresh_at),
        ts(&t.expires_at),
        rel(&t.expires_at),
        t.stale,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_timestamp_prints_without_panicking() {
        let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
        assert_eq!(ts(&at(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(ts(&at(253_402_300_799)), "9999-12-31T23:59:59.000Z");
        assert_eq!(
            ts(&at(253_402_300_800)),
            "253402300800s since the Unix epoch"
        );
        assert!(ts(&at(i64::MAX)).contains("since the Unix epoch"));
        assert!(ts(&at(-5)).contains("since the Unix epoch"));
        assert_eq!(ts(&None), "-");
        let token = pb::Token {
            expires_at: at(i64::MAX),
            refresh_at: at(300_000_000_000),
            ..pb::Token::default()
        };
        assert!(describe(&token).contains("expires_at:"));
    }
}
