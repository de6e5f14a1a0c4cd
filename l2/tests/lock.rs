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
