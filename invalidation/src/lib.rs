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
//! So a node whose L1 holds a value that was changed elsewhere either gets the message
//! (after the propagation delay, about one loopback round trip) or drops its L1 within
//! **Δ = max(propagation, P + T)** of the change; with the defaults (P = T = 500 ms) Δ is about
//! 1 s. The cache's L1 time to live bounds staleness unconditionally, so Δ never exceeds it.
//! Versions come from Redis (each write stamps the previous version plus one), never from
//! clocks; clocks are used only for the propagation-lag metric.

mod bus;
pub mod message;

pub use bus::{
    Bus, BusConfig, BusStats, Consumer, DEFAULT_HEARTBEAT, DEFAULT_HEARTBEAT_TIMEOUT, Event,
    Eviction, GapReason, Publisher,
};

/// The Redis pub/sub channel that carries the invalidations of a key space: its prefix, then
/// `!inval` (data keys always have `{` after the prefix, so the two never meet).
///
/// ```
/// assert_eq!(invalidation::channel_for(&l2::KeySpace::new("users")), "users:!inval");
/// ```
pub fn channel_for(space: &l2::KeySpace) -> String {
    format!("{}!inval", space.prefix())
}
