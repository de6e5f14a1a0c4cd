//! The read path, writes, single-flight and cross-node dedup of `TieredCache`, against a
//! real redis-server.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Loads, SOON, builder, calls, eventually, node};
use testkit::RedisServer;
use tiered::{EntryOptions, Error, Loaded};
use tokio::sync::{Barrier, Notify};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_then_l2_then_the_loader() {
    let server = RedisServer::start();
    let a = node(&server, "users").await;
    let b = node(&server, "users").await;
    let loads = Loads::default();

    let v = a
        .get_or_set("42", loads.returning("ada", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, "ada");
    assert_eq!(loads.count(), 1);

    // Same node: L1.
    let v = a
        .get_or_set("42", loads.returning("other", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, "ada");
    // Other node: L2, then its own L1.
    for _ in 0..2 {
        let v = b
            .get_or_set("42", loads.returning("other", Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(v, "ada");
    }
    assert_eq!(loads.count(), 1, "the loader ran once");
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!((sa.l1_hits, sa.misses, sa.loads), (1, 1, 1));
    assert_eq!((sb.l1_hits, sb.l2_hits, sb.misses), (1, 1, 0));
    assert_eq!(b.get("42").await.unwrap().as_deref(), Some("ada"));
    assert_eq!(b.get("nope").await.unwrap(), None);
    assert_eq!(a.in_flight(), 0);
    assert_eq!(b.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_and_invalidate_reach_l2_and_l1() {
    let server = RedisServer::start();
    let a = node(&server, "users").await;
    let b = node(&server, "users").await;
    a.set("1", &"v1".to_string()).await.unwrap();
    assert_eq!(b.get("1").await.unwrap().as_deref(), Some("v1"));
    assert_eq!(a.get("1").await.unwrap().as_deref(), Some("v1"));
    assert_eq!(a.stats().l1_hits, 1, "set fills the writer's L1");

    a.invalidate("1").await.unwrap();
    assert_eq!(a.get("1").await.unwrap(), None, "gone from L1 and L2");
    assert_eq!(
        server.command(&["EXISTS", "users:{1}"]),
        "1",
        "a tombstone keeps the key's version"
    );
    // Namespaces do not see each other's keys.
    let other = node(&server, "orders").await;
    a.set("2", &"user".to_string()).await.unwrap();
    assert_eq!(other.get("2").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_callers_on_a_cold_key_run_the_loader_once() {
    let server = RedisServer::start();
    let cache = node(&server, "stampede").await;
    let loads = Loads::default();
    let barrier = Arc::new(Barrier::new(10_000));
    let mut tasks = Vec::with_capacity(10_000);
    for _ in 0..10_000 {
        let (cache, loads, barrier) = (cache.clone(), loads.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            cache
                .get_or_set("cold", loads.returning("v", Duration::from_millis(100)))
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "v");
    }
    println!("10,000 callers in one process: {} load(s)", loads.count());
    assert_eq!(loads.count(), 1);
    assert_eq!(cache.in_flight(), 0, "the in-flight map returns to empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_one_load_through_the_redis_lock() {
    let server = RedisServer::start();
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(node(&server, "shared").await);
    }
    let loads = Loads::default();
    let barrier = Arc::new(Barrier::new(200));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (cache, loads, barrier) = (nodes[i % 4].clone(), loads.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            cache
                .get_or_set("cold", loads.returning("v", Duration::from_millis(300)))
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "v");
    }
    assert_eq!(loads.count(), 1, "one load across four nodes");
    let waits: u64 = nodes.iter().map(|n| n.stats().lock_waits).sum();
    assert_eq!(
        waits, 3,
        "the other three nodes each waited on the lock once"
    );
    assert_eq!(server.command(&["EXISTS", "shared:{cold}:lock"]), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_after_an_invalidation_never_gets_the_older_load() {
    let server = RedisServer::start();
    let cache = node(&server, "inval").await;
    let release = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let first = {
        let (cache, release, started) = (cache.clone(), release.clone(), started.clone());
        tokio::spawn(async move {
            cache
                .get_or_set("k", move || async move {
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, std::io::Error>("old".to_string())
                })
                .await
        })
    };
    started.notified().await;
    cache.invalidate("k").await.unwrap();
    let loads = Loads::default();
    let second = cache
        .get_or_set("k", loads.returning("new", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(second, "new", "must not join the load that started before");
    release.notify_one();
    assert_eq!(
        first.await.unwrap().unwrap(),
        "old",
        "its own caller gets it"
    );
    for _ in 0..3 {
        let again = cache
            .get_or_set("k", loads.returning("x", Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(again, "new", "the older load must not land in L1 or L2");
    }
    let fresh_node = node(&server, "inval").await;
    assert_eq!(fresh_node.get("k").await.unwrap().as_deref(), Some("new"));
    assert_eq!(loads.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_lost_its_lock_cannot_overwrite_a_newer_value() {
    let server = RedisServer::start();
    let slow = node(&server, "lost").await;
    let writer = node(&server, "lost").await;
    for (case, key) in ["overwritten", "lock taken over"].iter().zip(["a", "b"]) {
        let release = Arc::new(Notify::new());
        let started = Arc::new(Notify::new());
        let load = {
            let (slow, release, started) = (slow.clone(), release.clone(), started.clone());
            tokio::spawn(async move {
                slow.get_or_set(key, move || async move {
                    started.notify_one();
                    release.notified().await;
                    Ok::<_, std::io::Error>("old".to_string())
                })
                .await
            })
        };
        started.notified().await;
        if *case == "overwritten" {
            writer.set(key, &"newer".to_string()).await.unwrap();
        } else {
            // The lock expires (simulated: deleted) and another node loads and writes.
            server.command(&["DEL", &format!("lost:{{{key}}}:lock")]);
            let v = writer
                .get_or_set(key, || async {
                    Ok::<_, std::io::Error>("newer".to_string())
                })
                .await
                .unwrap();
            assert_eq!(v, "newer");
        }
        release.notify_one();
        assert_eq!(
            load.await.unwrap().unwrap(),
            "old",
            "{case}: its caller asked first"
        );
        let fresh_node = node(&server, "lost").await;
        assert_eq!(
            fresh_node.get(key).await.unwrap().as_deref(),
            Some("newer"),
            "{case}: L2 keeps the newer value"
        );
        assert_eq!(
            slow.get(key).await.unwrap().as_deref(),
            Some("newer"),
            "{case}: the old value did not land in the slow node's L1"
        );
    }
    assert_eq!(slow.stats().duplicate_loads, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_loader_fails_every_waiter_and_the_next_call_loads_again() {
    let server = RedisServer::start();
    let cache = node(&server, "panic").await;
    let barrier = Arc::new(Barrier::new(50));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (cache, barrier) = (cache.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            cache
                .get_or_set("k", || async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if true {
                        panic!("loader bug");
                    }
                    Ok::<String, std::io::Error>(String::new())
                })
                .await
        }));
    }
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::LoadAborted { .. }), "{err:?}");
        assert!(err.is_load_failure());
    }
    assert_eq!(
        server.command(&["EXISTS", "panic:{k}:lock"]),
        "0",
        "the lock is released on a panic"
    );
    assert_eq!(cache.in_flight(), 0);
    let loads = Loads::default();
    let start = Instant::now();
    let v = cache
        .get_or_set("k", loads.returning("ok", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!((v.as_str(), loads.count()), ("ok", 1));
    assert!(
        start.elapsed() < tiered::DEFAULT_LOCK_TTL,
        "no wait for a stale lock"
    );
    assert_eq!(cache.stats().load_errors, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loader_errors_reach_every_waiter_and_are_not_cached() {
    let server = RedisServer::start();
    let cache = node(&server, "errors").await;
    let loads = Loads::default();
    let mut tasks = Vec::new();
    let barrier = Arc::new(Barrier::new(20));
    for _ in 0..20 {
        let (cache, loads, barrier) = (cache.clone(), loads.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let failing = loads.failing();
            cache
                .get_or_set("k", move || async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    failing().await
                })
                .await
        }));
    }
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Loader { .. }), "{err:?}");
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert_eq!(source, "database down");
    }
    assert_eq!(loads.count(), 1);
    let v = cache
        .get_or_set("k", loads.returning("ok", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_never_outlives_the_l2_entry_it_came_from() {
    let server = RedisServer::start();
    let writer = node(&server, "life").await;
    let reader = node(&server, "life").await;
    writer
        .set_with(
            "k",
            &"v".to_string(),
            EntryOptions::new(Duration::from_millis(800)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The reader's default TTL is 60 s, but the L2 entry has about 400 ms left.
    assert_eq!(reader.get("k").await.unwrap().as_deref(), Some("v"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        reader.get("k").await.unwrap(),
        None,
        "the L1 copy expired with the L2 entry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_is_cached_for_the_negative_ttl_and_loaders_can_set_ttls() {
    let server = RedisServer::start();
    let cache = builder(&server, "neg")
        .default_options(
            EntryOptions::new(Duration::from_secs(60)).negative_ttl(Duration::from_secs(60)),
        )
        .build()
        .await
        .unwrap();
    let loads = Loads::default();
    for _ in 0..3 {
        let l = loads.clone();
        let err = cache
            .get_or_set("ghost", move || async move {
                l.returning("", Duration::ZERO)().await?;
                Ok::<_, std::io::Error>(Loaded::not_found())
            })
            .await
            .unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
    }
    assert_eq!(loads.count(), 1, "not found is cached");
    let other = node(&server, "neg").await;
    assert_eq!(other.get("ghost").await.unwrap(), None);
    let err = other
        .get_or_set("ghost", loads.returning("x", Duration::ZERO))
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "cached in L2 too: {err:?}");
    assert_eq!(loads.count(), 1);
    assert_eq!(cache.stats().l2.decode_errors, 0);

    // Adaptive TTL: this value says it holds for 300 ms only.
    let v = cache
        .get_or_set("short", || async {
            Ok::<_, std::io::Error>(
                Loaded::new("v1".to_string()).time_to_live(Duration::from_millis(300)),
            )
        })
        .await
        .unwrap();
    assert_eq!(v, "v1");
    let pttl: i64 = server.command(&["PTTL", "neg:{short}"]).parse().unwrap();
    assert!(
        pttl > 0 && pttl <= 300,
        "the loader's TTL is the L2 TTL: {pttl}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let v = cache
        .get_or_set("short", loads.returning("v2", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reads_l2_once_and_calls_the_loader_once_with_the_missing_keys() {
    let server = RedisServer::start();
    let writer = node(&server, "batch").await;
    let reader = node(&server, "batch").await;
    let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
    for k in &keys[..50] {
        writer.set(k, &format!("cached-{k}")).await.unwrap();
    }
    let exec_before = calls(&server, "exec");
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let calls_made = Loads::default();
    let got = {
        let (asked, calls_made) = (asked.clone(), calls_made.clone());
        reader
            .get_or_set_many(&keys, move |missing: Vec<String>| async move {
                calls_made.returning("", Duration::ZERO)().await?;
                asked.lock().unwrap().extend(missing.iter().cloned());
                Ok::<_, std::io::Error>(
                    missing
                        .into_iter()
                        .map(|k| {
                            let v = format!("loaded-{k}");
                            (k, v)
                        })
                        .collect::<Vec<_>>(),
                )
            })
            .await
            .unwrap()
    };
    assert_eq!(got.len(), 100);
    assert_eq!(got["k3"], "cached-k3");
    assert_eq!(got["k77"], "loaded-k77");
    assert_eq!(calls_made.count(), 1, "one loader call");
    let mut asked = asked.lock().unwrap().clone();
    asked.sort();
    let mut expected: Vec<String> = keys[50..].to_vec();
    expected.sort();
    assert_eq!(asked, expected, "exactly the 50 missing keys");
    assert_eq!(
        calls(&server, "exec") - exec_before,
        1,
        "one atomic read for the 100 keys"
    );
    // The loaded values landed in L2 for other nodes, and everything is now in L1.
    assert_eq!(
        writer.get("k77").await.unwrap().as_deref(),
        Some("loaded-k77")
    );
    let exec_before = calls(&server, "exec");
    let again = reader
        .get_or_set_many(&keys, |_missing: Vec<String>| async {
            Err::<Vec<(String, String)>, _>(std::io::Error::other("must not be called"))
        })
        .await
        .unwrap();
    assert_eq!(again.len(), 100);
    assert_eq!(calls(&server, "exec"), exec_before, "all from L1");
    assert_eq!(reader.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_gets_join_a_batch_load_in_flight() {
    let server = RedisServer::start();
    let cache = node(&server, "join").await;
    let release = Arc::new(Notify::new());
    let batch = {
        let (cache, release) = (cache.clone(), release.clone());
        tokio::spawn(async move {
            cache
                .get_or_set_many(&["a", "b"], move |missing: Vec<String>| async move {
                    release.notified().await;
                    Ok::<_, std::io::Error>(
                        missing
                            .into_iter()
                            .map(|k| (k.clone(), format!("batch-{k}"))),
                    )
                })
                .await
        })
    };
    let c2 = cache.clone();
    eventually(SOON, "batch in flight", || {
        let c = c2.clone();
        async move { c.in_flight() == 2 }
    })
    .await;
    let loads = Loads::default();
    let single = {
        let (cache, loads) = (cache.clone(), loads.clone());
        tokio::spawn(async move {
            cache
                .get_or_set("b", loads.returning("single", Duration::ZERO))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    release.notify_one();
    assert_eq!(single.await.unwrap().unwrap(), "batch-b");
    assert_eq!(loads.count(), 0);
    assert_eq!(batch.await.unwrap().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_time_to_live_bounds_how_long_a_node_trusts_its_copy() {
    let server = RedisServer::start();
    // Long enough that a loaded two-core machine stays inside it between the fill and the
    // second read; the test's point is the expiry after it.
    let ttl = Duration::from_secs(1);
    let opts = EntryOptions::new(Duration::from_secs(60)).l1_time_to_live(ttl);
    let b = builder(&server, "l1ttl")
        .default_options(opts)
        .type_name("l1ttl")
        .build()
        .await
        .unwrap();
    // Changes that announce nothing (written behind the cache's back, or their messages lost
    // without a gap being noticed): no invalidation can reach b and evict its copy early.
    let codec = l2::Codec::<String>::new(l2::TypeTag::from_name("l1ttl"));
    let key = l2::KeySpace::new("l1ttl").key("k");
    let write_behind = |value: &str| {
        let bytes = codec
            .encode(
                &value.to_string(),
                &l2::EntryMeta::new(Duration::from_secs(60)),
            )
            .unwrap();
        let (store, key) = (l2::RedisStore::new(b.connection().clone()), key.clone());
        async move {
            store
                .overwrite_unannounced(&key, &bytes, Duration::from_secs(60))
                .await
                .unwrap()
        }
    };
    write_behind("v1").await;
    let filled = Instant::now();
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    write_behind("v2").await;
    // b keeps v1 only until its L1 time to live.
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    assert!(
        filled.elapsed() < ttl,
        "the machine stalled past the L1 TTL"
    );
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v2"));
    let s = b.stats();
    assert_eq!((s.l1_hits, s.l2_hits), (1, 2), "{s:?}");
}
