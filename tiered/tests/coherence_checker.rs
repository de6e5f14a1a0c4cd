//! The coherence checker: three node processes (this test binary, re-run as helpers) run
//! random set / get / invalidate on 100 keys for 10 s; every operation is recorded, and
//! `testkit::coherence::check` fails any read older than the newest change acknowledged more
//! than Δ before it. Against one server (also while its subscribers are killed) and against a
//! six-node cluster.

mod common;

use std::time::{Duration, Instant};

use common::Target;
use common::checker::{self, Outcome, Run, bus};
use testkit::coherence::{Op, OpKind, check};
use testkit::{Proxy, RedisCluster, RedisServer};

const SECONDS: u64 = 10;

/// Not a test of its own: the body of a helper node, run when the parent asks for it.
#[test]
fn checker_node() {
    checker::node_main();
}

/// Unsigned: every change evicts (the other groups sign, and small values ride in the
/// announcements).
#[test]
fn three_nodes_never_read_older_than_delta() {
    let server = RedisServer::start();
    let unsigned = Run {
        signed: false,
        ..run(Target::single(server.url()))
    };
    let outcome = checker::run("checker_node", &unsigned, || {});
    verdict("single server, unsigned bus", &outcome, 0);
}

/// The same with a signed bus: small values ride in the announcements.
#[test]
fn three_nodes_with_carried_values_never_read_older_than_delta() {
    let server = RedisServer::start();
    let outcome = checker::run("checker_node", &run(Target::single(server.url())), || {});
    verdict("single server, signed bus", &outcome, 0);
}

/// The same while every subscriber connection is killed once a second: the nodes lose
/// messages, notice the gaps and drop L1, and still never serve anything older than allowed.
#[test]
fn three_nodes_stay_coherent_while_their_subscribers_are_killed() {
    let server = RedisServer::start();
    let mut kills = 0;
    let outcome = checker::run("checker_node", &run(Target::single(server.url())), || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(SECONDS) {
            std::thread::sleep(Duration::from_secs(1));
            server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
            kills += 1;
        }
    });
    verdict("single server, subscribers killed", &outcome, kills);
}

/// Three nodes on a Redis Cluster: batches, locks and invalidations cross slots and masters.
#[test]
fn three_nodes_on_a_cluster_never_read_older_than_delta() {
    let cluster = RedisCluster::start();
    let outcome = checker::run("checker_node", &run(Target::cluster(cluster.urls())), || {});
    verdict("cluster", &outcome, 0);
}

/// FLUSHALL every ~700 ms behind the cache's back. Each flush is added to the history as an
/// unacknowledged delete of every key at the flush's time (see `with_vanishings`): it explains
/// reading nothing, and asks nothing of nodes still holding an older copy (a change behind the
/// cache's back may last the L1 TTL). A node that keeps a pre-flush copy after a post-flush
/// write was acknowledged Δ ago (versions restarting after a flush did that) is a violation.
#[test]
fn three_nodes_stay_coherent_through_flushall_every_700ms() {
    let server = RedisServer::start();
    let mut flushes = Vec::new();
    let outcome = checker::run("checker_node", &run(Target::single(server.url())), || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(SECONDS) {
            std::thread::sleep(Duration::from_millis(700));
            let before = checker::now_us();
            server.command(&["FLUSHALL"]);
            flushes.push((before, checker::now_us()));
        }
    });
    let ops = with_vanishings(&outcome.ops, &flushes, &[]);
    let report = check(&ops, bus().bound());
    let judged = Outcome { report, ..outcome };
    verdict(
        &format!("single server, {} FLUSHALLs", flushes.len()),
        &judged,
        0,
    );
}

/// The history with keys vanishing behind the cache's back added as deletions nobody
/// acknowledged: each `(key, µs)` (all keys for `None`) is a delete whose version is that
/// time, which is what Redis's clock-based versions make it (every version written before
/// it is lower, every one after higher). It explains reads of nothing after it and asks
/// nothing of anyone. Changes whose call overlapped a flush are recorded as failed: whether
/// they landed before it or after is unknown.
fn with_vanishings(ops: &[Op], flushes: &[(u64, u64)], evictions: &[(String, u64)]) -> Vec<Op> {
    let overlaps = |start: u64, end: u64| flushes.iter().any(|f| start <= f.1 && f.0 <= end);
    let mut out: Vec<Op> = ops
        .iter()
        .map(|op| {
            let mut op = op.clone();
            op.kind = match op.kind {
                OpKind::Write { value, .. } if overlaps(op.start_us, op.end_us) => {
                    OpKind::Failed { value: Some(value) }
                }
                OpKind::Delete { .. } if overlaps(op.start_us, op.end_us) => {
                    OpKind::Failed { value: None }
                }
                other => other,
            };
            op
        })
        .collect();
    let keys: std::collections::HashSet<String> = ops.iter().map(|o| o.key.clone()).collect();
    let vanished = |key: &str, at: u64| Op {
        node: 99,
        key: key.to_string(),
        start_us: at,
        // Never acknowledged: nothing is judged against it.
        end_us: u64::MAX / 2,
        kind: OpKind::Delete { version: at },
    };
    for f in flushes {
        out.extend(keys.iter().map(|key| vanished(key, f.0)));
    }
    out.extend(evictions.iter().map(|(key, at)| vanished(key, *at)));
    out
}

/// Records which of the checker's keys Redis evicts, and when (keyspace notifications on a
/// connection of its own), until dropped.
struct EvictionLog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(String, u64)>>>,
}

impl EvictionLog {
    fn start(server: &RedisServer) -> Self {
        use std::io::{BufRead, BufReader, Write};
        server.command(&["CONFIG", "SET", "notify-keyspace-events", "Ee"]);
        let mut stream = std::net::TcpStream::connect(server.addr()).unwrap();
        stream
            .write_all(b"SUBSCRIBE __keyevent@0__:evicted\r\n")
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut log = Vec::new();
            let mut line = String::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) => continue,
                }
                // A bulk string line that is one of our data keys: `checker:{KEY}`.
                let text = line.trim_end();
                if let Some(key) = text
                    .strip_prefix("checker:{")
                    .and_then(|k| k.strip_suffix('}'))
                {
                    log.push((key.to_string(), checker::now_us()));
                }
            }
            log
        });
        EvictionLog {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<(String, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or_default()
    }
}

/// Redis evicts under a small `maxmemory` (allkeys-lru) while a nemesis writes junk. Each
/// eviction of one of the checker's keys (from keyspace notifications) joins the history as an
/// unacknowledged delete at the time it was heard of, so reading nothing after it is
/// explained, and a node that keeps an old copy past a later write's Δ is a violation.
#[test]
fn three_nodes_stay_coherent_under_allkeys_lru_eviction() {
    let server = RedisServer::start();
    let log = EvictionLog::start(&server);
    let mut junk = 0u64;
    let outcome = checker::run("checker_node", &run(Target::single(server.url())), || {
        let used = server.info_u64("memory", "used_memory");
        server.command(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
        server.command(&[
            "CONFIG",
            "SET",
            "maxmemory",
            &(used + (2 << 20)).to_string(),
        ]);
        let value = "j".repeat(1024);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(SECONDS) {
            for _ in 0..50 {
                junk += 1;
                server.command(&["SET", &format!("junk:{junk}"), &value]);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let evicted = server.info_u64("stats", "evicted_keys");
    let evictions = log.finish();
    let ops = with_vanishings(&outcome.ops, &[], &evictions);
    let report = check(&ops, bus().bound());
    let judged = Outcome { report, ..outcome };
    println!(
        "eviction: {junk} junk keys written, {evicted} keys evicted, {} of them the checker's",
        evictions.len()
    );
    verdict("single server, allkeys-lru eviction", &judged, 0);
}

/// Node 0 reaches Redis through a Proxy that is a blackhole for 1 s every 3 s. Cut off, it
/// answers from L1 under the outage policy (here 300 ms of outage staleness) while the others
/// keep writing: its reads may then be up to Δ + 300 ms behind, and no more. Reads between Δ
/// and that bound are what the policy allows, counted apart; none may be older.
#[test]
fn three_nodes_stay_coherent_while_one_is_partitioned_every_3s() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.addr());
    let mut holes = 0;
    let staleness = Duration::from_millis(300);
    let mut r = run(Target::single(server.url()));
    r.node_url = Some((0, proxy.url()));
    r.outage_staleness = Some(staleness);
    let outcome = checker::run("checker_node", &r, || {
        let start = Instant::now();
        while start.elapsed() + Duration::from_secs(3) <= Duration::from_secs(SECONDS) {
            std::thread::sleep(Duration::from_secs(2));
            proxy.blackhole();
            holes += 1;
            std::thread::sleep(Duration::from_secs(1));
            proxy.restore();
        }
    });
    let beyond_delta = outcome.report.violations.len();
    assert!(
        outcome.report.violations.iter().all(|v| v.read.node == 0),
        "only the partitioned node may serve under its outage policy: {:?}",
        outcome.report.violations.first()
    );
    let within_policy = Outcome {
        report: check(&outcome.ops, bus().bound() + staleness),
        ..outcome
    };
    println!(
        "partition: {holes} blackholes of 1 s; gaps per node {:?}; outage answers per node {:?}; \
         {beyond_delta} reads older than Δ, all by the partitioned node's outage policy if the \
         verdict below passes",
        within_policy.gaps, within_policy.outage_served
    );
    verdict(
        "single server, node 0 partitioned, judged at Δ + its outage staleness",
        &within_policy,
        0,
    );
}

/// Redis paused (`CLIENT PAUSE ALL`) for 1 s every 3 s. Nobody can acknowledge a change while
/// it is paused, so the reads the nodes answer from L1 under the outage policy (counted apart)
/// are never older than allowed; after each pause the delayed messages arrive and nothing was
/// lost (no gap).
#[test]
fn three_nodes_stay_coherent_while_redis_pauses_every_3s() {
    let server = RedisServer::start();
    let mut pauses = 0;
    let outcome = checker::run("checker_node", &run(Target::single(server.url())), || {
        let start = Instant::now();
        while start.elapsed() + Duration::from_secs(3) <= Duration::from_secs(SECONDS) {
            std::thread::sleep(Duration::from_secs(2));
            server.command(&["CLIENT", "PAUSE", "1000", "ALL"]);
            pauses += 1;
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    println!(
        "pause: {pauses} pauses of 1 s; outage answers per node {:?}; gaps per node {:?}",
        outcome.outage_served, outcome.gaps
    );
    verdict("single server, Redis paused 1 s in 3", &outcome, 0);
}

/// Node 0's writes and deletes run under random timeouts below 1 ms, so some are cancelled
/// mid-way (recorded as failed changes: they may have landed).
#[test]
fn three_nodes_stay_coherent_with_a_node_whose_writes_are_cancelled() {
    let server = RedisServer::start();
    let mut r = run(Target::single(server.url()));
    r.cancel_writes = Some((0, Duration::from_millis(1)));
    let outcome = checker::run("checker_node", &r, || {});
    verdict("single server, node 0's writes cancelled", &outcome, 0);
}

fn run(target: Target) -> Run {
    Run::plain(target, SECONDS)
}

fn verdict(what: &str, outcome: &Outcome, kills: u32) {
    let report = &outcome.report;
    println!(
        "coherence checker ({what}), Δ = {:?}, subscriber kills {kills}, errors {}: {report}",
        bus().bound(),
        outcome.errors_us.len()
    );
    for v in report.violations.iter().take(5) {
        println!("  violation: {v:?}");
    }
    assert!(report.reads > 1000, "{report}");
    assert_eq!(report.unknown_values, 0, "{report}");
    assert!(report.violations.is_empty(), "{report}");
}
