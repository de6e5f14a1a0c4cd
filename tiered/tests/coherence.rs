//! Coherence across nodes over the invalidation bus, against a real redis-server: writes evict
//! other nodes' L1 within Δ, and every way of losing messages drops L1 instead of serving stale.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{SOON, builder, eventually, redis_conn};
use invalidation::BusConfig;
use testkit::RedisServer;
use tiered::{EntryOptions, TieredCache};

/// P = 200 ms, T = 300 ms: Δ = 500 ms (headroom for a loaded two-core CI machine).
fn bus() -> BusConfig {
    BusConfig::default()
        .heartbeat(Duration::from_millis(200))
        .heartbeat_timeout(Duration::from_millis(300))
}

fn delta() -> Duration {
    bus().bound()
}

async fn coherent_node(server: &RedisServer, namespace: &str) -> TieredCache<String> {
    builder(server, namespace)
        .bus_config(bus())
        .l2_timeout(Duration::from_millis(200))
        .default_options(
            EntryOptions::new(Duration::from_secs(600)).hard_timeout(Duration::from_secs(2)),
        )
        .build()
        .await
        .unwrap()
}

/// Reads `key` on `node` until it returns `expected`, for at most `within`.
async fn reads_within(node: &TieredCache<String>, key: &str, expected: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let read = node.get(key).await;
        if read.as_ref().ok().and_then(|v| v.as_deref()) == Some(expected) {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{key} did not read {expected:?} within {within:?}: last read {read:?}; {:?}; {:?}",
            node.stats(),
            node.bus().stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_evicts_every_other_nodes_copy_and_not_the_writers() {
    let server = RedisServer::start();
    let a = coherent_node(&server, "users").await;
    let b = coherent_node(&server, "users").await;
    let c = coherent_node(&server, "users").await;
    let v1 = b.set("1", &"v1".to_string()).await.unwrap();
    for n in [&b, &c] {
        assert_eq!(n.get("1").await.unwrap().as_deref(), Some("v1"));
    }
    // `a` never read the key: its write is announced all the same.
    let version = a.set("1", &"v2".to_string()).await.unwrap();
    assert!(
        version > v1,
        "each write gets a higher version: {version} <= {v1}"
    );
    for n in [&b, &c] {
        reads_within(n, "1", "v2", delta()).await;
    }
    let before = a.stats().l1_hits;
    assert_eq!(a.get("1").await.unwrap().as_deref(), Some("v2"));
    assert_eq!(
        a.stats().l1_hits,
        before + 1,
        "the writer's own announcement does not evict its copy"
    );
    assert!(b.stats().invalidations_received >= 1);
    // A delete is announced too.
    c.invalidate("1").await.unwrap();
    for n in [&a, &b] {
        eventually(delta(), "the delete reaches every node", || async {
            n.get("1").await.unwrap().is_none()
        })
        .await;
    }
    let stats = b.bus().stats();
    assert!(stats.received >= 2 && stats.lag_samples >= 2, "{stats:?}");
    assert_eq!(stats.malformed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_writes_end_with_the_last_version_in_thirty_rounds_of_thirty() {
    let server = RedisServer::start();
    let a = coherent_node(&server, "rapid").await;
    let b = coherent_node(&server, "rapid").await;
    let mut worst = Duration::ZERO;
    for round in 0..30 {
        let key = format!("k{round}");
        a.set(&key, &"v0".to_string()).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (b, key, stop) = (b.clone(), key.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let _ = b.get(&key).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        for v in 1..=20 {
            a.set(&key, &format!("v{v}")).await.unwrap();
        }
        let acked = Instant::now();
        // Within Δ of the last acknowledged write, b returns it (and keeps returning it).
        reads_within(&b, &key, "v20", delta()).await;
        worst = worst.max(acked.elapsed());
        stop.store(true, Ordering::Relaxed);
        reader.await.unwrap();
        assert_eq!(
            b.get(&key).await.unwrap().as_deref(),
            Some("v20"),
            "round {round}"
        );
    }
    println!("rapid writes: 30/30 rounds; slowest until the last version was read: {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clearing_a_namespace_clears_it_everywhere_and_nothing_else() {
    let server = RedisServer::start();
    let ax = coherent_node(&server, "x").await;
    let bx = coherent_node(&server, "x").await;
    let by = coherent_node(&server, "y").await;
    ax.set("k", &"x-value".to_string()).await.unwrap();
    by.set("k", &"y-value".to_string()).await.unwrap();
    assert_eq!(bx.get("k").await.unwrap().as_deref(), Some("x-value"));
    let deleted = ax.clear().await.unwrap();
    assert!(deleted >= 1);
    eventually(delta(), "x is cleared on the other node", || async {
        bx.get("k").await.unwrap().is_none()
    })
    .await;
    let before = by.stats().l1_hits;
    assert_eq!(by.get("k").await.unwrap().as_deref(), Some("y-value"));
    assert_eq!(by.stats().l1_hits, before + 1, "y's L1 is untouched");
    assert_eq!(by.stats().invalidations_received, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_subscriber_connection_drops_l1_and_it_comes_back() {
    let server = RedisServer::start();
    let a = coherent_node(&server, "kill").await;
    let b = coherent_node(&server, "kill").await;
    a.set("k", &"v1".to_string()).await.unwrap();
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    // Kill every pub/sub connection and write at once: the message may be lost.
    server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    a.set("k", &"v2".to_string()).await.unwrap();
    reads_within(&b, "k", "v2", delta()).await;
    eventually(SOON, "the gap is counted", || async { b.stats().gaps >= 1 }).await;
    // The bus resubscribed: later changes arrive as messages, not only through L1 expiry.
    eventually(SOON, "b's bus is back", || async {
        b.bus().stats().connected
    })
    .await;
    tokio::time::sleep(delta()).await;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v2"));
    let received = b.stats().invalidations_received;
    a.set("k", &"v3".to_string()).await.unwrap();
    reads_within(&b, "k", "v3", delta()).await;
    assert!(b.stats().invalidations_received > received);
}

/// A stopped Redis (SIGSTOP): the heartbeat misses, the bus is down and the lease runs out,
/// so L1 stops answering as confirmed. Under the strict outage policy a read is then the
/// Redis error; under a lenient one the L1 copy is an outage answer (counted). Nothing is
/// dropped (a stopped server loses no message), and once it resumes L1 answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_is_noticed_by_the_heartbeat_and_l1_stops_answering() {
    let mut server = RedisServer::start();
    let options = EntryOptions::new(Duration::from_secs(600)).hard_timeout(Duration::from_secs(2));
    let node = |staleness: Duration| {
        builder(&server, "stop")
            .bus_config(bus())
            .l2_timeout(Duration::from_millis(200))
            .default_options(options.outage_staleness(staleness))
            .build()
    };
    let strict = node(Duration::ZERO).await.unwrap();
    let lenient = node(Duration::from_secs(60)).await.unwrap();
    strict.set("k", &"v1".to_string()).await.unwrap();
    for n in [&strict, &lenient] {
        assert_eq!(n.get("k").await.unwrap().as_deref(), Some("v1"));
    }
    server.pause();
    eventually(
        SOON,
        "the heartbeat misses and the lease runs out",
        || async {
            [&strict, &lenient].iter().all(|n| {
                let stats = n.bus().stats();
                stats.heartbeats_missed >= 1 && !stats.connected && !n.bus().lease().holds()
            })
        },
    )
    .await;
    let err = strict.get("k").await.unwrap_err();
    assert!(
        err.is_unavailable(),
        "strict: not served from L1 any more, and L2 cannot answer: {err:?}"
    );
    assert_eq!(
        lenient.get("k").await.unwrap().as_deref(),
        Some("v1"),
        "lenient: the L1 copy is an outage answer"
    );
    assert!(lenient.stats().outage_served >= 1);
    assert_eq!(strict.stats().outage_served, 0);
    server.resume();
    for n in [&strict, &lenient] {
        eventually(SOON, "the bus recovers", || async {
            n.bus().stats().connected && n.bus().lease().holds()
        })
        .await;
        eventually(SOON, "reads work again", || async {
            n.get("k").await.ok().flatten().as_deref() == Some("v1")
        })
        .await;
        assert_eq!(n.stats().gaps, 0, "a stopped server lost no message");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_is_resubscribed_and_later_invalidations_arrive() {
    let mut server = RedisServer::start();
    let a = coherent_node(&server, "restart").await;
    let b = coherent_node(&server, "restart").await;
    a.set("k", &"v1".to_string()).await.unwrap();
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    server.restart();
    // Redis came back empty; b's L1 copy must go (gap), not be served as if nothing happened.
    eventually(SOON, "b noticed", || async { b.stats().gaps >= 1 }).await;
    let mut n = 0;
    eventually(SOON, "a can write again", || {
        n += 1;
        let a = a.clone();
        async move { a.set("k", &format!("v2-{n}")).await.is_ok() }
    })
    .await;
    let last = format!("v2-{n}");
    reads_within(&b, "k", &last, SOON).await;
    eventually(SOON, "b's bus is back", || async {
        b.bus().stats().connected
    })
    .await;
    tokio::time::sleep(delta()).await;
    let received = b.stats().invalidations_received;
    a.set("k", &"v3".to_string()).await.unwrap();
    reads_within(&b, "k", "v3", delta()).await;
    assert!(
        b.stats().invalidations_received > received,
        "the message path works after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_cut_off_by_the_output_buffer_limit_drops_l1() {
    let server = RedisServer::start();
    let a = coherent_node(&server, "slow").await;
    let b = coherent_node(&server, "slow").await;
    a.set("k", &"v1".to_string()).await.unwrap();
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    assert_eq!(
        server.command(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 1kb 0 0"
        ]),
        "OK"
    );
    // One message larger than the limit: Redis closes every subscriber of the channel
    // ("for overcoming of output buffer limits"), as it would a node that fell behind.
    let big = "x".repeat(64 * 1024);
    server.command(&["PUBLISH", "slow:!inval", &big]);
    eventually(SOON, "the disconnect is a gap", || async {
        b.stats().gaps >= 1
    })
    .await;
    assert!(
        server.log().contains("output buffer limits") || b.stats().gaps >= 1,
        "{}",
        server.log()
    );
    // Written while b was cut off: b must not keep serving v1.
    assert_eq!(
        server.command(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 32mb 8mb 60"
        ]),
        "OK"
    );
    a.set("k", &"v2".to_string()).await.unwrap();
    reads_within(&b, "k", "v2", delta()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_and_forged_messages_are_skipped_and_the_listener_lives_on() {
    let server = RedisServer::start();
    let a = coherent_node(&server, "junk").await;
    let b = coherent_node(&server, "junk").await;
    a.set("k", &"v1".to_string()).await.unwrap();
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    for junk in [
        "",
        "hello",
        "MLCI",
        "MLCI\u{1}\u{1}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    ] {
        server.command(&["PUBLISH", "junk:!inval", junk]);
    }
    eventually(SOON, "junk counted as malformed", || async {
        b.bus().stats().malformed >= 4
    })
    .await;
    // Still served from L1: junk evicts nothing.
    let before = b.stats().l1_hits;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    assert_eq!(b.stats().l1_hits, before + 1);
    // A forged but well-formed message can at worst evict (a reload from L2 follows).
    let forged = invalidation::message::encode(
        &invalidation::message::Message {
            origin: 12345,
            seq: 1,
            sent_micros: invalidation::message::now_micros(),
            vouches: vec![],
            action: invalidation::message::Action::Evict(vec![("k".into(), u64::MAX)]),
            signature: None,
        },
        None,
    );
    let mut conn = redis_conn(&server).await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg("junk:!inval")
        .arg(forged)
        .query_async(&mut conn)
        .await
        .unwrap();
    eventually(SOON, "the forged eviction applied", || async {
        b.stats().invalidations_received >= 1
    })
    .await;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"), "reloaded");
    // The listener is alive: a real change still arrives.
    a.set("k", &"v2".to_string()).await.unwrap();
    reads_within(&b, "k", "v2", delta()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_gap_from_a_writer_drops_l1() {
    let server = RedisServer::start();
    let b = coherent_node(&server, "seq").await;
    b.set("k", &"v1".to_string()).await.unwrap();
    let mut conn = redis_conn(&server).await;
    for seq in [1, 3] {
        // A writer whose message 2 was published (3 vouches for it) but never arrived.
        let m = invalidation::message::encode(
            &invalidation::message::Message {
                origin: 777,
                seq,
                sent_micros: invalidation::message::now_micros(),
                vouches: if seq == 3 { vec![2] } else { vec![] },
                action: invalidation::message::Action::Evict(vec![("other".into(), 1)]),
                signature: None,
            },
            None,
        );
        let _: i64 = redis::cmd("PUBLISH")
            .arg("seq:!inval")
            .arg(m)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    eventually(delta() * 3, "the missing number is a gap", || async {
        b.stats().gaps >= 1
    })
    .await;
    let before = b.stats().l2_hits;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    assert_eq!(
        b.stats().l2_hits,
        before + 1,
        "L1 was dropped: read from L2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_converge_to_what_redis_holds() {
    let server = RedisServer::start();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(coherent_node(&server, "race").await);
    }
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200 {
                let key = format!("k{}", i % 10);
                node.set(&key, &format!("n{n}-{i}")).await.unwrap();
                // Readers on the same node keep filling L1 from L2 meanwhile.
                let _ = node.get(&format!("k{}", (i + 5) % 10)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(delta()).await;
    let truth = coherent_node(&server, "race").await;
    for k in 0..10 {
        let key = format!("k{k}");
        let l2 = truth.get(&key).await.unwrap();
        for (n, node) in nodes.iter().enumerate() {
            assert_eq!(
                node.get(&key).await.unwrap(),
                l2,
                "node {n} disagrees with Redis on {key} after quiescence + Δ"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_ok_then_not_ready_while_the_bus_is_down_then_ok_again() {
    let mut server = RedisServer::start();
    let cache = coherent_node(&server, "health").await;
    cache.set("k", &"v".to_string()).await.unwrap();
    for _ in 0..200 {
        cache.get("k").await.unwrap();
    }
    let h = cache.health().await;
    assert_eq!(h.status, tiered::HealthStatus::Ok, "{h:?}");
    assert!(h.ready && h.redis.reachable && h.bus.connected);
    assert!(h.hit_ratio > 0.99, "{h:?}");
    assert_eq!(h.bus.bound_ms, 500);

    server.pause();
    // Not ready once the bus has been down for longer than the bound (P + T = 500 ms).
    eventually(SOON, "not ready while the bus is down", || async {
        !cache.health().await.ready
    })
    .await;
    let h = cache.health().await;
    assert_eq!(h.status, tiered::HealthStatus::Failed, "{h:?}");
    assert!(!h.ready && !h.redis.reachable && !h.bus.connected);
    assert!(h.bus.down_for_ms > 500, "{h:?}");
    assert!(
        h.reasons.iter().any(|r| r.contains("bus")),
        "{:?}",
        h.reasons
    );

    server.resume();
    eventually(SOON, "ready again", || async { cache.health().await.ready }).await;
    eventually(SOON, "ok again", || async {
        cache.health().await.status == tiered::HealthStatus::Ok
    })
    .await;
}

/// The read-side lease: while probes cannot come back through pub/sub (here `CLIENT PAUSE
/// WRITE` holds every `PUBLISH`, while the `INFO` heartbeat still answers, so no gap), a
/// fresh L1 entry stops answering once Δ has passed since the last proof, and answers again
/// once a probe round returns; L1 is not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_stops_answering_while_delivery_is_unproven_and_resumes_after() {
    let server = RedisServer::start();
    let a = coherent_node(&server, "lease").await;
    // A loaded machine may not have returned the first probe round yet.
    eventually(SOON, "the first probe round returns", || async {
        a.bus().lease().holds()
    })
    .await;
    a.set("k", &"v1".to_string()).await.unwrap();
    assert_eq!(a.get("k").await.unwrap().as_deref(), Some("v1"));
    let before = a.stats();
    assert!(before.l1_hits >= 1, "{before:?}");
    assert!(a.is_fresh_locally("k"));

    let pause = Duration::from_millis(2000);
    assert_eq!(
        server.command(&["CLIENT", "PAUSE", &pause.as_millis().to_string(), "WRITE"]),
        "OK"
    );
    let paused = Instant::now();
    eventually(Duration::from_secs(1), "the lease runs out", || async {
        !a.bus().lease().holds()
    })
    .await;
    assert!(!a.is_fresh_locally("k"));
    // Not an L1 hit. L2 answers, or — as here, where the probe's held PUBLISH blocks the
    // cache's connection behind it — is unavailable.
    let read = a.get("k").await;
    assert!(
        read.as_ref()
            .map_or_else(|e| e.is_unavailable(), |v| v.as_deref() == Some("v1")),
        "{read:?}"
    );
    assert!(
        paused.elapsed() < pause,
        "the checks must run inside the pause"
    );
    let during = a.stats();
    assert_eq!(during.l1_hits, before.l1_hits, "{during:?}");
    assert!(during.l1_unconfirmed > before.l1_unconfirmed, "{during:?}");
    assert_eq!(
        during.gaps, before.gaps,
        "a slow bus drops nothing: {during:?}"
    );

    // The pause ends, a probe round returns, L1 answers again.
    eventually(
        pause + Duration::from_secs(2),
        "the lease is renewed",
        || async { a.bus().lease().holds() },
    )
    .await;
    assert!(a.bus().stats().probes_late >= 1, "{:?}", a.bus().stats());
    assert!(a.is_fresh_locally("k"));
    assert_eq!(a.get("k").await.unwrap().as_deref(), Some("v1"));
    assert!(a.stats().l1_hits > during.l1_hits, "{:?}", a.stats());
}

/// Writes of one key by several callers of the same node finish in any order; own
/// announcements are skipped on arrival, so only the node itself can keep an older write's
/// value (or a value a newer delete removed) out of its L1. Checked without waiting for any
/// message: what L1 answers must be what Redis holds as soon as the writes are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_own_concurrent_writes_leave_the_newest_in_its_l1() {
    let server = RedisServer::start();
    let node = coherent_node(&server, "own").await;
    let truth = coherent_node(&server, "own").await;
    for round in 0..20 {
        let mut tasks = Vec::new();
        for t in 0..8 {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..20 {
                    let key = format!("k{}", i % 2);
                    if (t + i) % 5 == 0 {
                        node.invalidate(&key).await.unwrap();
                    } else {
                        node.set(&key, &format!("r{round}t{t}i{i}")).await.unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for k in 0..2 {
            let key = format!("k{k}");
            let in_redis = truth
                .get_with(
                    &key,
                    EntryOptions::new(Duration::from_secs(600)).skip_l1(true),
                )
                .await
                .unwrap();
            assert_eq!(
                node.get(&key).await.unwrap(),
                in_redis,
                "round {round}: the writing node's L1 disagrees with Redis on {key}"
            );
        }
    }
}

fn forged(origin: u64, seq: u64, action: invalidation::message::Action) -> Vec<u8> {
    invalidation::message::encode(
        &invalidation::message::Message {
            origin,
            seq,
            sent_micros: invalidation::message::now_micros(),
            vouches: vec![],
            action,
            signature: None,
        },
        None,
    )
}

/// Whoever can PUBLISH on the channel replays node A's own origin with huge versions and
/// sequence numbers, then B writes the key 40 times: each of B's writes still reaches A
/// within Δ (a forged origin never makes a real message look like A's own, and a forged
/// version never hides a genuine one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_messages_under_a_nodes_own_origin_never_silence_it() {
    use invalidation::message::Action;
    let server = RedisServer::start();
    let a = coherent_node(&server, "forge").await;
    let b = coherent_node(&server, "forge").await;
    a.set("k", &"v0".to_string()).await.unwrap();
    assert_eq!(a.get("k").await.unwrap().as_deref(), Some("v0"));
    // A's origin, learnt the way an attacker would: from A's own message on the channel.
    let mut conn = redis_conn(&server).await;
    let (origin, _) = {
        let mut pubsub = redis::Client::open(server.url())
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        pubsub.subscribe("forge:!inval").await.unwrap();
        let listen = async {
            use futures_util::StreamExt as _;
            let mut stream = pubsub.on_message();
            a.set("k", &"v0".to_string()).await.unwrap();
            let msg = stream.next().await.unwrap();
            invalidation::message::origin_and_seq(msg.get_payload_bytes()).unwrap()
        };
        tokio::time::timeout(SOON, listen).await.unwrap()
    };
    let mut late = 0;
    let mut version = a.set("k", &"v0".to_string()).await.unwrap();
    for round in 1..=40u64 {
        // A holds the key in L1 (a hit, not a read of L2)...
        assert_eq!(
            a.get("k").await.unwrap().as_deref(),
            Some(format!("v{}", round - 1).as_str())
        );
        assert!(a.is_fresh_locally("k"), "round {round}: A's copy is in L1");
        // ...and the forger, under A's own origin, announces the version A holds (which evicts
        // nothing) with huge and repeated sequence numbers, just before B's real write.
        let received = a.bus().stats().received;
        for seq in [u64::MAX, round * 1_000_000, u64::MAX] {
            let bytes = forged(origin, seq, Action::Evict(vec![("k".into(), version)]));
            let _: i64 = redis::cmd("PUBLISH")
                .arg("forge:!inval")
                .arg(bytes)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        eventually(SOON, "A received the forged messages", || async {
            a.bus().stats().received >= received + 3
        })
        .await;
        assert!(
            a.is_fresh_locally("k"),
            "round {round}: a forged equal version evicted nothing"
        );
        let value = format!("v{round}");
        version = b.set("k", &value).await.unwrap();
        let acked = Instant::now();
        loop {
            if a.get("k").await.unwrap().as_deref() == Some(value.as_str()) {
                break;
            }
            if acked.elapsed() > delta() {
                late += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert_eq!(late, 0, "{late} of B's 40 writes reached A after Δ");
}

/// With a shared secret, messages from anyone without it do nothing (counted), and signed
/// nodes still keep each other coherent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_secret_unsigned_and_forged_messages_do_nothing() {
    use invalidation::message::Action;
    let server = RedisServer::start();
    let signed = || async {
        builder(&server, "signed")
            .bus_config(bus().secret("correct horse battery staple"))
            .default_options(EntryOptions::new(Duration::from_secs(600)))
            .build()
            .await
            .unwrap()
    };
    let a = signed().await;
    let b = signed().await;
    a.set("k", &"v1".to_string()).await.unwrap();
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    let mut conn = redis_conn(&server).await;
    for (i, action) in [
        Action::Evict(vec![("k".into(), u64::MAX)]),
        Action::ClearNamespace,
        Action::ClearAll,
    ]
    .into_iter()
    .enumerate()
    {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("signed:!inval")
            .arg(forged(777, i as u64 + 1, action))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    eventually(SOON, "the unsigned messages are counted", || async {
        b.bus().stats().unsigned >= 3
    })
    .await;
    assert!(
        b.is_fresh_locally("k"),
        "an unsigned message evicted B's copy"
    );
    assert_eq!(b.stats().gaps, 0);
    // The signed nodes still hear each other.
    a.set("k", &"v2".to_string()).await.unwrap();
    reads_within(&b, "k", "v2", delta()).await;
}
