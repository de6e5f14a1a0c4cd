//! The main job: two cache nodes share one Redis in front of a slow "database". Each node is a
//! `TieredCache` with its own L1 (moka), its own Redis connections and its own invalidation bus.
//! The demo shows one database load for 400 concurrent callers on two nodes, L1 and L2 hits, a
//! write on one node evicting the other's copy within a millisecond or so, stale-while-
//! revalidate, fail-safe while the database is down, and foreign bytes in Redis handled as a
//! counted miss.
//!
//! Uses `REDIS_URL` when set; otherwise starts a private redis-server on a free port.
//!
//! ```text
//! cargo run --release -p demo
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --release -p demo
//! ```

use std::error::Error as StdError;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tiered::{EntryOptions, TieredCache};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
    roles: Vec<String>,
}

const NAMESPACE: &str = "demo-users";
const DB_LATENCY: Duration = Duration::from_millis(50);
const L1_TTL: Duration = Duration::from_millis(500);

/// A slow database that counts its queries and can be switched off.
#[derive(Debug, Default)]
struct Db {
    queries: AtomicU64,
    version: AtomicU64,
    down: AtomicBool,
}

impl Db {
    async fn load_user(&self, id: u64) -> Result<User, std::io::Error> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(DB_LATENCY).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("database unreachable"));
        }
        Ok(user(id, self.version.load(Ordering::SeqCst)))
    }
}

fn user(id: u64, version: u64) -> User {
    User {
        id,
        name: format!("user {id}, v{version}"),
        email: format!("user{id}@example.com"),
        roles: vec!["admin".into(), "billing".into()],
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn node(url: &str, options: EntryOptions) -> tiered::Result<TieredCache<User>> {
    TieredCache::builder()
        .namespace(NAMESPACE)
        .redis_url(url)
        .l1_max_bytes(8 << 20)
        .default_options(options)
        .build()
        .await
}

fn loader(
    db: &Arc<Db>,
    id: u64,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<User, std::io::Error>> + Send>>
+ Send
+ 'static {
    let db = Arc::clone(db);
    move || Box::pin(async move { db.load_user(id).await })
}

async fn run() -> Result<(), Box<dyn StdError>> {
    let (url, _server) = match std::env::var("REDIS_URL") {
        Ok(url) => {
            println!("Using the Redis at REDIS_URL.");
            (url, None)
        }
        Err(_) => {
            let server = testkit::RedisServer::start();
            println!(
                "REDIS_URL is not set: started a private redis-server on 127.0.0.1:{}.",
                server.port()
            );
            (server.url(), Some(server))
        }
    };
    let options = EntryOptions::new(Duration::from_secs(2))
        .l1_time_to_live(L1_TTL)
        .stale_while_revalidate(Duration::from_secs(30))
        .fail_safe(Duration::from_secs(300))
        .fail_safe_throttle(Duration::from_secs(1));
    let a = node(&url, options).await?;
    let b = node(&url, options).await?;
    for key in ["42", "7", "9"] {
        a.invalidate(key).await?;
    }
    let db = Arc::new(Db::default());

    println!(
        "\n1. 200 callers on node A and 200 on node B ask for cold user 42 at once \
         (the database takes {DB_LATENCY:?}):"
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..400 {
        let cache = if i % 2 == 0 { a.clone() } else { b.clone() };
        let load = loader(&db, 42);
        tasks.push(tokio::spawn(
            async move { cache.get_or_set("42", load).await },
        ));
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "   all 400 answered in {:?}; database queries: {}",
        start.elapsed(),
        db.queries.load(Ordering::SeqCst)
    );

    let got = b.get_or_set("42", loader(&db, 42)).await?;
    println!("2. node B reads again: {} (from its L1)", got.name);

    println!(
        "\n3. The database changes and node A writes v1; the write announces itself on the \
         invalidation bus, and node B's L1 copy is evicted:"
    );
    db.version.store(1, Ordering::SeqCst);
    let fresh = db.load_user(42).await?;
    let written_at = Instant::now();
    let version = a.set("42", &fresh).await?;
    let mut got = b.get_or_set("42", loader(&db, 42)).await?;
    while got.name != "user 42, v1" && written_at.elapsed() < Duration::from_secs(2) {
        tokio::task::yield_now().await;
        got = b.get_or_set("42", loader(&db, 42)).await?;
    }
    println!(
        "   node B reads {} (write version {version}) {:?} after node A's write started",
        got.name,
        written_at.elapsed()
    );

    println!("\n4. User 42's TTL (2 s) passes; inside the stale-while-revalidate window:");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    db.version.store(2, Ordering::SeqCst);
    let before = db.queries.load(Ordering::SeqCst);
    let t = Instant::now();
    let got = b.get_or_set("42", loader(&db, 42)).await?;
    println!(
        "   node B answers at once with the stale value ({}, in {:?}) and refreshes in the background",
        got.name,
        t.elapsed()
    );
    tokio::time::sleep(DB_LATENCY * 3).await;
    let got = b.get_or_set("42", loader(&db, 42)).await?;
    println!(
        "   a moment later: {} ({} database query for the refresh)",
        got.name,
        db.queries.load(Ordering::SeqCst) - before
    );

    println!(
        "\n5. The database goes down after user 7 was cached and went stale (this call allows no"
    );
    println!("   stale-while-revalidate, so only fail-safe can answer):");
    a.get_or_set("7", loader(&db, 7)).await?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    db.down.store(true, Ordering::SeqCst);
    let stale_options = options.stale_while_revalidate(Duration::ZERO);
    match a.get_or_set_with("7", stale_options, loader(&db, 7)).await {
        Ok(u) => println!("   fail-safe serves the last value: {}", u.name),
        Err(e) => println!("   error: {e}"),
    }
    match a.get_or_set("404", loader(&db, 404)).await {
        Ok(u) => println!("   unexpected value: {u:?}"),
        Err(e) => println!(
            "   a user never cached gets the error: {e} ({})",
            e.source().map(|s| s.to_string()).unwrap_or_default()
        ),
    }
    db.down.store(false, Ordering::SeqCst);

    println!("\n6. Latency on node B for a fresh user 9 (medians of many reads):");
    a.set("9", &user(9, 0)).await?;
    b.get_or_set("9", loader(&db, 9)).await?;
    let mut l1_samples = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let t = Instant::now();
        let hit = b.get_or_set("9", loader(&db, 9)).await?;
        l1_samples.push(t.elapsed());
        std::hint::black_box(hit);
    }
    let l2_only = options.skip_l1(true);
    let mut l2_samples = Vec::with_capacity(1_000);
    for _ in 0..1_000 {
        let t = Instant::now();
        let hit = b.get_with("9", l2_only).await?;
        l2_samples.push(t.elapsed());
        std::hint::black_box(hit);
    }
    println!(
        "   L1 hit: {:?}   L2 hit (one round trip + checks + decode): {:?}",
        median(l1_samples),
        median(l2_samples)
    );

    println!("\n7. Someone writes foreign bytes under user 9's key in Redis:");
    let key = l2::KeySpace::new(NAMESPACE).key("9");
    a.store()
        .set_bytes(&key, b"{\"not\":\"ours\"}", Duration::from_secs(60))
        .await?;
    let before = db.queries.load(Ordering::SeqCst);
    let got = b.get_or_set_with("9", l2_only, loader(&db, 9)).await?;
    println!(
        "   node B treats them as a miss, evicts them and reloads: {} ({} database query)",
        got.name,
        db.queries.load(Ordering::SeqCst) - before
    );

    let bus = b.bus().stats();
    println!(
        "\nNode B's bus: {} messages, propagation lag p50 {} µs / p99 {} µs, {} gaps, {} malformed",
        bus.received, bus.lag_p50_micros, bus.lag_p99_micros, bus.gaps, bus.malformed
    );
    let health = b.health().await;
    println!(
        "Node B's health: {:?}, ready {}, redis {} µs, hit ratio {:.1}% (floor {:.0}%){}",
        health.status,
        health.ready,
        health.redis.latency_micros.unwrap_or(0),
        health.hit_ratio * 100.0,
        health.hit_ratio_floor * 100.0,
        if health.reasons.is_empty() {
            String::new()
        } else {
            format!(": {}", health.reasons.join("; "))
        }
    );
    println!("\nCounters:");
    println!(
        "   {:<6} {:>8} {:>8} {:>7} {:>6} {:>6} {:>10} {:>9} {:>10} {:>13}",
        "node",
        "L1 hits",
        "L2 hits",
        "misses",
        "loads",
        "stale",
        "fail-safe",
        "lock wait",
        "hit ratio",
        "L2 bad bytes"
    );
    for (name, cache) in [("A", &a), ("B", &b)] {
        let s = cache.stats();
        println!(
            "   {:<6} {:>8} {:>8} {:>7} {:>6} {:>6} {:>10} {:>9} {:>9.1}% {:>13}",
            name,
            s.l1_hits,
            s.l2_hits,
            s.misses,
            s.loads,
            s.stale_served,
            s.fail_safe,
            s.lock_waits,
            s.hit_ratio() * 100.0,
            s.l2.decode_errors
        );
    }
    println!(
        "   database queries in all: {}",
        db.queries.load(Ordering::SeqCst)
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(e) = run().await {
        eprint!("demo: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            eprint!(": {s}");
            source = s.source();
        }
        eprintln!();
        std::process::exit(1);
    }
}
