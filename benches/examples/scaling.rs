//! How the cost grows: L1 memory per entry, and what many typed caches in one process open.
//!
//! ```text
//! cargo run --release -p benches --example scaling -- memory   # 10k, 100k, 1M entries
//! cargo run --release -p benches --example scaling -- caches   # 50 caches on one server
//! ```
//!
//! `memory`: for each size, a fresh `l1::LocalCache<u64>` is filled with keys of 16 bytes
//! and 8-byte values (weight 24: what a caller would count as key + value); the report gives
//! the resident memory it added (`/proc/self/statm`), per entry, beyond those 24 bytes, and
//! moka's weighted size. `caches`: 50 `TieredCache`s built the default way on one
//! redis-server, then the server's client count and the runtime's live tasks.

#![allow(missing_docs)]

use std::time::Duration;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn memory() {
    for n in [10_000u64, 100_000, 1_000_000] {
        let before = rss_bytes();
        let cache: l1::LocalCache<u64> = l1::LocalCache::builder().max_bytes(1 << 40).build();
        for i in 0..n {
            let key = format!("user:{i:011}");
            debug_assert_eq!(key.len(), 16);
            let e = l1::Entry::new("scaling", i)
                .weight(24)
                .time_to_live(Duration::from_secs(3600));
            cache.insert(key.as_str(), e);
        }
        cache.run_pending_tasks();
        let added = rss_bytes().saturating_sub(before);
        let stats = cache.stats();
        println!(
            "{n:>9} entries: RSS +{:>7.1} MiB, {:>6.1} B/entry in all, {:>6.1} B/entry beyond key + value; moka entries {} weighted {} B",
            added as f64 / (1 << 20) as f64,
            added as f64 / n as f64,
            added as f64 / n as f64 - 24.0,
            stats.entry_count,
            stats.weighted_size,
        );
        drop(cache);
    }
}

/// Builds 50 caches, each from `builder(i)`, and reports the Redis connections and live tasks
/// they added.
async fn fifty(
    server: &testkit::RedisServer,
    what: &str,
    builder: impl Fn(usize) -> tiered::TieredCacheBuilder<u64>,
) {
    let clients = || {
        server
            .command(&["CLIENT", "LIST"])
            .lines()
            .filter(|l| l.contains("addr="))
            .count()
    };
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let (base, base_tasks) = (clients(), tasks());
    let mut all = Vec::new();
    for i in 0..50 {
        all.push(builder(i).build().await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!(
        "50 caches {what}: {} more Redis connections, {} more live tasks",
        clients() - base,
        tasks() - base_tasks
    );
}

async fn caches() {
    let server = testkit::RedisServer::start();
    let url = server.url();
    fifty(&server, "built with .redis_url(..)", |i| {
        tiered::TieredCache::builder()
            .namespace(format!("cache{i}"))
            .redis_url(url.clone())
    })
    .await;
    let conn = l2::Connection::connect(server.url()).await.unwrap();
    let bus = invalidation::Bus::connect(&conn, invalidation::BusConfig::default())
        .await
        .unwrap();
    fifty(&server, "given one .connection() and one .bus()", |i| {
        tiered::TieredCache::builder()
            .namespace(format!("shared{i}"))
            .connection(conn.clone())
            .bus(bus.clone())
    })
    .await;
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("memory") => memory(),
        Some("caches") => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(caches()),
        _ => eprintln!("usage: scaling memory|caches"),
    }
}
