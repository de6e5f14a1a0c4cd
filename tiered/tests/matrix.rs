//! The test matrix: the same scenarios against one redis-server and against a six-node Redis
//! Cluster (one cluster for this binary; on it the caches use a least-privilege ACL user made
//! on every node). Each scenario has its own namespace, so they share the servers.
//!
//! Fault tests that stop or restart one server stay single-server (`faults.rs`,
//! `coherence.rs`); killing a cluster master is the `failover` group.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Loads, SOON, Target, eventually};
use testkit::{RedisCluster, RedisServer};
use tiered::EntryOptions;
use tiered::KeySpace;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_single_server() {
    let server = RedisServer::start();
    run_all(&Target::single(server.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_with_a_least_privilege_user() {
    let cluster = RedisCluster::start();
    // ACL users are per node: the same user on all six, allowed the namespaces below.
    let rules: Vec<String> = NAMESPACES
        .iter()
        .map(|ns| KeySpace::new(ns).acl_rules())
        .collect();
    for node in cluster.nodes() {
        let mut args = vec!["ACL", "SETUSER", "cache", "on", ">matrix-pw"];
        let mut patterns = Vec::new();
        for r in &rules {
            // Keys and channels of every namespace; the commands once.
            patterns.extend(
                r.split_whitespace()
                    .filter(|t| t.starts_with('~') || t.starts_with('&')),
            );
        }
        let commands: Vec<&str> = rules[0]
            .split_whitespace()
            .filter(|t| !t.starts_with('~') && !t.starts_with('&'))
            .collect();
        args.extend(commands.iter().take(2)); // resetkeys resetchannels
        args.extend(patterns.iter());
        args.extend(commands.iter().skip(2));
        assert_eq!(node.command(&args), "OK");
    }
    let urls = cluster
        .nodes()
        .iter()
        .take(3)
        .map(|n| format!("redis://cache:matrix-pw@127.0.0.1:{}", n.port()))
        .collect();
    run_all(&Target::cluster(urls)).await;
    for node in cluster.nodes() {
        let denied = common::acl_denials(node);
        assert!(
            denied.iter().all(|o| o == "info"),
            "denied on {}: {denied:?}",
            node.port()
        );
    }
}

const NAMESPACES: [&str; 6] = [
    "m-flight",
    "m-inval",
    "m-batch",
    "m-swr",
    "m-corrupt",
    "m-clear",
];

async fn run_all(target: &Target) {
    let started = Instant::now();
    single_flight_across_nodes(target, NAMESPACES[0]).await;
    writes_reach_every_node(target, NAMESPACES[1]).await;
    batches_span_slots(target, NAMESPACES[2]).await;
    stale_while_revalidate_refreshes_once(target, NAMESPACES[3]).await;
    corrupt_bytes_are_evicted_and_counted(target, NAMESPACES[4]).await;
    clear_reaches_every_master_and_node(target, NAMESPACES[5]).await;
    println!("{}: all scenarios in {:?}", target.name, started.elapsed());
}

/// 2 nodes × 100 callers of a cold key: one load.
async fn single_flight_across_nodes(target: &Target, ns: &str) {
    let a = target.node(ns).await;
    let b = target.node(ns).await;
    let loads = Loads::default();
    let mut calls = Vec::new();
    for i in 0..200 {
        let node = if i % 2 == 0 { a.clone() } else { b.clone() };
        let loader = loads.returning("v", Duration::from_millis(100));
        calls.push(tokio::spawn(async move {
            node.get_or_set("cold", loader).await
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), "v");
    }
    assert_eq!(
        loads.count(),
        1,
        "{}: one load for 200 callers on two nodes",
        target.name
    );
}

/// A write or delete on one node evicts the others' copies.
async fn writes_reach_every_node(target: &Target, ns: &str) {
    let a = target.node(ns).await;
    let b = target.node(ns).await;
    a.set("k", &"v1".to_string()).await.unwrap();
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v1"));
    assert!(b.is_fresh_locally("k"));
    a.set("k", &"v2".to_string()).await.unwrap();
    eventually(SOON, "b hears a's write", || async {
        !b.is_fresh_locally("k")
    })
    .await;
    assert_eq!(b.get("k").await.unwrap().as_deref(), Some("v2"));
    b.invalidate("k").await.unwrap();
    eventually(SOON, "a hears b's delete", || async {
        !a.is_fresh_locally("k")
    })
    .await;
    assert_eq!(a.get("k").await.unwrap(), None);
}

/// A batch over keys on every master: one loader call with exactly the missing keys.
async fn batches_span_slots(target: &Target, ns: &str) {
    let a = target.node(ns).await;
    let b = target.node(ns).await;
    let keys: Vec<String> = (0..30).map(|i| format!("b{i}")).collect();
    let asked = Arc::new(std::sync::Mutex::new(Vec::<Vec<String>>::new()));
    let loader = |asked: Arc<std::sync::Mutex<Vec<Vec<String>>>>| {
        move |missing: Vec<String>| async move {
            asked.lock().unwrap().push(missing.clone());
            Ok::<_, std::io::Error>(
                missing
                    .into_iter()
                    .map(|k| (k.clone(), format!("{k}-loaded")))
                    .collect::<Vec<_>>(),
            )
        }
    };
    let got = a
        .get_or_set_many(&keys, loader(asked.clone()))
        .await
        .unwrap();
    assert_eq!(got.len(), 30);
    assert_eq!(asked.lock().unwrap().len(), 1);
    // Another node: all 30 from L2, ten more missing.
    let mut more = keys.clone();
    more.extend((30..40).map(|i| format!("b{i}")));
    let got = b
        .get_or_set_many(&more, loader(asked.clone()))
        .await
        .unwrap();
    assert_eq!(got.len(), 40);
    assert_eq!(got["b7"], "b7-loaded");
    let calls = asked.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{}: {calls:?}", target.name);
    let mut second = calls[1].clone();
    second.sort();
    let mut expected: Vec<String> = (30..40).map(|i| format!("b{i}")).collect();
    expected.sort();
    assert_eq!(
        second, expected,
        "{}: the loader got exactly the missing keys",
        target.name
    );
}

/// Past its TTL inside the SWR window an entry is served stale at once and refreshed once.
async fn stale_while_revalidate_refreshes_once(target: &Target, ns: &str) {
    let a = target.node(ns).await;
    let b = target.node(ns).await;
    let options = EntryOptions::new(Duration::from_millis(100))
        .stale_while_revalidate(Duration::from_secs(10));
    let loads = Loads::default();
    a.get_or_set_with("s", options, loads.returning("old", Duration::ZERO))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut calls = Vec::new();
    for i in 0..20 {
        let node = if i % 2 == 0 { a.clone() } else { b.clone() };
        let loader = loads.returning("new", Duration::from_millis(50));
        calls.push(tokio::spawn(async move {
            node.get_or_set_with("s", options, loader).await
        }));
    }
    for call in calls {
        assert_eq!(
            call.await.unwrap().unwrap(),
            "old",
            "{}: stale at once",
            target.name
        );
    }
    eventually(SOON, "the refresh ran", || async { loads.count() >= 2 }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        loads.count(),
        2,
        "{}: one refresh for both nodes",
        target.name
    );
    let fresh = b
        .get_or_set_with("s", options, loads.returning("again", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(fresh, "new");
}

/// Foreign bytes in L2: a miss that evicts them and counts, then a normal load.
async fn corrupt_bytes_are_evicted_and_counted(target: &Target, ns: &str) {
    let a = target.node(ns).await;
    let key = KeySpace::new(ns).key("bad");
    let raw = l2::RedisStore::new(a.connection().clone());
    raw.set_bytes(&key, b"not an entry of ours", Duration::from_secs(60))
        .await
        .unwrap();
    let loads = Loads::default();
    let v = a
        .get_or_set("bad", loads.returning("good", Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(v, "good");
    assert_eq!(loads.count(), 1);
    let stats = a.stats().l2;
    assert!(stats.decode_errors >= 1, "{}: {stats:?}", target.name);
    let b = target.node(ns).await;
    assert_eq!(b.get("bad").await.unwrap().as_deref(), Some("good"));
}

/// A namespace clear deletes its keys on every master and drops every node's L1.
async fn clear_reaches_every_master_and_node(target: &Target, ns: &str) {
    let a = target.node(ns).await;
    let b = target.node(ns).await;
    for i in 0..30 {
        a.set(&format!("c{i}"), &format!("v{i}")).await.unwrap();
    }
    for i in 0..30 {
        assert!(b.get(&format!("c{i}")).await.unwrap().is_some());
    }
    let deleted = a.clear().await.unwrap();
    assert!(deleted >= 30, "{}: deleted {deleted}", target.name);
    eventually(SOON, "b hears the clear", || async {
        !b.is_fresh_locally("c0")
    })
    .await;
    for i in 0..30 {
        assert_eq!(
            b.get(&format!("c{i}")).await.unwrap(),
            None,
            "{}",
            target.name
        );
    }
}
