//! Wires the cache's metrics to the Prometheus exporter and prints the exposition text after
//! a few operations (serve `handle.render()` from your HTTP server's `/metrics`).
//!
//! ```text
//! cargo run -p tiered --example prometheus            # starts a private redis-server
//! REDIS_URL=redis://127.0.0.1:6379 cargo run -p tiered --example prometheus
//! ```

use std::time::Duration;

use tiered::{EntryOptions, TieredCache};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let server;
    let url = match std::env::var("REDIS_URL") {
        Ok(url) => url,
        Err(_) => {
            server = testkit::RedisServer::start();
            server.url()
        }
    };
    let cache: TieredCache<String> = TieredCache::builder()
        .namespace("prometheus-example")
        .redis_url(url)
        .default_options(EntryOptions::new(Duration::from_secs(60)))
        .build()
        .await?;
    for i in 0..10 {
        let key = format!("user-{}", i % 3);
        cache
            .get_or_set(&key, move || async move {
                Ok::<_, std::io::Error>(format!("value {i}"))
            })
            .await?;
    }
    cache.export_metrics();
    print!("{}", handle.render());
    Ok(())
}
