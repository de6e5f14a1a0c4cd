//! Cancellation at every await point of the writing calls. A caller may drop a `set`,
//! `invalidate`, `clear` or `get_or_set` future at any `Poll::Pending` (a timeout, a `select!`,
//! a client that went away). Whatever Redis then holds, every node — the writer first, whose L1
//! held the key's old value — must serve exactly that within Δ + 100 ms, and never an older
//! value after that.
//!
//! Not one lucky timing: [`CutAfter`] polls the call and drops it after its n-th
//! `Poll::Pending`, for n = 0, 1, 2, … until the call completes without being cut. A second
//! loop does the same with `tokio::time::timeout` from 0 µs upward.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::{SOON, eventually, fast_bus, fast_node, long_lived};
use testkit::RedisServer;
use tiered::TieredCache;

fn judge_after() -> Duration {
    fast_bus().bound() + Duration::from_millis(100)
}

const MAX_CUTS: usize = 200;

/// Polls `fut`; after its `allowed`-th `Poll::Pending` the next one drops it and returns
/// `None` (so `allowed = 0` cuts it at its first await that is not ready).
struct CutAfter<F> {
    fut: Option<Pin<Box<F>>>,
    allowed: usize,
    pendings: usize,
}

impl<F: Future> Future for CutAfter<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(fut) = this.fut.as_mut() else {
            return Poll::Ready(None);
        };
        match fut.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending if this.pendings >= this.allowed => {
                this.fut = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.pendings += 1;
                Poll::Pending
            }
        }
    }
}

fn cut_after<F: Future>(fut: F, allowed: usize) -> CutAfter<F> {
    CutAfter {
        fut: Some(Box::pin(fut)),
        allowed,
        pendings: 0,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Set,
    Invalidate,
    Clear,
    GetOrSet,
}

/// The call on the writer, as a future that ignores its result.
fn call(
    call: Call,
    writer: &TieredCache<String>,
    key: &str,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let (w, key) = (writer.clone(), key.to_string());
    Box::pin(async move {
        match call {
            Call::Set => drop(w.set(&key, &format!("{key}-new")).await),
            Call::Invalidate => drop(w.invalidate(&key).await),
            Call::Clear => drop(w.clear().await),
            Call::GetOrSet => {
                let value = format!("{key}-loaded");
                drop(
                    w.get_or_set(&key, move || async move { Ok::<_, std::io::Error>(value) })
                        .await,
                )
            }
        }
    })
}

struct Nodes {
    _server: RedisServer,
    /// The writer: reads the key (L1 holds the old value), then makes the call.
    w: TieredCache<String>,
    /// Another node holding the key in L1 (it wrote the old value).
    b: TieredCache<String>,
    /// Reads Redis only (L1 skipped).
    truth: TieredCache<String>,
}

async fn nodes(namespace: &str) -> Nodes {
    let server = RedisServer::start();
    let node = async || fast_node(server.url(), namespace).await;
    let (w, b, truth) = (node().await, node().await, node().await);
    Nodes {
        _server: server,
        w,
        b,
        truth,
    }
}

impl Nodes {
    /// B writes the old value, the writer reads it into L1 (for `get_or_set`, B then
    /// deletes it so the writer's call has to load).
    async fn prepare(&self, call: Call, key: &str) {
        let old = format!("{key}-old");
        self.b.set(key, &old).await.unwrap();
        assert_eq!(self.w.get(key).await.unwrap(), Some(old));
        assert!(self.w.is_fresh_locally(key));
        if call == Call::GetOrSet {
            self.b.invalidate(key).await.unwrap();
            eventually(SOON, "the delete reaches the writer", || async {
                !self.w.is_fresh_locally(key)
            })
            .await;
        }
    }

    /// Δ + 100 ms after the cut, the writer and B must read what Redis holds, five times
    /// over 50 ms. Returns what went wrong.
    async fn judge(&self, what: &str, key: &str) -> Option<String> {
        tokio::time::sleep(judge_after()).await;
        for _ in 0..5 {
            let in_redis = self
                .truth
                .get_with(key, long_lived().skip_l1(true))
                .await
                .unwrap();
            for (name, n) in [("writer", &self.w), ("B", &self.b)] {
                let read = n.get(key).await.unwrap();
                if read != in_redis {
                    return Some(format!(
                        "{what}: {name} served {read:?} {:?} after the cut; Redis holds \
                         {in_redis:?}",
                        judge_after()
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

/// Cuts `call` after 0, 1, 2, … pendings until it completes; fails with every cut that left
/// a node out of step with Redis.
async fn every_await_point(which: Call) {
    let nodes = nodes(&format!("cut-{which:?}")).await;
    let mut failures = Vec::new();
    let mut completed_at = None;
    for allowed in 0..MAX_CUTS {
        // Three tries per point: whether Redis ran the command before the cut is timing.
        let mut done = false;
        for attempt in 0..3 {
            let key = format!("k{allowed}-{attempt}");
            nodes.prepare(which, &key).await;
            done |= cut_after(call(which, &nodes.w, &key), allowed)
                .await
                .is_some();
            let what = format!("{which:?} cut after {allowed} pendings (try {attempt})");
            if let Some(failure) = nodes.judge(&what, &key).await {
                failures.push(failure);
            }
        }
        if done {
            completed_at = Some(allowed);
            break;
        }
    }
    let completed_at = completed_at.unwrap_or_else(|| panic!("{which:?} never completed"));
    println!(
        "{which:?}: cut at each of its {completed_at} await points, {} left a node out of step",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{which:?}: {} of {completed_at} cuts left a node serving something other than Redis \
         holds: {failures:#?}",
        failures.len()
    );
}

/// The same with `tokio::time::timeout` from 0 µs upward in 20 µs steps.
async fn timeouts_from_zero(which: Call) {
    let nodes = nodes(&format!("timeout-{which:?}")).await;
    let mut failures = Vec::new();
    let mut tries = 0;
    let mut completions = 0;
    for step in 0..500u64 {
        let limit = Duration::from_micros(step * 20);
        let key = format!("k{step}");
        nodes.prepare(which, &key).await;
        let start = Instant::now();
        let done = tokio::time::timeout(limit, call(which, &nodes.w, &key)).await;
        let took = start.elapsed();
        tries += 1;
        let what = format!("{which:?} under a {limit:?} timeout (returned after {took:?})");
        if let Some(failure) = nodes.judge(&what, &key).await {
            failures.push(failure);
        }
        // Stop after three completions: timing on a loaded machine varies.
        if done.is_ok() {
            completions += 1;
            if completions == 3 {
                break;
            }
        }
    }
    println!(
        "{which:?}: {tries} timeouts tried, {} left a node out of step",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{which:?}: {} of {tries} timeouts left a node serving something other than Redis \
         holds: {failures:#?}",
        failures.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cut_at_every_await_point() {
    every_await_point(Call::Set).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_cut_at_every_await_point() {
    every_await_point(Call::Invalidate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_cut_at_every_await_point() {
    every_await_point(Call::Clear).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_set_cut_at_every_await_point() {
    every_await_point(Call::GetOrSet).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_under_timeouts_from_zero() {
    timeouts_from_zero(Call::Set).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_under_timeouts_from_zero() {
    timeouts_from_zero(Call::Invalidate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_under_timeouts_from_zero() {
    timeouts_from_zero(Call::Clear).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_set_under_timeouts_from_zero() {
    timeouts_from_zero(Call::GetOrSet).await;
}

/// A write that skips L1 must still take the writer's old copy out of it: its next read
/// returns the new value at once (its own announcement is skipped on arrival, so nothing
/// else would evict it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_with_skip_l1_does_not_leave_the_writers_old_copy() {
    let nodes = nodes("skip").await;
    nodes.prepare(Call::Set, "k").await;
    nodes
        .w
        .set_with("k", &"k-new".to_string(), long_lived().skip_l1(true))
        .await
        .unwrap();
    assert_eq!(
        nodes.w.get("k").await.unwrap().as_deref(),
        Some("k-new"),
        "the writer's next get after set_with(skip_l1)"
    );
    tokio::time::sleep(judge_after()).await;
    assert_eq!(nodes.b.get("k").await.unwrap().as_deref(), Some("k-new"));
}
