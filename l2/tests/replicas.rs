//! `replica_acks`: a write waits (`WAIT`, in the write's own pipeline) until a replica has
//! it, and fails with `NotReplicated` — not a timeout, not an outage — when none confirms it.

use std::time::{Duration, Instant};

use l2::{Codec, Connection, EntryMeta, Error, KeySpace, RedisStore, TypeTag};
use testkit::RedisServer;

#[tokio::test]
async fn writes_wait_for_a_replica_and_fail_typed_without_one() {
    // No 5 s wait before the replica's initial sync.
    let master = RedisServer::start_with_args(&["--repl-diskless-sync-delay", "0"]);
    let store = RedisStore::new(
        Connection::builder(master.url())
            .replica_acks(1, Duration::from_millis(50))
            .connect()
            .await
            .unwrap(),
    );
    let codec = Codec::<String>::new(TypeTag::from_name("replicas.String/v1"));
    let meta = EntryMeta::new(Duration::from_secs(60));
    let space = KeySpace::new("replicas");
    let key = space.key("k");
    let bytes = codec.encode(&"v1".to_string(), &meta).unwrap();

    // No replica: the script ran (the value is on the master), the write is not confirmed.
    let err = store
        .overwrite_unannounced(&key, &bytes, Duration::from_secs(60))
        .await
        .expect_err("no replica to confirm it");
    assert!(
        matches!(
            err,
            Error::NotReplicated {
                acked: 0,
                wanted: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_unavailable(), "reads still work: not an outage");
    assert_eq!(store.get(&key, &codec).await.unwrap().unwrap().value, "v1");

    // A replica joins: every kind of write is confirmed, and the replica has them. Ready
    // means it acknowledges the master's offset (`WAIT`), not only `state=online`: a replica
    // still loading the snapshot is online to its master but answers no `GETACK` yet.
    let replica =
        RedisServer::start_with_args(&["--replicaof", "127.0.0.1", &master.port().to_string()]);
    let start = Instant::now();
    while master.command(&["WAIT", "1", "100"]) != "1" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the replica never acknowledged: {}",
            master.command(&["INFO", "replication"])
        );
    }
    // The confirming half waits long enough for a loaded two-core machine: the 50 ms above
    // was only there to fail fast.
    let store = RedisStore::new(
        Connection::builder(master.url())
            .timeout(Duration::from_secs(3))
            .replica_acks(1, Duration::from_secs(2))
            .connect()
            .await
            .unwrap(),
    );
    let bytes = codec.encode(&"v2".to_string(), &meta).unwrap();
    store
        .overwrite_unannounced(&key, &bytes, Duration::from_secs(60))
        .await
        .unwrap();
    store
        .set(&space.key("plain"), &codec, &"p".to_string(), &meta)
        .await
        .unwrap();
    let items: Vec<(l2::Key, String)> = (0..5)
        .map(|i| (space.key(&format!("m{i}")), format!("m{i}")))
        .collect();
    store.set_many(&items, &codec, &meta).await.unwrap();
    let lock = store
        .try_lock(&space.key("locked"), Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let loaded = codec.encode(&"loaded".to_string(), &meta).unwrap();
    assert!(
        store
            .complete_lock(&lock, &loaded, Duration::from_secs(60))
            .await
            .unwrap()
            .is_some()
    );
    store
        .remove_unannounced(&space.key("plain"), Duration::from_secs(1))
        .await
        .unwrap();
    // Confirmed means on the replica now, not eventually.
    let on_replica = replica.command(&["GET", space.key("m4").as_str()]);
    assert!(
        !on_replica.is_empty() && !on_replica.starts_with("ERR"),
        "{on_replica}"
    );
    let on_replica = replica.command(&["STRLEN", space.key("locked").as_str()]);
    assert_ne!(on_replica, "0");

    // The replica timeout must stay below the command timeout.
    let err = Connection::builder(master.url())
        .timeout(Duration::from_millis(250))
        .replica_acks(1, Duration::from_millis(250))
        .connect()
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
}
