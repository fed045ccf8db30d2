//! The `broker` source: another token-broker reached over its own gRPC API
//! (`WatchToken`, `GetCollectionToken`, `InvalidateToken`), over TLS, plain
//! TCP or a Unix socket. It implements [`Remote`]; the broker core follows it
//! (`broker/relay.rs`) and decides which endpoint to use and when.
//!
//! Contract:
//! - A remote token keeps its version and instants; one that is malformed
//!   (empty value, version 0, an instant missing or out of order) is a
//!   `bad_response` error, never a token.
//! - Statuses become classified [`FetchError`]s: a transport failure, or
//!   UNAVAILABLE without a retry pushback (a remote shutting down), is
//!   `connect` (the broker fails over), a deadline `timeout`, NOT_FOUND /
//!   PERMISSION_DENIED / UNAUTHENTICATED / FAILED_PRECONDITION permanent
//!   (`rejected`), RESOURCE_EXHAUSTED `rate_limited`, the rest
//!   `upstream_error`; the remote's `grpc-retry-pushback-ms` is kept as
//!   `retry_after`. Details carry the code and the remote's message (which
//!   never holds a token), cut short.
//! - Each endpoint's channel is built lazily, and rebuilt after a connect
//!   failure or when its TLS files (CA, client certificate and key) changed
//!   on disk (checked at each call by a hash of their contents), so a
//!   rotated client certificate is presented from the next call on.
//! - HTTP/2 keepalive pings detect a remote that vanished without closing
//!   the connection.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use tonic::{Code, Status};

use super::pb;
use super::pb::token_broker_client::TokenBrokerClient;
use crate::source::{
    BoxFuture, FailureClass, FetchContext, FetchError, Fetched, Remote, RemoteToken, Source,
    TokenStream,
};
use crate::token::{Secret, Token};

/// Keepalive of a remote connection: a ping this often, dead without an
/// answer within the same time.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// Where a remote broker listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteAddr {
    /// `http://host:port`: plain TCP.
    Http(String),
    /// `https://host:port`: TLS.
    Https(String),
    /// `unix:/path`: a Unix socket.
    Unix(PathBuf),
}

impl std::fmt::Display for RemoteAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http(u) | Self::Https(u) => f.write_str(u),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// TLS settings of the connections to a remote broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// Trusted CA bundle (PEM) for `https` addresses.
    pub ca_file: Option<PathBuf>,
    /// This sidecar's client certificate and key (PEM), when the remote
    /// verifies callers.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name to verify in the remote's certificate, instead of the host.
    pub server_name: Option<String>,
}

impl ClientTls {
    /// A hash of the files' contents as they are now (`None` when none is
    /// set or one cannot be read: building the channel then says why).
    pub fn fingerprint(&self) -> Option<[u8; 32]> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for p in [&self.ca_file, &self.cert_file, &self.key_file]
            .into_iter()
            .flatten()
        {
            h.update(std::fs::read(p).ok()?);
            h.update([0]);
        }
        Some(h.finalize().into())
    }

    /// The TLS settings of a connection, read from the files now (so a
    /// connection made after the files were rotated uses the new ones).
    /// Errors name the setting and the path, never the content.
    pub fn config(&self) -> Result<ClientTlsConfig, String> {
        let read = |field: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| format!("tls {field} {}: {e}", p.display()))
        };
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca_file {
            config = config.ca_certificate(Certificate::from_pem(read("ca_file", ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            config = config.identity(Identity::from_pem(
                read("cert_file", cert)?,
                read("key_file", key)?,
            ));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

/// A `broker` source as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSpec {
    pub addrs: Vec<RemoteAddr>,
    /// The collection's name at the remote.
    pub collection: String,
    pub tls: ClientTls,
    pub connect_timeout: Duration,
}

/// The source of a collection that follows another token-broker.
pub struct BrokerSource {
    remote: Arc<RemoteBroker>,
}

impl BrokerSource {
    pub fn new(spec: BrokerSpec) -> Self {
        let channels = spec.addrs.iter().map(|_| Mutex::new(None)).collect();
        Self {
            remote: Arc::new(RemoteBroker { spec, channels }),
        }
    }
}

impl Source for BrokerSource {
    fn kind(&self) -> &'static str {
        "broker"
    }

    /// Never called: the broker follows this source (`remote`) instead of
    /// fetching it, since a fetch would lose the remote's version.
    fn fetch(&self, _ctx: FetchContext) -> BoxFuture<'_, Result<Fetched, FetchError>> {
        Box::pin(async {
            Err(FetchError::new(
                FailureClass::Internal,
                "a broker source is followed, not fetched",
            ))
        })
    }

    fn remote(&self) -> Option<Arc<dyn Remote>> {
        Some(self.remote.clone())
    }
}

struct RemoteBroker {
    spec: BrokerSpec,
    /// One lazily built channel per address, with the fingerprint of the TLS
    /// files it was built from; `None` after a connect failure.
    channels: Vec<Mutex<Option<Built>>>,
}

/// A channel and the fingerprint of the TLS files it was built from.
type Built = (Channel, Option<[u8; 32]>);

impl RemoteBroker {
    /// A client on endpoint `i`'s channel, built anew when there is none or
    /// the TLS files changed since it was built (a rotated client
    /// certificate is presented from the next call on, not only after the
    /// old one is refused).
    fn client(&self, i: usize) -> Result<TokenBrokerClient<Channel>, FetchError> {
        let slot = self
            .channels
            .get(i)
            .ok_or_else(|| FetchError::new(FailureClass::Internal, "no such endpoint"))?;
        let addr = &self.spec.addrs[i];
        let files = match addr {
            RemoteAddr::Https(_) => self.spec.tls.fingerprint(),
            RemoteAddr::Http(_) | RemoteAddr::Unix(_) => None,
        };
        let mut slot = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let channel = match &*slot {
            Some((c, built_from)) if *built_from == files => c.clone(),
            _ => {
                let c = self.channel(addr)?;
                *slot = Some((c.clone(), files));
                c
            }
        };
        Ok(TokenBrokerClient::new(channel))
    }

    /// Forgets endpoint `i`'s channel after a connect failure, so the next
    /// call connects afresh (and re-reads the TLS files).
    fn forget(&self, i: usize, e: &FetchError) {
        if e.class == FailureClass::Connect
            && let Some(slot) = self.channels.get(i)
        {
            *slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
    }

    fn channel(&self, addr: &RemoteAddr) -> Result<Channel, FetchError> {
        let setup = |detail: String| FetchError::new(FailureClass::Connect, detail);
        let tune = |e: Endpoint| {
            e.connect_timeout(self.spec.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(KEEPALIVE)
                .keep_alive_timeout(KEEPALIVE)
                .keep_alive_while_idle(true)
        };
        match addr {
            RemoteAddr::Http(uri) => Ok(tune(
                Endpoint::from_shared(uri.clone()).map_err(|e| setup(format!("{uri}: {e}")))?,
            )
            .connect_lazy()),
            RemoteAddr::Https(uri) => {
                let tls = self.spec.tls.config().map_err(setup)?;
                let endpoint = tune(
                    Endpoint::from_shared(uri.clone()).map_err(|e| setup(format!("{uri}: {e}")))?,
                )
                .tls_config(tls)
                .map_err(|e| setup(format!("{uri}: tls: {e}")))?;
                Ok(endpoint.connect_lazy())
            }
            RemoteAddr::Unix(path) => {
                let path = path.clone();
                // The URI is required by the API but unused: the connector decides.
                let endpoint = tune(Endpoint::from_static("http://localhost"));
                Ok(endpoint.connect_with_connector_lazy(unix_connector(path.clone())))
            }
        }
    }
}

impl Remote for RemoteBroker {
    fn endpoints(&self) -> usize {
        self.spec.addrs.len()
    }

    fn endpoint(&self, i: usize) -> String {
        self.spec
            .addrs
            .get(i)
            .map_or_else(String::new, ToString::to_string)
    }

    fn watch(
        &self,
        i: usize,
        after_version: u64,
    ) -> BoxFuture<'_, Result<TokenStream, FetchError>> {
        Box::pin(async move {
            let mut client = self.client(i)?;
            let req = pb::WatchTokenRequest {
                collection: self.spec.collection.clone(),
                after_version,
            };
            // The stream is open once the remote answers with its headers;
            // bound that by the connect timeout plus a little.
            let opened = match tokio::time::timeout(
                self.spec.connect_timeout + Duration::from_secs(1),
                client.watch_token(req),
            )
            .await
            {
                Err(_) => Err(FetchError::new(
                    FailureClass::Connect,
                    "watch not opened in time",
                )),
                Ok(answer) => answer.map_err(|s| classify(&s)),
            };
            // A remote that did not answer in time may hold a dead
            // connection: it is forgotten like a refused one.
            let stream = match opened {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    self.forget(i, &e);
                    return Err(e);
                }
            };
            let tokens = stream.map(|item| match item {
                Ok(resp) => from_pb(resp.token),
                Err(s) => Err(classify(&s)),
            });
            Ok(Box::pin(tokens) as TokenStream)
        })
    }

    fn get(
        &self,
        i: usize,
        min_remaining: Option<Duration>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<RemoteToken, FetchError>> {
        Box::pin(async move {
            let req = pb::GetCollectionTokenRequest {
                collection: self.spec.collection.clone(),
                min_remaining: min_remaining.and_then(|d| prost_types::Duration::try_from(d).ok()),
            };
            self.unary(i, timeout, req, |mut c, req| async move {
                Ok(c.get_collection_token(req).await?.into_inner().token)
            })
            .await
        })
    }

    fn invalidate(
        &self,
        i: usize,
        version: u64,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<RemoteToken, FetchError>> {
        Box::pin(async move {
            let req = pb::InvalidateTokenRequest {
                collection: self.spec.collection.clone(),
                version,
                value: String::new(),
                reason: "a follower was told this version is rejected".to_owned(),
            };
            self.unary(i, timeout, req, |mut c, req| async move {
                Ok(c.invalidate_token(req).await?.into_inner().token)
            })
            .await
        })
    }
}

impl RemoteBroker {
    /// One unary call on endpoint `i` within `timeout` (sent as the call's
    /// deadline too); its channel is forgotten after a connect failure.
    async fn unary<M, F, Fut>(
        &self,
        i: usize,
        timeout: Duration,
        msg: M,
        call: F,
    ) -> Result<RemoteToken, FetchError>
    where
        F: FnOnce(TokenBrokerClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<Option<pb::Token>, Status>>,
    {
        let client = self.client(i)?;
        let mut req = tonic::Request::new(msg);
        req.set_timeout(timeout);
        let result = match tokio::time::timeout(timeout, call(client, req)).await {
            Err(_) => Err(FetchError::new(FailureClass::Timeout, "no answer in time")),
            Ok(Err(s)) => Err(classify(&s)),
            Ok(Ok(token)) => remote_token(token),
        };
        if let Err(e) = &result {
            self.forget(i, e);
        }
        result
    }
}

/// A connector that dials the Unix socket at `path`, whatever URI it is
/// given (tonic's API needs one; the path decides).
pub fn unix_connector(
    path: PathBuf,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl std::future::Future<Output = std::io::Result<TokioIo<tokio::net::UnixStream>>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    })
}

/// A unary answer's token with its `stale` flag.
fn remote_token(t: Option<pb::Token>) -> Result<RemoteToken, FetchError> {
    let stale = t.as_ref().is_some_and(|t| t.stale);
    Ok(RemoteToken {
        token: from_pb(t)?,
        stale,
    })
}

/// A remote's token as this sidecar keeps it, or why it is not one.
pub(super) fn from_pb(t: Option<pb::Token>) -> Result<Token, FetchError> {
    let bad =
        |what: &str| FetchError::new(FailureClass::BadResponse, format!("remote token {what}"));
    let t = t.ok_or_else(|| bad("missing"))?;
    if t.value.is_empty() {
        return Err(bad("has no value"));
    }
    if t.version == 0 {
        return Err(bad("has version 0"));
    }
    let instant = |ts: Option<prost_types::Timestamp>, name: &str| {
        ts.and_then(|ts| SystemTime::try_from(ts).ok())
            .ok_or_else(|| bad(&format!("has no valid {name}")))
    };
    let fetched_at = instant(t.fetched_at, "fetched_at")?;
    let expires_at = instant(t.expires_at, "expires_at")?;
    let refresh_at = instant(t.refresh_at, "refresh_at")?;
    if refresh_at > expires_at || fetched_at > expires_at {
        return Err(bad("has its instants out of order"));
    }
    Ok(Token {
        value: Secret::new(t.value),
        version: t.version,
        fetched_at,
        expires_at,
        refresh_at,
        parent_version: None,
    })
}

/// A status from (or about) a remote broker as a classified failure.
fn classify(s: &Status) -> FetchError {
    use std::error::Error as _;
    let class = match s.code() {
        // No answer from a server at all (a transport failure), or a server
        // going away (shutting down, which sends no pushback): try another.
        Code::Unknown | Code::Cancelled if s.source().is_some() => FailureClass::Connect,
        Code::Unavailable if s.metadata().get("grpc-retry-pushback-ms").is_none() => {
            FailureClass::Connect
        }
        Code::DeadlineExceeded => FailureClass::Timeout,
        Code::NotFound
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::InvalidArgument => FailureClass::Rejected,
        Code::ResourceExhausted => FailureClass::RateLimited,
        _ => FailureClass::UpstreamError,
    };
    // The remote's own class of its upstream's failure, when it says.
    let class = s
        .metadata()
        .get(super::status::FAILURE_CLASS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(FailureClass::parse)
        .unwrap_or(class);

    let mut e = FetchError::new(
        class,
        format!(
            "remote broker answered {:?}: {}",
            s.code(),
            super::convert::Loggable(s.message())
        ),
    );
    e.retry_after = s
        .metadata()
        .get("grpc-retry-pushback-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_token() -> pb::Token {
        let now = SystemTime::now();
        pb::Token {
            collection: "c".into(),
            value: "v".into(),
            version: 3,
            fetched_at: Some(now.into()),
            expires_at: Some((now + Duration::from_secs(60)).into()),
            refresh_at: Some((now + Duration::from_secs(30)).into()),
            stale: false,
        }
    }

    #[test]
    fn a_remote_token_keeps_its_version_and_instants() {
        let p = pb_token();
        let t = from_pb(Some(p.clone())).unwrap();
        assert_eq!(t.version, 3);
        assert_eq!(
            t.expires_at,
            SystemTime::try_from(p.expires_at.unwrap()).unwrap()
        );
        assert_eq!(
            t.refresh_at,
            SystemTime::try_from(p.refresh_at.unwrap()).unwrap()
        );
    }

    #[test]
    fn a_malformed_remote_token_is_an_error_not_a_token() {
        type Breaks = Box<dyn Fn(&mut pb::Token)>;
        let cases: Vec<(&str, Breaks)> = vec![
            ("no value", Box::new(|t| t.value.clear())),
            ("version 0", Box::new(|t| t.version = 0)),
            ("no expiry", Box::new(|t| t.expires_at = None)),
            ("no refresh_at", Box::new(|t| t.refresh_at = None)),
            (
                "refresh after expiry",
                Box::new(|t| std::mem::swap(&mut t.expires_at, &mut t.refresh_at)),
            ),
        ];
        for (what, f) in cases {
            let mut t = pb_token();
            f(&mut t);
            let e = from_pb(Some(t)).unwrap_err();
            assert_eq!(e.class, FailureClass::BadResponse, "{what}");
        }
        assert_eq!(from_pb(None).unwrap_err().class, FailureClass::BadResponse);
    }

    #[test]
    fn statuses_are_classified_and_pushback_kept() {
        assert_eq!(
            classify(&Status::unavailable("shutting down")).class,
            FailureClass::Connect
        );
        let mut s = Status::unavailable("upstream failing");
        s.metadata_mut()
            .insert("grpc-retry-pushback-ms", "1500".parse().unwrap());
        let e = classify(&s);
        assert_eq!(e.class, FailureClass::UpstreamError);
        assert_eq!(e.retry_after, Some(Duration::from_millis(1500)));
        let mut s = Status::failed_precondition("upstream failing");
        s.metadata_mut().insert(
            crate::grpc::status::FAILURE_CLASS_HEADER,
            "invalid_credentials".parse().unwrap(),
        );
        assert_eq!(classify(&s).class, FailureClass::InvalidCredentials);
        assert_eq!(
            classify(&Status::not_found("x")).class,
            FailureClass::Rejected
        );
        assert_eq!(
            classify(&Status::permission_denied("x")).class,
            FailureClass::Rejected
        );
        assert_eq!(
            classify(&Status::deadline_exceeded("x")).class,
            FailureClass::Timeout
        );
    }
}
