//! Redis loses or changes data behind the cache's back (FLUSHALL, FLUSHDB, eviction under
//! `maxmemory`, an operator's DEL), and then a node changes the key through the cache. The
//! change is acknowledged, so by the crate's consistency contract every node must serve it
//! within Δ: a node that still holds the key from before (in L1, with a long L1 TTL) must not
//! keep serving its copy because the key's write versions started again from 1.
//!
//! Each test: A writes `k` five times (version 5); B reads it (an L1 copy, fresh for 300 s);
//! then the breach; then A's `set` (or `invalidate`); Δ + 100 ms after it returned, B and A
//! must read the new state. On a failure the message says how long B kept the old state.

mod common;

use std::time::{Duration, Instant};

use common::{SOON, eventually, fast_bus, fast_node, long_lived};
use testkit::RedisServer;
use tiered::Loaded;

const KEY: &str = "k";

/// When a read is judged: Δ + 100 ms after the change was acknowledged.
fn judge_after() -> Duration {
    fast_bus().bound() + Duration::from_millis(100)
}

/// The change made through the cache after the breach.
#[derive(Debug, Clone, Copy)]
enum Change {
    Set,
    Invalidate,
}

/// What B holds before the breach.
#[derive(Debug, Clone, Copy)]
enum Held {
    /// The value "v5" (version 5).
    Value,
    /// A cached "not found" read after A's `invalidate` (a tombstone in Redis).
    NotFound,
}

/// Redis keys (data and lock) of `KEY` on the test's private server.
fn redis_keys(server: &RedisServer) -> Vec<String> {
    server
        .command(&["KEYS", &format!("*{{{KEY}}}*")])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Runs one scenario: setup, `breach`, `change`; judges B and A Δ + 100 ms after it.
async fn scenario(what: &str, held: Held, change: Change, breach: impl AsyncFnOnce(&RedisServer)) {
    let server = RedisServer::start();
    let a = fast_node(server.url(), "btb").await;
    let b = fast_node(server.url(), "btb").await;
    for v in 1..=5 {
        a.set(KEY, &format!("v{v}")).await.unwrap();
    }
    let old: Option<String> = match held {
        Held::Value => {
            assert_eq!(b.get(KEY).await.unwrap().as_deref(), Some("v5"));
            Some("v5".into())
        }
        Held::NotFound => {
            a.invalidate(KEY).await.unwrap();
            // Let the delete reach B before it caches the "not found".
            eventually(SOON, "B sees the delete", || async {
                b.get(KEY).await.unwrap().is_none()
            })
            .await;
            let negative = long_lived().negative_ttl(Duration::from_secs(300));
            let err = b
                .get_or_set_with(KEY, negative, || async {
                    Ok::<_, std::io::Error>(Loaded::<String>::not_found())
                })
                .await
                .unwrap_err();
            assert!(err.is_not_found(), "{err:?}");
            None
        }
    };
    assert!(
        b.is_fresh_locally(KEY),
        "B holds {old:?} in L1 before the breach"
    );
    assert!(
        !redis_keys(&server).is_empty(),
        "the key is in Redis before the breach"
    );

    breach(&server).await;

    let expected: Option<String> = match change {
        Change::Set => {
            let version = a.set(KEY, &"new".to_string()).await.unwrap();
            println!("{what}: A's set after the breach got version {version}");
            Some("new".into())
        }
        Change::Invalidate => {
            let version = a.invalidate(KEY).await.unwrap();
            println!("{what}: A's invalidate after the breach got version {version}");
            None
        }
    };
    let acked = Instant::now();
    tokio::time::sleep(judge_after()).await;
    for (name, n) in [("B", &b), ("A", &a)] {
        let read = n.get(KEY).await.unwrap();
        if read != expected {
            // How long does it keep the old state? Poll for 2 s more, for the message.
            let mut last = read.clone();
            let give_up = acked + Duration::from_secs(2);
            while Instant::now() < give_up {
                last = n.get(KEY).await.unwrap();
                if last == expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let still = if last == expected {
                format!("until {:?} after the change", acked.elapsed())
            } else {
                format!("still {last:?} {:?} after the change", acked.elapsed())
            };
            panic!(
                "{what}: {name} served {read:?} {:?} after A's {change:?} returned (expected \
                 {expected:?}; {still}); {name}'s stats: {:?}",
                judge_after(),
                n.stats()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_then_set_is_served_everywhere_within_delta() {
    scenario("FLUSHALL", Held::Value, Change::Set, async |s| {
        assert_eq!(s.command(&["FLUSHALL"]), "OK");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_then_invalidate_is_served_everywhere_within_delta() {
    scenario("FLUSHALL", Held::Value, Change::Invalidate, async |s| {
        assert_eq!(s.command(&["FLUSHALL"]), "OK");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushdb_then_set_is_served_everywhere_within_delta() {
    scenario("FLUSHDB", Held::Value, Change::Set, async |s| {
        assert_eq!(s.command(&["FLUSHDB"]), "OK");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_del_then_set_is_served_everywhere_within_delta() {
    scenario("operator DEL", Held::Value, Change::Set, async |s| {
        let keys = redis_keys(s);
        let mut args = vec!["DEL"];
        args.extend(keys.iter().map(String::as_str));
        assert_ne!(s.command(&args), "0", "{keys:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allkeys_lru_eviction_then_set_is_served_everywhere_within_delta() {
    scenario(
        "allkeys-lru eviction",
        Held::Value,
        Change::Set,
        async |s| {
            evict(s, "allkeys-lru").await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_lru_eviction_then_set_is_served_everywhere_within_delta() {
    scenario(
        "volatile-lru eviction",
        Held::Value,
        Change::Set,
        async |s| {
            evict(s, "volatile-lru").await;
        },
    )
    .await;
}

/// The tombstone (and the "not found" B wrote over it) evicted: versions start again at 1
/// while B holds a "not found" of a higher version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allkeys_lru_eviction_of_a_tombstone_then_set_is_served_everywhere_within_delta() {
    scenario(
        "allkeys-lru eviction of the tombstone",
        Held::NotFound,
        Change::Set,
        async |s| {
            evict(s, "allkeys-lru").await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_lru_eviction_of_a_tombstone_then_set_is_served_everywhere_within_delta() {
    scenario(
        "volatile-lru eviction of the tombstone",
        Held::NotFound,
        Change::Set,
        async |s| {
            evict(s, "volatile-lru").await;
        },
    )
    .await;
}

/// Sets a small `maxmemory` with `policy` and writes junk (with a TTL, so `volatile-lru`
/// may evict it too) until every Redis key of `KEY` is gone; then lifts the limit again.
async fn evict(server: &RedisServer, policy: &str) {
    let used = server.info_u64("memory", "used_memory");
    let limit = (used + (1 << 20)).to_string();
    assert_eq!(
        server.command(&["CONFIG", "SET", "maxmemory-policy", policy]),
        "OK"
    );
    assert_eq!(
        server.command(&["CONFIG", "SET", "maxmemory", &limit]),
        "OK"
    );
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let junk = "j".repeat(512);
    let mut written = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys = redis_keys(server);
        let mut exists = vec!["EXISTS"];
        exists.extend(keys.iter().map(String::as_str));
        if keys.is_empty() || server.command(&exists) == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{policy}: {keys:?} not evicted after {written} junk keys"
        );
        let mut pipe = redis::pipe();
        for _ in 0..500 {
            written += 1;
            pipe.cmd("SET")
                .arg(format!("junk:{written}"))
                .arg(&junk)
                .arg("EX")
                .arg(3600)
                .ignore();
        }
        // Under volatile-lru with nothing evictable left a write is refused (OOM): fine.
        let _: redis::RedisResult<()> = pipe.query_async(&mut conn).await;
    }
    assert_eq!(server.command(&["CONFIG", "SET", "maxmemory", "0"]), "OK");
    let evicted = server.info_u64("stats", "evicted_keys");
    println!("{policy}: the key is gone after {written} junk keys ({evicted} evicted)");
    assert!(redis_keys(server).is_empty());
}
