//! Serves the cache's health from axum: `GET /health` answers 200 with the `Health` JSON when
//! ready, 503 when not (the invalidation bus has been down past its bound).
//!
//! ```text
//! cargo run -p tiered --example health_endpoint      # then: curl -i 127.0.0.1:3000/health
//! ```

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tiered::{EntryOptions, Health, TieredCache};

async fn health(State(cache): State<TieredCache<String>>) -> (StatusCode, Json<Health>) {
    let health = cache.health().await;
    let code = if health.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(health))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server;
    let url = match std::env::var("REDIS_URL") {
        Ok(url) => url,
        Err(_) => {
            server = testkit::RedisServer::start();
            server.url()
        }
    };
    let cache: TieredCache<String> = TieredCache::builder()
        .namespace("health-example")
        .redis_url(url)
        .default_options(EntryOptions::new(Duration::from_secs(60)))
        .build()
        .await?;
    let app = axum::Router::new()
        .route("/health", get(health))
        .with_state(cache);
    let addr = std::env::var("HEALTH_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("serving http://{addr}/health");
    axum::serve(listener, app).await?;
    Ok(())
}
