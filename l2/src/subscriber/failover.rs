//! Moving a cluster subscriber to another node when its node dies or stops answering.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use redis::ConnectionAddr;
use redis::aio::ConnectionManager;
use tokio::sync::Notify;

use super::{Inner, open};
use crate::connection::Connection;
use crate::error::{Error, Result};

/// Every node of `conn`'s cluster (`CLUSTER SLOTS`, masters first), with the credentials and
/// TLS of its first seed; none on one server.
pub(super) async fn cluster_nodes(conn: &Connection) -> Result<Vec<redis::ConnectionInfo>> {
    let seed = &conn.settings.nodes[0];
    Ok(conn
        .cluster_nodes()
        .await?
        .iter()
        .map(|(host, port, _)| at_node(seed, host, *port))
        .collect())
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

pub(super) fn node_name(info: &redis::ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        other => format!("{other:?}"),
    }
}
/// Moves a cluster subscriber to another node each time its connection drops or stops
/// answering. Ends when the subscriber is dropped.
pub(super) async fn rotate(inner: Weak<Inner>, wake: Arc<Notify>) {
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
            self.subscribe(&mut manager.clone(), channel).await?;
        }
        Ok((manager, mine))
    }

    /// Connects to the next node that answers and subscribes every channel there; only then
    /// does the new connection become the active one (so while no node answers, the old
    /// connection keeps listening should its node come back).
    async fn move_on(&self) -> Result<()> {
        let _switching = self.switching.lock().await;
        let settings = &self.conn.settings;
        let mut candidates: Vec<redis::ConnectionInfo> = match cluster_nodes(&self.conn).await {
            Ok(nodes) if !nodes.is_empty() => {
                *self.known.write() = nodes.clone();
                nodes
            }
            // Asked a node that is down or hung: the nodes seen last time.
            _ => self.known.read().clone(),
        };
        candidates.extend(settings.nodes.iter().cloned());
        // The node just lost goes last (it may be the only one left).
        let lost = self.node.read().clone();
        candidates.sort_by_key(|c| node_name(c) == lost);
        let channels = self.handlers.channels();
        let mut last = Error::NoNode;
        for info in candidates {
            let name = node_name(&info);
            match self.connect_to(info, &channels).await {
                Ok((manager, mine)) => {
                    *self.current.write() = manager;
                    *self.node.write() = name.clone();
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
    pub(super) fn beat(&self, ok: bool) {
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
