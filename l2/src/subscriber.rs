//! [`Subscriber`]: a dedicated pub/sub connection that reconnects and resubscribes by itself.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock, Weak};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ProtocolVersion, PushInfo, PushKind, Value};

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
/// Handlers run on the connection's reader: they must be quick and must not block (signal a
/// task instead). Cheap to clone; clones share the connection. The connection closes when the
/// last clone is dropped.
#[derive(Clone)]
pub struct Subscriber {
    manager: ConnectionManager,
    handlers: Arc<Handlers>,
    timeout: std::time::Duration,
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let channels = self
            .handlers
            .by_channel
            .read()
            .map(|h| h.len())
            .unwrap_or(0);
        f.debug_struct("Subscriber")
            .field("channels", &channels)
            .finish_non_exhaustive()
    }
}

impl Subscriber {
    /// Opens a subscriber connection to the server of `conn`, with its timeouts.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`] when Redis cannot be reached, or does not speak
    /// RESP3 (Redis 6 or later is needed).
    pub async fn connect(conn: &Connection) -> Result<Subscriber> {
        let settings = &conn.settings;
        let redis_settings = settings
            .info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let info = settings.info.clone().set_redis_settings(redis_settings);
        let client = redis::Client::open(info).map_err(|e| Error::Config(e.to_string()))?;
        let handlers = Arc::new(Handlers::default());
        let weak: Weak<Handlers> = Arc::downgrade(&handlers);
        let config = ConnectionManagerConfig::new()
            .set_push_sender(move |push: PushInfo| {
                if let Some(handlers) = weak.upgrade() {
                    handlers.dispatch(&push);
                }
                Ok::<(), redis::aio::SendError>(())
            })
            .set_automatic_resubscription()
            .set_response_timeout(Some(conn.timeout()))
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_number_of_retries(2)
            .set_max_delay(settings.max_reconnect_delay);
        let bound = settings.connect_timeout * 3 + std::time::Duration::from_millis(500);
        let manager =
            tokio::time::timeout(bound, client.get_connection_manager_with_config(config))
                .await
                .map_err(|_| Error::Timeout {
                    op: "connect subscriber",
                    after: bound,
                })?
                .map_err(|e| Error::redis("connect subscriber", e))?;
        Ok(Subscriber {
            manager,
            handlers,
            timeout: conn.timeout(),
        })
    }

    /// Sends PING on the subscriber connection itself and returns the round trip: a heartbeat
    /// that proves messages can still arrive (a dead or stopped server, or a half-open
    /// connection, fails it). Bounded by `timeout`.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`].
    pub async fn ping(&self, timeout: std::time::Duration) -> Result<std::time::Duration> {
        let start = tokio::time::Instant::now();
        let mut manager = self.manager.clone();
        let _: String = self
            .bounded("subscriber ping", timeout, async move {
                redis::cmd("PING").query_async(&mut manager).await
            })
            .await?;
        Ok(start.elapsed())
    }

    /// The server's `run_id` (`INFO server`): it changes when Redis restarts, which loses
    /// every message published meanwhile.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`].
    pub async fn run_id(&self, timeout: std::time::Duration) -> Result<String> {
        let mut manager = self.manager.clone();
        let info: String = self
            .bounded("subscriber info", timeout, async move {
                redis::cmd("INFO")
                    .arg("server")
                    .query_async(&mut manager)
                    .await
            })
            .await?;
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|id| id.trim().to_string())
            .ok_or_else(|| Error::Config("INFO server has no run_id".into()))
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        timeout: std::time::Duration,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(Error::Timeout { op, after: timeout }),
            Ok(Err(e)) => Err(Error::redis(op, e)),
            Err(_) => Err(Error::Timeout { op, after: timeout }),
        }
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
        let mut manager = self.manager.clone();
        let result = match tokio::time::timeout(self.timeout * 4, manager.subscribe(channel)).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::redis("subscribe", e)),
            Err(_) => Err(Error::Timeout {
                op: "subscribe",
                after: self.timeout * 4,
            }),
        };
        if result.is_err() {
            let mut by_channel = self
                .handlers
                .by_channel
                .write()
                .unwrap_or_else(|p| p.into_inner());
            by_channel.remove(channel);
        }
        result
    }
}
