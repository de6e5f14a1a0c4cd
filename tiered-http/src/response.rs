//! Shaping answers: the `X-Cache` header and its [`CacheStatus`], `Age`, a stored response as
//! an answer (no body for HEAD), and the empty answers the cache gives when it cannot do better.

use std::fmt;
use std::time::SystemTime;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::body::{self, ResponseBody};
use crate::stored::StoredResponse;

/// The header telling how a response was answered.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// How one answer was produced, as the `X-Cache` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from the cache, fresh (also when this request waited for another's load).
    Hit,
    /// This request's handler ran.
    Miss,
    /// Served from the cache past its freshness, inside the stale-while-revalidate or
    /// fail-safe window (a refresh runs in the background).
    Stale,
    /// The cache was not consulted: the request carries a header listed in
    /// [`ResponseCacheBuilder::bypass_header`](crate::ResponseCacheBuilder::bypass_header) or
    /// `Cache-Control: no-store`.
    Bypass,
}

impl CacheStatus {
    /// The header value: `HIT`, `MISS`, `STALE`, `BYPASS`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

/// A stored response as an answer, with `Age` and `X-Cache`.
pub(crate) fn answer_from_stored(
    stored: &StoredResponse,
    status: CacheStatus,
    head: bool,
) -> Response<ResponseBody> {
    let Some(code) = stored.status() else {
        return error_answer(
            StatusCode::BAD_GATEWAY,
            &"a cached response has no valid status",
        );
    };
    let body = if head {
        body::empty()
    } else {
        body::full(stored.body().clone())
    };
    let mut response = Response::new(body);
    *response.status_mut() = code;
    *response.headers_mut() = stored.header_map();
    let age = stored.age(SystemTime::now()).as_secs();
    response
        .headers_mut()
        .insert(header::AGE, HeaderValue::from(age));
    with_x_cache(response, status)
}

/// `response` with `X-Cache: <status>`.
pub(crate) fn with_x_cache(
    mut response: Response<ResponseBody>,
    status: CacheStatus,
) -> Response<ResponseBody> {
    response
        .headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(status.as_str()));
    response
}

/// An empty answer with `status` (`X-Cache: MISS`), when the cache has no response to give;
/// `error` is logged.
pub(crate) fn error_answer(status: StatusCode, error: &dyn fmt::Display) -> Response<ResponseBody> {
    tracing::debug!(%error, %status, "answering with an error status");
    let mut response = Response::new(body::empty());
    *response.status_mut() = status;
    with_x_cache(response, CacheStatus::Miss)
}

/// HIT if fresh, STALE past its freshness.
pub(crate) fn hit_or_stale(stored: &StoredResponse) -> CacheStatus {
    if stored.is_stale(SystemTime::now()) {
        CacheStatus::Stale
    } else {
        CacheStatus::Hit
    }
}

/// Whether the answer to `request` carries no body.
pub(crate) fn is_head<B>(request: &Request<B>) -> bool {
    request.method() == Method::HEAD
}
