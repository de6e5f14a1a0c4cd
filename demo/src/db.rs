//! The simulated slow database, shared by every node process: one Redis hash per row (in the
//! same Redis as the cache, under keys of its own), and a sleep of the configured latency
//! before every query.
//!
//! A row holds `v`, its version (bumped by every write and delete, atomically with the change),
//! and `val`, its value (absent once deleted). A row never written holds its seed value,
//! `seed-<key>`, at version 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tiered::Loaded;

/// How long one database query may take on top of the simulated latency before it fails.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

const WRITE: &str = r"
local v = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'val', ARGV[1])
return v";

const DELETE: &str = r"
local v = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HDEL', KEYS[1], 'val')
return v";

/// A database error (Redis failed or timed out under it).
pub(crate) type DbError = Box<dyn std::error::Error + Send + Sync>;

/// The database client of one node process.
#[derive(Debug)]
pub(crate) struct Db {
    conn: MultiplexedConnection,
    prefix: String,
    latency: Duration,
    write: redis::Script,
    delete: redis::Script,
    /// Loads (reads by the cache's loaders).
    pub(crate) loads: AtomicU64,
    /// Every query.
    pub(crate) queries: AtomicU64,
}

/// The value a row holds before its first write.
pub(crate) fn seed_value(key: &str) -> String {
    format!("seed-{key}")
}

impl Db {
    /// Connects to the Redis at `url`; rows live under `prefix`.
    pub(crate) async fn connect(url: &str, prefix: &str, latency: Duration) -> Result<Db, DbError> {
        let client = redis::Client::open(url)?;
        let conn = tokio::time::timeout(QUERY_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| "timed out connecting to the database")??;
        Ok(Db {
            conn,
            prefix: prefix.to_string(),
            latency,
            write: redis::Script::new(WRITE),
            delete: redis::Script::new(DELETE),
            loads: AtomicU64::new(0),
            queries: AtomicU64::new(0),
        })
    }

    fn row(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The simulated latency, and the count.
    async fn query_delay(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    /// Reads a row for the cache: its value, or "not found" once deleted.
    pub(crate) async fn load(&self, key: &str) -> Result<Loaded<String>, DbError> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        self.query_delay().await;
        let mut conn = self.conn.clone();
        let (version, value): (Option<u64>, Option<String>) = tokio::time::timeout(
            QUERY_TIMEOUT,
            redis::cmd("HMGET")
                .arg(self.row(key))
                .arg("v")
                .arg("val")
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| "database read timed out")??;
        Ok(match (version, value) {
            (_, Some(value)) => Loaded::new(value),
            (None, None) => Loaded::new(seed_value(key)),
            (Some(_), None) => Loaded::not_found(),
        })
    }

    /// The row's version (0: never written).
    pub(crate) async fn version(&self, key: &str) -> Result<u64, DbError> {
        self.query_delay().await;
        let mut conn = self.conn.clone();
        let version: Option<u64> = tokio::time::timeout(
            QUERY_TIMEOUT,
            redis::cmd("HGET")
                .arg(self.row(key))
                .arg("v")
                .query_async(&mut conn),
        )
        .await
        .map_err(|_| "database read timed out")??;
        Ok(version.unwrap_or(0))
    }

    /// Writes `value`; returns the row's new version.
    pub(crate) async fn write(&self, key: &str, value: &str) -> Result<u64, DbError> {
        self.query_delay().await;
        let mut conn = self.conn.clone();
        let mut invocation = self.write.key(self.row(key));
        invocation.arg(value);
        let version: u64 = tokio::time::timeout(QUERY_TIMEOUT, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| "database write timed out")??;
        Ok(version)
    }

    /// Deletes the row's value; returns the row's new version.
    pub(crate) async fn delete(&self, key: &str) -> Result<u64, DbError> {
        self.query_delay().await;
        let mut conn = self.conn.clone();
        let invocation = self.delete.key(self.row(key));
        let version: u64 = tokio::time::timeout(QUERY_TIMEOUT, invocation.invoke_async(&mut conn))
            .await
            .map_err(|_| "database delete timed out")??;
        Ok(version)
    }
}
