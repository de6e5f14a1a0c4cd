//! [`Route`]: how the responses of a group of paths are cached, and which route a path follows.

use std::time::Duration;

use tiered::EntryOptions;

/// The default TTL of responses that carry no freshness of their own: see [`Route::time_to_live`].
pub const DEFAULT_ROUTE_TTL: Duration = Duration::from_secs(60);
/// The tag of requests no route matches.
pub const DEFAULT_TAG: &str = "default";

/// How the responses of a group of paths are cached.
///
/// ```
/// use std::time::Duration;
/// use tiered_http::Route;
///
/// let products = Route::tagged("products")
///     .time_to_live(Duration::from_secs(30))
///     .stale_while_revalidate(Duration::from_secs(300));
/// let admin = Route::uncached();
/// # let _ = (products, admin);
/// ```
#[derive(Debug, Clone)]
pub struct Route {
    pub(crate) tag: String,
    pub(crate) options: EntryOptions,
    pub(crate) cached: bool,
}

impl Route {
    /// Responses cached under `tag` (letters, digits, `-`, `_`, `.`), invalidated together by
    /// [`ResponseCache::invalidate_tag`](crate::ResponseCache::invalidate_tag); TTL
    /// [`DEFAULT_ROUTE_TTL`].
    pub fn tagged(tag: impl Into<String>) -> Self {
        Route {
            tag: tag.into(),
            options: EntryOptions::new(DEFAULT_ROUTE_TTL),
            cached: true,
        }
    }

    /// Paths that are never cached: requests pass straight to the handler, untouched.
    pub fn uncached() -> Self {
        Route {
            cached: false,
            ..Route::tagged(DEFAULT_TAG)
        }
    }

    /// How long a response that says nothing of its freshness (no `Cache-Control` freshness,
    /// no `Expires`) stays fresh. Responses that do say are cached exactly as they say.
    pub fn time_to_live(mut self, ttl: Duration) -> Self {
        self.options = self.options.time_to_live(ttl);
        self
    }

    /// Past its freshness, a response is served (`X-Cache: STALE`) for up to `window` while one
    /// request refreshes it in the background.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.options = self.options.stale_while_revalidate(window);
        self
    }

    /// When the handler fails (an error, or a 5xx status), the last good response is served
    /// (`X-Cache: STALE`) for up to `max` past its freshness.
    pub fn fail_safe(mut self, max: Duration) -> Self {
        self.options = self.options.fail_safe(max);
        self
    }

    /// All the cache options at once (L1 TTL, timeouts, jitter…): see [`EntryOptions`].
    pub fn options(mut self, options: EntryOptions) -> Self {
        self.options = options;
        self
    }

    /// The tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

/// The routes by path prefix, and the route of the paths none matches.
pub(crate) struct Routes {
    pub(crate) by_prefix: Vec<(String, Route)>,
    pub(crate) default: Route,
}

impl Routes {
    /// The route of `path`: the longest prefix that matches whole path segments.
    pub(crate) fn route_for(&self, path: &str) -> &Route {
        self.by_prefix
            .iter()
            .filter(|(prefix, _)| {
                path.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                    rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/')
                })
            })
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(&self.default, |(_, route)| route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_whole_segments_longest_first() {
        let c = Routes {
            by_prefix: [
                ("/products", Route::tagged("products")),
                ("/products/special", Route::tagged("special")),
                ("/static/", Route::tagged("static")),
            ]
            .into_iter()
            .map(|(prefix, route)| (prefix.to_owned(), route))
            .collect(),
            default: Route::tagged(DEFAULT_TAG),
        };
        assert_eq!(c.route_for("/products").tag(), "products");
        assert_eq!(c.route_for("/products/7").tag(), "products");
        assert_eq!(c.route_for("/productsX").tag(), DEFAULT_TAG);
        assert_eq!(c.route_for("/products/special/1").tag(), "special");
        assert_eq!(c.route_for("/static/app.js").tag(), "static");
        assert_eq!(c.route_for("/").tag(), DEFAULT_TAG);
    }
}
