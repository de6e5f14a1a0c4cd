//! The connection to Redis — one server or a Redis Cluster, plain TCP or TLS — with a timeout
//! on every command: the builder (TLS included), running commands, pipelines and scripts, and
//! `WAIT` for replicas. What only a cluster needs (its nodes, pipelines split by slot) is in
//! `cluster.rs`; a write script's command (`ScriptCall`) is built in `scripts.rs`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisFuture, TlsCertificates, Value};

use crate::cluster::split_by_slot;
use crate::error::{Error, Result};
use crate::scripts::ScriptCall;

/// The default timeout for one command: 250 ms.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
/// The default timeout for establishing a connection: 1 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection to Redis — one server or a Redis Cluster — shared by every store and cache
/// built on it.
///
/// Cheap to clone: clones share one multiplexed TCP connection per server (with
/// `TCP_NODELAY`), which reconnects by itself after the server restarts or, on a cluster,
/// follows slots to their new master after a failover. Every command is bounded by
/// [`ConnectionBuilder::timeout`]: a stopped or unreachable Redis gives [`Error::Timeout`],
/// never a hang.
///
/// ```no_run
/// # async fn f() -> l2::Result<()> {
/// // One server, plain TCP:
/// let conn = l2::Connection::builder("redis://127.0.0.1:6379")
///     .timeout(std::time::Duration::from_millis(100))
///     .connect()
///     .await?;
/// conn.ping().await?;
///
/// // A cluster over TLS with an ACL user; one seed is enough, more survive a dead seed:
/// let ca = std::fs::read("ca.pem").expect("the CA certificate");
/// let cluster = l2::Connection::cluster([
///     "rediss://cache:secret@10.0.0.1:6379",
///     "rediss://cache:secret@10.0.0.2:6379",
/// ])
/// .tls_root_certificate(ca)
/// .connect()
/// .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Connection {
    handle: Handle,
    timeout: Duration,
    // Kept to open the subscriber connection of the same server(s); never printed.
    pub(crate) settings: Arc<Settings>,
}

/// The multiplexed connection itself: one server or a cluster. Both are `ConnectionLike`, so
/// commands, pipelines and scripts run on either through the same code.
#[derive(Clone)]
enum Handle {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Handle::Single(c) => c.req_packed_command(cmd),
            Handle::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Handle::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Handle::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Single(c) => c.get_db(),
            Handle::Cluster(c) => c.get_db(),
        }
    }
}

/// What a connection was made from, for opening more connections to the same server(s).
pub(crate) struct Settings {
    /// The server, or the cluster's seed nodes, as given (TLS parameters are added by
    /// [`Settings::client`]).
    pub(crate) nodes: Vec<redis::ConnectionInfo>,
    pub(crate) cluster: bool,
    tls: Option<TlsCertificates>,
    /// `WAIT n timeout` after every write, if asked for.
    replica_acks: Option<(u32, Duration)>,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_reconnect_delay: Duration,
}

impl Settings {
    /// A client for one node, with this connection's TLS certificates.
    pub(crate) fn client(&self, info: redis::ConnectionInfo) -> Result<redis::Client> {
        let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        match (&self.tls, tls) {
            (Some(certs), true) => redis::Client::build_with_tls(info, certs.clone())
                .map_err(|e| Error::Config(format!("TLS settings: {}", e.kind_name()))),
            _ => redis::Client::open(info).map_err(|e| Error::Config(e.kind_name())),
        }
    }

    /// `connecting`, bounded as every connection attempt is (three connect timeouts and
    /// 500 ms), its errors typed (`tls`: whether it is a TLS connection).
    pub(crate) async fn bounded_connect<T>(
        &self,
        op: &'static str,
        tls: bool,
        connecting: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        let bound = self
            .connect_timeout
            .saturating_mul(3)
            .saturating_add(Duration::from_millis(500));
        tokio::time::timeout(bound, connecting)
            .await
            .map_err(|_| Error::Timeout { op, after: bound })?
            .map_err(|e| Error::connect(e, tls))
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may carry a password.
        f.debug_struct("Connection")
            .field("cluster", &self.settings.cluster)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Builder for [`Connection`], from [`Connection::builder`] (one server) or
/// [`Connection::cluster`] (a Redis Cluster).
#[derive(Clone)]
pub struct ConnectionBuilder {
    urls: Vec<String>,
    cluster: bool,
    timeout: Duration,
    connect_timeout: Duration,
    max_reconnect_delay: Duration,
    root_certificate: Option<Vec<u8>>,
    client_certificate: Option<(Vec<u8>, Vec<u8>)>,
    allow_insecure_tls: bool,
    replica_acks: Option<(u32, Duration)>,
}

impl fmt::Debug for ConnectionBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URLs (passwords) nor the key material.
        f.debug_struct("ConnectionBuilder")
            .field("nodes", &self.urls.len())
            .field("cluster", &self.cluster)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_reconnect_delay", &self.max_reconnect_delay)
            .field("root_certificate", &self.root_certificate.is_some())
            .field("client_certificate", &self.client_certificate.is_some())
            .field("allow_insecure_tls", &self.allow_insecure_tls)
            .field("replica_acks", &self.replica_acks)
            .finish()
    }
}

/// The longest command or connection timeout kept: a day.
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);

impl ConnectionBuilder {
    /// The timeout of each command, from sending it to its reply. Default: 250 ms. Kept
    /// between 1 ms and a day (deadlines are computed from it).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.clamp(Duration::from_millis(1), MAX_TIMEOUT);
        self
    }

    /// The timeout of each connection attempt. Default: 1 s. Kept between 1 ms and a day.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.clamp(Duration::from_millis(1), MAX_TIMEOUT);
        self
    }

    /// The longest pause between reconnection attempts (they back off exponentially from
    /// 100 ms). Default: 1 s.
    pub fn max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.max_reconnect_delay = delay;
        self
    }

    /// For `rediss://` URLs: trust the certificate authority in `pem` (one or more PEM
    /// certificates) instead of the system's roots. Use it for a private CA.
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    /// For `rediss://` URLs: present this client certificate chain and private key (both PEM)
    /// to a server that asks for one (`tls-auth-clients yes`).
    pub fn tls_client_certificate(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.client_certificate = Some((certificate_pem.into(), key_pem.into()));
        self
    }

    /// Allows a `rediss://…/#insecure` URL, which turns off every certificate check and lets
    /// anyone on the path read and change the cache. Refused unless this is `true`: a test
    /// setting must not reach production by a copied URL alone. Default: `false`.
    pub fn danger_accept_invalid_certificates(mut self, allow: bool) -> Self {
        self.allow_insecure_tls = allow;
        self
    }

    /// Acknowledge a write only once `replicas` replicas have it (`WAIT replicas timeout`
    /// after each write, on the key's master), so a failover that promotes one of them cannot
    /// lose it. A write that `timeout` does not see replicated fails with
    /// [`Error::NotReplicated`] (it is on the master, and may still be lost). `timeout` must
    /// be below the command timeout ([`ConnectionBuilder::timeout`]). The `WAIT` goes in the
    /// same pipeline as the write, so it covers that write even across a reconnect. Costs one round
    /// trip to the replicas per write, and holds the writer's connection meanwhile (reads
    /// sharing it queue behind). Default: off — Redis replication is asynchronous, and a
    /// failover can lose the last writes a master acknowledged.
    pub fn replica_acks(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replica_acks = (replicas > 0).then_some((replicas, timeout));
        self
    }

    fn parse(&self) -> Result<Vec<redis::ConnectionInfo>> {
        if self.urls.is_empty() {
            return Err(Error::Config("no Redis node given".into()));
        }
        let mut nodes = Vec::with_capacity(self.urls.len());
        for url in &self.urls {
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|e| Error::Config(format!("bad redis URL: {}", e.kind_name())))?;
            if let ConnectionAddr::TcpTls { insecure: true, .. } = info.addr()
                && !self.allow_insecure_tls
            {
                return Err(Error::Config(
                    "the redis URL turns off TLS certificate checks (#insecure); \
                     call danger_accept_invalid_certificates(true) if that is really meant"
                        .into(),
                ));
            }
            nodes.push(
                info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)),
            );
        }
        Ok(nodes)
    }

    fn certificates(&self) -> Option<TlsCertificates> {
        if self.root_certificate.is_none() && self.client_certificate.is_none() {
            return None;
        }
        Some(TlsCertificates {
            client_tls: self.client_certificate.as_ref().map(|(cert, key)| {
                redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }
            }),
            root_cert: self.root_certificate.clone(),
        })
    }

    /// Connects. Fails within about three connect timeouts when Redis is unreachable.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad URL or an `#insecure` one not allowed,
    /// [`Error::Tls`] when the TLS handshake fails (wrong CA, wrong host name),
    /// [`Error::Permission`] when the ACL user lacks a right a command needs,
    /// [`Error::Timeout`] or [`Error::Redis`] when Redis cannot be reached.
    pub async fn connect(self) -> Result<Connection> {
        let nodes = self.parse()?;
        if let Some((_, wait)) = self.replica_acks
            && wait >= self.timeout
        {
            return Err(Error::Config(format!(
                "replica_acks: the replica timeout ({wait:?}) must be below the command timeout \
                 ({:?}), or a slow replica would read as a Redis timeout",
                self.timeout
            )));
        }
        let tls = nodes
            .iter()
            .any(|n| matches!(n.addr(), ConnectionAddr::TcpTls { .. }));
        let settings = Arc::new(Settings {
            nodes,
            cluster: self.cluster,
            tls: self.certificates(),
            replica_acks: self.replica_acks,
            connect_timeout: self.connect_timeout,
            max_reconnect_delay: self.max_reconnect_delay,
        });
        let connecting = async {
            if settings.cluster {
                self.connect_cluster(&settings).await.map(Handle::Cluster)
            } else {
                self.connect_single(&settings).await.map(Handle::Single)
            }
        };
        let handle = settings.bounded_connect("connect", tls, connecting).await?;
        let conn = Connection {
            handle,
            timeout: self.timeout,
            settings,
        };
        // Both kinds connect lazily in places (a cluster finds its nodes, TLS shakes hands on
        // first use): one PING makes a bad CA, a bad password or a dead cluster fail here.
        conn.query::<String>("connect", &redis::cmd("PING"))
            .await
            .map_err(|e| e.into_tls_if(tls))?;
        Ok(conn)
    }

    async fn connect_single(&self, settings: &Settings) -> redis::RedisResult<ConnectionManager> {
        let client = settings.client(settings.nodes[0].clone()).map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "", e.to_string()))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.timeout))
            .set_connection_timeout(Some(self.connect_timeout))
            .set_number_of_retries(2)
            .set_max_delay(self.max_reconnect_delay);
        client.get_connection_manager_with_config(config).await
    }

    async fn connect_cluster(&self, settings: &Settings) -> redis::RedisResult<ClusterConnection> {
        let mut builder = redis::cluster::ClusterClientBuilder::new(settings.nodes.clone())
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.timeout)
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(self.max_reconnect_delay.as_millis() as u64)
            .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        if let Some(certs) = &settings.tls {
            builder = builder.certs(certs.clone());
        }
        builder.build()?.get_async_connection().await
    }
}

pub(crate) trait KindName {
    fn kind_name(&self) -> String;
}

impl KindName for redis::RedisError {
    // The error's text can echo the URL, password included; keep only its kind.
    fn kind_name(&self) -> String {
        format!("{:?}", self.kind())
    }
}

impl Connection {
    /// A builder for a connection to one server at `url`
    /// (`redis://[user:password@]host:port[/db]`, or `rediss://` for TLS).
    pub fn builder(url: impl Into<String>) -> ConnectionBuilder {
        ConnectionBuilder {
            urls: vec![url.into()],
            cluster: false,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_reconnect_delay: Duration::from_secs(1),
            root_certificate: None,
            client_certificate: None,
            allow_insecure_tls: false,
            replica_acks: None,
        }
    }

    /// A builder for a connection to a Redis Cluster, found from one or more seed nodes'
    /// URLs (same forms as [`Connection::builder`]; credentials and TLS from the first).
    ///
    /// On a cluster every single-key command, script and lock goes to the key's master;
    /// batch reads and writes are split by hash slot and run concurrently (each slot's part
    /// atomic on its own); namespace clears scan every master.
    pub fn cluster<S: Into<String>>(seeds: impl IntoIterator<Item = S>) -> ConnectionBuilder {
        let mut builder = Self::builder(String::new());
        builder.urls = seeds.into_iter().map(Into::into).collect();
        builder.cluster = true;
        builder
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

    /// Whether this is a Redis Cluster connection.
    pub fn is_cluster(&self) -> bool {
        self.settings.cluster
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
        let mut conn = self.handle.clone();
        self.bounded(op, async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Runs a pipeline of per-key commands, bounded by the timeout. On one server it is one
    /// round trip. On a cluster it is split by hash slot (the first key of each command), the
    /// parts run concurrently, each atomic if `pipe` is, and the replies come back in
    /// `pipe`'s order. `keep_errors` must say whether `pipe` was built with
    /// [`redis::Pipeline::ignore_errors`] (server errors returned in their place rather than
    /// failing the whole), which a pipeline does not tell.
    ///
    /// `replicate`: a write that, with [`ConnectionBuilder::replica_acks`], must wait for
    /// replicas: `WAIT` is appended to the pipeline (to each slot's part on a cluster, so it
    /// runs on the connection that carried the writes), and its replies checked and removed.
    pub(crate) async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        pipe: &redis::Pipeline,
        keep_errors: bool,
        replicate: bool,
    ) -> Result<T> {
        let wait = if replicate { self.wait_cmd() } else { None };
        if wait.is_none() && !self.is_cluster() {
            let mut conn = self.handle.clone();
            return self
                .bounded(op, async move { pipe.query_async(&mut conn).await })
                .await;
        }
        let (values, acks) = self.run_pipe(op, pipe, keep_errors, wait.as_ref()).await?;
        if let Some((_, wanted)) = wait {
            for acked in acks {
                check_acks(op, Some(acked), wanted)?;
            }
        }
        redis::FromRedisValue::from_redis_value(Value::Array(values))
            .map_err(|e| Error::redis(op, e.into()))
    }

    /// Runs `pipe` (split by slot on a cluster), with `wait` appended to it (to each part),
    /// and returns the replies and, apart, the `WAIT` replies unchecked.
    async fn run_pipe(
        &self,
        op: &'static str,
        pipe: &redis::Pipeline,
        keep_errors: bool,
        wait: Option<&(redis::Cmd, u32)>,
    ) -> Result<(Vec<Value>, Vec<Value>)> {
        debug_assert!(
            wait.is_none() || !pipe.is_transaction(),
            "WAIT cannot run inside MULTI"
        );
        match &self.handle {
            Handle::Single(_) => {
                let mut conn = self.handle.clone();
                self.bounded(
                    op,
                    async move { query_with_wait(&mut conn, pipe, wait).await },
                )
                .await
            }
            Handle::Cluster(cluster) => {
                self.bounded(op, split_by_slot(cluster, pipe, keep_errors, wait))
                    .await
            }
        }
    }

    /// Runs a Lua script (EVALSHA, loading it on NOSCRIPT), bounded by the timeout.
    pub(crate) async fn invoke<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.handle.clone();
        self.bounded(op, async move { invocation.invoke_async(&mut conn).await })
            .await
    }

    /// `WAIT replicas timeout` and the replicas wanted, if writes must wait for replicas.
    fn wait_cmd(&self) -> Option<(redis::Cmd, u32)> {
        let (wanted, timeout) = self.settings.replica_acks?;
        let mut wait = redis::cmd("WAIT");
        wait.arg(wanted).arg(
            u64::try_from(timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        Some((wait, wanted))
    }

    /// Runs a write script: `EVALSHA`, loading the script on `NOSCRIPT`, in a pipeline of its
    /// own. With [`ConnectionBuilder::replica_acks`] the pipeline ends with `WAIT`, so the
    /// `WAIT` covers this write on this connection — never a fresh connection that has sent
    /// nothing (after a reconnect a separate `WAIT` would confirm a write it never saw).
    pub(crate) async fn invoke_write<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        call: ScriptCall,
    ) -> Result<T> {
        debug_assert_eq!(
            call.keys_left, 0,
            "a script call with fewer keys than declared"
        );
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.add_command(call.cmd);
        let wait = self.wait_cmd();
        for attempt in 0..2 {
            let (mut values, acks) = self.run_pipe(op, &pipe, true, wait.as_ref()).await?;
            let reply = values.pop().unwrap_or(Value::Nil);
            // A script that did not run wrote nothing: its WAIT says nothing either.
            if !matches!(&reply, Value::ServerError(e) if e.code() == "NOSCRIPT")
                && let Some((_, wanted)) = &wait
            {
                for acked in acks {
                    check_acks(op, Some(acked), *wanted)?;
                }
            }
            match reply {
                Value::ServerError(e) if e.code() == "NOSCRIPT" && attempt == 0 => {
                    // Load it (on every node of a cluster) and send the pair again.
                    let mut conn = self.handle.clone();
                    let script = call.script;
                    let _: String = self
                        .bounded(op, async move {
                            script.prepare_invoke().load_async(&mut conn).await
                        })
                        .await?;
                }
                Value::ServerError(e) => return Err(Error::redis(op, e.into())),
                value => {
                    return redis::FromRedisValue::from_redis_value(value)
                        .map_err(|e| Error::redis(op, e.into()));
                }
            }
        }
        Err(Error::redis(
            op,
            redis::RedisError::from((redis::ErrorKind::Client, "NOSCRIPT after SCRIPT LOAD")),
        ))
    }

    /// Runs one command on one node of a cluster, bounded by the timeout.
    pub(crate) async fn query_node<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        node: &(String, u16),
        cmd: redis::Cmd,
    ) -> Result<T> {
        let Handle::Cluster(cluster) = &self.handle else {
            return self.query(op, &cmd).await;
        };
        let mut conn = cluster.clone();
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: node.0.clone(),
            port: node.1,
        });
        let value = self
            .bounded(op, async move { conn.route_command(cmd, routing).await })
            .await?;
        T::from_redis_value(value).map_err(|e| Error::redis(op, e.into()))
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        bounded(op, self.timeout, fut).await
    }
}

/// `fut`, bounded by `timeout`, its errors typed.
pub(crate) async fn bounded<T>(
    op: &'static str,
    timeout: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.is_timeout() => Err(Error::Timeout { op, after: timeout }),
        Ok(Err(e)) => Err(Error::redis(op, e)),
        Err(_) => Err(Error::Timeout { op, after: timeout }),
    }
}

/// Runs `pipe` on `conn` as one pipeline, with `wait` appended if given, and returns the
/// replies and, apart, the `WAIT` reply.
pub(crate) async fn query_with_wait(
    conn: &mut impl ConnectionLike,
    pipe: &redis::Pipeline,
    wait: Option<&(redis::Cmd, u32)>,
) -> redis::RedisResult<(Vec<Value>, Vec<Value>)> {
    let Some((wait, _)) = wait else {
        return Ok((pipe.query_async(conn).await?, Vec::new()));
    };
    let mut pipe = pipe.clone();
    pipe.add_command(wait.clone());
    let mut values: Vec<Value> = pipe.query_async(conn).await?;
    let acks = values.pop().into_iter().collect();
    Ok((values, acks))
}

/// Checks a `WAIT` reply against the replicas wanted.
fn check_acks(op: &'static str, reply: Option<Value>, wanted: u32) -> Result<()> {
    match reply {
        Some(Value::Int(acked)) if acked >= i64::from(wanted) => Ok(()),
        Some(Value::Int(acked)) => Err(Error::NotReplicated {
            op,
            acked: u32::try_from(acked).unwrap_or(0),
            wanted,
        }),
        Some(Value::ServerError(e)) => Err(Error::redis(op, e.into())),
        _ => Err(Error::redis(
            op,
            redis::RedisError::from((redis::ErrorKind::Client, "no WAIT reply")),
        )),
    }
}
