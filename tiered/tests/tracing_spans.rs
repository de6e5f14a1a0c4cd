//! Tracing spans, checked with a small in-test subscriber. Alone in its test binary: tracing
//! caches per call site whether anyone is interested, so a test without a subscriber running
//! beside this one on another thread could hide its spans.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Loads, node};
use testkit::RedisServer;

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
    // Installed before anything runs, so every call site is registered with it in view.
    let spans = Spans::default();
    let _guard = tracing::subscriber::set_default(spans.clone());
    let server = RedisServer::start();
    let cache = node(&server, "traced").await;
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
