//! The coherence checker: three node processes (this test binary, re-run as helpers) run
//! random set / get / invalidate on 100 keys against one Redis for 10 s; every operation is
//! recorded, and `testkit::coherence::check` fails any read older than the newest change
//! acknowledged more than Δ before it.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use invalidation::BusConfig;
use testkit::coherence::{Op, OpKind, check};
use testkit::{RedisServer, command_at};
use tiered::{EntryOptions, TieredCache};

const NODES: u32 = 3;
const KEYS: usize = 100;
const SECONDS: u64 = 10;
const WORKERS: usize = 4;

fn bus() -> BusConfig {
    BusConfig::default()
        .heartbeat(Duration::from_millis(200))
        .heartbeat_timeout(Duration::from_millis(300))
}

fn now_us() -> u64 {
    invalidation::message::now_micros()
}

/// Not a test of its own: the body of a helper node, run when the parent sets
/// `TIERED_CHECKER_URL`.
#[test]
fn checker_node() {
    let Ok(url) = std::env::var("TIERED_CHECKER_URL") else {
        return;
    };
    let addr: SocketAddr = std::env::var("TIERED_CHECKER_ADDR")
        .unwrap()
        .parse()
        .unwrap();
    let node: u32 = std::env::var("TIERED_CHECKER_NODE")
        .unwrap()
        .parse()
        .unwrap();
    common::node_runtime().block_on(async move {
        let cache: TieredCache<String> = TieredCache::builder()
            .namespace("checker")
            .redis_url(url)
            .bus_config(bus())
            .default_options(EntryOptions::new(Duration::from_secs(600)))
            .build()
            .await
            .unwrap();
        command_at(addr, &["INCR", "ready"]);
        while command_at(addr, &["GET", "go"]) != "1" {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let end = Instant::now() + Duration::from_secs(SECONDS);
        let mut workers = Vec::new();
        for w in 0..WORKERS {
            let cache = cache.clone();
            workers.push(tokio::spawn(async move {
                let mut ops = Vec::new();
                let mut n = 0u64;
                while Instant::now() < end {
                    let key = format!("k{}", fastrand::usize(..KEYS));
                    let start_us = now_us();
                    let roll = fastrand::u32(..100);
                    let kind = if roll < 60 {
                        match cache.get(&key).await {
                            Ok(value) => OpKind::Read { value },
                            Err(_) => continue,
                        }
                    } else if roll < 92 {
                        n += 1;
                        let value = format!("n{node}w{w}-{n}");
                        match cache.set(&key, &value).await {
                            Ok(version) => OpKind::Write { value, version },
                            Err(_) => continue,
                        }
                    } else {
                        match cache.invalidate(&key).await {
                            Ok(version) => OpKind::Delete { version },
                            Err(_) => continue,
                        }
                    };
                    ops.push(Op {
                        node,
                        key,
                        start_us,
                        end_us: now_us(),
                        kind,
                    });
                }
                ops
            }));
        }
        for w in workers {
            for op in w.await.unwrap() {
                println!("OP {}", op.to_line());
            }
        }
        let s = cache.stats();
        println!(
            "NODE {node}: l1 hits {}, l2 hits {}, invalidations received {}, ignored {}, gaps {}",
            s.l1_hits, s.l2_hits, s.invalidations_received, s.invalidations_ignored, s.gaps
        );
    });
}

#[test]
fn three_nodes_never_read_older_than_delta() {
    run_checker(false);
}

/// The same while every subscriber connection is killed once a second: the nodes lose
/// messages, notice the gaps and drop L1, and still never serve anything older than allowed.
#[test]
fn three_nodes_stay_coherent_while_their_subscribers_are_killed() {
    run_checker(true);
}

fn run_checker(kill_subscribers: bool) {
    let server = RedisServer::start();
    let children: Vec<_> = (0..NODES)
        .map(|node| {
            Command::new(std::env::current_exe().unwrap())
                .args(["checker_node", "--exact", "--nocapture", "--test-threads=1"])
                .env("TIERED_CHECKER_URL", server.url())
                .env("TIERED_CHECKER_ADDR", server.addr().to_string())
                .env("TIERED_CHECKER_NODE", node.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.command(&["GET", "ready"]) != NODES.to_string() {
        assert!(Instant::now() < deadline, "nodes did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    server.command(&["SET", "go", "1"]);
    let mut kills = 0;
    if kill_subscribers {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(SECONDS) {
            std::thread::sleep(Duration::from_secs(1));
            server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
            kills += 1;
        }
    }
    let mut ops = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "a node failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in stdout.lines() {
            if let Some(at) = line.find("OP ") {
                ops.push(Op::from_line(&line[at + 3..]).expect("a well-formed op line"));
            } else if let Some(at) = line.find("NODE ") {
                println!("{}", &line[at..]);
            }
        }
    }
    let delta = bus().bound();
    let report = check(&ops, delta);
    println!("coherence checker, Δ = {delta:?}, subscriber kills {kills}: {report}");
    for v in report.violations.iter().take(5) {
        println!("  violation: {v:?}");
    }
    assert!(report.reads > 1000, "{report}");
    assert_eq!(report.unknown_values, 0, "{report}");
    assert!(report.violations.is_empty(), "{report}");
}
