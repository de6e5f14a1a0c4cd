//! [`TieredCache`]: the read-through cache users call.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use l1::{Entry, LocalCache};
use l2::{
    Announce, Codec, EntryMeta, Fetched, Key, KeySpace, Lock, LockAttempt, LockWaiters, RedisStore,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::breaker::{Breaker, BreakerState};
use crate::coherence::Admission;
use crate::error::{Error, Result};
use crate::flight::{FlightToken, Flights};
use crate::options::EntryOptions;
use crate::trace;
use tracing::Instrument;

/// What a loader's error may be: anything that converts into a boxed error (`std` errors,
/// `anyhow::Error`, strings).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type LoadFuture<V> = Pin<Box<dyn Future<Output = std::result::Result<Loaded<V>, BoxError>> + Send>>;
type Loader<V> = Box<dyn FnOnce() -> LoadFuture<V> + Send>;

/// What a loader returns: a value (any `V` converts into it), or "not found", optionally with
/// its own TTL (adaptive caching: the loader knows best how long its answer holds).
///
/// ```
/// use std::time::Duration;
/// use tiered::Loaded;
///
/// let plain: Loaded<u32> = 7.into();
/// let short = Loaded::new(7u32).time_to_live(Duration::from_secs(5));
/// let missing = Loaded::<u32>::not_found();
/// # let _ = (plain, short, missing);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded<V> {
    value: Option<V>,
    ttl: Option<Duration>,
}

impl<V> Loaded<V> {
    /// A loaded value.
    pub fn new(value: V) -> Self {
        Loaded {
            value: Some(value),
            ttl: None,
        }
    }

    /// The value does not exist. Cached for [`EntryOptions::negative_ttl`] if set; the call
    /// returns [`Error::NotFound`].
    pub fn not_found() -> Self {
        Loaded {
            value: None,
            ttl: None,
        }
    }

    /// Overrides the TTL of this value (for a "not found", the negative TTL).
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

impl<V> From<V> for Loaded<V> {
    fn from(value: V) -> Self {
        Loaded::new(value)
    }
}

/// What L1 holds: the value (or a cached "not found") and its logical deadlines. The L1
/// entry's own freshness ([`Entry::is_fresh`]) is how long this node trusts it without asking
/// L2; its expiry is the end of its stale and fail-safe life.
pub(crate) struct Held<V> {
    pub(crate) value: Option<V>,
    fresh_until: Instant,
    /// Loaded by this node while Redis was unreachable: its L1 freshness ends Δ after the
    /// load began, and until then it answers without the bus's lease (it is as fresh as
    /// anything the lease could vouch for).
    pub(crate) local: bool,
}

pub(crate) type L1Entry<V> = Arc<Entry<Held<V>>>;

/// A value kept to serve when a fresh one cannot be had.
struct Fallback<V> {
    value: Option<V>,
    version: u64,
    fresh: bool,
    in_swr: bool,
    /// Fresh by its own TTL, unconfirmed by the lease, and the lease ran out less than the
    /// outage staleness ago: servable if Redis cannot be asked (the outage policy).
    outage: bool,
}

impl<V: Clone> Fallback<V> {
    /// The stale-while-revalidate window is the caller's (`opts`), counted from the end of
    /// the value's freshness.
    fn from_l1(entry: &Entry<Held<V>>, opts: &EntryOptions) -> Self {
        let now = Instant::now();
        let held = entry.value();
        Fallback {
            value: held.value.clone(),
            version: entry.write_version(),
            fresh: now < held.fresh_until,
            in_swr: now < later(held.fresh_until, opts.swr),
            outage: false,
        }
    }

    /// What L1 held for a read that missed. While the bus's lease does not hold, the entry
    /// may have missed an invalidation: it is neither fresh nor servable as
    /// stale-while-revalidate (which serves old values, never ones known to be replaced);
    /// only fail-safe, when a load fails, may still fall back on it.
    fn from_candidate(
        entry: &Entry<Held<V>>,
        opts: &EntryOptions,
        lease: &invalidation::Lease,
    ) -> Self {
        let mut fallback = Self::from_l1(entry, opts);
        let now = Instant::now();
        if let Some(lapsed) = lease.lapsed_for(now) {
            fallback.outage = entry.is_fresh_at(now) && lapsed < opts.outage_staleness;
            fallback.fresh = false;
            fallback.in_swr = false;
        }
        fallback
    }

    /// A fallback may stand in for a failed load when fail-safe is on (or when it is still
    /// fresh: then only the check against L2 failed).
    fn usable(&self, opts: &EntryOptions) -> bool {
        self.fresh || !opts.fail_safe_max.is_zero()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) l1_hits: Striped,
    pub(crate) l2_hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) loads: AtomicU64,
    pub(crate) load_errors: AtomicU64,
    pub(crate) not_found: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) refreshes: AtomicU64,
    pub(crate) fail_safe: AtomicU64,
    pub(crate) lock_waits: AtomicU64,
    pub(crate) duplicate_loads: AtomicU64,
    pub(crate) unlocked_loads: AtomicU64,
    pub(crate) l2_failures: AtomicU64,
    pub(crate) invalidations_sent: AtomicU64,
    pub(crate) invalidations_received: AtomicU64,
    pub(crate) invalidations_ignored: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) l1_unconfirmed: AtomicU64,
    pub(crate) outage_served: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

const STRIPES: usize = 8;

/// A counter bumped on the hot path by many threads at once: one cache line per stripe and a
/// stripe per thread, so L1 hits on several cores do not fight over one line.
#[derive(Debug, Default)]
pub(crate) struct Striped([Padded; STRIPES]);

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

impl Striped {
    pub(crate) fn bump(&self) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        thread_local! {
            static STRIPE: usize = (NEXT.fetch_add(1, Ordering::Relaxed) as usize) % STRIPES;
        }
        let i = STRIPE.with(|s| *s);
        self.0[i].0.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn sum(&self) -> u64 {
        self.0.iter().map(|p| p.0.load(Ordering::Relaxed)).sum()
    }
}

/// A snapshot of a cache's counters, from [`TieredCache::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Reads answered by a fresh L1 entry.
    pub l1_hits: u64,
    /// Reads answered by a fresh L2 entry.
    pub l2_hits: u64,
    /// Reads that needed the loader (or found nothing, for `get`).
    pub misses: u64,
    /// Loader runs that returned (values and "not found").
    pub loads: u64,
    /// Loader runs that failed, panicked or were cut off.
    pub load_errors: u64,
    /// Loads that returned "not found".
    pub not_found: u64,
    /// Stale values served inside the stale-while-revalidate window.
    pub stale_served: u64,
    /// Background refreshes started by stale reads.
    pub refreshes: u64,
    /// Stale values served because a load failed or passed its soft timeout.
    pub fail_safe: u64,
    /// Loads that waited for another process's lock.
    pub lock_waits: u64,
    /// Loads whose result was not written because the lock had passed to someone else (a
    /// newer write, or a duplicate load after the lock expired): counted, not an error.
    pub duplicate_loads: u64,
    /// Loads run without the Redis lock because Redis was unavailable or skipped.
    pub unlocked_loads: u64,
    /// L2 calls that failed for availability (timeouts, connection errors).
    pub l2_failures: u64,
    /// How many times the circuit breaker opened.
    pub breaker_opened: u64,
    /// Changes this cache announced to other nodes (writes, deletes, clears).
    pub invalidations_sent: u64,
    /// Announcements from other nodes that evicted or cleared something here.
    pub invalidations_received: u64,
    /// Announcements ignored because L1 already held that version or a newer one.
    pub invalidations_ignored: u64,
    /// Times L1 was dropped because invalidations may have been missed.
    pub gaps: u64,
    /// Reads that found a fresh L1 entry but asked L2, because the bus's lease had run out:
    /// it had not proven within Δ that every invalidation arrived (a slow server or cluster
    /// bus, or this process stalled). See [`invalidation::Lease`].
    pub l1_unconfirmed: u64,
    /// Reads answered under the outage policy: Redis could not be asked and the bus could not
    /// vouch for L1, and an L1 entry fresh by its own TTL was served within
    /// [`EntryOptions::outage_staleness`].
    pub outage_served: u64,
    /// The L1 tier's own counters.
    pub l1: l1::Stats,
    /// The L2 store's counters (shared by caches on the same store).
    pub l2: l2::StoreStats,
}

impl CacheStats {
    /// The share of reads answered from a tier (L1 or L2) rather than the loader.
    pub fn hit_ratio(&self) -> f64 {
        let hits = self.l1_hits + self.l2_hits + self.stale_served + self.outage_served;
        let total = hits + self.misses;
        if total == 0 {
            return 0.0;
        }
        hits as f64 / total as f64
    }
}

/// Everything a cache handle shares with its background tasks.
pub(crate) struct Inner<V> {
    pub(crate) namespace: Arc<str>,
    pub(crate) space: KeySpace,
    pub(crate) l1: LocalCache<Held<V>>,
    pub(crate) store: RedisStore,
    pub(crate) codec: Codec<V>,
    pub(crate) waiters: LockWaiters,
    pub(crate) defaults: EntryOptions,
    pub(crate) lock_ttl: Duration,
    pub(crate) max_load_time: Duration,
    pub(crate) breaker: Breaker,
    pub(crate) closed: watch::Receiver<()>,
    pub(crate) loads: Arc<Flights<Option<V>>>,
    pub(crate) reads: Arc<Flights<Option<V>>>,
    pub(crate) counters: Counters,
    pub(crate) publisher: invalidation::Publisher,
    pub(crate) bus: invalidation::Bus,
    /// The bus's lease: L1 answers only while it holds.
    pub(crate) lease: invalidation::Lease,
    /// The one owner of L1 admission (see `coherence`).
    pub(crate) admission: Arc<Admission>,
    /// The longest key calls accept.
    pub(crate) max_key_len: usize,
    /// The bus's staleness bound Δ.
    pub(crate) delta: Duration,
    pub(crate) hit_ratio_floor: f64,
    pub(crate) trace_keys: bool,
}

/// Dropped with the last [`TieredCache`] handle: ends the background tasks and lets go of the
/// bus (which closes with its last user).
pub(crate) struct Lifeline {
    pub(crate) _close: watch::Sender<()>,
}

/// A two-level cache of `V` values in one namespace: L1 in this process, L2 in Redis.
///
/// Cheap to clone (an `Arc` inside); background work (loads, refreshes, L1 maintenance) stops
/// when the last clone is dropped. Several caches (one per value type or namespace) can share
/// one [`l2::Connection`].
///
/// ```no_run
/// # async fn f() -> tiered::Result<()> {
/// use std::time::Duration;
/// use tiered::{EntryOptions, TieredCache};
///
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct User { id: u64, name: String }
///
/// let users: TieredCache<User> = TieredCache::builder()
///     .namespace("users")
///     .redis_url("redis://127.0.0.1:6379")
///     .l1_max_bytes(64 << 20)
///     .default_options(
///         EntryOptions::new(Duration::from_secs(300))
///             .stale_while_revalidate(Duration::from_secs(60))
///             .l1_time_to_live(Duration::from_secs(30)),
///     )
///     .build()
///     .await?;
/// let user = users
///     .get_or_set("42", || async {
///         Ok::<_, std::io::Error>(User { id: 42, name: "Ada".into() })
///     })
///     .await?;
/// users.invalidate("42").await?;
/// # let _ = user; Ok(()) }
/// ```
pub struct TieredCache<V> {
    pub(crate) inner: Arc<Inner<V>>,
    pub(crate) _lifeline: Arc<Lifeline>,
}

impl<V> Clone for TieredCache<V> {
    fn clone(&self) -> Self {
        TieredCache {
            inner: Arc::clone(&self.inner),
            _lifeline: Arc::clone(&self._lifeline),
        }
    }
}

impl<V> fmt::Debug for TieredCache<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TieredCache")
            .field("namespace", &self.inner.namespace)
            .field("l1", &self.inner.l1)
            .field("defaults", &self.inner.defaults)
            .finish_non_exhaustive()
    }
}

/// `at + d`, or a century after `at` when that overflows: durations decoded from Redis bytes
/// can be anything, and deadlines never panic.
pub(crate) fn later(at: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 86_400);
    at.checked_add(d.min(CENTURY))
        .or_else(|| at.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(at)
}

fn found<V>(key: &str, value: Option<V>) -> Result<V> {
    value.ok_or_else(|| Error::NotFound {
        key: key.to_string(),
    })
}

impl<V> TieredCache<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// A builder; see [`TieredCacheBuilder`](crate::TieredCacheBuilder).
    pub fn builder() -> crate::TieredCacheBuilder<V> {
        crate::TieredCacheBuilder::new()
    }

    /// The value of `key`: from L1 if fresh, else from L2 if fresh, else from `load`, with the
    /// default options. See [`TieredCache::get_or_set_with`].
    ///
    /// # Errors
    /// As [`TieredCache::get_or_set_with`].
    pub async fn get_or_set<F, Fut, T, E>(&self, key: &str, load: F) -> Result<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        T: Into<Loaded<V>>,
        E: Into<BoxError>,
    {
        self.inner.check_key(key)?;
        self.lookup_or_load(key, &self.inner.defaults, load).await
    }

    /// The value of `key`: from L1 if fresh, else from L2 if fresh (filling L1, for no longer
    /// than the L2 entry lives), else from `load` (writing both tiers).
    ///
    /// Inside the stale-while-revalidate window the stale value is returned at once and one
    /// background task refreshes it. If the load fails or passes its soft timeout and a value
    /// within the fail-safe window exists, that value is returned instead.
    ///
    /// The loader and its future are `'static` (move what they need into them, an `Arc` of
    /// your database pool for instance): a load runs on its own task so that no caller owns
    /// it. A caller that gives up or is cancelled strands nobody, a timed-out load can finish
    /// in the background, and a refresh outlives the read that started it.
    ///
    /// # Concurrent calls on the same key
    /// In this process, concurrent misses share one load (single-flight); a caller that
    /// arrives after [`TieredCache::invalidate`] or [`TieredCache::set`] of the key never
    /// joins a load that started before it, and that load's result never lands in L1. Across
    /// processes, a Redis lock per key lets one process load while the others wait for its
    /// value (woken by a pub/sub notice, with a bounded wait); if the holder dies, another
    /// takes over once its lock expires. The lock is an efficiency measure: a holder that
    /// lost it never overwrites a newer value, and a duplicate load is counted, not an error.
    /// If Redis is unavailable, loads are deduplicated in process only.
    ///
    /// # Cancellation
    /// Dropping the returned future stops this caller waiting; the load goes on for the
    /// others (and lands in the cache), bounded by the cache's maximum load time.
    ///
    /// # Errors
    /// [`Error::Loader`] with the loader's error (shared by every caller of the load),
    /// [`Error::LoadAborted`] if it panicked, [`Error::WaitTimeout`] past the hard timeout,
    /// [`Error::NotFound`] for [`Loaded::not_found`]. Redis failures are not errors here:
    /// reads fall back to the loader.
    pub async fn get_or_set_with<F, Fut, T, E>(
        &self,
        key: &str,
        options: EntryOptions,
        load: F,
    ) -> Result<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        T: Into<Loaded<V>>,
        E: Into<BoxError>,
    {
        self.inner.check_key(key)?;
        options.validate()?;
        self.lookup_or_load(key, &options, load).await
    }

    /// `get_or_set` with options by reference, so a hit's future carries no copy of them.
    async fn lookup_or_load<F, Fut, T, E>(
        &self,
        key: &str,
        options: &EntryOptions,
        load: F,
    ) -> Result<V>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<T, E>> + Send + 'static,
        T: Into<Loaded<V>>,
        E: Into<BoxError>,
    {
        let candidate = match self.inner.l1_lookup(key, options) {
            Ok(hit) => {
                // The hit path builds its span only if DEBUG is enabled (one atomic load).
                if tracing::level_enabled!(tracing::Level::DEBUG) {
                    let span = self.inner.span("get_or_set", key);
                    trace::answered(&span, "l1", "hit");
                }
                return found(key, hit);
            }
            Err(candidate) => candidate,
        };
        let span = self.inner.span("get_or_set", key);
        // Stale inside the window with its refresh already running: answer without building
        // anything for a load that will not run.
        if let Some(stale) = self
            .inner
            .stale_while_refreshing(key, candidate.as_deref(), options)
        {
            trace::answered(&span, "l1", "stale");
            return found(key, stale);
        }
        let loader: Loader<V> = Box::new(move || {
            Box::pin(async move { load().await.map(Into::into).map_err(Into::into) })
        });
        // Boxed, so the future of a hit stays small (a hit would otherwise copy the whole
        // slow path's state around).
        let result = Box::pin(self.inner.slow(key, *options, Some(loader), candidate))
            .instrument(span.clone())
            .await
            .and_then(|value| found(key, value));
        trace::outcome(&span, &result);
        result
    }

    /// The value of `key` if either tier has it (fresh, or stale inside the
    /// stale-while-revalidate window), with the default options. Never loads.
    ///
    /// # Concurrent calls on the same key
    /// Concurrent L1 misses share one L2 read.
    ///
    /// # Errors
    /// [`Error::L2`] or [`Error::CircuitOpen`] when the value is not in L1 and Redis cannot
    /// be asked ([`Error::is_unavailable`]).
    pub async fn get(&self, key: &str) -> Result<Option<V>> {
        self.inner.check_key(key)?;
        self.read(key, &self.inner.defaults).await
    }

    /// As [`TieredCache::get`], with `options`.
    ///
    /// # Errors
    /// As [`TieredCache::get`].
    pub async fn get_with(&self, key: &str, options: EntryOptions) -> Result<Option<V>> {
        self.inner.check_key(key)?;
        options.validate()?;
        self.read(key, &options).await
    }

    async fn read(&self, key: &str, options: &EntryOptions) -> Result<Option<V>> {
        match self.inner.l1_lookup(key, options) {
            Ok(hit) => {
                if tracing::level_enabled!(tracing::Level::DEBUG) {
                    let span = self.inner.span("get", key);
                    trace::answered(&span, "l1", "hit");
                }
                Ok(hit)
            }
            Err(candidate) => {
                let span = self.inner.span("get", key);
                let result = Box::pin(self.inner.slow(key, *options, None, candidate))
                    .instrument(span.clone())
                    .await;
                trace::outcome(&span, &result);
                result
            }
        }
    }

    /// Writes `value` under `key` in L2 (breaking any load in flight, so no older load can
    /// overwrite it) and then in L1, with the default options.
    ///
    /// # Concurrent calls on the same key
    /// Loads of the key in flight in this process are detached: their results never reach
    /// L1, and callers after this one never join them.
    ///
    /// # Errors
    /// [`Error::L2`] if the value cannot be encoded or Redis does not acknowledge the write;
    /// the key is then dropped from L1 too (its state is unknown).
    pub async fn set(&self, key: &str, value: &V) -> Result<u64> {
        self.set_with(key, value, self.inner.defaults).await
    }

    /// As [`TieredCache::set`], with `options`.
    ///
    /// # Errors
    /// As [`TieredCache::set`].
    pub async fn set_with(&self, key: &str, value: &V, options: EntryOptions) -> Result<u64> {
        self.inner.check_key(key)?;
        options.validate()?;
        let span = self.inner.span("set", key);
        let result = self.set_inner(key, value, options, &span).await;
        trace::outcome(&span, &result);
        result
    }

    async fn set_inner(
        &self,
        key: &str,
        value: &V,
        options: EntryOptions,
        span: &tracing::Span,
    ) -> Result<u64> {
        let meta = options.value_meta(None);
        let bytes = self.inner.codec.encode(value, &meta)?;
        let value = (!options.skip_l1).then(|| value.clone());
        // Once begun, a write runs to its end on its own task: a caller that gives up (a
        // timeout, a dropped future) cannot leave L2 changed and this node's L1 behind it.
        let inner = Arc::clone(&self.inner);
        let key: Arc<str> = key.into();
        finish_detached(
            async move { inner.write(key, bytes, value, meta, options).await }
                .instrument(span.clone()),
        )
        .await
    }

    /// Removes `key` from L2 (leaving a tombstone that keeps its version, and breaking any
    /// load in flight), tells every node to drop it, and drops it from this node's L1.
    /// Returns the write version of the deletion.
    ///
    /// # Concurrent calls on the same key
    /// As [`TieredCache::set`]: no load that started before this call fills L1 after it.
    ///
    /// # Errors
    /// [`Error::L2`] if Redis does not acknowledge the delete (L1 is cleared anyway).
    pub async fn invalidate(&self, key: &str) -> Result<u64> {
        self.inner.check_key(key)?;
        let span = self.inner.span("invalidate", key);
        let inner = Arc::clone(&self.inner);
        let key: Arc<str> = key.into();
        // As `set`: runs to its end whatever happens to the caller.
        let result =
            finish_detached(async move { inner.remove(key).await }.instrument(span.clone())).await;
        trace::outcome(&span, &result);
        result
    }

    /// Deletes every entry of this namespace from L2 (`SCAN` + `UNLINK`, never `KEYS`), then
    /// tells every node to drop its L1 of this namespace (other namespaces are untouched), and
    /// drops this node's. Returns how many Redis keys were deleted.
    ///
    /// # Errors
    /// [`Error::L2`] if Redis fails; this node's L1 is dropped anyway, and other nodes are
    /// told as soon as the delete is done.
    pub async fn clear(&self) -> Result<u64> {
        let span = trace::span_all("clear", &self.inner.namespace);
        let inner = Arc::clone(&self.inner);
        // As `set`: runs to its end whatever happens to the caller, so the other nodes hear
        // of a delete that began.
        let result =
            finish_detached(async move { inner.clear().await }.instrument(span.clone())).await;
        trace::outcome(&span, &result);
        result
    }

    /// Drops every entry of this cache from this process's L1 (L2 is untouched).
    pub fn invalidate_local(&self) {
        self.inner.invalidate_local();
    }

    /// Loads several keys at once: L1 first, then one L2 round trip for the rest, then
    /// `load` once with only the keys still missing; joins loads already in flight for any
    /// of them. Returns the values found; keys the loader does not return are absent from the
    /// map (and cached as "not found" if a negative TTL is set).
    ///
    /// # Concurrent calls on the same key
    /// Single-key calls for any of the loading keys join this batch's load. Across processes
    /// a batch takes no lock (one per key would cost a round trip each): batch loads are
    /// deduplicated in process only.
    ///
    /// # Cancellation
    /// As [`TieredCache::get_or_set_with`]: the batch load runs on its own task.
    ///
    /// # Errors
    /// The batch loader's error, or that of a joined load; [`Error::WaitTimeout`] past the
    /// hard timeout. Redis failures fall back to the loader.
    pub async fn get_or_set_many<K, F, Fut, I, E>(
        &self,
        keys: &[K],
        load: F,
    ) -> Result<HashMap<String, V>>
    where
        K: AsRef<str>,
        F: FnOnce(Vec<String>) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<I, E>> + Send + 'static,
        I: IntoIterator<Item = (String, V)>,
        E: Into<BoxError>,
    {
        for key in keys {
            self.inner.check_key(key.as_ref())?;
        }
        let span = trace::span_all("get_or_set_many", &self.inner.namespace);
        let result = crate::batch::get_or_set_many(self, keys, self.inner.defaults, load)
            .instrument(span.clone())
            .await;
        trace::outcome(&span, &result);
        result
    }

    /// The circuit breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state_now()
    }

    /// Whether this node's L1 holds a fresh entry for `key`, so a read now would be an L1 hit
    /// (a diagnostic: another node's write may evict it a moment later). Counts nothing.
    ///
    /// ```no_run
    /// # async fn f(cache: tiered::TieredCache<String>) {
    /// let tier = if cache.is_fresh_locally("user:42") { "l1" } else { "l2 or load" };
    /// # let _ = tier;
    /// # }
    /// ```
    pub fn is_fresh_locally(&self, key: &str) -> bool {
        let now = Instant::now();
        self.inner.lease.holds_at(now)
            && self
                .inner
                .l1
                .get(key)
                .is_some_and(|entry| entry.is_fresh_at(now))
    }

    /// Loads and L2 reads in flight in this process.
    pub fn in_flight(&self) -> usize {
        self.inner.loads.len() + self.inner.reads.len()
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The L2 store (to share its connection with another cache, or for raw access).
    pub fn store(&self) -> &RedisStore {
        &self.inner.store
    }

    /// The cache's health for a status or readiness endpoint: Redis reachability and latency
    /// (one PING, bounded by the L2 timeout), the invalidation bus (connected, how long down,
    /// age of the last message, gaps), the breaker, and the hit ratio against its floor.
    /// Readiness fails only when the bus has been down for longer than its staleness bound;
    /// an unreachable Redis, an open breaker or a low hit ratio make it degraded.
    ///
    /// ```no_run
    /// # async fn f(cache: tiered::TieredCache<String>) {
    /// let health = cache.health().await;
    /// if !health.ready {
    ///     eprintln!("not ready: {:?}", health.reasons);
    /// }
    /// # }
    /// ```
    pub async fn health(&self) -> crate::Health {
        use crate::health::{BusHealth, Observed, RedisHealth, millis};
        let inner = &self.inner;
        let redis = match inner.store.connection().ping().await {
            Ok(rtt) => RedisHealth {
                reachable: true,
                latency_micros: Some(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX)),
                error: None,
            },
            Err(e) => RedisHealth {
                reachable: false,
                latency_micros: None,
                error: Some(e.to_string()),
            },
        };
        let bus = inner.bus.stats();
        let now = invalidation::message::now_micros();
        let since = |micros: u64| (micros > 0).then(|| now.saturating_sub(micros) / 1000);
        let stats = self.stats();
        let hits = stats.l1_hits + stats.l2_hits + stats.stale_served;
        crate::Health::judge(
            &inner.namespace,
            Observed {
                redis,
                bus: BusHealth {
                    connected: bus.connected,
                    down_for_ms: since(bus.down_since_micros).unwrap_or(0),
                    bound_ms: millis(inner.bus.config().bound()),
                    last_message_age_ms: since(bus.last_message_micros),
                    gaps: bus.gaps,
                    malformed: bus.malformed,
                    lag_p99_micros: bus.lag_p99_micros,
                },
                breaker: inner.breaker.state_now(),
                hits,
                reads: hits + stats.misses,
                floor: inner.hit_ratio_floor,
            },
        )
    }

    /// Pushes the counters and gauges to the [`metrics`](https://docs.rs/metrics) facade now
    /// (the cache also does it every second). Names start with `tiered_` and carry a
    /// `namespace` label; with no recorder installed this costs next to nothing.
    pub fn export_metrics(&self) {
        crate::metrics::export(&self.inner);
    }

    /// The invalidation bus this cache listens on (its counters: [`invalidation::Bus::stats`]).
    pub fn bus(&self) -> &invalidation::Bus {
        &self.inner.bus
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            l1_hits: c.l1_hits.sum(),
            l2_hits: get(&c.l2_hits),
            misses: get(&c.misses),
            loads: get(&c.loads),
            load_errors: get(&c.load_errors),
            not_found: get(&c.not_found),
            stale_served: get(&c.stale_served),
            refreshes: get(&c.refreshes),
            fail_safe: get(&c.fail_safe),
            lock_waits: get(&c.lock_waits),
            duplicate_loads: get(&c.duplicate_loads),
            unlocked_loads: get(&c.unlocked_loads),
            l2_failures: get(&c.l2_failures),
            breaker_opened: self.inner.breaker.times_opened(),
            invalidations_sent: get(&c.invalidations_sent),
            invalidations_received: get(&c.invalidations_received),
            invalidations_ignored: get(&c.invalidations_ignored),
            gaps: get(&c.gaps),
            l1_unconfirmed: get(&c.l1_unconfirmed),
            outage_served: get(&c.outage_served),
            l1: self.inner.l1.stats(),
            l2: self.inner.store.stats(),
        }
    }
}

/// Runs `change` to its end on a task of its own and waits for it: dropping the returned
/// future stops the waiting, never the change halfway (its L2 write and its L1 update belong
/// together). Without a runtime to spawn on, runs it inline.
async fn finish_detached<T: Send + 'static>(
    change: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => match rt.spawn(change).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(Error::Shutdown),
        },
        Err(_) => change.await,
    }
}

/// What one L2 read found.
enum L2Read<V> {
    Fresh(Fetched<Option<V>>),
    Stale(Fetched<Option<V>>),
    Miss,
    Down(l2::Error),
}

/// Releases a lock on every exit path: if the load ends without releasing it (an error,
/// a panic, a cut-off), a task releases it, so waiters take over at once.
struct LockGuard {
    store: RedisStore,
    lock: Option<Lock>,
    ttl: Duration,
}

impl LockGuard {
    fn take(&mut self) -> Option<Lock> {
        self.lock.take()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (store, ttl) = (self.store.clone(), self.ttl);
            rt.spawn(async move { store.release(vec![lock], ttl).await });
        }
    }
}

/// Aborts the loader's task if the load is dropped (cut off at the maximum load time, or
/// the cache shut down).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<V> Inner<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// The hot path: a fresh L1 entry's value (`Ok`), or what L1 holds otherwise (`Err`: a
    /// stale entry to fall back on, or nothing).
    fn l1_lookup(
        &self,
        key: &str,
        options: &EntryOptions,
    ) -> std::result::Result<Option<V>, Option<L1Entry<V>>> {
        if options.skip_l1 {
            return Err(None);
        }
        // The lease before the entry: a renewal seen here comes after the evictions it
        // vouches for (the bus applies them first), so the entry read next reflects them.
        let now = Instant::now();
        let confirmed = self.lease.holds_at(now);
        let entry = self.l1.get(key).ok_or(None)?;
        if !entry.is_fresh_at(now) {
            return Err(Some(entry));
        }
        if !confirmed && !entry.value().local {
            // The bus has not proven within Δ that every invalidation arrived: the entry
            // may be older than allowed. Not an answer; a stale candidate at most (see
            // `Fallback::from_candidate`). An entry this node loaded itself less than Δ ago
            // needs no such proof.
            bump(&self.counters.l1_unconfirmed);
            return Err(Some(entry));
        }
        self.counters.l1_hits.bump();
        Ok(entry.value().value.clone())
    }

    /// The stale value of `candidate` if it is inside the stale-while-revalidate window and a
    /// refresh of `key` is already running (counted as a stale hit).
    fn stale_while_refreshing(
        &self,
        key: &str,
        candidate: Option<&Entry<Held<V>>>,
        options: &EntryOptions,
    ) -> Option<Option<V>> {
        let entry = candidate?;
        let held = entry.value();
        let now = Instant::now();
        if options.swr.is_zero()
            || now >= later(held.fresh_until, options.swr)
            || !self.lease.holds_at(now)
        {
            return None;
        }
        if !self.loads.is_running(key) {
            return None;
        }
        bump(&self.counters.stale_served);
        Some(held.value.clone())
    }

    /// Refuses a key longer than the cache's maximum, before anything is read or written.
    pub(crate) fn check_key(&self, key: &str) -> Result<()> {
        if key.len() > self.max_key_len {
            return Err(Error::KeyTooLong {
                len: key.len(),
                max: self.max_key_len,
            });
        }
        Ok(())
    }

    /// A span for operation `op` on `key` (see [`trace`]).
    fn span(&self, op: &'static str, key: &str) -> tracing::Span {
        trace::span(op, &self.namespace, key, self.trace_keys)
    }

    /// Drops this node's L1 and detaches every load in flight (none of them may fill L1).
    pub(crate) fn invalidate_local(&self) {
        self.loads.detach_all();
        self.reads.detach_all();
        self.admission.revoke_all();
        self.l1.invalidate_all();
    }

    /// Detaches loads and reads in flight for `key` (later callers do not join them).
    pub(crate) fn detach(&self, key: &str) {
        self.loads.detach(key);
        self.reads.detach(key);
    }

    /// The body of `set`: writes L2 (announcing the change and breaking any load's lock), then
    /// this node's L1, under a write ticket taken before anything else.
    async fn write(
        self: Arc<Self>,
        key: Arc<str>,
        bytes: Vec<u8>,
        value: Option<V>,
        meta: EntryMeta,
        options: EntryOptions,
    ) -> Result<u64> {
        // Fills that began earlier read the old value: revoked. Announcements that arrive
        // while this write is on its way keep its (then older) value out of L1.
        let ticket = self.admission.begin_write(&key);
        self.detach(&key);
        let (fresh, life) = (meta.fresh_for, meta.stale_for);
        let weight = bytes.len();
        let mut version = 0;
        if !options.skip_l2 {
            let message = self.publisher.evict(&key);
            let written = self
                .store
                .overwrite(
                    &self.space.key(&key),
                    &bytes,
                    life,
                    Some(self.announce(&message)),
                )
                .await;
            self.note_l2(written.as_ref().err());
            match written {
                Ok(v) => {
                    version = v;
                    // Published for certain: later messages vouch for its number, so a peer
                    // that misses it sees a gap (an unpublished number never is one).
                    self.publisher.acknowledged(&message);
                    // Before the L1 insert: an older write of this node's that finishes later
                    // keeps its value out.
                    self.admission.announced(&key, v);
                    bump(&self.counters.invalidations_sent);
                }
                Err(e) => {
                    // Whether it reached Redis is unknown: this node forgets the key.
                    self.admission.revoke(&key);
                    self.detach(&key);
                    self.l1.invalidate(&*key);
                    return Err(e.into());
                }
            }
        }
        // Loads that began while the write was on its way read the old value: callers from
        // now on do not join them (their tickets refuse it already).
        self.detach(&key);
        match value {
            Some(value) => {
                let entry = self
                    .entry(Some(value), weight, fresh, life, &options)
                    .version(version);
                Admission::admit(&self.l1, &key, &ticket, entry);
            }
            // `skip_l1`: this node keeps no copy, so none older than the write either.
            None => self.l1.invalidate(&*key),
        }
        Ok(version)
    }

    /// The body of `invalidate`: a tombstone in L2 (announced, breaking any load's lock), and
    /// the key out of this node's L1, before and after.
    async fn remove(self: Arc<Self>, key: Arc<str>) -> Result<u64> {
        let ticket = self.admission.begin_write(&key);
        self.detach(&key);
        self.l1.invalidate(&*key);
        let message = self.publisher.evict(&key);
        let removed = self
            .store
            .remove(
                &self.space.key(&key),
                self.defaults.l2_time_to_live(),
                Some(self.announce(&message)),
            )
            .await;
        self.note_l2(removed.as_ref().err());
        // The floor first: a concurrent `set` of this node that fills L1 after the
        // invalidation below sees it when it re-checks, and drops its older value. A delete
        // whose outcome is unknown revokes instead.
        match &removed {
            Ok(removal) => {
                self.publisher.acknowledged(&message);
                self.admission.announced(&key, removal.version);
            }
            Err(_) => self.admission.revoke(&key),
        }
        drop(ticket);
        self.detach(&key);
        self.l1.invalidate(&*key);
        let removal = removed?;
        bump(&self.counters.invalidations_sent);
        Ok(removal.version)
    }

    /// The body of `clear`: this node's L1 out, the namespace's keys out of L2, then the
    /// announcement, then this node's L1 again (fills that read before the delete).
    async fn clear(self: Arc<Self>) -> Result<u64> {
        self.invalidate_local();
        let deleted = self.store.clear(&self.space).await;
        self.note_l2(deleted.as_ref().err());
        let deleted = deleted?;
        let message = self.publisher.clear_namespace();
        let published = self.store.publish(self.publisher.channel(), &message).await;
        self.note_l2(published.as_ref().err());
        if published.is_ok() {
            self.publisher.acknowledged(&message);
        }
        self.invalidate_local();
        published?;
        bump(&self.counters.invalidations_sent);
        Ok(deleted)
    }

    /// The announcement of a change: `message` on this cache's channel, sent by the script
    /// that makes the change.
    fn announce<'a>(&'a self, message: &'a [u8]) -> Announce<'a> {
        Announce {
            channel: self.publisher.channel(),
            message,
        }
    }

    /// The bytes a loaded result is written as: the value, or an "absent" marker.
    pub(crate) fn encode_loaded(&self, value: Option<&V>, meta: &EntryMeta) -> l2::Result<Vec<u8>> {
        match value {
            Some(v) => self.codec.encode(v, meta),
            None => self.codec.encode_absent(meta),
        }
    }

    /// Feeds the breaker with the outcome of an L2 call.
    pub(crate) fn note_l2(&self, error: Option<&l2::Error>) {
        match error {
            Some(e) if e.is_unavailable() => {
                bump(&self.counters.l2_failures);
                self.breaker.failure();
            }
            _ => self.breaker.success(),
        }
    }

    /// An L1 entry for a value written now.
    pub(crate) fn entry(
        &self,
        value: Option<V>,
        weight: usize,
        fresh: Duration,
        life: Duration,
        opts: &EntryOptions,
    ) -> Entry<Held<V>> {
        let now = Instant::now();
        let held = Held {
            value,
            fresh_until: later(now, fresh),
            local: false,
        };
        Entry::new(Arc::clone(&self.namespace), held)
            .weight(weight)
            .time_to_live(life)
            .fresh_for(opts.l1_ttl.map_or(fresh, |t| t.min(fresh)))
    }

    /// An L1 entry for a value read from L2: no longer than the L2 entry lives.
    pub(crate) fn entry_from_l2(
        &self,
        f: &Fetched<Option<V>>,
        opts: &EntryOptions,
    ) -> Entry<Held<V>> {
        let now = Instant::now();
        let fresh = f.fresh_remaining();
        let life = f.remaining.unwrap_or(f.meta.stale_for);
        let held = Held {
            value: f.value.clone(),
            fresh_until: later(now, fresh),
            local: false,
        };
        Entry::new(Arc::clone(&self.namespace), held)
            .weight(f.size)
            .time_to_live(life)
            .fresh_for(opts.l1_ttl.map_or(fresh, |t| t.min(fresh)))
            .version(f.meta.write_version)
    }

    /// Puts `entry` in L1 if the flight's ticket admits it (see `coherence`).
    pub(crate) async fn fill(
        &self,
        key: &Arc<str>,
        entry: Entry<Held<V>>,
        opts: &EntryOptions,
        token: &FlightToken<Option<V>>,
    ) {
        if !opts.skip_l1 {
            Admission::admit(&self.l1, key, token.ticket(), entry);
        }
    }

    /// As [`Inner::l2_read`], and takes the lock in the same round trip unless the entry is
    /// fresh.
    async fn l2_read_or_lock(&self, rkey: &Key) -> (L2Read<V>, LockAttempt) {
        match self
            .store
            .lookup_or_lock(rkey, &self.codec, self.lock_ttl)
            .await
        {
            Ok((found, attempt)) => (self.classify_read(Ok(found)), attempt),
            Err(e) => (self.classify_read(Err(e)), LockAttempt::NotTried),
        }
    }

    async fn l2_read(&self, rkey: &Key) -> L2Read<V> {
        let read = self.store.lookup(rkey, &self.codec).await;
        self.classify_read(read)
    }

    fn classify_read(&self, read: l2::Result<Option<Fetched<Option<V>>>>) -> L2Read<V> {
        match read {
            Ok(Some(f)) if f.is_fresh() => {
                self.breaker.success();
                L2Read::Fresh(f)
            }
            Ok(Some(f)) => {
                self.breaker.success();
                L2Read::Stale(f)
            }
            Ok(None) => {
                self.breaker.success();
                L2Read::Miss
            }
            // Bad bytes: evicted and counted by the store; a miss here.
            Err(e) if e.is_decode() => {
                self.breaker.success();
                L2Read::Miss
            }
            Err(e) => {
                self.note_l2(Some(&e));
                L2Read::Down(e)
            }
        }
    }

    /// Serves `fallback` as a fail-safe answer, counting it once and throttling the loader:
    /// L1 then holds the old value as fresh for the throttle period.
    async fn serve_fail_safe(
        &self,
        key: &Arc<str>,
        fallback: &Fallback<V>,
        opts: &EntryOptions,
        token: &FlightToken<Option<V>>,
        why: &(dyn fmt::Display + Sync),
    ) {
        // Only this flight's body answers from here on, so check-then-answer is not racy;
        // count before answering, so a caller that returns sees the count.
        if !token.is_answered() {
            bump(&self.counters.fail_safe);
            tracing::warn!(
                target: "tiered::fail_safe",
                namespace = %self.namespace,
                reason = %why,
                "serving a stale value: the load failed or is late"
            );
            token.answer(Ok(fallback.value.clone()));
        }
        if !fallback.fresh {
            let throttle = opts.fail_safe_throttle;
            let entry = self
                .entry(fallback.value.clone(), 0, throttle, throttle, opts)
                .version(fallback.version);
            self.fill(key, entry, opts, token).await;
        }
    }

    /// The slow path, after L1 had no fresh entry.
    async fn slow(
        self: &Arc<Self>,
        key: &str,
        opts: EntryOptions,
        loader: Option<Loader<V>>,
        candidate: Option<L1Entry<V>>,
    ) -> Result<Option<V>> {
        let fallback = candidate
            .as_deref()
            .map(|e| Fallback::from_candidate(e, &opts, &self.lease));
        if let Some(fb) = &fallback
            && !fb.fresh
            && fb.in_swr
        {
            // Stale-while-revalidate from L1: answer now, refresh once in the background.
            bump(&self.counters.stale_served);
            if let Some(loader) = loader {
                let inner = Arc::clone(self);
                let key_arc: Arc<str> = key.into();
                let stale = fb.value.clone();
                let started = self.loads.start(key, move |token| {
                    // Callers that join the refresh get the stale value at once too.
                    token.answer(Ok(stale));
                    inner.guarded(token, key_arc, opts, Some(loader), candidate)
                });
                if started {
                    bump(&self.counters.refreshes);
                }
            }
            return Ok(fb.value.clone());
        }
        let flights = if loader.is_some() {
            &self.loads
        } else {
            &self.reads
        };
        let inner = Arc::clone(self);
        let key_arc: Arc<str> = key.into();
        let outcome = flights
            .run(key, opts.hard_timeout, move |token| {
                inner.guarded(token, key_arc, opts, loader, candidate)
            })
            .await;
        match (outcome, fallback) {
            (Err(e), Some(fb)) if e.is_load_failure() && fb.usable(&opts) => {
                bump(&self.counters.fail_safe);
                tracing::warn!(
                    target: "tiered::fail_safe",
                    namespace = %self.namespace,
                    error = %e,
                    "serving a stale value: the load failed or is late"
                );
                Ok(fb.value)
            }
            (outcome, _) => outcome,
        }
    }

    /// A flight's body, bounded by the maximum load time and the cache's life.
    fn guarded(
        self: Arc<Self>,
        token: FlightToken<Option<V>>,
        key: Arc<str>,
        opts: EntryOptions,
        loader: Option<Loader<V>>,
        candidate: Option<L1Entry<V>>,
    ) -> impl Future<Output = Result<Option<V>>> + Send + 'static {
        let mut closed = self.closed.clone();
        let limit = self.max_load_time;
        // A read without a loader is bounded by the L2 timeouts already; a load gets the
        // cache's maximum load time, and stops with the cache.
        let loads = loader.is_some();
        async move {
            let body = self.resolve(Arc::clone(&key), opts, loader, candidate, token);
            if !loads {
                return body.await;
            }
            tokio::select! {
                r = tokio::time::timeout(limit, body) => r.unwrap_or_else(|_| Err(Error::WaitTimeout {
                    key: key.to_string(),
                    waited: limit,
                })),
                _ = closed.changed() => Err(Error::LoadAborted {
                    key: key.to_string(),
                }),
            }
        }
    }

    /// L2, then the lock and the loader: runs as a flight on its own task.
    async fn resolve(
        self: Arc<Self>,
        key: Arc<str>,
        opts: EntryOptions,
        loader: Option<Loader<V>>,
        candidate: Option<L1Entry<V>>,
        token: FlightToken<Option<V>>,
    ) -> Result<Option<V>> {
        let rkey = self.space.key(&key);
        let mut fallback = candidate
            .as_deref()
            .map(|e| Fallback::from_candidate(e, &opts, &self.lease));
        let mut l2_usable = !opts.skip_l2 && self.breaker.allow();
        let mut l2_error = None;
        let mut attempt = LockAttempt::NotTried;
        if l2_usable {
            // With a loader, the read also takes the lock when the entry is not fresh: one
            // round trip for both.
            let read = if loader.is_some() {
                let (read, a) = self.l2_read_or_lock(&rkey).await;
                attempt = a;
                read
            } else {
                self.l2_read(&rkey).await
            };
            match read {
                L2Read::Fresh(f) => {
                    if let LockAttempt::Taken(lock) = &attempt {
                        self.store.release(vec![lock.clone()], self.lock_ttl).await;
                    }
                    trace::tier("l2");
                    bump(&self.counters.l2_hits);
                    let entry = self.entry_from_l2(&f, &opts);
                    self.fill(&key, entry, &opts, &token).await;
                    return Ok(f.value);
                }
                L2Read::Stale(f) => {
                    let entry = self.entry_from_l2(&f, &opts);
                    let fb = Fallback::from_l1(&entry, &opts);
                    if fb.in_swr && loader.is_some() && !token.is_answered() {
                        bump(&self.counters.stale_served);
                        bump(&self.counters.refreshes);
                        token.answer(Ok(fb.value.clone()));
                        self.fill(&key, entry, &opts, &token).await;
                    }
                    fallback = Some(fb);
                }
                L2Read::Miss => {}
                L2Read::Down(e) => {
                    l2_usable = false;
                    if let Some(fb) = &fallback
                        && fb.fresh
                    {
                        return Ok(fb.value.clone());
                    }
                    l2_error = Some(e);
                }
            }
        }
        // The outage policy: Redis cannot be asked and the bus cannot vouch for L1, but an
        // L1 entry fresh by its own TTL is still inside the outage staleness.
        if !l2_usable
            && !opts.skip_l2
            && let Some(fb) = &fallback
            && fb.outage
        {
            bump(&self.counters.outage_served);
            trace::tier("l1");
            tracing::debug!(target: "tiered::outage", "serving an L1 entry the bus cannot vouch for: Redis is unreachable");
            return Ok(fb.value.clone());
        }
        let Some(loader) = loader else {
            if let Some(fb) = fallback.filter(|f| f.in_swr) {
                bump(&self.counters.stale_served);
                return Ok(fb.value);
            }
            bump(&self.counters.misses);
            if let Some(e) = l2_error {
                return Err(e.into());
            }
            if !opts.skip_l2 && !l2_usable {
                return Err(Error::CircuitOpen);
            }
            return Ok(None);
        };
        if !token.is_answered() {
            bump(&self.counters.misses);
        }
        // The load paths are boxed: their state is large, and a read that never reaches them
        // should not carry (and copy) it.
        if !l2_usable {
            bump(&self.counters.unlocked_loads);
            return Box::pin(self.run_load(&key, &opts, loader, fallback, &token, None)).await;
        }
        if let LockAttempt::Taken(lock) = attempt {
            // Read and locked atomically: nothing can have landed in between.
            return Box::pin(self.run_load(&key, &opts, loader, fallback, &token, Some(lock)))
                .await;
        }
        Box::pin(self.locked_load(&key, &rkey, &opts, loader, fallback, &token)).await
    }

    /// Takes the key's Redis lock and loads, or waits for the holder's value.
    async fn locked_load(
        &self,
        key: &Arc<str>,
        rkey: &Key,
        opts: &EntryOptions,
        loader: Loader<V>,
        mut fallback: Option<Fallback<V>>,
        token: &FlightToken<Option<V>>,
    ) -> Result<Option<V>> {
        // A live holder extends its lock every third of its TTL, so polling at that pace (on
        // top of the notices) finds a dead holder's lock gone within about one TTL.
        let poll = self.lock_ttl / 3;
        let mut waited = false;
        loop {
            // Watch before trying, so a notice sent between the two still wakes us.
            let mut wait = self.waiters.watch(rkey);
            let locked = self.store.try_lock(rkey, self.lock_ttl).await;
            self.note_l2(locked.as_ref().err());
            match locked {
                Ok(Some(lock)) => {
                    drop(wait);
                    // The value may have landed between our read and the lock.
                    match self.l2_read(rkey).await {
                        L2Read::Fresh(f) => {
                            self.store.release(vec![lock], self.lock_ttl).await;
                            bump(&self.counters.l2_hits);
                            let entry = self.entry_from_l2(&f, opts);
                            self.fill(key, entry, opts, token).await;
                            return Ok(f.value);
                        }
                        L2Read::Stale(f) if fallback.is_none() => {
                            let entry = self.entry_from_l2(&f, opts);
                            fallback = Some(Fallback::from_l1(&entry, opts));
                        }
                        _ => {}
                    }
                    return self
                        .run_load(key, opts, loader, fallback, token, Some(lock))
                        .await;
                }
                Ok(None) => {
                    if !waited {
                        waited = true;
                        bump(&self.counters.lock_waits);
                    }
                    wait.notified(poll).await;
                    match self.l2_read(rkey).await {
                        L2Read::Fresh(f) => {
                            bump(&self.counters.l2_hits);
                            let entry = self.entry_from_l2(&f, opts);
                            self.fill(key, entry, opts, token).await;
                            return Ok(f.value);
                        }
                        L2Read::Down(_) => break,
                        L2Read::Stale(_) | L2Read::Miss => {}
                    }
                }
                Err(_) => break,
            }
        }
        bump(&self.counters.unlocked_loads);
        self.run_load(key, opts, loader, fallback, token, None)
            .await
    }

    /// Runs the loader on its own task (a panic becomes an error), extending `lock` while it
    /// runs and serving the fallback at the soft timeout; then writes L2 (only while the lock
    /// holds) and L1.
    #[allow(clippy::too_many_arguments)]
    async fn run_load(
        &self,
        key: &Arc<str>,
        opts: &EntryOptions,
        loader: Loader<V>,
        fallback: Option<Fallback<V>>,
        token: &FlightToken<Option<V>>,
        lock: Option<Lock>,
    ) -> Result<Option<V>> {
        let started = Instant::now();
        let mut task = AbortOnDrop(tokio::spawn(loader()));
        let mut guard = LockGuard {
            store: self.store.clone(),
            lock,
            ttl: self.lock_ttl,
        };
        let extend_every = self.lock_ttl / 3;
        let extend = tokio::time::sleep(extend_every);
        tokio::pin!(extend);
        let soft = opts
            .soft_timeout
            .filter(|_| fallback.as_ref().is_some_and(|f| f.usable(opts)));
        let soft_sleep = tokio::time::sleep(soft.unwrap_or(Duration::ZERO));
        tokio::pin!(soft_sleep);
        let mut soft_armed = soft.is_some();
        let outcome = loop {
            tokio::select! {
                r = &mut task.0 => break r,
                () = &mut soft_sleep, if soft_armed => {
                    soft_armed = false;
                    if let Some(fb) = &fallback {
                        self.serve_fail_safe(key, fb, opts, token, &"soft timeout").await;
                    }
                }
                () = &mut extend, if guard.lock.is_some() => {
                    extend.as_mut().reset(tokio::time::Instant::now() + extend_every);
                    if let Some(lock) = &guard.lock {
                        match self.store.extend_lock(lock, self.lock_ttl).await {
                            Ok(true) => {}
                            // Someone else has it now: our result will not be written.
                            Ok(false) => {
                                tracing::debug!(target: "tiered::lock", "lost the lock while loading");
                                guard.lock = None;
                            }
                            Err(e) => self.note_l2(Some(&e)),
                        }
                    }
                }
            }
        };
        let loaded = match outcome {
            Ok(Ok(loaded)) => loaded,
            failed => {
                bump(&self.counters.load_errors);
                let error = match failed {
                    Ok(Err(source)) => Error::Loader {
                        key: key.to_string(),
                        source: Arc::from(source),
                    },
                    _ => Error::LoadAborted {
                        key: key.to_string(),
                    },
                };
                // Release now (and wake the waiters, one of which loads again).
                if let Some(lock) = guard.take() {
                    self.store.release(vec![lock], self.lock_ttl).await;
                }
                if let Some(fb) = fallback.filter(|f| f.usable(opts)) {
                    self.serve_fail_safe(key, &fb, opts, token, &error).await;
                    return Ok(fb.value);
                }
                return Err(error);
            }
        };
        bump(&self.counters.loads);
        trace::tier("loader");
        let Loaded { value, ttl } = loaded;
        if value.is_none() {
            bump(&self.counters.not_found);
        }
        let meta = match &value {
            Some(_) => opts.value_meta(ttl),
            None => match opts.absent_meta(ttl) {
                Some(meta) => meta,
                // "Not found" is not cached: release the lock and answer.
                None => {
                    if let Some(lock) = guard.take() {
                        self.store.release(vec![lock], self.lock_ttl).await;
                    }
                    return Ok(None);
                }
            },
        };
        let (fresh, life) = (meta.fresh_for, meta.stale_for);
        let encoded = self.encode_loaded(value.as_ref(), &meta);
        let mut weight = 0;
        let mut may_fill = true;
        let mut version = 0;
        match encoded {
            Ok(bytes) => {
                weight = bytes.len();
                if let Some(lock) = guard.take() {
                    let done = self.store.complete_lock(&lock, &bytes, life).await;
                    self.note_l2(done.as_ref().err());
                    match done {
                        Ok(Some(v)) => version = v,
                        Ok(None) => {
                            // The lock passed on: a newer write (whose value must win) or a
                            // duplicate load. Do not put ours in L1 either.
                            bump(&self.counters.duplicate_loads);
                            may_fill = false;
                        }
                        Err(_) => {
                            guard.lock = Some(lock);
                        }
                    }
                }
                // Without the lock (Redis was failing or skipped) nothing is written: a plain
                // write could overwrite a newer value.
            }
            Err(e) => {
                tracing::warn!(
                    target: "tiered::l2",
                    namespace = %self.namespace,
                    error = %e,
                    "loaded value not written to L2"
                );
            }
        }
        drop(guard);
        if may_fill {
            let entry = if version == 0 && !opts.skip_l2 {
                // Redis could not be asked or written: nobody else will see this value, and
                // no lock kept its load unique. This node may use it for Δ from the load's
                // start (see `Held::local`), and not longer.
                self.local_entry(value.clone(), weight, started, fresh, opts)
            } else {
                Some(
                    self.entry(value.clone(), weight, fresh, life, opts)
                        .version(version),
                )
            };
            if let Some(entry) = entry {
                self.fill(key, entry, opts, token).await;
            }
        }
        Ok(value)
    }

    /// An L1 entry for a value loaded from the source at `started` without Redis: fresh (and
    /// answering without the lease) until `started` + Δ at most, then kept for fail-safe as
    /// an ordinary entry would be. `None` if Δ has passed already.
    pub(crate) fn local_entry(
        &self,
        value: Option<V>,
        weight: usize,
        started: Instant,
        fresh: Duration,
        opts: &EntryOptions,
    ) -> Option<Entry<Held<V>>> {
        let trusted = self.delta.checked_sub(started.elapsed())?;
        let fresh = fresh.min(trusted);
        if fresh.is_zero() {
            return None;
        }
        let life = fresh.max(opts.fail_safe_max);
        let now = Instant::now();
        let held = Held {
            value,
            fresh_until: later(now, fresh),
            local: true,
        };
        Some(
            Entry::new(Arc::clone(&self.namespace), held)
                .weight(weight)
                .time_to_live(life)
                .fresh_for(fresh),
        )
    }
}
