//! [`RedisStore`]: typed get / set / delete / batch operations on one [`Connection`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::connection::Connection;
use crate::envelope::{Codec, EntryMeta, FLAG_TOMBSTONE, TOMBSTONE, decode_header};
use crate::error::{DecodeError, Error, Result};
use crate::keys::{Key, KeySpace};
use crate::scripts::{OVERWRITE, REMOVE, ScriptCall};

/// Deletes `KEYS[1]` only if it still holds `ARGV[1]`. Used to release a lock and to evict
/// undecodable bytes without losing a write that replaced them meanwhile.
static DELETE_IF_EQUALS: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('DEL', KEYS[1])
          end
          return 0",
    )
});

/// A message a write publishes in the same atomic step: the script appends the entry's new
/// write version (8 bytes, little endian) to `message` and publishes it on `channel`.
#[derive(Debug, Clone, Copy)]
pub struct Announce<'a> {
    /// The channel.
    pub channel: &'a str,
    /// The message, before the version is appended.
    pub message: &'a [u8],
}

/// A write's offer to carry its value to the other nodes: a message built and signed by the
/// writer with a proposed write `version` inside. The write script takes the version, and
/// publishes `message` instead of the announcement, only if the key holds an entry whose
/// version is below it and the server's clock has reached it (see `scripts.rs`); otherwise
/// the write announces as usual.
#[derive(Debug, Clone, Copy)]
pub struct Carry<'a> {
    /// The proposed write version (server time in µs, at most the server's clock).
    pub version: u64,
    /// The message to publish on the announcement's channel if the version is taken.
    pub message: &'a [u8],
}

/// What [`RedisStore::overwrite_carrying`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Overwritten {
    /// The write version.
    pub version: u64,
    /// Whether the [`Carry`] was taken: its version, its message published.
    pub carried: bool,
    /// The server's clock when the script ran, in µs since the epoch (to propose the next
    /// [`Carry::version`] from).
    pub server_micros: u64,
}

/// What [`RedisStore::remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Removal {
    /// Whether a value (not a tombstone) was there.
    pub existed: bool,
    /// The write version of the deletion (its tombstone's).
    pub version: u64,
}

/// An entry whose value is present, or nothing (an absent marker reads as a miss).
fn present<T>(f: Option<Fetched<Option<T>>>) -> Option<Fetched<T>> {
    let f = f?;
    Some(Fetched {
        value: f.value?,
        meta: f.meta,
        remaining: f.remaining,
        size: f.size,
    })
}

/// A value read from Redis, with what its envelope and the key's remaining life say about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched<T> {
    /// The decoded value.
    pub value: T,
    /// Write version and deadlines, from the envelope.
    pub meta: EntryMeta,
    /// The key's remaining life in Redis (PTTL) when read; `None` if it has no expiry.
    pub remaining: Option<Duration>,
    /// The encoded size in bytes (use it as the L1 weight).
    pub size: usize,
}

impl<T> Fetched<T> {
    /// Time since the write, as Redis's clock sees it: `stale_for - remaining`.
    pub fn age(&self) -> Duration {
        match self.remaining {
            Some(r) => self.meta.stale_for.saturating_sub(r),
            None => Duration::ZERO,
        }
    }

    /// How much longer the value is fresh (zero once stale).
    pub fn fresh_remaining(&self) -> Duration {
        match self.remaining {
            Some(_) => self.meta.fresh_for.saturating_sub(self.age()),
            None => self.meta.fresh_for,
        }
    }

    /// Whether the value is still fresh (otherwise it is in its stale window).
    pub fn is_fresh(&self) -> bool {
        !self.fresh_remaining().is_zero()
    }
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    decode_errors: AtomicU64,
    evicted_corrupt: AtomicU64,
    oversized_reads: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
}

/// A snapshot of a store's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Reads that found a valid entry.
    pub hits: u64,
    /// Reads that found nothing (or an oversized entry).
    pub misses: u64,
    /// Reads that found bytes that are not a valid entry of the expected type.
    pub decode_errors: u64,
    /// Undecodable entries deleted (compare-and-delete: only if unchanged meanwhile).
    pub evicted_corrupt: u64,
    /// Reads that found an entry over the size limit (treated as a miss, not downloaded).
    pub oversized_reads: u64,
    /// Commands that timed out.
    pub timeouts: u64,
    /// Commands that failed otherwise.
    pub errors: u64,
}

/// What one read returned, before decoding.
pub(crate) enum Raw {
    Missing,
    Oversized,
    NotAString,
    Bytes { bytes: Vec<u8>, pttl: i64 },
}

/// The Redis tier: typed reads and writes of enveloped values over a shared [`Connection`].
///
/// Cheap to clone; clones share counters. Several stores (one per value type or namespace) can
/// share one connection.
///
/// ```no_run
/// # async fn f() -> l2::Result<()> {
/// use std::time::Duration;
/// use l2::{Codec, Connection, EntryMeta, KeySpace, RedisStore, TypeTag};
///
/// let store = RedisStore::new(Connection::connect("redis://127.0.0.1:6379").await?);
/// let codec = Codec::<String>::new(TypeTag::from_name("greeting/v1"));
/// let key = KeySpace::new("greetings").key("en");
/// store.set(&key, &codec, &"hello".to_string(), &EntryMeta::new(Duration::from_secs(60))).await?;
/// let got = store.get(&key, &codec).await?.unwrap();
/// assert_eq!(got.value, "hello");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: Connection,
    counters: Arc<Counters>,
    /// Locks to release once Redis answers again (see `RedisStore::release`).
    pub(crate) orphans: Arc<crate::lock::Orphans>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("conn", &self.conn)
            .field("stats", &self.stats())
            .finish()
    }
}

/// `ttl` in whole milliseconds, refusing anything under 1 ms.
pub(crate) fn ttl_ms(ttl: Duration) -> Result<u64> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Err(Error::InvalidTtl(ttl));
    }
    Ok(ms)
}

impl RedisStore {
    /// A store on `conn`.
    pub fn new(conn: Connection) -> Self {
        RedisStore {
            conn,
            counters: Arc::default(),
            orphans: Arc::default(),
        }
    }

    /// The connection this store uses.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The counters so far.
    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StoreStats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            decode_errors: get(&c.decode_errors),
            evicted_corrupt: get(&c.evicted_corrupt),
            oversized_reads: get(&c.oversized_reads),
            timeouts: get(&c.timeouts),
            errors: get(&c.errors),
        }
    }

    /// Counts a failed command.
    pub(crate) fn note<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            let counter = if e.is_timeout() {
                &self.counters.timeouts
            } else {
                &self.counters.errors
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Reads the entry at `key`: one round trip (`GETRANGE` + `PTTL`, so at most the codec's
    /// size limit, plus one byte, is ever downloaded).
    ///
    /// Returns `Ok(None)` when the key is absent or its value is over the size limit (counted
    /// in [`StoreStats::oversized_reads`]).
    ///
    /// # Errors
    /// [`Error::Decode`] when the bytes are not a valid entry for this codec: the entry has
    /// been deleted (only if still unchanged) and counted. [`Error::Timeout`] or
    /// [`Error::Redis`] when Redis fails.
    pub async fn get<T: Serialize + DeserializeOwned>(
        &self,
        key: &Key,
        codec: &Codec<T>,
    ) -> Result<Option<Fetched<T>>> {
        let raw = self
            .read_raw(std::slice::from_ref(key), codec.limit())
            .await?;
        let raw = raw.into_iter().next().unwrap_or(Raw::Missing);
        Ok(present(self.decode(key, raw, codec).await?))
    }

    /// As [`RedisStore::get`], but also returns "absent" markers (cached "not found", written
    /// with [`Codec::encode_absent`]) as `Some(Fetched { value: None, .. })`.
    ///
    /// # Errors
    /// As [`RedisStore::get`].
    pub async fn lookup<T: Serialize + DeserializeOwned>(
        &self,
        key: &Key,
        codec: &Codec<T>,
    ) -> Result<Option<Fetched<Option<T>>>> {
        let raw = self
            .read_raw(std::slice::from_ref(key), codec.limit())
            .await?;
        let raw = raw.into_iter().next().unwrap_or(Raw::Missing);
        self.decode(key, raw, codec).await
    }

    /// As [`RedisStore::get_many`], but with "absent" markers as in [`RedisStore::lookup`].
    ///
    /// # Errors
    /// As [`RedisStore::get_many`].
    pub async fn lookup_many<T: Serialize + DeserializeOwned>(
        &self,
        keys: &[Key],
        codec: &Codec<T>,
    ) -> Result<Vec<Option<Fetched<Option<T>>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let raws = self.read_raw(keys, codec.limit()).await?;
        let mut out = Vec::with_capacity(keys.len());
        for (key, raw) in keys.iter().zip(raws) {
            match self.decode(key, raw, codec).await {
                Ok(v) => out.push(v),
                Err(e) if e.is_decode() => out.push(None),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Reads many keys in one round trip (one atomic pipeline of per-key reads, so each key's
    /// freshness and size cap hold as for [`get`](Self::get)). The result has one slot per key,
    /// in order; undecodable entries are deleted, counted, and read as `None`.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`] when Redis fails.
    pub async fn get_many<T: Serialize + DeserializeOwned>(
        &self,
        keys: &[Key],
        codec: &Codec<T>,
    ) -> Result<Vec<Option<Fetched<T>>>> {
        Ok(self
            .lookup_many(keys, codec)
            .await?
            .into_iter()
            .map(present)
            .collect())
    }

    /// Reads `keys`: `GETRANGE 0 limit` (at most limit + 1 bytes: more means oversized) and
    /// `PTTL` per key, in one round trip. A batch is one `MULTI`; a single key is a plain
    /// two-command pipeline (Redis runs a pipeline's commands back to back; a write that slips
    /// between the two is announced on the bus, which drops any fill of the older value).
    async fn read_raw(&self, keys: &[Key], limit: usize) -> Result<Vec<Raw>> {
        let mut pipe = redis::pipe();
        if keys.len() > 1 {
            pipe.atomic();
        }
        pipe.ignore_errors();
        let end = i64::try_from(limit).unwrap_or(i64::MAX);
        for key in keys {
            pipe.cmd("GETRANGE").arg(key).arg(0).arg(end);
            pipe.cmd("PTTL").arg(key);
        }
        let values: Vec<redis::Value> =
            self.note(self.conn.query_pipe("get", &pipe, true, false).await)?;
        if values.len() != keys.len() * 2 {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            return Err(Error::redis(
                "get",
                redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "wrong number of replies to a read pipeline",
                )),
            ));
        }
        let mut out = Vec::with_capacity(keys.len());
        let mut it = values.into_iter();
        while let (Some(bytes), Some(pttl)) = (it.next(), it.next()) {
            out.push(classify(bytes, redis::Value::Nil, pttl, limit));
        }
        Ok(out)
    }

    pub(crate) async fn decode<T: Serialize + DeserializeOwned>(
        &self,
        key: &Key,
        raw: Raw,
        codec: &Codec<T>,
    ) -> Result<Option<Fetched<Option<T>>>> {
        let (bytes, pttl) = match raw {
            Raw::Missing => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Raw::Oversized => {
                self.counters
                    .oversized_reads
                    .fetch_add(1, Ordering::Relaxed);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Raw::NotAString => {
                // Not ours to delete: someone else's data structure sits at our key.
                self.counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Decode {
                    key: key.to_string(),
                    source: DecodeError::NotAString,
                });
            }
            Raw::Bytes { bytes, pttl } => (bytes, pttl),
        };
        if decode_header(&bytes).is_ok_and(|h| h.flags & FLAG_TOMBSTONE != 0) {
            // A deleted entry that keeps its version: a miss.
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        match codec.decode_optional(&bytes) {
            Ok((header, value)) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(Fetched {
                    value,
                    meta: header.meta,
                    remaining: u64::try_from(pttl).ok().map(Duration::from_millis),
                    size: bytes.len(),
                }))
            }
            Err(source) => {
                self.counters.decode_errors.fetch_add(1, Ordering::Relaxed);
                // Evict the bad bytes, but only if they are still there: a fresh write that
                // replaced them meanwhile must survive. A failure here is not the caller's
                // problem; the decode error is.
                if let Ok(true) = self.delete_if_unchanged(key, &bytes).await {
                    self.counters
                        .evicted_corrupt
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(Error::Decode {
                    key: key.to_string(),
                    source,
                })
            }
        }
    }

    /// Deletes `key` only if it still holds exactly `bytes` (compare-and-delete in Lua), so a
    /// write that replaced them meanwhile survives. Returns whether it deleted.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`].
    pub async fn delete_if_unchanged(&self, key: &Key, bytes: &[u8]) -> Result<bool> {
        let n: i64 = self.note(
            self.conn
                .invoke("delete if unchanged", DELETE_IF_EQUALS.key(key).arg(bytes))
                .await,
        )?;
        Ok(n == 1)
    }

    #[cfg(any(test, feature = "test-util"))]
    /// Writes `value` at `key` with its envelope; the Redis TTL is `meta.stale_for`. Returns the
    /// encoded size.
    ///
    /// # Errors
    /// [`Error::TooLarge`] over the codec's limit, [`Error::InvalidTtl`], [`Error::Encode`],
    /// or [`Error::Timeout`] / [`Error::Redis`] when Redis fails.
    pub async fn set<T: Serialize + DeserializeOwned>(
        &self,
        key: &Key,
        codec: &Codec<T>,
        value: &T,
        meta: &EntryMeta,
    ) -> Result<usize> {
        let bytes = codec.encode(value, meta)?;
        self.set_bytes(key, &bytes, meta.stale_for).await?;
        Ok(bytes.len())
    }

    #[cfg(any(test, feature = "test-util"))]
    /// Writes already encoded bytes at `key` with a TTL (`SET key bytes PX ttl`).
    ///
    /// # Errors
    /// [`Error::InvalidTtl`] under 1 ms, or [`Error::Timeout`] / [`Error::Redis`].
    pub async fn set_bytes(&self, key: &Key, bytes: &[u8], ttl: Duration) -> Result<()> {
        let ms = ttl_ms(ttl)?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(key).arg(bytes).arg("PX").arg(ms);
        self.note(self.conn.query_pipe::<()>("set", &pipe, false, true).await)
    }

    #[cfg(any(test, feature = "test-util"))]
    /// Writes many values in one round trip (a pipeline of `SET … PX`), all with `meta`.
    /// Nothing is sent if any value fails to encode.
    ///
    /// # Errors
    /// As [`set`](Self::set).
    pub async fn set_many<T: Serialize + DeserializeOwned>(
        &self,
        items: &[(Key, T)],
        codec: &Codec<T>,
        meta: &EntryMeta,
    ) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let ms = ttl_ms(meta.stale_for)?;
        let mut pipe = redis::pipe();
        let mut buf = Vec::new();
        for (key, value) in items {
            codec.encode_into(value, meta, &mut buf)?;
            pipe.cmd("SET")
                .arg(key)
                .arg(buf.as_slice())
                .arg("PX")
                .arg(ms);
        }
        self.note(
            self.conn
                .query_pipe::<()>("set_many", &pipe, false, true)
                .await,
        )
    }

    /// Writes encoded `bytes` at `key` for `ttl` as the newest value, in one Lua script: stamps
    /// the next write version into it, breaks any load lock on the key (so a loader that
    /// started earlier cannot overwrite it through [`RedisStore::complete_lock`]), wakes the
    /// lock's waiters and publishes `announce`, in the same step (no change without its
    /// announcement). Returns the write version.
    ///
    /// # Errors
    /// [`Error::InvalidTtl`], [`Error::Timeout`] or [`Error::Redis`].
    pub async fn overwrite(
        &self,
        key: &Key,
        bytes: &[u8],
        ttl: Duration,
        announce: Announce<'_>,
    ) -> Result<u64> {
        let done = self
            .overwrite_announcing(key, bytes, ttl, Some(announce), None)
            .await?;
        Ok(done.version)
    }

    /// [`RedisStore::overwrite`], offering to `carry` the value to the other nodes (see
    /// [`Carry`]; `None`: announce as usual), and telling what happened.
    ///
    /// # Errors
    /// As [`RedisStore::overwrite`].
    pub async fn overwrite_carrying(
        &self,
        key: &Key,
        bytes: &[u8],
        ttl: Duration,
        announce: Announce<'_>,
        carry: Option<Carry<'_>>,
    ) -> Result<Overwritten> {
        self.overwrite_announcing(key, bytes, ttl, Some(announce), carry)
            .await
    }

    /// [`RedisStore::overwrite`] without an announcement: a change no other node hears of.
    /// For tests that act behind the cache's back.
    ///
    /// # Errors
    /// As [`RedisStore::overwrite`].
    #[cfg(any(test, feature = "test-util"))]
    pub async fn overwrite_unannounced(
        &self,
        key: &Key,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<u64> {
        let done = self
            .overwrite_announcing(key, bytes, ttl, None, None)
            .await?;
        Ok(done.version)
    }

    async fn overwrite_announcing(
        &self,
        key: &Key,
        bytes: &[u8],
        ttl: Duration,
        announce: Option<Announce<'_>>,
        carry: Option<Carry<'_>>,
    ) -> Result<Overwritten> {
        let ms = ttl_ms(ttl)?;
        let (channel, message) = announce.map_or(("", &[][..]), |a| (a.channel, a.message));
        let (proposed, carrying) = carry.map_or((0, &[][..]), |c| (c.version, c.message));
        let (version, carried, server_micros): (u64, i64, u64) = self.note(
            self.conn
                .invoke_write(
                    "overwrite",
                    ScriptCall::new(&OVERWRITE, 2)
                        .key(key)
                        .key(key.lock_key())
                        .arg(bytes)
                        .arg(ms)
                        .arg(key.notice_channel())
                        .arg(channel)
                        .arg(message)
                        .arg(proposed)
                        .arg(carrying),
                )
                .await,
        )?;
        Ok(Overwritten {
            version,
            carried: carried == 1,
            server_micros,
        })
    }

    /// Deletes the value at `key`, in one Lua script: leaves a tombstone (it reads as a miss)
    /// that keeps the next write version for at least `min_ttl` and as long as the old value
    /// would have lived, breaks any load lock, wakes the lock's waiters and publishes
    /// `announce`, in the same step.
    ///
    /// # Errors
    /// [`Error::InvalidTtl`], [`Error::Timeout`] or [`Error::Redis`].
    pub async fn remove(
        &self,
        key: &Key,
        min_ttl: Duration,
        announce: Announce<'_>,
    ) -> Result<Removal> {
        self.remove_announcing(key, min_ttl, Some(announce)).await
    }

    /// [`RedisStore::remove`] without an announcement. For tests.
    ///
    /// # Errors
    /// As [`RedisStore::remove`].
    #[cfg(any(test, feature = "test-util"))]
    pub async fn remove_unannounced(&self, key: &Key, min_ttl: Duration) -> Result<Removal> {
        self.remove_announcing(key, min_ttl, None).await
    }

    async fn remove_announcing(
        &self,
        key: &Key,
        min_ttl: Duration,
        announce: Option<Announce<'_>>,
    ) -> Result<Removal> {
        let ms = ttl_ms(min_ttl)?;
        let (channel, message) = announce.map_or(("", &[][..]), |a| (a.channel, a.message));
        let (existed, version): (i64, u64) = self.note(
            self.conn
                .invoke_write(
                    "remove",
                    ScriptCall::new(&REMOVE, 2)
                        .key(key)
                        .key(key.lock_key())
                        .arg(&TOMBSTONE[..])
                        .arg(ms)
                        .arg(key.notice_channel())
                        .arg(channel)
                        .arg(message),
                )
                .await,
        )?;
        Ok(Removal {
            existed: existed == 1,
            version,
        })
    }

    /// Publishes `message` on `channel`.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`].
    pub async fn publish(&self, channel: &str, message: &[u8]) -> Result<()> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(message);
        let _: i64 = self.note(self.conn.query("publish", &cmd).await)?;
        Ok(())
    }

    #[cfg(any(test, feature = "test-util"))]
    /// Deletes `key`. Returns whether it existed.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`].
    pub async fn delete(&self, key: &Key) -> Result<bool> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(key);
        let (n,): (i64,) = self.note(self.conn.query_pipe("delete", &pipe, false, true).await)?;
        Ok(n > 0)
    }

    /// Deletes every key of `space` (and its locks) with `SCAN MATCH` (never `KEYS`) and
    /// `UNLINK`, in batches; each command is bounded by the timeout. Returns how many keys were
    /// deleted. Keys written during the scan may survive it.
    ///
    /// # Errors
    /// [`Error::Timeout`] or [`Error::Redis`]; keys deleted before the failure stay deleted.
    pub async fn clear(&self, space: &KeySpace) -> Result<u64> {
        // One server: scan it. A cluster: scan every master (a plain SCAN reaches one node).
        let masters = self.note(self.conn.masters().await)?;
        if masters.is_empty() {
            return self.clear_node(space, None).await;
        }
        let mut deleted = 0;
        for master in &masters {
            deleted += self.clear_node(space, Some(master)).await?;
        }
        Ok(deleted)
    }

    async fn clear_node(&self, space: &KeySpace, node: Option<&(String, u16)>) -> Result<u64> {
        let pattern = space.match_pattern();
        let mut cursor: u64 = 0;
        let mut deleted = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, keys): (u64, Vec<Vec<u8>>) = match node {
                Some(node) => self.note(self.conn.query_node("clear (scan)", node, scan).await)?,
                None => self.note(self.conn.query("clear (scan)", &scan).await)?,
            };
            if !keys.is_empty() && node.is_some() {
                // The keys of one node span many slots: one UNLINK per slot.
                let mut by_slot: HashMap<redis::cluster_routing::Route, Vec<&[u8]>> =
                    HashMap::new();
                for key in &keys {
                    let route = redis::cluster_routing::Route::with_key(
                        key,
                        redis::cluster_routing::SlotAddr::Master,
                    );
                    by_slot.entry(route).or_default().push(key);
                }
                let mut unlink = redis::pipe();
                for slot_keys in by_slot.values() {
                    unlink.cmd("UNLINK").arg(slot_keys);
                }
                let counts: Vec<u64> = self.note(
                    self.conn
                        .query_pipe("clear (unlink)", &unlink, false, false)
                        .await,
                )?;
                deleted += counts.iter().sum::<u64>();
            } else if !keys.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                unlink.arg(keys);
                let n: u64 = self.note(self.conn.query("clear (unlink)", &unlink).await)?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }
}

pub(crate) fn classify(
    bytes: redis::Value,
    len: redis::Value,
    pttl: redis::Value,
    limit: usize,
) -> Raw {
    use redis::Value;
    if matches!(bytes, Value::ServerError(ref e) if e.code() == "WRONGTYPE") {
        return Raw::NotAString;
    }
    let pttl = match pttl {
        Value::Int(p) => p,
        _ => return Raw::Missing,
    };
    if pttl == -2 {
        return Raw::Missing;
    }
    // The full length when Redis gave it, else what GETRANGE returned (it returns one byte
    // more than the limit when the value is larger).
    let len = match (&len, &bytes) {
        (Value::Int(n), _) => usize::try_from(*n).unwrap_or(0),
        (_, Value::BulkString(b)) => b.len(),
        _ => 0,
    };
    if len > limit {
        return Raw::Oversized;
    }
    match bytes {
        Value::BulkString(bytes) => Raw::Bytes { bytes, pttl },
        Value::SimpleString(s) => Raw::Bytes {
            bytes: s.into_bytes(),
            pttl,
        },
        _ => Raw::Missing,
    }
}
