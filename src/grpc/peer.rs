//! Who is calling: the connections the token API accepts, and the caller
//! identities each one carries.
//!
//! Contract:
//! - [`accept`] turns a bound [`Listener`] into the connections tonic serves.
//!   TCP connections keep `TCP_NODELAY`. With TLS, each handshake runs in its
//!   own task bounded by [`HANDSHAKE_TIMEOUT`], so a slow or silent client
//!   never holds up the next accept; a failed handshake is dropped (debug
//!   log), and each handshake takes the material in force at its start (see
//!   [`crate::tls::Reloader`]). It returns once `shutdown` is cancelled or
//!   the server stops taking connections.
//! - Every connection carries a [`Caller`] (tonic's `Connected`), which the
//!   service reads from the request's extensions: over TLS the identities of
//!   the verified client certificate ([`crate::tls::identities`]); over a
//!   Unix socket the peer's `uid:<n>` and `gid:<n>` from the kernel; over
//!   plain TCP none (anonymous). A caller never names itself: identities
//!   come only from the kernel or a certificate the configured CA verified.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::listen::Listener;

/// How long a client gets to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The identities of the peer of one connection; anonymous when empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    identities: Arc<[String]>,
}

impl Caller {
    pub fn new(identities: Vec<String>) -> Self {
        Self {
            identities: identities.into(),
        }
    }

    /// The identities, in the order the certificate or kernel gave them.
    pub fn identities(&self) -> &[String] {
        &self.identities
    }
}

/// `anonymous`, or the identities separated by commas (for logs).
impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.identities.is_empty() {
            return f.write_str("anonymous");
        }
        for (i, id) in self.identities.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", id.escape_debug())?;
        }
        Ok(())
    }
}

/// One accepted connection, with its caller.
pub struct PeerStream {
    io: Io,
    caller: Caller,
}

enum Io {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl Connected for PeerStream {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

// Every variant is `Unpin`, so each poll pins the inner stream in place.
macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            Io::Tcp($s) => $e,
            Io::Tls($s) => $e,
            Io::Unix($s) => $e,
        }
    };
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// The TLS material each handshake takes, `None` for plain TCP.
pub type Tls = Option<watch::Receiver<Arc<rustls::ServerConfig>>>;

/// Accepts connections on `listener` into `out` until `shutdown` or until
/// `out` is closed (see the module doc).
pub async fn accept(
    listener: Listener,
    tls: Tls,
    out: mpsc::Sender<io::Result<PeerStream>>,
    shutdown: CancellationToken,
) {
    // Handshakes in flight; aborted when the loop ends.
    let mut handshakes = JoinSet::new();
    let (tcp, unix) = match listener {
        Listener::Tcp(l) => (Some(l), None),
        Listener::Unix(l, file) => (None, Some((l, file))),
    };
    loop {
        while handshakes.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            () = out.closed() => return,
            a = next(tcp.as_ref(), unix.as_ref().map(|(l, _)| l)) => a,
        };
        let stream = match accepted {
            Ok(Accepted::Tcp(s)) => {
                if let Err(e) = s.set_nodelay(true) {
                    debug!(error = %e, "cannot set TCP_NODELAY");
                }
                match &tls {
                    None => PeerStream {
                        io: Io::Tcp(s),
                        caller: Caller::default(),
                    },
                    Some(config) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(config.borrow().clone());
                        let out = out.clone();
                        handshakes.spawn(async move {
                            if let Some(stream) = handshake(acceptor, s).await {
                                let _ = out.send(Ok(stream)).await;
                            }
                        });
                        continue;
                    }
                }
            }
            Ok(Accepted::Unix(s)) => {
                let caller = match s.peer_cred() {
                    Ok(cred) => Caller::new(vec![
                        format!("uid:{}", cred.uid()),
                        format!("gid:{}", cred.gid()),
                    ]),
                    Err(e) => {
                        debug!(error = %e, "no peer credentials; the caller is anonymous");
                        Caller::default()
                    }
                };
                PeerStream {
                    io: Io::Unix(s),
                    caller,
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: do not spin.
                warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if out.send(Ok(stream)).await.is_err() {
            return;
        }
    }
}

enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn next(
    tcp: Option<&tokio::net::TcpListener>,
    unix: Option<&tokio::net::UnixListener>,
) -> io::Result<Accepted> {
    match (tcp, unix) {
        (Some(l), _) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        (None, Some(l)) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        (None, None) => std::future::pending().await,
    }
}

/// One TLS handshake, bounded; the caller is who the verified certificate
/// names.
async fn handshake(acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream) -> Option<PeerStream> {
    let peer = tcp.peer_addr().ok();
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(peer = ?peer, error = %e, "tls handshake failed");
            return None;
        }
        Err(_) => {
            debug!(peer = ?peer, "tls handshake timed out");
            return None;
        }
    };
    let caller = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| Caller::new(crate::tls::identities(leaf)))
        .unwrap_or_default();
    Some(PeerStream {
        io: Io::Tls(Box::new(tls)),
        caller,
    })
}
