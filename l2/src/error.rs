//! The errors of the Redis tier.

use std::sync::Arc;
use std::time::Duration;

use crate::envelope::TypeTag;

/// Errors from the Redis tier. `Clone`, so single-flight followers can share one.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The subscriber connection changed while an operation on it was in progress (a probe
    /// round that straddled a move to another cluster node, or the subscriber closed): the
    /// operation proves nothing and may be retried.
    #[error("the subscriber connection changed during `{op}`")]
    SubscriberChanged {
        /// The operation that was cut short.
        op: &'static str,
    },
    /// No node could be reached to subscribe on (every candidate failed).
    #[error("no Redis node to subscribe on")]
    NoNode,
    /// The server answered something this library does not understand (an `INFO server`
    /// without `run_id`, …): a proxy in between, or a server that is not Redis.
    #[error("unexpected answer from redis to `{op}`: {detail}")]
    UnexpectedReply {
        /// The command.
        op: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// Redis did not answer within the configured timeout (stopped, overloaded, or cut off).
    #[error("redis `{op}` timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        op: &'static str,
        /// The timeout that ran out.
        after: Duration,
    },
    /// Redis answered with an error, or the connection failed.
    #[error("redis `{op}` failed")]
    Redis {
        /// The operation that failed.
        op: &'static str,
        /// The client's error.
        #[source]
        source: Arc<redis::RedisError>,
    },
    /// The bytes stored under a key are not a valid entry of the expected type. The entry was
    /// deleted (unless it changed meanwhile) and counted.
    #[error("the entry at `{key}` could not be decoded")]
    Decode {
        /// The Redis key.
        key: String,
        /// What was wrong with the bytes.
        #[source]
        source: DecodeError,
    },
    /// A value over the configured maximum size was refused on write.
    #[error("an encoded value of {size} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The value could not be encoded as MessagePack.
    #[error("the value could not be encoded")]
    Encode(#[source] Arc<rmp_serde::encode::Error>),
    /// A time to live that Redis cannot take (under 1 ms).
    #[error("invalid time to live {0:?}: it must be at least 1 ms")]
    InvalidTtl(Duration),
    /// The connection could not be configured (bad URL, bad option).
    #[error("invalid redis configuration: {0}")]
    Config(String),
    /// The TLS connection could not be set up: most often the server's certificate is not
    /// signed by a trusted CA ([`crate::ConnectionBuilder::tls_root_certificate`]) or is not
    /// for the host name in the URL.
    #[error("TLS to redis failed: {reason}")]
    Tls {
        /// What the TLS library said (never the URL).
        reason: String,
    },
    /// The write is on the master, but fewer replicas than asked for
    /// ([`crate::ConnectionBuilder::replica_acks`]) confirmed it in time: a failover now could
    /// lose it.
    #[error("redis `{op}`: {acked} of {wanted} replicas confirmed the write in time")]
    NotReplicated {
        /// The write.
        op: &'static str,
        /// Replicas that confirmed it.
        acked: u32,
        /// Replicas asked for.
        wanted: u32,
    },
    /// The Redis ACL user may not run a command, or not on that key or channel (`NOPERM`).
    /// Not a fault to retry: the user's rights must change (see the `l2` crate docs for the
    /// least-privilege user a namespace needs).
    #[error("the redis user may not run `{op}`: {detail}")]
    Permission {
        /// The operation refused.
        op: &'static str,
        /// What Redis said.
        detail: String,
    },
}

impl Error {
    /// Whether Redis is unreachable or too slow (timeouts, refused or dropped connections, a
    /// cluster failing over): the caller should fall back (to L1, stale data, or the loader)
    /// rather than fail. [`Error::NotReplicated`] is not: Redis answered, and reads still work.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Timeout { .. } => true,
            Error::Redis { source, .. } => {
                source.is_timeout()
                    || source.is_io_error()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal()
                    || source.is_unrecoverable_error()
                    // A cluster mid-failover or a node still loading its data.
                    || source.code().is_some_and(|code| {
                        matches!(
                            code,
                            "CLUSTERDOWN" | "TRYAGAIN" | "MASTERDOWN" | "READONLY" | "LOADING"
                        )
                    })
            }
            // Nothing reached: as unavailable as a refused connection.
            Error::NoNode => true,
            _ => false,
        }
    }

    /// Whether this is a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
            || matches!(self, Error::Redis { source, .. } if source.is_timeout())
    }

    /// Whether the stored bytes were not a valid entry.
    pub fn is_decode(&self) -> bool {
        matches!(self, Error::Decode { .. })
    }

    /// Whether the ACL user lacked a right ([`Error::Permission`]).
    pub fn is_permission(&self) -> bool {
        matches!(self, Error::Permission { .. })
    }

    pub(crate) fn redis(op: &'static str, source: redis::RedisError) -> Self {
        if source.code() == Some("NOPERM") {
            return Error::Permission {
                op,
                detail: source.detail().unwrap_or("no permission").to_string(),
            };
        }
        Error::Redis {
            op,
            source: Arc::new(source),
        }
    }

    /// A connection error, told apart as TLS when the connection uses TLS and the error is
    /// the handshake's.
    pub(crate) fn connect(source: redis::RedisError, tls: bool) -> Self {
        Error::redis("connect", source).into_tls_if(tls)
    }

    /// This error as [`Error::Tls`] if `tls` and it came from the TLS layer.
    pub(crate) fn into_tls_if(self, tls: bool) -> Self {
        match &self {
            Error::Redis { source, .. } if tls => {
                let text = source.to_string();
                let lower = text.to_ascii_lowercase();
                if ["certificate", "handshake", "tls", "unknownissuer", "ssl"]
                    .iter()
                    .any(|w| lower.contains(w))
                {
                    let reason = if text.contains("UnknownIssuer") {
                        format!(
                            "{text} (the server's certificate is not signed by a trusted CA: \
                             give its CA with tls_root_certificate)"
                        )
                    } else {
                        text
                    };
                    return Error::Tls { reason };
                }
                self
            }
            _ => self,
        }
    }
}

/// What is wrong with bytes that should be an entry. Each case is distinct, so metrics and
/// logs can tell a foreign writer from a truncated write or a schema change.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes do not start with this library's magic: another writer's data.
    #[error("bad magic bytes: not written by this library")]
    BadMagic,
    /// Written by a format version this build does not know.
    #[error("unsupported envelope format version {0}")]
    UnsupportedVersion(u8),
    /// Flags this build does not understand (for example a compression it lacks).
    #[error("unsupported envelope flags {0:#04x}")]
    UnsupportedFlags(u8),
    /// The entry is an "absent" marker (a cached "not found"), read where a value is required.
    #[error("the entry is an absent marker, not a value")]
    Absent,
    /// Written for another type.
    #[error("type mismatch: expected {expected}, found {found}")]
    WrongType {
        /// The type this reader expects.
        expected: TypeTag,
        /// The type the writer declared.
        found: TypeTag,
    },
    /// Shorter than the header says.
    #[error("truncated entry: {actual} bytes where {expected} were expected")]
    Truncated {
        /// The length the header implies.
        expected: usize,
        /// The length found.
        actual: usize,
    },
    /// Longer than the header says.
    #[error("{0} unexpected bytes after the payload")]
    TrailingBytes(usize),
    /// The freshness window is inconsistent (fresh longer than the whole life).
    #[error("invalid header: fresh for {fresh_ms} ms but stale after {stale_ms} ms")]
    BadDeadlines {
        /// Fresh for, in ms.
        fresh_ms: u64,
        /// Whole life, in ms.
        stale_ms: u64,
    },
    /// The write version is beyond any the write scripts stamp ([`MAX_WRITE_VERSION`](crate::MAX_WRITE_VERSION)):
    /// bytes written behind the cache's back. Kept, it would outrank every real write.
    #[error("write version {0} is beyond any the cache stamps")]
    BadVersion(u64),
    /// The MessagePack payload does not decode as the expected type.
    #[error("corrupt payload")]
    Payload(#[source] Arc<rmp_serde::decode::Error>),
    /// The key holds a Redis type other than a string (a list, a hash, ...).
    #[error("the key holds a non-string Redis value")]
    NotAString,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
