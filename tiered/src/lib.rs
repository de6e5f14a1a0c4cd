//! A two-level cache for Rust services: an in-process L1 ([`l1`], on moka) in front of a shared
//! L2 ([`l2`], on Redis), kept coherent across nodes by the [`invalidation`] bus.
//!
//! This crate is the one applications depend on. Today it re-exports the two tiers; the
//! composed `TieredCache` (get-or-load with single-flight, cross-process lock dedup,
//! stale-while-revalidate, fail-safe) is built on them next.
//!
//! What it is not for: a general Redis client, or a store of record: everything here may be
//! evicted at any time and reloaded from the source.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tiered::{l1, l2};
//!
//! let store = l2::RedisStore::new(l2::Connection::connect("redis://127.0.0.1:6379").await?);
//! let codec = l2::Codec::<String>::new(l2::TypeTag::from_name("greeting/v1"));
//! let local: l1::LocalCache<String> = l1::LocalCache::builder().max_bytes(16 << 20).build();
//! let key = l2::KeySpace::new("greetings").key("en");
//! store.set(&key, &codec, &"hello".into(), &l2::EntryMeta::new(Duration::from_secs(60))).await?;
//! if let Some(hit) = store.get(&key, &codec).await? {
//!     let ttl = hit.fresh_remaining();
//!     let entry = l1::Entry::new("greetings", hit.value)
//!         .weight(hit.size)
//!         .time_to_live(ttl);
//!     local.insert(key.as_arc().clone(), entry).await;
//! }
//! # Ok(()) }
//! ```
//!
//! # Consistency
//! See each tier: an L1 entry lives until its own deadline, which a caller filling it from L2
//! must keep within the L2 entry's remaining life ([`l2::Fetched::fresh_remaining`]).

mod batch;
mod breaker;
mod builder;
mod cache;
mod error;
mod flight;
mod options;

pub use breaker::BreakerState;
pub use builder::{DEFAULT_LOCK_TTL, DEFAULT_MAX_LOAD_TIME, DEFAULT_TTL, TieredCacheBuilder};
pub use cache::{BoxError, CacheStats, Loaded, TieredCache};
pub use error::{Error, Result};
pub use invalidation;
pub use l1;
pub use l2;
pub use options::{DEFAULT_FAIL_SAFE_THROTTLE, DEFAULT_HARD_TIMEOUT, EntryOptions};

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
        is_send(&cache.get_or_set_many(&["a"], |_keys: Vec<String>| async {
            Ok::<_, std::io::Error>(Vec::<(String, String)>::new())
        }));
    }
}

#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
