//! The HTTP benches' route served on a loopback port, for `benches/wrk.sh`:
//! `http_server bare <port>` or `http_server cached <port>` (the latter starts its own
//! redis-server); both answer the 1,000 resources once before listening. Prints `READY` once it listens.

#![allow(missing_docs)]

use benches::http::{RESOURCES, bare, cached};
use tower::ServiceExt;

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let server = testkit::RedisServer::start();
        let (app, _cache) = match mode.as_str() {
            "bare" => (bare(), None),
            "cached" => {
                let (app, cache) = cached(&server.url()).await;
                (app, Some(cache))
            }
            _ => {
                eprintln!("usage: http_server bare|cached <port>");
                std::process::exit(2);
            }
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        // Warm every resource through the layer before wrk starts.
        for i in 0..RESOURCES {
            let request = axum::http::Request::get(format!("/items/{i}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert!(response.status().is_success());
        }
        println!("READY {addr}");
        axum::serve(listener, app).await.unwrap();
    });
}
