//! Who the subscriber is talking to: the server's `run_id` (`INFO server`), on a cluster its
//! epoch and a digest of its `CLUSTER LINKS`, and steps back of the server's clock.

use std::sync::atomic::Ordering;

use redis::Value;

use super::{Subscriber, text};
use crate::error::{Error, Result};

impl Subscriber {
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
            .ok_or_else(|| Error::UnexpectedReply {
                op: "INFO server",
                detail: "no run_id".into(),
            })?;
        // Write versions are taken from the server's clock (see the write scripts): a clock
        // that steps back could give a vanished key a version below one a node still holds.
        // Each step back is a change of identity, so every node drops its L1.
        let time = info
            .lines()
            .find_map(|l| l.strip_prefix("server_time_usec:"))
            .and_then(|t| t.trim().parse::<u64>().ok());
        let steps = match time {
            Some(t) => self.inner.clock.lock().observe(&run_id, t),
            None => 0,
        };
        Ok(if steps == 0 {
            run_id
        } else {
            format!("{run_id}@clockstep{steps}")
        })
    }
}

/// The highest server time the heartbeat has read from one server, and how many times it saw
/// the clock go back by more than [`CLOCK_STEP`].
#[derive(Debug, Default)]
pub(super) struct ServerClock {
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

/// A digest of `CLUSTER LINKS`' inbound links: each peer and when its link was made. A
/// peer's `PUBLISH` reaches this node over the link the peer opened (inbound here), so one
/// that was dropped and made again changes the digest. Outbound links are left out: this
/// node keeps remaking the one to a dead peer, which loses nothing.
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
