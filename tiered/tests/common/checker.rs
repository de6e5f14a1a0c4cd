//! The coherence checker's two halves, shared by `coherence_checker.rs` and `failover.rs`:
//! node processes (the test binary re-run as helpers) run random set / get / invalidate on
//! 100 keys; every operation is recorded, and `testkit::coherence::check` fails any read
//! older than the newest change acknowledged more than Δ before it. Failed writes and deletes
//! are recorded too (they may have landed), so a failover's timeouts cannot pass for
//! violations.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use invalidation::BusConfig;
use testkit::coherence::{Op, OpKind, Report, check};
use testkit::{RedisServer, command_at};
use tiered::{EntryOptions, TieredCache};

use super::Target;

pub const NODES: u32 = 3;
const KEYS: usize = 100;
const WORKERS: usize = 4;

pub fn bus() -> BusConfig {
    BusConfig::default()
        .heartbeat(Duration::from_millis(200))
        .heartbeat_timeout(Duration::from_millis(300))
}

pub fn now_us() -> u64 {
    invalidation::now_micros()
}

/// How a checker run is set up.
#[derive(Debug, Clone)]
pub struct Run {
    /// Where the caches keep L2.
    pub target: Target,
    /// How long the nodes run.
    pub seconds: u64,
    /// `replica_acks(1, this)` on the nodes' connections.
    pub replica_ack_timeout: Option<Duration>,
    /// One node that connects through another URL (a `testkit::Proxy` in front of the
    /// target): `(node, url)`.
    pub node_url: Option<(u32, String)>,
    /// One node whose writes and deletes run under a random timeout below this, so some are
    /// cancelled mid-way (recorded as failed: they may have landed).
    pub cancel_writes: Option<(u32, Duration)>,
    /// The nodes' outage staleness ([`EntryOptions::outage_staleness`]); the default if `None`.
    pub outage_staleness: Option<Duration>,
    /// Whether the nodes' bus signs its messages (and so their writes carry small values to
    /// the nodes holding the key, instead of evicting it).
    pub signed: bool,
}

impl Run {
    /// A plain run: no replica acks, every node on the target directly, no cancellations.
    pub fn plain(target: Target, seconds: u64) -> Self {
        Run {
            target,
            seconds,
            replica_ack_timeout: None,
            node_url: None,
            cancel_writes: None,
            outage_staleness: None,
            signed: true,
        }
    }
}

/// What the nodes did.
#[derive(Debug)]
pub struct Outcome {
    pub report: Report,
    pub ops: Vec<Op>,
    /// When each failed operation returned its error (µs), from all nodes.
    pub errors_us: Vec<u64>,
    /// The same errors with their text, in the same order.
    pub errors: Vec<(u64, String)>,
    /// Per node: the invalidation gaps it saw (each drops its L1).
    pub gaps: Vec<u64>,
    /// Per node: reads answered under the outage policy (L1 entries the bus could not vouch
    /// for while Redis was unreachable).
    pub outage_served: Vec<u64>,
}

/// The body of a helper node; does nothing unless the parent set `TIERED_CHECKER_URLS`.
pub fn node_main() {
    let Ok(urls) = std::env::var("TIERED_CHECKER_URLS") else {
        return;
    };
    let cluster = std::env::var("TIERED_CHECKER_CLUSTER").is_ok();
    let addr: SocketAddr = std::env::var("TIERED_CHECKER_ADDR")
        .unwrap()
        .parse()
        .unwrap();
    let node: u32 = std::env::var("TIERED_CHECKER_NODE")
        .unwrap()
        .parse()
        .unwrap();
    let seconds: u64 = std::env::var("TIERED_CHECKER_SECONDS")
        .unwrap()
        .parse()
        .unwrap();
    let acks: Option<u64> = std::env::var("TIERED_CHECKER_ACK_MS")
        .ok()
        .map(|v| v.parse().unwrap());
    let cancel_us: Option<u64> = std::env::var("TIERED_CHECKER_CANCEL_US")
        .ok()
        .map(|v| v.parse().unwrap());
    let mut options = EntryOptions::new(Duration::from_secs(600));
    if let Ok(ms) = std::env::var("TIERED_CHECKER_OUTAGE_MS") {
        options = options.outage_staleness(Duration::from_millis(ms.parse().unwrap()));
    }
    let config = match std::env::var("TIERED_CHECKER_SIGNED") {
        Ok(_) => bus().secret("the checker's secret"),
        Err(_) => bus(),
    };
    super::node_runtime().block_on(async move {
        let carry = config.is_signed();
        let mut builder = TieredCache::builder()
            .namespace("checker")
            .bus_config(config)
            .carry_values(carry)
            .default_options(options);
        builder = if cluster {
            builder.redis_cluster(urls.split(','))
        } else {
            builder.redis_url(urls)
        };
        if let Some(ms) = acks {
            // The command timeout must stay above the replica timeout: twice it.
            builder = builder
                .l2_timeout(Duration::from_millis(ms * 2))
                .replica_acks(1, Duration::from_millis(ms));
        }
        let cache: TieredCache<String> = builder.build().await.unwrap();
        command_at(addr, &["INCR", "ready"]);
        while command_at(addr, &["GET", "go"]) != "1" {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let end = Instant::now() + Duration::from_secs(seconds);
        let mut workers = Vec::new();
        for w in 0..WORKERS {
            let cache = cache.clone();
            workers.push(tokio::spawn(async move {
                let mut ops = Vec::new();
                let mut errors = Vec::new();
                let mut n = 0u64;
                while Instant::now() < end {
                    let key = format!("k{}", fastrand::usize(..KEYS));
                    let start_us = now_us();
                    let roll = fastrand::u32(..100);
                    let kind = if roll < 60 {
                        match cache.get(&key).await {
                            Ok(value) => OpKind::Read { value },
                            Err(e) => {
                                errors.push((now_us(), format!("get: {e}")));
                                // A failed read says nothing; pace the retry a little.
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                continue;
                            }
                        }
                    } else if roll < 92 {
                        n += 1;
                        let value = format!("n{node}w{w}-{n}");
                        match cancellable(cancel_us, cache.set(&key, &value)).await {
                            Ok(Ok(version)) => OpKind::Write { value, version },
                            Ok(Err(e)) => {
                                errors.push((now_us(), format!("set: {e}")));
                                OpKind::Failed { value: Some(value) }
                            }
                            Err(_) => OpKind::Failed { value: Some(value) },
                        }
                    } else {
                        match cancellable(cancel_us, cache.invalidate(&key)).await {
                            Ok(Ok(version)) => OpKind::Delete { version },
                            Ok(Err(e)) => {
                                errors.push((now_us(), format!("invalidate: {e}")));
                                OpKind::Failed { value: None }
                            }
                            Err(_) => OpKind::Failed { value: None },
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
                (ops, errors)
            }));
        }
        for w in workers {
            let (ops, errors) = w.await.unwrap();
            for op in ops {
                println!("OP {}", op.to_line());
            }
            for (at, text) in errors {
                println!("ERR {at} {text}");
            }
        }
        let s = cache.stats();
        println!(
            "NODE {node}: l1 hits {}, l2 hits {}, invalidations received {} ({} carrying the value), \
             ignored {}, gaps {}, L1 unconfirmed {}, probe rounds late {}, outage answers {}",
            s.l1_hits,
            s.l2_hits,
            s.invalidations_received,
            s.values_carried,
            s.invalidations_ignored,
            s.gaps,
            s.l1_unconfirmed,
            cache.bus().stats().probes_late,
            s.outage_served
        );
        println!("GAPS {}", s.gaps);
        println!("OUTAGE {}", s.outage_served);
    });
}

/// `fut` under a random timeout below `max_us` if set (`Err` if it was cut), else whole.
async fn cancellable<T>(
    max_us: Option<u64>,
    fut: impl Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    match max_us {
        Some(max) => tokio::time::timeout(Duration::from_micros(fastrand::u64(..max)), fut).await,
        None => Ok(fut.await),
    }
}

/// Runs `NODES` helper processes (`node_test` is the name of the test function that calls
/// [`node_main`]) against `run.target`, calls `during` once they all started, and checks the
/// merged history.
pub fn run(node_test: &str, run: &Run, during: impl FnOnce()) -> Outcome {
    // The nodes meet on a server of their own, apart from the one under test.
    let meeting = RedisServer::start();
    let children: Vec<_> = (0..NODES)
        .map(|node| {
            let urls = match &run.node_url {
                Some((n, url)) if *n == node => url.clone(),
                _ => run.target.urls.join(","),
            };
            let mut cmd = Command::new(std::env::current_exe().unwrap());
            cmd.args([node_test, "--exact", "--nocapture", "--test-threads=1"])
                .env("TIERED_CHECKER_URLS", urls)
                .env("TIERED_CHECKER_ADDR", meeting.addr().to_string())
                .env("TIERED_CHECKER_NODE", node.to_string())
                .env("TIERED_CHECKER_SECONDS", run.seconds.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if run.target.cluster {
                cmd.env("TIERED_CHECKER_CLUSTER", "1");
            }
            if run.signed {
                cmd.env("TIERED_CHECKER_SIGNED", "1");
            }
            if let Some((n, max)) = run.cancel_writes
                && n == node
            {
                cmd.env("TIERED_CHECKER_CANCEL_US", max.as_micros().to_string());
            }
            if let Some(t) = run.replica_ack_timeout {
                cmd.env("TIERED_CHECKER_ACK_MS", t.as_millis().to_string());
            }
            if let Some(t) = run.outage_staleness {
                cmd.env("TIERED_CHECKER_OUTAGE_MS", t.as_millis().to_string());
            }
            cmd.spawn().unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while meeting.command(&["GET", "ready"]) != NODES.to_string() {
        assert!(Instant::now() < deadline, "nodes did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    meeting.command(&["SET", "go", "1"]);
    during();
    let mut ops = Vec::new();
    let mut errors = Vec::new();
    let mut gaps = Vec::new();
    let mut outage_served = Vec::new();
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
            } else if let Some(at) = line.find("ERR ") {
                let rest = line[at + 4..].trim();
                let (us, text) = rest.split_once(' ').unwrap_or((rest, ""));
                errors.push((us.parse().unwrap(), text.to_string()));
            } else if let Some(at) = line.find("GAPS ") {
                gaps.push(line[at + 5..].trim().parse().unwrap());
            } else if let Some(at) = line.find("OUTAGE ") {
                outage_served.push(line[at + 7..].trim().parse().unwrap());
            } else if let Some(at) = line.find("NODE ") {
                println!("{}", &line[at..]);
            }
        }
    }
    let report = check(&ops, bus().bound());
    Outcome {
        report,
        ops,
        errors_us: errors.iter().map(|e| e.0).collect(),
        errors,
        gaps,
        outage_served,
    }
}
