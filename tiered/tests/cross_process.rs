//! Cross-process dedup: four OS processes (this test binary, re-run as helper nodes) with 250
//! callers each ask for one cold key at once. Loads are counted with INCR on the test's own
//! Redis.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use testkit::{RedisServer, command_at};
use tiered::{EntryOptions, TieredCache};

const NODES: usize = 4;
const CALLERS: usize = 250;

/// Not a test of its own: the body of a helper node, run when the parent test sets
/// `TIERED_NODE_URL`.
#[test]
fn node_process() {
    let Ok(url) = std::env::var("TIERED_NODE_URL") else {
        return;
    };
    let addr: SocketAddr = std::env::var("TIERED_NODE_ADDR").unwrap().parse().unwrap();
    let kill_mode = std::env::var("TIERED_NODE_MODE").as_deref() == Ok("kill");
    common::node_runtime().block_on(async move {
        let cache: TieredCache<String> = TieredCache::builder()
            .namespace("xproc")
            .redis_url(url)
            .lock_time_to_live(Duration::from_secs(1))
            .default_options(
                EntryOptions::new(Duration::from_secs(60)).hard_timeout(Duration::from_secs(30)),
            )
            .build()
            .await
            .unwrap();
        let cmd = move |args: &'static [&'static str]| {
            tokio::task::spawn_blocking(move || command_at(addr, args))
        };
        cmd(&["INCR", "ready"]).await.unwrap();
        while cmd(&["GET", "go"]).await.unwrap() != "1" {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
        let mut tasks = Vec::new();
        for _ in 0..CALLERS {
            let (cache, barrier) = (cache.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                cache
                    .get_or_set("cold", move || async move {
                        let n: u64 = tokio::task::spawn_blocking(move || {
                            command_at(addr, &["INCR", "loads"])
                        })
                        .await
                        .unwrap()
                        .parse()
                        .unwrap();
                        if kill_mode && n == 1 {
                            let pid = std::process::id().to_string();
                            tokio::task::spawn_blocking(move || {
                                command_at(addr, &["SET", "holder", &pid])
                            })
                            .await
                            .unwrap();
                            // Killed by the parent while "loading".
                            tokio::time::sleep(Duration::from_secs(120)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, std::io::Error>(format!("value-{n}"))
                    })
                    .await
            }));
        }
        let mut values = std::collections::BTreeSet::new();
        let mut ok = 0;
        for t in tasks {
            if let Ok(v) = t.await.unwrap() {
                ok += 1;
                values.insert(v);
            }
        }
        println!(
            "RESULT ok={ok} values={values:?} lock_waits={}",
            cache.stats().lock_waits
        );
        assert_eq!(ok, CALLERS);
    });
}

fn spawn_node(server: &RedisServer, mode: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["node_process", "--exact", "--nocapture", "--test-threads=1"])
        .env("TIERED_NODE_URL", server.url())
        .env("TIERED_NODE_ADDR", server.addr().to_string())
        .env("TIERED_NODE_MODE", mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs the helper nodes; returns (stdout of each surviving node, loads counted).
fn run(mode: &str) -> (Vec<String>, u64) {
    let server = RedisServer::start();
    let mut nodes: Vec<Option<Child>> = (0..NODES)
        .map(|_| Some(spawn_node(&server, mode)))
        .collect();
    testkit::wait_until(Duration::from_secs(60), "all nodes ready", || {
        server.command(&["GET", "ready"]) == NODES.to_string()
    });
    server.command(&["SET", "go", "1"]);
    if mode == "kill" {
        testkit::wait_until(Duration::from_secs(30), "a holder started loading", || {
            !server.command(&["GET", "holder"]).is_empty()
        });
        let pid: u32 = server.command(&["GET", "holder"]).parse().unwrap();
        let holder = nodes
            .iter_mut()
            .find(|n| n.as_ref().is_some_and(|c| c.id() == pid))
            .expect("the holder is one of our nodes");
        let mut child = holder.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let mut outputs = Vec::new();
    for child in nodes.into_iter().flatten() {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "a node failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(stdout);
    }
    let loads = server.command(&["GET", "loads"]).parse().unwrap();
    (outputs, loads)
}

fn result_lines(outputs: &[String]) -> Vec<String> {
    outputs
        .iter()
        .filter_map(|o| o.lines().find_map(|l| l.find("RESULT").map(|at| &l[at..])))
        .map(str::to_string)
        .collect()
}

#[test]
fn four_processes_of_250_callers_run_the_loader_once() {
    let (outputs, loads) = run("plain");
    let results = result_lines(&outputs);
    println!("{NODES} processes x {CALLERS} callers: {loads} load(s); {results:#?}");
    if results.len() != NODES {
        println!("raw: {outputs:#?}");
    }
    assert_eq!(results.len(), NODES);
    for r in &results {
        assert!(
            r.starts_with(&format!("RESULT ok={CALLERS} values={{\"value-1\"}}")),
            "{r}"
        );
    }
    assert_eq!(loads, 1);
}

#[test]
fn killing_the_holder_mid_load_costs_at_most_one_more_load() {
    let (outputs, loads) = run("kill");
    let results = result_lines(&outputs);
    println!("holder killed: {loads} load(s); survivors {results:#?}");
    assert_eq!(results.len(), NODES - 1, "three nodes survive");
    for r in &results {
        assert!(r.starts_with(&format!("RESULT ok={CALLERS} ")), "{r}");
    }
    assert!(loads <= 2, "{loads} loads");
}
