//! The response cache in front of an in-process axum app, against a real redis-server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use http_body_util::BodyExt;
use testkit::RedisServer;
use tiered_http::{ResponseCache, Route};
use tower::ServiceExt;

/// How often each handler ran, and what it answers next.
#[derive(Default)]
struct Counts {
    slow: AtomicUsize,
    plain: AtomicUsize,
    headers: AtomicUsize,
    products: AtomicUsize,
    other: AtomicUsize,
    big: AtomicUsize,
    flaky: AtomicUsize,
    version: AtomicU64,
    fail: std::sync::atomic::AtomicBool,
}

type Shared = Arc<Counts>;

async fn slow(State(c): State<Shared>) -> impl IntoResponse {
    c.slow.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    format!("slow v{}", c.version.load(Ordering::SeqCst))
}

async fn plain(State(c): State<Shared>, headers: HeaderMap) -> impl IntoResponse {
    let n = c.plain.fetch_add(1, Ordering::SeqCst);
    let lang = headers
        .get("accept-language")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    format!("plain {n} {lang} v{}", c.version.load(Ordering::SeqCst))
}

/// Answers with the headers named in the query: `?h=cache-control:private&status=404`.
async fn with_headers(
    State(c): State<Shared>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> impl IntoResponse {
    let n = c.headers.fetch_add(1, Ordering::SeqCst);
    let mut status = StatusCode::OK;
    let mut headers = HeaderMap::new();
    for pair in q.unwrap_or_default().split('&') {
        if let Some(h) = pair.strip_prefix("h=") {
            let h = h.replace("%20", " ").replace("%2C", ",");
            let (name, value) = h.split_once(':').unwrap();
            headers.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        if let Some(s) = pair.strip_prefix("status=") {
            status = StatusCode::from_u16(s.parse().unwrap()).unwrap();
        }
    }
    (status, headers, format!("headers {n}"))
}

async fn sleepy(State(c): State<Shared>) -> impl IntoResponse {
    c.other.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    "finally"
}

async fn product(State(c): State<Shared>) -> impl IntoResponse {
    let n = c.products.fetch_add(1, Ordering::SeqCst);
    format!("product {n}")
}

async fn other(State(c): State<Shared>) -> impl IntoResponse {
    let n = c.other.fetch_add(1, Ordering::SeqCst);
    format!("other {n}")
}

async fn big(State(c): State<Shared>) -> impl IntoResponse {
    c.big.fetch_add(1, Ordering::SeqCst);
    vec![b'x'; 10_000]
}

async fn flaky(State(c): State<Shared>) -> axum::response::Response {
    let n = c.flaky.fetch_add(1, Ordering::SeqCst);
    if c.fail.load(Ordering::SeqCst) {
        (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response()
    } else {
        format!("flaky {n}").into_response()
    }
}

fn app(cache: &ResponseCache, counts: Shared) -> Router {
    Router::new()
        .route("/slow", get(slow))
        .route("/plain", get(plain).post(plain))
        .route("/headers", get(with_headers))
        .route("/products/{id}", get(product))
        .route("/other", get(other))
        .route("/big", get(big))
        .route("/flaky", get(flaky))
        .route("/admin", get(other))
        .route("/sleepy", get(sleepy))
        .with_state(counts)
        .layer(cache.layer())
}

async fn cache_for(redis: &RedisServer, namespace: &str) -> ResponseCache {
    ResponseCache::builder()
        .redis_url(redis.url())
        .namespace(namespace)
        .vary("accept-language")
        .max_body_bytes(4096)
        .route(
            "/products",
            Route::tagged("products").time_to_live(Duration::from_secs(60)),
        )
        .route(
            "/flaky",
            Route::tagged("flaky")
                .time_to_live(Duration::from_millis(200))
                .fail_safe(Duration::from_secs(60)),
        )
        .route(
            "/slow",
            Route::tagged("slow")
                .time_to_live(Duration::from_millis(300))
                .stale_while_revalidate(Duration::from_secs(30)),
        )
        .route("/admin", Route::uncached())
        .route(
            "/sleepy",
            Route::tagged("sleepy").options(
                tiered::EntryOptions::new(Duration::from_secs(60))
                    .hard_timeout(Duration::from_millis(100)),
            ),
        )
        .build()
        .await
        .expect("build the response cache")
}

struct Answer {
    status: StatusCode,
    x_cache: Option<String>,
    age: Option<String>,
    body: String,
}

async fn send(app: &Router, method: Method, uri: &str, headers: &[(&str, &str)]) -> Answer {
    let mut request = Request::builder().method(method).uri(uri);
    for (n, v) in headers {
        request = request.header(*n, *v);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let (x_cache, age) = {
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        (header("x-cache"), header("age"))
    };
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        x_cache,
        age,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get_(app: &Router, uri: &str) -> Answer {
    send(app, Method::GET, uri, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_requests_to_a_cold_route_reach_the_handler_once() {
    let redis = RedisServer::start();
    let cache = cache_for(&redis, "thousand").await;
    let counts = Shared::default();
    let app = app(&cache, counts.clone());
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { get_(&app, "/slow").await })
        })
        .collect();
    let mut hits = 0;
    let mut misses = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "slow v0");
        match answer.x_cache.as_deref() {
            Some("HIT") => hits += 1,
            Some("MISS") => misses += 1,
            other => panic!("unexpected X-Cache {other:?}"),
        }
    }
    assert_eq!(
        counts.slow.load(Ordering::SeqCst),
        1,
        "the handler ran once"
    );
    assert_eq!((misses, hits), (1, 999));
    let again = get_(&app, "/slow").await;
    assert_eq!(again.x_cache.as_deref(), Some("HIT"));
    assert!(again.age.is_some(), "cached answers carry Age");
    println!("1,000 concurrent requests: 1 handler call, 1 MISS, 999 HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_share_one_handler_call_through_the_redis_lock() {
    let redis = RedisServer::start();
    let counts = Shared::default();
    let a = app(&cache_for(&redis, "two-nodes").await, counts.clone());
    let b = app(&cache_for(&redis, "two-nodes").await, counts.clone());
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let node = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { get_(&node, "/slow").await })
        })
        .collect();
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "slow v0");
    }
    assert_eq!(
        counts.slow.load(Ordering::SeqCst),
        1,
        "one call for both nodes"
    );
}

#[tokio::test]
async fn responses_are_cached_only_when_their_headers_allow() {
    let redis = RedisServer::start();
    let cache = cache_for(&redis, "rules").await;
    let counts = Shared::default();
    let app = app(&cache, counts.clone());
    let uncacheable = [
        "/headers?h=cache-control:private,%20max-age=60",
        "/headers?h=cache-control:no-store",
        "/headers?h=cache-control:no-cache",
        "/headers?h=cache-control:max-age=0",
        "/headers?h=set-cookie:session=1",
        "/headers?h=vary:accept-encoding",
        "/headers?status=404",
        "/headers?status=201",
    ];
    for uri in uncacheable {
        let before = counts.headers.load(Ordering::SeqCst);
        for _ in 0..3 {
            let answer = get_(&app, uri).await;
            assert_eq!(answer.x_cache.as_deref(), Some("MISS"), "{uri}");
        }
        assert_eq!(
            counts.headers.load(Ordering::SeqCst) - before,
            3,
            "{uri}: not cached, the handler answers each time"
        );
    }
    // Explicit freshness: cached for exactly what it says.
    let uri = "/headers?h=cache-control:public,%20max-age=1";
    let first = get_(&app, uri).await;
    assert_eq!(first.x_cache.as_deref(), Some("MISS"));
    let second = get_(&app, uri).await;
    assert_eq!(second.x_cache.as_deref(), Some("HIT"));
    assert_eq!(second.body, first.body);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = get_(&app, uri).await;
    assert_eq!(third.x_cache.as_deref(), Some("MISS"), "max-age=1 expired");
    // A Vary within the configured headers is cached, per value.
    let uri = "/headers?h=vary:accept-language";
    get_(&app, uri).await;
    assert_eq!(get_(&app, uri).await.x_cache.as_deref(), Some("HIT"));
}

#[tokio::test]
async fn request_cache_control_is_honoured() {
    let redis = RedisServer::start();
    let cache = cache_for(&redis, "request-cc").await;
    let counts = Shared::default();
    let app = app(&cache, counts.clone());
    assert_eq!(get_(&app, "/plain").await.x_cache.as_deref(), Some("MISS"));
    assert_eq!(get_(&app, "/plain").await.x_cache.as_deref(), Some("HIT"));
    let ask = |cc: &'static str| {
        let app = app.clone();
        async move {
            send(&app, Method::GET, "/plain", &[("cache-control", cc)])
                .await
                .x_cache
        }
    };
    assert_eq!(ask("max-age=600").await.as_deref(), Some("HIT"));
    assert_eq!(ask("no-store").await.as_deref(), Some("BYPASS"));
    assert_eq!(counts.plain.load(Ordering::SeqCst), 2);
    assert_eq!(ask("no-cache").await.as_deref(), Some("MISS"));
    assert_eq!(counts.plain.load(Ordering::SeqCst), 3);
    // The reloaded answer was stored: plain requests now see it.
    let after = get_(&app, "/plain").await;
    assert_eq!(after.x_cache.as_deref(), Some("HIT"));
    assert!(after.body.starts_with("plain 2 "), "{}", after.body);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(ask("max-age=0").await.as_deref(), Some("MISS"));
    assert_eq!(
        send(&app, Method::GET, "/plain", &[("pragma", "no-cache")])
            .await
            .x_cache
            .as_deref(),
        Some("MISS")
    );
    assert_eq!(counts.plain.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn keys_sort_the_query_and_split_on_vary_headers() {
    let redis = RedisServer::start();
    let cache = cache_for(&redis, "keys").await;
    let counts = Shared::default();
    let app = app(&cache, counts.clone());
    get_(&app, "/plain?b=2&a=1").await;
    assert_eq!(
        get_(&app, "/plain?a=1&b=2").await.x_cache.as_deref(),
        Some("HIT")
    );
    assert_eq!(
        get_(&app, "/plain?a=1&b=3").await.x_cache.as_deref(),
        Some("MISS")
    );
    let en = send(&app, Method::GET, "/plain", &[("accept-language", "en")]).await;
    let fr = send(&app, Method::GET, "/plain", &[("accept-language", "fr")]).await;
    assert_eq!(
        (en.x_cache.as_deref(), fr.x_cache.as_deref()),
        (Some("MISS"), Some("MISS"))
    );
    assert!(fr.body.contains(" fr "));
    let en_again = send(&app, Method::GET, "/plain", &[("accept-language", "en")]).await;
    assert_eq!(en_again.x_cache.as_deref(), Some("HIT"));
    assert_eq!(en_again.body, en.body);
    // HEAD has its own entry and no body; POST is never cached nor marked.
    let head = send(&app, Method::HEAD, "/plain", &[]).await;
    assert_eq!(head.x_cache.as_deref(), Some("MISS"));
    assert!(head.body.is_empty());
    let head = send(&app, Method::HEAD, "/plain", &[]).await;
    assert_eq!(head.x_cache.as_deref(), Some("HIT"));
    assert!(head.body.is_empty());
    let before = counts.plain.load(Ordering::SeqCst);
    for _ in 0..2 {
        let post = send(&app, Method::POST, "/plain", &[]).await;
        assert_eq!(post.x_cache, None);
    }
    assert_eq!(counts.plain.load(Ordering::SeqCst), before + 2);
    // Personal requests and uncached routes skip the cache.
    let auth = send(
        &app,
        Method::GET,
        "/plain",
        &[("authorization", "Bearer x")],
    )
    .await;
    assert_eq!(auth.x_cache.as_deref(), Some("BYPASS"));
    let admin = get_(&app, "/admin").await;
    assert_eq!(admin.x_cache, None);
    assert_eq!(get_(&app, "/admin").await.x_cache, None);
}

#[tokio::test]
async fn big_bodies_pass_through_whole_and_are_not_cached() {
    let redis = RedisServer::start();
    let cache = cache_for(&redis, "big").await;
    let counts = Shared::default();
    let app = app(&cache, counts.clone());
    for _ in 0..3 {
        let answer = get_(&app, "/big").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body.len(), 10_000);
        assert_eq!(answer.x_cache.as_deref(), Some("MISS"));
    }
    assert_eq!(counts.big.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn tags_are_invalidated_on_every_node() {
    let redis = RedisServer::start();
    let counts_a = Shared::default();
    let counts_b = Shared::default();
    let cache_a = cache_for(&redis, "tags").await;
    let cache_b = cache_for(&redis, "tags").await;
    let a = app(&cache_a, counts_a.clone());
    let b = app(&cache_b, counts_b.clone());
    assert_eq!(
        get_(&a, "/products/1").await.x_cache.as_deref(),
        Some("MISS")
    );
    assert_eq!(get_(&a, "/other").await.x_cache.as_deref(), Some("MISS"));
    // Node B is served from L2: its handlers never ran.
    assert_eq!(
        get_(&b, "/products/1").await.x_cache.as_deref(),
        Some("HIT")
    );
    assert_eq!(get_(&b, "/other").await.x_cache.as_deref(), Some("HIT"));
    assert_eq!(counts_b.products.load(Ordering::SeqCst), 0);
    // B invalidates the tag: A's copy goes too, other tags stay.
    let received = |cache: &ResponseCache| {
        cache
            .caches()
            .find(|(tag, _)| *tag == "products")
            .map_or(0, |(_, c)| c.stats().invalidations_received)
    };
    let before = received(&cache_a);
    cache_b.invalidate_tag("products").await.unwrap();
    let mut evicted = false;
    for _ in 0..100 {
        // The clear message reached A (its handler drops the tag's L1 before counting it).
        if received(&cache_a) > before {
            evicted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(evicted, "node A heard the tag's clear");
    let again = get_(&a, "/products/1").await;
    assert_eq!(again.x_cache.as_deref(), Some("MISS"));
    assert_eq!(again.body, "product 1");
    assert_eq!(get_(&a, "/other").await.x_cache.as_deref(), Some("HIT"));
    // One request's entry.
    let request = Request::get("/other").body(()).unwrap();
    cache_a.invalidate(&request).await.unwrap();
    assert_eq!(get_(&a, "/other").await.x_cache.as_deref(), Some("MISS"));
    assert!(matches!(
        cache_a.invalidate_tag("nope").await,
        Err(tiered_http::Error::UnknownTag(_))
    ));
}

#[tokio::test]
async fn stale_responses_are_served_while_one_request_refreshes() {
    let redis = RedisServer::start();
    let cache = cache_for(&redis, "swr").await;
    let counts = Shared::default();
    let app = app(&cache, counts.clone());
    assert_eq!(get_(&app, "/slow").await.body, "slow v0");
    counts.version.store(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let started = std::time::Instant::now();
    let stale = get_(&app, "/slow").await;
    assert_eq!(stale.x_cache.as_deref(), Some("STALE"));
    assert_eq!(stale.body, "slow v0");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "a stale answer does not wait for the handler"
    );
    let mut fresh = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let answer = get_(&app, "/slow").await;
        if answer.body == "slow v1" {
            fresh = Some(answer);
            break;
        }
    }
    let fresh = fresh.expect("the refresh landed");
    assert_eq!(fresh.x_cache.as_deref(), Some("HIT"));
    assert_eq!(counts.slow.load(Ordering::SeqCst), 2, "one refresh");
}

#[tokio::test]
async fn a_failing_handler_is_answered_with_the_last_good_response() {
    let redis = RedisServer::start();
    let cache = cache_for(&redis, "failsafe").await;
    let counts = Shared::default();
    let node = app(&cache, counts.clone());
    assert_eq!(get_(&node, "/flaky").await.body, "flaky 0");
    counts.fail.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = get_(&node, "/flaky").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.x_cache.as_deref(), Some("STALE"));
    assert_eq!(answer.body, "flaky 0");
    // With nothing to fall back on, the handler's own 500 reaches the request that ran it.
    let uncached = cache_for(&redis, "failsafe-cold").await;
    let cold = app(&uncached, counts.clone());
    let answer = get_(&cold, "/flaky").await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.body, "down");
    assert_eq!(answer.x_cache.as_deref(), Some("MISS"));
}

#[tokio::test]
async fn bad_settings_are_refused_with_the_setting_named() {
    let redis = RedisServer::start();
    let err = ResponseCache::builder()
        .redis_url(redis.url())
        .route("products", Route::tagged("products"))
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("route `products`"), "{err}");
    let err = ResponseCache::builder()
        .redis_url(redis.url())
        .route("/p", Route::tagged("a b"))
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("route tag `a b`"), "{err}");
    let err = ResponseCache::builder()
        .redis_url(redis.url())
        .vary("bad header")
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("vary"), "{err}");
    let err = ResponseCache::builder().build().await.unwrap_err();
    assert!(err.to_string().contains("redis_url"), "{err}");
}

#[tokio::test]
async fn a_slow_handler_gets_a_gateway_timeout_and_its_answer_lands_later() {
    let redis = RedisServer::start();
    let cache = cache_for(&redis, "sleepy").await;
    let counts = Shared::default();
    let node = app(&cache, counts.clone());
    let started = std::time::Instant::now();
    let answer = get_(&node, "/sleepy").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = get_(&node, "/sleepy").await;
    assert_eq!(
        (later.status, later.body.as_str()),
        (StatusCode::OK, "finally")
    );
    assert_eq!(later.x_cache.as_deref(), Some("HIT"));
    assert_eq!(counts.other.load(Ordering::SeqCst), 1);
}

/// Redis paused for 2 s under steady requests: warm responses keep coming from L1 (outage
/// answers) and cold ones reach their handler at most once per resource per Δ, never as a
/// stampede; every request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_is_neither_an_error_storm_nor_a_stampede() {
    let redis = RedisServer::start();
    let bus = tiered::BusConfig::default()
        .heartbeat(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_millis(100));
    let delta = bus.bound();
    let cache = ResponseCache::builder()
        .redis_url(redis.url())
        .namespace("pause")
        .bus_config(bus)
        .route(
            "/products",
            Route::tagged("products").time_to_live(Duration::from_secs(300)),
        )
        .route(
            "/other",
            Route::tagged("other").time_to_live(Duration::from_secs(300)),
        )
        .build()
        .await
        .unwrap();
    let counts = Shared::default();
    let app = app(&cache, counts.clone());
    for id in 0..20 {
        assert_eq!(
            get_(&app, &format!("/products/{id}")).await.status,
            StatusCode::OK
        );
    }
    let warm_runs = counts.products.load(Ordering::SeqCst);
    let length = Duration::from_secs(2);
    let window = length + Duration::from_millis(300);
    assert_eq!(redis.command(&["CLIENT", "PAUSE", "2000", "ALL"]), "OK");
    let start = std::time::Instant::now();
    let (mut answered, mut failed, mut i) = (0, 0, 0usize);
    let mut took = Vec::new();
    while start.elapsed() < window {
        i += 1;
        // Warm products, and one cold resource (/other?n=…) among ten.
        let uri = if i % 2 == 0 {
            format!("/products/{}", i % 20)
        } else {
            format!("/other?n={}", i % 10)
        };
        let begin = std::time::Instant::now();
        let answer = get_(&app, &uri).await;
        took.push(begin.elapsed());
        if answer.status == StatusCode::OK {
            answered += 1;
        } else {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    took.sort();
    let p99 = took[(took.len() - 1) * 99 / 100];
    let product_runs = counts.products.load(Ordering::SeqCst) - warm_runs;
    let other_runs = counts.other.load(Ordering::SeqCst);
    let bound = (window.as_millis() / delta.as_millis()) as usize + 2;
    println!(
        "http under a 2 s CLIENT PAUSE: {answered} answered, {failed} failed, p99 {p99:?}; \
         handler runs: warm products {product_runs}, cold resources {other_runs} for 10 \
         (at most {bound} each)"
    );
    assert_eq!(failed, 0, "every request is answered");
    assert_eq!(product_runs, 0, "warm responses come from L1");
    assert!(
        other_runs <= 10 * bound,
        "{other_runs} handler runs for 10 cold resources"
    );
}
