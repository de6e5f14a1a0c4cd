//! The main job: several cache nodes, each a separate process with its own `TieredCache` (its
//! own L1 on moka, its own Redis connections, its own invalidation bus), share one Redis in
//! front of a slow database, under a Zipf read/write workload.
//!
//! It shows what the cache does for a service: most reads are answered from L1 in about a
//! microsecond, most of the rest from Redis in a hundred or two, and only a few reach the
//! database (about one load per key, however many nodes ask); writes on one node evict the other
//! nodes' copies within a millisecond or so; and the merged history of every operation on
//! every node passes the coherence checker (`testkit::coherence`): no read returns anything
//! older than the newest change acknowledged more than Δ before it.
//!
//! The "database" is a set of Redis hashes of its own (`demo-db:<run>:<key>`, a value and a
//! version), shared by all nodes, with a sleep of `--db-latency` before every query. A write
//! updates the row (which assigns its version) and then `set`s the cache; a delete removes
//! the row's value and then `invalidate`s the cache; a read is `get_or_set` with a loader that
//! reads the row.
//!
//! Uses `REDIS_URL` when set (and checks it answers first); otherwise starts a private
//! `redis-server` on a free port and says so. Every run uses a namespace of its own. With
//! `--cluster`, L2 is a local six-node Redis Cluster started for the run (needs `redis-cli`).
//!
//! ```text
//! cargo run --release -p demo
//! cargo run --release -p demo -- --nodes 2 --duration 3s
//! cargo run --release -p demo -- --keys 100000 --zipf 0.8 --write-ratio 0.01 --l1-bytes 4MiB
//! cargo run --release -p demo -- --ttl 2s --swr 1s --db-latency 50ms --workers 8
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --release -p demo
//! cargo run --release -p demo -- --cluster
//! ```
//!
//! It prints a progress bar while it runs, then a summary: requests, the share of reads and
//! their latency (p50/p99) per tier, database loads against reads, the invalidation lag, and
//! the checker's verdict. It exits with 0 when the history is coherent, 1 when it is not or
//! something failed (Redis unreachable, a node crashed), and 2 on a bad flag.

mod coordinator;
mod db;
mod node;
mod stats;
mod summary;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Runs several TieredCache nodes over a shared Redis and a slow database, then prints how
/// the tiers did and whether the cache stayed coherent.
#[derive(Debug, Parser)]
#[command(name = "demo", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    role: Option<Role>,
}

/// The hidden roles of the executable.
#[derive(Debug, Subcommand)]
enum Role {
    /// One node process, started by the coordinator (not for direct use).
    #[command(hide = true)]
    Node {
        /// The node's index.
        index: u32,
        /// Its settings, as JSON.
        settings: String,
    },
}

/// The workload and cache settings of a run.
#[derive(Debug, Clone, Args)]
pub(crate) struct RunArgs {
    /// Node processes, each with its own cache.
    #[arg(long, default_value_t = 3)]
    pub(crate) nodes: u32,
    /// How long the workload runs (`10s`, `1m`, `500ms`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// How many distinct keys.
    #[arg(long, default_value_t = 1000)]
    pub(crate) keys: u64,
    /// The share of operations that write (a tenth of them delete), from 0 to 1.
    #[arg(long, default_value_t = 0.05)]
    pub(crate) write_ratio: f64,
    /// Each node's L1 budget in bytes (`16777216`, or with a binary suffix: `16MiB`, `512K`).
    #[arg(long, default_value = "16MiB", value_parser = stats::parse_bytes)]
    pub(crate) l1_bytes: u64,
    /// How long a cached value is fresh.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) ttl: Duration,
    /// The stale-while-revalidate window after the TTL (`0s`: off).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) swr: Duration,
    /// The simulated database's latency, slept before every query.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub(crate) db_latency: Duration,
    /// The Zipf exponent of key popularity (0: uniform; 1: the classic skew).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) zipf: f64,
    /// Concurrent worker tasks per node.
    #[arg(long, default_value_t = 4)]
    pub(crate) workers: u32,
    /// Keep L2 on a local six-node Redis Cluster (3 masters, 3 replicas) started for the run;
    /// the simulated database stays on the single Redis.
    #[arg(long)]
    pub(crate) cluster: bool,
}

impl RunArgs {
    /// Checks the values make sense; the message names the flag that does not.
    fn validate(&self) -> Result<(), String> {
        if !(1..=32).contains(&self.nodes) {
            return Err(format!("--nodes must be 1 to 32, not {}", self.nodes));
        }
        if !(1..=256).contains(&self.workers) {
            return Err(format!("--workers must be 1 to 256, not {}", self.workers));
        }
        if !(1..=10_000_000).contains(&self.keys) {
            return Err(format!("--keys must be 1 to 10000000, not {}", self.keys));
        }
        if !(0.0..=1.0).contains(&self.write_ratio) {
            return Err(format!(
                "--write-ratio must be between 0 and 1, not {}",
                self.write_ratio
            ));
        }
        if !(0.0..=10.0).contains(&self.zipf) {
            return Err(format!(
                "--zipf must be between 0 and 10, not {}",
                self.zipf
            ));
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(3600) {
            return Err("--duration must be above zero and at most 1h".into());
        }
        if self.l1_bytes < 1024 {
            return Err(format!(
                "--l1-bytes must be at least 1024, not {}",
                self.l1_bytes
            ));
        }
        if self.ttl < Duration::from_millis(1) {
            return Err("--ttl must be at least 1ms".into());
        }
        if self.db_latency > Duration::from_secs(5) {
            return Err("--db-latency must be at most 5s (loads time out after 10s)".into());
        }
        Ok(())
    }
}

/// Why the demo stops early: the message (one line, or a few for a node's stderr) and the exit
/// code.
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// A failure of the run (exit code 1).
    pub(crate) fn run(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Role::Node { index, settings }) = cli.role {
        return node::main(index, &settings);
    }
    if let Err(message) = cli.run.validate() {
        eprintln!("error: {message}");
        return ExitCode::from(2);
    }
    match coordinator::run(&cli.run) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
