//! A Redis outage must not become an error storm or a database stampede. One node with 100
//! warm keys (written through it) and 100 cold ones; Redis stops answering (`CLIENT PAUSE`,
//! SIGSTOP, or killed and restarted) for 2 s or 10 s while tasks call `get`, `get_or_set` and
//! `get_or_set_many`. Counted: errors, loader runs per key, latency. Under the default outage
//! policy warm keys are served from L1 throughout and every call answers; loads of cold keys
//! run at most once per key per Δ; the strict policy refuses with a typed error.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{fast_bus, fast_node_with, long_lived};
use testkit::RedisServer;
use tiered::EntryOptions;

const KEYS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `CLIENT PAUSE <ms> ALL`: every command waits, connections stay up.
    Pause,
    /// SIGSTOP, then SIGCONT: the same from outside the server.
    Stop,
    /// Killed, then restarted empty on the same port: connections drop, data is gone.
    Kill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Get,
    GetOrSet,
    GetOrSetMany,
}

/// One call made during the outage window.
struct Call {
    op: Op,
    took: Duration,
    /// `None`: answered; `Some(unavailable)`: an error, and whether it was a typed
    /// "Redis unavailable" one.
    error: Option<bool>,
    /// The error's text, if any.
    text: Option<String>,
}

/// Loader runs, per key.
#[derive(Clone, Default)]
struct LoadCounts(Arc<std::sync::Mutex<HashMap<String, usize>>>);

impl LoadCounts {
    fn count(&self, key: &str) {
        *self.0.lock().unwrap().entry(key.to_string()).or_default() += 1;
    }

    fn max(&self, prefix: &str) -> usize {
        let map = self.0.lock().unwrap();
        map.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }
}

struct Figures {
    calls: Vec<Call>,
    loads: LoadCounts,
    stats: tiered::CacheStats,
    window: Duration,
}

impl Figures {
    fn errors(&self, op: Op) -> usize {
        self.calls
            .iter()
            .filter(|c| c.op == op && c.error.is_some())
            .count()
    }

    fn untyped_errors(&self) -> usize {
        self.calls.iter().filter(|c| c.error == Some(false)).count()
    }

    fn latency(&self, op: Op, q: f64) -> Duration {
        let mut took: Vec<Duration> = self
            .calls
            .iter()
            .filter(|c| c.op == op)
            .map(|c| c.took)
            .collect();
        took.sort();
        if took.is_empty() {
            return Duration::ZERO;
        }
        took[((took.len() - 1) as f64 * q).round() as usize]
    }

    fn print(&self, what: &str) {
        let mut texts: HashMap<(Op, &str), usize> = HashMap::new();
        for c in &self.calls {
            if let Some(t) = &c.text {
                *texts.entry((c.op, t.as_str())).or_default() += 1;
            }
        }
        if !texts.is_empty() {
            println!("errors: {texts:?}");
        }
        let line = |op: Op| {
            let n = self.calls.iter().filter(|c| c.op == op).count();
            format!(
                "{op:?}: {n} calls, {} errors, p50 {:?}, p99 {:?}",
                self.errors(op),
                self.latency(op, 0.5),
                self.latency(op, 0.99)
            )
        };
        println!(
            "outage ({what}, window {:?}): {} | {} | {} | loader runs: {} in all, at most {} per \
             warm key, {} per cold key | outage answers {}, L1 unconfirmed {}, unlocked loads {}, \
             gaps {}",
            self.window,
            line(Op::Get),
            line(Op::GetOrSet),
            line(Op::GetOrSetMany),
            self.loads.total(),
            self.loads.max("w"),
            self.loads.max("c"),
            self.stats.outage_served,
            self.stats.l1_unconfirmed,
            self.stats.unlocked_loads,
            self.stats.gaps,
        );
    }
}

fn loader(
    loads: &LoadCounts,
    key: String,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = Result<String, std::io::Error>> + Send>>
+ Send
+ 'static {
    let loads = loads.clone();
    move || {
        Box::pin(async move {
            loads.count(&key);
            Ok(format!("{key}-loaded"))
        })
    }
}

/// Runs `fault` for `length` against a node whose outage staleness is `staleness`.
async fn outage(fault: Fault, length: Duration, staleness: Duration) -> Figures {
    let mut server = RedisServer::start();
    let options: EntryOptions = long_lived()
        .outage_staleness(staleness)
        .hard_timeout(Duration::from_secs(2));
    let cache = fast_node_with(server.url(), "outage", options).await;
    for i in 0..KEYS {
        cache
            .set(&format!("w{i}"), &format!("w{i}-v1"))
            .await
            .unwrap();
    }
    let loads = LoadCounts::default();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // Two readers of warm keys (get), two of warm and cold keys (get_or_set), one batch reader
    // of cold keys (get_or_set_many). Each pauses 1 ms between calls.
    for t in 0..5usize {
        let (cache, loads, stop, started) =
            (cache.clone(), loads.clone(), stop.clone(), started.clone());
        tasks.push(tokio::spawn(async move {
            started.fetch_add(1, Ordering::SeqCst);
            let mut calls = Vec::new();
            let mut i = t * 7;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let begin = Instant::now();
                let (op, result) = match t {
                    0 | 1 => {
                        let key = format!("w{}", i % (KEYS / 2));
                        (Op::Get, cache.get(&key).await.map(|_| ()))
                    }
                    2 | 3 => {
                        let key = if i % 2 == 0 {
                            format!("w{}", KEYS / 2 + i % (KEYS / 2))
                        } else {
                            format!("c{}", i % (KEYS / 2))
                        };
                        let load = loader(&loads, key.clone());
                        (Op::GetOrSet, cache.get_or_set(&key, load).await.map(|_| ()))
                    }
                    _ => {
                        let first = KEYS / 2 + (i * 10) % (KEYS / 2);
                        let keys: Vec<String> = (first..first + 10)
                            .map(|k| format!("c{}", k % KEYS))
                            .collect();
                        let loads = loads.clone();
                        let got = cache
                            .get_or_set_many(&keys, move |missing: Vec<String>| async move {
                                for k in &missing {
                                    loads.count(k);
                                }
                                Ok::<_, std::io::Error>(missing.into_iter().map(|k| {
                                    let v = format!("{k}-loaded");
                                    (k, v)
                                }))
                            })
                            .await;
                        (Op::GetOrSetMany, got.map(|_| ()))
                    }
                };
                let took = begin.elapsed();
                calls.push(Call {
                    op,
                    took,
                    error: result.as_ref().err().map(|e| e.is_unavailable()),
                    text: result
                        .err()
                        .map(|e| format!("{e:?}").chars().take(90).collect()),
                });
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            calls
        }));
    }
    while started.load(Ordering::SeqCst) < 5 {
        tokio::task::yield_now().await;
    }
    let before = cache.stats();
    let window = length + Duration::from_millis(500);
    let begun = Instant::now();
    match fault {
        Fault::Pause => {
            let ms = length.as_millis().to_string();
            assert_eq!(server.command(&["CLIENT", "PAUSE", &ms, "ALL"]), "OK");
            tokio::time::sleep(length).await;
        }
        Fault::Stop => {
            server.pause();
            tokio::time::sleep(length).await;
            server.resume();
        }
        Fault::Kill => {
            server.kill();
            tokio::time::sleep(length).await;
            server.restart();
        }
    }
    tokio::time::sleep(window.saturating_sub(begun.elapsed())).await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = Vec::new();
    for t in tasks {
        calls.extend(t.await.unwrap());
    }
    let after = cache.stats();
    let mut stats = after;
    stats.outage_served = after.outage_served - before.outage_served;
    stats.l1_unconfirmed = after.l1_unconfirmed - before.l1_unconfirmed;
    stats.unlocked_loads = after.unlocked_loads - before.unlocked_loads;
    stats.gaps = after.gaps - before.gaps;
    drop(cache);
    drop(server);
    Figures {
        calls,
        loads,
        stats,
        window,
    }
}

/// The loader-run bound: once per key per Δ over the window, plus the first load and one
/// that may straddle Redis's return.
fn load_bound(window: Duration) -> usize {
    let delta = fast_bus().bound();
    (window.as_millis() / delta.as_millis()) as usize + 2
}

fn assert_default_policy(fault: Fault, length: Duration) -> impl Fn(&Figures) {
    move |f: &Figures| {
        f.print(&format!("{fault:?} {length:?}, default policy"));
        assert_eq!(f.errors(Op::Get), 0, "warm keys are served throughout");
        assert_eq!(f.errors(Op::GetOrSet), 0, "every get_or_set answers");
        assert_eq!(f.errors(Op::GetOrSetMany), 0, "every batch answers");
        let warm = f.loads.max("w");
        // A killed Redis comes back empty: the resubscription drops L1, and each warm key is
        // loaded again once.
        let warm_bound = if fault == Fault::Kill { 2 } else { 0 };
        assert!(
            warm <= warm_bound,
            "a warm key was loaded {warm} times (at most {warm_bound})"
        );
        let cold = f.loads.max("c");
        let bound = load_bound(f.window);
        assert!(
            cold <= bound,
            "a cold key was loaded {cold} times in {:?} (at most {bound}: once per Δ)",
            f.window
        );
        if fault != Fault::Kill {
            assert!(f.stats.outage_served > 0, "warm keys were outage answers");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2s_client_pause_is_served_from_l1_with_one_load_per_key_per_delta() {
    let length = Duration::from_secs(2);
    let f = outage(Fault::Pause, length, tiered::DEFAULT_OUTAGE_STALENESS).await;
    assert_default_policy(Fault::Pause, length)(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10s_client_pause_is_served_from_l1_with_one_load_per_key_per_delta() {
    let length = Duration::from_secs(10);
    let f = outage(Fault::Pause, length, tiered::DEFAULT_OUTAGE_STALENESS).await;
    assert_default_policy(Fault::Pause, length)(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2s_sigstop_is_served_from_l1_with_one_load_per_key_per_delta() {
    let length = Duration::from_secs(2);
    let f = outage(Fault::Stop, length, tiered::DEFAULT_OUTAGE_STALENESS).await;
    assert_default_policy(Fault::Stop, length)(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10s_sigstop_is_served_from_l1_with_one_load_per_key_per_delta() {
    let length = Duration::from_secs(10);
    let f = outage(Fault::Stop, length, tiered::DEFAULT_OUTAGE_STALENESS).await;
    assert_default_policy(Fault::Stop, length)(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2s_kill_is_served_from_l1_with_one_load_per_key_per_delta() {
    let length = Duration::from_secs(2);
    let f = outage(Fault::Kill, length, tiered::DEFAULT_OUTAGE_STALENESS).await;
    assert_default_policy(Fault::Kill, length)(&f);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10s_kill_is_served_from_l1_with_one_load_per_key_per_delta() {
    let length = Duration::from_secs(10);
    let f = outage(Fault::Kill, length, tiered::DEFAULT_OUTAGE_STALENESS).await;
    assert_default_policy(Fault::Kill, length)(&f);
}

/// The strict policy: warm keys are refused with a typed "Redis unavailable" error once the
/// lease runs out; loads stay bounded all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_strict_policy_refuses_with_a_typed_error_and_still_bounds_loads() {
    let length = Duration::from_secs(2);
    let f = outage(Fault::Pause, length, Duration::ZERO).await;
    f.print("Pause 2s, strict policy");
    assert!(f.errors(Op::Get) > 0, "warm gets are refused");
    assert_eq!(
        f.untyped_errors(),
        0,
        "every refusal is a typed unavailable error"
    );
    assert_eq!(f.stats.outage_served, 0);
    let cold = f.loads.max("c");
    assert!(
        cold <= load_bound(f.window),
        "a cold key was loaded {cold} times"
    );
}

/// A node that keeps answering during an outage keeps within its documented staleness: with
/// a 1 s outage staleness, warm gets are answered for about Δ + 1 s and refused after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_stop_after_the_outage_staleness() {
    let length = Duration::from_secs(3);
    let f = outage(Fault::Stop, length, Duration::from_secs(1)).await;
    f.print("Stop 3s, 1 s outage staleness");
    assert!(f.stats.outage_served > 0, "answered at first");
    assert!(
        f.errors(Op::Get) > 0,
        "refused once the outage staleness passed"
    );
    assert_eq!(f.untyped_errors(), 0);
}
