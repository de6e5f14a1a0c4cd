//! The errors of building and invalidating the response cache.

/// Errors from [`ResponseCache`](crate::ResponseCache) setup and invalidation. Serving never
/// fails because of the cache: a request the cache cannot answer goes to the handler.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is invalid; the message names it.
    #[error("invalid response cache configuration: {0}")]
    Config(String),
    /// No route carries this tag.
    #[error("no route is tagged `{0}`")]
    UnknownTag(String),
    /// The underlying cache failed (Redis unreachable, for instance).
    #[error(transparent)]
    Cache(#[from] tiered::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
