//! [`Subscriber`]: a dedicated pub/sub connection that reconnects and resubscribes by itself.
//!
//! Here: the handle, its events and handlers, opening its connection, and `listen`. Moving a
//! cluster subscriber to another node is in `failover`; the heartbeat's questions (`ping`,
//! `run_id`: who the server is) in `identity`; probes through pub/sub in `probe`.

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::Notify;

use crate::connection::Connection;
use crate::error::{Error, Result};
use failover::{cluster_nodes, node_name, rotate};
use identity::ServerClock;
use probe::Probes;

mod failover;
mod identity;
mod probe;

pub use probe::ProbeSigner;

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

#[derive(Default)]
struct Handlers {
    by_channel: RwLock<HashMap<String, Vec<Handler>>>,
}

impl Handlers {
    fn dispatch(&self, push: &PushInfo) {
        let by_channel = self.read();
        match push.kind {
            PushKind::Message => {
                let (Some(channel), Some(payload)) = (push.data.first(), push.data.get(1)) else {
                    return;
                };
                let (Some(channel), Some(payload)) = (text(channel), bytes(payload)) else {
                    return;
                };
                tell(&by_channel, channel, &Event::Message { channel, payload });
            }
            PushKind::Subscribe => {
                let Some(channel) = push.data.first().and_then(text) else {
                    return;
                };
                tell(&by_channel, channel, &Event::Subscribed { channel });
            }
            PushKind::Disconnection => {
                for handler in by_channel.values().flatten() {
                    handler(&Event::Disconnected);
                }
            }
            _ => {}
        }
    }

    /// Tells `channel`'s handlers it is subscribed (for confirmations that arrived while
    /// their connection was not yet the active one).
    fn subscribed(&self, channel: &str) {
        tell(&self.read(), channel, &Event::Subscribed { channel });
    }

    /// Adds `handler` to `channel`'s; returns whether it is the first.
    fn add(&self, channel: &str, handler: Handler) -> bool {
        let mut by_channel = self.write();
        let list = by_channel.entry(channel.to_string()).or_default();
        list.push(handler);
        list.len() == 1
    }

    /// Drops `channel`'s handlers.
    fn remove(&self, channel: &str) {
        self.write().remove(channel);
    }

    /// The channels that have handlers.
    fn channels(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Vec<Handler>>> {
        self.by_channel.read()
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Vec<Handler>>> {
        self.by_channel.write()
    }
}

/// Calls `channel`'s handlers with `event`.
fn tell(by_channel: &HashMap<String, Vec<Handler>>, channel: &str, event: &Event<'_>) {
    for handler in by_channel.get(channel).into_iter().flatten() {
        handler(event);
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

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let channels = self.inner.handlers.by_channel.read().len();
        f.debug_struct("Subscriber")
            .field("channels", &channels)
            .field("cluster", &self.inner.conn.is_cluster())
            .field("moves", &self.moves())
            .finish_non_exhaustive()
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
    let tls = matches!(
        client.get_connection_info().addr(),
        ConnectionAddr::TcpTls { .. }
    );
    settings
        .bounded_connect(
            "connect subscriber",
            tls,
            client.get_connection_manager_with_config(config),
        )
        .await
}

impl Inner {
    fn manager(&self) -> ConnectionManager {
        self.current.read().clone()
    }

    /// Subscribes `manager` to `channel`, bounded by four command timeouts.
    async fn subscribe(&self, manager: &mut ConnectionManager, channel: &str) -> Result<()> {
        let after = self.timeout.saturating_mul(4);
        match tokio::time::timeout(after, manager.subscribe(channel)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::redis("subscribe", e)),
            Err(_) => Err(Error::Timeout {
                op: "subscribe",
                after,
            }),
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
        let known = cluster_nodes(conn).await.unwrap_or_default();
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
        if !self.inner.handlers.add(channel, Arc::new(handler)) {
            return Ok(());
        }
        // Not while the subscriber moves: the channel must end up on the connection that
        // stays (a move that starts after this sees it among the handlers).
        let _switching = self.inner.switching.lock().await;
        let mut manager = self.inner.manager();
        let result = self.inner.subscribe(&mut manager, channel).await;
        if result.is_err() {
            self.inner.handlers.remove(channel);
        }
        result
    }
}
