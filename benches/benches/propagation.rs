//! Invalidation propagation between two processes, beside a bare redis-rs publish→receive in
//! the same run.
//!
//! Node A (this process) changes a key N times, 2 ms apart; node B (this binary re-run as a
//! helper process) reads the key in a tight loop and records, for each new value, how long
//! after A's write returned it first read it (A puts its clock in the value; both processes
//! read the same host clock). The baseline: A publishes N messages with its clock on a bare
//! channel, and B's bare redis-rs subscriber records when each arrives.
//!
//! `cargo bench -p benches --bench propagation`; with `-- fanout`, one writer and 2, 4, 8 and
//! 16 receiver processes instead; with `-- unsigned`, a bus without a secret (no values carried:
//! B's next read after each change goes to Redis).

#![allow(missing_docs)]

use std::process::{Command, Stdio};
use std::time::Duration;

use invalidation::BusConfig;
use tiered::{EntryOptions, TieredCache};

const N: usize = 500;
const GAP: Duration = Duration::from_millis(2);

fn now_us() -> u64 {
    invalidation::now_micros()
}

/// Whether the nodes' bus is signed (the default: small values ride in the announcements);
/// `-- unsigned` measures the eviction path, where B's next read goes to Redis.
fn signed() -> bool {
    std::env::var("PROPAGATION_UNSIGNED").is_err() && !std::env::args().any(|a| a == "unsigned")
}

async fn node(url: &str) -> TieredCache<String> {
    let mut bus = BusConfig::default();
    if signed() {
        bus = bus.secret("propagation bench");
    }
    TieredCache::builder()
        .namespace("propagation")
        .redis_url(url)
        .carry_values(signed())
        .bus_config(bus)
        .default_options(EntryOptions::new(Duration::from_secs(600)))
        .build()
        .await
        .unwrap()
}

/// A second consumer on `cache`'s own bus and channel, called right after the cache's: the
/// times (µs) at which each announcement had been applied to L1.
async fn note_applied(cache: &TieredCache<String>) -> std::sync::Arc<std::sync::Mutex<Vec<u64>>> {
    let applied = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(N)));
    let noted = std::sync::Arc::clone(&applied);
    cache
        .bus()
        .listen(
            &invalidation::channel_for(&l2::KeySpace::new("propagation")),
            std::sync::Arc::new(move |event| {
                if matches!(event, invalidation::Event::Evict(_)) {
                    noted.lock().unwrap().push(now_us());
                }
            }),
        )
        .await
        .unwrap();
    applied
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i] as f64
}

fn summary(name: &str, mut lags: Vec<u64>) -> (f64, f64) {
    lags.sort_unstable();
    let (p50, p99) = (percentile(&lags, 0.5), percentile(&lags, 0.99));
    println!(
        "{name:<40} n={:<5} p50 {:>8.1} µs   p99 {:>8.1} µs   max {:>8.1} µs",
        lags.len(),
        p50,
        p99,
        *lags.last().unwrap() as f64
    );
    (p50, p99)
}

/// Node B: the bare subscriber first, then the cache reader. Prints `LAG bare|tiered <µs>`.
async fn helper(url: String) {
    use futures_util::StreamExt;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("bare-propagation").await.unwrap();
    let cache = node(&url).await;
    cache.get("k").await.unwrap();
    println!("READY");
    let mut stream = pubsub.on_message();
    let mut bare = Vec::with_capacity(N);
    while bare.len() < N {
        let msg = stream.next().await.unwrap();
        let sent: u64 = msg.get_payload::<String>().unwrap().parse().unwrap();
        bare.push(now_us().saturating_sub(sent));
    }
    drop(stream);
    // Stage trace: a bare subscriber on the cache's own channel notes when each of A's
    // announcements reaches this process; the loop below notes when L1 stops holding the old
    // value (the eviction applied) and when `get` returns the new one.
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(N)));
    let mut raw = client.get_async_pubsub().await.unwrap();
    raw.subscribe(invalidation::channel_for(&l2::KeySpace::new("propagation")))
        .await
        .unwrap();
    let noted = std::sync::Arc::clone(&arrivals);
    tokio::spawn(async move {
        let mut stream = raw.on_message();
        while stream.next().await.is_some() {
            noted.lock().unwrap().push(now_us());
        }
    });
    let applied = note_applied(&cache).await;
    println!("TRACING");
    // Each new value seen counts once; a value overtaken before B saw it is simply skipped.
    let mut tiered = Vec::with_capacity(N);
    let mut last = 0usize;
    let mut evicted = None;
    while last <= N {
        if evicted.is_none() && !cache.is_fresh_locally("k") {
            evicted = Some(now_us());
        }
        if let Ok(Some(v)) = cache.get("k").await {
            let mut parts = v.split(':');
            let i: usize = parts.next().unwrap().parse().unwrap();
            if i > last {
                let sent: u64 = parts.next().unwrap().parse().unwrap();
                let now = now_us();
                if last > 0 {
                    tiered.push(now.saturating_sub(sent));
                    println!("SEEN {i} {now} {}", evicted.unwrap_or(now));
                }
                last = i;
                evicted = None;
            }
        }
        tokio::task::yield_now().await;
    }
    let st = cache.stats();
    println!("BSTATS {} {}", st.values_carried, st.l2_hits);
    let bus = cache.bus().stats();
    println!("BUSLAG {} {}", bus.lag_p50_micros, bus.lag_p99_micros);
    for (i, t) in applied.lock().unwrap().iter().enumerate() {
        println!("APPLIED {} {t}", i + 1);
    }
    for (i, t) in arrivals.lock().unwrap().iter().enumerate() {
        println!("ARRIVED {} {t}", i + 1);
    }
    for l in bare {
        println!("LAG bare {l}");
    }
    for l in tiered {
        println!("LAG tiered {l}");
    }
}

async fn driver() {
    let server = testkit::RedisServer::start();
    let url = server.url();
    let a = node(&url).await;
    a.set("k", &"0:0".to_string()).await.unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("PROPAGATION_HELPER_URL", &url)
        .envs((!signed()).then_some(("PROPAGATION_UNSIGNED", "1")))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("READY") {
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    }
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..N {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("bare-propagation")
            .arg(now_us().to_string())
            .query_async(&mut raw)
            .await
            .unwrap();
        tokio::time::sleep(GAP).await;
    }
    while !line.starts_with("TRACING") {
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The value carries the time its write started; A also notes when each write returned.
    let mut acked = vec![0u64; N + 2];
    let mut started = vec![0u64; N + 2];
    for i in 1..=N + 1 {
        started[i] = now_us();
        a.set("k", &format!("{i}:{}", started[i])).await.unwrap();
        acked[i] = now_us();
        tokio::time::sleep(GAP).await;
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    child.wait().unwrap();
    let (mut bare, mut tiered, mut from_ack) = (Vec::new(), Vec::new(), Vec::new());
    let mut arrived = vec![0u64; N + 2];
    let mut applied = vec![0u64; N + 2];
    let mut seen = Vec::new();
    for l in rest.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        match f.as_slice() {
            ["LAG", "bare", v] => bare.push(v.parse().unwrap()),
            ["LAG", "tiered", v] => tiered.push(v.parse().unwrap()),
            ["SEEN", i, t, e] => {
                let (i, t, e): (usize, u64, u64) =
                    (i.parse().unwrap(), t.parse().unwrap(), e.parse().unwrap());
                from_ack.push(t.saturating_sub(acked[i]));
                seen.push((i, t, e));
            }
            ["BSTATS", carried, l2] => println!(
                "(B: {carried} changes carried their value into L1, {l2} reads from Redis)"
            ),
            ["BUSLAG", p50, p99] => println!(
                "(B's bus: message built on A -> read by B's cache, p50 {p50} µs, p99 {p99} µs)"
            ),
            ["APPLIED", i, t] => {
                if let Ok(i) = i.parse::<usize>()
                    && i <= N + 1
                {
                    applied[i] = t.parse().unwrap();
                }
            }
            ["ARRIVED", i, t] => {
                if let Ok(i) = i.parse::<usize>()
                    && i <= N + 1
                {
                    arrived[i] = t.parse().unwrap();
                }
            }
            _ => {}
        }
    }
    println!(
        "\npropagation between two processes, one run ({N} changes, {GAP:?} apart, {} bus):",
        if signed() {
            "signed: values carried"
        } else {
            "unsigned: evictions"
        }
    );
    let (bp50, bp99) = summary("bare redis-rs PUBLISH -> receive", bare);
    let (tp50, tp99) = summary("TieredCache set starts on A -> get on B", tiered);
    summary("TieredCache set returns on A -> get on B", from_ack);
    println!(
        "ratio p50 {:.2}x   p99 {:.2}x",
        tp50 / bp50.max(1.0),
        tp99 / bp99.max(1.0)
    );
    println!("\nstages, per change B saw (both processes read the same host clock):");
    let stage = |f: &dyn Fn(usize, u64, u64) -> u64| -> Vec<u64> {
        seen.iter().map(|&(i, t, e)| f(i, t, e)).collect()
    };
    summary(
        "A: set starts -> set returns",
        stage(&|i, _, _| acked[i] - started[i]),
    );
    summary(
        "A: set starts -> B's get returns it",
        stage(&|i, t, _| t.saturating_sub(started[i])),
    );
    summary(
        "A: set starts -> message reaches B",
        stage(&|i, _, _| arrived[i].saturating_sub(started[i])),
    );
    // Two connections of B read the same message; either may be first.
    let mut skew: Vec<i64> = seen
        .iter()
        .map(|&(i, _, _)| applied[i] as i64 - arrived[i] as i64)
        .collect();
    skew.sort_unstable();
    println!(
        "{:<40} n={:<5} p50 {:>8.1} µs   p99 {:>8.1} µs   (signed)",
        "B: message arrives -> applied to L1",
        skew.len(),
        skew[skew.len() / 2] as f64,
        skew[(skew.len() - 1) * 99 / 100] as f64,
    );
    summary(
        "B: applied -> read loop sees L1 changed",
        stage(&|i, _, e| e.saturating_sub(applied[i])),
    );
    summary(
        "B: L1 changed -> get returns the value",
        stage(&|_, t, e| t.saturating_sub(e)),
    );
}

/// A fan-out receiver: a cache on `url` holding the key, and a consumer beside the cache's
/// on its bus noting when each of `writes` evictions was applied. Prints `APPLIED <n> <µs>`.
async fn fanout_receiver(url: String, writes: usize) {
    let cache = node(&url).await;
    cache.get("k").await.unwrap();
    let applied = note_applied(&cache).await;
    println!("READY");
    while applied.lock().unwrap().len() < writes {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, t) in applied.lock().unwrap().iter().enumerate() {
        println!("APPLIED {} {t}", i + 1);
    }
}

/// Redis's CPU time so far (user + sys), in seconds.
fn redis_cpu(server: &testkit::RedisServer) -> f64 {
    server
        .command(&["INFO", "cpu"])
        .lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_sys:")
                .or_else(|| l.strip_prefix("used_cpu_user:"))
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

/// One writer, 2 to 16 receiver processes: `set` starts on A → the eviction applied on each
/// receiver, and Redis's CPU per 1,000 writes. Receivers do not spin on reads (16 of them
/// would starve two cores): the figure is the eviction, after which a receiver's next read
/// goes to Redis.
async fn fanout() {
    const WRITES: usize = 300;
    println!("\nfan-out, one writer, {WRITES} changes {GAP:?} apart:");
    for receivers in [2usize, 4, 8, 16] {
        let server = testkit::RedisServer::start();
        let url = server.url();
        let a = node(&url).await;
        a.set("k", &"0".to_string()).await.unwrap();
        let mut children = Vec::new();
        for _ in 0..receivers {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .env("PROPAGATION_FANOUT_URL", &url)
                .envs((!signed()).then_some(("PROPAGATION_UNSIGNED", "1")))
                .env("PROPAGATION_FANOUT_WRITES", WRITES.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            while !line.starts_with("READY") {
                line.clear();
                std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            }
            children.push((child, out));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Redis's CPU while idle for as long as the writes take (heartbeats, probes, its own
        // timers), then while writing: the difference is the writes' cost.
        let idle_for = GAP * WRITES as u32;
        let cpu = redis_cpu(&server);
        tokio::time::sleep(idle_for).await;
        let idle = redis_cpu(&server) - cpu;
        let writing = std::time::Instant::now();
        let cpu = redis_cpu(&server);
        let mut started = vec![0u64; WRITES + 1];
        for (i, start) in started.iter_mut().enumerate().skip(1) {
            *start = now_us();
            a.set("k", &i.to_string()).await.unwrap();
            tokio::time::sleep(GAP).await;
        }
        let cpu = redis_cpu(&server) - cpu;
        let idle = idle * writing.elapsed().as_secs_f64() / idle_for.as_secs_f64();
        let mut lags = Vec::new();
        for (mut child, mut out) in children {
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
            child.wait().unwrap();
            for l in rest.lines() {
                if let ["APPLIED", i, t] = l.split(' ').collect::<Vec<_>>().as_slice() {
                    let (i, t): (usize, u64) = (i.parse().unwrap(), t.parse().unwrap());
                    lags.push(t.saturating_sub(started[i.min(WRITES)]));
                }
            }
        }
        summary(
            &format!("{receivers:>2} receivers: set starts -> evicted"),
            lags,
        );
        println!(
            "{:<40} Redis CPU per 1,000 writes: {:.1} ms beyond idle ({:.1} ms in all)",
            "",
            (cpu - idle).max(0.0) * 1e6 / WRITES as f64,
            cpu * 1e6 / WRITES as f64
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Ok(url) = std::env::var("PROPAGATION_FANOUT_URL") {
        let writes = std::env::var("PROPAGATION_FANOUT_WRITES")
            .unwrap()
            .parse()
            .unwrap();
        return rt.block_on(fanout_receiver(url, writes));
    }
    match std::env::var("PROPAGATION_HELPER_URL") {
        Ok(url) => rt.block_on(helper(url)),
        Err(_) if std::env::args().any(|a| a == "fanout") => rt.block_on(fanout()),
        Err(_) => rt.block_on(driver()),
    }
}
