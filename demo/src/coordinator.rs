//! The coordinator (the default mode): finds or starts Redis, starts the node processes, shows
//! their progress, collects their reports and histories, runs the coherence checker and prints
//! the summary.

use parking_lot::Mutex;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use redis::IntoConnectionInfo;
use testkit::coherence::{Op, OpKind};

use crate::node::{self, REDIS_URL_ENV, Settings};
use crate::stats::{Histogram, NodeReport, TIERS, thousands};
use crate::{Failure, RunArgs};

/// How long nodes may take to connect and report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long nodes may take after the workload's end to finish and report.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a Redis at `REDIS_URL` may take to answer the first PING.
const REACH_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the demo; `Ok(false)` when the coherence checker found violations.
pub(crate) fn run(args: &RunArgs) -> Result<bool, Failure> {
    let redis = Redis::for_run()?;
    let run_id = format!("{}-{}", std::process::id(), now_us() / 1000 % 100_000_000);
    let namespace = format!("demo-{run_id}");
    let db_prefix = format!("demo-db:{run_id}:");
    let out = OutDir::create(&run_id)?;
    let cluster = if args.cluster {
        let cluster = start_private(testkit::RedisCluster::start, "a local Redis Cluster")?;
        let ports: Vec<String> = cluster
            .nodes()
            .iter()
            .map(|n| n.port().to_string())
            .collect();
        println!(
            "Started a local Redis Cluster for L2 (3 masters, 3 replicas on 127.0.0.1 ports {}); \
             the database stays on the single Redis.",
            ports.join(", ")
        );
        Some(cluster)
    } else {
        None
    };
    let settings = Settings {
        cache_cluster: cluster.as_ref().map(|c| c.urls()).unwrap_or_default(),
        namespace: namespace.clone(),
        db_prefix: db_prefix.clone(),
        out_dir: out.path.clone(),
        duration: args.duration,
        keys: args.keys,
        zipf: args.zipf,
        write_ratio: args.write_ratio,
        workers: args.workers,
        l1_bytes: args.l1_bytes,
        ttl: args.ttl,
        swr: args.swr,
        db_latency: args.db_latency,
    };
    let settings = serde_json::to_string(&settings)
        .map_err(|e| Failure::run(format!("cannot encode the node settings: {e}")))?;
    let exe = std::env::current_exe()
        .map_err(|e| Failure::run(format!("cannot find this executable to start nodes: {e}")))?;

    let (tx, rx) = mpsc::channel();
    let mut fleet = Fleet::default();
    for i in 0..args.nodes {
        fleet.spawn(&exe, i, &settings, &redis.url, tx.clone())?;
    }
    drop(tx);
    fleet.wait_ready(&rx)?;
    println!(
        "{} node{} × {} workers ready (namespace {namespace}); running for {} ...",
        args.nodes,
        if args.nodes == 1 { "" } else { "s" },
        args.workers,
        humantime::format_duration(args.duration)
    );
    let start_us = now_us();
    fleet.go()?;
    fleet.watch(&rx, args.duration)?;
    fleet.wait_exits()?;

    let mut reports = Vec::new();
    let mut latencies: [Histogram; TIERS] = Default::default();
    let mut history = Vec::new();
    for i in 0..args.nodes {
        let report = read_report(&out.path.join(format!("node-{i}.json")))?;
        for (all, sparse) in latencies.iter_mut().zip(&report.latencies) {
            all.merge(&Histogram::from_sparse(sparse).map_err(Failure::run)?);
        }
        read_history(&report.ops_file, &mut history)?;
        reports.push(report);
    }
    add_seeds(&mut history, args.nodes);
    let delta = node::bus_config().bound();
    let check = testkit::coherence::check(&history, delta);
    println!();
    crate::summary::print(
        args, &reports, &latencies, &check, &history, delta, start_us,
    );
    redis.clean_up(&namespace, &db_prefix);
    drop(cluster);
    Ok(check.violations.is_empty() && check.unknown_values == 0)
}

fn now_us() -> u64 {
    invalidation::now_micros()
}

/// Every row starts out holding its seed value at version 0 (see `db`): one write per key
/// read, acknowledged before anything else, so the checker knows those values.
fn add_seeds(history: &mut Vec<Op>, nodes: u32) {
    let keys: HashSet<String> = history.iter().map(|o| o.key.clone()).collect();
    for key in keys {
        history.push(Op {
            node: nodes,
            key: key.clone(),
            start_us: 0,
            end_us: 0,
            kind: OpKind::Write {
                value: crate::db::seed_value(&key),
                version: 0,
            },
        });
    }
}

fn read_report(path: &Path) -> Result<NodeReport, Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::run(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Failure::run(format!("bad node report {}: {e}", path.display())))
}

fn read_history(path: &Path, into: &mut Vec<Op>) -> Result<(), Failure> {
    let file = std::fs::File::open(path)
        .map_err(|e| Failure::run(format!("cannot read {}: {e}", path.display())))?;
    for line in BufReader::new(file).lines() {
        let line =
            line.map_err(|e| Failure::run(format!("cannot read {}: {e}", path.display())))?;
        let op = Op::from_line(&line).ok_or_else(|| {
            Failure::run(format!("bad history line in {}: {line}", path.display()))
        })?;
        into.push(op);
    }
    Ok(())
}

/// The directory the nodes write their reports to; removed on drop.
struct OutDir {
    path: PathBuf,
}

impl OutDir {
    fn create(run_id: &str) -> Result<OutDir, Failure> {
        let path = std::env::temp_dir().join(format!("tiered-demo-{run_id}"));
        std::fs::create_dir_all(&path)
            .map_err(|e| Failure::run(format!("cannot create {}: {e}", path.display())))?;
        Ok(OutDir { path })
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The Redis of this run: the one at `REDIS_URL`, or a private server (stopped on drop).
struct Redis {
    url: String,
    /// Whether it is someone else's (then this run's keys are deleted at the end).
    shared: bool,
    _server: Option<testkit::RedisServer>,
}

impl Redis {
    fn for_run() -> Result<Redis, Failure> {
        match std::env::var("REDIS_URL") {
            Ok(url) if !url.trim().is_empty() => {
                let addr = check_reachable(&url)?;
                println!("Using the Redis at REDIS_URL ({addr}).");
                Ok(Redis {
                    url,
                    shared: true,
                    _server: None,
                })
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(Failure::run("REDIS_URL is not valid UTF-8"))
            }
            _ => {
                let server = start_private_server()?;
                println!(
                    "REDIS_URL is not set: started a private redis-server on 127.0.0.1:{} \
                     (it stops when the demo ends).",
                    server.port()
                );
                Ok(Redis {
                    url: server.url(),
                    shared: false,
                    _server: Some(server),
                })
            }
        }
    }

    /// Deletes this run's keys from a shared Redis (best effort; a private one just stops).
    fn clean_up(&self, namespace: &str, db_prefix: &str) {
        if !self.shared {
            return;
        }
        let patterns = [
            tiered::KeySpace::new(namespace).match_pattern(),
            format!("{db_prefix}*"),
        ];
        let result = (|| -> redis::RedisResult<()> {
            let client = redis::Client::open(self.url.as_str())?;
            let mut conn = client.get_connection_with_timeout(REACH_TIMEOUT)?;
            conn.set_read_timeout(Some(REACH_TIMEOUT))?;
            for pattern in &patterns {
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query(&mut conn)?;
                    if !keys.is_empty() {
                        redis::cmd("UNLINK").arg(&keys).exec(&mut conn)?;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            eprintln!(
                "warning: could not delete this run's keys ({}*, {db_prefix}*) from Redis: {}",
                tiered::KeySpace::new(namespace).prefix(),
                reason(&e, &self.url)
            );
        }
    }
}

/// Why a Redis call failed, in a few words and never with the password.
fn reason(e: &redis::RedisError, url: &str) -> String {
    if e.is_connection_refusal() {
        return "connection refused".into();
    }
    if e.is_timeout() {
        return "timed out".into();
    }
    if e.kind() == redis::ErrorKind::Parse {
        return "its reply is not Redis protocol (is it a Redis server?)".into();
    }
    let text = match std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>()) {
        Some(io) => io.to_string(),
        None => e.to_string(),
    };
    redact(&text, url)
}

/// `text` without the URL's password (nor the URL itself).
fn redact(text: &str, url: &str) -> String {
    let mut text = text.replace(url, "<REDIS_URL>");
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(auth, _)| auth.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    if let Some(password) = password {
        text = text.replace(password, "***");
    }
    text
}

/// Connects to `url` and PINGs it; returns its `host:port` (never the password).
fn check_reachable(url: &str) -> Result<String, Failure> {
    let info = url.into_connection_info().map_err(|e| {
        Failure::run(format!(
            "REDIS_URL is not a valid Redis URL ({}); expected redis://[user:password@]host:port[/db]",
            reason(&e, url)
        ))
    })?;
    let addr = info.addr().to_string();
    let unreachable = |e: redis::RedisError| {
        Failure::run(format!("cannot reach Redis at {addr}: {}", reason(&e, url)))
    };
    let client = redis::Client::open(info).map_err(unreachable)?;
    let mut conn = client
        .get_connection_with_timeout(REACH_TIMEOUT)
        .map_err(unreachable)?;
    conn.set_read_timeout(Some(REACH_TIMEOUT))
        .map_err(unreachable)?;
    let _: String = redis::cmd("PING").query(&mut conn).map_err(unreachable)?;
    Ok(addr)
}

/// Starts a private redis-server; its panics (not installed, did not start) become one
/// clean error.
fn start_private_server() -> Result<testkit::RedisServer, Failure> {
    start_private(
        testkit::RedisServer::start,
        "REDIS_URL is not set and a private redis-server",
    )
}

/// Starts `what` with `start`; its panics (not installed, did not start) become one clean
/// error.
fn start_private<T>(start: fn() -> T, what: &str) -> Result<T, Failure> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = std::panic::catch_unwind(start);
    std::panic::set_hook(hook);
    started.map_err(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown error".into());
        let first = text.lines().next().unwrap_or_default();
        Failure::run(format!("{what} could not be started: {first}"))
    })
}

/// What a node's stdout says.
#[derive(Debug)]
enum Event {
    Ready,
    Progress(u64),
    Done,
    /// Its stdout closed (it exited or is exiting).
    Closed,
}

/// One node process and the threads reading its output.
struct NodeProc {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<JoinHandle<()>>,
}

/// The node processes; any still running on drop are killed.
#[derive(Default)]
struct Fleet {
    nodes: Vec<NodeProc>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            // Closing stdin tells a node to exit; kill it if it has not.
            n.stdin = None;
            if matches!(n.child.try_wait(), Ok(None)) {
                let _ = n.child.kill();
            }
            let _ = n.child.wait();
        }
    }
}

impl Fleet {
    fn spawn(
        &mut self,
        exe: &Path,
        index: u32,
        settings: &str,
        url: &str,
        events: mpsc::Sender<(usize, Event)>,
    ) -> Result<(), Failure> {
        let mut child = Command::new(exe)
            .arg("node")
            .arg(index.to_string())
            .arg(settings)
            .env(REDIS_URL_ENV, url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Failure::run(format!("cannot start node {index}: {e}")))?;
        let i = self.nodes.len();
        let (Some(stdout), Some(mut stderr_pipe)) = (child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Failure::run(format!("node {index} has no output pipes")));
        };
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = match line.split_once(' ') {
                    None if line == "ready" => Event::Ready,
                    None if line == "done" => Event::Done,
                    Some(("progress", n)) => match n.parse() {
                        Ok(n) => Event::Progress(n),
                        Err(_) => continue,
                    },
                    _ => continue,
                };
                if events.send((i, event)).is_err() {
                    return;
                }
            }
            let _ = events.send((i, Event::Closed));
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut all = sink.lock();
                all.extend_from_slice(&buf[..n]);
                // Keep the tail only.
                if all.len() > 64 * 1024 {
                    let cut = all.len() - 16 * 1024;
                    all.drain(..cut);
                }
            }
        });
        let stdin = child.stdin.take();
        self.nodes.push(NodeProc {
            child,
            stdin,
            stderr,
            stderr_reader: Some(stderr_reader),
        });
        Ok(())
    }

    /// A node's failure: its exit status and the last lines of its stderr.
    fn failure(&mut self, i: usize, what: &str) -> Failure {
        let n = &mut self.nodes[i];
        let deadline = Instant::now() + Duration::from_secs(2);
        let status: Option<ExitStatus> = loop {
            match n.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break None,
            }
        };
        if status.is_some()
            && let Some(reader) = n.stderr_reader.take()
        {
            let _ = reader.join();
        }
        let text = {
            let all = n.stderr.lock();
            String::from_utf8_lossy(&all).into_owned()
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
        let status = status.map_or_else(|| "still running".to_string(), |s| s.to_string());
        if tail.is_empty() {
            Failure::run(format!(
                "node {i} {what} ({status}); it printed nothing on stderr"
            ))
        } else {
            Failure::run(format!(
                "node {i} {what} ({status}); its stderr ends with:\n  {tail}"
            ))
        }
    }

    fn wait_ready(&mut self, events: &mpsc::Receiver<(usize, Event)>) -> Result<(), Failure> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut ready = vec![false; self.nodes.len()];
        while !ready.iter().all(|r| *r) {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok((i, Event::Ready)) => ready[i] = true,
                Ok((i, Event::Closed)) => {
                    return Err(self.failure(i, "stopped before it was ready"));
                }
                Ok(_) => {}
                Err(_) => {
                    let waiting: Vec<String> = (0..ready.len())
                        .filter(|i| !ready[*i])
                        .map(|i| i.to_string())
                        .collect();
                    return Err(Failure::run(format!(
                        "nodes {} did not get ready within {}",
                        waiting.join(", "),
                        humantime::format_duration(READY_TIMEOUT)
                    )));
                }
            }
        }
        Ok(())
    }

    fn go(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            let sent = match self.nodes[i].stdin.as_mut() {
                Some(stdin) => writeln!(stdin, "go").and_then(|()| stdin.flush()),
                None => Ok(()),
            };
            if sent.is_err() {
                return Err(self.failure(i, "stopped before the start"));
            }
        }
        Ok(())
    }

    /// Shows the progress bar until every node is done.
    fn watch(
        &mut self,
        events: &mpsc::Receiver<(usize, Event)>,
        duration: Duration,
    ) -> Result<(), Failure> {
        let total_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let bar = ProgressBar::new(total_ms);
        let style = ProgressStyle::with_template("{spinner:.green} [{bar:36.cyan/blue}] {msg}")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        let start = Instant::now();
        let hard_deadline = start + duration + FINISH_TIMEOUT;
        let mut requests = vec![0u64; self.nodes.len()];
        let mut done = vec![false; self.nodes.len()];
        let mut last_draw = start;
        while !done.iter().all(|d| *d) {
            match events.recv_timeout(Duration::from_millis(100)) {
                Ok((i, Event::Progress(n))) => requests[i] = n,
                Ok((i, Event::Done)) => done[i] = true,
                Ok((i, Event::Closed)) if !done[i] => {
                    bar.finish_and_clear();
                    return Err(self.failure(i, "stopped during the run"));
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bar.finish_and_clear();
                    return Err(Failure::run("lost contact with the nodes"));
                }
            }
            let now = Instant::now();
            if now > hard_deadline {
                bar.finish_and_clear();
                let late = done.iter().position(|d| !d).unwrap_or(0);
                return Err(self.failure(late, "did not finish in time"));
            }
            if now.duration_since(last_draw) >= Duration::from_millis(100) {
                last_draw = now;
                let elapsed = now.duration_since(start);
                let total: u64 = requests.iter().sum();
                let secs = elapsed.as_secs_f64().min(duration.as_secs_f64()).max(1e-3);
                bar.set_position(
                    u64::try_from(elapsed.as_millis())
                        .unwrap_or(u64::MAX)
                        .min(total_ms),
                );
                let phase = if elapsed < duration {
                    format!(
                        "{:.1}s / {}",
                        elapsed.as_secs_f64(),
                        humantime::format_duration(duration)
                    )
                } else {
                    "finishing".to_string()
                };
                bar.set_message(format!(
                    "{phase} · {} requests · {}/s",
                    thousands(total),
                    thousands((total as f64 / secs).round() as u64)
                ));
            }
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// Waits for every node to exit and checks it succeeded.
    fn wait_exits(&mut self) -> Result<(), Failure> {
        for i in 0..self.nodes.len() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match self.nodes[i].child.try_wait() {
                    Ok(Some(status)) if status.success() => break,
                    Ok(Some(_)) => return Err(self.failure(i, "failed after its run")),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Ok(None) => return Err(self.failure(i, "did not exit after its run")),
                    Err(e) => {
                        return Err(Failure::run(format!("cannot wait for node {i}: {e}")));
                    }
                }
            }
        }
        Ok(())
    }
}
