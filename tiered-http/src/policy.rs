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
    if says_how_long(headers) {
        // `max-age` can say anything up to 2^31 s: kept within what an entry may live.
        Some(policy.time_to_live(now))
            .filter(|ttl| !ttl.is_zero())
            .map(|ttl| ttl.min(tiered::MAX_OPTION_DURATION))
    } else {
        // Storable, and silent on how long (no header, or only `public`, `must-revalidate`,
        // …): the route's TTL.
        Some(default_ttl)
    }
}

/// Whether a response gives its own freshness lifetime: `Expires`, or a `Cache-Control`
/// with `max-age`, `s-maxage` or `no-cache` (fresh for zero: revalidate every time).
fn says_how_long(headers: &HeaderMap) -> bool {
    headers.contains_key(header::EXPIRES)
        || headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|d| {
                d.trim()
                    .split('=')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .any(|d| matches!(d.as_str(), "max-age" | "s-maxage" | "no-cache"))
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

    /// The route's TTL, for responses that say nothing of their freshness.
    const ROUTE_TTL: Duration = Duration::from_secs(42);

    fn secs(secs: u64) -> Option<Duration> {
        Some(Duration::from_secs(secs))
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
        let mut b = Response::builder().status(status);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// How long a 200 with `headers` answering a plain GET is stored, with the default cached
    /// status (200) and keys that vary on `Accept-Language`.
    fn stored_for(headers: &[(&str, &str)]) -> Option<Duration> {
        stored_with(&get("/p", &[]), 200, headers, &[StatusCode::OK])
    }

    fn stored_with(
        request: &Request<()>,
        status: u16,
        headers: &[(&str, &str)],
        cached_statuses: &[StatusCode],
    ) -> Option<Duration> {
        let vary = [HeaderName::from_static("accept-language")];
        let response = response(status, headers);
        storable_for(request, &response, cached_statuses, &vary, ROUTE_TTL)
    }

    fn statuses(codes: &[u16]) -> Vec<StatusCode> {
        codes
            .iter()
            .map(|&c| StatusCode::from_u16(c).unwrap())
            .collect()
    }

    /// A response fresh for `fresh` seconds, stored `ago` seconds ago.
    fn stored(fresh: u64, ago: u64) -> StoredResponse {
        StoredResponse::new(
            &response(200, &[]),
            Bytes::new(),
            Duration::from_secs(fresh),
        )
        .backdated(Duration::from_secs(ago))
    }

    /// Whether `stored` answers a GET with this `Cache-Control`.
    fn meets(stored: &StoredResponse, cache_control: &str) -> bool {
        meets_request_limits(stored, &get("/", &[("cache-control", cache_control)]))
    }

    #[test]
    fn a_response_that_says_nothing_of_its_freshness_gets_the_route_ttl() {
        assert_eq!(stored_for(&[]), Some(ROUTE_TTL));
        assert_eq!(
            stored_for(&[("content-type", "text/plain")]),
            Some(ROUTE_TTL)
        );
        // Cache-Control that allows storing but gives no lifetime: the route's TTL too.
        assert_eq!(stored_for(&[("cache-control", "public")]), Some(ROUTE_TTL));
        assert_eq!(
            stored_for(&[("cache-control", "public, must-revalidate")]),
            Some(ROUTE_TTL)
        );
        // Ones that say how long, or refuse, are followed.
        assert_eq!(stored_for(&[("cache-control", "no-cache")]), None);
        assert_eq!(stored_for(&[("cache-control", "private")]), None);
    }

    #[test]
    fn max_age_sets_the_ttl_and_zero_is_not_stored() {
        assert_eq!(stored_for(&[("cache-control", "max-age=7")]), secs(7));
        assert_eq!(
            stored_for(&[("cache-control", "public, max-age=30")]),
            secs(30)
        );
        assert_eq!(stored_for(&[("cache-control", "max-age=0")]), None);
    }

    #[test]
    fn s_maxage_wins_over_max_age_in_a_shared_cache() {
        assert_eq!(
            stored_for(&[("cache-control", "public, s-maxage=9, max-age=1")]),
            secs(9)
        );
        assert_eq!(
            stored_for(&[("cache-control", "s-maxage=5, max-age=60")]),
            secs(5)
        );
        assert_eq!(
            stored_for(&[("cache-control", "s-maxage=0, max-age=60")]),
            None
        );
    }

    #[test]
    fn expires_counts_from_the_date_and_max_age_wins_over_it() {
        let date = ("date", "Sun, 06 Nov 1994 08:49:37 GMT");
        let in_100_s = ("expires", "Sun, 06 Nov 1994 08:51:17 GMT");
        assert_eq!(stored_for(&[date, in_100_s]), secs(100));
        assert_eq!(
            stored_for(&[date, ("expires", "Sun, 06 Nov 1994 08:49:37 GMT")]),
            None
        );
        assert_eq!(
            stored_for(&[date, ("expires", "0")]),
            None,
            "invalid: expired"
        );
        assert_eq!(
            stored_for(&[date, in_100_s, ("cache-control", "max-age=7")]),
            secs(7)
        );
    }

    #[test]
    fn private_is_never_stored() {
        assert_eq!(stored_for(&[("cache-control", "private")]), None);
        assert_eq!(
            stored_for(&[("cache-control", "private, max-age=60")]),
            None
        );
        assert_eq!(
            stored_for(&[("cache-control", "private, s-maxage=60")]),
            None
        );
    }

    #[test]
    fn no_store_is_never_stored() {
        assert_eq!(stored_for(&[("cache-control", "no-store")]), None);
        assert_eq!(
            stored_for(&[("cache-control", "public, max-age=60, no-store")]),
            None
        );
    }

    #[test]
    fn no_cache_is_not_stored_as_the_cache_does_not_revalidate() {
        assert_eq!(stored_for(&[("cache-control", "no-cache")]), None);
        assert_eq!(
            stored_for(&[("cache-control", "no-cache, max-age=60")]),
            None
        );
    }

    #[test]
    fn set_cookie_is_never_stored_even_when_public() {
        assert_eq!(stored_for(&[("set-cookie", "a=b")]), None);
        assert_eq!(
            stored_for(&[
                ("set-cookie", "a=b"),
                ("cache-control", "public, max-age=60")
            ]),
            None
        );
    }

    #[test]
    fn only_the_cached_statuses_are_stored() {
        let req = get("/p", &[]);
        let ok = [StatusCode::OK];
        assert_eq!(stored_with(&req, 200, &[], &ok), Some(ROUTE_TTL));
        assert_eq!(stored_with(&req, 404, &[], &ok), None);
        assert_eq!(stored_with(&req, 500, &[], &ok), None);
        let max_age = [("cache-control", "max-age=30")];
        assert_eq!(stored_with(&req, 404, &max_age, &ok), None);
        // A listed status is stored as RFC 9111 allows: 404 is cacheable by default, 302
        // needs an explicit freshness, 206 (partial content) is never stored.
        let listed = statuses(&[200, 206, 302, 404]);
        assert_eq!(stored_with(&req, 404, &[], &listed), Some(ROUTE_TTL));
        assert_eq!(stored_with(&req, 302, &[], &listed), None);
        assert_eq!(stored_with(&req, 302, &max_age, &listed), secs(30));
        assert_eq!(stored_with(&req, 206, &max_age, &listed), None);
    }

    #[test]
    fn vary_must_stay_within_the_keyed_headers() {
        assert_eq!(stored_for(&[("vary", "Accept-Language")]), Some(ROUTE_TTL));
        assert_eq!(
            stored_for(&[("vary", "accept-language, ")]),
            Some(ROUTE_TTL)
        );
        assert_eq!(stored_for(&[("vary", "accept-encoding")]), None);
        assert_eq!(
            stored_for(&[("vary", "accept-language, accept-encoding")]),
            None
        );
        assert_eq!(stored_for(&[("vary", "*")]), None);
    }

    #[test]
    fn the_age_a_response_arrives_with_is_taken_off_its_ttl() {
        let max_age = ("cache-control", "max-age=60");
        assert_eq!(stored_for(&[max_age, ("age", "50")]), secs(10));
        assert_eq!(stored_for(&[max_age, ("age", "60")]), None);
    }

    #[test]
    fn ttls_are_capped_at_what_an_entry_may_live() {
        assert_eq!(
            stored_for(&[("cache-control", "max-age=2147483648")]),
            Some(tiered::MAX_OPTION_DURATION)
        );
    }

    #[test]
    fn a_request_with_authorization_is_stored_only_when_the_response_says_so() {
        let req = get("/p", &[("authorization", "Bearer t")]);
        let ok = [StatusCode::OK];
        let ttl =
            |cache_control: &str| stored_with(&req, 200, &[("cache-control", cache_control)], &ok);
        assert_eq!(stored_with(&req, 200, &[], &ok), None);
        assert_eq!(ttl("max-age=60"), None);
        assert_eq!(ttl("public, max-age=60"), secs(60));
        assert_eq!(ttl("s-maxage=60"), secs(60));
    }

    #[test]
    fn request_no_store_bypasses_the_cache() {
        assert!(request_allows_storing(&get("/", &[])));
        assert!(!request_allows_storing(&get(
            "/",
            &[("cache-control", "no-store")]
        )));
        assert!(request_allows_storing(&get(
            "/",
            &[("cache-control", "no-cache")]
        )));
        assert!(request_allows_storing(&get("/", &[("pragma", "no-cache")])));
    }

    #[test]
    fn a_request_without_limits_takes_a_fresh_response() {
        assert!(meets_request_limits(&stored(60, 0), &get("/", &[])));
        assert!(meets_request_limits(&stored(60, 40), &get("/", &[])));
        assert!(meets(&stored(60, 0), "max-age=30"));
    }

    #[test]
    fn request_no_cache_and_pragma_no_cache_skip_the_cached_response() {
        assert!(!meets(&stored(60, 0), "no-cache"));
        assert!(!meets_request_limits(
            &stored(60, 0),
            &get("/", &[("pragma", "no-cache")])
        ));
    }

    #[test]
    fn request_max_age_limits_the_age_of_the_cached_response() {
        assert!(meets(&stored(60, 20), "max-age=30"));
        assert!(!meets(&stored(60, 40), "max-age=30"));
        assert!(!meets(&stored(0, 0), "max-age=60"), "stale");
    }

    #[test]
    fn request_min_fresh_asks_for_freshness_left() {
        assert!(meets(&stored(60, 40), "min-fresh=10"));
        assert!(!meets(&stored(60, 40), "min-fresh=30"));
        assert!(!meets(&stored(60, 0), "min-fresh=120"));
    }

    #[test]
    fn a_stale_response_meets_no_request_but_one_with_max_stale() {
        assert!(!meets_request_limits(&stored(60, 70), &get("/", &[])));
        assert!(!meets(&stored(60, 70), "max-age=600"));
        assert!(meets(&stored(60, 70), "max-stale"));
        assert!(meets(&stored(60, 70), "max-stale=30"));
        assert!(!meets(&stored(60, 70), "max-stale=5"));
    }
}
