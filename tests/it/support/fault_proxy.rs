//! A TCP fault proxy for Postgres faults (no toxiproxy here). It listens on
//! 127.0.0.1:0 and forwards each accepted connection to one target until the
//! test changes its mode:
//!
//! - `cut`: every live connection is closed (both sides) and new ones are closed
//!   as soon as they are accepted;
//! - `blackhole`: no byte moves on live connections, whose sockets stay open (a
//!   dead peer or a partition), and new connections are held open without being
//!   forwarded;
//! - `restore`: new connections are forwarded again. Black-holed connections are
//!   closed, not resumed: bytes were lost, so their streams are inconsistent.
//! - `delay_new`: new connections are accepted at once but forwarded only after
//!   a delay (a server slow to start sessions, as Postgres forking hundreds of
//!   backends at once); live ones are untouched.
//!
//! A mode change is applied by the connection tasks, so it takes effect as soon
//! as they run (from the caller's next `.await` on), not inside the call.
//! Dropping the proxy closes its listener and every connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    Cut,
    Blackhole,
}

/// What the connection tasks watch. `faults` counts `cut` and `blackhole`
/// calls, so that a connection that missed a short fault (the mode was back to
/// `Forward` before its task looked) still knows its stream was disturbed.
#[derive(Clone, Copy, Debug)]
struct State {
    mode: Mode,
    faults: u64,
    /// How long a new connection waits before it is forwarded.
    delay: Duration,
}

pub struct FaultProxy {
    addr: SocketAddr,
    /// Every task waits on a receiver of this; dropping it (with the proxy)
    /// ends them all, so no other handle on the connection tasks is needed.
    state: watch::Sender<State>,
    live: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards each accepted connection to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, watching) = watch::channel(State {
            mode: Mode::Forward,
            faults: 0,
            delay: Duration::ZERO,
        });
        let live = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(accept_loop(listener, target, watching, live.clone()));
        FaultProxy {
            addr,
            state,
            live,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every live connection now (both sides) and refuses new ones
    /// (accept, then close at once) until `restore`.
    pub fn cut(&self) {
        self.fault(Mode::Cut);
    }

    /// Stops forwarding bytes on live connections (they hang, as with a dead
    /// peer or a partition) and holds new connections open without connecting
    /// to the target, until `restore`.
    pub fn blackhole(&self) {
        self.fault(Mode::Blackhole);
    }

    /// Forwards new connections again; connections that were black-holed are
    /// closed (their streams are no longer consistent).
    pub fn restore(&self) {
        self.state.send_modify(|s| s.mode = Mode::Forward);
    }

    /// Forwards each connection accepted from now on only after `delay`
    /// (`Duration::ZERO` ends it). Not a fault: live connections go on.
    pub fn delay_new(&self, delay: Duration) {
        self.state.send_modify(|s| s.delay = delay);
    }

    /// Connections whose target side is open: forwarding, or stalled by
    /// `blackhole`. Connections held during a black hole were never forwarded
    /// and are not counted.
    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    fn fault(&self, mode: Mode) {
        self.state.send_modify(|s| {
            s.mode = mode;
            s.faults += 1;
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The listener goes with the accept task; the connection tasks see the
        // sender (a field, dropped next) go and close their sockets.
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    state: watch::Receiver<State>,
    live: Arc<AtomicUsize>,
) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(connection(client, target, state.clone(), live.clone()));
            }
            // Out of file descriptors, or the like: wait rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The target side of a forwarded connection, counted while it is open.
struct Upstream {
    stream: TcpStream,
    live: Arc<AtomicUsize>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One accepted connection, in the mode current when its task starts. Sockets
/// are closed by dropping them when the task returns.
async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    mut state: watch::Receiver<State>,
    live: Arc<AtomicUsize>,
) {
    let start = *state.borrow_and_update();
    match start.mode {
        Mode::Cut => return,
        Mode::Blackhole => return while_blackholed(&mut state).await,
        Mode::Forward => {}
    }
    if !start.delay.is_zero() {
        tokio::time::sleep(start.delay).await;
    }
    // Both sockets live out here, not in the forwarding future, so that a
    // black hole can stop the copying and still keep them open.
    let mut upstream = None;
    let fault = tokio::select! {
        _ = forward(&mut client, &mut upstream, target, &live) => return,
        fault = next_fault(&mut state, start.faults) => fault,
    };
    if fault == Mode::Blackhole {
        while_blackholed(&mut state).await;
    }
}

/// Connects to the target and copies both ways until both sides are done or
/// one fails.
async fn forward(
    client: &mut TcpStream,
    upstream: &mut Option<Upstream>,
    target: SocketAddr,
    live: &Arc<AtomicUsize>,
) {
    let Ok(stream) = TcpStream::connect(target).await else {
        return;
    };
    live.fetch_add(1, Ordering::SeqCst);
    let upstream = upstream.insert(Upstream {
        stream,
        live: live.clone(),
    });
    let _ = copy_bidirectional(client, &mut upstream.stream).await;
}

/// Waits for the first fault after the `faults` a connection started with:
/// `Blackhole` if the proxy is black-holed now, else `Cut` (cut, or black-holed
/// and already restored, or the proxy is gone): close.
async fn next_fault(state: &mut watch::Receiver<State>, faults: u64) -> Mode {
    loop {
        if state.changed().await.is_err() {
            return Mode::Cut;
        }
        let now = *state.borrow_and_update();
        if now.faults != faults {
            return match now.mode {
                Mode::Blackhole => Mode::Blackhole,
                Mode::Forward | Mode::Cut => Mode::Cut,
            };
        }
    }
}

/// Returns once the proxy leaves `Blackhole` (restored, cut, or gone).
async fn while_blackholed(state: &mut watch::Receiver<State>) {
    loop {
        if state.changed().await.is_err() || state.borrow_and_update().mode != Mode::Blackhole {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Self-tests, against an echo server
// ---------------------------------------------------------------------------

mod selftest {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::{Instant, sleep, timeout};

    use super::FaultProxy;

    /// Long enough for anything that should happen on loopback.
    const T: Duration = Duration::from_secs(5);
    /// How long "nothing arrives" is watched for.
    const SILENCE: Duration = Duration::from_millis(300);

    /// A server on 127.0.0.1:0 that writes back whatever it reads.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn assert_echoes(stream: &mut TcpStream, msg: &[u8]) {
        stream.write_all(msg).await.unwrap();
        let mut back = vec![0; msg.len()];
        timeout(T, stream.read_exact(&mut back))
            .await
            .expect("the echo arrives")
            .unwrap();
        assert_eq!(back, msg);
    }

    /// The proxy closed the stream: a read ends (EOF or reset) without data.
    async fn assert_closed(stream: &mut TcpStream) {
        let mut buf = [0; 64];
        match timeout(T, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(n)) => panic!("read {n} bytes from a connection that should be closed"),
            Err(_) => panic!("the connection is still open after {T:?}"),
        }
    }

    /// Nothing arrives, and the stream is not closed either, for `SILENCE`.
    async fn assert_silent(stream: &mut TcpStream) {
        let mut buf = [0; 64];
        if let Ok(read) = timeout(SILENCE, stream.read(&mut buf)).await {
            panic!("expected silence, the read returned {read:?}");
        }
    }

    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + T;
        while !cond() {
            assert!(Instant::now() < deadline, "not within {T:?}: {what}");
            sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn forwards_both_ways_and_counts_live_connections() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_echoes(&mut a, b"first").await;
        assert_echoes(&mut b, b"second").await;
        assert_echoes(&mut a, b"again").await;
        assert_eq!(proxy.live_connections(), 2);
        drop(a);
        eventually("a closed client is no longer live", || {
            proxy.live_connections() == 1
        })
        .await;
        assert_echoes(&mut b, b"still").await;
    }

    #[tokio::test]
    async fn cut_closes_live_connections_and_refuses_new_ones_until_restore() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_echoes(&mut live, b"before").await;

        proxy.cut();
        assert_closed(&mut live).await;
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_closed(&mut refused).await;
        eventually("no live connection after a cut", || {
            proxy.live_connections() == 0
        })
        .await;

        proxy.restore();
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_echoes(&mut fresh, b"after").await;
        assert_eq!(proxy.live_connections(), 1);
    }

    #[tokio::test]
    async fn blackhole_stalls_connections_and_restore_closes_them() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_echoes(&mut live, b"before").await;

        proxy.blackhole();
        live.write_all(b"lost").await.unwrap();
        assert_silent(&mut live).await;
        let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
        held.write_all(b"held").await.unwrap();
        assert_silent(&mut held).await;
        assert_eq!(
            proxy.live_connections(),
            1,
            "stalled, not closed; held is not forwarded"
        );

        proxy.restore();
        assert_closed(&mut live).await;
        assert_closed(&mut held).await;
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_echoes(&mut fresh, b"after").await;
        eventually("only the new connection is live", || {
            proxy.live_connections() == 1
        })
        .await;
    }

    #[tokio::test]
    async fn a_short_blackhole_still_closes_the_connections_it_touched() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_echoes(&mut live, b"before").await;
        // No await in between: the connection's task sees only the restored state.
        proxy.blackhole();
        proxy.restore();
        assert_closed(&mut live).await;
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections_and_listener() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let addr = proxy.addr();
        let mut live = TcpStream::connect(addr).await.unwrap();
        assert_echoes(&mut live, b"before").await;
        drop(proxy);
        assert_closed(&mut live).await;
        let deadline = Instant::now() + T;
        while TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "the listener is still open");
            sleep(Duration::from_millis(10)).await;
        }
    }
}
