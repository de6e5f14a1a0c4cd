//! Small values carried in their write's announcement (with a bus secret): a peer that holds
//! the key takes the new value into L1 without reading Redis, and nothing from outside (a
//! replayed message, a key that vanished behind the cache's back, no secret) can make that
//! serve an older value.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{SOON, builder};
use futures_util::StreamExt;
use testkit::{RedisServer, eventually};
use tiered::TieredCache;

const SECRET: &str = "carried values need a secret";

async fn node(server: &RedisServer, secret: bool) -> TieredCache<String> {
    let mut config = invalidation::BusConfig::default();
    if secret {
        config = config.secret(SECRET);
    }
    builder(server, "carried")
        .bus_config(config)
        .carry_values(true)
        .build()
        .await
        .unwrap()
}

/// Sets `key` on `a`, a few ms after its last write (a carried version must be above the
/// key's last one, and is proposed 1 ms behind the server's clock).
async fn set(a: &TieredCache<String>, key: &str, value: &str) {
    tokio::time::sleep(Duration::from_millis(5)).await;
    a.set(key, &value.to_string()).await.unwrap();
}

/// Every message published on the cache's channel, as a bare subscriber receives it.
async fn capture(server: &RedisServer) -> Arc<Mutex<Vec<Vec<u8>>>> {
    let mut sub = redis::Client::open(server.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    sub.subscribe(invalidation::channel_for(&l2::KeySpace::new("carried")))
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut messages = sub.into_on_message();
        while let Some(m) = messages.next().await {
            sink.lock().unwrap().push(m.get_payload_bytes().to_vec());
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_secret_a_peers_write_reaches_l1_without_a_read() {
    let server = RedisServer::start();
    let (a, b) = (node(&server, true).await, node(&server, true).await);
    set(&a, "k", "v1").await;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    set(&a, "k", "v2").await;
    let reads = b.stats().l2.hits + b.stats().l2.misses;
    eventually(SOON, "B holding v2 without reading Redis", || async {
        b.is_fresh_locally("k")
            && b.get("k").await.unwrap().as_deref() == Some("v2")
            && b.stats().l2.hits + b.stats().l2.misses == reads
    })
    .await;
    // A key B does not hold is not filled by a peer's message.
    set(&a, "other", "x").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!b.is_fresh_locally("other"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_no_value_is_carried() {
    let server = RedisServer::start();
    let (a, b) = (node(&server, false).await, node(&server, false).await);
    set(&a, "k", "v1").await;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    set(&a, "k", "v2").await;
    eventually(SOON, "B's copy evicted", || async {
        !b.is_fresh_locally("k")
    })
    .await;
    let reads = b.stats().l2.hits;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v2"));
    assert_eq!(b.stats().l2.hits, reads + 1, "read from Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_carrying_message_never_brings_an_old_value_back() {
    let server = RedisServer::start();
    let (a, b) = (node(&server, true).await, node(&server, true).await);
    let seen = capture(&server).await;
    set(&a, "k", "v1").await;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    set(&a, "k", "v2").await;
    eventually(SOON, "B holding v2", || async {
        b.is_fresh_locally("k") && b.get("k").await.unwrap().as_deref() == Some("v2")
    })
    .await;
    eventually(SOON, "the messages captured", || async {
        seen.lock().unwrap().len() >= 2
    })
    .await;
    let old: Vec<Vec<u8>> = seen.lock().unwrap().clone();
    set(&a, "k", "v3").await;
    eventually(SOON, "B holding v3", || async {
        b.get("k").await.unwrap().as_deref() == Some("v3")
    })
    .await;
    // Replayed by someone who may publish: B holds a newer version, and keeps it.
    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let channel = invalidation::channel_for(&l2::KeySpace::new("carried"));
    let replay = |raw: &mut redis::aio::MultiplexedConnection, only_carrying: bool| {
        let mut pipe = redis::pipe();
        let carrying = |m: &Vec<u8>| m.windows(2).any(|w| w == b"v2");
        for m in old.iter().filter(|m| !only_carrying || carrying(m)) {
            pipe.cmd("PUBLISH").arg(&channel).arg(m).ignore();
        }
        let raw = raw.clone();
        async move {
            let mut raw = raw;
            let () = pipe.query_async(&mut raw).await.unwrap();
        }
    };
    replay(&mut raw, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v3"));
    // Replayed while B holds nothing: nothing is planted.
    b.invalidate_local();
    replay(&mut raw, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_fresh_locally("k"));
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v3"));
    // The carrying message replayed while B holds a value of its own without a version (kept
    // in L1 only): that has no order against the message, which only evicts it.
    let only_l1 = tiered::EntryOptions::new(Duration::from_secs(60)).skip_l2(true);
    b.set_with("k", &"mine".to_string(), only_l1).await.unwrap();
    replay(&mut raw, true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_carry_values_a_signed_bus_only_evicts() {
    let server = RedisServer::start();
    let signed = || {
        builder(&server, "carried")
            .bus_config(invalidation::BusConfig::default().secret(SECRET))
            .build()
    };
    let (a, b) = (signed().await.unwrap(), signed().await.unwrap());
    set(&a, "k", "v1").await;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    set(&a, "k", "v2").await;
    eventually(SOON, "B's copy evicted", || async {
        !b.is_fresh_locally("k")
    })
    .await;
    assert_eq!(b.stats().values_carried, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_key_vanished_a_write_is_announced_as_usual_and_peers_follow() {
    let server = RedisServer::start();
    let (a, b) = (node(&server, true).await, node(&server, true).await);
    set(&a, "k", "v1").await;
    set(&a, "k", "v2").await;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v2"));
    for (round, value) in ["v3", "v4", "v5"].into_iter().enumerate() {
        // Behind the cache's back, as an operator or maxmemory would.
        if round % 2 == 0 {
            server.command(&["FLUSHALL"]);
        } else {
            server.command(&["DEL", l2::KeySpace::new("carried").key("k").as_str()]);
        }
        set(&a, "k", value).await;
        eventually(
            SOON,
            "B reading the write after the key vanished",
            || async { b.get("k").await.unwrap().as_deref() == Some(value) },
        )
        .await;
    }
}
