//! A fixed workload for instruction-count profiles of the hit paths (callgrind counts do not
//! move with machine noise):
//!
//! ```text
//! cargo build --release -p benches --example profile_hits
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.l1 target/release/examples/profile_hits l1
//! callgrind_annotate /tmp/cg.l1 | head -40
//! ```
//!
//! Modes: `l1` (TieredCache L1 hits), `moka` (bare moka future get), `l2` (TieredCache L2 reads),
//! `bare-l2` (bare redis-rs GET + decode), `setup` (none: subtract it). Each runs 100,000 (L1)
//! or 2,000 (L2) operations.

#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use benches::{Profile, profile};

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "l1".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = testkit::RedisServer::start();
    rt.block_on(async {
        let opts = tiered::EntryOptions::new(Duration::from_secs(3600));
        let cache: tiered::TieredCache<Arc<Profile>> = tiered::TieredCache::builder()
            .namespace("p")
            .redis_url(server.url())
            .default_options(opts)
            .build()
            .await
            .unwrap();
        cache.set("k", &Arc::new(profile())).await.unwrap();
        match mode.as_str() {
            "l1" => {
                for _ in 0..100_000 {
                    black_box(
                        cache
                            .get_or_set("k", || async {
                                Err::<Arc<Profile>, _>(std::io::Error::other("no"))
                            })
                            .await
                            .unwrap(),
                    );
                }
            }
            "moka" => {
                let bare: moka::future::Cache<String, Arc<Profile>> =
                    moka::future::Cache::builder().max_capacity(1000).build();
                bare.insert("k".into(), Arc::new(profile())).await;
                for _ in 0..100_000 {
                    black_box(bare.get("k").await);
                }
            }
            "l2" => {
                let skip = opts.skip_l1(true);
                for _ in 0..2_000 {
                    black_box(cache.get_with("k", skip).await.unwrap());
                }
            }
            "bare-l2" => {
                let mut conn = redis::Client::open(server.url())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let bytes = rmp_serde::to_vec_named(&profile()).unwrap();
                let _: () = redis::cmd("SET")
                    .arg("bare")
                    .arg(bytes)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                for _ in 0..2_000 {
                    let b: Vec<u8> = redis::cmd("GET")
                        .arg("bare")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    black_box(rmp_serde::from_slice::<Profile>(&b).unwrap());
                }
            }
            "setup" => {}
            other => panic!("unknown mode {other}"),
        }
    });
}
