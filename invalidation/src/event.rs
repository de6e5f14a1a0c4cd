//! What a consumer of the bus is told: [`Event`]s, and the [`GapReason`] of a gap.

use std::fmt;
use std::sync::Arc;

/// Why messages may have been missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GapReason {
    /// Not raised any more on the drop itself: the resubscription that follows it is the gap
    /// ([`GapReason::Resubscribed`]), so L1 entries stay usable under the cache's outage
    /// policy while Redis is unreachable.
    Disconnected,
    /// The channel was subscribed again after a reconnect.
    Resubscribed,
    /// Not raised any more: a missed heartbeat only stops the lease's renewal (see
    /// [`crate::BusStats::heartbeats_missed`]); what it could hide (a restart, a dropped
    /// connection) is a gap of its own once Redis answers again.
    HeartbeatMissed,
    /// The server's `run_id` changed: it restarted. On a cluster also: the cluster's epoch
    /// changed (a failover, which may have lost the old master's last writes), or the
    /// subscriber moved to another node.
    ServerRestarted,
    /// A message its writer knew was published (vouched for by a later one) did not arrive
    /// in time.
    SequenceGap,
    /// Messages came faster than this process applies them and the queue between the
    /// subscriber connection and the bus was full ([`QUEUE_CAPACITY`]): some were dropped.
    ///
    /// [`QUEUE_CAPACITY`]: crate::QUEUE_CAPACITY
    Overflow,
}

impl fmt::Display for GapReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GapReason::Disconnected => "subscriber disconnected",
            GapReason::Resubscribed => "resubscribed after a reconnect",
            GapReason::HeartbeatMissed => "heartbeat missed",
            GapReason::ServerRestarted => "server restarted or cluster failed over",
            GapReason::SequenceGap => "sequence gap",
            GapReason::Overflow => "the bus's queue overflowed",
        })
    }
}

/// What a consumer is told.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Evict these keys unless L1 holds a version at least as new. Bursts are coalesced: one
    /// entry per key and origin, with the newest version seen from that origin (one writer's
    /// message never stands for another's).
    Evict(Vec<Eviction>),
    /// Drop the namespace's L1.
    ClearNamespace {
        /// The writing cache.
        origin: u64,
    },
    /// Drop every L1.
    ClearAll {
        /// The writing cache.
        origin: u64,
    },
    /// Messages may have been missed: drop everything in L1 that was there before.
    Gap(GapReason),
}

/// One key to evict, or to replace when the message carried the new value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// The cache key (as the cache's caller gave it).
    pub key: String,
    /// The key's new write version.
    pub version: u64,
    /// The writing cache.
    pub origin: u64,
    /// The new value's envelope (as stored in Redis), when the writer carried it in a signed
    /// message: a consumer that holds an older version of the key may take it instead of
    /// evicting. Never set from an unsigned message, nor on an eviction the bus's task
    /// delivers (values go in only in the order their messages arrived).
    pub value: Option<Arc<[u8]>>,
}

/// A consumer of one channel's events.
///
/// [`Event::Evict`] is usually called from the subscriber connection's push callback, as soon
/// as the message is handed over by the connection and checked (decoded; signed, if the bus
/// has a secret): the bus's queue and task do not stand between a peer's change and this
/// node's L1. Large messages, and every message while the callback is over its budget (a
/// flood), go through the queue and are applied by the bus's task, as every other event is,
/// in order. Either way the call must be quick and must never block (nor subscribe through
/// the same connection, which would deadlock): a slow consumer holds back every later
/// message of the connection.
pub type Consumer = Arc<dyn Fn(Event) + Send + Sync>;
