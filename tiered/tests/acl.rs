//! A least-privilege ACL user (`KeySpace::acl_rules`): every feature works with it, Redis
//! denies it nothing but `INFO` (which the bus does without), a user without channel rights
//! gets a clear error at start-up, and passwords appear in no error or `Debug` output.

mod common;

use std::time::Duration;

use common::{Loads, SOON};
use testkit::RedisServer;
use tiered::KeySpace;
use tiered::{EntryOptions, Error, TieredCache};

const PASSWORD: &str = "pw-Zq81-never-printed";

fn create_user(server: &RedisServer, name: &str, rules: &str) {
    let mut args = vec!["ACL", "SETUSER", name, "on"];
    let password = format!(">{PASSWORD}");
    args.push(&password);
    args.extend(rules.split_whitespace());
    assert_eq!(server.command(&args), "OK");
}

fn url(server: &RedisServer, user: &str) -> String {
    format!("redis://{user}:{PASSWORD}@127.0.0.1:{}", server.port())
}

async fn node(server: &RedisServer, user: &str) -> tiered::Result<TieredCache<String>> {
    TieredCache::builder()
        .namespace("acl")
        .redis_url(url(server, user))
        .default_options(EntryOptions::new(Duration::from_secs(60)))
        .build()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_feature_works_for_the_least_privilege_user() {
    let server = RedisServer::start();
    let rules = KeySpace::new("acl").acl_rules();
    create_user(&server, "cache", &rules);
    server.command(&["ACL", "LOG", "RESET"]);
    let a = node(&server, "cache").await.expect("node a");
    let b = node(&server, "cache").await.expect("node b");

    // Read-through with the lock, across two nodes: one load.
    let loads = Loads::default();
    let (x, y) = tokio::join!(
        a.get_or_set("k", loads.returning("v1", Duration::from_millis(50))),
        b.get_or_set("k", loads.returning("v1", Duration::from_millis(50)))
    );
    assert_eq!(
        (x.unwrap(), y.unwrap()),
        ("v1".to_string(), "v1".to_string())
    );
    assert_eq!(loads.count(), 1);

    // A write on a evicts b's copy (pub/sub on its channels).
    a.set("k", &"v2".to_string()).await.unwrap();
    let start = std::time::Instant::now();
    while b.is_fresh_locally("k") {
        assert!(start.elapsed() < SOON, "b never heard the write");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v2"));

    // Batches, delete, clear, SWR refresh.
    let many = a
        .get_or_set_many(&["m1", "m2", "m3"], |keys: Vec<String>| async move {
            Ok::<_, std::io::Error>(
                keys.into_iter()
                    .map(|k| (k.clone(), format!("{k}!")))
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .unwrap();
    assert_eq!(many.len(), 3);
    a.invalidate("k").await.unwrap();
    let start = std::time::Instant::now();
    while b.is_fresh_locally("k") {
        assert!(start.elapsed() < SOON, "b never heard the delete");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(b.get("k").await.unwrap(), None);
    let cleared = a.clear().await.unwrap();
    assert!(cleared >= 3, "cleared {cleared}");
    let swr =
        EntryOptions::new(Duration::from_millis(50)).stale_while_revalidate(Duration::from_secs(5));
    a.get_or_set_with("s", swr, loads.returning("old", Duration::ZERO))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let stale = b
        .get_or_set_with("s", swr, loads.returning("new", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(stale, "old", "served stale while it refreshes");
    assert_eq!(
        a.health().await.status,
        tiered::HealthStatus::Ok,
        "{:?}",
        a.health().await
    );

    // Redis denied this user nothing but INFO (the bus's restart check, which falls back to
    // PING): the rules are complete for what the library sends.
    let denied = common::acl_denials(&server);
    assert!(denied.iter().all(|o| o == "info"), "denied: {denied:?}");
    assert_eq!(a.stats().gaps, 0, "no heartbeat gap from the refused INFO");
}

#[tokio::test]
async fn a_user_without_channel_rights_fails_at_start_up_with_the_rules_it_needs() {
    let server = RedisServer::start();
    // Keys but no channels.
    let rules = KeySpace::new("acl").acl_rules().replace("&acl:*", "");
    create_user(&server, "nochan", &rules);
    let err = node(&server, "nochan")
        .await
        .expect_err("refused at start-up");
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(
        text.contains("subscribe") && text.contains("&acl:*"),
        "{text}"
    );
    assert!(!text.contains(PASSWORD));
}

#[tokio::test]
async fn passwords_appear_in_no_error_or_debug_output() {
    let server = RedisServer::start();
    create_user(&server, "cache", &KeySpace::new("acl").acl_rules());
    // A wrong password: the error chain names the failure, never the URL.
    let wrong = format!("redis://cache:{PASSWORD}x@127.0.0.1:{}", server.port());
    let err = TieredCache::<String>::builder()
        .namespace("acl")
        .redis_url(&wrong)
        .build()
        .await
        .expect_err("wrong password");
    let mut chain = format!("{err} / {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain.push_str(&format!(" / {s} / {s:?}"));
        source = s.source();
    }
    assert!(!chain.contains(PASSWORD), "{chain}");
    println!("wrong password: {chain}");

    let builder = TieredCache::<String>::builder()
        .namespace("acl")
        .redis_url(url(&server, "cache"));
    assert!(!format!("{builder:?}").contains(PASSWORD));
    let cache = builder.build().await.unwrap();
    let shown = format!("{cache:?} {:?} {:?}", cache.connection(), cache.bus());
    assert!(
        !shown.contains(PASSWORD) && !shown.contains("cache:"),
        "{shown}"
    );
}
