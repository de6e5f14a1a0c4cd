//! Hostile and broken publishers on the invalidation channel, against a real redis-server.
//!
//! Whoever may PUBLISH on the channel can send anything: junk, forged origins, replays, huge
//! numbers, clears. With a secret none of it reaches the consumer and each kind is counted;
//! without one the bus accepts well-formed messages (that is the documented threat model),
//! but it never panics, its tables stay bounded, and genuine messages still get through.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use invalidation::message::{self, Action, Message, Signing};
use invalidation::sign::Key;
use invalidation::{Bus, BusConfig, Consumer, Event, GapReason};
use testkit::{RedisServer, eventually};

const CHANNEL: &str = "t:!inval";
const SOON: Duration = Duration::from_secs(20);

type Seen = Arc<Mutex<Vec<Event>>>;

fn collector() -> (Consumer, Seen) {
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    let consumer: Consumer = Arc::new(move |event| sink.lock().unwrap().push(event));
    (consumer, seen)
}

async fn bus(server: &RedisServer, config: BusConfig) -> (Bus, Seen) {
    let conn = l2::Connection::connect(&server.url()).await.unwrap();
    let bus = Bus::connect(&conn, config).await.unwrap();
    let (consumer, seen) = collector();
    bus.listen(CHANNEL, consumer).await.unwrap();
    (bus, seen)
}

/// A plain connection for publishing floods: no response timeout (a pipeline of megabytes
/// on a loaded machine takes longer than the default allows).
async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap()
}

/// Publishes every payload, pipelined.
async fn publish_all(conn: &mut redis::aio::MultiplexedConnection, payloads: &[Vec<u8>]) {
    for chunk in payloads.chunks(1000) {
        let mut pipe = redis::pipe();
        for p in chunk {
            pipe.cmd("PUBLISH").arg(CHANNEL).arg(p).ignore();
        }
        let () = pipe.query_async(conn).await.unwrap();
    }
}

/// An eviction as the writer's script publishes it: the built prefix plus the version.
fn with_version(mut prefix: Vec<u8>, version: u64) -> Vec<u8> {
    prefix.extend_from_slice(&version.to_le_bytes());
    prefix
}

/// Well-formed messages a hostile peer would send: random and replayed origins, huge
/// versions, sequences and vouches, clears.
fn hostile(n: usize, sign: Option<Signing<'_>>) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let origin = match i % 3 {
                0 => fastrand::u64(..),
                1 => 42, // replayed over and over
                _ => u64::MAX,
            };
            let seq = match i % 4 {
                0 => u64::MAX,
                1 => 0,
                _ => fastrand::u64(..),
            };
            let action = match i % 5 {
                0 => Action::ClearAll,
                1 => Action::ClearNamespace,
                _ => Action::Evict(vec![(format!("key-{}", i % 7), u64::MAX - (i % 2) as u64)]),
            };
            message::encode(
                &Message {
                    origin,
                    seq,
                    sent_micros: message::now_micros(),
                    vouches: (0..(i % 9)).map(|_| fastrand::u64(..)).collect(),
                    action,
                    signature: None,
                },
                sign,
            )
        })
        .collect()
}

fn junk(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| match i % 3 {
            0 => (0..fastrand::usize(0..80))
                .map(|_| fastrand::u8(..))
                .collect(),
            1 => {
                // The right magic and format, then garbage.
                let mut b = b"MLCI\x02\x01".to_vec();
                b.extend((0..fastrand::usize(0..80)).map(|_| fastrand::u8(..)));
                b
            }
            _ => b"hello".to_vec(),
        })
        .collect()
}

fn origins_of(seen: &Seen) -> Vec<u64> {
    seen.lock()
        .unwrap()
        .iter()
        .flat_map(|e| match e {
            Event::Evict(list) => list.iter().map(|e| e.origin).collect(),
            Event::ClearAll { origin } | Event::ClearNamespace { origin } => vec![*origin],
            _ => vec![],
        })
        .collect()
}

fn evicted(seen: &Seen, key: &str) -> bool {
    seen.lock().unwrap().iter().any(|e| match e {
        Event::Evict(list) => list.iter().any(|e| e.key == key),
        _ => false,
    })
}

fn sequence_gaps(seen: &Seen) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|e| **e == Event::Gap(GapReason::SequenceGap))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_secret_no_forged_message_reaches_the_consumer_and_each_kind_is_counted() {
    let server = RedisServer::start();
    let (bus, seen) = bus(&server, BusConfig::default().secret("s3cret")).await;
    let genuine = bus.publisher(CHANNEL);
    let mut conn = raw(&server).await;

    let right = Key::new(b"s3cret");
    let wrong = Key::new(b"guessed");
    let unsigned = hostile(300, None);
    let mut forged = hostile(
        300,
        Some(Signing {
            key: &wrong,
            channel: CHANNEL,
        }),
    );
    // The right key, but signed for another channel: not valid here.
    forged.extend(hostile(
        100,
        Some(Signing {
            key: &right,
            channel: "other:!inval",
        }),
    ));
    // Properly signed by a node whose clock is 10 minutes behind: applied (nothing is dropped
    // for its age; a skewed writer must not be ignored by its peers).
    let old: Vec<Vec<u8>> = (0..50u64)
        .map(|i| {
            message::encode(
                &Message {
                    origin: 7,
                    seq: i + 1,
                    sent_micros: message::now_micros() - 600_000_000,
                    vouches: vec![],
                    action: Action::Evict(vec![(format!("skewed-{i}"), 1)]),
                    signature: None,
                },
                Some(Signing {
                    key: &right,
                    channel: CHANNEL,
                }),
            )
        })
        .collect();
    let junk = junk(100);
    // A genuine clear, and then the same bytes replayed 20 times.
    let clear = genuine.clear_all();
    let mut all: Vec<Vec<u8>> = vec![clear.clone()];
    all.extend((0..20).map(|_| clear.clone()));
    for i in 0..old.len().max(unsigned.len()) {
        for list in [&unsigned, &forged, &old, &junk] {
            if let Some(p) = list.get(i) {
                all.push(p.clone());
            }
        }
    }
    all.extend(forged[300..].iter().cloned());
    publish_all(&mut conn, &all).await;

    // A genuine message after the flood.
    let after = genuine.evict("after-the-flood");
    publish_all(&mut conn, &[with_version(after, 5)]).await;
    eventually(SOON, "the genuine message after the flood", || async {
        evicted(&seen, "after-the-flood")
    })
    .await;

    let stats = bus.stats();
    assert_eq!(stats.unsigned, 300, "{stats:?}");
    assert_eq!(stats.forged, 400, "{stats:?}");
    assert_eq!(stats.replayed, 20, "{stats:?}");
    assert!(
        (0..50).all(|i| evicted(&seen, &format!("skewed-{i}"))),
        "a signed eviction from a node with a skewed clock is applied"
    );
    assert_eq!(stats.malformed, 100, "{stats:?}");
    let origins = origins_of(&seen);
    assert!(
        origins.iter().all(|o| *o == genuine.origin() || *o == 7),
        "{} events from forged origins reached the consumer",
        origins
            .iter()
            .filter(|o| **o != genuine.origin() && **o != 7)
            .count()
    );
    let clears = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::ClearAll { .. }))
        .count();
    assert_eq!(clears, 1, "the genuine clear once, its replays never");
    assert!(
        stats.origins <= 2,
        "only the genuine writers are tracked: {stats:?}"
    );
    assert_eq!(sequence_gaps(&seen), 0);
    // Signed probes come back: the lease is renewed by them.
    eventually(SOON, "a signed probe round came back", || async {
        bus.stats().probe_micros > 0
    })
    .await;
    eventually(SOON, "the lease holds", || async { bus.lease().holds() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_a_flood_never_panics_stays_bounded_and_genuine_messages_arrive() {
    let server = RedisServer::start();
    let (bus, seen) = bus(&server, BusConfig::default()).await;
    let writer_conn = l2::Connection::connect(&server.url()).await.unwrap();
    let writer = Bus::connect(&writer_conn, BusConfig::default())
        .await
        .unwrap();
    let genuine = writer.publisher(CHANNEL);
    let mut conn = raw(&server).await;

    let mut all = hostile(10_000, None);
    all.extend(junk(500));
    // Oversized: never queued.
    all.push(vec![b'x'; invalidation::MAX_MESSAGE_LEN + 1]);
    fastrand::shuffle(&mut all);
    publish_all(&mut conn, &all).await;
    eventually(SOON, "the flood was taken in", || async {
        let s = bus.stats();
        // Everything but the oversized payload reaches the bus's task.
        s.received == all.len() as u64 - 1
    })
    .await;
    let stats = bus.stats();
    assert!(
        stats.origins <= 4096,
        "the origin table is bounded: {stats:?}"
    );
    // The junk, and the oversized payload.
    assert!(stats.malformed > 500, "{stats:?}");

    // A forged eviction of the same key with a higher version, in the same burst: the two
    // are coalesced per (key, origin), so the forged origin does not stand for the genuine.
    let forged = message::encode(
        &Message {
            origin: 4242,
            seq: 1,
            sent_micros: message::now_micros(),
            vouches: vec![],
            action: Action::Evict(vec![("after-the-flood".into(), u64::MAX)]),
            signature: None,
        },
        None,
    );
    let m = genuine.evict("after-the-flood");
    publish_all(&mut conn, &[forged, with_version(m, 9)]).await;
    eventually(SOON, "the genuine message after the flood", || async {
        evicted(&seen, "after-the-flood")
    })
    .await;
    // Coalescing never lets a forged origin stand for the genuine writer's message.
    let found = seen
        .lock()
        .unwrap()
        .iter()
        .flat_map(|e| match e {
            Event::Evict(list) => list.clone(),
            _ => vec![],
        })
        .filter(|e| e.key == "after-the-flood" && e.origin != 4242)
        .map(|e| (e.origin, e.version))
        .collect::<Vec<_>>();
    assert_eq!(found, vec![(genuine.origin(), 9)]);
}

/// The race: a flood fills the queue while the consumer is slow; a probe that returns after
/// a dropped message must not renew the lease before the gap is delivered. Here: the
/// overflow is one gap for every channel, and the bus keeps working after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_queue_is_a_gap_not_memory_growth() {
    // More items than the queue holds, each tiny.
    let flood = (0..invalidation::QUEUE_CAPACITY + 5000)
        .map(|_| b"x".to_vec())
        .collect();
    overflow(flood).await;
}

/// Far fewer items than the queue holds, but large: the byte budget overflows first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_messages_is_a_gap_not_memory_growth() {
    let n = invalidation::QUEUE_BYTES / (60 << 10) + 200;
    assert!(n < invalidation::QUEUE_CAPACITY);
    let flood = (0..n).map(|_| vec![b'y'; 60 << 10]).collect();
    overflow(flood).await;
}

/// Holds the bus's task with a slow clear (clears are delivered by the task; evictions by the
/// connection's reader), publishes `flood`, and expects an overflow gap, then a genuine
/// message delivered after it.
async fn overflow(flood: Vec<Vec<u8>>) {
    let server = RedisServer::start();
    let conn = l2::Connection::connect(&server.url()).await.unwrap();
    let bus = Bus::connect(&conn, BusConfig::default()).await.unwrap();
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    // Redis must deliver the whole flood, however slowly this machine reads it (no
    // disconnect for a full output buffer).
    server.command(&[
        "CONFIG",
        "SET",
        "client-output-buffer-limit",
        "pubsub 0 0 0",
    ]);
    // The clear holds the bus's task until the flood has overflowed the queue behind it. In
    // `block_in_place`: the worker's other tasks (the connection's, say, queued behind the
    // bus's task) move to another thread instead of waiting with it.
    let held = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hold = Arc::clone(&held);
    let consumer: Consumer = Arc::new(move |event| {
        let slow = matches!(event, Event::ClearNamespace { .. });
        sink.lock().unwrap().push(event);
        if slow {
            tokio::task::block_in_place(|| {
                let until = std::time::Instant::now() + Duration::from_secs(60);
                while hold.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
    });
    bus.listen(CHANNEL, consumer).await.unwrap();
    let publisher = bus.publisher(CHANNEL);
    let mut conn = raw(&server).await;
    publish_all(&mut conn, &[publisher.clear_namespace()]).await;
    eventually(SOON, "the first event", || async {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    publish_all(&mut conn, &flood).await;
    eventually(SOON * 4, "the queue overflowing", || async {
        bus.stats().overflows > 0
    })
    .await;
    held.store(false, Ordering::SeqCst);
    eventually(SOON * 2, "the overflow gap", || async {
        seen.lock()
            .unwrap()
            .contains(&Event::Gap(GapReason::Overflow))
    })
    .await;
    publish_all(&mut conn, &[with_version(publisher.evict("later"), 2)]).await;
    eventually(SOON, "a message after the overflow", || async {
        evicted(&seen, "later")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_built_but_never_published_causes_no_gap_and_a_lost_acknowledged_one_does() {
    let server = RedisServer::start();
    let config = BusConfig::default();
    let t = Duration::from_millis(500);
    let (_bus, seen) = bus(&server, config.clone().heartbeat_timeout(t)).await;
    let writer_conn = l2::Connection::connect(&server.url()).await.unwrap();
    let writer = Bus::connect(&writer_conn, config).await.unwrap();
    let p = writer.publisher(CHANNEL);
    let mut conn = raw(&server).await;

    let m1 = with_version(p.evict("k1"), 1);
    publish_all(&mut conn, std::slice::from_ref(&m1)).await;
    p.acknowledged(&m1);
    // Built, then its write failed: never published, never acknowledged.
    let _burnt = p.evict("k2");
    let m3 = with_version(p.evict("k3"), 3);
    publish_all(&mut conn, std::slice::from_ref(&m3)).await;
    p.acknowledged(&m3);
    let m4 = with_version(p.evict("k4"), 4);
    publish_all(&mut conn, std::slice::from_ref(&m4)).await;
    p.acknowledged(&m4);
    eventually(SOON, "the published messages", || async {
        evicted(&seen, "k4")
    })
    .await;
    tokio::time::sleep(t * 3).await;
    assert_eq!(sequence_gaps(&seen), 0, "a burnt number is no gap");

    // Acknowledged (so the writer vouches for it) but lost on the way: a gap, once.
    let m5 = with_version(p.evict("k5"), 5);
    p.acknowledged(&m5);
    let m6 = with_version(p.evict("k6"), 6);
    publish_all(&mut conn, std::slice::from_ref(&m6)).await;
    eventually(
        t * 3 + Duration::from_secs(2),
        "the lost message's gap",
        || async { sequence_gaps(&seen) == 1 },
    )
    .await;
    tokio::time::sleep(t * 3).await;
    assert_eq!(sequence_gaps(&seen), 1, "reported once");
}

/// Messages too large for the subscriber's callback to apply itself (over 2 KiB) are applied
/// by the bus's task, under the same checks: a signed one is, a forged one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_eviction_is_applied_by_the_task_under_the_same_checks() {
    let server = RedisServer::start();
    let config = BusConfig::default().secret("s3cret");
    let (bus, seen) = bus(&server, config).await;
    let genuine = bus.publisher(CHANNEL);
    let other = Key::new(b"another secret");
    let long = |c: char| std::iter::repeat_n(c, 3000).collect::<String>();
    let forged = message::encode(
        &Message {
            origin: 4242,
            seq: 1,
            sent_micros: message::now_micros(),
            vouches: vec![],
            action: Action::Evict(vec![(long('f'), 7)]),
            signature: None,
        },
        Some(Signing {
            key: &other,
            channel: CHANNEL,
        }),
    );
    let mut conn = raw(&server).await;
    publish_all(
        &mut conn,
        &[
            forged,
            with_version(genuine.evict(&long('g')), 8),
            with_version(genuine.evict("small"), 9),
        ],
    )
    .await;
    eventually(SOON, "both genuine evictions", || async {
        evicted(&seen, &long('g')) && evicted(&seen, "small")
    })
    .await;
    assert!(
        !evicted(&seen, &long('f')),
        "a forged large eviction applied"
    );
    assert_eq!(bus.stats().forged, 1);
    assert_eq!(sequence_gaps(&seen), 0);
}
