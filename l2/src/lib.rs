//! The Redis tier (L2) of the tiered cache.
//!
//! What it is for: everything that touches Redis for the cache's values.
//! - [`Connection`]: one server ([`Connection::builder`]) or a Redis Cluster
//!   ([`Connection::cluster`]), plain or TLS (`rediss://`, rustls, a private CA with
//!   [`ConnectionBuilder::tls_root_certificate`]); multiplexed, reconnecting, `TCP_NODELAY` on,
//!   and a timeout on every command (250 ms by default), so a hung Redis is a typed
//!   [`Error::Timeout`], never a hang. Optionally writes wait for replicas
//!   ([`ConnectionBuilder::replica_acks`]).
//! - [`RedisStore`]: typed reads (one key or a batch in one round trip), the versioned,
//!   announced writes ([`RedisStore::overwrite`], [`RedisStore::remove`]: each one Lua script
//!   that changes the entry and publishes its announcement), namespace clears by `SCAN`
//!   (never `KEYS`), and counters ([`StoreStats`]). Raw writes (no version, no announcement)
//!   exist only with the `test-util` feature, for tests that act behind a cache's back.
//! - The envelope ([`Codec`], [`EntryMeta`], [`TypeTag`]): a binary header (magic, format
//!   version, type tag, write version, deadlines relative to the write) before a MessagePack
//!   payload. Bad bytes are distinct [`DecodeError`]s; reading them through the store deletes
//!   them (compare-and-delete) and counts them.
//! - [`KeySpace`] / [`Key`]: injective key encoding with a cluster hash tag.
//! - The lock ([`RedisStore::try_lock`], [`RedisStore::unlock`], [`RedisStore::extend_lock`],
//!   [`RedisStore::complete_lock`]: a load's write, only while its lock holds).
//!
//! What it is not for: the in-process tier, single-flight, or deciding when to lock or serve
//! stale data (that is `tiered`). It knows nothing of moka.
//!
//! Every script touches one key and its lock, under one hash tag, so the same calls run on a
//! Redis Cluster; batches are split by slot there (atomic per slot), and clears scan every
//! master. [`Subscriber`] on a cluster moves to a live node when its node dies.
//!
//! # Least-privilege ACL user
//! [`KeySpace::acl_rules`] gives the rules for a user that may cache in one namespace only:
//! its keys, its channels, and the commands this crate sends (no `@dangerous` ones). A
//! refused command is [`Error::Permission`]. URLs and passwords never appear in `Debug`
//! output or errors.
//!
//! ```no_run
//! # async fn f() -> l2::Result<()> {
//! use std::time::Duration;
//! use l2::{Codec, Connection, EntryMeta, KeySpace, RedisStore, TypeTag};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct User { id: u64, name: String }
//!
//! let store = RedisStore::new(Connection::connect("redis://127.0.0.1:6379").await?);
//! let codec = Codec::<User>::new(TypeTag::from_name("app.User/v1"));
//! let key = KeySpace::new("users").key("42");
//! let meta = EntryMeta::new(Duration::from_secs(300)).stale_while_revalidate(Duration::from_secs(60));
//! store.set(&key, &codec, &User { id: 42, name: "alice".into() }, &meta).await?;
//! if let Some(hit) = store.get(&key, &codec).await? {
//!     println!("{} (fresh: {})", hit.value.name, hit.is_fresh());
//! }
//! # Ok(()) }
//! ```
//!
//! # Consistency
//! Each call is one round trip to one Redis. A read sees the latest write Redis acknowledged.
//! Freshness is computed from the key's remaining life in Redis (PTTL), read atomically with
//! the value, so it does not depend on the clocks of writer and reader agreeing.

mod cluster;
mod connection;
mod envelope;
mod error;
mod keys;
mod lock;
mod scripts;
mod store;
mod subscriber;

pub use connection::{Connection, ConnectionBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT};
pub use envelope::{Codec, DEFAULT_MAX_SIZE, EntryMeta, MAX_WRITE_VERSION, TypeTag};
/// The envelope's layout, for tests that build or break entries byte by byte.
#[cfg(any(test, feature = "test-util"))]
pub use envelope::{
    FLAG_ABSENT, FLAG_TOMBSTONE, FORMAT_VERSION, HEADER_LEN, Header, MAGIC, decode_header,
};
pub use error::{DecodeError, Error, Result};
pub use keys::{Key, KeySpace, MAX_KEY_LEN};
pub use lock::{Lock, LockAttempt, LockWait, LockWaiters};
pub use store::{Announce, Carry, Fetched, Overwritten, RedisStore, Removal, StoreStats};
pub use subscriber::{Event, ProbeSigner, Subscriber};

#[cfg(test)]
mod tests {
    /// Every public future of this crate is `Send`, so it can run on a multi-threaded runtime.
    use crate::*;

    #[allow(dead_code)]
    fn futures_are_send(
        store: RedisStore,
        key: Key,
        codec: Codec<String>,
        meta: EntryMeta,
        lock: Lock,
    ) {
        fn is_send<T: Send>(_: &T) {}
        let ttl = std::time::Duration::ZERO;
        let value = String::new();
        is_send(&Connection::connect(""));
        is_send(&Connection::builder("").connect());
        is_send(&store.connection().ping());
        is_send(&store.get(&key, &codec));
        is_send(&store.get_many(&[], &codec));
        is_send(&store.set(&key, &codec, &value, &meta));
        is_send(&store.set_bytes(&key, &[], ttl));
        is_send(&store.set_many(&[], &codec, &meta));
        is_send(&store.delete(&key));
        is_send(&store.delete_if_unchanged(&key, &[]));
        is_send(&store.clear(&KeySpace::new("")));
        is_send(&store.try_lock(&key, ttl));
        is_send(&store.unlock(&lock));
        is_send(&store.extend_lock(&lock, ttl));
        is_send(&store.set_if_locked(&lock, &codec, &value, &meta));
        is_send(&store.lookup(&key, &codec));
        is_send(&store.lookup_many(&[], &codec));
        is_send(&store.overwrite_unannounced(&key, &[], ttl));
        is_send(&store.remove_unannounced(&key, ttl));
        is_send(&store.publish("", &[]));
        is_send(&store.complete_lock(&lock, &[], ttl));
        is_send(&store.try_lock_many(&[], ttl));
        is_send(&store.complete_locks(&[], ttl));
        is_send(&store.unlock_many(&[]));
        is_send(&store.lookup_or_lock(&key, &codec, ttl));
        is_send(&Subscriber::connect(store.connection()));
        is_send(&Connection::cluster([""]).connect());
    }
}
