//! Redis stopped (SIGSTOP) under a TieredCache: L1 keeps answering, misses fall back to the
//! loader within the hard timeout, the circuit breaker opens and closes again.

mod common;

use std::time::{Duration, Instant};

use common::{Loads, SOON, builder, eventually};
use testkit::RedisServer;
use tiered::{BreakerState, EntryOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_never_blocks_l1_hits_and_misses_fall_back_within_the_hard_timeout() {
    let mut server = RedisServer::start();
    let l2_timeout = Duration::from_millis(100);
    let hard = Duration::from_secs(1);
    let cache = builder(&server, "paused")
        .l2_timeout(l2_timeout)
        .circuit_breaker(3, Duration::from_millis(500))
        .default_options(EntryOptions::new(Duration::from_secs(60)).hard_timeout(hard))
        .build()
        .await
        .unwrap();
    let loads = Loads::default();
    for i in 0..10 {
        cache
            .get_or_set(&format!("hot{i}"), loads.returning("hot", Duration::ZERO))
            .await
            .unwrap();
    }

    server.pause();
    // L1 hits never touch Redis: 1,000 of them take less than one L2 timeout in all.
    let start = Instant::now();
    for i in 0..1000 {
        let v = cache
            .get_or_set(
                &format!("hot{}", i % 10),
                loads.returning("x", Duration::ZERO),
            )
            .await
            .unwrap();
        assert_eq!(v, "hot");
    }
    let hits = start.elapsed();
    assert!(
        hits < l2_timeout,
        "1,000 L1 hits took {hits:?} with Redis stopped"
    );

    // Misses need L2: each returns the loader's value within the hard timeout.
    let mut slowest = Duration::ZERO;
    for i in 0..6 {
        let start = Instant::now();
        let v = cache
            .get_or_set(
                &format!("cold{i}"),
                loads.returning("loaded", Duration::ZERO),
            )
            .await
            .unwrap();
        assert_eq!(v, "loaded");
        slowest = slowest.max(start.elapsed());
    }
    assert!(slowest < hard, "a miss took {slowest:?} with Redis stopped");
    assert_eq!(cache.breaker_state(), BreakerState::Open);
    let stats = cache.stats();
    assert_eq!(stats.breaker_opened, 1);
    assert!(stats.unlocked_loads >= 6, "{stats:?}");
    // While open, misses go straight to the loader, without waiting on Redis.
    let start = Instant::now();
    cache
        .get_or_set("cold-open", loads.returning("loaded", Duration::ZERO))
        .await
        .unwrap();
    assert!(start.elapsed() < l2_timeout);
    // A plain get cannot be answered without L2, and says so.
    let err = cache.get("cold-nothing").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");

    server.resume();
    let c = cache.clone();
    let mut n = 0;
    eventually(SOON, "the breaker closes after Redis is back", || {
        let c = c.clone();
        n += 1;
        let key = format!("probe{n}");
        async move {
            let _ = c
                .get_or_set(&key, || async { Ok::<_, std::io::Error>("p".to_string()) })
                .await;
            c.breaker_state() == BreakerState::Closed
        }
    })
    .await;
    // And L2 works again: a write is visible to a fresh node.
    cache.set("after", &"back".to_string()).await.unwrap();
    let other = builder(&server, "paused").build().await.unwrap();
    assert_eq!(other.get("after").await.unwrap().as_deref(), Some("back"));
}
