//! HTTP response caching for [tower](https://docs.rs/tower) services and
//! [axum](https://docs.rs/axum) routers, on the two-level cache of [`tiered`]: responses are
//! kept in each node's memory (L1) and in Redis (L2), so a response computed on one node is
//! served by every node, and an invalidation on one node reaches all of them.
//!
//! What the layer does:
//! - **Caches GET and HEAD** responses; every other method passes through untouched. The key is
//!   the method, the path, the query parameters sorted by name (`?b=2&a=1` and `?a=1&b=2` share
//!   an entry) and the values of the headers named with [`ResponseCacheBuilder::vary`].
//! - **Only what may be cached**, as RFC 9111 says for a shared cache (read by
//!   [`http-cache-semantics`](https://docs.rs/http-cache-semantics), not by hand): a cached
//!   status (200 by default), no `private`, no `no-store`, no `Set-Cookie`, a `Vary` within the
//!   configured headers, a body within [`ResponseCacheBuilder::max_body_bytes`]. A response's
//!   `max-age` / `s-maxage` / `Expires` sets its TTL; responses that say nothing get their
//!   [`Route`]'s TTL. A request's `no-store` bypasses the cache, its `no-cache`, `max-age` and
//!   `min-fresh` send it to the handler when the cached response does not meet them (the new
//!   answer is stored). Requests with `Authorization` or `Cookie` bypass the cache by default.
//! - **One handler call per cold key**, however many requests arrive at once, on one node or
//!   many (single-flight in process, a Redis lock across processes). A resource found not
//!   cacheable leaves a short-lived "pass" marker, so later requests go straight to the
//!   handler instead of queueing behind one another.
//! - **Stale-while-revalidate and fail-safe** per [`Route`]: past its freshness a response is
//!   served at once while one request refreshes it; a failing handler (an error or a 5xx) is
//!   answered with the last good response.
//! - **`X-Cache`** on every answer the cache handled: `HIT`, `MISS` (this request's handler
//!   ran), `STALE`, `BYPASS`; cached answers carry `Age`.
//! - **Tags**: routes are grouped by tag ([`ResponseCacheBuilder::route`]);
//!   [`ResponseCache::invalidate_tag`] drops a group on every node, and
//!   [`ResponseCache::invalidate`] one request's entry.
//!
//! What it is not for: personalised responses (they bypass it or are refused as `private`),
//! streaming or very large bodies (passed through), or conditional requests to the handler
//! (`ETag` revalidation: a stale entry is reloaded in full).
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use tiered_http::{ResponseCache, Route};
//!
//! let cache = ResponseCache::builder()
//!     .redis_url("redis://127.0.0.1:6379")
//!     .namespace("shop-http")
//!     .vary("accept-language")
//!     .route(
//!         "/products",
//!         Route::tagged("products")
//!             .time_to_live(Duration::from_secs(30))
//!             .stale_while_revalidate(Duration::from_secs(300)),
//!     )
//!     .route("/cart", Route::uncached())
//!     .build()
//!     .await?;
//!
//! let app: Router = Router::new()
//!     .route("/products/{id}", get(|| async { "a product" }))
//!     .layer(cache.layer());
//!
//! // After a product changes, on any node:
//! cache.invalidate_tag("products").await?;
//! # let _ = app; Ok(()) }
//! ```

mod body;
mod builder;
mod cache;
mod error;
mod key;
mod layer;
mod load;
mod policy;
mod response;
mod route;
mod serve;
mod service;
mod stored;
#[cfg(test)]
mod testing;

pub use body::ResponseBody;
pub use builder::{DEFAULT_MAX_BODY_BYTES, DEFAULT_PASS_TTL, ResponseCacheBuilder};
pub use cache::ResponseCache;
pub use error::{Error, Result};
pub use layer::ResponseCacheLayer;
pub use response::{CacheStatus, X_CACHE};
pub use route::{DEFAULT_ROUTE_TTL, DEFAULT_TAG, Route};
pub use service::ResponseCacheService;
pub use stored::CachedResponse;

/// The README's examples, compiled as doctests (they use this crate and `tiered`).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
