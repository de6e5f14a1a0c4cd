//! The in-process tier (L1) of the tiered cache: a [`moka::sync::Cache`] bounded by a byte
//! budget, where each entry carries its own deadlines.
//!
//! Its calls are synchronous and never wait on anything but a short internal lock: moka's sync
//! cache reads about 60 ns faster than its async one, and the tiered cache does its own
//! single-flight, so it needs none of the async cache's `get_with`.
//!
//! What it is for: holding decoded values next to the code that reads them, so a hit is a hash
//! lookup and an `Arc` clone (about 0.2 µs), never a decode, never a key allocation.
//!
//! What it is not for: talking to Redis, single-flight, or deciding when a value is stale. It
//! knows nothing of Redis; `tiered` composes it with the Redis tier and owns those policies.
//!
//! ```
//! use std::time::Duration;
//! use l1::{Entry, LocalCache};
//!
//! let cache: LocalCache<String> = LocalCache::builder().max_bytes(1 << 20).build();
//! let entry = Entry::new("users", "alice".to_string())
//!     .weight(5)
//!     .time_to_live(Duration::from_secs(30))
//!     .fresh_for(Duration::from_secs(10));
//! cache.insert("users:42", entry);
//! let hit = cache.get("users:42").unwrap();
//! assert_eq!(hit.value(), "alice");
//! assert!(hit.is_fresh());
//! cache.invalidate_namespace("users").unwrap();
//! assert!(cache.get("users:42").is_none());
//! ```
//!
//! # Consistency
//! A reader sees an entry from its `insert` until its own deadline
//! ([`Entry::time_to_live`], shortened by the optional jitter), an `invalidate*` call, or its
//! eviction to keep the byte budget, whichever comes first. `invalidate_namespace` and
//! `invalidate_all` hide the entries inserted before the call at once, even though moka removes
//! them lazily. Eviction to the budget is also lazy: [`LocalCache::weighted_size`] can exceed
//! the budget until pending maintenance runs ([`LocalCache::run_pending_tasks`]).

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::notification::RemovalCause;

/// Errors from the L1 tier.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// moka refused an invalidation predicate.
    #[error("could not register an invalidation predicate: {0}")]
    Predicate(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What an entry holds besides its value: namespace, weight in bytes, deadlines, version.
///
/// Built with [`Entry::new`] and its setters, then handed to [`LocalCache::insert`]. A hit
/// returns it as an `Arc<Entry<V>>`, so reading costs one reference count increment.
pub struct Entry<V> {
    value: V,
    namespace: Arc<str>,
    weight: u32,
    ttl: Duration,
    fresh_for: Option<Duration>,
    version: u64,
    // Set by `LocalCache::insert` from `ttl` and the jitter.
    inserted_at: Instant,
    expires_at: Instant,
    // Kept precomputed: a hit checks it with one clock read and one comparison.
    fresh_until: Instant,
}

impl<V: fmt::Debug> fmt::Debug for Entry<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("value", &self.value)
            .field("namespace", &self.namespace)
            .field("weight", &self.weight)
            .field("ttl", &self.ttl)
            .field("fresh_for", &self.fresh_for)
            .field("version", &self.version)
            .finish()
    }
}

/// The L1 lifetime of an entry when none is set.
pub const DEFAULT_TIME_TO_LIVE: Duration = Duration::from_secs(60);

impl<V> Entry<V> {
    /// A new entry for `value` in `namespace`, with weight 0, a time to live of
    /// [`DEFAULT_TIME_TO_LIVE`], fresh for all of it, and version 0.
    pub fn new(namespace: impl Into<Arc<str>>, value: V) -> Self {
        let now = Instant::now();
        Entry {
            value,
            namespace: namespace.into(),
            weight: 0,
            ttl: DEFAULT_TIME_TO_LIVE,
            fresh_for: None,
            version: 0,
            inserted_at: now,
            expires_at: now,
            fresh_until: now,
        }
    }

    /// Fixes the deadlines for an insertion at `now` that lives `ttl` (saturating: a duration
    /// decoded from foreign bytes can be anything, and a deadline never panics).
    fn stamp(&mut self, now: Instant, ttl: Duration) {
        self.inserted_at = now;
        self.expires_at = deadline_after(now, ttl);
        self.fresh_until = self.compute_fresh_until();
    }

    fn compute_fresh_until(&self) -> Instant {
        match self.fresh_for {
            Some(f) => deadline_after(self.inserted_at, f).min(self.expires_at),
            None => self.expires_at,
        }
    }

    /// The size of the value in bytes, as counted against the byte budget (the key's length is
    /// added by the cache). When a value is filled from Redis, pass the size of its encoded
    /// bytes: the decoded value's heap size is not known. Default: 0.
    pub fn weight(mut self, bytes: usize) -> Self {
        self.weight = u32::try_from(bytes).unwrap_or(u32::MAX);
        self
    }

    /// How long the entry stays in L1 at most (before the cache's jitter shortens it).
    /// Default: [`DEFAULT_TIME_TO_LIVE`].
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long after insertion the entry counts as fresh; after that and until it expires,
    /// [`Entry::is_fresh`] is false (the caller may serve it as stale). Capped by the time to
    /// live. Default: the whole time to live.
    pub fn fresh_for(mut self, fresh: Duration) -> Self {
        self.fresh_for = Some(fresh);
        self.fresh_until = self.compute_fresh_until();
        self
    }

    /// The write version the value carries (from the Redis envelope or the writer). Default: 0.
    pub fn version(mut self, version: u64) -> Self {
        self.version = version;
        self
    }

    /// The cached value.
    pub fn value(&self) -> &V {
        &self.value
    }

    /// The namespace given to [`Entry::new`].
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The write version given to [`Entry::version`].
    pub fn write_version(&self) -> u64 {
        self.version
    }

    /// The weight in bytes given to [`Entry::weight`].
    pub fn weight_bytes(&self) -> u32 {
        self.weight
    }

    /// When the entry was inserted into L1.
    pub fn inserted_at(&self) -> Instant {
        self.inserted_at
    }

    /// When the entry leaves L1 (after jitter).
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// Until when the entry is fresh (never after [`Entry::expires_at`]).
    pub fn fresh_until(&self) -> Instant {
        self.fresh_until
    }

    /// Whether the entry is still fresh now.
    pub fn is_fresh(&self) -> bool {
        self.is_fresh_at(Instant::now())
    }

    /// Whether the entry is fresh at `now` (for a caller that reads the clock once for
    /// several checks).
    #[inline]
    pub fn is_fresh_at(&self, now: Instant) -> bool {
        now < self.fresh_until
    }
}

/// Counters fed by the eviction listener. Read them with [`LocalCache::stats`].
#[derive(Debug, Default)]
struct Counters {
    evicted_size: AtomicU64,
    expired: AtomicU64,
    invalidated: AtomicU64,
    replaced: AtomicU64,
}

/// A snapshot of the L1 counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Entries removed to keep the byte or entry budget.
    pub evicted_size: u64,
    /// Entries removed because their time to live ran out.
    pub expired: u64,
    /// Entries removed by `invalidate`, `invalidate_namespace` or `invalidate_all`.
    pub invalidated: u64,
    /// Entries replaced by a newer insert of the same key.
    pub replaced: u64,
    /// Entries held now (lags until pending tasks run).
    pub entry_count: u64,
    /// Weighted size held now, in bytes (key + value weight + [`ENTRY_OVERHEAD`] per entry;
    /// lags until pending tasks run).
    pub weighted_size: u64,
}

/// Builder for [`LocalCache`]. Start with [`LocalCache::builder`].
#[derive(Debug, Clone)]
pub struct LocalCacheBuilder {
    max_bytes: Option<u64>,
    max_entries: Option<u64>,
    jitter: Duration,
}

impl LocalCacheBuilder {
    /// The byte budget: the sum over entries of key length, [`Entry::weight`] and
    /// [`ENTRY_OVERHEAD`] (so the budget bounds the memory the entries really take, small ones
    /// too). Default: 64 MiB.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// An optional bound on the number of entries, on top of the byte budget.
    /// Default: none.
    pub fn max_entries(mut self, entries: u64) -> Self {
        self.max_entries = Some(entries);
        self
    }

    /// Shortens each entry's time to live by a random amount up to `max` (and never below half
    /// its time to live), so entries written together do not all expire together.
    /// Default: zero (no jitter).
    pub fn jitter(mut self, max: Duration) -> Self {
        self.jitter = max;
        self
    }

    /// Builds the cache.
    pub fn build<V: Send + Sync + 'static>(self) -> LocalCache<V> {
        let max_bytes = self.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
        // moka has one capacity. With both bounds, every entry weighs at least
        // `max_bytes / max_entries`: a total weight within `max_bytes` then bounds both the
        // bytes and the count.
        let min_weight = match self.max_entries {
            Some(n) if n > 0 => u32::try_from(max_bytes / n).unwrap_or(u32::MAX),
            Some(_) => u32::MAX,
            None => 0,
        };
        let counters = Arc::new(Counters::default());
        let listener_counters = Arc::clone(&counters);
        let inner = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |key: &Arc<str>, entry: &Arc<Entry<V>>| -> u32 {
                let bytes = u32::try_from(key.len())
                    .unwrap_or(u32::MAX)
                    .saturating_add(entry.weight)
                    .saturating_add(ENTRY_OVERHEAD);
                bytes.max(min_weight)
            })
            .expire_after(PerEntryExpiry)
            .support_invalidation_closures()
            .eviction_listener(move |_key, _value, cause| {
                let counter = match cause {
                    RemovalCause::Size => &listener_counters.evicted_size,
                    RemovalCause::Expired => &listener_counters.expired,
                    RemovalCause::Explicit => &listener_counters.invalidated,
                    RemovalCause::Replaced => &listener_counters.replaced,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            })
            .build();
        LocalCache {
            inner,
            counters,
            jitter: self.jitter,
        }
    }
}

/// The default byte budget: 64 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// What an entry costs in memory besides its key and value, counted against the byte budget:
/// moka's bookkeeping (its map's node, the access and write order queues, the timer wheel
/// for per-entry expiry, the frequency sketch) and this crate's [`Entry`]. Measured with
/// `cargo run --release -p benches --example scaling -- memory`: about 540 bytes per entry at
/// 100,000 and 1,000,000 entries. Without it, a budget filled with small entries held about 14
/// times the memory it names.
pub const ENTRY_OVERHEAD: u32 = 512;

struct PerEntryExpiry;

impl<V> Expiry<Arc<str>, Arc<Entry<V>>> for PerEntryExpiry {
    fn expire_after_create(
        &self,
        _key: &Arc<str>,
        value: &Arc<Entry<V>>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &Arc<str>,
        value: &Arc<Entry<V>>,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(updated_at))
    }
}

/// The in-process tier: a byte-bounded moka cache from key to `Arc<Entry<V>>`.
///
/// Cheap to clone: clones share the same cache.
pub struct LocalCache<V> {
    inner: moka::sync::Cache<Arc<str>, Arc<Entry<V>>>,
    counters: Arc<Counters>,
    jitter: Duration,
}

impl<V> Clone for LocalCache<V> {
    fn clone(&self) -> Self {
        LocalCache {
            inner: self.inner.clone(),
            counters: Arc::clone(&self.counters),
            jitter: self.jitter,
        }
    }
}

impl<V> fmt::Debug for LocalCache<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCache")
            .field("entry_count", &self.inner.entry_count())
            .field("weighted_size", &self.inner.weighted_size())
            .field("jitter", &self.jitter)
            .finish()
    }
}

impl LocalCache<()> {
    /// A builder with the defaults: 64 MiB, no entry bound, no jitter.
    pub fn builder() -> LocalCacheBuilder {
        LocalCacheBuilder {
            max_bytes: None,
            max_entries: None,
            jitter: Duration::ZERO,
        }
    }
}

impl<V: Send + Sync + 'static> LocalCache<V> {
    /// The entry under `key`, if present and not expired. Allocates nothing; the returned
    /// `Arc` is a reference count increment.
    pub fn get<Q>(&self, key: &Q) -> Option<Arc<Entry<V>>>
    where
        Arc<str>: Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.inner.get(key)
    }

    /// Inserts `entry` under `key`, replacing what was there. The entry's deadline is fixed
    /// here: now + its time to live, less the jitter.
    pub fn insert(&self, key: impl Into<Arc<str>>, mut entry: Entry<V>) -> Arc<Entry<V>> {
        let ttl = jittered(entry.ttl, self.jitter);
        entry.stamp(Instant::now(), ttl);
        let entry = Arc::new(entry);
        self.inner.insert(key.into(), Arc::clone(&entry));
        entry
    }

    /// Removes the entry under `key`, if any.
    pub fn invalidate<Q>(&self, key: &Q)
    where
        Arc<str>: Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.inner.invalidate(key);
    }

    /// Removes every entry. Entries inserted before the call are hidden at once.
    pub fn invalidate_all(&self) {
        self.inner.invalidate_all();
    }

    /// Removes every entry whose [`Entry::namespace`] equals `namespace` exactly (no pattern
    /// matching: `*`, `?`, `[` and `:` are ordinary characters). Entries inserted before the
    /// call are hidden at once; others are untouched.
    ///
    /// # Errors
    /// [`Error::Predicate`] if moka refuses the predicate (it does not with this builder).
    pub fn invalidate_namespace(&self, namespace: &str) -> Result<()> {
        let namespace: Arc<str> = namespace.into();
        self.inner
            .invalidate_entries_if(move |_key, entry| *entry.namespace == *namespace)
            .map(|_| ())
            .map_err(|e| Error::Predicate(e.to_string()))
    }

    /// Runs moka's pending maintenance now: evictions to the budget, expirations, the eviction
    /// listener. moka also runs it during cache calls; call this on a timer when the cache is
    /// idle, or in tests before reading sizes.
    pub fn run_pending_tasks(&self) {
        self.inner.run_pending_tasks();
    }

    /// Entries held (lags until pending tasks run).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Total weight held, in bytes (lags until pending tasks run).
    pub fn weighted_size(&self) -> u64 {
        self.inner.weighted_size()
    }

    /// The eviction counters and sizes.
    pub fn stats(&self) -> Stats {
        Stats {
            evicted_size: self.counters.evicted_size.load(Ordering::Relaxed),
            expired: self.counters.expired.load(Ordering::Relaxed),
            invalidated: self.counters.invalidated.load(Ordering::Relaxed),
            replaced: self.counters.replaced.load(Ordering::Relaxed),
            entry_count: self.inner.entry_count(),
            weighted_size: self.inner.weighted_size(),
        }
    }
}

/// `ttl` shortened by a uniform random amount in `[0, jitter]`, never below `ttl / 2`.
fn jittered(ttl: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return ttl;
    }
    let max_cut = jitter.min(ttl / 2);
    let cut_nanos = fastrand::u64(0..=u64::try_from(max_cut.as_nanos()).unwrap_or(u64::MAX));
    ttl - Duration::from_nanos(cut_nanos)
}

/// `at + d` as a deadline that never panics: capped at a century after `at` (and `at` itself
/// should even that overflow). Durations decoded from foreign bytes can be anything.
///
/// ```
/// use std::time::{Duration, Instant};
/// let now = Instant::now();
/// assert!(l1::deadline_after(now, Duration::MAX) > now);
/// ```
pub fn deadline_after(at: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
    at.checked_add(d.min(CENTURY)).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        let ttl = Duration::from_secs(10);
        for _ in 0..1000 {
            let j = jittered(ttl, Duration::from_secs(2));
            assert!(j <= ttl && j >= Duration::from_secs(8), "{j:?}");
            let j = jittered(ttl, Duration::from_secs(60));
            assert!(j >= Duration::from_secs(5), "{j:?}");
        }
        assert_eq!(jittered(ttl, Duration::ZERO), ttl);
    }

    #[test]
    fn freshness_is_capped_by_the_deadline() {
        let mut e = Entry::new("ns", 1u8)
            .time_to_live(Duration::from_secs(5))
            .fresh_for(Duration::from_secs(50));
        e.stamp(Instant::now(), e.ttl);
        assert_eq!(e.fresh_until(), e.expires_at);
        let e = e.fresh_for(Duration::ZERO);
        assert!(!e.is_fresh());
    }
}

#[cfg(test)]
mod send_tests {
    /// The cache can be shared across threads and tasks.
    #[allow(dead_code)]
    fn cache_is_send_and_sync(cache: super::LocalCache<String>) {
        fn is_send_sync<T: Send + Sync>(_: &T) {}
        is_send_sync(&cache);
    }
}
