//! The connection to Redis: one multiplexed connection that reconnects by itself, with a
//! timeout on every command.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::IntoConnectionInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::{Error, Result};

/// The default timeout for one command: 250 ms.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
/// The default timeout for establishing a connection: 1 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection to one Redis server, shared by every store and cache built on it.
///
/// Cheap to clone: clones share one multiplexed TCP connection (with `TCP_NODELAY`), which
/// reconnects by itself after the server restarts. Every command is bounded by
/// [`ConnectionBuilder::timeout`]: a stopped or unreachable Redis gives [`Error::Timeout`],
/// never a hang.
///
/// ```no_run
/// # async fn f() -> l2::Result<()> {
/// let conn = l2::Connection::builder("redis://127.0.0.1:6379")
///     .timeout(std::time::Duration::from_millis(100))
///     .connect()
///     .await?;
/// conn.ping().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connection {
    manager: ConnectionManager,
    timeout: Duration,
    // Kept to open the subscriber connection of the same server; never printed.
    pub(crate) settings: Arc<Settings>,
}

/// What a connection was made from, for opening more connections to the same server.
pub(crate) struct Settings {
    pub(crate) info: redis::ConnectionInfo,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_reconnect_delay: Duration,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may carry a password.
        f.debug_struct("Connection")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Builder for [`Connection`].
#[derive(Clone)]
pub struct ConnectionBuilder {
    url: String,
    timeout: Duration,
    connect_timeout: Duration,
    max_reconnect_delay: Duration,
}

impl fmt::Debug for ConnectionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionBuilder")
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_reconnect_delay", &self.max_reconnect_delay)
            .finish_non_exhaustive()
    }
}

impl ConnectionBuilder {
    /// The timeout of each command, from sending it to its reply. Default: 250 ms.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The timeout of each connection attempt. Default: 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest pause between reconnection attempts (they back off exponentially from
    /// 100 ms). Default: 1 s.
    pub fn max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.max_reconnect_delay = delay;
        self
    }

    /// Connects. Fails within about three connect timeouts when Redis is unreachable.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad URL, [`Error::Timeout`] or [`Error::Redis`] when Redis
    /// cannot be reached.
    pub async fn connect(self) -> Result<Connection> {
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| Error::Config(format!("bad redis URL: {}", e.kind_name())))?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let settings = Arc::new(Settings {
            info: info.clone(),
            connect_timeout: self.connect_timeout,
            max_reconnect_delay: self.max_reconnect_delay,
        });
        let client = redis::Client::open(info).map_err(|e| Error::Config(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.timeout))
            .set_connection_timeout(Some(self.connect_timeout))
            .set_number_of_retries(2)
            .set_max_delay(self.max_reconnect_delay);
        let bound = self.connect_timeout * 3 + Duration::from_millis(500);
        let manager =
            tokio::time::timeout(bound, client.get_connection_manager_with_config(config))
                .await
                .map_err(|_| Error::Timeout {
                    op: "connect",
                    after: bound,
                })?
                .map_err(|e| Error::redis("connect", e))?;
        Ok(Connection {
            manager,
            timeout: self.timeout,
            settings,
        })
    }
}

trait KindName {
    fn kind_name(&self) -> String;
}

impl KindName for redis::RedisError {
    // The error's text can echo the URL, password included; keep only its kind.
    fn kind_name(&self) -> String {
        format!("{:?}", self.kind())
    }
}

impl Connection {
    /// A builder for a connection to `url` (`redis://[user:password@]host:port[/db]`).
    pub fn builder(url: impl Into<String>) -> ConnectionBuilder {
        ConnectionBuilder {
            url: url.into(),
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_reconnect_delay: Duration::from_secs(1),
        }
    }

    /// Connects to `url` with the default settings.
    ///
    /// # Errors
    /// As [`ConnectionBuilder::connect`].
    pub async fn connect(url: impl Into<String>) -> Result<Connection> {
        Self::builder(url).connect().await
    }

    /// The timeout of each command.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends PING and returns the round-trip time.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`] when Redis does not answer.
    pub async fn ping(&self) -> Result<Duration> {
        let start = tokio::time::Instant::now();
        let _: String = self.query("ping", &redis::cmd("PING")).await?;
        Ok(start.elapsed())
    }

    /// Runs one command, bounded by the timeout.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        let mut conn = self.manager.clone();
        self.bounded(op, async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Runs a pipeline (one round trip), bounded by the timeout.
    pub(crate) async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        pipe: &redis::Pipeline,
    ) -> Result<T> {
        let mut conn = self.manager.clone();
        self.bounded(op, async move { pipe.query_async(&mut conn).await })
            .await
    }

    /// Runs a Lua script (EVALSHA, loading it on NOSCRIPT), bounded by the timeout.
    pub(crate) async fn invoke<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.manager.clone();
        self.bounded(op, async move { invocation.invoke_async(&mut conn).await })
            .await
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(Error::Timeout {
                op,
                after: self.timeout,
            }),
            Ok(Err(e)) => Err(Error::redis(op, e)),
            Err(_) => Err(Error::Timeout {
                op,
                after: self.timeout,
            }),
        }
    }
}
