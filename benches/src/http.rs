//! The HTTP benches' application: one route of 1,000 resources with a ~1 KiB body, served
//! bare or through `tiered-http`'s layer (shared by the criterion bench and the wrk server).

use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;

/// How many distinct resources the route serves.
pub const RESOURCES: usize = 1000;

async fn item(Path(id): Path<u32>) -> String {
    // About 1 KiB, different per resource.
    format!("{id:>8}:{}", "x".repeat(1016))
}

/// The bare route.
pub fn bare() -> Router {
    Router::new().route("/items/{id}", get(item))
}

/// The same route behind the response cache, on the Redis at `url`.
pub async fn cached(url: &str) -> (Router, tiered_http::ResponseCache) {
    let cache = tiered_http::ResponseCache::builder()
        .redis_url(url)
        .namespace("bench-http")
        .route(
            "/items",
            tiered_http::Route::tagged("items").time_to_live(Duration::from_secs(3600)),
        )
        .build()
        .await
        .expect("build the response cache");
    (bare().layer(cache.layer()), cache)
}
