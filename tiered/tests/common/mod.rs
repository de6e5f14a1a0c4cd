//! Helpers shared by the tiered integration tests.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

pub mod checker;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use testkit::RedisServer;
use tiered::{EntryOptions, TieredCache, TieredCacheBuilder};

/// Generous bound for a wait on something that should happen soon.
pub const SOON: Duration = Duration::from_secs(10);

/// A builder for a node (its own connections and L1) on `server`.
pub fn builder(server: &RedisServer, namespace: &str) -> TieredCacheBuilder<String> {
    TieredCache::builder()
        .namespace(namespace)
        .redis_url(server.url())
        .default_options(EntryOptions::new(Duration::from_secs(60)))
}

/// A node whose default options are `options`.
pub async fn node_with(
    server: &RedisServer,
    namespace: &str,
    options: EntryOptions,
) -> TieredCache<String> {
    builder(server, namespace)
        .default_options(options)
        .build()
        .await
        .unwrap()
}

/// A node with the defaults.
pub async fn node(server: &RedisServer, namespace: &str) -> TieredCache<String> {
    builder(server, namespace).build().await.unwrap()
}

/// Counts loader runs.
#[derive(Clone, Default)]
pub struct Loads(Arc<AtomicUsize>);

impl Loads {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// A loader that counts itself, waits `delay` and returns `value`.
    pub fn returning(
        &self,
        value: &str,
        delay: Duration,
    ) -> impl FnOnce() -> std::pin::Pin<
        Box<dyn Future<Output = Result<String, std::io::Error>> + Send>,
    > + Send
    + 'static {
        let loads = self.0.clone();
        let value = value.to_string();
        move || {
            Box::pin(async move {
                loads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                Ok(value)
            })
        }
    }

    /// A loader that counts itself and fails.
    pub fn failing(
        &self,
    ) -> impl FnOnce() -> std::pin::Pin<
        Box<dyn Future<Output = Result<String, std::io::Error>> + Send>,
    > + Send
    + 'static {
        let loads = self.0.clone();
        move || {
            Box::pin(async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Err(std::io::Error::other("database down"))
            })
        }
    }
}

/// The bus of the fault tests: P = 100 ms, T = 100 ms, so Δ = 200 ms.
pub fn fast_bus() -> invalidation::BusConfig {
    invalidation::BusConfig::default()
        .heartbeat(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_millis(100))
}

/// Options under which only a change can end an L1 copy: fresh for 300 s in both tiers.
pub fn long_lived() -> EntryOptions {
    EntryOptions::new(Duration::from_secs(300)).l1_time_to_live(Duration::from_secs(300))
}

/// A node of `namespace` at `url` with [`fast_bus`] and [`long_lived`] options, returned once
/// its first probe round is back (its L1 answers).
pub async fn fast_node(url: String, namespace: &str) -> TieredCache<String> {
    fast_node_with(url, namespace, long_lived()).await
}

/// As [`fast_node`], with `options` as the defaults.
pub async fn fast_node_with(
    url: String,
    namespace: &str,
    options: EntryOptions,
) -> TieredCache<String> {
    let cache = TieredCache::builder()
        .namespace(namespace)
        .redis_url(url)
        .bus_config(fast_bus())
        .default_options(options)
        .build()
        .await
        .unwrap();
    eventually(SOON, "the first probe round returns", || async {
        cache.bus().lease().holds()
    })
    .await;
    cache
}

/// A plain redis-rs connection to `server` (to act behind the cache's back).
pub async fn redis_conn(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

pub use testkit::eventually;

/// The number of calls of `command` the server has run so far (INFO commandstats).
pub fn calls(server: &RedisServer, command: &str) -> u64 {
    let info = server.command(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The runtime of a helper node process (an OS process re-running a test binary): two
/// worker threads, as a small service would have.
pub fn node_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Where a test's caches keep L2: one server or a cluster (the test matrix).
#[derive(Debug, Clone)]
pub struct Target {
    /// For messages: "single server" or "cluster".
    pub name: &'static str,
    /// The server's URL, or the cluster's seed URLs.
    pub urls: Vec<String>,
    /// Whether `urls` are a cluster's seeds.
    pub cluster: bool,
}

impl Target {
    /// One server.
    pub fn single(url: String) -> Self {
        Target {
            name: "single server",
            urls: vec![url],
            cluster: false,
        }
    }

    /// A cluster, from its seeds.
    pub fn cluster(urls: Vec<String>) -> Self {
        Target {
            name: "cluster",
            urls,
            cluster: true,
        }
    }

    /// A builder for a node of `namespace` on this target.
    pub fn builder(&self, namespace: &str) -> TieredCacheBuilder<String> {
        let b = TieredCache::builder()
            .namespace(namespace)
            .default_options(EntryOptions::new(Duration::from_secs(60)));
        if self.cluster {
            b.redis_cluster(self.urls.clone())
        } else {
            b.redis_url(self.urls[0].clone())
        }
    }

    /// A node of `namespace` with the defaults.
    pub async fn node(&self, namespace: &str) -> TieredCache<String> {
        self.builder(namespace).build().await.unwrap()
    }
}

/// The objects (commands, keys, channels) Redis denied an ACL user, from `ACL LOG`.
pub fn acl_denials(server: &RedisServer) -> Vec<String> {
    let log = server.command(&["ACL", "LOG"]);
    log.lines()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "object")
        .map(|w| w[1].to_string())
        .collect()
}
