//! HTTP: a cached answer through `tiered-http`'s layer vs the same axum route without it,
//! each request sent with tower's `oneshot` (no sockets), over 1,000 warm resources of ~1 KiB.
//! The req/s comparison over real connections is `benches/wrk.sh`.
//!
//! `cargo bench -p benches --bench http`

#![allow(missing_docs)]

use std::hint::black_box;

use axum::body::Body;
use axum::http::Request;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use tower::ServiceExt;

use benches::http::{RESOURCES, bare, cached};

/// Sends a GET for resource `i` and returns the body's length.
async fn fetch(app: &axum::Router, i: usize) -> usize {
    let request = Request::get(format!("/items/{}", i % RESOURCES))
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert!(response.status().is_success());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    body.len()
}

fn http_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = testkit::RedisServer::start();
    let bare = bare();
    let (cached, cache) = rt.block_on(cached(&server.url()));
    rt.block_on(async {
        for i in 0..RESOURCES {
            fetch(&cached, i).await;
        }
        // Warm: the next answer comes from the cache.
        let request = Request::get("/items/7").body(Body::empty()).unwrap();
        let response = cached.clone().oneshot(request).await.unwrap();
        assert_eq!(response.headers()["x-cache"], "HIT");
    });
    let mut g = c.benchmark_group("http_hit");
    let n = std::sync::atomic::AtomicUsize::new(0);
    let next = || n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    g.bench_function("cached_layer", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(fetch(&cached, next()).await) })
    });
    g.bench_function("bare_route", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(fetch(&bare, next()).await) })
    });
    g.finish();
    drop(cache);
}

criterion_group!(benches, http_hit);
criterion_main!(benches);
