//! A TCP proxy for network faults between a client and a Redis server.
//!
//! [`Proxy::start`] listens on a free loopback port and forwards every connection to an
//! upstream address (a [`RedisServer::addr`](crate::RedisServer::addr)). The test then
//! breaks the link in the ways a network does: [`Proxy::cut`] (connections reset, new ones
//! refused), [`Proxy::blackhole`] (a partition that sends nothing back, not even a reset),
//! [`Proxy::delay`] (latency on every chunk, both ways), and [`Proxy::restore`].
//!
//! The proxy runs on a thread of its own with a one-thread tokio runtime, so blocking tests
//! and async tests (on any runtime flavour) use it alike; dropping the handle stops it and
//! closes every connection.
//!
//! ```no_run
//! let server = testkit::RedisServer::start();
//! let proxy = testkit::Proxy::start(server.addr());
//! // Give `proxy.url()` to the client under test instead of `server.url()`.
//! proxy.blackhole();          // the client's commands now go nowhere
//! proxy.restore();
//! ```

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Cut,
    Blackhole,
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    mode: Mode,
    delay: Duration,
    /// How many cuts so far: a connection open at a cut closes even if it sees the state
    /// only after a `restore` that followed at once (a watch shows only the latest value).
    cuts: u64,
}

/// A TCP proxy on `127.0.0.1` in front of one upstream address, with switchable faults.
/// Stopped (every connection closed) when dropped.
pub struct Proxy {
    port: u16,
    upstream: SocketAddr,
    state: watch::Sender<State>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("port", &self.port)
            .field("upstream", &self.upstream)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Proxy {
    /// Starts forwarding a free loopback port to `upstream`. Connections to the upstream are
    /// made when a client connects, one upstream connection per client connection.
    ///
    /// # Panics
    /// If no loopback port can be bound or the proxy's thread cannot start.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("bind a loopback port for the proxy");
        listener
            .set_nonblocking(true)
            .expect("make the proxy's listener non-blocking");
        let port = listener.local_addr().expect("proxy's local address").port();
        let (state, rx) = watch::channel(State {
            mode: Mode::Forward,
            delay: Duration::ZERO,
            cuts: 0,
        });
        let thread = std::thread::Builder::new()
            .name(format!("testkit-proxy-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the proxy's runtime");
                rt.block_on(accept_loop(listener, port, upstream, rx));
                // Dropping the runtime cancels every connection task: their sockets close.
            })
            .expect("start the proxy's thread");
        Proxy {
            port,
            upstream,
            state,
            thread: Some(thread),
        }
    }

    /// The loopback port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `redis://127.0.0.1:PORT`: the proxy's URL for a Redis client.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Closes every open connection now (with a reset where the platform allows it, else a
    /// plain close: the client reads an error or EOF) and refuses new connections (the
    /// listening socket is closed) until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.state.send_modify(|s| {
            s.mode = Mode::Cut;
            s.cuts += 1;
        });
    }

    /// A partition that sends nothing back: open connections stay open, but nothing is
    /// forwarded in either direction (bytes that arrive meanwhile, or were waiting out a
    /// [`delay`](Self::delay), are dropped), and new connections are not accepted (they wait
    /// in the kernel's backlog: a connect may complete, but nothing answers). No reset, no
    /// EOF: only the client's own timeouts notice. [`restore`](Self::restore) ends it; a
    /// connection that lost bytes is then reset (a TCP stream cannot go on with a hole in
    /// it: the client would match later replies to requests that never arrived), one that
    /// lost nothing carries on.
    pub fn blackhole(&self) {
        self.set_mode(Mode::Blackhole);
    }

    /// Adds `latency` to every chunk forwarded, in both directions, from now on (a chunk
    /// is delayed from when the proxy read it; chunks stay in order). `Duration::ZERO`: none.
    /// Independent of [`cut`](Self::cut) and [`blackhole`](Self::blackhole), and kept by
    /// [`restore`](Self::restore).
    pub fn delay(&self, latency: Duration) {
        self.state.send_modify(|s| s.delay = latency);
    }

    /// Forwards and accepts again after [`cut`](Self::cut) or [`blackhole`](Self::blackhole)
    /// (after a cut, the listening socket is bound again on the same port).
    pub fn restore(&self) {
        self.set_mode(Mode::Forward);
    }

    fn set_mode(&self, mode: Mode) {
        self.state.send_modify(|s| s.mode = mode);
    }
}

impl Drop for Proxy {
    /// Stops the proxy: its thread ends and every connection is closed.
    fn drop(&mut self) {
        self.set_mode(Mode::Stopped);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    port: u16,
    upstream: SocketAddr,
    mut rx: watch::Receiver<State>,
) {
    let mut listener = Some(TcpListener::from_std(listener).expect("register the listener"));
    loop {
        let mode = rx.borrow_and_update().mode;
        match mode {
            Mode::Stopped => return,
            Mode::Cut => {
                // Refuse new connections: close the listening socket until restored.
                listener = None;
                if rx.changed().await.is_err() {
                    return;
                }
            }
            Mode::Blackhole => {
                // Keep the socket (connects wait in the backlog) but accept nothing.
                if rx.changed().await.is_err() {
                    return;
                }
            }
            Mode::Forward => {
                let Some(l) = listener.as_ref() else {
                    // Rebind the same port after a cut (tokio sets SO_REUSEADDR).
                    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
                        Ok(l) => listener = Some(l),
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                    continue;
                };
                tokio::select! {
                    accepted = l.accept() => {
                        if let Ok((client, _)) = accepted {
                            tokio::spawn(connection(client, upstream, rx.clone()));
                        }
                    }
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// One client connection: connect upstream, pump both ways until either side closes or the
/// proxy is cut or stopped.
async fn connection(client: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<State>) {
    let _ = client.set_nodelay(true);
    let born = rx.borrow().cuts;
    let dead = move |s: &State| matches!(s.mode, Mode::Cut | Mode::Stopped) || s.cuts != born;
    let server = tokio::select! {
        s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)) => s,
        _ = rx.wait_for(dead) => {
            reset(&client);
            return;
        }
    };
    let Ok(Ok(server)) = server else {
        reset(&client);
        return;
    };
    let _ = server.set_nodelay(true);
    let (client, server) = (Arc::new(client), Arc::new(server));
    // Set once a blackhole dropped bytes of this connection: its streams have a hole.
    let lost = Arc::new(AtomicBool::new(false));
    let (up, down) = (rx.clone(), rx.clone());
    let pumps = async {
        // Either direction ending (EOF, an error, or a hole) ends the connection.
        tokio::select! {
            _ = pump(client.clone(), server.clone(), up, lost.clone()) => {}
            _ = pump(server.clone(), client.clone(), down, lost.clone()) => {}
        }
    };
    // A TCP stream cannot go on after a hole (the client would match later replies to the
    // requests that were dropped): once forwarding resumes, such a connection is reset, as
    // a real one is when the partition outlasts its retransmissions.
    let ends = async {
        loop {
            if rx.changed().await.is_err() {
                return;
            }
            let state = *rx.borrow();
            if dead(&state) || (state.mode == Mode::Forward && lost.load(Ordering::SeqCst)) {
                return;
            }
        }
    };
    tokio::select! {
        _ = pumps => {}
        _ = ends => {}
    }
    reset(&client);
    reset(&server);
}

/// Makes the socket's close a reset (SO_LINGER 0) rather than an orderly FIN.
#[allow(deprecated)] // SO_LINGER 0 does not block on close: it resets.
fn reset(stream: &TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
}

/// Forwards `from` to `to`: a reader stamps each chunk with when it may go out, a writer
/// sends it then, unless the proxy is a blackhole by that time.
async fn pump(
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    rx: watch::Receiver<State>,
    lost: Arc<AtomicBool>,
) {
    let (tx, mut queue) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let (reader_rx, reader_lost) = (rx.clone(), lost.clone());
    let reader = async move {
        let (rx, lost) = (reader_rx, reader_lost);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if from.readable().await.is_err() {
                return;
            }
            match from.try_read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let state = *rx.borrow();
                    if state.mode == Mode::Blackhole {
                        lost.store(true, Ordering::SeqCst);
                        continue;
                    }
                    if lost.load(Ordering::SeqCst) {
                        return;
                    }
                    if tx
                        .send((Instant::now() + state.delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
        // `tx` drops here: the writer ends once the queue is empty.
    };
    let writer = async {
        while let Some((at, data)) = queue.recv().await {
            tokio::time::sleep_until(at).await;
            if rx.borrow().mode == Mode::Blackhole {
                lost.store(true, Ordering::SeqCst);
                continue;
            }
            if lost.load(Ordering::SeqCst) {
                return;
            }
            let mut sent = 0;
            while sent < data.len() {
                if to.writable().await.is_err() {
                    return;
                }
                match to.try_write(&data[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                }
            }
        }
    };
    // The reader ending (EOF) ends the pump once what it read has gone out.
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RedisServer;
    use std::io::{Read, Write};
    use std::net::TcpStream as StdStream;

    fn connect(proxy: &Proxy) -> std::io::Result<StdStream> {
        let s = StdStream::connect_timeout(&proxy.addr(), Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(s)
    }

    /// Sends PING and reads the reply: `Ok(true)` for `+PONG`, `Ok(false)` for EOF.
    fn ping(stream: &mut StdStream) -> std::io::Result<bool> {
        stream.write_all(b"PING\r\n")?;
        let mut buf = [0u8; 7];
        let mut got = 0;
        while got < buf.len() {
            match stream.read(&mut buf[got..])? {
                0 => return Ok(false),
                n => got += n,
            }
        }
        Ok(&buf == b"+PONG\r\n")
    }

    #[test]
    fn forwards_to_redis() {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.addr());
        assert_ne!(proxy.port(), server.port());
        assert_eq!(proxy.url(), format!("redis://127.0.0.1:{}", proxy.port()));
        let mut s = connect(&proxy).unwrap();
        for _ in 0..3 {
            assert!(ping(&mut s).unwrap());
        }
        // The connection goes through: Redis sees it as a client.
        assert!(server.command(&["CLIENT", "LIST"]).matches("id=").count() >= 2);
    }

    #[test]
    fn cut_closes_connections_and_refuses_new_ones_until_restored() {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.addr());
        let mut s = connect(&proxy).unwrap();
        assert!(ping(&mut s).unwrap());
        proxy.cut();
        std::thread::sleep(Duration::from_millis(100));
        // Reset or EOF, never an answer.
        assert!(!matches!(ping(&mut s), Ok(true)));
        let refused = connect(&proxy).and_then(|mut s| ping(&mut s));
        assert!(!matches!(refused, Ok(true)), "{refused:?}");
        proxy.restore();
        let mut ok = false;
        for _ in 0..100 {
            if let Ok(mut s) = connect(&proxy)
                && matches!(ping(&mut s), Ok(true))
            {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(ok, "no connection after restore");
    }

    /// A cut and an immediate restore still close every connection open at the cut (the
    /// proxy's tasks may see only the restored state).
    #[test]
    fn a_cut_restored_at_once_still_closes_open_connections() {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.addr());
        let mut conns: Vec<_> = (0..20).map(|_| connect(&proxy).unwrap()).collect();
        for s in &mut conns {
            assert!(ping(s).unwrap());
        }
        proxy.cut();
        proxy.restore();
        std::thread::sleep(Duration::from_millis(100));
        for s in &mut conns {
            assert!(
                !matches!(ping(s), Ok(true)),
                "a connection outlived the cut"
            );
        }
    }

    #[test]
    fn blackhole_forwards_nothing_without_closing_and_restore_resumes() {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.addr());
        let mut s = connect(&proxy).unwrap();
        let mut idle = connect(&proxy).unwrap();
        assert!(ping(&mut s).unwrap());
        assert!(ping(&mut idle).unwrap());
        proxy.blackhole();
        std::thread::sleep(Duration::from_millis(50));
        let err = ping(&mut s).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "a timeout, not a reset or EOF: {err:?}"
        );
        // A new connection is not served either.
        if let Ok(mut n) = connect(&proxy) {
            assert!(ping(&mut n).is_err(), "a new connection was served");
        }
        proxy.restore();
        std::thread::sleep(Duration::from_millis(50));
        // The connection whose PING was dropped is reset; the one that sent nothing goes on.
        assert!(!matches!(ping(&mut s), Ok(true)));
        assert!(ping(&mut idle).unwrap());
        let mut n = connect(&proxy).unwrap();
        assert!(ping(&mut n).unwrap());
    }

    #[test]
    fn delay_adds_latency_both_ways() {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.addr());
        let mut s = connect(&proxy).unwrap();
        assert!(ping(&mut s).unwrap());
        proxy.delay(Duration::from_millis(100));
        let start = std::time::Instant::now();
        assert!(ping(&mut s).unwrap());
        let rtt = start.elapsed();
        assert!(rtt >= Duration::from_millis(200), "{rtt:?}");
        assert!(rtt < Duration::from_millis(450), "{rtt:?}");
        proxy.delay(Duration::ZERO);
        let start = std::time::Instant::now();
        assert!(ping(&mut s).unwrap());
        assert!(start.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn drop_stops_the_proxy() {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.addr());
        let addr = proxy.addr();
        let mut s = connect(&proxy).unwrap();
        assert!(ping(&mut s).unwrap());
        drop(proxy);
        assert!(!matches!(ping(&mut s), Ok(true)));
        assert!(StdStream::connect_timeout(&addr, Duration::from_millis(200)).is_err());
    }
}
