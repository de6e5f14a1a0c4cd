//! The main job: two cache nodes share one Redis. Each has its own L1 (moka) and its own
//! connection; a typed value written by one is read by the other through L2, then served from
//! its L1; corrupt bytes in Redis are a typed error that evicts the entry.
//!
//! Uses `REDIS_URL` when set; otherwise starts a private redis-server on a free port.
//!
//! ```text
//! cargo run --release -p demo
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --release -p demo
//! ```

use std::error::Error as StdError;
use std::time::{Duration, Instant};

use l1::{Entry, LocalCache};
use l2::{Codec, Connection, EntryMeta, Key, KeySpace, RedisStore, TypeTag};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
    roles: Vec<String>,
}

const USER: TypeTag = TypeTag::from_name("demo.User/v1");
const NAMESPACE: &str = "demo-users";
const L1_TTL: Duration = Duration::from_millis(500);

/// One service node: its own L1 and its own Redis connection.
struct Node {
    name: &'static str,
    l1: LocalCache<User>,
    l2: RedisStore,
    codec: Codec<User>,
}

/// Where a read was answered.
#[derive(Debug, PartialEq)]
enum Tier {
    L1,
    L2,
    Miss,
}

impl Node {
    async fn connect(name: &'static str, url: &str) -> l2::Result<Node> {
        Ok(Node {
            name,
            l1: LocalCache::builder().max_bytes(8 << 20).build(),
            l2: RedisStore::new(Connection::connect(url).await?),
            codec: Codec::new(USER),
        })
    }

    async fn write(&self, key: &Key, user: &User, version: u64) -> l2::Result<()> {
        let meta = EntryMeta::new(Duration::from_secs(60)).write_version(version);
        let size = self.l2.set(key, &self.codec, user, &meta).await?;
        let entry = Entry::new(NAMESPACE, user.clone())
            .weight(size)
            .version(version)
            .time_to_live(L1_TTL);
        self.l1.insert(key.as_arc().clone(), entry).await;
        Ok(())
    }

    async fn read(&self, key: &Key) -> l2::Result<(Option<User>, Tier)> {
        if let Some(hit) = self.l1.get(key.as_str()).await {
            return Ok((Some(hit.value().clone()), Tier::L1));
        }
        match self.l2.get(key, &self.codec).await? {
            Some(found) => {
                // An L1 copy never outlives the L2 entry's freshness.
                let ttl = found.fresh_remaining().min(L1_TTL);
                let entry = Entry::new(NAMESPACE, found.value.clone())
                    .weight(found.size)
                    .version(found.meta.write_version)
                    .time_to_live(ttl);
                self.l1.insert(key.as_arc().clone(), entry).await;
                Ok((Some(found.value), Tier::L2))
            }
            None => Ok((None, Tier::Miss)),
        }
    }
}

fn user(version: u64) -> User {
    User {
        id: 42,
        name: format!("Alice (v{version})"),
        email: "alice@example.com".into(),
        roles: vec!["admin".into(), "billing".into()],
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn run() -> Result<(), Box<dyn StdError>> {
    let (url, _server) = match std::env::var("REDIS_URL") {
        Ok(url) => {
            println!("Using the Redis at REDIS_URL.");
            (url, None)
        }
        Err(_) => {
            let server = testkit::RedisServer::start();
            println!(
                "REDIS_URL is not set: started a private redis-server on 127.0.0.1:{}.",
                server.port()
            );
            (server.url(), Some(server))
        }
    };

    let a = Node::connect("node-a", &url).await?;
    let b = Node::connect("node-b", &url).await?;
    let key = KeySpace::new(NAMESPACE).key("42");
    a.l2.delete(&key).await?;

    println!("\n1. {} writes user 42 (v1) to L2 and its own L1.", a.name);
    a.write(&key, &user(1), 1).await?;

    let (got, tier) = b.read(&key).await?;
    println!(
        "2. {} reads it: {:?} from {tier:?}.",
        b.name,
        got.map(|u| u.name)
    );
    let (got, tier) = b.read(&key).await?;
    println!(
        "3. {} reads again: {:?} from {tier:?}.",
        b.name,
        got.map(|u| u.name)
    );

    println!(
        "\n4. {} writes v2. Until the invalidation bus lands, {}'s L1 copy",
        a.name, b.name
    );
    println!("   lives at most its L1 TTL ({L1_TTL:?}), then L2 answers with v2.");
    a.write(&key, &user(2), 2).await?;
    let (got, tier) = b.read(&key).await?;
    println!("   right away: {:?} from {tier:?}", got.map(|u| u.name));
    tokio::time::sleep(L1_TTL + Duration::from_millis(50)).await;
    let (got, tier) = b.read(&key).await?;
    println!(
        "   after the L1 TTL: {:?} from {tier:?}",
        got.map(|u| u.name)
    );

    println!("\n5. Latency on {} (medians):", b.name);
    let mut l1_samples = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let t = Instant::now();
        let hit = b.l1.get(key.as_str()).await;
        l1_samples.push(t.elapsed());
        std::hint::black_box(hit);
    }
    let mut l2_samples = Vec::with_capacity(1_000);
    for _ in 0..1_000 {
        let t = Instant::now();
        let hit = b.l2.get(&key, &b.codec).await?;
        l2_samples.push(t.elapsed());
        std::hint::black_box(hit);
    }
    println!(
        "   L1 hit: {:?}   L2 hit (one round trip + decode): {:?}",
        median(l1_samples),
        median(l2_samples)
    );

    println!(
        "\n6. Someone writes foreign bytes under the key; {} reads through L2:",
        b.name
    );
    a.l2.set_bytes(&key, b"{\"not\":\"ours\"}", Duration::from_secs(60))
        .await?;
    b.l1.invalidate(key.as_str()).await;
    match b.read(&key).await {
        Err(e) => println!(
            "   typed error: {e} ({})",
            e.source().map(|s| s.to_string()).unwrap_or_default()
        ),
        Ok(other) => println!("   unexpected: {other:?}"),
    }
    let (got, tier) = b.read(&key).await?;
    println!("   the entry was evicted; next read: {got:?} ({tier:?})");

    let s = b.l2.stats();
    println!(
        "\n{} L2 counters: hits {}, misses {}, decode errors {}, corrupt evicted {}, timeouts {}",
        b.name, s.hits, s.misses, s.decode_errors, s.evicted_corrupt, s.timeouts
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run().await {
        eprint!("demo: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            eprint!(": {s}");
            source = s.source();
        }
        eprintln!();
        std::process::exit(1);
    }
}
