//! The errors callers of the tiered cache see.

use std::sync::Arc;
use std::time::Duration;

/// Errors from the tiered cache. `Clone`, so one load's error reaches every caller that waited
/// on it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Redis tier failed.
    #[error("the redis tier failed")]
    L2(#[from] l2::Error),
    /// The caller's loader returned an error.
    #[error("the loader failed for key `{key}`")]
    Loader {
        /// The cache key (as given by the caller).
        key: String,
        /// The loader's error.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The load ended without a result: the loader panicked, or its runtime shut down.
    #[error("the load of key `{key}` was aborted (the loader panicked or its runtime shut down)")]
    LoadAborted {
        /// The cache key.
        key: String,
    },
    /// The loader reported that the value does not exist ([`Loaded::not_found`](crate::Loaded::not_found)),
    /// now or in a cached "not found".
    #[error("no value exists for key `{key}`")]
    NotFound {
        /// The cache key.
        key: String,
    },
    /// Redis failed repeatedly, so the circuit breaker skips it for a while, and the call
    /// could not be answered without it.
    #[error("the redis tier is skipped after repeated failures (circuit open)")]
    CircuitOpen,
    /// The cache was configured wrongly; the message names the setting.
    #[error("invalid cache configuration: {0}")]
    Config(String),
    /// The key is longer than the cache's maximum key length
    /// ([`TieredCacheBuilder::max_key_len`](crate::TieredCacheBuilder::max_key_len)); nothing
    /// was read or written.
    #[error("key of {len} bytes is longer than the maximum of {max} bytes")]
    KeyTooLong {
        /// The key's length in bytes.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The runtime shut down before a change that had begun could finish; whether it reached
    /// Redis is unknown.
    #[error("the runtime shut down before the change finished")]
    Shutdown,
    /// A caller gave up waiting for a load (its own or one it joined).
    #[error("gave up after {waited:?} waiting for the load of `{key}`")]
    WaitTimeout {
        /// The cache key.
        key: String,
        /// How long it waited.
        waited: Duration,
    },
}

impl Error {
    /// Whether Redis was unreachable or too slow: fall back rather than fail.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::L2(e) if e.is_unavailable()) || matches!(self, Error::CircuitOpen)
    }

    /// Whether the value does not exist (the loader said so, or a cached "not found").
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// Whether the caller's loader failed, panicked, or ran too long.
    pub fn is_load_failure(&self) -> bool {
        matches!(
            self,
            Error::Loader { .. } | Error::LoadAborted { .. } | Error::WaitTimeout { .. }
        )
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
