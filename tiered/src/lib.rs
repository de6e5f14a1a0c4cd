//! A two-level cache for Rust services: [`TieredCache`], an in-process L1 ([`l1`], on moka) in
//! front of a shared L2 ([`l2`], on Redis).
//!
//! This is the crate applications depend on. A read is answered by the first tier that has a
//! fresh value; a miss runs your loader once per key however many callers (single-flight in
//! the process) and processes (a Redis lock per key) ask at once. Inside the
//! stale-while-revalidate window the stale value comes back at once while one task refreshes
//! it; when the loader fails, fail-safe serves the last value instead of the error; when Redis
//! is slow or down, L1 hits are unaffected, misses go to the loader within bounded timeouts, and
//! a circuit breaker stops paying a timeout per call.
//!
//! To watch it: [`TieredCache::health`] (a serializable [`Health`] for readiness and status
//! endpoints), [`TieredCache::stats`], metrics through the `metrics` facade (exported every
//! second, names starting with `tiered_`), and one `tiered` tracing span per operation at
//! DEBUG (keys hashed unless [`TieredCacheBuilder::trace_keys`]).
//!
//! L2 can be one Redis ([`TieredCacheBuilder::redis_url`]) or a Redis Cluster
//! ([`TieredCacheBuilder::redis_cluster`]), over TLS (`rediss://`,
//! [`TieredCacheBuilder::tls_root_certificate`]) and as a least-privilege ACL user
//! ([`l2::KeySpace::acl_rules`]); on a cluster a failover drops every node's L1, and
//! [`TieredCacheBuilder::replica_acks`] makes writes survive it.
//!
//! What it is not for: a general Redis client, or a store of record: everything here may be
//! evicted at any time and reloaded from the source.
//!
//! ```no_run
//! # async fn f() -> tiered::Result<()> {
//! use std::time::Duration;
//! use tiered::{EntryOptions, Loaded, TieredCache};
//!
//! #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
//! struct User { id: u64, name: String }
//!
//! let users: TieredCache<User> = TieredCache::builder()
//!     .namespace("users")
//!     .redis_url("redis://127.0.0.1:6379")
//!     .l1_max_bytes(64 << 20)
//!     .default_options(
//!         EntryOptions::new(Duration::from_secs(300))
//!             .stale_while_revalidate(Duration::from_secs(60))
//!             .fail_safe(Duration::from_secs(3600))
//!             .l1_time_to_live(Duration::from_secs(30)),
//!     )
//!     .build()
//!     .await?;
//!
//! // Loaders are `'static`: move an `Arc` of your pool in. Any error type converts.
//! let user = users
//!     .get_or_set("42", || async { Ok::<_, std::io::Error>(User { id: 42, name: "Ada".into() }) })
//!     .await?;
//! users.set("42", &User { name: "Ada L.".into(), ..user }).await?;
//! let maybe = users.get("42").await?;
//! users.invalidate("42").await?;
//!
//! // A loader can say "not found" (cached if a negative TTL is set) or pick the TTL.
//! let err = users
//!     .get_or_set("404", || async { Ok::<_, std::io::Error>(Loaded::not_found()) })
//!     .await
//!     .unwrap_err();
//! assert!(err.is_not_found());
//!
//! // Batches: L1, then one Redis round trip, then one loader call for what is missing.
//! let many = users
//!     .get_or_set_many(&["1", "2", "3"], |missing: Vec<String>| async move {
//!         Ok::<_, std::io::Error>(missing.into_iter().map(|k| {
//!             let user = User { id: k.parse().unwrap_or(0), name: format!("user {k}") };
//!             (k, user)
//!         }))
//!     })
//!     .await?;
//! # let _ = (maybe, many); Ok(()) }
//! ```
//!
//! # Consistency
//! The promise: **a read on any node never returns a value older than the newest change
//! (`set`, `invalidate`, `clear`) acknowledged more than Δ before it**, where Δ = P + T (the
//! bus's heartbeat period and timeout, [`invalidation::BusConfig`]; 1 s by default), and never
//! older than [`EntryOptions::l1_time_to_live`] in any case. Stale values served on purpose
//! (stale-while-revalidate, fail-safe) are the exceptions the options ask for.
//!
//! The protocol behind it is model-checked (the workspace's `model` crate, stateright): the
//! properties `no_read_older_than_delta`, `l1_never_below_announced` and
//! `one_load_per_lock_lease` hold on every interleaving of its configurations, and fail with a
//! printed trace on a deliberately broken variant of each race found so far.
//!
//! How each part holds, and what it assumes:
//!
//! - **Versions only go up.** Every change is stamped inside the Lua script that makes it with
//!   write version `max(previous + 1, server clock in µs)` (see `l2`'s scripts). While a key
//!   exists its versions climb by one at least; once it is gone (`FLUSHALL`, `FLUSHDB`,
//!   eviction of the entry and its tombstone under any `maxmemory` policy, an operator's `DEL`,
//!   a decode-error eviction) the clock has moved past every version it had. So a node still
//!   holding an old copy always sees the next announcement as newer. *Assumption:* the server's
//!   clock does not step back while a key is absent. A step back of more than 1 s is seen by
//!   the heartbeat (`INFO server`'s `server_time_usec`) and is a gap (every node drops L1); a
//!   failover to a replica whose clock is behind is a gap already (the cluster's epoch
//!   changes). A least-privilege user without `INFO` sees neither of those two, and on a
//!   cluster only the node the bus listens on is watched (the masters' clocks are assumed to
//!   be kept by NTP without steps). A version found in Redis beyond 2^52 is foreign bytes:
//!   refused as undecodable, and never a base for the next version.
//! - **Every change is announced by the script that makes it** (no change without its
//!   message) on the namespace's pub/sub channel. Every node, the writer included, evicts its
//!   copy when the message arrives unless it holds that version or a newer one; a fill (load,
//!   L2 read) that began before the message may only put that version or a newer one in L1.
//!   One module, `coherence`, owns that admission rule for every path into L1.
//! - **On the node that wrote.** A `set`, `invalidate` or `clear` runs to its end once called
//!   (on a task of its own if the caller gives up): a caller that times out or drops the future never leaves L2 changed
//!   and this node's L1 behind it. When the call returns, this node reads the new state: loads
//!   that began earlier never fill L1 and later callers never join them. `set` with
//!   [`EntryOptions::skip_l1`] drops this node's older copy. A write whose outcome is unknown
//!   (an error from Redis) drops the key from this node's L1.
//! - **Lost messages are gaps; late ones are bounded by the lease.** A node drops its whole L1
//!   before its next hit when messages may have been lost: its subscriber disconnected or
//!   resubscribed, the server restarted (or a cluster failed over, or its clock stepped back),
//!   a heartbeat was missed, the in-process queue overflowed, or a message that a later one
//!   vouches for (its write was acknowledged) did not arrive within T. A number taken by a
//!   write that never reached Redis is vouched for by nobody, so it is no gap on other nodes;
//!   the writer itself drops its L1 when its own link breaks. L1 answers only while the bus's
//!   [`invalidation::Lease`] holds: every P a probe goes through every master and must come
//!   back through pub/sub, proving everything published before it has arrived, which renews
//!   the lease until that round's start + Δ. So an L1 hit is never more than Δ behind a change
//!   however slow the messages or this process.
//! - **Carried values** ([`TieredCacheBuilder::carry_values`], a signed bus only). A `set` of
//!   a value up to 1,536 bytes with its key proposes its write version (this node's lower
//!   bound of the server's clock, from its last write's reply, less 1 ms) and signs a message
//!   carrying the key, that version and the value. The script takes the version only while
//!   the key holds an entry of a lower version and the server's clock has reached it (and is
//!   at most 10 ms past it), so versions still only go up and stay below the clock (the
//!   argument above holds unchanged); then it publishes the carrying message instead of the
//!   eviction. A node that holds an older copy of the key, with a version of its own, puts the
//!   carried value in L1 as a fill that read that version from L2 would (a ticket taken before
//!   it looks, the same admission rule), and only from the subscriber's callback, in the order
//!   messages arrive; a message the bus's task applies (a large one, or during a flood) only
//!   evicts. A wholesale drop (a gap, a clear) that runs meanwhile wins: the value is given
//!   up. A node that does not hold the key ignores the value. Replaying a genuine carrying
//!   message can therefore never bring an old value back: a node that holds the key holds a
//!   version at least as new as every message it received, and a node that does not hold it
//!   takes nothing. Without a secret no value is carried (an unsigned one could be forged),
//!   and a value that arrives unsigned on a signed bus is dropped with its message.
//! - **In L2.** A load writes its result only while it holds the key's lock; a write or delete
//!   breaks the lock, so a load that started before a write never overwrites it.
//! - **Hostile messages.** Anyone allowed to `PUBLISH` on the channel can force evictions and
//!   clears (never make a node keep a stale copy: a forged version can only cause an eviction
//!   or refuse a fill, and the genuine message is still applied when it arrives). Limit who may
//!   publish with ACL channel rules (`&namespace:*`, [`l2::KeySpace::acl_rules`]), or give
//!   every node a shared secret ([`invalidation::BusConfig::secret`]): messages and probes are
//!   then signed with HMAC-SHA256, and unsigned, forged or replayed ones are dropped and
//!   counted ([`invalidation::BusStats`]). On a cluster, whoever may also *subscribe* to the
//!   probe channels could echo a probe faster than the cluster bus carries it; the ACL rules
//!   keep the namespace's channels to the cache's user.
//! - **Changes behind the cache's back** (a raw `SET` in Redis, a `FLUSHALL`) are not
//!   announced: a node may keep its copy until its L1 time to live ends. The next change made
//!   through the cache reaches every node within Δ as usual.
//! - **Stale values** are served only inside the windows the options allow: stale-while-
//!   revalidate (a refresh is then running) and fail-safe (the load failed or is late).
//! - **Cross-process dedup is best effort** (an efficiency lock, in Kleppmann's sense): a holder
//!   paused past its lock's TTL, or a Redis restart, can cost a duplicate load; it is counted
//!   ([`CacheStats::duplicate_loads`]) and never corrupts anything.
//! - **Redis unavailable: the outage policy.** Once the bus can no longer prove delivery, L1
//!   stops answering as confirmed within Δ of the last proof. When Redis cannot be asked
//!   either (timeouts, connection errors, the circuit breaker open), an L1 entry fresh by its
//!   own TTL is served as an outage answer ([`CacheStats::outage_served`]) for
//!   [`EntryOptions::outage_staleness`] past that (30 s by default; zero is the strict mode,
//!   which returns the Redis error instead). What a reader can observe then: no node that
//!   cannot reach Redis acknowledges a write (`set`, `invalidate` and `clear` fail with a typed
//!   error), so when Redis itself is down nothing is missed; a node cut off alone may miss
//!   writes that others acknowledge, and serves at most Δ + `outage_staleness` behind them.
//!   Misses call the loader, deduplicated in this process only, nothing is written to L2, and
//!   the value is used for Δ from the start of its load (it is as fresh as anything the bus
//!   could vouch for) and no longer: at most one loader run per key per Δ however many
//!   callers. When Redis answers again, a connection that dropped is a gap (L1 is dropped as
//!   it resubscribes) and one that only stalled delivers its late messages before the lease
//!   renews; locks this node took or may have taken during the outage are released.
//!
//! Bad input is an error, never a panic: every duration option is checked on the builder and
//! per call ([`Error::Config`] naming it; at most [`MAX_OPTION_DURATION`]), keys longer than
//! [`TieredCacheBuilder::max_key_len`] are [`Error::KeyTooLong`] on every entry point, and
//! durations read from Redis bytes saturate. The type tag written into every entry defaults to
//! the Rust type's name and schema version, so two value types in one namespace never decode
//! each other's bytes.

mod batch;
mod breaker;
mod builder;
mod cache;
mod coherence;
mod config;
mod error;
mod flight;
mod health;
mod metrics;
mod options;
mod stats;
mod sync;
mod trace;

pub use breaker::BreakerState;
pub use builder::{
    DEFAULT_LOCK_TTL, DEFAULT_MAX_KEY_LEN, DEFAULT_MAX_LOAD_TIME, DEFAULT_TTL, MAX_KEY_LEN,
    TieredCacheBuilder,
};
pub use cache::{BoxError, Loaded, TieredCache};
pub use config::CacheConfig;
pub use error::{Error, Result};
pub use health::{
    BusHealth, DEFAULT_HIT_RATIO_FLOOR, Health, HealthStatus, MIN_READS_FOR_HIT_RATIO, RedisHealth,
};
/// What most applications need, in one import: `use tiered::prelude::*;`.
pub mod prelude {
    pub use crate::{CacheConfig, EntryOptions, Error, Loaded, Result, TieredCache};
}

// The types of the tiers that appear in this crate's API, and no more: the tiers' raw
// operations (writes without a version or an announcement) are not for applications.
pub use invalidation::{Bus, BusConfig, BusStats, GapReason, Lease};
pub use l1::Stats as L1Stats;
pub use l2::{
    Connection, ConnectionBuilder, DecodeError, Error as RedisError, KeySpace, StoreStats,
};
pub use options::{
    DEFAULT_FAIL_SAFE_THROTTLE, DEFAULT_HARD_TIMEOUT, DEFAULT_OUTAGE_STALENESS, EntryOptions,
    MAX_OPTION_DURATION,
};
pub use stats::CacheStats;

#[cfg(test)]
mod tests {
    use super::*;

    /// Compile-time check: every public future is `Send`, so the cache works from
    /// `tokio::spawn` and multi-threaded servers.
    #[allow(dead_code)]
    fn futures_are_send(cache: TieredCache<String>) {
        fn is_send<T: Send>(_: &T) {}
        let opts = EntryOptions::new(std::time::Duration::from_secs(1));
        let load = || async { Ok::<_, std::io::Error>(String::new()) };
        is_send(&TieredCache::<String>::builder().build());
        is_send(&cache.get_or_set("k", load));
        is_send(&cache.get_or_set_with("k", opts, load));
        is_send(&cache.get("k"));
        is_send(&cache.get_with("k", opts));
        is_send(&cache.set("k", &String::new()));
        is_send(&cache.set_with("k", &String::new(), opts));
        is_send(&cache.invalidate("k"));
        is_send(&cache.clear());
        is_send(&cache.health());
        is_send(&cache.get_or_set_many(&["a"], |_keys: Vec<String>| async {
            Ok::<_, std::io::Error>(Vec::<(String, String)>::new())
        }));
    }
}
