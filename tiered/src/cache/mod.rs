//! [`TieredCache`]: the read-through cache users call.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use invalidation::Bus;
use l1::LocalCache;
use l2::{Codec, Connection, KeySpace, LockWaiters, RedisStore};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::breaker::{Breaker, BreakerState};
use crate::coherence::Admission;
use crate::error::{Error, Result};
use crate::flight::Flights;
use crate::options::EntryOptions;
use crate::trace;
use tracing::Instrument;

mod load;
mod read;
mod write;

use crate::stats::{CacheStats, Counters, bump};
pub(crate) use read::{Cached, Fallback, L1Entry};

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

/// Everything a cache handle shares with its background tasks.
pub(crate) struct Inner<V> {
    pub(crate) namespace: Arc<str>,
    pub(crate) space: KeySpace,
    pub(crate) l1: LocalCache<Cached<V>>,
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
    /// The Redis server's clock as the last write saw it: carried values' versions.
    pub(crate) server_clock: write::ServerClock,
    /// The longest key calls accept.
    pub(crate) max_key_len: usize,
    /// The bus's staleness bound Δ.
    pub(crate) delta: Duration,
    pub(crate) hit_ratio_floor: f64,
    pub(crate) trace_keys: bool,
    /// Whether writes offer to carry small values ([`crate::TieredCacheBuilder::carry_values`]).
    pub(crate) carry_values: bool,
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
        let result = Box::pin(self.inner.past_l1(key, *options, Some(loader), candidate))
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
                let result = Box::pin(self.inner.past_l1(key, *options, None, candidate))
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
        // Once begun, a write runs to its end (on a task of its own if the caller gives up: a
        // timeout, a dropped future): L2 is never left changed with this node's L1 behind it.
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

    /// The Redis connection, to share with another cache
    /// ([`TieredCacheBuilder::connection`](crate::TieredCacheBuilder::connection)). There is no
    /// raw access to L2 through a cache: every change goes through the versioned, announced
    /// writes above.
    pub fn connection(&self) -> &Connection {
        self.inner.store.connection()
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
        let now = invalidation::now_micros();
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

    /// The invalidation bus this cache listens on (its counters: [`Bus::stats`]).
    pub fn bus(&self) -> &Bus {
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
            values_carried: get(&c.values_carried),
            gaps: get(&c.gaps),
            l1_unconfirmed: get(&c.l1_unconfirmed),
            outage_served: get(&c.outage_served),
            l1: self.inner.l1.stats(),
            l2: self.inner.store.stats(),
        }
    }
}

/// Runs `change` in the caller's task, to its end even if the returned future is dropped
/// first: a drop hands what is left of `change` to a task of its own, so dropping stops the
/// waiting, never the change halfway (its L2 write and its L1 update belong together).
/// Running it in place saves a task hop on every write (two thread wake-ups when the caller
/// is not on the runtime's worker). Dropped outside a runtime, the rest cannot run: it is
/// dropped as a cancelled change (whose outcome in Redis is unknown to this node, which is
/// what a failed write already is).
fn finish_detached<T: Send + 'static>(
    change: impl Future<Output = Result<T>> + Send + 'static,
) -> FinishOnDrop<T> {
    FinishOnDrop {
        change: Some(Box::pin(change)),
    }
}

/// The future of [`finish_detached`].
pub(crate) struct FinishOnDrop<T: Send + 'static> {
    /// `None` once finished (or if it panicked: a panicked change is not resumed).
    change: Option<Pin<Box<dyn Future<Output = Result<T>> + Send>>>,
}

impl<T: Send + 'static> Future for FinishOnDrop<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        // Taken out while polled: a panic inside drops it, and the drop below resumes nothing.
        let Some(mut change) = self.change.take() else {
            return Poll::Ready(Err(Error::Shutdown));
        };
        match change.as_mut().poll(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => {
                self.change = Some(change);
                Poll::Pending
            }
        }
    }
}

impl<T: Send + 'static> Drop for FinishOnDrop<T> {
    fn drop(&mut self) {
        if let Some(rest) = self.change.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = rest.await;
            });
        }
    }
}

impl<V> Inner<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
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
    pub(crate) fn span(&self, op: &'static str, key: &str) -> tracing::Span {
        trace::span(op, &self.namespace, key, self.trace_keys)
    }

    /// Drops this node's L1 and detaches every load in flight (none of them may fill L1).
    pub(crate) fn invalidate_local(&self) {
        self.loads.detach_all();
        self.reads.detach_all();
        self.admission.drop_all(&self.l1);
    }

    /// Before joining a flight of `key`: while the bus cannot prove delivery (its lease ran
    /// out), a flight that began more than Δ ago may carry a value older than a change whose
    /// announcement has not arrived, so this caller starts a new one instead.
    pub(crate) fn no_stale_joins(&self, key: &str) {
        let now = Instant::now();
        if !self.lease.holds_at(now)
            && let Some(horizon) = now.checked_sub(self.delta)
        {
            self.loads.detach_if_older(key, horizon);
            self.reads.detach_if_older(key, horizon);
        }
    }

    /// Detaches loads and reads in flight for `key` (later callers do not join them).
    pub(crate) fn detach(&self, key: &str) {
        self.loads.detach(key);
        self.reads.detach(key);
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
}
