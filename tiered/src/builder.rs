//! [`TieredCacheBuilder`]: connects the tiers and checks the settings.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use invalidation::{Bus, BusConfig};
use l1::LocalCache;
use l2::{Codec, Connection, KeySpace, LockWaiters, RedisStore, TypeTag};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::breaker::Breaker;
use crate::cache::{Inner, Lifeline, TieredCache};
use crate::coherence::Admission;
use crate::error::{Error, Result};
use crate::flight::Flights;
use crate::options::EntryOptions;
use crate::stats::Counters;

/// The default longest key: see [`TieredCacheBuilder::max_key_len`].
pub const DEFAULT_MAX_KEY_LEN: usize = 16 * 1024;
/// The longest key any cache accepts: an invalidation message carries a key's length in
/// 16 bits, with room to spare for escaping.
pub const MAX_KEY_LEN: usize = 60_000;
/// The default lock TTL: see [`TieredCacheBuilder::lock_time_to_live`].
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(3);
/// The default maximum load time: see [`TieredCacheBuilder::max_load_time`].
pub const DEFAULT_MAX_LOAD_TIME: Duration = Duration::from_secs(60);
/// The default TTL when no default options are given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// Builds a [`TieredCache`]; start with [`TieredCache::builder`].
///
/// Required: a namespace, and a Redis URL or an existing connection.
pub struct TieredCacheBuilder<V> {
    namespace: Option<String>,
    schema_version: Option<u32>,
    type_name: Option<String>,
    max_key_len: usize,
    redis_url: Option<String>,
    redis_cluster: Option<Vec<String>>,
    tls_root_certificate: Option<Vec<u8>>,
    allow_insecure_tls: bool,
    replica_acks: Option<(u32, Duration)>,
    connection: Option<Connection>,
    bus: Option<Bus>,
    bus_config: BusConfig,
    l2_timeout: Duration,
    l1_max_bytes: u64,
    l1_max_entries: Option<u64>,
    max_value_bytes: usize,
    defaults: EntryOptions,
    lock_ttl: Duration,
    max_load_time: Duration,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
    hit_ratio_floor: f64,
    trace_keys: bool,
    carry_values: bool,
    _type: PhantomData<fn() -> V>,
}

impl<V> fmt::Debug for TieredCacheBuilder<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may carry a password.
        f.debug_struct("TieredCacheBuilder")
            .field("namespace", &self.namespace)
            .field("schema_version", &self.schema_version)
            .field("l1_max_bytes", &self.l1_max_bytes)
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl<V> TieredCacheBuilder<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    pub(crate) fn new() -> Self {
        TieredCacheBuilder {
            namespace: None,
            schema_version: None,
            type_name: None,
            max_key_len: DEFAULT_MAX_KEY_LEN,
            redis_url: None,
            redis_cluster: None,
            tls_root_certificate: None,
            allow_insecure_tls: false,
            replica_acks: None,
            connection: None,
            bus: None,
            bus_config: BusConfig::default(),
            l2_timeout: l2::DEFAULT_TIMEOUT,
            l1_max_bytes: l1::DEFAULT_MAX_BYTES,
            l1_max_entries: None,
            max_value_bytes: l2::DEFAULT_MAX_SIZE,
            defaults: EntryOptions::new(DEFAULT_TTL),
            lock_ttl: DEFAULT_LOCK_TTL,
            max_load_time: DEFAULT_MAX_LOAD_TIME,
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
            hit_ratio_floor: crate::DEFAULT_HIT_RATIO_FLOOR,
            trace_keys: false,
            carry_values: false,
            _type: PhantomData,
        }
    }

    /// The namespace: the Redis key prefix and the L1 partition. Required.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// A schema version in every key: bump it when `V` changes shape, and old entries are
    /// never read again. Default: none.
    pub fn schema_version(mut self, version: u32) -> Self {
        self.schema_version = Some(version);
        self
    }

    /// The name written into every entry as its type tag; a reader with another name treats
    /// the entry as foreign (a counted miss, and the entry is evicted). Default: the Rust
    /// type's name (`std::any::type_name::<V>()`) and the schema version, so two value types
    /// in one namespace never decode each other's bytes. Set it when processes built from
    /// different crates (or compiler versions, which may spell type names differently) share
    /// a namespace, for example `"myapp.User"`.
    pub fn type_name(mut self, name: impl Into<String>) -> Self {
        self.type_name = Some(name.into());
        self
    }

    /// The longest key, in bytes, that calls accept; a longer one is
    /// [`Error::KeyTooLong`] on every entry point, before anything is read or written.
    /// Default: [`DEFAULT_MAX_KEY_LEN`] (16 KiB); at most [`MAX_KEY_LEN`].
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.max_key_len = bytes;
        self
    }

    /// The Redis URL (`redis://[user:password@]host:port[/db]`). Either this or
    /// [`TieredCacheBuilder::connection`] is required.
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// A Redis Cluster, found from one or more seed nodes' URLs (same forms as
    /// [`TieredCacheBuilder::redis_url`]). Instead of `redis_url`; see
    /// [`l2::Connection::cluster`] for how batches and clears run on a cluster.
    pub fn redis_cluster<S: Into<String>>(mut self, seeds: impl IntoIterator<Item = S>) -> Self {
        self.redis_cluster = Some(seeds.into_iter().map(Into::into).collect());
        self
    }

    /// For `rediss://` URLs: trust this CA (PEM) instead of the system's roots.
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_certificate = Some(pem.into());
        self
    }

    /// Allows a `rediss://…/#insecure` URL (no certificate checks). Refused by default; see
    /// [`l2::ConnectionBuilder::danger_accept_invalid_certificates`].
    pub fn danger_accept_invalid_certificates(mut self, allow: bool) -> Self {
        self.allow_insecure_tls = allow;
        self
    }

    /// Acknowledge writes only once `replicas` replicas have them, so a failover cannot lose
    /// them; see [`l2::ConnectionBuilder::replica_acks`] for the cost. Default: off.
    pub fn replica_acks(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replica_acks = Some((replicas, timeout));
        self
    }

    /// An existing connection, shared with other caches.
    pub fn connection(mut self, connection: Connection) -> Self {
        self.connection = Some(connection);
        self
    }

    /// An existing invalidation bus (one subscriber connection per process), shared with
    /// caches of other namespaces. Default: a bus of its own, with
    /// [`TieredCacheBuilder::bus_config`].
    pub fn bus(mut self, bus: Bus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// The heartbeat settings of the cache's own bus (they set the staleness bound Δ; see
    /// [`invalidation`]). Ignored with [`TieredCacheBuilder::bus`].
    /// Default: [`BusConfig::default`].
    pub fn bus_config(mut self, config: BusConfig) -> Self {
        self.bus_config = config;
        self
    }

    /// The timeout of each Redis command when connecting by URL.
    /// Default: [`l2::DEFAULT_TIMEOUT`].
    pub fn l2_timeout(mut self, timeout: Duration) -> Self {
        self.l2_timeout = timeout;
        self
    }

    /// The L1 byte budget (an entry weighs its key, its encoded size and
    /// [`l1::ENTRY_OVERHEAD`]). Default: [`l1::DEFAULT_MAX_BYTES`].
    pub fn l1_max_bytes(mut self, bytes: u64) -> Self {
        self.l1_max_bytes = bytes;
        self
    }

    /// An L1 entry bound on top of the byte budget. Default: none.
    pub fn l1_max_entries(mut self, entries: u64) -> Self {
        self.l1_max_entries = Some(entries);
        self
    }

    /// The largest encoded value written to or read from Redis. Default: [`l2::DEFAULT_MAX_SIZE`].
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// The options of calls without their own. Default: a TTL of [`DEFAULT_TTL`], the rest as
    /// [`EntryOptions::new`].
    pub fn default_options(mut self, options: EntryOptions) -> Self {
        self.defaults = options;
        self
    }

    /// How long a load lock lives without renewal. The holder renews it every third of this
    /// while its loader runs, so a dead holder's lock is gone within about this long.
    /// Default: [`DEFAULT_LOCK_TTL`].
    pub fn lock_time_to_live(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl;
        self
    }

    /// The longest a load may run in the background (after its callers gave up at their hard
    /// timeout) before it is stopped and its lock released. Default: [`DEFAULT_MAX_LOAD_TIME`].
    pub fn max_load_time(mut self, limit: Duration) -> Self {
        self.max_load_time = limit;
        self
    }

    /// The circuit breaker: it opens after `failures` L2 availability failures in a row and
    /// then skips L2 for `cooldown`, after which one call probes it. Default: 5 and 1 s.
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_threshold = failures;
        self.breaker_cooldown = cooldown;
        self
    }

    /// The hit ratio under which [`TieredCache::health`] reports the cache as degraded (not
    /// failed: a cold or churning cache still serves). Default:
    /// [`DEFAULT_HIT_RATIO_FLOOR`](crate::DEFAULT_HIT_RATIO_FLOOR) (a healthy cache runs at
    /// 85-95 %).
    pub fn hit_ratio_floor(mut self, floor: f64) -> Self {
        self.hit_ratio_floor = floor;
        self
    }

    /// Lets a `set` of a small value (up to 1,536 bytes with its key) carry the value in its
    /// announcement, so other nodes holding an older copy take the new one into L1 and their
    /// next read is an L1 hit instead of a Redis round trip. Needs a signed bus
    /// ([`invalidation::BusConfig::secret`]; without one this does nothing), and every node on
    /// the bus running a version that understands such messages (this one or later): an older
    /// node drops them as malformed and would miss the change until a later message of the
    /// same writer shows the gap. How it keeps the `# Consistency` promise is told there.
    /// Default: false.
    pub fn carry_values(mut self, carry: bool) -> Self {
        self.carry_values = carry;
        self
    }

    /// Shows keys as they are in tracing spans. Keys can carry user data (emails, ids), so
    /// by default spans show a 64-bit hash of the key instead. Default: false.
    pub fn trace_keys(mut self, raw: bool) -> Self {
        self.trace_keys = raw;
        self
    }

    /// Connects (unless given a connection), subscribes to the lock notices and builds the
    /// cache. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting that is missing or invalid; [`Error::L2`] when
    /// Redis cannot be reached or refuses the subscription.
    pub async fn build(self) -> Result<TieredCache<V>> {
        let namespace = self
            .namespace
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::Config("namespace is required".into()))?;
        self.defaults
            .problem()
            .map_err(|e| Error::Config(format!("default_options: {e}")))?;
        if self.max_key_len == 0 || self.max_key_len > MAX_KEY_LEN {
            return Err(Error::Config(format!(
                "max_key_len must be between 1 and {MAX_KEY_LEN} bytes (got {})",
                self.max_key_len
            )));
        }
        for (name, d) in [
            ("lock_time_to_live", self.lock_ttl),
            ("max_load_time", self.max_load_time),
            ("circuit_breaker cooldown", self.breaker_cooldown),
            ("l2_timeout", self.l2_timeout),
        ] {
            if d > crate::MAX_OPTION_DURATION {
                return Err(Error::Config(format!(
                    "{name} must be at most {:?} (got {d:?})",
                    crate::MAX_OPTION_DURATION
                )));
            }
        }
        if self.lock_ttl < Duration::from_millis(3) {
            return Err(Error::Config(
                "lock_time_to_live must be at least 3 ms".into(),
            ));
        }
        if self.max_load_time.is_zero() {
            return Err(Error::Config("max_load_time must be above zero".into()));
        }
        if !(0.0..=1.0).contains(&self.hit_ratio_floor) {
            return Err(Error::Config(
                "hit_ratio_floor must be between 0 and 1".into(),
            ));
        }
        if self.breaker_cooldown.is_zero() {
            return Err(Error::Config(
                "circuit_breaker cooldown must be above zero".into(),
            ));
        }
        let connection = match (self.connection, self.redis_url, self.redis_cluster) {
            (Some(c), _, _) => c,
            (None, Some(_), Some(_)) => {
                return Err(Error::Config(
                    "redis_url and redis_cluster: give one, not both".into(),
                ));
            }
            (None, url, cluster) => {
                let mut builder = match (url, cluster) {
                    (Some(url), _) => Connection::builder(url),
                    (None, Some(seeds)) => Connection::cluster(seeds),
                    (None, None) => {
                        return Err(Error::Config(
                            "redis_url, redis_cluster or connection is required".into(),
                        ));
                    }
                };
                if let Some(pem) = self.tls_root_certificate {
                    builder = builder.tls_root_certificate(pem);
                }
                if let Some((replicas, timeout)) = self.replica_acks {
                    builder = builder.replica_acks(replicas, timeout);
                }
                builder
                    .danger_accept_invalid_certificates(self.allow_insecure_tls)
                    .timeout(self.l2_timeout)
                    .connect()
                    .await?
            }
        };
        let bus = match self.bus {
            Some(bus) => bus,
            None => Bus::connect(&connection, self.bus_config).await?,
        };
        let mut space = KeySpace::new(&namespace);
        if let Some(v) = self.schema_version {
            space = space.schema_version(v);
        }
        let waiters = LockWaiters::attach(bus.subscriber(), &space)
            .await
            .map_err(|e| rights(&space, e))?;
        let channel = invalidation::channel_for(&space);
        let publisher = bus.publisher(&channel);
        let tag = TypeTag::from_name(&self.type_name.unwrap_or_else(|| {
            format!(
                "{}/v{}",
                std::any::type_name::<V>(),
                self.schema_version.unwrap_or(0)
            )
        }));
        let codec = Codec::new(tag).max_size(self.max_value_bytes);
        let mut l1 = LocalCache::builder().max_bytes(self.l1_max_bytes);
        if let Some(n) = self.l1_max_entries {
            l1 = l1.max_entries(n);
        }
        let l1 = l1.build();
        let (tx, rx) = watch::channel(());
        let admission = Admission::new();
        let inner = Inner {
            namespace: namespace.into(),
            space,
            l1,
            store: RedisStore::new(connection),
            codec,
            waiters,
            defaults: self.defaults,
            lock_ttl: self.lock_ttl,
            max_load_time: self.max_load_time,
            breaker: Breaker::new(self.breaker_threshold, self.breaker_cooldown),
            closed: rx,
            loads: Flights::new(&admission),
            reads: Flights::new(&admission),
            counters: Counters::default(),
            publisher,
            bus: bus.clone(),
            lease: bus.lease().clone(),
            admission,
            server_clock: Default::default(),
            max_key_len: self.max_key_len,
            delta: bus.config().bound(),
            hit_ratio_floor: self.hit_ratio_floor,
            trace_keys: self.trace_keys,
            carry_values: self.carry_values,
        };
        let inner = Arc::new(inner);
        crate::coherence::listen(&inner, &bus, &channel)
            .await
            .map_err(|e| rights(&inner.space, e))?;
        crate::metrics::describe();
        spawn_maintenance(Arc::downgrade(&inner), inner.closed.clone());
        let lifeline = Lifeline { _close: tx };
        Ok(TieredCache {
            inner,
            _lifeline: Arc::new(lifeline),
        })
    }
}

/// A refused subscription at start-up as a configuration error that says what to grant:
/// without its channels a node would serve stale data silently.
fn rights(space: &KeySpace, e: l2::Error) -> Error {
    match e {
        l2::Error::Permission { op, detail } => Error::Config(format!(
            "the redis user may not `{op}` on the cache's channels ({detail}); \
             it needs `ACL SETUSER <user> {}`",
            space.acl_rules()
        )),
        other => Error::L2(other),
    }
}

/// Every second: runs L1's maintenance (expiry, eviction to the budget, counters), so an idle
/// cache still shrinks, and exports the counters to the `metrics` facade. Stops with the cache.
fn spawn_maintenance<V>(inner: std::sync::Weak<Inner<V>>, mut closed: watch::Receiver<()>)
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let Some(inner) = inner.upgrade() else { return };
                    // Maintenance can take a while under heavy writes: off the async workers.
                    let l1 = inner.l1.clone();
                    let _ = tokio::task::spawn_blocking(move || l1.run_pending_tasks()).await;
                    crate::metrics::export(&inner);
                }
                _ = closed.changed() => return,
            }
        }
    });
}
