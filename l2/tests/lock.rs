//! The lock primitives against a real redis-server.

use std::time::Duration;

use l2::{Codec, Connection, EntryMeta, KeySpace, RedisStore, TypeTag};
use testkit::RedisServer;

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::new(Connection::connect(server.url()).await.unwrap())
}

const TAG: TypeTag = TypeTag::from_name("lock-tests.String");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_many_contenders_exactly_one_wins() {
    let server = RedisServer::start();
    let key = KeySpace::new("locks").key("k");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        // Separate connections, as separate processes would have.
        let store = store(&server).await;
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            store.try_lock(&key, Duration::from_secs(10)).await.unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap().is_some());
    }
    assert_eq!(winners, 1);
}

#[tokio::test]
async fn release_with_another_token_does_nothing() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let key = KeySpace::new("locks").key("k");
    let first = store
        .try_lock(&key, Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = store
        .try_lock(&key, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(first.token(), second.token());
    assert_eq!(first.lock_key(), second.lock_key());
    assert!(
        !store.unlock(&first).await.unwrap(),
        "a stale holder must not release"
    );
    assert_eq!(server.command(&["GET", second.lock_key()]), second.token());
    assert!(store.unlock(&second).await.unwrap());
    assert_eq!(server.command(&["EXISTS", second.lock_key()]), "0");
}

#[tokio::test]
async fn expiry_frees_the_lock_and_extend_keeps_it() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let a = KeySpace::new("locks").key("a");
    let b = KeySpace::new("locks").key("b");

    store
        .try_lock(&a, Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .try_lock(&a, Duration::from_secs(1))
            .await
            .unwrap()
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        store
            .try_lock(&a, Duration::from_secs(1))
            .await
            .unwrap()
            .is_some()
    );

    let held = store
        .try_lock(&b, Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .extend_lock(&held, Duration::from_secs(10))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        store
            .try_lock(&b, Duration::from_secs(1))
            .await
            .unwrap()
            .is_none()
    );
    let pttl: i64 = server.command(&["PTTL", held.lock_key()]).parse().unwrap();
    assert!(pttl > 9_000, "{pttl}");
}

#[tokio::test]
async fn conditional_write_is_refused_after_the_lock_changed_hands() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let codec = Codec::<String>::new(TAG);
    let key = KeySpace::new("locks").key("data");
    let meta = EntryMeta::new(Duration::from_secs(60));

    let slow = store
        .try_lock(&key, Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // the slow holder loses its lock
    let fast = store
        .try_lock(&key, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .set_if_locked(&fast, &codec, &"new".to_string(), &meta)
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_if_locked(&slow, &codec, &"old".to_string(), &meta)
            .await
            .unwrap(),
        "a holder that lost its lock must not write"
    );
    assert!(
        !store
            .extend_lock(&slow, Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert_eq!(store.get(&key, &codec).await.unwrap().unwrap().value, "new");
    let pttl: i64 = server.command(&["PTTL", key.as_str()]).parse().unwrap();
    assert!(pttl > 50_000, "the conditional write sets the TTL: {pttl}");

    // After release, nobody holds it and a conditional write is refused too.
    assert!(store.unlock(&fast).await.unwrap());
    assert!(
        !store
            .set_if_locked(&fast, &codec, &"late".to_string(), &meta)
            .await
            .unwrap()
    );
    assert_eq!(store.get(&key, &codec).await.unwrap().unwrap().value, "new");
}

#[tokio::test]
async fn a_newer_write_breaks_the_lock_so_the_older_load_cannot_land() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let codec = Codec::<String>::new(TAG);
    let meta = EntryMeta::new(Duration::from_secs(60));
    let key = KeySpace::new("locks").key("k");
    let lock = store
        .try_lock(&key, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let newer = codec.encode(&"newer".to_string(), &meta).unwrap();
    store
        .overwrite_unannounced(&key, &newer, Duration::from_secs(60))
        .await
        .unwrap();
    let older = codec.encode(&"older".to_string(), &meta).unwrap();
    assert!(
        store
            .complete_lock(&lock, &older, Duration::from_secs(60))
            .await
            .unwrap()
            .is_none(),
        "the write of a load that started before the overwrite must be refused"
    );
    assert_eq!(
        store.get(&key, &codec).await.unwrap().unwrap().value,
        "newer"
    );

    // The same after a delete.
    let lock = store
        .try_lock(&key, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let removal = store
        .remove_unannounced(&key, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(removal.existed);
    assert!(
        store
            .complete_lock(&lock, &older, Duration::from_secs(60))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.get(&key, &codec).await.unwrap().is_none());

    // A holder that kept its lock writes, and its lock is released in the same round trip.
    let lock = store
        .try_lock(&key, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let version = store
        .complete_lock(&lock, &older, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        version.is_some_and(|v| v > removal.version),
        "a version above the delete's ({}): {version:?}",
        removal.version
    );
    assert_eq!(server.command(&["EXISTS", &key.lock_key()]), "0");
    assert_eq!(
        store.get(&key, &codec).await.unwrap().unwrap().value,
        "older"
    );
}

#[tokio::test]
async fn waiters_are_woken_by_the_holders_write_not_by_polling() {
    let server = RedisServer::start();
    let conn = Connection::connect(server.url()).await.unwrap();
    let store = RedisStore::new(conn.clone());
    let space = KeySpace::new("locks");
    let subscriber = l2::Subscriber::connect(&conn).await.unwrap();
    let waiters = l2::LockWaiters::attach(&subscriber, &space).await.unwrap();
    let codec = Codec::<String>::new(TAG);
    let key = space.key("k");
    let other = space.key("other");

    let holder = store
        .try_lock(&key, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let mut wait = waiters.watch(&key);
    // A notice for another key does not wake it.
    let other_lock = store
        .try_lock(&other, Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    store.unlock(&other_lock).await.unwrap();
    assert!(!wait.notified(Duration::from_millis(200)).await);

    let writer = {
        let store = store.clone();
        let codec = codec.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let bytes = codec
                .encode(&"v".to_string(), &EntryMeta::new(Duration::from_secs(60)))
                .unwrap();
            store
                .complete_lock(&holder, &bytes, Duration::from_secs(60))
                .await
                .unwrap()
        })
    };
    let start = std::time::Instant::now();
    assert!(
        wait.notified(Duration::from_secs(5)).await,
        "the write must wake the waiter"
    );
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "woken by the notice, not the deadline"
    );
    assert!(
        writer.await.unwrap().is_some(),
        "the holder's write lands with a version"
    );
    assert_eq!(store.get(&key, &codec).await.unwrap().unwrap().value, "v");

    // A batch of locks is one round trip and releases wake waiters too.
    let keys: Vec<_> = (0..5).map(|i| space.key(&format!("b{i}"))).collect();
    let locks = store
        .try_lock_many(&keys, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(locks.iter().all(Option::is_some));
    let again = store
        .try_lock_many(&keys, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(again.iter().all(Option::is_none), "already held");
    let mut wait = waiters.watch(&keys[3]);
    let held: Vec<_> = locks.into_iter().flatten().collect();
    store.unlock_many(&held).await.unwrap();
    assert!(wait.notified(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn absent_markers_read_as_absent_not_as_corrupt() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let codec = Codec::<String>::new(TAG);
    let key = KeySpace::new("locks").key("nothing");
    let bytes = codec
        .encode_absent(&EntryMeta::new(Duration::from_secs(60)))
        .unwrap();
    store
        .overwrite_unannounced(&key, &bytes, Duration::from_secs(60))
        .await
        .unwrap();
    let found = store.lookup(&key, &codec).await.unwrap().unwrap();
    assert_eq!(found.value, None);
    assert!(found.is_fresh());
    assert!(
        store.get(&key, &codec).await.unwrap().is_none(),
        "a typed get sees a miss"
    );
    assert_eq!(store.stats().decode_errors, 0);
    assert_eq!(
        server.command(&["EXISTS", key.as_str()]),
        "1",
        "not evicted"
    );
}

#[tokio::test]
async fn every_change_gets_a_higher_version_across_deletes_and_vanished_keys() {
    let server = RedisServer::start();
    let conn = Connection::connect(server.url()).await.unwrap();
    let store = RedisStore::new(conn.clone());
    let codec = Codec::<String>::new(TAG);
    let meta = EntryMeta::new(Duration::from_secs(60));
    let key = KeySpace::new("versions").key("k");
    let ttl = Duration::from_secs(60);
    let bytes = codec.encode(&"v".to_string(), &meta).unwrap();

    // Announcements carry the version, appended by the script.
    let subscriber = l2::Subscriber::connect(&conn).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    subscriber
        .listen("versions:!test", move |e| {
            if let l2::Event::Message { payload, .. } = e {
                let _ = tx.send(payload.to_vec());
            }
        })
        .await
        .unwrap();
    let announce = l2::Announce {
        channel: "versions:!test",
        message: b"hdr",
    };
    // Versions are max(previous + 1, the server's clock in µs): each above the last, and
    // never below the server's time of the write.
    let clock = || -> u64 {
        let t = server.command(&["TIME"]);
        let mut parts = t.split_whitespace().map(|p| p.parse::<u64>().unwrap());
        parts.next().unwrap() * 1_000_000 + parts.next().unwrap()
    };
    let before = clock();
    let v1 = store.overwrite(&key, &bytes, ttl, announce).await.unwrap();
    assert!(v1 >= before, "{v1} < server time {before}");
    let v2 = store
        .overwrite_unannounced(&key, &bytes, ttl)
        .await
        .unwrap();
    assert!(v2 > v1);
    let removal = store.remove(&key, ttl, announce).await.unwrap();
    assert!(removal.existed);
    let v3 = removal.version;
    assert!(v3 > v2);
    assert!(
        store.get(&key, &codec).await.unwrap().is_none(),
        "a tombstone is a miss"
    );
    assert_eq!(store.stats().decode_errors, 0);
    let again = store.remove_unannounced(&key, ttl).await.unwrap();
    assert!(!again.existed);
    let v4 = again.version;
    assert!(v4 > v3);
    let v5 = store
        .overwrite_unannounced(&key, &bytes, ttl)
        .await
        .unwrap();
    assert!(v5 > v4);
    let read = store.get(&key, &codec).await.unwrap().unwrap();
    assert_eq!(
        read.meta.write_version, v5,
        "readers see the stamped version"
    );
    let lock = store.try_lock(&key, ttl).await.unwrap().unwrap();
    let v6 = store
        .complete_lock(&lock, &bytes, ttl)
        .await
        .unwrap()
        .unwrap();
    assert!(v6 > v5);

    // The key vanishes behind the store's back (an operator, FLUSHALL, eviction): the next
    // version is still above every earlier one.
    server.command(&["FLUSHALL"]);
    let v7 = store
        .overwrite_unannounced(&key, &bytes, ttl)
        .await
        .unwrap();
    assert!(v7 > v6, "a vanished key's version restarted: {v7} <= {v6}");
    // A version far ahead of the clock (written by an older build) still only goes up.
    let ahead = KeySpace::new("versions").key("ahead");
    let bytes_ahead = codec
        .encode(
            &"v".to_string(),
            &EntryMeta::new(Duration::from_secs(60)).write_version(u64::from(u32::MAX) << 20),
        )
        .unwrap();
    store.set_bytes(&ahead, &bytes_ahead, ttl).await.unwrap();
    let next = store
        .overwrite_unannounced(&ahead, &bytes, ttl)
        .await
        .unwrap();
    assert_eq!(next, (u64::from(u32::MAX) << 20) + 1);
    // A version beyond any the scripts stamp (bytes written behind the cache's back) is
    // foreign: a decode error for readers, and version 0 for the next write, which gets the
    // clock's.
    let mut forged = codec
        .encode(&"v".to_string(), &EntryMeta::new(Duration::from_secs(60)))
        .unwrap();
    forged[14..22].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
    let foreign = KeySpace::new("versions").key("foreign");
    store.set_bytes(&foreign, &forged, ttl).await.unwrap();
    assert!(store.get(&foreign, &codec).await.unwrap_err().is_decode());
    store.set_bytes(&foreign, &forged, ttl).await.unwrap();
    let before = clock();
    let v = store
        .overwrite_unannounced(&foreign, &bytes, ttl)
        .await
        .unwrap();
    assert!(
        v >= before && v < l2::MAX_WRITE_VERSION,
        "a foreign version never outranks real writes: {v}"
    );

    let mut first = b"hdr".to_vec();
    first.extend_from_slice(&v1.to_le_bytes());
    let mut third = b"hdr".to_vec();
    third.extend_from_slice(&v3.to_le_bytes());
    let wait = Duration::from_secs(5);
    assert_eq!(
        tokio::time::timeout(wait, rx.recv()).await.unwrap(),
        Some(first)
    );
    assert_eq!(
        tokio::time::timeout(wait, rx.recv()).await.unwrap(),
        Some(third)
    );

    // A tombstone outlives what the deleted value would have, and a long minimum.
    let other = KeySpace::new("versions").key("short");
    store
        .overwrite_unannounced(&other, &bytes, Duration::from_secs(100))
        .await
        .unwrap();
    store
        .remove_unannounced(&other, Duration::from_millis(5))
        .await
        .unwrap();
    let pttl: i64 = server.command(&["PTTL", other.as_str()]).parse().unwrap();
    assert!(pttl > 90_000, "{pttl}");
    assert!(subscriber.ping(wait).await.is_ok());
    assert_eq!(subscriber.run_id(wait).await.unwrap().len(), 40);
}

#[tokio::test]
async fn read_or_lock_takes_the_lock_only_when_the_entry_is_not_fresh() {
    use l2::LockAttempt;
    let server = RedisServer::start();
    let store = store(&server).await;
    let codec = Codec::<String>::new(TAG);
    let space = KeySpace::new("rol");
    let ttl = Duration::from_secs(10);

    let (found, attempt) = store
        .lookup_or_lock(&space.key("cold"), &codec, ttl)
        .await
        .unwrap();
    assert!(found.is_none());
    let LockAttempt::Taken(lock) = attempt else {
        panic!("a missing entry takes the lock: {attempt:?}")
    };
    let (_, again) = store
        .lookup_or_lock(&space.key("cold"), &codec, ttl)
        .await
        .unwrap();
    assert_eq!(again, LockAttempt::HeldElsewhere);
    let bytes = codec
        .encode(&"v".to_string(), &EntryMeta::new(Duration::from_secs(60)))
        .unwrap();
    assert!(
        store
            .complete_lock(&lock, &bytes, Duration::from_secs(60))
            .await
            .unwrap()
            .is_some()
    );
    let (found, attempt) = store
        .lookup_or_lock(&space.key("cold"), &codec, ttl)
        .await
        .unwrap();
    assert_eq!(found.unwrap().value.as_deref(), Some("v"));
    assert_eq!(
        attempt,
        LockAttempt::NotTried,
        "a fresh entry takes no lock"
    );

    // Stale (fresh for 50 ms, kept 60 s): read and locked in one step.
    let meta =
        EntryMeta::new(Duration::from_millis(50)).stale_while_revalidate(Duration::from_secs(60));
    store
        .set(&space.key("stale"), &codec, &"old".to_string(), &meta)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (found, attempt) = store
        .lookup_or_lock(&space.key("stale"), &codec, ttl)
        .await
        .unwrap();
    let found = found.unwrap();
    assert!(!found.is_fresh());
    assert_eq!(found.value.as_deref(), Some("old"));
    assert!(matches!(attempt, LockAttempt::Taken(_)), "{attempt:?}");

    // A tombstone is a miss: locked.
    store
        .remove_unannounced(&space.key("gone"), Duration::from_secs(60))
        .await
        .unwrap();
    let (found, attempt) = store
        .lookup_or_lock(&space.key("gone"), &codec, ttl)
        .await
        .unwrap();
    assert!(found.is_none());
    assert!(matches!(attempt, LockAttempt::Taken(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_wakes_lock_waiters_only_when_it_breaks_a_lock() {
    let server = RedisServer::start();
    let conn = Connection::connect(server.url()).await.unwrap();
    let store = RedisStore::new(conn.clone());
    let space = KeySpace::new("notices");
    let key = space.key("k");
    let subscriber = l2::Subscriber::connect(&conn).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    subscriber
        .listen(&space.notice_channel(), move |e| {
            if let l2::Event::Message { payload, .. } = e {
                let _ = tx.send(payload.to_vec());
            }
        })
        .await
        .unwrap();
    let bytes = Codec::<String>::new(TAG)
        .encode(&"v".to_string(), &EntryMeta::new(Duration::from_secs(60)))
        .unwrap();
    let none = l2::Announce {
        channel: "",
        message: b"",
    };
    let ttl = Duration::from_secs(60);
    // No lock: nobody can be waiting on one, and no notice is sent (one message less for
    // every node per write).
    store.overwrite(&key, &bytes, ttl, none).await.unwrap();
    store.remove(&key, ttl, none).await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
    assert!(quiet.is_err(), "a notice without a lock: {quiet:?}");
    // A write that breaks a load's lock wakes its waiters; so does a delete.
    for delete in [false, true] {
        store.try_lock(&key, ttl).await.unwrap().unwrap();
        if delete {
            store.remove(&key, ttl, none).await.unwrap();
        } else {
            store.overwrite(&key, &bytes, ttl, none).await.unwrap();
        }
        let woke = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the lock's waiters are woken")
            .unwrap();
        assert_eq!(woke, key.as_str().as_bytes());
    }
}
