//! Behaviour of the L1 tier: per-entry deadlines, the byte budget, namespaces, counters.

use std::time::Duration;

use l1::{Entry, LocalCache};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn per_entry_time_to_live_is_honored() {
    rt().block_on(async {
        let cache: LocalCache<u32> = LocalCache::builder().build();
        let short = Entry::new("ns", 1).time_to_live(Duration::from_millis(100));
        let long = Entry::new("ns", 2).time_to_live(Duration::from_secs(30));
        cache.insert("short", short);
        cache.insert("long", long);
        assert_eq!(*cache.get("short").unwrap().value(), 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(cache.get("short").is_none(), "short entry outlived its TTL");
        assert_eq!(*cache.get("long").unwrap().value(), 2);
        // moka's timer wheel removes expired entries (and tells the listener) at ~1 s
        // granularity: poll, bounded.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cache.stats().expired == 0 && std::time::Instant::now() < deadline {
            cache.run_pending_tasks();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(cache.stats().expired, 1);
    });
}

#[test]
fn freshness_window_inside_the_lifetime() {
    rt().block_on(async {
        let cache: LocalCache<u32> = LocalCache::builder().build();
        let e = Entry::new("ns", 7)
            .time_to_live(Duration::from_secs(30))
            .fresh_for(Duration::from_millis(50));
        cache.insert("k", e);
        assert!(cache.get("k").unwrap().is_fresh());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let hit = cache
            .get("k")
            .expect("stale entries stay until their deadline");
        assert!(!hit.is_fresh());
    });
}

#[test]
fn byte_budget_holds_after_ten_times_the_budget() {
    rt().block_on(async {
        // Room for 100 entries of a 1 KiB value, a key and the per-entry overhead.
        let budget = 100 * (1024 + 8 + u64::from(l1::ENTRY_OVERHEAD));
        let cache: LocalCache<Vec<u8>> = LocalCache::builder().max_bytes(budget).build();
        for i in 0..1000 {
            let value = vec![0u8; 1024];
            let e = Entry::new("ns", value).weight(1024);
            cache.insert(format!("key-{i}"), e);
        }
        cache.run_pending_tasks();
        let stats = cache.stats();
        assert!(
            stats.weighted_size <= budget,
            "weighted size {} over budget {budget}",
            stats.weighted_size
        );
        assert!(stats.evicted_size > 0, "nothing was evicted: {stats:?}");
        assert!(stats.entry_count <= 100);
    });
}

#[test]
fn weight_survives_and_counts_key_value_and_overhead() {
    rt().block_on(async {
        let cache: LocalCache<String> = LocalCache::builder().build();
        cache.insert("abcd", Entry::new("ns", "x".to_string()).weight(96));
        cache.run_pending_tasks();
        assert_eq!(cache.get("abcd").unwrap().weight_bytes(), 96);
        assert_eq!(cache.weighted_size(), 100 + u64::from(l1::ENTRY_OVERHEAD));
    });
}

#[test]
fn entry_bound_applies_with_the_byte_budget() {
    rt().block_on(async {
        let cache: LocalCache<u8> = LocalCache::builder()
            .max_bytes(1 << 20)
            .max_entries(50)
            .build();
        for i in 0..500 {
            cache.insert(format!("k{i}"), Entry::new("ns", 0).weight(1));
        }
        cache.run_pending_tasks();
        assert!(cache.entry_count() <= 50, "{} entries", cache.entry_count());
    });
}

#[test]
fn namespace_invalidation_is_exact_even_with_glob_characters() {
    rt().block_on(async {
        let cache: LocalCache<u32> = LocalCache::builder().build();
        let namespaces = ["a", "a*", "a?", "a[", "a:b", "a:", "*", "ab"];
        for (i, ns) in namespaces.iter().enumerate() {
            cache.insert(format!("{ns}|key"), Entry::new(*ns, i as u32));
        }
        for victim in namespaces {
            let cache2: LocalCache<u32> = LocalCache::builder().build();
            for (i, ns) in namespaces.iter().enumerate() {
                cache2.insert(format!("{ns}|key"), Entry::new(*ns, i as u32));
            }
            cache2.invalidate_namespace(victim).unwrap();
            for ns in namespaces {
                let present = cache2.get(format!("{ns}|key").as_str()).is_some();
                assert_eq!(
                    present,
                    ns != victim,
                    "clearing {victim:?} wrongly affected {ns:?}"
                );
            }
        }
        // Entries inserted after the clear are not hidden by it.
        cache.invalidate_namespace("a*").unwrap();
        cache.insert("a*|key", Entry::new("a*", 99));
        assert_eq!(*cache.get("a*|key").unwrap().value(), 99);
    });
}

#[test]
fn invalidate_and_invalidate_all_count() {
    rt().block_on(async {
        let cache: LocalCache<u32> = LocalCache::builder().build();
        for i in 0..10 {
            cache.insert(format!("k{i}"), Entry::new("ns", i));
        }
        cache.invalidate("k0");
        assert!(cache.get("k0").is_none());
        cache.invalidate_all();
        for i in 1..10 {
            assert!(cache.get(format!("k{i}").as_str()).is_none());
        }
        cache.run_pending_tasks();
        assert_eq!(cache.stats().invalidated, 10);
        cache.insert("k1", Entry::new("ns", 1));
        cache.insert("k1", Entry::new("ns", 2));
        cache.run_pending_tasks();
        assert_eq!(cache.stats().replaced, 1);
        assert_eq!(*cache.get("k1").unwrap().value(), 2);
    });
}

#[test]
fn a_hit_shares_the_stored_value() {
    rt().block_on(async {
        let cache: LocalCache<Vec<u8>> = LocalCache::builder().build();
        let stored = cache.insert("k", Entry::new("ns", vec![1, 2, 3]).version(9));
        let hit = cache.get("k").unwrap();
        assert!(
            std::sync::Arc::ptr_eq(&stored, &hit),
            "a hit must not copy the value"
        );
        assert_eq!(hit.write_version(), 9);
    });
}
