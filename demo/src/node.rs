//! One node: a process with its own `TieredCache` (its own L1, Redis connections and
//! invalidation bus) that runs the workload and reports back.
//!
//! Protocol with the coordinator: the node prints `ready` on stdout once its cache is
//! connected, starts when it reads `go` on stdin, prints `progress <requests>` about every
//! 200 ms, writes its report and history into the output directory and prints `done`. When its
//! stdin closes (the coordinator is gone) it exits at once.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use invalidation::BusConfig;
use serde::{Deserialize, Serialize};
use testkit::coherence::{Op, OpKind};
use tiered::{EntryOptions, TieredCache};

use crate::db::Db;
use crate::stats::{BusCounts, CacheCounts, Histogram, NodeReport, TIERS, Tier, Zipf};

/// The environment variable that carries the Redis URL to the nodes (not their command line,
/// where a password would show in `ps`).
pub(crate) const REDIS_URL_ENV: &str = "TIERED_DEMO_REDIS_URL";

/// The share of write operations that are deletes (database delete, then `invalidate`).
const DELETE_SHARE: f64 = 0.1;

/// Reads each worker records in full before it starts keeping only every 2nd, then every
/// 4th, ... read in its history (writes and deletes are always kept): bounds memory when L1
/// hits run at millions per second.
const READ_BUDGET: u64 = 25_000;

/// How often a worker yields to the runtime, in requests: L1 hits never wait, and the bus
/// listener must get its turn.
const YIELD_EVERY: u64 = 8;

/// The bus heartbeat: P = 200 ms, T = 300 ms, so Δ = 500 ms (as in the coherence test).
pub(crate) fn bus_config() -> BusConfig {
    BusConfig::default()
        .heartbeat(Duration::from_millis(200))
        .heartbeat_timeout(Duration::from_millis(300))
}

/// What the coordinator tells every node (as JSON on its command line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Settings {
    /// The cache namespace of this run.
    pub(crate) namespace: String,
    /// The Redis key prefix of the database rows of this run.
    pub(crate) db_prefix: String,
    /// Where to write the report and history.
    pub(crate) out_dir: std::path::PathBuf,
    /// How long to run.
    pub(crate) duration: Duration,
    /// Key count.
    pub(crate) keys: u64,
    /// Zipf exponent.
    pub(crate) zipf: f64,
    /// Share of operations that write.
    pub(crate) write_ratio: f64,
    /// Worker tasks.
    pub(crate) workers: u32,
    /// L1 budget.
    pub(crate) l1_bytes: u64,
    /// Entry TTL.
    pub(crate) ttl: Duration,
    /// Stale-while-revalidate window.
    pub(crate) swr: Duration,
    /// Database latency per query.
    pub(crate) db_latency: Duration,
    /// The seed URLs of a Redis Cluster for L2 (empty: L2 is the single Redis).
    #[serde(default)]
    pub(crate) cache_cluster: Vec<String>,
}

/// Runs node `index` with `settings` (JSON); returns the process exit code.
pub(crate) fn main(index: u32, settings: &str) -> std::process::ExitCode {
    let result = serde_json::from_str::<Settings>(settings)
        .map_err(|e| format!("bad settings: {e}"))
        .and_then(|settings| {
            let url = std::env::var(REDIS_URL_ENV).map_err(|_| {
                format!("{REDIS_URL_ENV} is not set: nodes are started by the demo")
            })?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?
                .block_on(run(index, settings, url))
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("node {index}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints one protocol line; a closed stdout means the coordinator is gone.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(3);
    }
}

/// The error and its sources, `: `-separated.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Everything a worker needs.
struct Ctx {
    node: u32,
    cache: TieredCache<String>,
    db: Arc<Db>,
    zipf: Zipf,
    write_ratio: f64,
    progress: AtomicU64,
}

/// What a worker did.
#[derive(Default)]
struct WorkerOut {
    latencies: [Histogram; TIERS],
    reads: u64,
    writes: u64,
    deletes: u64,
    errors: u64,
    first_error: Option<String>,
    overtaken: u64,
    reads_recorded: u64,
    ops: Vec<Op>,
}

impl WorkerOut {
    fn failed(&mut self, what: &str, e: &dyn std::error::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {}", chain(e)));
        }
    }
}

async fn run(index: u32, s: Settings, url: String) -> Result<(), String> {
    // Wait for `go` on stdin; exit when stdin closes.
    let (go_tx, go_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut go = Some(go_tx);
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if l.trim() == "go" => {
                    if let Some(tx) = go.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        std::process::exit(3);
    });

    let options = EntryOptions::new(s.ttl)
        .stale_while_revalidate(s.swr)
        .negative_ttl(s.ttl);
    let builder = TieredCache::builder().namespace(&s.namespace);
    let builder = if s.cache_cluster.is_empty() {
        builder.redis_url(&url)
    } else {
        builder.redis_cluster(s.cache_cluster.clone())
    };
    let cache: TieredCache<String> = builder
        .l1_max_bytes(s.l1_bytes)
        .bus_config(bus_config())
        .default_options(options)
        .build()
        .await
        .map_err(|e| format!("cannot build the cache: {}", chain(&e)))?;
    let db = Db::connect(&url, &s.db_prefix, s.db_latency)
        .await
        .map_err(|e| format!("cannot connect to the database: {}", chain(e.as_ref())))?;
    let ctx = Arc::new(Ctx {
        node: index,
        cache,
        db: Arc::new(db),
        zipf: Zipf::new(s.keys, s.zipf),
        write_ratio: s.write_ratio,
        progress: AtomicU64::new(0),
    });
    say("ready");
    go_rx
        .await
        .map_err(|_| "the coordinator went away".to_string())?;

    let end = Instant::now() + s.duration;
    let reporter = {
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                say(&format!(
                    "progress {}",
                    ctx.progress.load(Ordering::Relaxed)
                ));
            }
        })
    };
    let workers: Vec<_> = (0..s.workers)
        .map(|w| tokio::spawn(worker(Arc::clone(&ctx), w, end)))
        .collect();
    let mut outs = Vec::with_capacity(workers.len());
    for w in workers {
        outs.push(w.await.map_err(|e| format!("a worker failed: {e}"))?);
    }
    reporter.abort();
    say(&format!(
        "progress {}",
        ctx.progress.load(Ordering::Relaxed)
    ));

    write_results(&ctx, &s, outs)?;
    say("done");
    Ok(())
}

fn write_results(ctx: &Ctx, s: &Settings, outs: Vec<WorkerOut>) -> Result<(), String> {
    let ops_file = s.out_dir.join(format!("node-{}.ops", ctx.node));
    let mut ops = std::io::BufWriter::new(
        std::fs::File::create(&ops_file)
            .map_err(|e| format!("cannot write {}: {e}", ops_file.display()))?,
    );
    let mut report = NodeReport {
        node: ctx.node,
        ops_file: ops_file.clone(),
        ..NodeReport::default()
    };
    let mut latencies: [Histogram; TIERS] = Default::default();
    for out in outs {
        for (all, mine) in latencies.iter_mut().zip(&out.latencies) {
            all.merge(mine);
        }
        report.reads += out.reads;
        report.writes += out.writes;
        report.deletes += out.deletes;
        report.errors += out.errors;
        report.overtaken += out.overtaken;
        report.reads_recorded += out.reads_recorded;
        if report.first_error.is_none() {
            report.first_error = out.first_error;
        }
        for op in &out.ops {
            writeln!(ops, "{}", op.to_line())
                .map_err(|e| format!("cannot write {}: {e}", ops_file.display()))?;
        }
    }
    ops.flush()
        .map_err(|e| format!("cannot write {}: {e}", ops_file.display()))?;
    report.latencies = latencies.iter().map(Histogram::to_sparse).collect();
    report.db_loads = ctx.db.loads.load(Ordering::Relaxed);
    report.db_queries = ctx.db.queries.load(Ordering::Relaxed);
    report.cache = CacheCounts::from(&ctx.cache.stats());
    let bus = ctx.cache.bus().stats();
    report.bus = BusCounts {
        received: bus.received,
        gaps: bus.gaps,
        heartbeats_missed: bus.heartbeats_missed,
        probes_late: bus.probes_late,
        probe_micros: bus.probe_micros,
        lag_p50_micros: bus.lag_p50_micros,
        lag_p99_micros: bus.lag_p99_micros,
        lag_max_micros: bus.lag_max_micros,
        lag_samples: bus.lag_samples as u64,
    };
    let path = s.out_dir.join(format!("node-{}.json", ctx.node));
    let json = serde_json::to_vec(&report).map_err(|e| format!("cannot encode the report: {e}"))?;
    std::fs::write(&path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn now_us() -> u64 {
    invalidation::now_micros()
}

async fn worker(ctx: Arc<Ctx>, w: u32, end: Instant) -> WorkerOut {
    let mut out = WorkerOut::default();
    let mut written = 0u64;
    let mut done = 0u64;
    let mut reads_seen = 0u64;
    let mut stride = 1u64;
    while Instant::now() < end {
        let key = format!("k{}", ctx.zipf.sample());
        if fastrand::f64() < ctx.write_ratio {
            written += 1;
            if fastrand::f64() < DELETE_SHARE {
                delete(&ctx, &mut out, key).await;
            } else {
                let value = format!("n{}w{w}-{written}", ctx.node);
                write(&ctx, &mut out, key, value).await;
            }
        } else {
            reads_seen += 1;
            let before = out.reads_recorded;
            read(&ctx, &mut out, key, reads_seen.is_multiple_of(stride)).await;
            if out.reads_recorded != before && out.reads_recorded.is_multiple_of(READ_BUDGET) {
                stride *= 2;
            }
        }
        done += 1;
        if done.is_multiple_of(YIELD_EVERY) {
            ctx.progress.fetch_add(YIELD_EVERY, Ordering::Relaxed);
            tokio::task::yield_now().await;
        }
    }
    ctx.progress
        .fetch_add(done % YIELD_EVERY, Ordering::Relaxed);
    out
}

/// A read through the cache; its tier is L1 if the key was fresh in L1 just before and the
/// loader did not run, "load" if this call's loader ran, else L2.
async fn read(ctx: &Ctx, out: &mut WorkerOut, key: String, record: bool) {
    let was_fresh = ctx.cache.is_fresh_locally(&key);
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loader = {
        let db = Arc::clone(&ctx.db);
        let ran = Arc::clone(&ran);
        let key = key.clone();
        move || async move {
            ran.store(true, Ordering::Relaxed);
            db.load(&key).await
        }
    };
    let start_us = now_us();
    let t = Instant::now();
    let result = ctx.cache.get_or_set(&key, loader).await;
    let took = t.elapsed();
    let end_us = now_us();
    let value = match result {
        Ok(v) => Some(v),
        Err(e) if e.is_not_found() => None,
        Err(e) => {
            out.failed("read", &e);
            return;
        }
    };
    let tier = if ran.load(Ordering::Relaxed) {
        Tier::Load
    } else if was_fresh {
        Tier::L1
    } else {
        Tier::L2
    };
    out.latencies[tier as usize].record(took);
    out.reads += 1;
    if record {
        out.reads_recorded += 1;
        out.ops.push(Op {
            node: ctx.node,
            key,
            start_us,
            end_us,
            kind: OpKind::Read { value },
        });
    }
}

/// A write: the database first (it assigns the version the history records), then the cache.
/// If a newer database write overtook this one, this `set` may have put the older value in
/// the cache after the newer one: the version check catches that and invalidates the key, so
/// the next read loads the newest row.
async fn write(ctx: &Ctx, out: &mut WorkerOut, key: String, value: String) {
    let start_us = now_us();
    let t = Instant::now();
    let version = match ctx.db.write(&key, &value).await {
        Ok(v) => v,
        Err(e) => return out.failed("database write", e.as_ref()),
    };
    if let Err(e) = ctx.cache.set(&key, &value).await {
        out.failed("cache set", &e);
        // The cache's state is unknown: drop the key so the next read loads the row.
        let _ = ctx.cache.invalidate(&key).await;
    } else {
        match ctx.db.version(&key).await {
            Ok(now) if now == version => {}
            Ok(_) => {
                out.overtaken += 1;
                if let Err(e) = ctx.cache.invalidate(&key).await {
                    out.failed("cache invalidate", &e);
                }
            }
            Err(e) => {
                out.failed("database version check", e.as_ref());
                let _ = ctx.cache.invalidate(&key).await;
            }
        }
    }
    out.latencies[Tier::Write as usize].record(t.elapsed());
    out.writes += 1;
    out.ops.push(Op {
        node: ctx.node,
        key,
        start_us,
        end_us: now_us(),
        kind: OpKind::Write { value, version },
    });
}

/// A delete: the database row first, then `invalidate` (always safe: the next read loads).
async fn delete(ctx: &Ctx, out: &mut WorkerOut, key: String) {
    let start_us = now_us();
    let t = Instant::now();
    let version = match ctx.db.delete(&key).await {
        Ok(v) => v,
        Err(e) => return out.failed("database delete", e.as_ref()),
    };
    if let Err(e) = ctx.cache.invalidate(&key).await {
        out.failed("cache invalidate", &e);
    }
    out.latencies[Tier::Write as usize].record(t.elapsed());
    out.deletes += 1;
    out.ops.push(Op {
        node: ctx.node,
        key,
        start_us,
        end_us: now_us(),
        kind: OpKind::Delete { version },
    });
}
