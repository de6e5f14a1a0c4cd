//! The distributed lock primitives: an efficiency lock (in Kleppmann's sense) that keeps
//! concurrent loads of one key across processes to one, usually.
//!
//! It cannot promise mutual exclusion (a holder can pause past the TTL, Redis can restart), so
//! correctness never depends on it: the holder writes its result with
//! [`RedisStore::complete_lock`], which refuses once the lock changed hands, the way a fencing
//! token would.

use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::Codec;
#[cfg(any(test, feature = "test-util"))]
use crate::envelope::EntryMeta;
use crate::error::Result;
use crate::keys::{Key, KeySpace};
use crate::scripts::{COMPLETE, COMPLETE_SRC, READ_OR_LOCK, ScriptCall};
use crate::store::{Fetched, Raw, RedisStore, classify, ttl_ms};
use crate::subscriber::{Event, Subscriber};
use tokio::sync::watch;

static EXTEND: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('PEXPIRE', KEYS[1], ARGV[2])
          end
          return 0",
    )
});

/// `KEYS[1]` the lock, `KEYS[2]` the data key (same hash tag, so one slot).
#[cfg(any(test, feature = "test-util"))]
static SET_IF_LOCKED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
            redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
            return 1
          end
          return 0",
    )
});

/// `KEYS[1]` the lock, `KEYS[2]` the data key: release if still held by `ARGV[1]` and tell
/// waiters on channel `ARGV[2]`, so one of them takes over at once.
const RELEASE_SRC: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then
            redis.call('DEL', KEYS[1])
            redis.call('PUBLISH', ARGV[2], KEYS[2])
            return 1
          end
          return 0";
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RELEASE_SRC));

/// Whether [`RedisStore::lookup_or_lock`] took the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockAttempt {
    /// The entry was fresh: no lock was tried.
    NotTried,
    /// The lock is ours.
    Taken(Lock),
    /// Someone else holds it (a load is running elsewhere).
    HeldElsewhere,
}

/// A held lock on one data key: the lock key and this holder's random token.
#[derive(Clone, PartialEq, Eq)]
pub struct Lock {
    data_key: Key,
    lock_key: Arc<str>,
    token: Arc<str>,
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("lock_key", &self.lock_key)
            .finish_non_exhaustive()
    }
}

impl Lock {
    /// The data key this lock guards.
    pub fn data_key(&self) -> &Key {
        &self.data_key
    }

    /// The Redis key of the lock.
    pub fn lock_key(&self) -> &str {
        &self.lock_key
    }

    /// This holder's token.
    pub fn token(&self) -> &str {
        &self.token
    }
}

fn new_token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

impl RedisStore {
    /// Tries once to take the lock on `key` for `ttl` (`SET lock token NX PX ttl`). Returns
    /// `None` if someone else holds it.
    ///
    /// # Errors
    /// [`Error::InvalidTtl`](crate::Error::InvalidTtl) under 1 ms, [`Error::Timeout`](crate::Error::Timeout) or [`Error::Redis`](crate::Error::Redis).
    pub async fn try_lock(&self, key: &Key, ttl: Duration) -> Result<Option<Lock>> {
        let ms = ttl_ms(ttl)?;
        let lock = Lock {
            data_key: key.clone(),
            lock_key: key.lock_key().into(),
            token: new_token().into(),
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(&*lock.lock_key)
            .arg(&*lock.token)
            .arg("NX")
            .arg("PX")
            .arg(ms);
        let reply: Result<Option<String>> = self.note(self.connection().query("lock", &cmd).await);
        match reply {
            Ok(reply) => Ok(reply.map(|_| lock)),
            Err(e) => {
                // A command that timed out may still run on the server (a paused or stopped
                // one runs it when it resumes): that lock must not outlive the outage.
                self.abandon(vec![lock], ttl, &e);
                Err(e)
            }
        }
    }

    /// Releases `locks` (compare-and-delete by token, waking their waiters). If Redis cannot
    /// be reached, a task keeps trying every 100 ms until `ttl` has passed (the locks expire
    /// by then): a lock left behind by an outage would otherwise make every caller of its
    /// key wait out its TTL once Redis is back.
    pub async fn release(&self, locks: Vec<Lock>, ttl: Duration) {
        if locks.is_empty() {
            return;
        }
        if let Err(e) = self.unlock_many(&locks).await {
            self.abandon(locks, ttl, &e);
        }
    }

    /// After `error` on a command that held, or may have taken, `locks`: if Redis was
    /// unreachable, hands them to the store's one reaper task, which releases them once Redis
    /// answers again.
    fn abandon(&self, locks: Vec<Lock>, ttl: Duration, error: &crate::Error) {
        if !error.is_unavailable() || locks.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !self.orphans.add(locks, ttl) {
            return;
        }
        let store = self.clone();
        rt.spawn(async move { store.reap().await });
    }

    /// The reaper: every 100 ms, releases every orphaned lock in one pipeline; while Redis is
    /// unreachable they wait (a paused server may still run the command that took one when it
    /// resumes), and each is given up one lock TTL after it was handed over *and* Redis was
    /// seen answering. Ends when none is left.
    async fn reap(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let batch = self.orphans.take();
            if batch.is_empty() {
                if self.orphans.finish() {
                    return;
                }
                continue;
            }
            let locks: Vec<Lock> = batch.iter().map(|o| o.lock.clone()).collect();
            match self.unlock_many(&locks).await {
                Err(e) if e.is_unavailable() => self.orphans.put_back(batch, false),
                // Released (or refused for good): keep only those still inside their TTL
                // measured from an answer, in case a late command takes one again.
                _ => self.orphans.put_back(batch, true),
            }
        }
    }
    /// Reads `key` as [`RedisStore::lookup`] does and, unless the entry is fresh, tries to take
    /// its lock for `ttl`, in one round trip (one Lua script): the read-then-lock of a cold
    /// load without a second trip, and without a value landing unseen between the two.
    ///
    /// # Errors
    /// As [`RedisStore::lookup`]; a decode error still reports whether the lock was taken
    /// through [`LockAttempt`] only on success, so on [`Error::Decode`](crate::Error::Decode)
    /// the lock (if taken) is released before returning.
    pub async fn lookup_or_lock<T: Serialize + DeserializeOwned>(
        &self,
        key: &Key,
        codec: &Codec<T>,
        ttl: Duration,
    ) -> Result<(Option<Fetched<Option<T>>>, LockAttempt)> {
        let ms = ttl_ms(ttl)?;
        let lock = Lock {
            data_key: key.clone(),
            lock_key: key.lock_key().into(),
            token: new_token().into(),
        };
        let limit = codec.limit();
        let end = i64::try_from(limit).unwrap_or(i64::MAX);
        let reply: Result<Vec<redis::Value>> = self.note(
            self.connection()
                .invoke(
                    "read or lock",
                    READ_OR_LOCK
                        .key(key)
                        .key(&*lock.lock_key)
                        .arg(end)
                        .arg(&*lock.token)
                        .arg(ms),
                )
                .await,
        );
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                // As in `try_lock`: the script may still run once the server answers again.
                self.abandon(vec![lock], ttl, &e);
                return Err(e);
            }
        };
        let mut it = reply.into_iter();
        let (Some(bytes), Some(len), Some(pttl), Some(locked)) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(crate::Error::redis(
                "read or lock",
                redis::RedisError::from((
                    redis::ErrorKind::UnexpectedReturnType,
                    "wrong number of replies to read-or-lock",
                )),
            ));
        };
        let attempt = match locked {
            redis::Value::Int(1) => LockAttempt::Taken(lock.clone()),
            redis::Value::Int(-1) => LockAttempt::HeldElsewhere,
            _ => LockAttempt::NotTried,
        };
        let raw: Raw = classify(bytes, len, pttl, limit);
        match self.decode(key, raw, codec).await {
            Ok(found) => Ok((found, attempt)),
            Err(e) => {
                if matches!(attempt, LockAttempt::Taken(_)) {
                    let _ = self.unlock(&lock).await;
                }
                Err(e)
            }
        }
    }

    /// Releases `lock` if this holder still has it (compare-and-delete in Lua: never deletes
    /// another holder's lock). Returns whether it was released.
    ///
    /// # Errors
    /// [`Error::Timeout`](crate::Error::Timeout) or [`Error::Redis`](crate::Error::Redis).
    /// Waiters watching the key through [`LockWaiters`] are woken.
    pub async fn unlock(&self, lock: &Lock) -> Result<bool> {
        let n: i64 = self.note(
            self.connection()
                .invoke(
                    "unlock",
                    RELEASE
                        .key(&*lock.lock_key)
                        .key(&lock.data_key)
                        .arg(&*lock.token)
                        .arg(lock.data_key.notice_channel()),
                )
                .await,
        )?;
        Ok(n == 1)
    }

    /// Finishes a load under `lock` in one round trip: while this holder still has the lock,
    /// writes `bytes` (an encoded entry) at the data key for `ttl` with the next write version,
    /// releases the lock and wakes the waiters. Returns the version written, or `None` if the
    /// lock expired or was broken by a newer write ([`RedisStore::overwrite`],
    /// [`RedisStore::remove`]), whose value must win.
    ///
    /// # Errors
    /// [`Error::InvalidTtl`](crate::Error::InvalidTtl), [`Error::Timeout`](crate::Error::Timeout) or [`Error::Redis`](crate::Error::Redis).
    pub async fn complete_lock(
        &self,
        lock: &Lock,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<Option<u64>> {
        let ms = ttl_ms(ttl)?;
        let v: u64 = self.note(
            self.connection()
                .invoke_write(
                    "complete lock",
                    ScriptCall::new(&COMPLETE, 2)
                        .key(&*lock.lock_key)
                        .key(&lock.data_key)
                        .arg(&*lock.token)
                        .arg(bytes)
                        .arg(ms)
                        .arg(lock.data_key.notice_channel()),
                )
                .await,
        )?;
        Ok((v > 0).then_some(v))
    }

    /// Tries once to take the locks of all `keys` for `ttl`, in one round trip (a pipeline
    /// of `SET NX PX`): the result has one entry per key, `None` where someone else holds it.
    ///
    /// # Errors
    /// As [`RedisStore::try_lock`].
    pub async fn try_lock_many(&self, keys: &[Key], ttl: Duration) -> Result<Vec<Option<Lock>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ms = ttl_ms(ttl)?;
        let locks: Vec<Lock> = keys
            .iter()
            .map(|key| Lock {
                data_key: key.clone(),
                lock_key: key.lock_key().into(),
                token: new_token().into(),
            })
            .collect();
        let mut pipe = redis::pipe();
        for lock in &locks {
            pipe.cmd("SET")
                .arg(&*lock.lock_key)
                .arg(&*lock.token)
                .arg("NX")
                .arg("PX")
                .arg(ms);
        }
        let replies: Vec<Option<String>> = match self.note(
            self.connection()
                .query_pipe("lock many", &pipe, false, false)
                .await,
        ) {
            Ok(replies) => replies,
            Err(e) => {
                // On a cluster some slots' parts may have taken their locks before another
                // part failed, and a timed-out pipeline may still run on the server: release
                // ours (the release compares the token, so locks others hold are untouched)
                // rather than leave waiters to their TTL.
                if self.connection().is_cluster() {
                    let _ = self.unlock_many(&locks).await;
                }
                self.abandon(locks, ttl, &e);
                return Err(e);
            }
        };
        Ok(locks
            .into_iter()
            .zip(replies)
            .map(|(lock, reply)| reply.map(|_| lock))
            .collect())
    }

    /// [`RedisStore::complete_lock`] for many locks in one round trip (a pipeline of `EVAL`s):
    /// each `(lock, bytes)` is written for `ttl` only while its lock holds. Returns, per item,
    /// the version written or `None`.
    ///
    /// # Errors
    /// As [`RedisStore::complete_lock`].
    pub async fn complete_locks(
        &self,
        items: &[(Lock, Vec<u8>)],
        ttl: Duration,
    ) -> Result<Vec<Option<u64>>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let ms = ttl_ms(ttl)?;
        let mut pipe = redis::pipe();
        for (lock, bytes) in items {
            pipe.cmd("EVAL")
                .arg(COMPLETE_SRC.as_str())
                .arg(2)
                .arg(&*lock.lock_key)
                .arg(&lock.data_key)
                .arg(&*lock.token)
                .arg(bytes.as_slice())
                .arg(ms)
                .arg(lock.data_key.notice_channel());
        }
        let replies: Vec<u64> = self.note(
            self.connection()
                .query_pipe("complete locks", &pipe, false, true)
                .await,
        )?;
        Ok(replies.into_iter().map(|v| (v > 0).then_some(v)).collect())
    }

    /// [`RedisStore::unlock`] for many locks in one round trip.
    ///
    /// # Errors
    /// As [`RedisStore::unlock`].
    pub async fn unlock_many(&self, locks: &[Lock]) -> Result<()> {
        if locks.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for lock in locks {
            pipe.cmd("EVAL")
                .arg(RELEASE_SRC)
                .arg(2)
                .arg(&*lock.lock_key)
                .arg(&lock.data_key)
                .arg(&*lock.token)
                .arg(lock.data_key.notice_channel())
                .ignore();
        }
        self.note(
            self.connection()
                .query_pipe("unlock many", &pipe, false, false)
                .await,
        )
    }

    /// Extends `lock` to `ttl` from now if this holder still has it (compare-and-PEXPIRE).
    /// Returns whether it was extended; `false` means the lock was lost.
    ///
    /// # Errors
    /// [`Error::InvalidTtl`](crate::Error::InvalidTtl), [`Error::Timeout`](crate::Error::Timeout) or [`Error::Redis`](crate::Error::Redis).
    pub async fn extend_lock(&self, lock: &Lock, ttl: Duration) -> Result<bool> {
        let ms = ttl_ms(ttl)?;
        let n: i64 = self.note(
            self.connection()
                .invoke(
                    "extend lock",
                    EXTEND.key(&*lock.lock_key).arg(&*lock.token).arg(ms),
                )
                .await,
        )?;
        Ok(n == 1)
    }

    #[cfg(any(test, feature = "test-util"))]
    /// Writes `value` at the lock's data key only while `lock` is still held by this token, in
    /// one Lua script. Returns whether it was written: `false` means the lock expired or
    /// changed hands, and a newer value must not be overwritten.
    ///
    /// # Errors
    /// As `RedisStore::set`.
    pub async fn set_if_locked<T: Serialize + DeserializeOwned>(
        &self,
        lock: &Lock,
        codec: &Codec<T>,
        value: &T,
        meta: &EntryMeta,
    ) -> Result<bool> {
        let bytes = codec.encode(value, meta)?;
        let ms = ttl_ms(meta.stale_for)?;
        let n: i64 = self.note(
            self.connection()
                .invoke_write(
                    "set if locked",
                    ScriptCall::new(&SET_IF_LOCKED, 2)
                        .key(&*lock.lock_key)
                        .key(&lock.data_key)
                        .arg(&*lock.token)
                        .arg(bytes.as_slice())
                        .arg(ms),
                )
                .await,
        )?;
        Ok(n == 1)
    }
}

type WaiterMap = Arc<Mutex<HashMap<Arc<str>, watch::Sender<u64>>>>;

/// Wakes processes waiting for another's lock: writers publish the data key on the space's
/// notice channel ([`KeySpace::notice_channel`]) when a value lands or a lock is released, and
/// this turns each message into a wake-up of the waiters on that key.
///
/// A lost message only delays a waiter until its next poll (see [`LockWait::notified`]); a
/// reconnect of the subscriber wakes every waiter, since messages may have been lost.
#[derive(Clone)]
pub struct LockWaiters {
    waiters: WaiterMap,
}

impl fmt::Debug for LockWaiters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockWaiters")
            .field("waiting_keys", &lock_map(&self.waiters).len())
            .finish()
    }
}

fn lock_map(map: &WaiterMap) -> MutexGuard<'_, HashMap<Arc<str>, watch::Sender<u64>>> {
    // Short critical sections with no `.await`.
    map.lock()
}

fn wake(sender: &watch::Sender<u64>) {
    sender.send_modify(|n| *n = n.wrapping_add(1));
}

impl LockWaiters {
    /// Listens on `space`'s notice channel through `subscriber`.
    ///
    /// # Errors
    /// As [`Subscriber::listen`].
    pub async fn attach(subscriber: &Subscriber, space: &KeySpace) -> Result<LockWaiters> {
        let waiters: WaiterMap = Arc::default();
        let map = Arc::clone(&waiters);
        subscriber
            .listen(&space.notice_channel(), move |event| match event {
                Event::Message { payload, .. } => {
                    let Ok(key) = std::str::from_utf8(payload) else {
                        return;
                    };
                    if let Some(sender) = lock_map(&map).get(key) {
                        wake(sender);
                    }
                }
                _ => lock_map(&map).values().for_each(wake),
            })
            .await?;
        Ok(LockWaiters { waiters })
    }

    /// Starts watching `key`. Take the watch *before* checking the data key, so a value that
    /// lands between the check and the wait still wakes it.
    pub fn watch(&self, key: &Key) -> LockWait {
        let mut map = lock_map(&self.waiters);
        let rx = match map.get(key.as_str()) {
            Some(sender) => sender.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                map.insert(Arc::clone(key.as_arc()), tx);
                rx
            }
        };
        LockWait {
            rx,
            key: Arc::clone(key.as_arc()),
            waiters: Arc::clone(&self.waiters),
        }
    }
}

/// A watch on one key's lock, from [`LockWaiters::watch`].
pub struct LockWait {
    rx: watch::Receiver<u64>,
    key: Arc<str>,
    waiters: WaiterMap,
}

impl fmt::Debug for LockWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockWait").field("key", &self.key).finish()
    }
}

impl LockWait {
    /// Waits until a writer signals the key (a value landed or the lock was released) or
    /// `within` passes; returns whether it was signalled. Signals since the watch was taken
    /// (or since the last call) count.
    pub async fn notified(&mut self, within: Duration) -> bool {
        matches!(
            tokio::time::timeout(within, self.rx.changed()).await,
            Ok(Ok(()))
        )
    }
}

impl Drop for LockWait {
    fn drop(&mut self) {
        let mut map = lock_map(&self.waiters);
        // This receiver is still alive here: it is the last one when the count is 1.
        if map
            .get(&self.key)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            map.remove(&self.key);
        }
    }
}

/// A lock handed to the reaper, with how long to keep releasing it once Redis answers.
#[derive(Debug)]
pub(crate) struct Orphan {
    lock: Lock,
    ttl: Duration,
    /// When Redis was first seen answering after the lock was handed over.
    answered: Option<std::time::Instant>,
}

/// The locks a store still has to release, and whether its reaper runs. Bounded: beyond
/// [`MAX_ORPHANS`] the oldest are forgotten (their TTL ends them anyway).
#[derive(Debug, Default)]
pub(crate) struct Orphans {
    locks: parking_lot::Mutex<Vec<Orphan>>,
    reaping: std::sync::atomic::AtomicBool,
}

/// The most locks a store keeps for its reaper.
const MAX_ORPHANS: usize = 10_000;

impl Orphans {
    fn list(&self) -> parking_lot::MutexGuard<'_, Vec<Orphan>> {
        self.locks.lock()
    }

    /// Adds `locks`; returns whether a reaper must be started.
    fn add(&self, locks: Vec<Lock>, ttl: Duration) -> bool {
        let mut list = self.list();
        list.extend(locks.into_iter().map(|lock| Orphan {
            lock,
            ttl,
            answered: None,
        }));
        if list.len() > MAX_ORPHANS {
            let excess = list.len() - MAX_ORPHANS;
            list.drain(..excess);
        }
        !self.reaping.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    fn take(&self) -> Vec<Orphan> {
        std::mem::take(&mut *self.list())
    }

    /// Puts back what is still to be released; `answered`: Redis just answered.
    fn put_back(&self, batch: Vec<Orphan>, answered: bool) {
        let now = std::time::Instant::now();
        let keep = batch.into_iter().filter_map(|mut o| {
            if answered {
                let since = *o.answered.get_or_insert(now);
                if now.duration_since(since) >= o.ttl {
                    return None;
                }
            }
            Some(o)
        });
        self.list().extend(keep);
    }

    /// The reaper is about to end: returns `false` (and stays on) if locks arrived meanwhile.
    fn finish(&self) -> bool {
        let list = self.list();
        if !list.is_empty() {
            return false;
        }
        self.reaping
            .store(false, std::sync::atomic::Ordering::Release);
        true
    }
}
