//! Tier benches, each beside its raw baseline in the same run:
//! - `l1_hit`: `TieredCache::get_or_set` answered by L1 (`tiered`) and `l1::LocalCache::get`
//!   (`ours`) vs a bare `moka::future::Cache::get` of the same value.
//! - `l2_hit`: `TieredCache::get_with` with L1 skipped (`tiered`: single-flighted L2 read) and
//!   `l2::RedisStore::get` (`ours`: one round trip + envelope checks + decode) vs a bare
//!   redis-rs `GET` of the same bytes plus `rmp_serde` decode.
//!
//! `cargo bench -p benches --bench tiers`

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Profile {
    id: u64,
    name: String,
    email: String,
    tags: Vec<String>,
    bio: String,
    scores: Vec<u32>,
}

fn profile() -> Profile {
    Profile {
        id: 42,
        name: "Alice Example".into(),
        email: "alice@example.com".into(),
        tags: (0..8).map(|i| format!("tag-{i}")).collect(),
        bio: "x".repeat(700),
        scores: (0..40).collect(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn l1_hit(c: &mut Criterion) {
    let rt = runtime();
    let keys: Vec<String> = (0..10_000).map(|i| format!("profiles:{{{i}}}")).collect();
    let ours: l1::LocalCache<Profile> = l1::LocalCache::builder().max_bytes(64 << 20).build();
    let bare: moka::future::Cache<String, Arc<Profile>> =
        moka::future::Cache::builder().max_capacity(100_000).build();
    rt.block_on(async {
        for k in &keys {
            let e = l1::Entry::new("profiles", profile())
                .weight(1024)
                .time_to_live(Duration::from_secs(3600));
            ours.insert(k.as_str(), e);
            bare.insert(k.clone(), Arc::new(profile())).await;
        }
    });
    let server = testkit::RedisServer::start();
    let tiered = rt.block_on(async {
        let cache: tiered::TieredCache<Arc<Profile>> = tiered::TieredCache::builder()
            .namespace("profiles")
            .redis_url(server.url())
            .default_options(tiered::EntryOptions::new(Duration::from_secs(3600)))
            .build()
            .await
            .unwrap();
        cache.set(&keys[4242], &Arc::new(profile())).await.unwrap();
        cache
    });
    let key = keys[4242].as_str();
    let mut g = c.benchmark_group("l1_hit");
    g.bench_function("tiered", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                tiered
                    .get_or_set(black_box(key), || async {
                        Err::<Arc<Profile>, _>(std::io::Error::other("not called"))
                    })
                    .await
                    .unwrap(),
            )
        })
    });
    g.bench_function("ours", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(ours.get(black_box(key))) })
    });
    g.bench_function("bare_moka", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(bare.get(black_box(key)).await) })
    });
    g.finish();
}

fn l2_hit(c: &mut Criterion) {
    let rt = runtime();
    let server = testkit::RedisServer::start();
    let codec = l2::Codec::<Profile>::new(l2::TypeTag::from_name("bench.Profile/v1"));
    let key = l2::KeySpace::new("profiles").key("42");
    let (store, raw, bare_key) = rt.block_on(async {
        let store = l2::RedisStore::new(l2::Connection::connect(server.url()).await.unwrap());
        let meta = l2::EntryMeta::new(Duration::from_secs(3600));
        store.set(&key, &codec, &profile(), &meta).await.unwrap();
        let info = redis::IntoConnectionInfo::into_connection_info(server.url().as_str())
            .unwrap()
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let mut raw = redis::Client::open(info)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let bare_key = "bare:profile".to_string();
        let bytes = rmp_serde::to_vec_named(&profile()).unwrap();
        let _: () = redis::cmd("SET")
            .arg(&bare_key)
            .arg(bytes)
            .query_async(&mut raw)
            .await
            .unwrap();
        (store, raw, bare_key)
    });
    let (tiered, skip_l1) = rt.block_on(async {
        let opts = tiered::EntryOptions::new(Duration::from_secs(3600));
        let cache: tiered::TieredCache<Profile> = tiered::TieredCache::builder()
            .namespace("tiered-profiles")
            .redis_url(server.url())
            .default_options(opts)
            .build()
            .await
            .unwrap();
        cache.set("42", &profile()).await.unwrap();
        (cache, opts.skip_l1(true))
    });
    let mut g = c.benchmark_group("l2_hit");
    g.bench_function("tiered", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(tiered.get_with("42", skip_l1).await.unwrap()) })
    });
    g.bench_function("ours", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(store.get(&key, &codec).await.unwrap()) })
    });
    g.bench_function("bare_get_decode", |b| {
        b.to_async(&rt).iter(|| {
            let mut conn = raw.clone();
            let key = bare_key.as_str();
            async move {
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                black_box(rmp_serde::from_slice::<Profile>(&bytes).unwrap())
            }
        })
    });
    g.finish();
}

criterion_group!(benches, l1_hit, l2_hit);
criterion_main!(benches);
