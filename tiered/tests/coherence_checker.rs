//! The coherence checker: three node processes (this test binary, re-run as helpers) run
//! random set / get / invalidate on 100 keys for 10 s; every operation is recorded, and
//! `testkit::coherence::check` fails any read older than the newest change acknowledged more
//! than Δ before it. Against one server (also while its subscribers are killed) and against a
//! six-node cluster.

mod common;

use std::time::{Duration, Instant};

use common::Target;
use common::checker::{self, Outcome, Run, bus};
use testkit::{RedisCluster, RedisServer};

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

fn run(target: Target) -> Run {
    Run {
        target,
        seconds: SECONDS,
        replica_ack_timeout: None,
    }
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
