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
        matches!(self, Error::L2(e) if e.is_unavailable())
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
