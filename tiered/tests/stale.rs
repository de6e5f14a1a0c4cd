//! Stale-while-revalidate, fail-safe and soft timeouts, against a real redis-server.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Loads, SOON, eventually, node, node_with};
use testkit::RedisServer;
use tiered::{EntryOptions, TieredCache};
use tokio::sync::Barrier;

fn swr() -> EntryOptions {
    EntryOptions::new(Duration::from_millis(300)).stale_while_revalidate(Duration::from_secs(30))
}

async fn swr_node(server: &RedisServer) -> TieredCache<String> {
    node_with(server, "swr", swr()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_read_returns_at_once_and_exactly_one_refresh_runs() {
    let server = RedisServer::start();
    let cache = swr_node(&server).await;
    let loads = Loads::default();
    let v = cache
        .get_or_set("k", loads.returning("v1", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, "v1");
    tokio::time::sleep(Duration::from_millis(400)).await;

    // 100 readers inside the window: all get the stale value, none waits for the slow
    // refresh (it would return v2 after 500 ms).
    let barrier = Arc::new(Barrier::new(100));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (cache, loads, barrier) = (cache.clone(), loads.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            cache
                .get_or_set("k", loads.returning("v2", Duration::from_millis(500)))
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "v1");
    }
    let c = cache.clone();
    eventually(SOON, "the refresh lands", || {
        let c = c.clone();
        async move { c.get("k").await.unwrap().as_deref() == Some("v2") }
    })
    .await;
    assert_eq!(loads.count(), 2, "one initial load, exactly one refresh");
    let stats = cache.stats();
    assert_eq!(stats.refreshes, 1);
    assert!(stats.stale_served >= 100, "{stats:?}");
    // The refresh wrote L2: another node reads v2 fresh.
    let other = swr_node(&server).await;
    assert_eq!(other.get("k").await.unwrap().as_deref(), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_in_l2_is_served_by_another_node_while_one_node_refreshes() {
    let server = RedisServer::start();
    let writer = swr_node(&server).await;
    writer.set("k", &"v1".to_string()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let loads = Loads::default();
    let nodes = [swr_node(&server).await, swr_node(&server).await];
    for n in &nodes {
        let v = n
            .get_or_set("k", loads.returning("v2", Duration::from_millis(300)))
            .await
            .unwrap();
        assert_eq!(v, "v1", "the stale value comes back without waiting");
    }
    let n0 = nodes[0].clone();
    eventually(SOON, "the refresh lands", || {
        let n = n0.clone();
        async move {
            n.get_or_set("k", || async { Ok::<_, std::io::Error>("x".to_string()) })
                .await
                .unwrap()
                == "v2"
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        loads.count(),
        1,
        "the lock kept the refresh to one across nodes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_safe_serves_the_old_value_when_the_loader_fails() {
    let server = RedisServer::start();
    let opts = EntryOptions::new(Duration::from_millis(200))
        .fail_safe(Duration::from_secs(60))
        .fail_safe_throttle(Duration::from_secs(2));
    let cache = node_with(&server, "failsafe", opts).await;
    let loads = Loads::default();
    cache
        .get_or_set("k", loads.returning("v1", Duration::ZERO))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = cache.get_or_set("k", loads.failing()).await.unwrap();
    assert_eq!(v, "v1", "the loader failed: the old value is served");
    assert_eq!(cache.stats().fail_safe, 1);
    // Throttled: the failing source is not asked again for a while.
    let v = cache.get_or_set("k", loads.failing()).await.unwrap();
    assert_eq!(v, "v1");
    assert_eq!(loads.count(), 2);

    // Another node, with nothing in L1, finds the old value in L2.
    let other = node_with(&server, "failsafe", opts).await;
    let v = other.get_or_set("k", loads.failing()).await.unwrap();
    assert_eq!(v, "v1");

    // Without an old value the error is returned.
    let err = cache
        .get_or_set("never", loads.failing())
        .await
        .unwrap_err();
    assert!(err.is_load_failure(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_timeout_serves_the_old_value_and_the_load_finishes_in_the_background() {
    let server = RedisServer::start();
    let opts = EntryOptions::new(Duration::from_millis(200))
        .fail_safe(Duration::from_secs(60))
        .soft_timeout(Duration::from_millis(100));
    let cache = node_with(&server, "soft", opts).await;
    let loads = Loads::default();
    cache
        .get_or_set("k", loads.returning("v1", Duration::ZERO))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let v = cache
        .get_or_set("k", loads.returning("v2", Duration::from_millis(800)))
        .await
        .unwrap();
    let waited = start.elapsed();
    assert_eq!(v, "v1");
    assert!(
        waited < Duration::from_millis(700),
        "returned at the soft timeout, not after the load ({waited:?})"
    );
    let other = node(&server, "soft").await;
    eventually(SOON, "the timed-out load lands in L2", || {
        let other = other.clone();
        async move { other.get("k").await.unwrap().as_deref() == Some("v2") }
    })
    .await;
    assert_eq!(loads.count(), 2);
    // Without an old value a soft timeout does not apply: the caller waits for the value.
    let v = cache
        .get_or_set("new", loads.returning("slow", Duration::from_millis(300)))
        .await
        .unwrap();
    assert_eq!(v, "slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hard_timeout_bounds_a_call_and_the_load_still_lands() {
    let server = RedisServer::start();
    let cache = node(&server, "hard").await;
    let loads = Loads::default();
    let opts = EntryOptions::new(Duration::from_secs(60)).hard_timeout(Duration::from_millis(200));
    let start = Instant::now();
    let err = cache
        .get_or_set_with(
            "k",
            opts,
            loads.returning("late", Duration::from_millis(600)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, tiered::Error::WaitTimeout { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_millis(550));
    let c = cache.clone();
    eventually(SOON, "the load lands after its caller gave up", || {
        let c = c.clone();
        async move { c.get("k").await.unwrap().as_deref() == Some("late") }
    })
    .await;
    assert_eq!(loads.count(), 1);
}
