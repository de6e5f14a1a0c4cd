//! Faults: a stopped Redis gives timeouts within the bound; a restarted one is used again.

use std::time::{Duration, Instant};

use l2::{Codec, Connection, EntryMeta, Error, KeySpace, RedisStore, TypeTag};
use testkit::RedisServer;

const TIMEOUT: Duration = Duration::from_millis(100);
const SLACK: Duration = Duration::from_millis(50);

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::new(
        Connection::builder(server.url())
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_millis(200))
            .connect()
            .await
            .unwrap(),
    )
}

async fn assert_times_out<T: std::fmt::Debug>(
    name: &str,
    fut: impl std::future::Future<Output = l2::Result<T>>,
) {
    let start = Instant::now();
    let result = fut.await;
    let took = start.elapsed();
    match result {
        Err(e @ Error::Timeout { .. }) => assert!(e.is_unavailable()),
        other => panic!("{name}: expected a timeout, got {other:?}"),
    }
    assert!(took <= TIMEOUT + SLACK, "{name} took {took:?}");
}

/// Writes `value` until Redis answers again (at most 10 s), checking that every failed attempt
/// is an "unavailable" error that came back within the command timeout.
async fn write_until_recovered(
    store: &RedisStore,
    key: &l2::Key,
    codec: &Codec<String>,
    value: &str,
    meta: &EntryMeta,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut failures = 0;
    loop {
        let start = Instant::now();
        match store.set(key, codec, &value.to_string(), meta).await {
            Ok(_) => return,
            Err(e) => {
                assert!(e.is_unavailable(), "unexpected error kind: {e:?}");
                assert!(
                    start.elapsed() <= TIMEOUT + SLACK,
                    "a failing call took {:?}",
                    start.elapsed()
                );
                failures += 1;
                assert!(
                    Instant::now() < deadline,
                    "no reconnect within 10 s ({failures} failures)"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_gives_timeouts_within_the_bound() {
    let mut server = RedisServer::start();
    let store = store(&server).await;
    let codec = Codec::<String>::new(TypeTag::from_name("faults.String"));
    let space = KeySpace::new("faults");
    let key = space.key("k");
    let meta = EntryMeta::new(Duration::from_secs(60));
    store
        .set(&key, &codec, &"v".to_string(), &meta)
        .await
        .unwrap();
    let lock = store
        .try_lock(&space.key("l"), Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();

    server.pause();
    let value = "v".to_string();
    assert_times_out("ping", store.connection().ping()).await;
    assert_times_out("get", store.get(&key, &codec)).await;
    assert_times_out("set", store.set(&key, &codec, &value, &meta)).await;
    assert_times_out("delete", store.delete(&key)).await;
    assert_times_out(
        "get_many",
        store.get_many(&[key.clone(), space.key("x")], &codec),
    )
    .await;
    assert_times_out(
        "set_many",
        store.set_many(&[(key.clone(), value.clone())], &codec, &meta),
    )
    .await;
    assert_times_out(
        "try_lock",
        store.try_lock(&space.key("m"), Duration::from_secs(1)),
    )
    .await;
    assert_times_out("extend", store.extend_lock(&lock, Duration::from_secs(1))).await;
    assert_times_out(
        "set_if_locked",
        store.set_if_locked(&lock, &codec, &value, &meta),
    )
    .await;
    assert_times_out("unlock", store.unlock(&lock)).await;
    assert_times_out("clear", store.clear(&space)).await;
    assert!(store.stats().timeouts >= 10);

    server.resume();
    // Replies to the timed-out commands arrive and are discarded; new commands work.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store.get(&key, &codec).await {
            Ok(v) => {
                assert_eq!(v.unwrap().value, "v");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                assert!(e.is_unavailable(), "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("still failing after resume: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_is_used_again_after_reconnect() {
    let mut server = RedisServer::start();
    let store = store(&server).await;
    let codec = Codec::<String>::new(TypeTag::from_name("faults.String"));
    let key = KeySpace::new("faults").key("k");
    let meta = EntryMeta::new(Duration::from_secs(60));
    store
        .set(&key, &codec, &"before".to_string(), &meta)
        .await
        .unwrap();

    server.restart();
    write_until_recovered(&store, &key, &codec, "after", &meta).await;
    assert_eq!(
        store.get(&key, &codec).await.unwrap().unwrap().value,
        "after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_outlasts_the_reconnect_retries_and_still_recovers() {
    let mut server = RedisServer::start();
    let store = store(&server).await;
    let codec = Codec::<String>::new(TypeTag::from_name("faults.String"));
    let key = KeySpace::new("faults").key("k");
    let meta = EntryMeta::new(Duration::from_secs(60));

    server.kill();
    // Keep calling while Redis is down, well past the connection manager's own retries.
    let down_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < down_until {
        let start = Instant::now();
        let err = store.get(&key, &codec).await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
        assert!(
            start.elapsed() <= TIMEOUT + SLACK,
            "a failing call took {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.restart();
    write_until_recovered(&store, &key, &codec, "back", &meta).await;
    assert_eq!(
        store.get(&key, &codec).await.unwrap().unwrap().value,
        "back"
    );
}

#[tokio::test]
async fn an_unreachable_redis_fails_to_connect_within_a_bound() {
    let port = testkit::free_port();
    let start = Instant::now();
    let err = Connection::builder(format!("redis://127.0.0.1:{port}"))
        .connect_timeout(Duration::from_millis(200))
        .connect()
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_bad_url_is_a_config_error_without_the_password() {
    let err = Connection::connect("redis://user:hunter2@[::1")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("hunter2"));
}
