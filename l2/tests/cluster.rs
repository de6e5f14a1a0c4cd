//! The Redis tier on a real six-node Redis Cluster (one cluster for this whole binary): every
//! store, lock and script call, batches across slots, clears across masters, and a
//! subscriber that moves to another node when its node dies.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use l2::{Codec, Connection, EntryMeta, Event, KeySpace, RedisStore, Subscriber, TypeTag};
use testkit::RedisCluster;

const TAG: TypeTag = TypeTag::from_name("l2-cluster.String/v1");

fn codec() -> Codec<String> {
    Codec::new(TAG)
}

fn meta() -> EntryMeta {
    EntryMeta::new(Duration::from_secs(30))
}

async fn store(cluster: &RedisCluster) -> RedisStore {
    // Two seeds: the first may be the node a test kills.
    let conn = Connection::cluster(cluster.urls().into_iter().take(2))
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect to the cluster");
    assert!(conn.is_cluster());
    RedisStore::new(conn)
}

/// Keys of `space` whose slots are on all three masters.
fn keys_on_every_master(cluster: &RedisCluster, space: &KeySpace, n: usize) -> Vec<l2::Key> {
    let keys: Vec<l2::Key> = (0..n).map(|i| space.key(&format!("k{i}"))).collect();
    let mut masters: Vec<usize> = keys.iter().map(|k| cluster.master_of(k.as_str())).collect();
    masters.sort_unstable();
    masters.dedup();
    assert_eq!(masters.len(), 3, "{n} keys should cover the three masters");
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_l2_operation_works_on_a_cluster() {
    let mut cluster = RedisCluster::start();
    let store = store(&cluster).await;
    let codec = codec();
    let space = KeySpace::new("l2c");

    // Single keys: set, get, delete.
    let one = space.key("one");
    store
        .set(&one, &codec, &"v1".to_string(), &meta())
        .await
        .unwrap();
    let hit = store.get(&one, &codec).await.unwrap().expect("a hit");
    assert_eq!(hit.value, "v1");
    assert!(store.delete(&one).await.unwrap());
    assert!(store.get(&one, &codec).await.unwrap().is_none());

    // Batches across slots: set_many, get_many keep their order.
    let keys = keys_on_every_master(&cluster, &space, 30);
    let items: Vec<(l2::Key, String)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), format!("value-{i}")))
        .collect();
    store.set_many(&items, &codec, &meta()).await.unwrap();
    let mut asked: Vec<l2::Key> = keys.clone();
    asked.insert(7, space.key("missing"));
    let got = store.get_many(&asked, &codec).await.unwrap();
    assert_eq!(got.len(), asked.len());
    for (key, hit) in asked.iter().zip(&got) {
        if key.as_str().contains("missing") {
            assert!(hit.is_none());
        } else {
            let i: usize = key
                .as_str()
                .rsplit('k')
                .next()
                .unwrap()
                .trim_end_matches('}')
                .parse()
                .unwrap();
            assert_eq!(hit.as_ref().unwrap().value, format!("value-{i}"), "{key:?}");
        }
    }

    // The lock and its scripts: try, conditional write, release; many at once across slots.
    let locked = space.key("locked");
    let lock = store
        .try_lock(&locked, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .try_lock(&locked, Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .extend_lock(&lock, Duration::from_secs(5))
            .await
            .unwrap()
    );
    assert!(
        store
            .set_if_locked(&lock, &codec, &"loaded".to_string(), &meta())
            .await
            .unwrap()
    );
    assert_eq!(
        store.get(&locked, &codec).await.unwrap().unwrap().value,
        "loaded"
    );
    store.unlock(&lock).await.unwrap();
    let many = store
        .try_lock_many(&keys, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(many.iter().all(Option::is_some));
    let again = store
        .try_lock_many(&keys, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(again.iter().all(Option::is_none), "the locks are held");
    let held: Vec<l2::Lock> = many.into_iter().flatten().collect();
    store.unlock_many(&held).await.unwrap();
    let retaken = store
        .try_lock_many(&keys, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        retaken.iter().all(Option::is_some),
        "unlock_many freed every slot's lock"
    );
    let held: Vec<l2::Lock> = retaken.into_iter().flatten().collect();
    store.unlock_many(&held).await.unwrap();

    // A namespace clear reaches every master, and only the namespace.
    let other = KeySpace::new("l2c-other");
    store
        .set(&other.key("stays"), &codec, &"x".to_string(), &meta())
        .await
        .unwrap();
    let deleted = store.clear(&space).await.unwrap();
    assert!(deleted >= keys.len() as u64, "deleted {deleted}");
    assert!(
        store
            .get_many(&keys, &codec)
            .await
            .unwrap()
            .iter()
            .all(Option::is_none)
    );
    assert!(
        store
            .get(&other.key("stays"), &codec)
            .await
            .unwrap()
            .is_some()
    );

    // Pub/sub: a message published through the cluster connection reaches a subscriber on
    // whichever node it sits.
    let subscriber = Subscriber::connect(store.connection()).await.unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let events = Arc::clone(&seen);
    subscriber
        .listen("l2c:chan", move |e| {
            let text = match e {
                Event::Message { payload, .. } => String::from_utf8_lossy(payload).into_owned(),
                Event::Subscribed { .. } => "<subscribed>".into(),
                Event::Disconnected => "<disconnected>".into(),
                _ => "<other>".into(),
            };
            events.lock().unwrap().push(text);
        })
        .await
        .unwrap();
    store.publish("l2c:chan", b"hello").await.unwrap();
    wait_for(&seen, "hello", Duration::from_secs(2)).await;

    // A probe round: published through each of the three masters, back through pub/sub.
    let unready = subscriber.probe("l2c:probe", Duration::from_secs(1)).await;
    assert!(matches!(unready, Err(l2::Error::Config(_))), "{unready:?}");
    subscriber.listen_for_probes("l2c:probe").await.unwrap();
    let took = subscriber
        .probe("l2c:probe", Duration::from_secs(2))
        .await
        .unwrap();
    println!("a probe round through the three masters took {took:?}");

    // Kill the node the subscriber sits on (the first seed; the store's second seed stays):
    // the subscriber reports the disconnect, moves to another node and hears again.
    let before = subscriber.moves();
    let victim = 0;
    let started = Instant::now();
    cluster.nodes_mut()[victim].kill();
    wait_for(&seen, "<disconnected>", Duration::from_secs(5)).await;
    // Publishing may fail while the cluster fails over; that is the caller's to bear.
    let n = publish_until_heard(&store, &seen, "after", started).await;
    assert!(subscriber.moves() > before);
    println!(
        "subscriber heard again {:?} after its node was killed ({} publishes)",
        started.elapsed(),
        n
    );
    let log = seen.lock().unwrap().clone();
    let disconnected = log.iter().position(|e| e == "<disconnected>").unwrap();
    assert!(
        log[disconnected..].iter().any(|e| e == "<subscribed>"),
        "a resubscription follows the disconnect: {log:?}"
    );

    // A dead first seed: the connection and the subscriber use the next one.
    let seeds = vec![cluster.nodes()[0].url(), cluster.nodes()[1].url()];
    let conn = Connection::cluster(seeds)
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("the second seed answers");
    let second = Subscriber::connect(&conn)
        .await
        .expect("subscribes on the second seed");
    let heard: Arc<Mutex<Vec<String>>> = Arc::default();
    let sink = Arc::clone(&heard);
    second
        .listen("l2c:chan", move |e| {
            if let Event::Message { payload, .. } = e {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(payload).into_owned());
            }
        })
        .await
        .unwrap();
    store.publish("l2c:chan", b"via-second").await.unwrap();
    wait_for(&heard, "via-second", Duration::from_secs(2)).await;

    // A hung node (SIGSTOP) sends no disconnect: two failed heartbeats move the subscriber.
    cluster.nodes_mut()[1].pause();
    let started = Instant::now();
    for _ in 0..2 {
        assert!(second.run_id(Duration::from_millis(200)).await.is_err());
    }
    while second.moves() == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "never moved");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "subscriber left a hung node {:?} after its first failed heartbeat",
        started.elapsed()
    );
    let n = publish_until_heard(&store, &heard, "after-pause", started).await;
    // Publishes through the cluster connection may time out on the hung node meanwhile.
    println!(
        "and heard again after {:?} ({n} publishes)",
        started.elapsed()
    );
    assert_eq!(second.moves(), 1);
    cluster.nodes_mut()[1].resume();
}

/// Publishes `prefix-1`, `prefix-2`, ... on `l2c:chan` every 50 ms until one is heard
/// (within 15 s of `started`); returns how many it took.
async fn publish_until_heard(
    store: &RedisStore,
    heard: &Arc<Mutex<Vec<String>>>,
    prefix: &str,
    started: Instant,
) -> usize {
    for n in 1.. {
        let text = format!("{prefix}-{n}");
        let _ = store.publish("l2c:chan", text.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if heard.lock().unwrap().contains(&text) {
            return n;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{prefix}: never heard: {:?}",
            heard.lock().unwrap()
        );
    }
    unreachable!("1.. does not end")
}

async fn wait_for(seen: &Arc<Mutex<Vec<String>>>, what: &str, within: Duration) {
    testkit::eventually(within, &format!("{what:?} among the events"), || async {
        seen.lock().unwrap().iter().any(|e| e == what)
    })
    .await;
}
