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

#[test]
fn three_nodes_never_read_older_than_delta() {
    let server = RedisServer::start();
    let outcome = checker::run("checker_node", &run(Target::single(server.url())), || {});
    verdict("single server", &outcome, 0);
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

/// FLUSHALL every ~700 ms behind the cache's back. Redis loses everything and write versions
/// start again at 1, so the history is re-based before it is checked: a write that ran wholly
/// between two flushes gets its flush epoch as the high part of its version, one that
/// overlapped a flush counts as failed (it may have landed before or after), and each flush
/// is an unacknowledged delete (it explains reading nothing, and asks nothing of nodes still
/// holding an older copy: the docs allow a change behind the back to last the L1 TTL). A node
/// that ignores a post-flush write because its copy has a higher pre-flush version is a
/// violation.
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
    let ops = rebase_on_flushes(&outcome.ops, &flushes);
    let report = check(&ops, bus().bound());
    let rebased = Outcome { report, ..outcome };
    verdict(
        &format!("single server, {} FLUSHALLs", flushes.len()),
        &rebased,
        0,
    );
}

fn rebase_on_flushes(ops: &[Op], flushes: &[(u64, u64)]) -> Vec<Op> {
    const EPOCH: u64 = 1 << 32;
    let epoch_of = |start: u64, end: u64| -> Option<u64> {
        let before_start = flushes.iter().filter(|f| f.1 < start).count() as u64;
        let before_end = flushes.iter().filter(|f| f.0 < end).count() as u64;
        (before_start == before_end).then_some(before_start)
    };
    let mut out = Vec::new();
    for op in ops {
        let mut op = op.clone();
        op.kind = match op.kind {
            OpKind::Write { value, version } => match epoch_of(op.start_us, op.end_us) {
                Some(e) => OpKind::Write {
                    value,
                    version: e * EPOCH + version,
                },
                None => OpKind::Failed { value: Some(value) },
            },
            OpKind::Delete { version } => match epoch_of(op.start_us, op.end_us) {
                Some(e) => OpKind::Delete {
                    version: e * EPOCH + version,
                },
                None => OpKind::Failed { value: None },
            },
            other => other,
        };
        out.push(op);
    }
    let keys: std::collections::HashSet<String> = ops.iter().map(|o| o.key.clone()).collect();
    for (i, f) in flushes.iter().enumerate() {
        for key in &keys {
            out.push(Op {
                node: 99,
                key: key.clone(),
                start_us: f.0,
                // Never acknowledged: nothing is judged against it.
                end_us: u64::MAX / 2,
                kind: OpKind::Delete {
                    version: (i as u64 + 1) * EPOCH,
                },
            });
        }
    }
    out
}

/// Redis evicts under a small `maxmemory` (allkeys-lru) while a nemesis writes junk. The
/// checker orders a key's changes by write version, which starts again at 1 after the key
/// (and its tombstone) is evicted; eviction times per key are unknown, so that is not
/// re-based: reads of nothing are explained by eviction only if a violation says `saw: 0`.
#[test]
fn three_nodes_stay_coherent_under_allkeys_lru_eviction() {
    let server = RedisServer::start();
    let mut junk = 0u64;
    let outcome = checker::run("checker_node", &run(Target::single(server.url())), || {
        let used: u64 = server
            .command(&["INFO", "memory"])
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
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
    let evicted = server
        .command(&["INFO", "stats"])
        .lines()
        .find_map(|l| l.strip_prefix("evicted_keys:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    let nothing = outcome
        .report
        .violations
        .iter()
        .filter(|v| v.saw == 0)
        .count();
    println!(
        "eviction: {junk} junk keys written, {evicted} keys evicted; {nothing} of the \
         violations are reads of nothing"
    );
    verdict("single server, allkeys-lru eviction", &outcome, 0);
}

/// Node 0 reaches Redis through a Proxy that is a blackhole for 1 s every 3 s.
#[test]
fn three_nodes_stay_coherent_while_one_is_partitioned_every_3s() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.addr());
    let mut holes = 0;
    let mut r = run(Target::single(server.url()));
    r.node_url = Some((0, proxy.url()));
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
    println!(
        "partition: {holes} blackholes of 1 s; gaps per node {:?}",
        outcome.gaps
    );
    verdict("single server, node 0 partitioned", &outcome, 0);
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
