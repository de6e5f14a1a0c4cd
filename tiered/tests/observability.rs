//! Metrics through the `metrics` facade, checked with a small in-test recorder.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Loads, node};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use testkit::RedisServer;

#[derive(Default)]
struct Cell(AtomicU64);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

/// Keeps every counter and gauge by "name{namespace}".
#[derive(Default)]
struct Capture {
    cells: Mutex<HashMap<String, Arc<Cell>>>,
    described: Mutex<Vec<String>>,
}

impl Capture {
    fn cell(&self, key: &Key) -> Arc<Cell> {
        let ns = key
            .labels()
            .find(|l| l.key() == "namespace")
            .map(|l| l.value().to_string())
            .unwrap_or_default();
        let name = format!("{}{{{ns}}}", key.name());
        Arc::clone(self.cells.lock().unwrap().entry(name).or_default())
    }

    fn counter(&self, name: &str) -> u64 {
        self.cells.lock().unwrap()[name].0.load(Ordering::Relaxed)
    }

    fn gauge(&self, name: &str) -> f64 {
        f64::from_bits(self.counter(name))
    }
}

impl Recorder for Capture {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.described
            .lock()
            .unwrap()
            .push(key.as_str().to_string());
    }
    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.described
            .lock()
            .unwrap()
            .push(key.as_str().to_string());
    }
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.cell(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.cell(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_gauges_reach_the_metrics_facade() {
    let server = RedisServer::start();
    let cache = node(&server, "obs").await;
    let loads = Loads::default();
    for _ in 0..3 {
        cache
            .get_or_set("k", loads.returning("v", Duration::ZERO))
            .await
            .unwrap();
    }
    let _ = cache.get_or_set("bad", loads.failing()).await;
    cache.set("w", &"x".to_string()).await.unwrap();
    let stats = cache.stats();

    let capture = Capture::default();
    metrics::with_local_recorder(&capture, || cache.export_metrics());
    assert_eq!(capture.counter("tiered_l1_hits_total{obs}"), stats.l1_hits);
    assert_eq!(stats.l1_hits, 2);
    assert_eq!(capture.counter("tiered_misses_total{obs}"), 2);
    assert_eq!(capture.counter("tiered_loads_total{obs}"), 1);
    assert_eq!(capture.counter("tiered_load_errors_total{obs}"), 1);
    assert_eq!(capture.counter("tiered_invalidations_sent_total{obs}"), 1);
    assert_eq!(capture.gauge("tiered_bus_connected{obs}"), 1.0);
    assert_eq!(capture.gauge("tiered_breaker_state{obs}"), 0.0);
}
