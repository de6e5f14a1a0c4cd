//! Tier benches, each beside its raw baseline in the same run:
//! - `l1_hit`: `TieredCache::get_or_set` answered by L1 (`tiered`) and `l1::LocalCache::get`
//!   (`ours`) vs a bare `moka::future::Cache::get` of the same value.
//! - `l2_hit`: `TieredCache::get_with` with L1 skipped (`tiered`: single-flighted L2 read) and
//!   `l2::RedisStore::get` (`ours`: one round trip + envelope checks + decode) vs a bare
//!   redis-rs `GET` of the same bytes plus `rmp_serde` decode.
//! - `cluster_l2_hit`: `l2::RedisStore::get` on a local six-node Redis Cluster vs a bare
//!   redis-rs cluster-client `GET` + decode.
//! - `miss_load`: a cold key with a no-op loader vs raw cache-aside (`GET` miss, `SET PX`,
//!   `PUBLISH`).
//! - `write`: `TieredCache::set` acknowledged (unsigned bus; and signed, offering to carry the
//!   value) vs one bare `EVALSHA` of a script doing the same Redis work, value encoding
//!   included in both.
//! - `swr_stale_hit`: a read inside the stale-while-revalidate window while the refresh runs,
//!   and the first such read of a key (which starts the refresh), vs an L1 hit.
//! - `contention`: 1,000 tasks on one cold key (one load) vs 1,000 no-op tasks.
//! - `batch`: `get_or_set_many` of 100 keys vs 100 single reads vs a bare `MGET` + decode.
//! - `throughput_l1` / `throughput_l2`: hits per second on a 2-thread runtime, beside bare
//!   moka and bare redis-rs.
//!
//! Invalidation propagation between two processes is the `propagation` bench.
//!
//! `cargo bench -p benches --bench tiers`

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use serde::Serialize;

use benches::{Profile, profile};

/// The benches' runtime: the measured futures run on the bench's own thread (criterion's
/// `block_on`), the cache's background tasks (the bus, its probes) on one worker, as in a
/// service. On a current-thread runtime an L1 hit never yields, the bus starves for the whole
/// measurement and its lease runs out, which measures a stalled process, not the cache.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn l1_hit(c: &mut Criterion) {
    let rt = runtime();
    let keys: Vec<String> = (0..10_000).map(|i| format!("profiles:{{{i}}}")).collect();
    let ours: l1::LocalCache<Profile> = l1::LocalCache::builder().max_bytes(64 << 20).build();
    let bare: moka::future::Cache<String, Arc<Profile>> =
        moka::future::Cache::builder().max_capacity(100_000).build();
    rt.block_on(async {
        for k in &keys {
            let e = l1::Entry::new("profiles", profile())
                .weight(1024)
                .time_to_live(Duration::from_secs(3600));
            ours.insert(k.as_str(), e);
            bare.insert(k.clone(), Arc::new(profile())).await;
        }
    });
    let server = testkit::RedisServer::start();
    let tiered = rt.block_on(async {
        let cache: tiered::TieredCache<Arc<Profile>> = tiered::TieredCache::builder()
            .namespace("profiles")
            .redis_url(server.url())
            .default_options(tiered::EntryOptions::new(Duration::from_secs(3600)))
            .build()
            .await
            .unwrap();
        cache.set(&keys[4242], &Arc::new(profile())).await.unwrap();
        cache
    });
    let key = keys[4242].as_str();
    let mut g = c.benchmark_group("l1_hit");
    g.bench_function("tiered", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                tiered
                    .get_or_set(black_box(key), || async {
                        Err::<Arc<Profile>, _>(std::io::Error::other("not called"))
                    })
                    .await
                    .unwrap(),
            )
        })
    });
    g.bench_function("ours", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(ours.get(black_box(key))) })
    });
    g.bench_function("bare_moka", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(bare.get(black_box(key)).await) })
    });
    g.finish();
}

fn l2_hit(c: &mut Criterion) {
    let rt = runtime();
    let server = testkit::RedisServer::start();
    let codec = l2::Codec::<Profile>::new(l2::TypeTag::from_name("bench.Profile/v1"));
    let key = l2::KeySpace::new("profiles").key("42");
    let (store, raw, bare_key) = rt.block_on(async {
        let store = l2::RedisStore::new(l2::Connection::connect(server.url()).await.unwrap());
        let meta = l2::EntryMeta::new(Duration::from_secs(3600));
        store.set(&key, &codec, &profile(), &meta).await.unwrap();
        let info = redis::IntoConnectionInfo::into_connection_info(server.url().as_str())
            .unwrap()
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let mut raw = redis::Client::open(info)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let bare_key = "bare:profile".to_string();
        let bytes = rmp_serde::to_vec_named(&profile()).unwrap();
        let _: () = redis::cmd("SET")
            .arg(&bare_key)
            .arg(bytes)
            .query_async(&mut raw)
            .await
            .unwrap();
        (store, raw, bare_key)
    });
    let (tiered, skip_l1) = rt.block_on(async {
        let opts = tiered::EntryOptions::new(Duration::from_secs(3600));
        let cache: tiered::TieredCache<Profile> = tiered::TieredCache::builder()
            .namespace("tiered-profiles")
            .redis_url(server.url())
            .default_options(opts)
            .build()
            .await
            .unwrap();
        cache.set("42", &profile()).await.unwrap();
        (cache, opts.skip_l1(true))
    });
    let mut g = c.benchmark_group("l2_hit");
    g.bench_function("tiered", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(tiered.get_with("42", skip_l1).await.unwrap()) })
    });
    g.bench_function("ours", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(store.get(&key, &codec).await.unwrap()) })
    });
    g.bench_function("bare_get_decode", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = raw.clone();
            let key = bare_key.as_str();
            async move {
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                black_box(rmp_serde::from_slice::<Profile>(&bytes).unwrap())
            }
        })
    });
    g.finish();
}

/// An L2 hit on a six-node Redis Cluster: our `get` (the key's master, one pipelined
/// GETRANGE + PTTL, envelope decode) beside a bare cluster-client GET + decode.
fn cluster_l2_hit(c: &mut Criterion) {
    let rt = runtime();
    let cluster = testkit::RedisCluster::start();
    let codec = l2::Codec::<Profile>::new(l2::TypeTag::from_name("bench.Profile/v1"));
    let key = l2::KeySpace::new("profiles").key("42");
    let (store, raw) = rt.block_on(async {
        let conn = l2::Connection::cluster(cluster.urls())
            .connect()
            .await
            .unwrap();
        let store = l2::RedisStore::new(conn);
        let meta = l2::EntryMeta::new(Duration::from_secs(3600));
        store.set(&key, &codec, &profile(), &meta).await.unwrap();
        let mut raw = redis::cluster::ClusterClientBuilder::new(cluster.urls())
            .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true))
            .build()
            .unwrap()
            .get_async_connection()
            .await
            .unwrap();
        let bytes = rmp_serde::to_vec_named(&profile()).unwrap();
        let _: () = redis::cmd("SET")
            .arg("bare:profile")
            .arg(bytes)
            .query_async(&mut raw)
            .await
            .unwrap();
        (store, raw)
    });
    let mut g = c.benchmark_group("cluster_l2_hit");
    g.bench_function("ours", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(store.get(&key, &codec).await.unwrap()) })
    });
    g.bench_function("bare_get_decode", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = raw.clone();
            async move {
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg("bare:profile")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                black_box(rmp_serde::from_slice::<Profile>(&bytes).unwrap())
            }
        })
    });
    g.finish();
}

async fn cache<V>(url: &str, namespace: &str, opts: tiered::EntryOptions) -> tiered::TieredCache<V>
where
    V: Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    tiered::TieredCache::builder()
        .namespace(namespace)
        .redis_url(url)
        .default_options(opts)
        .build()
        .await
        .unwrap()
}

/// Spawns `n` tasks running `task(i)` and waits for all of them.
async fn spawn_all<F, Fut>(n: usize, task: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(task(i))).collect();
    for t in tasks {
        t.await.unwrap();
    }
}

async fn raw_conn(url: &str) -> redis::aio::MultiplexedConnection {
    let info = redis::IntoConnectionInfo::into_connection_info(url)
        .unwrap()
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    redis::Client::open(info)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A cold key with a no-op loader (L2 miss, lock, load, conditional write) vs raw
/// cache-aside.
fn miss_load(c: &mut Criterion) {
    let rt = runtime();
    let server = testkit::RedisServer::start();
    let opts = tiered::EntryOptions::new(Duration::from_secs(3600));
    let (ours, raw) = rt.block_on(async {
        (
            cache::<Arc<Profile>>(&server.url(), "miss", opts).await,
            raw_conn(&server.url()).await,
        )
    });
    let value = Arc::new(profile());
    let bytes = rmp_serde::to_vec_named(&profile()).unwrap();
    let mut g = c.benchmark_group("miss_load");
    let n = std::sync::atomic::AtomicU64::new(0);
    g.bench_function("tiered", |b| {
        b.to_async(&rt).iter(|| {
            let key = format!("k{}", n.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            let (ours, value) = (&ours, Arc::clone(&value));
            async move {
                black_box(
                    ours.get_or_set(&key, move || async move { Ok::<_, std::io::Error>(value) })
                        .await
                        .unwrap(),
                )
            }
        })
    });
    // Raw cache-aside, as an application writes it by hand: GET (a miss), load, then SET PX
    // and PUBLISH (so other nodes drop their copies) in one pipeline.
    g.bench_function("bare_cache_aside", |b| {
        b.to_async(&rt).iter(|| {
            let key = format!(
                "bare{}",
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            let (mut conn, bytes) = (raw.clone(), bytes.as_slice());
            async move {
                let got: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert!(got.is_none());
                let loaded = black_box(bytes);
                // SET and PUBLISH pipelined: one round trip, as a careful hand would write it.
                let _: ((), i64) = redis::pipe()
                    .cmd("SET")
                    .arg(&key)
                    .arg(loaded)
                    .arg("PX")
                    .arg(3_600_000)
                    .cmd("PUBLISH")
                    .arg("bare-invalidations")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                black_box(loaded)
            }
        })
    });
    g.finish();
}

/// `set` acknowledged vs one bare `EVALSHA` of a script doing the same Redis work (read the
/// old header, the clock, SET PX, stamp the version, drop the lock, PUBLISH the announcement).
fn write(c: &mut Criterion) {
    let rt = runtime();
    let server = testkit::RedisServer::start();
    let opts = tiered::EntryOptions::new(Duration::from_secs(3600));
    let (ours, raw) = rt.block_on(async {
        (
            cache::<Arc<Profile>>(&server.url(), "write", opts).await,
            raw_conn(&server.url()).await,
        )
    });
    // With a bus secret: the ~1 KiB value rides in the (signed) announcement.
    let signed: tiered::TieredCache<Arc<Profile>> = rt.block_on(async {
        tiered::TieredCache::builder()
            .namespace("write-signed")
            .redis_url(server.url())
            .bus_config(invalidation::BusConfig::default().secret("bench"))
            .carry_values(true)
            .default_options(opts)
            .build()
            .await
            .unwrap()
    });
    let value = Arc::new(profile());
    // The baseline's announcements have a listener too, as the cache's own bus listens to
    // its channel.
    let mut messages = rt.block_on(async {
        let mut sub = redis::Client::open(server.url())
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        sub.subscribe("bare!inval").await.unwrap();
        sub.into_on_message()
    });
    rt.spawn(async move {
        use futures_util::StreamExt;
        while messages.next().await.is_some() {}
    });
    let script = redis::Script::new(
        r"local t = redis.call('TIME')
          local h = redis.call('GETRANGE', KEYS[1], 0, 21)
          redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
          redis.call('SETRANGE', KEYS[1], 14, '12345678')
          redis.call('DEL', KEYS[2])
          redis.call('PUBLISH', ARGV[3], ARGV[4])
          return tonumber(t[1])",
    );
    let mut g = c.benchmark_group("write");
    g.bench_function("tiered_set", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(ours.set("k", &value).await.unwrap()) })
    });
    g.bench_function("tiered_set_signed_carrying", |b| {
        b.to_async(&rt).iter(|| async {
            // A few ms apart would let every write carry; back to back, a proposal 1 ms behind
            // the clock is often not above the key's last version, and the write evicts.
            black_box(signed.set("k", &value).await.unwrap())
        })
    });
    g.bench_function("bare_evalsha", |b| {
        b.to_async(&rt).iter(|| {
            let (mut conn, script, value) = (raw.clone(), &script, &value);
            async move {
                // Encoding is part of the baseline, as it is of `set`.
                let bytes = rmp_serde::to_vec_named(&**value).unwrap();
                let v: i64 = script
                    .key("bare:k")
                    .key("bare:k:lock")
                    .arg(bytes)
                    .arg(3_600_000)
                    .arg("bare!inval")
                    .arg("an announcement of about this size, 60 bytes or so.....")
                    .invoke_async(&mut conn)
                    .await
                    .unwrap();
                black_box(v)
            }
        })
    });
    g.finish();
}

/// A read inside the stale-while-revalidate window (a refresh already running) vs an L1 hit.
fn swr_stale_hit(c: &mut Criterion) {
    let rt = runtime();
    let server = testkit::RedisServer::start();
    let fresh_opts = tiered::EntryOptions::new(Duration::from_secs(3600));
    let stale_opts = tiered::EntryOptions::new(Duration::from_millis(1))
        .stale_while_revalidate(Duration::from_secs(3600));
    let (fresh, stale) = rt.block_on(async {
        let fresh = cache::<Arc<Profile>>(&server.url(), "fresh", fresh_opts).await;
        let stale = cache::<Arc<Profile>>(&server.url(), "stale", stale_opts).await;
        fresh.set("k", &Arc::new(profile())).await.unwrap();
        stale.set("k", &Arc::new(profile())).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        // Start a refresh that never ends: every read below is a stale hit.
        stale
            .get_or_set("k", || async {
                tokio::time::sleep(Duration::from_secs(86_400)).await;
                Ok::<_, std::io::Error>(Arc::new(profile()))
            })
            .await
            .unwrap();
        (fresh, stale)
    });
    let never = || async { Err::<Arc<Profile>, _>(std::io::Error::other("not called")) };
    let mut g = c.benchmark_group("swr_stale_hit");
    g.bench_function("stale_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(stale.get_or_set(black_box("k"), never).await.unwrap()) })
    });
    g.bench_function("l1_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(fresh.get_or_set(black_box("k"), never).await.unwrap()) })
    });
    // The first stale read of a key: it answers with the stale value and starts the refresh
    // (a flight on a task of its own). Each iteration reads a key of its own, made stale
    // beforehand in L1 only (`skip_l2`). The refreshes run on the worker (an L2 read-or-lock,
    // a loader that fails at once, the unlock) while the next reads are measured: they
    // compete for the machine, as they would in a service.
    let first = rt.block_on(cache::<Arc<Profile>>(&server.url(), "first", stale_opts));
    let made = std::sync::atomic::AtomicU64::new(0);
    g.bench_function("first_stale_read", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            // In chunks, with a pause after each for the refreshes' Redis round trips: a
            // backlog of thousands would delay the bus's heartbeat, its lease would lapse,
            // and stale entries would (rightly) no longer be served.
            let mut left = iters;
            while left > 0 {
                let n = left.min(500);
                left -= n;
                let from = made.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                let keys: Vec<String> = (from..from + n).map(|i| format!("s{i}")).collect();
                took += rt.block_on(async {
                    let only_l1 = stale_opts.skip_l2(true);
                    for k in &keys {
                        first
                            .set_with(k, &Arc::new(profile()), only_l1)
                            .await
                            .unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    let start = std::time::Instant::now();
                    for k in &keys {
                        black_box(
                            first
                                .get_or_set(k, || async {
                                    Err::<Arc<Profile>, _>(std::io::Error::other("kept stale"))
                                })
                                .await
                                .unwrap(),
                        );
                    }
                    let took = start.elapsed();
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    took
                });
            }
            took
        })
    });
    g.finish();
    let stats = stale.stats();
    assert!(stats.stale_served > 0 && stats.refreshes == 1, "{stats:?}");
    // Every first stale read started its refresh (none if the group was filtered out).
    let stats = first.stats();
    assert_eq!(stats.refreshes, stats.stale_served, "{stats:?}");
}

/// 1,000 tasks on one cold key: time until all are answered (the loader must run once), vs
/// the same 1,000 tasks spawned and joined doing nothing.
fn contention(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = testkit::RedisServer::start();
    let opts = tiered::EntryOptions::new(Duration::from_secs(3600));
    let ours = rt.block_on(cache::<u64>(&server.url(), "contention", opts));
    let loads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let n = std::sync::atomic::AtomicU64::new(0);
    let mut g = c.benchmark_group("contention");
    g.sample_size(20);
    g.bench_function("tiered_1000_callers", |b| {
        b.to_async(&rt).iter(|| {
            let key = format!("k{}", n.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            let (ours, loads) = (ours.clone(), Arc::clone(&loads));
            spawn_all(1000, move |_| {
                let (ours, loads, key) = (ours.clone(), Arc::clone(&loads), key.clone());
                async move {
                    let v = ours
                        .get_or_set(&key, move || async move {
                            loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            Ok::<_, std::io::Error>(7u64)
                        })
                        .await
                        .unwrap();
                    black_box(v);
                }
            })
        })
    });
    g.bench_function("spawn_join_1000_noop", |b| {
        b.to_async(&rt).iter(|| {
            spawn_all(1000, |_| async {
                black_box(7u64);
            })
        })
    });
    g.finish();
    let keys = n.load(std::sync::atomic::Ordering::Relaxed);
    let loaded = loads.load(std::sync::atomic::Ordering::Relaxed);
    println!("contention: {keys} cold keys x 1,000 callers, {loaded} loads");
    assert_eq!(keys, loaded, "exactly one load per cold key");
}

/// 100 keys from L2: one `get_or_set_many` vs 100 single reads vs a bare MGET + decode.
fn batch(c: &mut Criterion) {
    let rt = runtime();
    let server = testkit::RedisServer::start();
    let opts = tiered::EntryOptions::new(Duration::from_secs(3600)).skip_l1(true);
    let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    let bare_keys: Vec<String> = (0..100).map(|i| format!("bare{i}")).collect();
    let (ours, mut raw) = rt.block_on(async {
        let ours = cache::<Arc<Profile>>(&server.url(), "batch", opts).await;
        let mut raw = raw_conn(&server.url()).await;
        let bytes = rmp_serde::to_vec_named(&profile()).unwrap();
        for (k, b) in keys.iter().zip(&bare_keys) {
            ours.set(k, &Arc::new(profile())).await.unwrap();
            let _: () = redis::cmd("SET")
                .arg(b)
                .arg(bytes.as_slice())
                .query_async(&mut raw)
                .await
                .unwrap();
        }
        (ours, raw)
    });
    let mut g = c.benchmark_group("batch");
    g.bench_function("get_or_set_many_100", |b| {
        b.to_async(&rt).iter(|| async {
            let got = ours
                .get_or_set_many(&keys, |_missing: Vec<String>| async {
                    Err::<Vec<(String, Arc<Profile>)>, _>(std::io::Error::other("all cached"))
                })
                .await
                .unwrap();
            assert_eq!(got.len(), 100);
        })
    });
    g.bench_function("single_gets_100", |b| {
        b.to_async(&rt).iter(|| async {
            for k in &keys {
                black_box(ours.get(k).await.unwrap());
            }
        })
    });
    g.bench_function("bare_mget_decode_100", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = raw.clone();
            let bare_keys = &bare_keys;
            async move {
                let all: Vec<Vec<u8>> = redis::cmd("MGET")
                    .arg(bare_keys)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                for bytes in all {
                    black_box(rmp_serde::from_slice::<Profile>(&bytes).unwrap());
                }
            }
        })
    });
    g.finish();
    let _ = &mut raw;
}

/// Throughput: L1 hits on a 2-thread runtime (2 tasks), and L2 hits with 64 in flight, each
/// beside its bare baseline.
fn throughput(c: &mut Criterion) {
    use criterion::Throughput;
    const IN_FLIGHT: usize = 64;
    const PER_TASK: usize = 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = testkit::RedisServer::start();
    let (l1, l2, raw) = rt.block_on(async {
        let l1 = cache::<Arc<Profile>>(
            &server.url(),
            "tp-l1",
            tiered::EntryOptions::new(Duration::from_secs(3600)),
        )
        .await;
        let l2 = cache::<Profile>(
            &server.url(),
            "tp-l2",
            tiered::EntryOptions::new(Duration::from_secs(3600)).skip_l1(true),
        )
        .await;
        l1.set("k", &Arc::new(profile())).await.unwrap();
        let mut raw = raw_conn(&server.url()).await;
        let bytes = rmp_serde::to_vec_named(&profile()).unwrap();
        // One key per task: concurrent reads of one key would share a single L2 read.
        for t in 0..IN_FLIGHT {
            l2.set(&format!("k{t}"), &profile()).await.unwrap();
            let _: () = redis::cmd("SET")
                .arg(format!("bare{t}"))
                .arg(bytes.as_slice())
                .query_async(&mut raw)
                .await
                .unwrap();
        }
        (l1, l2, raw)
    });
    let bare: moka::future::Cache<String, Arc<Profile>> =
        moka::future::Cache::builder().max_capacity(100_000).build();
    rt.block_on(bare.insert("k".to_string(), Arc::new(profile())));

    const L1_OPS: u64 = 200_000;
    let mut g = c.benchmark_group("throughput_l1");
    g.throughput(Throughput::Elements(L1_OPS));
    g.sample_size(20);
    g.bench_function("tiered_2_tasks", |b| {
        b.to_async(&rt).iter(|| {
            spawn_all(2, |_| {
                let l1 = l1.clone();
                async move {
                    for _ in 0..L1_OPS / 2 {
                        black_box(
                            l1.get_or_set("k", || async {
                                Err::<Arc<Profile>, _>(std::io::Error::other("no"))
                            })
                            .await
                            .unwrap(),
                        );
                    }
                }
            })
        })
    });
    g.bench_function("bare_moka_2_tasks", |b| {
        b.to_async(&rt).iter(|| {
            spawn_all(2, |_| {
                let bare = bare.clone();
                async move {
                    for _ in 0..L1_OPS / 2 {
                        black_box(bare.get("k").await);
                    }
                }
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("throughput_l2");
    g.throughput(Throughput::Elements((IN_FLIGHT * PER_TASK) as u64));
    g.sample_size(20);
    g.bench_function("tiered_64_in_flight", |b| {
        b.to_async(&rt).iter(|| {
            spawn_all(IN_FLIGHT, |t| {
                let l2 = l2.clone();
                async move {
                    let key = format!("k{t}");
                    for _ in 0..PER_TASK {
                        black_box(l2.get(&key).await.unwrap());
                    }
                }
            })
        })
    });
    g.bench_function("bare_64_in_flight", |b| {
        b.to_async(&rt).iter(|| {
            spawn_all(IN_FLIGHT, |t| {
                let mut conn = raw.clone();
                async move {
                    let key = format!("bare{t}");
                    for _ in 0..PER_TASK {
                        let bytes: Vec<u8> = redis::cmd("GET")
                            .arg(&key)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        black_box(rmp_serde::from_slice::<Profile>(&bytes).unwrap());
                    }
                }
            })
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    l1_hit,
    l2_hit,
    cluster_l2_hit,
    miss_load,
    write,
    swr_stale_hit,
    contention,
    batch,
    throughput
);
criterion_main!(benches);
