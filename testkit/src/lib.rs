//! Real `redis-server` processes for tests, benches and the demo.
//!
//! Every test that needs Redis starts its own server with [`RedisServer::start`]: a private
//! `redis-server` on a free loopback port, with persistence off and its own temp dir. It is killed
//! when the handle drops. Fault tests use [`RedisServer::pause`] (SIGSTOP), [`RedisServer::resume`]
//! (SIGCONT), [`RedisServer::kill`] and [`RedisServer::restart`] (same port, empty data).
//! Network faults between a client and a server go through a [`Proxy`] (cut, blackhole, delay).
//!
//! Not for: production use, or talking to Redis beyond the few raw commands fault tests need
//! ([`RedisServer::command`]); tests use the `redis` crate or the library itself for that.
//! This crate never touches the machine's shared server on port 6379.
//!
//! The binary is `redis-server` from `PATH`, or the one named by `REDIS_SERVER_BIN`.
//!
//! ```no_run
//! let mut server = testkit::RedisServer::start();
//! println!("test redis at {}", server.url());
//! server.pause();   // the server now accepts connections but never answers
//! server.resume();
//! ```

pub mod cluster;
pub mod coherence;
pub mod proxy;
pub mod tls;

pub use cluster::RedisCluster;
pub use proxy::Proxy;
pub use tls::{TestCa, TlsRedis};

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the `redis-server` binary to use instead of the one on `PATH`.
pub const SERVER_BIN_ENV: &str = "REDIS_SERVER_BIN";

/// How long [`RedisServer::start`] waits for the server to answer PING.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A private `redis-server` process on `127.0.0.1`, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    bin: String,
    extra_args: Vec<String>,
    paused: bool,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("paused", &self.paused)
            .finish()
    }
}

impl RedisServer {
    /// Starts a server with the default settings (no persistence, loopback only).
    ///
    /// # Panics
    /// If `redis-server` is not installed (the message says how to install it), or if the server
    /// does not answer PING within [`START_TIMEOUT`] (the message carries the server's log).
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Starts a server with extra `redis-server` arguments, such as
    /// `["--maxmemory", "2mb"]`. They are kept for [`restart`](Self::restart).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_with_args(args: &[&str]) -> Self {
        let bin = std::env::var(SERVER_BIN_ENV).unwrap_or_else(|_| "redis-server".to_string());
        let mut server = Self::unstarted(&bin, args);
        // A free port found by binding :0 can be taken by someone else before redis binds it;
        // try a few ports before giving up.
        let mut last_err = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => last_err = e,
            }
        }
        panic!("{last_err}");
    }

    fn unstarted(bin: &str, args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("testkit-redis-")
            .tempdir()
            .expect("create a temp dir for redis-server");
        RedisServer {
            child: None,
            port: 0,
            dir,
            bin: bin.to_string(),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            paused: false,
        }
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The socket address of the server.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the process with SIGSTOP: TCP connects still succeed but nothing is answered.
    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    /// Continues a paused process with SIGCONT.
    pub fn resume(&mut self) {
        self.signal("-CONT");
        self.paused = false;
    }

    /// Kills the process with SIGKILL and waits for it. The port is free afterwards.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// Kills the server (if running) and starts a fresh one on the same port, with no data.
    ///
    /// # Panics
    /// If the new server does not answer PING within [`START_TIMEOUT`].
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn_and_wait() {
            panic!("{e}");
        }
    }

    /// Sends one command with a raw connection and returns the reply as text
    /// (`+OK` → `OK`, `:5` → `5`, bulk strings as their text, arrays joined by newlines,
    /// errors prefixed with `ERR:`). For fault injection such as
    /// `["CLIENT", "KILL", "TYPE", "pubsub"]` without a client library.
    ///
    /// # Panics
    /// If the server cannot be reached within 5 s.
    pub fn command(&self, args: &[&str]) -> String {
        command_at(self.addr(), args)
    }

    /// A numeric field of `INFO section` (`used_memory` of `memory`, `evicted_keys` of
    /// `stats`), or 0 if the server does not report it.
    pub fn info_u64(&self, section: &str, field: &str) -> u64 {
        let prefix = format!("{field}:");
        self.command(&["INFO", section])
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("redis-server is not running");
        let status = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid} failed");
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let bin = &self.bin;
        let mut cmd = Command::new(bin);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`{bin}` was not found. The tests need a real Redis server: install it with \
                 `sudo apt-get install -y redis-server` (Debian/Ubuntu) or `brew install redis` \
                 (macOS), or set {SERVER_BIN_ENV} to the path of a redis-server binary."
            ),
            Err(e) => panic!("could not start `{bin}`: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.ping() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited with {status} before answering PING. Its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?}. Its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends one command to the Redis server at `addr` and returns its reply as
/// [`RedisServer::command`] does: for helper processes that were only given the address.
///
/// # Panics
/// If the server cannot be reached within 5 s.
pub fn command_at(addr: SocketAddr, args: &[&str]) -> String {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to test redis");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set read timeout");
    stream.write_all(&encode_command(args)).expect("send");
    let mut reader = BufReader::new(stream);
    read_reply(&mut reader).expect("read reply")
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_reply(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(1.min(line.len()));
    Ok(match kind {
        "+" | ":" => rest.to_string(),
        "-" => format!("ERR:{rest}"),
        "$" => {
            let n: i64 = rest.parse().unwrap_or(-1);
            if n < 0 {
                String::new()
            } else {
                let mut buf = vec![0u8; n as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                String::from_utf8_lossy(&buf).into_owned()
            }
        }
        "*" => {
            let n: i64 = rest.parse().unwrap_or(0);
            let mut items = Vec::new();
            for _ in 0..n.max(0) {
                items.push(read_reply(r)?);
            }
            items.join("\n")
        }
        _ => line.to_string(),
    })
}

/// Polls `check` every 10 ms until it holds, for at most `within`.
///
/// # Panics
/// With `what` (and how long it waited) if `check` never held: a test's assertion.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// As [`eventually`], for a check that does not await, from code outside a runtime (it
/// sleeps the thread).
///
/// # Panics
/// As [`eventually`].
pub fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_pauses_and_restarts_on_the_same_port() {
        let mut server = RedisServer::start();
        assert_ne!(server.port(), 6379);
        assert_eq!(server.command(&["SET", "k", "v"]), "OK");
        assert_eq!(server.command(&["GET", "k"]), "v");
        assert_eq!(server.command(&["CONFIG", "GET", "save"]), "save\n");

        server.pause();
        assert!(!server.ping(), "a stopped server must not answer");
        server.resume();
        assert!(server.ping());

        let port = server.port();
        server.restart();
        assert_eq!(server.port(), port);
        assert_eq!(server.command(&["GET", "k"]), "", "a restart starts empty");
    }

    #[test]
    fn kill_frees_the_port() {
        let mut server = RedisServer::start();
        server.kill();
        assert!(!server.ping());
        assert!(server.pid().is_none());
    }

    #[test]
    fn extra_args_apply_and_survive_restart() {
        let mut server = RedisServer::start_with_args(&["--maxmemory", "2mb"]);
        assert_eq!(
            server.command(&["CONFIG", "GET", "maxmemory"]),
            "maxmemory\n2097152"
        );
        server.restart();
        assert_eq!(
            server.command(&["CONFIG", "GET", "maxmemory"]),
            "maxmemory\n2097152"
        );
    }

    #[test]
    #[should_panic(expected = "apt-get install -y redis-server")]
    fn missing_binary_says_how_to_install() {
        let mut server = RedisServer::unstarted("/nonexistent/redis-server", &[]);
        server.port = free_port();
        let _ = server.spawn_and_wait();
    }
}
