//! [`Subscriber`]: a dedicated pub/sub connection that reconnects and resubscribes by itself.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{Notify, oneshot};

use crate::connection::Connection;
use crate::error::{Error, Result};

/// What the subscriber connection reports to a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A message published on the handler's channel.
    Message {
        /// The channel.
        channel: &'a str,
        /// The message bytes, unvalidated: anyone allowed to publish on the channel wrote them.
        payload: &'a [u8],
    },
    /// The channel was (re)subscribed: after a reconnect this follows a
    /// [`Event::Disconnected`], and messages published in between were lost.
    Subscribed {
        /// The channel.
        channel: &'a str,
    },
    /// The connection dropped: messages may be lost until the next [`Event::Subscribed`].
    Disconnected,
}

type Handler = Arc<dyn Fn(&Event<'_>) + Send + Sync>;

/// Signs a probe: given the payload built so far (a random nonce), returns the bytes appended
/// to it (a tag). A returning probe must match the published bytes exactly, so a probe
/// published by anyone without the signer's key never counts. See
/// [`Subscriber::listen_for_probes_signed`].
pub type ProbeSigner = Arc<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

#[derive(Default)]
struct Handlers {
    by_channel: RwLock<HashMap<String, Vec<Handler>>>,
}

impl Handlers {
    fn dispatch(&self, push: &PushInfo) {
        let by_channel = self.by_channel.read().unwrap_or_else(|p| p.into_inner());
        match push.kind {
            PushKind::Message => {
                let (Some(channel), Some(payload)) = (push.data.first(), push.data.get(1)) else {
                    return;
                };
                let (Some(channel), Some(payload)) = (text(channel), bytes(payload)) else {
                    return;
                };
                for handler in by_channel.get(channel).into_iter().flatten() {
                    handler(&Event::Message { channel, payload });
                }
            }
            PushKind::Subscribe => {
                let Some(channel) = push.data.first().and_then(text) else {
                    return;
                };
                for handler in by_channel.get(channel).into_iter().flatten() {
                    handler(&Event::Subscribed { channel });
                }
            }
            PushKind::Disconnection => {
                for handler in by_channel.values().flatten() {
                    handler(&Event::Disconnected);
                }
            }
            _ => {}
        }
    }
}

impl Handlers {
    /// Tells `channel`'s handlers it is subscribed (for confirmations that arrived while
    /// their connection was not yet the active one).
    fn subscribed(&self, channel: &str) {
        let by_channel = self.by_channel.read().unwrap_or_else(|p| p.into_inner());
        for handler in by_channel.get(channel).into_iter().flatten() {
            handler(&Event::Subscribed { channel });
        }
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<&str> {
    bytes(v).and_then(|b| std::str::from_utf8(b).ok())
}

/// A pub/sub connection of its own (RESP3 pushes on a reconnecting `ConnectionManager`, with
/// automatic resubscription), with handlers per channel.
///
/// On a Redis Cluster it is one connection to one node (classic `PUBLISH` reaches every
/// node's subscribers). When that connection drops it does not wait for the node to come
/// back — a killed master never does, and the redis crate does not move subscriptions after a
/// failover — but moves to the next live node (from `CLUSTER SLOTS`, else the seeds) and
/// subscribes there again; handlers see [`Event::Disconnected`] then [`Event::Subscribed`].
///
/// Handlers run on the connection's reader: they must be quick and must not block (signal a
/// task instead). Cheap to clone; clones share the connection. The connection closes when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Subscriber {
    inner: Arc<Inner>,
}

struct Inner {
    /// The connection in use; replaced when a cluster subscriber moves to another node.
    current: RwLock<ConnectionManager>,
    /// The node it is on (`host:port`), for trying it last when moving.
    node: RwLock<String>,
    /// The cluster's nodes as last seen (`CLUSTER SLOTS`), for when asking fails mid-failover.
    known: RwLock<Vec<redis::ConnectionInfo>>,
    /// Which connection's pushes reach the handlers: only the current one's. A candidate
    /// being set up, or a connection moved away from (which may reconnect by itself), is
    /// ignored.
    active: Arc<AtomicU64>,
    /// The last connection number handed out.
    numbers: AtomicU64,
    /// Held while moving, and while `listen` subscribes: a channel added meanwhile is never
    /// left on a connection being replaced.
    switching: tokio::sync::Mutex<()>,
    /// Wakes the task that moves a cluster subscriber; `None` on one server.
    wake: Option<Arc<Notify>>,
    /// Heartbeats failed in a row (a hung node sends no disconnect: two failures move).
    beat_failures: AtomicU64,
    handlers: Arc<Handlers>,
    timeout: std::time::Duration,
    conn: Connection,
    /// Set once `INFO` is refused (an ACL user without `@dangerous`): heartbeats use PING.
    info_denied: AtomicBool,
    /// The server's clock as the heartbeat last read it: see [`Subscriber::run_id`].
    clock: Mutex<ServerClock>,
    moves: AtomicU64,
    probes: Arc<Probes>,
}

/// The probes this subscriber published and waits for, by payload.
struct Probes {
    /// Channels with the probe handler on them, and how their probes are signed.
    channels: Mutex<HashMap<String, Option<ProbeSigner>>>,
    waiting: Mutex<HashMap<Vec<u8>, oneshot::Sender<()>>>,
}

/// A probe payload: `probe:` and 128 random bits from the OS (in hex), so nobody can publish
/// one before seeing it; then the signer's tag, if any.
fn probe_payload(signer: Option<&ProbeSigner>) -> Vec<u8> {
    let mut nonce = [0u8; 16];
    if getrandom::fill(&mut nonce).is_err() {
        // No OS generator (never on the platforms we run on): fastrand, seeded per process,
        // is unique but not unpredictable.
        nonce = fastrand::u128(..).to_le_bytes();
    }
    let mut payload = b"probe:".to_vec();
    for b in nonce {
        payload.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    if let Some(sign) = signer {
        let tag = sign(&payload);
        payload.push(b':');
        payload.extend_from_slice(&tag);
    }
    payload
}

impl Probes {
    fn arrived(&self, payload: &[u8]) {
        let waiter = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(payload);
        if let Some(waiter) = waiter {
            let _ = waiter.send(());
        }
    }
}

/// One probe round's waiters, removed when the round ends however it ends.
struct Pending<'a> {
    probes: &'a Probes,
    payloads: Vec<Vec<u8>>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut waiting = self
            .probes
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for p in &self.payloads {
            waiting.remove(p);
        }
    }
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let channels = self
            .inner
            .handlers
            .by_channel
            .read()
            .map(|h| h.len())
            .unwrap_or(0);
        f.debug_struct("Subscriber")
            .field("channels", &channels)
            .field("cluster", &self.inner.conn.is_cluster())
            .field("moves", &self.moves())
            .finish_non_exhaustive()
    }
}

/// The same credentials and TLS as `seed`, at `host:port`.
fn at_node(seed: &redis::ConnectionInfo, host: &str, port: u16) -> redis::ConnectionInfo {
    let addr = match seed.addr() {
        ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: *insecure,
            tls_params: None,
        },
        _ => ConnectionAddr::Tcp(host.to_string(), port),
    };
    seed.clone().set_addr(addr)
}

fn node_name(info: &redis::ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        other => format!("{other:?}"),
    }
}

/// Opens a RESP3 connection manager to `info` whose pushes reach `handlers` while `active`
/// is `mine`; a disconnect of the active connection wakes `rotate`.
async fn open(
    conn: &Connection,
    info: redis::ConnectionInfo,
    handlers: &Arc<Handlers>,
    active: &Arc<AtomicU64>,
    mine: u64,
    rotate: Option<Arc<Notify>>,
) -> Result<ConnectionManager> {
    let settings = &conn.settings;
    let redis_settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client = settings.client(info.set_redis_settings(redis_settings))?;
    let weak: Weak<Handlers> = Arc::downgrade(handlers);
    let active = Arc::clone(active);
    let config = ConnectionManagerConfig::new()
        .set_push_sender(move |push: PushInfo| {
            if active.load(Ordering::Acquire) != mine {
                return Ok::<(), redis::aio::SendError>(());
            }
            if let Some(handlers) = weak.upgrade() {
                handlers.dispatch(&push);
                if push.kind == PushKind::Disconnection
                    && let Some(rotate) = &rotate
                {
                    rotate.notify_one();
                }
            }
            Ok(())
        })
        .set_automatic_resubscription()
        .set_response_timeout(Some(conn.timeout()))
        .set_connection_timeout(Some(settings.connect_timeout))
        .set_number_of_retries(2)
        .set_max_delay(settings.max_reconnect_delay);
    let bound = settings.connect_timeout * 3 + std::time::Duration::from_millis(500);
    let tls = matches!(
        client.get_connection_info().addr(),
        ConnectionAddr::TcpTls { .. }
    );
    tokio::time::timeout(bound, client.get_connection_manager_with_config(config))
        .await
        .map_err(|_| Error::Timeout {
            op: "connect subscriber",
            after: bound,
        })?
        .map_err(|e| Error::connect(e, tls))
}

/// Moves a cluster subscriber to another node each time its connection drops or stops
/// answering. Ends when the subscriber is dropped.
async fn rotate(inner: Weak<Inner>, wake: Arc<Notify>) {
    let mut delay = std::time::Duration::from_millis(50);
    loop {
        wake.notified().await;
        loop {
            let Some(me) = inner.upgrade() else { return };
            match me.move_on().await {
                Ok(()) => {
                    delay = std::time::Duration::from_millis(50);
                    break;
                }
                Err(e) => {
                    tracing::debug!(target: "l2", error = %e, "subscriber found no node to move to; retrying");
                    let max = me.conn.settings.max_reconnect_delay;
                    drop(me);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(max);
                }
            }
        }
    }
}

impl Inner {
    fn manager(&self) -> ConnectionManager {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn channels(&self) -> Vec<String> {
        self.handlers
            .by_channel
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Opens a connection to `info` (not yet active) and subscribes `channels` on it.
    async fn connect_to(
        &self,
        info: redis::ConnectionInfo,
        channels: &[String],
    ) -> Result<(ConnectionManager, u64)> {
        let mine = self.numbers.fetch_add(1, Ordering::Relaxed) + 1;
        let manager = open(
            &self.conn,
            info,
            &self.handlers,
            &self.active,
            mine,
            self.wake.clone(),
        )
        .await?;
        for channel in channels {
            let mut m = manager.clone();
            match tokio::time::timeout(self.timeout * 4, m.subscribe(channel)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Error::redis("subscribe", e)),
                Err(_) => {
                    return Err(Error::Timeout {
                        op: "subscribe",
                        after: self.timeout * 4,
                    });
                }
            }
        }
        Ok((manager, mine))
    }

    /// Connects to the next node that answers and subscribes every channel there; only then
    /// does the new connection become the active one (so while no node answers, the old
    /// connection keeps listening should its node come back).
    async fn move_on(&self) -> Result<()> {
        let _switching = self.switching.lock().await;
        let settings = &self.conn.settings;
        let seed = &settings.nodes[0];
        let mut candidates: Vec<redis::ConnectionInfo> = match self.conn.cluster_nodes().await {
            Ok(nodes) if !nodes.is_empty() => {
                let nodes: Vec<redis::ConnectionInfo> = nodes
                    .iter()
                    .map(|(host, port, _)| at_node(seed, host, *port))
                    .collect();
                *self.known.write().unwrap_or_else(|p| p.into_inner()) = nodes.clone();
                nodes
            }
            // Asked a node that is down or hung: the nodes seen last time.
            _ => self.known.read().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        candidates.extend(settings.nodes.iter().cloned());
        // The node just lost goes last (it may be the only one left).
        let lost = self.node.read().unwrap_or_else(|p| p.into_inner()).clone();
        candidates.sort_by_key(|c| node_name(c) == lost);
        let channels = self.channels();
        let mut last = Error::Config("no cluster node to subscribe on".into());
        for info in candidates {
            let name = node_name(&info);
            match self.connect_to(info, &channels).await {
                Ok((manager, mine)) => {
                    *self.current.write().unwrap_or_else(|p| p.into_inner()) = manager;
                    *self.node.write().unwrap_or_else(|p| p.into_inner()) = name.clone();
                    self.active.store(mine, Ordering::SeqCst);
                    self.beat_failures.store(0, Ordering::Relaxed);
                    // Its confirmations came while it was not yet active: report them now.
                    for channel in &channels {
                        self.handlers.subscribed(channel);
                    }
                    // Only after the handlers heard of the move: a probe round that saw the
                    // same count at its start and end did not straddle it (see `probe`).
                    self.moves.fetch_add(1, Ordering::SeqCst);
                    tracing::info!(target: "l2", node = %name, "subscriber moved to another cluster node");
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Counts a heartbeat's outcome; on a cluster, two failures in a row move the subscriber
    /// (a hung or cut-off node sends no disconnect).
    fn beat(&self, ok: bool) {
        if ok {
            self.beat_failures.store(0, Ordering::Relaxed);
        } else if self.beat_failures.fetch_add(1, Ordering::Relaxed) + 1 >= 2
            && let Some(wake) = &self.wake
        {
            self.beat_failures.store(0, Ordering::Relaxed);
            wake.notify_one();
        }
    }
}

impl Subscriber {
    /// Opens a subscriber connection to the server of `conn` (on a cluster: the first of its
    /// seed nodes that answers), with its timeouts and credentials.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`] when Redis cannot be reached, or does not speak
    /// RESP3 (Redis 6 or later is needed); [`Error::Tls`] when TLS fails.
    pub async fn connect(conn: &Connection) -> Result<Subscriber> {
        let wake = conn.is_cluster().then(|| Arc::new(Notify::new()));
        let handlers = Arc::new(Handlers::default());
        let active = Arc::new(AtomicU64::new(1));
        let mut last = Error::Config("no Redis node given".into());
        let mut opened = None;
        // One server: its URL. A cluster: the first seed that answers.
        for info in &conn.settings.nodes {
            match open(conn, info.clone(), &handlers, &active, 1, wake.clone()).await {
                Ok(manager) => {
                    opened = Some((manager, node_name(info)));
                    break;
                }
                Err(e) => last = e,
            }
        }
        let Some((manager, node)) = opened else {
            return Err(last);
        };
        let seed = &conn.settings.nodes[0];
        let known = match conn.cluster_nodes().await {
            Ok(nodes) => nodes
                .iter()
                .map(|(host, port, _)| at_node(seed, host, *port))
                .collect(),
            Err(_) => Vec::new(),
        };
        let inner = Arc::new(Inner {
            current: RwLock::new(manager),
            node: RwLock::new(node),
            known: RwLock::new(known),
            active,
            numbers: AtomicU64::new(1),
            switching: tokio::sync::Mutex::new(()),
            wake: wake.clone(),
            beat_failures: AtomicU64::new(0),
            handlers,
            timeout: conn.timeout(),
            conn: conn.clone(),
            info_denied: AtomicBool::new(false),
            clock: Mutex::default(),
            moves: AtomicU64::new(0),
            probes: Arc::new(Probes {
                channels: Mutex::default(),
                waiting: Mutex::default(),
            }),
        });
        if let Some(wake) = wake {
            tokio::spawn(rotate(Arc::downgrade(&inner), wake));
        }
        Ok(Subscriber { inner })
    }

    /// How many times this subscriber moved to another cluster node.
    pub fn moves(&self) -> u64 {
        self.inner.moves.load(Ordering::Relaxed)
    }

    /// Sends PING on the subscriber connection itself and returns the round trip: a heartbeat
    /// that proves messages can still arrive (a dead or stopped server, or a half-open
    /// connection, fails it). Bounded by `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`].
    pub async fn ping(&self, timeout: std::time::Duration) -> Result<std::time::Duration> {
        let start = tokio::time::Instant::now();
        let mut manager = self.inner.manager();
        let _: String = self
            .bounded("subscriber ping", timeout, async move {
                redis::cmd("PING").query_async(&mut manager).await
            })
            .await?;
        Ok(start.elapsed())
    }

    /// The server's `run_id` (`INFO server`): it changes when Redis restarts, which loses
    /// every message published meanwhile. For an ACL user not allowed `INFO` it is an empty
    /// string, after a PING that proves the connection alive (a restart is then seen only as
    /// the disconnect it causes). On a cluster the cluster's current epoch is appended
    /// (`CLUSTER INFO`), so a failover anywhere in the cluster changes it.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`].
    pub async fn run_id(&self, timeout: std::time::Duration) -> Result<String> {
        let id = self.identify(timeout).await;
        self.inner.beat(id.is_ok());
        id
    }

    async fn identify(&self, timeout: std::time::Duration) -> Result<String> {
        let server = self.server_id(timeout).await?;
        if !self.inner.conn.is_cluster() {
            return Ok(server);
        }
        // On a cluster, a failover elsewhere changes no run_id this node sees, yet the new
        // master may lack the last writes: the cluster's epoch, which every failover bumps,
        // makes it a change too.
        let info: String = self
            .ask(
                "subscriber cluster info",
                timeout,
                redis::cmd("CLUSTER").arg("INFO"),
            )
            .await?;
        let epoch = info
            .lines()
            .find_map(|l| l.strip_prefix("cluster_current_epoch:"))
            .map(str::trim)
            .unwrap_or("?")
            .to_string();
        // A cluster-bus link that was dropped and made again (a late PONG, the send buffer
        // limit) took the messages in its buffer with it: that, too, is a change.
        let links: Result<Value> = self
            .ask(
                "subscriber cluster links",
                timeout,
                redis::cmd("CLUSTER").arg("LINKS"),
            )
            .await;
        let links = match links {
            Ok(value) => links_digest(&value),
            // Not allowed, or a Redis before 7.0: the epoch alone.
            Err(e) if e.is_permission() || !e.is_unavailable() => 0,
            Err(e) => return Err(e),
        };
        Ok(format!("{server}@epoch{epoch}@links{links:016x}"))
    }

    async fn server_id(&self, timeout: std::time::Duration) -> Result<String> {
        if self.inner.info_denied.load(Ordering::Relaxed) {
            self.ping(timeout).await?;
            return Ok(String::new());
        }
        let info: Result<String> = self
            .ask("subscriber info", timeout, redis::cmd("INFO").arg("server"))
            .await;
        let info = match info {
            Err(e) if e.is_permission() => {
                // A least-privilege user has no INFO (it is @dangerous): a restart is then
                // seen only as the disconnect it causes.
                self.inner.info_denied.store(true, Ordering::Relaxed);
                self.ping(timeout).await?;
                return Ok(String::new());
            }
            other => other?,
        };
        let run_id = info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|id| id.trim().to_string())
            .ok_or_else(|| Error::Config("INFO server has no run_id".into()))?;
        // Write versions are taken from the server's clock (see the write scripts): a clock
        // that steps back could give a vanished key a version below one a node still holds.
        // Each step back is a change of identity, so every node drops its L1.
        let time = info
            .lines()
            .find_map(|l| l.strip_prefix("server_time_usec:"))
            .and_then(|t| t.trim().parse::<u64>().ok());
        let steps = match time {
            Some(t) => self
                .inner
                .clock
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(&run_id, t),
            None => 0,
        };
        Ok(if steps == 0 {
            run_id
        } else {
            format!("{run_id}@clockstep{steps}")
        })
    }

    /// Subscribes to `channel` for [`Subscriber::probe`]. The channel should be this
    /// subscriber's alone (nobody else publishes on it or listens to it). Each probe carries
    /// 128 random bits, so nobody can publish one before it is published; to make probes
    /// worthless to anyone without a key too, use [`Subscriber::listen_for_probes_signed`].
    ///
    /// # Errors
    /// As [`Subscriber::listen`].
    pub async fn listen_for_probes(&self, channel: &str) -> Result<()> {
        self.probes_on(channel, None).await
    }

    /// As [`Subscriber::listen_for_probes`], and every probe on `channel` carries the tag
    /// `signer` makes for its random payload. A probe comes back only when the bytes match
    /// exactly what was published, so forged probes never count. The first call for a
    /// channel decides how its probes are signed.
    ///
    /// # Errors
    /// As [`Subscriber::listen`].
    pub async fn listen_for_probes_signed(&self, channel: &str, signer: ProbeSigner) -> Result<()> {
        self.probes_on(channel, Some(signer)).await
    }

    async fn probes_on(&self, channel: &str, signer: Option<ProbeSigner>) -> Result<()> {
        let probes = Arc::clone(&self.inner.probes);
        {
            let mut channels = probes.channels.lock().unwrap_or_else(|p| p.into_inner());
            if channels.contains_key(channel) {
                return Ok(());
            }
            channels.insert(channel.to_string(), signer);
        }
        let handler = {
            let probes = Arc::clone(&probes);
            move |event: &Event<'_>| {
                if let Event::Message { payload, .. } = event {
                    probes.arrived(payload);
                }
            }
        };
        let subscribed = self.listen(channel, handler).await;
        if subscribed.is_err() {
            probes
                .channels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(channel);
        }
        subscribed
    }

    /// Proves that pub/sub messages reach this subscriber in time, end to end: publishes a
    /// probe on `channel` (made ready with [`Subscriber::listen_for_probes`]) through every
    /// master — on one server, through the server — and waits until each has come back on
    /// this connection. Pub/sub keeps order along each path (a server to its subscribers; on
    /// a cluster, a master's bus link to the node this subscriber is on), so a probe's return
    /// means everything that master published before it has arrived here. Returns how long
    /// the slowest took.
    ///
    /// The heartbeat ([`Subscriber::run_id`]) proves only that this connection answers; a
    /// probe also covers the cluster bus between masters and this node, and a server slow to
    /// write to its subscribers.
    ///
    /// # Errors
    /// [`Error::Timeout`] when a probe has not come back within `timeout`; [`Error::Config`]
    /// if `channel` was not made ready; as the connection's commands otherwise.
    pub async fn probe(&self, channel: &str, timeout: Duration) -> Result<Duration> {
        let probes = &self.inner.probes;
        let Some(signer) = probes
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(channel)
            .cloned()
        else {
            return Err(Error::Config(format!(
                "probe: call listen_for_probes({channel:?}) first"
            )));
        };
        // A round that straddles a move could return on the new node before the handlers
        // hear of the move (and the messages it may have lost): it proves nothing.
        let connection_before = (
            self.inner.active.load(Ordering::SeqCst),
            self.inner.moves.load(Ordering::SeqCst),
        );
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        let late = || Error::Timeout {
            op: "pub/sub probe",
            after: timeout,
        };
        let conn = &self.inner.conn;
        let masters: Vec<Option<(String, u16)>> = if conn.is_cluster() {
            tokio::time::timeout_at(deadline, conn.masters())
                .await
                .map_err(|_| late())??
                .into_iter()
                .map(Some)
                .collect()
        } else {
            vec![None]
        };
        // Whatever happens to this round (done, late, cancelled), its waiters go with it.
        let mut pending = Pending {
            probes,
            payloads: Vec::with_capacity(masters.len()),
        };
        let mut arrivals = Vec::with_capacity(masters.len());
        let mut sends = Vec::with_capacity(masters.len());
        for master in masters {
            let payload = probe_payload(signer.as_ref());
            let (tx, rx) = oneshot::channel();
            probes
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(payload.clone(), tx);
            arrivals.push(rx);
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(channel).arg(&payload);
            pending.payloads.push(payload);
            sends.push(async move {
                let _: i64 = match &master {
                    Some(node) => conn.query_node("probe publish", node, cmd).await?,
                    None => conn.query("probe publish", &cmd).await?,
                };
                Ok::<(), Error>(())
            });
        }
        let round = async {
            for sent in futures_util::future::join_all(sends).await {
                sent?;
            }
            for arrival in arrivals {
                arrival
                    .await
                    .map_err(|_| Error::Config("the subscriber closed during a probe".into()))?;
            }
            Ok::<(), Error>(())
        };
        let outcome = match tokio::time::timeout_at(deadline, round).await {
            Ok(Ok(()))
                if connection_before
                    != (
                        self.inner.active.load(Ordering::SeqCst),
                        self.inner.moves.load(Ordering::SeqCst),
                    ) =>
            {
                Err(Error::Config(
                    "the subscriber moved to another node during the probe".into(),
                ))
            }
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(late()),
        };
        drop(pending);
        outcome
    }

    /// Runs `cmd` on the subscriber connection, bounded by `timeout`.
    async fn ask<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        timeout: std::time::Duration,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        let mut manager = self.inner.manager();
        self.bounded(op, timeout, cmd.query_async(&mut manager))
            .await
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        timeout: std::time::Duration,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        crate::connection::bounded(op, timeout, fut).await
    }

    /// Calls `handler` for every event on `channel`, subscribing to it if this is its first
    /// handler. Returns once Redis confirmed the subscription.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`] if the subscription fails (for example an ACL user
    /// without rights on the channel); the handler is then not kept.
    pub async fn listen(
        &self,
        channel: &str,
        handler: impl Fn(&Event<'_>) + Send + Sync + 'static,
    ) -> Result<()> {
        let first = {
            let mut by_channel = self
                .inner
                .handlers
                .by_channel
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let list = by_channel.entry(channel.to_string()).or_default();
            list.push(Arc::new(handler));
            list.len() == 1
        };
        if !first {
            return Ok(());
        }
        // Not while the subscriber moves: the channel must end up on the connection that
        // stays (a move that starts after this sees it among the handlers).
        let _switching = self.inner.switching.lock().await;
        let mut manager = self.inner.manager();
        let result =
            match tokio::time::timeout(self.inner.timeout * 4, manager.subscribe(channel)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Error::redis("subscribe", e)),
                Err(_) => Err(Error::Timeout {
                    op: "subscribe",
                    after: self.inner.timeout * 4,
                }),
            };
        if result.is_err() {
            let mut by_channel = self
                .inner
                .handlers
                .by_channel
                .write()
                .unwrap_or_else(|p| p.into_inner());
            by_channel.remove(channel);
        }
        result
    }
}

/// A digest of `CLUSTER LINKS`' inbound links: each peer and when its link was made. A
/// peer's `PUBLISH` reaches this node over the link the peer opened (inbound here), so one
/// that was dropped and made again changes the digest. Outbound links are left out: this
/// node keeps remaking the one to a dead peer, which loses nothing.
/// The highest server time the heartbeat has read from one server, and how many times it saw
/// the clock go back by more than [`CLOCK_STEP`].
#[derive(Debug, Default)]
struct ServerClock {
    run_id: String,
    highest: u64,
    steps: u64,
}

/// A step back smaller than this is not reported: beats overlap, and one read a little
/// earlier may be looked at after a later one.
const CLOCK_STEP: u64 = 1_000_000;

impl ServerClock {
    /// Notes `time` (µs) read from the server `run_id`; returns the steps back seen so far on
    /// that server (another server starts over: a move is a gap of its own).
    fn observe(&mut self, run_id: &str, time: u64) -> u64 {
        if self.run_id != run_id {
            *self = ServerClock {
                run_id: run_id.to_string(),
                highest: time,
                steps: 0,
            };
            return 0;
        }
        if time.saturating_add(CLOCK_STEP) < self.highest {
            self.steps += 1;
            self.highest = time;
        } else {
            self.highest = self.highest.max(time);
        }
        self.steps
    }
}

fn links_digest(value: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let items = match value {
        Value::Array(items) | Value::Set(items) => items.as_slice(),
        _ => &[],
    };
    let mut links: Vec<String> = items
        .iter()
        .map(|link| {
            let pairs: Vec<(&Value, &Value)> = match link {
                Value::Map(pairs) => pairs.iter().map(|(k, v)| (k, v)).collect(),
                Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|c| Some((c.first()?, c.get(1)?)))
                    .collect(),
                _ => Vec::new(),
            };
            let field = |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| text(k) == Some(name))
                    .map(|(_, v)| match v {
                        Value::Int(n) => n.to_string(),
                        other => text(other).unwrap_or("").to_string(),
                    })
                    .unwrap_or_default()
            };
            (
                field("dir"),
                format!("{} {}", field("node"), field("create-time")),
            )
        })
        .filter(|(dir, _)| dir == "from")
        .map(|(_, link)| link)
        .collect();
    links.sort_unstable();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    links.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_clock_stepping_back_is_counted_once_per_step() {
        let mut c = ServerClock::default();
        assert_eq!(c.observe("a", 10_000_000), 0);
        assert_eq!(c.observe("a", 10_500_000), 0);
        assert_eq!(c.observe("a", 10_200_000), 0, "beats read out of order");
        assert_eq!(c.observe("a", 5_000_000), 1, "a step back of 5.5 s");
        assert_eq!(c.observe("a", 5_100_000), 1);
        assert_eq!(c.observe("b", 1_000), 0, "another server starts over");
        assert_eq!(c.observe("b", u64::MAX), 0);
        assert_eq!(c.observe("b", 0), 1);
    }
}
