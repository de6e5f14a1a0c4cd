//! The Redis tier against a real redis-server: round trips, TTLs, batches, bad bytes, sizes.

use std::time::Duration;

use l2::{Codec, Connection, DecodeError, EntryMeta, Error, KeySpace, RedisStore, TypeTag};
use serde::{Deserialize, Serialize};
use testkit::RedisServer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Price {
    cents: u64,
    currency: String,
}

const USER: TypeTag = TypeTag::from_name("l2-tests.User/v1");
const PRICE: TypeTag = TypeTag::from_name("l2-tests.Price/v1");

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::new(Connection::connect(server.url()).await.unwrap())
}

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn user(id: u64) -> User {
    User {
        id,
        name: format!("user-{id}"),
    }
}

fn meta() -> EntryMeta {
    EntryMeta::new(Duration::from_secs(10))
        .stale_while_revalidate(Duration::from_secs(5))
        .write_version(3)
}

fn commandstat(server: &RedisServer, command: &str) -> u64 {
    let info = server.command(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map(|n| n.parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test]
async fn typed_round_trip_sets_the_ttl_in_redis() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let codec = Codec::<User>::new(USER);
    let key = KeySpace::new("users").key("42");

    assert_eq!(store.get(&key, &codec).await.unwrap(), None);
    let size = store.set(&key, &codec, &user(42), &meta()).await.unwrap();
    let got = store.get(&key, &codec).await.unwrap().unwrap();
    assert_eq!(got.value, user(42));
    assert_eq!(got.meta, meta());
    assert_eq!(got.size, size);
    assert!(got.is_fresh());
    assert!(got.age() < Duration::from_secs(2));

    let pttl: i64 = server.command(&["PTTL", key.as_str()]).parse().unwrap();
    assert!(
        (13_000..=15_000).contains(&pttl),
        "PTTL {pttl}: the Redis TTL must be fresh + stale"
    );

    assert!(store.delete(&key).await.unwrap());
    assert!(!store.delete(&key).await.unwrap());
    assert_eq!(store.get(&key, &codec).await.unwrap(), None);
    let stats = store.stats();
    assert_eq!((stats.hits, stats.misses), (1, 2));
}

#[tokio::test]
async fn freshness_comes_from_the_remaining_life_in_redis() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let codec = Codec::<User>::new(USER);
    let key = KeySpace::new("users").key("swr");
    let meta =
        EntryMeta::new(Duration::from_millis(100)).stale_while_revalidate(Duration::from_secs(10));
    store.set(&key, &codec, &user(1), &meta).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let got = store.get(&key, &codec).await.unwrap().unwrap();
    assert!(
        !got.is_fresh(),
        "past fresh_for the entry is stale: {got:?}"
    );
    assert!(got.age() >= Duration::from_millis(200));
}

#[tokio::test]
async fn batches_are_one_round_trip() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let codec = Codec::<User>::new(USER);
    let space = KeySpace::new("users");
    let items: Vec<_> = (0..10)
        .map(|i| (space.key(&i.to_string()), user(i)))
        .collect();

    let sets_before = commandstat(&server, "set");
    store.set_many(&items, &codec, &meta()).await.unwrap();
    assert_eq!(commandstat(&server, "set") - sets_before, 10);

    let mut keys: Vec<_> = items.iter().map(|(k, _)| k.clone()).collect();
    keys.push(space.key("missing-1"));
    keys.push(space.key("missing-2"));
    let execs_before = commandstat(&server, "exec");
    let got = store.get_many(&keys, &codec).await.unwrap();
    assert_eq!(
        commandstat(&server, "exec") - execs_before,
        1,
        "one atomic pipeline"
    );
    assert_eq!(got.len(), 12);
    for (i, slot) in got.iter().take(10).enumerate() {
        assert_eq!(slot.as_ref().unwrap().value, user(i as u64));
    }
    assert!(got[10].is_none() && got[11].is_none());
    let pttl: i64 = server.command(&["PTTL", keys[3].as_str()]).parse().unwrap();
    assert!(pttl > 13_000);
}

/// Writes bytes at `key` with a raw connection.
async fn put_raw(conn: &mut redis::aio::MultiplexedConnection, key: &str, bytes: &[u8]) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(bytes)
        .arg("PX")
        .arg(60_000)
        .query_async(conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_bytes_are_typed_errors_that_evict_and_count() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let mut conn = raw(&server).await;
    let codec = Codec::<User>::new(USER);
    let good = codec.encode(&user(1), &meta()).unwrap();
    let price = Codec::<Price>::new(PRICE)
        .encode(
            &Price {
                cents: 1,
                currency: "user-1".into(),
            },
            &meta(),
        )
        .unwrap();
    let mut bad_version = good.clone();
    bad_version[4] = 99;
    let mut corrupt_payload = good.clone();
    let n = corrupt_payload.len();
    corrupt_payload[l2::HEADER_LEN..n].fill(0xc1); // 0xc1 is never valid MessagePack

    type Check = fn(&DecodeError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        ("foreign", b"{\"id\":1}".to_vec(), |e| {
            matches!(e, DecodeError::BadMagic)
        }),
        ("empty", Vec::new(), |e| matches!(e, DecodeError::BadMagic)),
        ("truncated", good[..good.len() - 3].to_vec(), |e| {
            matches!(e, DecodeError::Truncated { .. })
        }),
        ("wrong type", price, |e| {
            matches!(e, DecodeError::WrongType { .. })
        }),
        ("bad version", bad_version, |e| {
            matches!(e, DecodeError::UnsupportedVersion(99))
        }),
        ("corrupt payload", corrupt_payload, |e| {
            matches!(e, DecodeError::Payload(_))
        }),
    ];
    let space = KeySpace::new("users");
    for (i, (name, bytes, expected)) in cases.iter().enumerate() {
        let key = space.key(name);
        put_raw(&mut conn, key.as_str(), bytes).await;
        match store.get(&key, &codec).await {
            Err(Error::Decode { source, .. }) => {
                assert!(expected(&source), "{name}: wrong error {source:?}")
            }
            other => panic!("{name}: expected a decode error, got {other:?}"),
        }
        assert_eq!(
            server.command(&["EXISTS", key.as_str()]),
            "0",
            "{name}: not evicted"
        );
        let stats = store.stats();
        assert_eq!(stats.decode_errors, i as u64 + 1, "{name}");
        assert_eq!(stats.evicted_corrupt, i as u64 + 1, "{name}");
    }

    // In a batch, bad bytes read as a miss (and are evicted) without failing the others.
    put_raw(&mut conn, space.key("bad").as_str(), b"garbage").await;
    store
        .set(&space.key("fine"), &codec, &user(2), &meta())
        .await
        .unwrap();
    let got = store
        .get_many(&[space.key("bad"), space.key("fine")], &codec)
        .await
        .unwrap();
    assert!(got[0].is_none());
    assert_eq!(got[1].as_ref().unwrap().value, user(2));
    assert_eq!(server.command(&["EXISTS", space.key("bad").as_str()]), "0");
}

#[tokio::test]
async fn cleanup_never_deletes_a_newer_write() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let mut conn = raw(&server).await;
    let codec = Codec::<User>::new(USER);
    let key = KeySpace::new("users").key("race");
    let bad = b"not an entry".to_vec();
    put_raw(&mut conn, key.as_str(), &bad).await;
    // A fresh write lands between the bad read and its cleanup.
    store.set(&key, &codec, &user(5), &meta()).await.unwrap();
    assert!(!store.delete_if_unchanged(&key, &bad).await.unwrap());
    assert_eq!(
        store.get(&key, &codec).await.unwrap().unwrap().value,
        user(5)
    );
    // And with the bad bytes still there, it does delete.
    put_raw(&mut conn, key.as_str(), &bad).await;
    assert!(store.delete_if_unchanged(&key, &bad).await.unwrap());
}

#[tokio::test]
async fn non_string_values_are_decode_errors_and_left_alone() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let key = KeySpace::new("users").key("list");
    server.command(&["RPUSH", key.as_str(), "a"]);
    let err = store
        .get(&key, &Codec::<User>::new(USER))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Decode {
                source: DecodeError::NotAString,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(server.command(&["EXISTS", key.as_str()]), "1");
}

#[tokio::test]
async fn oversized_values_are_refused_on_write_and_missed_on_read() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let small = Codec::<Vec<u8>>::new(TypeTag::from_name("blob")).max_size(1000);
    let big = Codec::<Vec<u8>>::new(TypeTag::from_name("blob")).max_size(1 << 20);
    let key = KeySpace::new("blobs").key("b");
    let value = vec![7u8; 5000];

    let err = store.set(&key, &small, &value, &meta()).await.unwrap_err();
    assert!(matches!(err, Error::TooLarge { max: 1000, .. }), "{err:?}");
    assert_eq!(server.command(&["EXISTS", key.as_str()]), "0");

    // Written by a node with a larger limit: this reader neither downloads nor deletes it.
    store.set(&key, &big, &value, &meta()).await.unwrap();
    assert_eq!(store.get(&key, &small).await.unwrap(), None);
    assert_eq!(store.stats().oversized_reads, 1);
    assert_eq!(server.command(&["EXISTS", key.as_str()]), "1");
    assert_eq!(store.get(&key, &big).await.unwrap().unwrap().value, value);
}

#[tokio::test]
async fn clearing_a_namespace_touches_only_it() {
    let server = RedisServer::start();
    let store = store(&server).await;
    let codec = Codec::<User>::new(USER);
    let names = ["a", "a*", "a?", "a[b]", "a:b", "ab", "a\\"];
    for ns in names {
        let space = KeySpace::new(ns);
        for i in 0..50 {
            store
                .set(&space.key(&i.to_string()), &codec, &user(i), &meta())
                .await
                .unwrap();
        }
    }
    for victim in ["a*", "a", "a[b]", "a\\"] {
        let deleted = store.clear(&KeySpace::new(victim)).await.unwrap();
        assert_eq!(deleted, 50, "clearing {victim:?}");
        for ns in names {
            let present = store
                .get(&KeySpace::new(ns).key("7"), &codec)
                .await
                .unwrap()
                .is_some();
            let cleared = ["a*", "a", "a[b]", "a\\"]
                .iter()
                .take_while(|v| **v != victim)
                .chain(std::iter::once(&victim))
                .any(|v| *v == ns);
            assert_eq!(
                present, !cleared,
                "after clearing {victim:?}, {ns:?} present={present}"
            );
        }
    }
    assert_eq!(
        commandstat(&server, "keys"),
        0,
        "clears must never use KEYS"
    );
}
