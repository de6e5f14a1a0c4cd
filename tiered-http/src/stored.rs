//! What the cache keeps for a response: status, headers and body, when it was stored and for
//! how long it is fresh, or a "pass" marker for a resource found not to be cacheable.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::response::Parts;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Headers a cache never stores: hop-by-hop headers (RFC 9110 §7.6.1) and the ones this layer
/// sets itself on every answer.
const NOT_STORED: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "age",
    "x-cache",
];

/// A response as stored in both tiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredResponse {
    status: u16,
    headers: Vec<(String, Bytes)>,
    body: Bytes,
    stored_at_ms: u64,
    fresh_ms: u64,
}

impl StoredResponse {
    /// Keeps `parts` (without hop-by-hop headers) and `body`, fresh for `fresh` from now.
    pub(crate) fn new(parts: &Parts, body: Bytes, fresh: Duration) -> Self {
        let headers = parts
            .headers
            .iter()
            .filter(|(name, _)| !NOT_STORED.contains(&name.as_str()))
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    Bytes::copy_from_slice(value.as_bytes()),
                )
            })
            .collect();
        StoredResponse {
            status: parts.status.as_u16(),
            headers,
            body,
            stored_at_ms: unix_ms(SystemTime::now()),
            fresh_ms: u64::try_from(fresh.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// When it was stored.
    pub(crate) fn stored_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.stored_at_ms)
    }

    /// How long it is fresh, counted from [`StoredResponse::stored_at`].
    pub(crate) fn fresh_for(&self) -> Duration {
        Duration::from_millis(self.fresh_ms)
    }

    /// How long ago it was stored (zero if this node's clock is behind the writer's).
    pub(crate) fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.stored_at()).unwrap_or_default()
    }

    /// Whether it is past its freshness (served only inside the stale-while-revalidate or
    /// fail-safe windows).
    pub(crate) fn is_stale(&self, now: SystemTime) -> bool {
        self.age(now) >= self.fresh_for()
    }

    /// The status, or `None` if the stored number is not a valid status (foreign bytes).
    pub(crate) fn status(&self) -> Option<http::StatusCode> {
        http::StatusCode::from_u16(self.status).ok()
    }

    /// The stored headers; any name or value that is not valid HTTP is dropped.
    pub(crate) fn header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.headers.len() + 2);
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_maybe_shared(value.clone()),
            ) {
                map.append(name, value);
            }
        }
        map
    }

    /// The body.
    pub(crate) fn body(&self) -> &Bytes {
        &self.body
    }

    /// The same response, stored `by` earlier.
    #[cfg(test)]
    pub(crate) fn backdated(mut self, by: Duration) -> Self {
        self.stored_at_ms -= u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// The response's declared content type, for diagnostics.
    #[cfg(test)]
    fn content_type(&self) -> Option<HeaderValue> {
        self.header_map().get(http::header::CONTENT_TYPE).cloned()
    }
}

/// What the cache holds for a request key: a response, or a "pass" marker saying the resource
/// answered with something not cacheable (private, `no-store`, a status not cached, too big…),
/// so requests go straight to the handler for a while instead of queueing behind one another
/// (Varnish calls this hit-for-pass).
///
/// Cloning is cheap: the response is shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedResponse(pub(crate) Option<Arc<StoredResponse>>);

impl CachedResponse {
    /// The pass marker.
    pub(crate) fn pass() -> Self {
        CachedResponse(None)
    }

    /// Whether this is a pass marker rather than a response.
    pub fn is_pass(&self) -> bool {
        self.0.is_none()
    }

    /// The status of the stored response (`None` for a pass marker).
    pub fn status(&self) -> Option<http::StatusCode> {
        self.0.as_ref().and_then(|r| r.status())
    }

    /// The stored body (`None` for a pass marker).
    pub fn body(&self) -> Option<&Bytes> {
        self.0.as_ref().map(|r| r.body())
    }

    /// How long ago the response was stored (`None` for a pass marker).
    pub fn age(&self) -> Option<Duration> {
        self.0.as_ref().map(|r| r.age(SystemTime::now()))
    }
}

impl Serialize for CachedResponse {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.as_deref().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CachedResponse {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Option::<StoredResponse>::deserialize(deserializer).map(|r| CachedResponse(r.map(Arc::new)))
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Response::builder().status(200);
        for (n, v) in headers {
            builder = builder.header(*n, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn hop_by_hop_headers_are_not_stored() {
        let p = parts(&[
            ("content-type", "text/plain"),
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("x-cache", "MISS"),
            ("vary", "accept-language"),
        ]);
        let stored = StoredResponse::new(&p, Bytes::from_static(b"hi"), Duration::from_secs(5));
        let map = stored.header_map();
        assert_eq!(map.len(), 2);
        assert!(map.contains_key("vary"));
        assert_eq!(stored.content_type().unwrap(), "text/plain");
        assert!(!stored.is_stale(SystemTime::now()));
    }

    #[test]
    fn round_trips_through_messagepack_and_keeps_the_pass_marker_distinct() {
        let p = parts(&[
            ("content-type", "application/json"),
            ("x-a", "1"),
            ("x-a", "2"),
        ]);
        let response = CachedResponse(Some(Arc::new(StoredResponse::new(
            &p,
            Bytes::from_static(b"{}"),
            Duration::from_secs(1),
        ))));
        for value in [response, CachedResponse::pass()] {
            let bytes = rmp_serde_roundtrip(&value);
            assert_eq!(bytes, value);
        }
    }

    fn rmp_serde_roundtrip(value: &CachedResponse) -> CachedResponse {
        let codec = l2::Codec::<CachedResponse>::new(l2::TypeTag::from_name("t"));
        let meta = l2::EntryMeta {
            write_version: 0,
            fresh_for: Duration::from_secs(1),
            stale_for: Duration::from_secs(1),
        };
        let bytes = codec.encode(value, &meta).unwrap();
        codec.decode(&bytes).unwrap().1
    }

    #[test]
    fn foreign_values_never_panic() {
        let stored = StoredResponse {
            status: 7,
            headers: vec![("bad name".into(), Bytes::from_static(b"\n"))],
            body: Bytes::new(),
            stored_at_ms: u64::MAX,
            fresh_ms: 0,
        };
        assert!(stored.status().is_none());
        assert!(stored.header_map().is_empty());
        assert_eq!(stored.age(SystemTime::now()), Duration::ZERO);
    }
}
