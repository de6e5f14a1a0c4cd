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

/// A minimal subscriber that keeps every span's fields as "name=value" strings, and which
/// span is entered (one test thread).
#[derive(Default, Clone)]
struct Spans(
    Arc<Mutex<Vec<Vec<String>>>>,
    Arc<Mutex<Vec<(u64, &'static tracing::Metadata<'static>)>>>,
    Arc<Mutex<Vec<&'static tracing::Metadata<'static>>>>,
);

struct Fields<'a>(&'a mut Vec<String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push(format!("{}={:?}", field.name(), value));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push(format!("{}={value}", field.name()));
    }
}

impl tracing::Subscriber for Spans {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut spans = self.0.lock().unwrap();
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        spans.push(fields);
        self.2.lock().unwrap().push(attrs.metadata());
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut spans = self.0.lock().unwrap();
        let i = usize::try_from(span.into_u64()).unwrap() - 1;
        values.record(&mut Fields(&mut spans[i]));
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, span: &tracing::span::Id) {
        let meta = self.2.lock().unwrap()[usize::try_from(span.into_u64()).unwrap() - 1];
        self.1.lock().unwrap().push((span.into_u64(), meta));
    }
    fn exit(&self, _: &tracing::span::Id) {
        self.1.lock().unwrap().pop();
    }
    fn current_span(&self) -> tracing_core::span::Current {
        match self.1.lock().unwrap().last() {
            Some((id, meta)) => {
                tracing_core::span::Current::new(tracing::span::Id::from_u64(*id), meta)
            }
            None => tracing_core::span::Current::none(),
        }
    }
}

#[tokio::test]
async fn each_operation_has_a_span_with_its_tier_and_outcome_and_a_hashed_key() {
    let server = RedisServer::start();
    let cache = node(&server, "traced").await;
    let spans = Spans::default();
    let _guard = tracing::subscriber::set_default(spans.clone());
    let loads = Loads::default();
    for _ in 0..2 {
        cache
            .get_or_set("alice@example.com", loads.returning("v", Duration::ZERO))
            .await
            .unwrap();
    }
    cache.invalidate("alice@example.com").await.unwrap();
    let all: Vec<String> = spans
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|f| f.iter().any(|x| x.starts_with("op=")))
        .map(|f| f.join(" "))
        .collect();
    assert_eq!(all.len(), 3, "{all:#?}");
    assert!(all[0].contains("op=get_or_set") && all[0].contains("namespace=traced"));
    assert!(
        all[0].contains("tier=loader") && all[0].contains("outcome=ok"),
        "{all:#?}"
    );
    assert!(
        all[1].contains("tier=l1") && all[1].contains("outcome=hit"),
        "{all:#?}"
    );
    assert!(all[2].contains("op=invalidate") && all[2].contains("outcome=ok"));
    for s in &all {
        assert!(!s.contains("alice"), "keys are hashed by default: {s}");
        assert!(s.contains("key=#"), "{s}");
    }
}
