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
//! bus.listen(&channel, Arc::new(|event: Event| println!("{event:?}"))).await?;
//! // Writers announce through a Publisher, inside the script that writes L2:
//! let publisher = bus.publisher(&channel);
//! let message = publisher.evict("42");
//! let announce = l2::Announce { channel: &channel, message: &message };
//! // ... once the script that carries `announce` returned Ok:
//! publisher.acknowledged(&message);
//! # let _ = announce; Ok(()) }
//! ```
//!
//! # Consistency
//! Redis pub/sub delivers at most once, in order. A message published while a subscriber is
//! disconnected is lost for good, so the bus turns every way of losing one into a gap event:
//!
//! - the connection dropped (killed, cut off by the client output buffer limit, the server
//!   gone) and is subscribed again ([`GapReason::Resubscribed`]). The gap is raised when the
//!   connection is back, not when it drops: while Redis is unreachable nothing can be
//!   published, the lease (below) stops L1 from answering as confirmed, and the cache's outage
//!   policy decides what its L1 entries may still serve;
//! - the server's `run_id` changes, or on a cluster its epoch (a failover)
//!   ([`GapReason::ServerRestarted`]);
//! - a message its writer knew was published (a later message vouches for it) has not
//!   arrived within T ([`GapReason::SequenceGap`]); a number whose write failed, and so was
//!   never published, is never missed (the argument is in the `sequence` module);
//! - messages come faster than this process applies them and its queue is full
//!   ([`GapReason::Overflow`]; the queue is bounded, [`QUEUE_CAPACITY`]).
//!
//! A heartbeat (`INFO server` on the subscriber connection every P) that is not answered within
//! T is counted ([`BusStats::heartbeats_missed`]) and marks the bus down; it is no gap by itself:
//! on a connection that stays up, messages are late, never lost.
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
//!
//! # Security
//! Threat model: **whoever may `PUBLISH` on the channel can force evictions and clears** on
//! every node, unless a secret is set. Redis ACLs limit who may: give cache users
//! `&<prefix>*` (their key space's prefix, which covers its channel and this bus's probe
//! channel) and nothing wider. Forced evictions and clears cost misses (load on L2 and the
//! loaders), never wrong data: without a secret the bus never carries values.
//!
//! Without a secret ([`BusConfig::default`]) every well-formed message is accepted, as it
//! always was. In every mode the bus is hardened against hostile bytes: decoding is strict and
//! never panics (any number, `u64::MAX` included, is just a number); a payload over
//! [`MAX_MESSAGE_LEN`] is dropped before it is queued; the queue is bounded and an overflow is
//! a gap, not memory growth; at most 4096 writers' sequences are tracked (the least recently
//! heard from are forgotten); and an eviction names its origin, so one writer's message never
//! stands for another's.
//!
//! With [`BusConfig::secret`], every message and probe is signed (HMAC-SHA256 under the
//! secret, bound to the channel), and receivers drop and count messages that are unsigned
//! ([`BusStats::unsigned`]), carry a wrong tag ([`BusStats::forged`]), or repeat the (origin,
//! sequence) of a clear already applied ([`BusStats::replayed`]). Nothing is dropped for its
//! age: the send time is the writer's wall clock, and a writer whose clock is off would
//! otherwise be ignored by every peer. Probes carry 128 random
//! bits and their tag, and count only when they come back byte for byte.
//!
//! **The version is not signed**, and need not be. An eviction's version is assigned inside
//! Redis by the script that writes the value and publishes the message, after the client built
//! and signed the rest, so the tag covers everything the client built (header, vouches, keys)
//! and the versions follow it. Someone who can publish but lacks the secret can therefore
//! replay a genuine signed eviction (seen on the channel) with any version they like. That can only
//!
//! - evict that key once more on every node (a miss, then a reload from L2), or
//! - with a high version, make a node refuse a fill of that key that was in flight (another
//!   miss): a version only ever says "L1 must not hold anything older than this";
//!
//! it can never suppress the genuine message, because receivers do not deduplicate evictions:
//! every copy is applied, and applying one never stops a later one from being applied (a
//! version compares against what L1 holds, not against messages seen). Replaying a clear, whose
//! bytes are all signed, is refused outright. A key that is written again invalidates as usual,
//! whatever was replayed before it.
//!
//! **Carried values** ([`Publisher::evict_or_replace`]) exist only on a signed bus, and their
//! version is signed with them: the writer proposes it, and the script publishes the message
//! only if it took that version. A replayed carrying message is a genuine value at its genuine
//! version; consumers take it only over an older copy they hold (see `tiered`'s
//! `# Consistency`). Unsigned, a replacement is never accepted as a value (it is at most an
//! eviction on a bus without a secret).
//!
//! What the secret does not do: hide anything (messages carry keys in clear; use TLS and ACLs
//! for that), or stop someone who has it. Every process on the bus must share it.

mod bus;
mod config;
mod event;
mod lease;
#[cfg(any(test, feature = "test-util"))]
pub mod message;
#[cfg(not(any(test, feature = "test-util")))]
mod message;
mod plan;
mod publisher;
mod sequence;
#[cfg(any(test, feature = "test-util"))]
pub mod sign;
#[cfg(not(any(test, feature = "test-util")))]
mod sign;
mod stats;

pub use message::now_micros;

pub use bus::{Bus, MAX_MESSAGE_LEN, QUEUE_BYTES, QUEUE_CAPACITY};
pub use config::{BusConfig, DEFAULT_HEARTBEAT, DEFAULT_HEARTBEAT_TIMEOUT};
pub use event::{Consumer, Event, Eviction, GapReason};
pub use lease::Lease;
pub use publisher::Publisher;
pub use stats::BusStats;

/// The Redis pub/sub channel that carries the invalidations of a key space: its prefix, then
/// `!inval` (data keys always have `{` after the prefix, so the two never meet).
///
/// ```
/// assert_eq!(invalidation::channel_for(&l2::KeySpace::new("users")), "users:!inval");
/// ```
pub fn channel_for(space: &l2::KeySpace) -> String {
    format!("{}!inval", space.prefix())
}
