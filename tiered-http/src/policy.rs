//! What may be stored and for how long, as RFC 9111 says for a shared cache: the adapter on
//! [`http-cache-semantics`](https://docs.rs/http-cache-semantics) for responses (status, `Vary`,
//! `Set-Cookie`, `Cache-Control`, `Expires`) and for requests (`no-store`, `no-cache`,
//! `max-age`, `min-fresh`).

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy};

use crate::stored::StoredResponse;

/// How long the response is fresh, if the cache may keep it: one of the `cached_statuses`, no
/// `Set-Cookie`, a `Vary` within the `vary` headers, storable for a shared cache
/// (`http-cache-semantics`: no `no-store`, no `private`, …), and a freshness of its own or
/// `default_ttl` (the route's TTL).
pub(crate) fn storable_for(
    request: &Request<()>,
    parts: &http::response::Parts,
    cached_statuses: &[StatusCode],
    vary: &[HeaderName],
    default_ttl: Duration,
) -> Option<Duration> {
    let headers = &parts.headers;
    if !cached_statuses.contains(&parts.status) || headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    let vary_ok = headers.get_all(header::VARY).iter().all(|value| {
        value.to_str().is_ok_and(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .all(|n| vary.iter().any(|v| v.as_str().eq_ignore_ascii_case(n)))
        })
    });
    if !vary_ok {
        return None;
    }
    let now = SystemTime::now();
    let policy = CachePolicy::new_options(request, parts, now, shared_cache());
    if !policy.is_storable() {
        return None;
    }
    if headers.contains_key(header::CACHE_CONTROL) || headers.contains_key(header::EXPIRES) {
        // `max-age` can say anything up to 2^31 s: kept within what an entry may live.
        Some(policy.time_to_live(now))
            .filter(|ttl| !ttl.is_zero())
            .map(|ttl| ttl.min(tiered::MAX_OPTION_DURATION))
    } else {
        Some(default_ttl)
    }
}

/// Whether the request sets cache directives of its own (`Cache-Control` or `Pragma`).
pub(crate) fn has_cache_directives(headers: &HeaderMap) -> bool {
    headers.contains_key(header::CACHE_CONTROL) || headers.contains_key(header::PRAGMA)
}

/// The request's method, URI and headers, for `http-cache-semantics`.
pub(crate) fn without_body<B>(request: &Request<B>) -> Request<()> {
    let mut bodiless = Request::new(());
    *bodiless.method_mut() = request.method().clone();
    *bodiless.uri_mut() = request.uri().clone();
    *bodiless.headers_mut() = request.headers().clone();
    bodiless
}

/// `http-cache-semantics` judging as a shared cache (RFC 9111 §3.5: no `private`, care with
/// `Authorization`).
fn shared_cache() -> CacheOptions {
    CacheOptions {
        shared: true,
        ..CacheOptions::default()
    }
}

/// A response that any shared cache may keep for `fresh`: against it, the request's own
/// directives are all that decides (`http-cache-semantics` reads them).
fn public_response(fresh: Duration) -> http::response::Parts {
    let value = format!("public, max-age={}", fresh.as_secs());
    let mut response = Response::new(());
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(header::CACHE_CONTROL, value);
    }
    response.into_parts().0
}

/// Whether the request allows storing its response (`Cache-Control: no-store` does not).
pub(crate) fn request_allows_storing<B>(request: &Request<B>) -> bool {
    let policy = CachePolicy::new_options(
        &without_body(request),
        &public_response(Duration::from_secs(60)),
        SystemTime::now(),
        shared_cache(),
    );
    policy.is_storable()
}

/// Whether `stored` meets the request's own limits (`no-cache`, `max-age`, `min-fresh`).
pub(crate) fn meets_request_limits<B>(stored: &StoredResponse, request: &Request<B>) -> bool {
    let request = without_body(request);
    let policy = CachePolicy::new_options(
        &request,
        &public_response(stored.fresh_for()),
        stored.stored_at(),
        shared_cache(),
    );
    matches!(
        policy.before_request(&request, SystemTime::now()),
        BeforeRequest::Fresh(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::get;
    use bytes::Bytes;

    fn response(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
        let mut b = Response::builder().status(status);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn storability_follows_cache_control_and_the_route() {
        let statuses = [StatusCode::OK];
        let vary = [HeaderName::from_static("accept-language")];
        let ttl42 = Duration::from_secs(42);
        let req = get("/p", &[]);
        let ttl = |headers: &[(&str, &str)]| {
            storable_for(&req, &response(200, headers), &statuses, &vary, ttl42)
        };
        assert_eq!(ttl(&[]), Some(Duration::from_secs(42)));
        assert_eq!(
            ttl(&[("cache-control", "max-age=7")]),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            ttl(&[("cache-control", "public, s-maxage=9, max-age=1")]),
            Some(Duration::from_secs(9))
        );
        assert_eq!(ttl(&[("cache-control", "private, max-age=60")]), None);
        assert_eq!(ttl(&[("cache-control", "no-store")]), None);
        assert_eq!(ttl(&[("cache-control", "no-cache")]), None);
        assert_eq!(ttl(&[("cache-control", "max-age=0")]), None);
        assert_eq!(ttl(&[("set-cookie", "a=b")]), None);
        assert_eq!(
            ttl(&[("vary", "Accept-Language")]),
            Some(Duration::from_secs(42))
        );
        assert_eq!(ttl(&[("vary", "accept-encoding")]), None);
        assert_eq!(ttl(&[("vary", "*")]), None);
        assert_eq!(
            storable_for(&req, &response(404, &[]), &statuses, &vary, ttl42),
            None
        );
        assert_eq!(
            storable_for(&req, &response(500, &[]), &statuses, &vary, ttl42),
            None
        );
    }

    #[test]
    fn request_directives_are_read_by_http_cache_semantics() {
        assert!(request_allows_storing(&get("/", &[])));
        assert!(!request_allows_storing(&get(
            "/",
            &[("cache-control", "no-store")]
        )));
        let parts = response(200, &[]);
        let fresh = StoredResponse::new(&parts, Bytes::new(), Duration::from_secs(60));
        assert!(meets_request_limits(&fresh, &get("/", &[])));
        assert!(meets_request_limits(
            &fresh,
            &get("/", &[("cache-control", "max-age=30")])
        ));
        assert!(!meets_request_limits(
            &fresh,
            &get("/", &[("cache-control", "no-cache")])
        ));
        assert!(!meets_request_limits(
            &fresh,
            &get("/", &[("pragma", "no-cache")])
        ));
        assert!(!meets_request_limits(
            &fresh,
            &get("/", &[("cache-control", "min-fresh=120")])
        ));
        let old = StoredResponse::new(&parts, Bytes::new(), Duration::ZERO);
        assert!(!meets_request_limits(
            &old,
            &get("/", &[("cache-control", "max-age=60")])
        ));
    }
}
