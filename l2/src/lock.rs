//! The distributed lock primitives: an efficiency lock (in Kleppmann's sense) that keeps
//! concurrent loads of one key across processes to one, usually.
//!
//! It cannot promise mutual exclusion (a holder can pause past the TTL, Redis can restart), so
//! correctness never depends on it: the holder writes its result with
//! [`RedisStore::set_if_locked`], which refuses once the lock changed hands, the way a fencing
//! token would.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::{Codec, EntryMeta};
use crate::error::Result;
use crate::keys::Key;
use crate::store::{DELETE_IF_EQUALS, RedisStore, ttl_ms};

static EXTEND: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('PEXPIRE', KEYS[1], ARGV[2])
          end
          return 0",
    )
});

/// `KEYS[1]` the lock, `KEYS[2]` the data key (same hash tag, so one slot).
static SET_IF_LOCKED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
            redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
            return 1
          end
          return 0",
    )
});

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
        let reply: Option<String> = self.note(self.connection().query("lock", &cmd).await)?;
        Ok(reply.map(|_| lock))
    }

    /// Releases `lock` if this holder still has it (compare-and-delete in Lua: never deletes
    /// another holder's lock). Returns whether it was released.
    ///
    /// # Errors
    /// [`Error::Timeout`](crate::Error::Timeout) or [`Error::Redis`](crate::Error::Redis).
    pub async fn unlock(&self, lock: &Lock) -> Result<bool> {
        let n: i64 = self.note(
            self.connection()
                .invoke(
                    "unlock",
                    DELETE_IF_EQUALS.key(&*lock.lock_key).arg(&*lock.token),
                )
                .await,
        )?;
        Ok(n == 1)
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

    /// Writes `value` at the lock's data key only while `lock` is still held by this token, in
    /// one Lua script. Returns whether it was written: `false` means the lock expired or
    /// changed hands, and a newer value must not be overwritten.
    ///
    /// # Errors
    /// As [`RedisStore::set`].
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
                .invoke(
                    "set if locked",
                    SET_IF_LOCKED
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
