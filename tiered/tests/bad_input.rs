//! Bad input at the API is a typed error, never a panic or a silent wrong answer: durations at
//! their extremes (on the builder and per call), keys over the limit on every entry point,
//! hostile envelope durations in Redis, and two value types sharing a namespace.

mod common;

use std::time::Duration;

use common::{builder, node, redis_conn};
use testkit::RedisServer;
use tiered::{EntryOptions, Error, TieredCache};

fn config_error_names(e: &Error, option: &str) {
    match e {
        Error::Config(text) => assert!(text.contains(option), "{option}: {text}"),
        other => panic!("{option}: expected Error::Config, got {other:?}"),
    }
}

#[tokio::test]
async fn extreme_durations_are_config_errors_on_the_builder_and_per_call() {
    let server = RedisServer::start();
    let base = EntryOptions::new(Duration::from_secs(60));
    for (option, opts) in [
        (
            "stale_while_revalidate",
            base.stale_while_revalidate(Duration::MAX),
        ),
        ("fail_safe", base.fail_safe(Duration::MAX)),
        ("time_to_live", base.time_to_live(Duration::MAX)),
        ("hard_timeout", base.hard_timeout(Duration::MAX)),
        ("soft_timeout", base.soft_timeout(Duration::ZERO)),
    ] {
        let built = builder(&server, "bad").default_options(opts).build().await;
        config_error_names(&built.unwrap_err(), option);
    }
    let cache = node(&server, "bad").await;
    for (option, opts) in [
        (
            "stale_while_revalidate",
            base.stale_while_revalidate(Duration::MAX),
        ),
        ("fail_safe", base.fail_safe(Duration::MAX)),
        ("l1_time_to_live", base.l1_time_to_live(Duration::MAX)),
        ("negative_ttl", base.negative_ttl(Duration::MAX)),
    ] {
        let got = cache
            .get_or_set_with("k", opts, || async {
                Ok::<_, std::io::Error>("v".to_string())
            })
            .await;
        config_error_names(&got.unwrap_err(), option);
        config_error_names(&cache.get_with("k", opts).await.unwrap_err(), option);
        config_error_names(
            &cache.set_with("k", &"v".into(), opts).await.unwrap_err(),
            option,
        );
    }
    for (option, b) in [
        (
            "lock_time_to_live",
            builder(&server, "bad").lock_time_to_live(Duration::MAX),
        ),
        (
            "max_load_time",
            builder(&server, "bad").max_load_time(Duration::MAX),
        ),
        ("max_key_len", builder(&server, "bad").max_key_len(0)),
        ("max_key_len", builder(&server, "bad").max_key_len(1 << 20)),
    ] {
        config_error_names(&b.build().await.unwrap_err(), option);
    }
    // The largest accepted values work end to end: no deadline overflows.
    let big = EntryOptions::new(tiered::MAX_OPTION_DURATION)
        .stale_while_revalidate(tiered::MAX_OPTION_DURATION)
        .fail_safe(tiered::MAX_OPTION_DURATION);
    let v = cache
        .get_or_set_with("big", big, || async {
            Ok::<_, std::io::Error>("v".to_string())
        })
        .await
        .unwrap();
    assert_eq!(v, "v");
    assert_eq!(
        cache.get_with("big", big).await.unwrap().as_deref(),
        Some("v")
    );
}

#[tokio::test]
async fn a_key_over_the_limit_is_refused_on_every_entry_point() {
    let server = RedisServer::start();
    let cache: TieredCache<String> = builder(&server, "keys")
        .max_key_len(1024)
        .build()
        .await
        .unwrap();
    let long = "k".repeat(1025);
    let too_long = |e: Error| {
        assert!(
            matches!(
                e,
                Error::KeyTooLong {
                    len: 1025,
                    max: 1024
                }
            ),
            "{e:?}"
        )
    };
    let load = || async { Ok::<_, std::io::Error>("v".to_string()) };
    too_long(cache.get_or_set(&long, load).await.unwrap_err());
    too_long(
        cache
            .get_or_set_with(&long, EntryOptions::new(Duration::from_secs(1)), load)
            .await
            .unwrap_err(),
    );
    too_long(cache.get(&long).await.unwrap_err());
    too_long(cache.set(&long, &"v".into()).await.unwrap_err());
    too_long(cache.invalidate(&long).await.unwrap_err());
    too_long(
        cache
            .get_or_set_many(
                &["ok".to_string(), long.clone()],
                |_keys: Vec<String>| async {
                    Ok::<_, std::io::Error>(Vec::<(String, String)>::new())
                },
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(server.command(&["DBSIZE"]), "0", "nothing was written");
    // At the limit, everything works; the default limit takes 16 KiB keys.
    let at_limit = "k".repeat(1024);
    cache.set(&at_limit, &"v".into()).await.unwrap();
    assert_eq!(cache.get(&at_limit).await.unwrap().as_deref(), Some("v"));
    let default = node(&server, "keys").await;
    let big = "x".repeat(16 * 1024);
    default.set(&big, &"v".into()).await.unwrap();
    assert!(matches!(
        default.get(&"x".repeat(16 * 1024 + 1)).await.unwrap_err(),
        Error::KeyTooLong { .. }
    ));
}

/// Hostile bytes in Redis: an envelope claiming a freshness of u64::MAX milliseconds and no
/// expiry. Reading it never panics (deadlines saturate).
#[tokio::test]
async fn huge_durations_in_redis_bytes_never_panic_a_reader() {
    let server = RedisServer::start();
    let cache = node(&server, "hostile").await;
    cache.set("k", &"v".into()).await.unwrap();
    let key = l2::KeySpace::new("hostile").key("k");
    // fresh-for and stale-for live at offsets 22 and 30 of the header (u64 LE, ms).
    let mut conn = redis_conn(&server).await;
    let bytes: Vec<u8> = redis::cmd("GET")
        .arg(key.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut hostile = bytes.clone();
    hostile[22..30].copy_from_slice(&u64::MAX.to_le_bytes());
    hostile[30..38].copy_from_slice(&u64::MAX.to_le_bytes());
    let _: () = redis::cmd("SET")
        .arg(key.as_str())
        .arg(&hostile)
        .query_async(&mut conn)
        .await
        .unwrap();
    let reader = node(&server, "hostile").await;
    // Whatever it answers (the value, or a typed error), it answers.
    let _ = reader.get("k").await;
    let _ = reader
        .get_or_set("k", || async { Ok::<_, std::io::Error>("w".to_string()) })
        .await;
    let _ = reader.get("k").await;
}

/// Two value types in one namespace: each reads the other's entries as foreign (a miss that
/// evicts and counts), never as its own.
#[tokio::test]
async fn two_value_types_in_one_namespace_never_decode_each_others_bytes() {
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct User {
        id: u64,
        name: String,
    }
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Price {
        id: u64,
        name: String,
    }
    let server = RedisServer::start();
    let users: TieredCache<User> = TieredCache::builder()
        .namespace("shared")
        .redis_url(server.url())
        .build()
        .await
        .unwrap();
    let prices: TieredCache<Price> = TieredCache::builder()
        .namespace("shared")
        .redis_url(server.url())
        .build()
        .await
        .unwrap();
    users
        .set(
            "42",
            &User {
                id: 42,
                name: "alice".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(prices.get("42").await.unwrap(), None, "a User is no Price");
    assert_eq!(
        prices.stats().l2.decode_errors,
        1,
        "counted as foreign bytes"
    );
}
