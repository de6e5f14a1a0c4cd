//! A local Redis Cluster for tests: six `redis-server` processes (three masters, three
//! replicas) on free loopback ports, `cluster-node-timeout` 1000 ms so a failover takes about
//! 2-3 s, created with `redis-cli --cluster create`. Start one per test binary (about 2-3 s),
//! not one per test; give each test its own key prefix.
//!
//! ```no_run
//! let cluster = testkit::RedisCluster::start();
//! println!("seed: {}", cluster.url());
//! let master = cluster.master_of("{user:42}");
//! # let _ = master;
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{RedisServer, command_at, free_port};

/// Environment variable naming the `redis-cli` binary to use instead of the one on `PATH`.
pub const CLI_BIN_ENV: &str = "REDIS_CLI_BIN";

/// How long [`RedisCluster::start`] and the failover helpers wait before giving up.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Six `redis-server` processes forming one cluster; every process is killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCluster")
            .field(
                "ports",
                &self.nodes.iter().map(|n| n.port()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// The node id.
    pub id: String,
    /// Its address.
    pub addr: SocketAddr,
    /// Whether it is a master (and not failed).
    pub master: bool,
    /// Slot ranges it serves (empty for replicas).
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    /// Starts six nodes and creates the cluster (three masters with one replica each); returns
    /// once every node reports `cluster_state:ok` with all 16,384 slots served and every
    /// replica is in sync.
    ///
    /// # Panics
    /// If `redis-server` or `redis-cli` is missing, or the cluster is not ready within
    /// [`CLUSTER_TIMEOUT`] (the message carries the nodes' logs).
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                let bus = free_port().to_string();
                RedisServer::start_with_args(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--repl-diskless-sync-delay",
                    "0",
                ])
            })
            .collect();
        let cluster = RedisCluster { nodes };
        let cli = std::env::var(CLI_BIN_ENV).unwrap_or_else(|_| "redis-cli".to_string());
        let mut create = Command::new(&cli);
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let output = match create.output() {
            Ok(output) => output,
            Err(e) => panic!(
                "could not run `{cli}` ({e}): install it with `apt-get install -y redis-tools` \
                 (it comes with redis-server), or set {CLI_BIN_ENV}"
            ),
        };
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.wait_until("the cluster is ready", |c| c.is_ready());
        cluster
    }

    /// The seed URL of the first node (`redis://127.0.0.1:PORT`); any node works as a seed.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// Every node's URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The node processes, in start order (for pause, kill, restart, raw commands).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The node processes, mutably.
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// The topology as a live node sees it.
    pub fn topology(&self) -> Vec<NodeInfo> {
        for node in self.running() {
            let text = command_at(node.addr(), &["CLUSTER", "NODES"]);
            if !text.starts_with("ERR") {
                return parse_nodes(&text);
            }
        }
        Vec::new()
    }

    /// The slot of `key` (hash tags honoured).
    pub fn slot_of(&self, key: &str) -> u16 {
        let node = self.running().next().expect("a running node");
        command_at(node.addr(), &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number")
    }

    /// The index (in [`RedisCluster::nodes`]) of the master serving `key` now.
    pub fn master_of(&self, key: &str) -> usize {
        let slot = self.slot_of(key);
        let owner = self
            .topology()
            .into_iter()
            .find(|n| n.master && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .expect("a master serves every slot");
        self.index_of(owner.addr)
    }

    /// Kills (SIGKILL) the master serving `key` and waits until a replica took over its slots
    /// and every live node reports `cluster_state:ok`. Returns the killed node's index and how
    /// long the failover took from the kill.
    ///
    /// # Panics
    /// If no replica takes over within [`CLUSTER_TIMEOUT`].
    pub fn fail_over(&mut self, key: &str) -> (usize, Duration) {
        let victim = self.master_of(key);
        let killed_at = Instant::now();
        self.nodes[victim].kill();
        let addr = self.nodes[victim].addr();
        self.wait_until("a replica takes over", |c| {
            c.is_ready()
                && c.topology().iter().any(|n| {
                    n.master
                        && n.addr != addr
                        && n.slots.iter().any(|&(a, b)| {
                            let slot = c.slot_of(key);
                            (a..=b).contains(&slot)
                        })
                })
        });
        (victim, killed_at.elapsed())
    }

    /// Restarts a killed node on its port; it rejoins (as a replica) with its old identity.
    pub fn restart(&mut self, index: usize) {
        self.nodes[index].restart();
        self.wait_until("the restarted node rejoins", |c| c.is_ready());
    }

    fn running(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.pid().is_some())
    }

    fn index_of(&self, addr: SocketAddr) -> usize {
        self.nodes
            .iter()
            .position(|n| n.addr() == addr)
            .expect("a node of this cluster")
    }

    /// Every running node says `cluster_state:ok` with all slots, every running replica's
    /// link to its master is up, and every running node sees the same roles, with no master
    /// left without slots (gossip has spread who replicates whom).
    fn is_ready(&self) -> bool {
        let mut views = self.running().map(|node| {
            let mut roles: Vec<(String, bool, bool)> =
                parse_nodes(&command_at(node.addr(), &["CLUSTER", "NODES"]))
                    .into_iter()
                    .filter(|n| self.running().any(|r| r.addr() == n.addr))
                    .map(|n| (n.id, n.master, !n.slots.is_empty()))
                    .collect();
            roles.sort();
            roles
        });
        let Some(first) = views.next() else {
            return false;
        };
        let running = self.running().count();
        // In this layout every master serves slots: a master without any is a replica that
        // has not been told whom to replicate yet.
        if first.len() != running
            || first.iter().any(|(_, master, slots)| *master && !slots)
            || !views.all(|v| v == first)
        {
            return false;
        }
        self.running().all(|node| {
            let info = command_at(node.addr(), &["CLUSTER", "INFO"]);
            if !(info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")) {
                return false;
            }
            let replication = command_at(node.addr(), &["INFO", "replication"]);
            if replication.contains("role:slave") {
                replication.contains("master_link_status:up")
                    && replication.contains("master_sync_in_progress:0")
            } else {
                // A master's replicas are past their initial sync and acknowledge its
                // writes: `WAIT` counts them all (a replica still loading the snapshot is
                // `online` to its master but does not answer `REPLCONF GETACK` yet).
                !replication.contains("state=wait_bgsave")
                    && !replication.contains("state=send_bulk")
                    && replicas_ack(node.addr(), &replication)
            }
        })
    }

    fn wait_until(&self, what: &str, ready: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        while !ready(self) {
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("--- node {} ---\n{}", n.port(), n.log()))
                    .collect();
                panic!(
                    "timed out waiting until {what} ({CLUSTER_TIMEOUT:?}). Logs:\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Parses `CLUSTER NODES` output.
/// Whether every replica a master lists (`connected_slaves:N` in `INFO replication`)
/// acknowledges its replication offset within 100 ms (`WAIT N 100`).
fn replicas_ack(addr: SocketAddr, replication: &str) -> bool {
    let replicas: usize = replication
        .lines()
        .find_map(|l| l.strip_prefix("connected_slaves:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    replicas == 0
        || command_at(addr, &["WAIT", &replicas.to_string(), "100"])
            .trim()
            .parse::<usize>()
            .is_ok_and(|acked| acked >= replicas)
}

fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            // `127.0.0.1:7000@17000` (the part after `@` is the bus port).
            let addr = fields[1].split('@').next()?.parse().ok()?;
            let flags = fields[2];
            let master = flags.contains("master") && !flags.contains("fail");
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|x| (x, x)),
                })
                .collect();
            Some(NodeInfo {
                id: fields[0].to_owned(),
                addr,
                master,
                slots,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 slave a1 0 1 1 connected
c3 127.0.0.1:7002@17002 master,fail - 0 1 2 disconnected
d4 127.0.0.1:7003@17003 master - 0 1 3 connected 5461-10922 16000 [1-<-x]
";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 4);
        assert!(nodes[0].master);
        assert_eq!(nodes[0].slots, vec![(0, 5460)]);
        assert!(!nodes[1].master);
        assert!(!nodes[2].master, "a failed master does not count");
        assert_eq!(nodes[3].slots, vec![(5461, 10922), (16000, 16000)]);
    }
}
