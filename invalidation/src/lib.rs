//! The invalidation bus of the tiered cache: small, versioned messages over Redis pub/sub that
//! keep every node's L1 coherent, and a subscriber that says when it may have missed some.
//!
//! What it is for: carrying "key K changed, its new write version is V" (or "clear this
//! namespace", "clear everything") from the writing node to every other node, and raising a
//! [`GapReason`] whenever messages may have been lost (a disconnect, a resubscribe, a restarted
//! server, a missed heartbeat, a sequence gap), so the cache can drop its L1 before it serves
//! another hit.
//!
//! What it is not for: evicting anything itself, carrying values, or touching Redis on a
//! message (receivers never cause load on Redis). It yields [`Event`]s; `tiered` acts on them.
//! It depends on [`l2`]'s connections and nothing of the in-process tier.
//!
//! ```no_run
//! # async fn f() -> l2::Result<()> {
//! use std::sync::Arc;
//! use invalidation::{Bus, BusConfig, Event};
//!
//! let conn = l2::Connection::connect("redis://127.0.0.1:6379").await?;
//! let bus = Bus::connect(&conn, BusConfig::default()).await?;
//! let channel = invalidation::channel_for(&l2::KeySpace::new("users"));
//! bus.listen(&channel, Arc::new(|event: Event| Box::pin(async move {
//!     println!("{event:?}");
//! }))).await?;
//! // Writers announce through a Publisher, inside the script that writes L2:
//! let publisher = bus.publisher(&channel);
//! let message = publisher.evict("42");
//! let announce = l2::Announce { channel: &channel, message: &message };
//! # let _ = announce; Ok(()) }
//! ```
//!
//! # Consistency
//! Redis pub/sub delivers at most once, in order. A message published while a subscriber is
//! disconnected is lost for good, so the bus turns every way of losing one into a gap event:
//!
//! - the connection drops ([`GapReason::Disconnected`]; killed, or cut off by the client output
//!   buffer limit) and is resubscribed ([`GapReason::Resubscribed`]);
//! - a heartbeat (`INFO server` on the subscriber connection every P) is not answered within T
//!   ([`GapReason::HeartbeatMissed`]: a stopped server or a half-open connection);
//! - the server's `run_id` changes, or on a cluster its epoch (a failover)
//!   ([`GapReason::ServerRestarted`]);
//! - a writer's sequence number is missing for longer than T ([`GapReason::SequenceGap`]).
//!
//! Losing a message is one risk; a message that is merely late is the other (an overloaded
//! server, or on a cluster the bus between the master that published it and the node this
//! process listens on), and so is this process being stalled. Every P the bus publishes a
//! probe through every master on a channel of its own and waits for each to come back
//! through pub/sub ([`l2::Subscriber::probe`]); pub/sub keeps order along each path, so a
//! returned round proves every message published before it started has arrived, and the bus
//! applies them before it takes the proof. That renews the [`Lease`] until the round's start
//! plus **Δ = P + T** (the defaults, P = T = 500 ms, make Δ 1 s). The cache answers from L1
//! only while the lease holds, so an L1 hit is never more than Δ behind a change made
//! anywhere, even when messages are slow, without dropping L1 when they are: a late round
//! only lets the lease run out until the next one returns, and reads go to L2 meanwhile.
//! The cache's L1 time to live bounds staleness as well.
//!
//! Versions come from Redis (each write stamps the previous version plus one), never from
//! clocks; the lease uses this process's monotonic clock only, and wall clocks are used
//! only for the propagation-lag metric.

mod bus;
mod lease;
pub mod message;
mod sequence;
pub mod sign;

pub use bus::{
    Bus, BusConfig, BusStats, Consumer, DEFAULT_HEARTBEAT, DEFAULT_HEARTBEAT_TIMEOUT, Event,
    Eviction, GapReason, MAX_MESSAGE_LEN, Publisher, QUEUE_CAPACITY, REPLAY_WINDOW,
};
pub use lease::Lease;

/// The Redis pub/sub channel that carries the invalidations of a key space: its prefix, then
/// `!inval` (data keys always have `{` after the prefix, so the two never meet).
///
/// ```
/// assert_eq!(invalidation::channel_for(&l2::KeySpace::new("users")), "users:!inval");
/// ```
pub fn channel_for(space: &l2::KeySpace) -> String {
    format!("{}!inval", space.prefix())
}
