//! [`ResponseCache`]: the routes, the keys, what is cacheable, and serving one request.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy};
use tiered::invalidation::{Bus, BusConfig};
use tiered::l2::Connection;
use tiered::{BoxError, EntryOptions, Error as CacheError, Loaded, TieredCache};
use tokio::sync::Notify;
use tower_service::Service;

use crate::body::{self, Collected, ResponseBody};
use crate::error::{Error, Result};
use crate::stored::{CachedResponse, StoredResponse};

/// The header telling how a response was answered.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// The default limit on a cached body: see [`ResponseCacheBuilder::max_body_bytes`].
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// The default TTL of responses that carry no freshness of their own: see [`Route::time_to_live`].
pub const DEFAULT_ROUTE_TTL: Duration = Duration::from_secs(60);
/// How long a "pass" marker lasts by default: see [`ResponseCacheBuilder::pass_time_to_live`].
pub const DEFAULT_PASS_TTL: Duration = Duration::from_secs(10);
/// The tag of requests no route matches.
pub const DEFAULT_TAG: &str = "default";

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
    /// [`ResponseCacheBuilder::bypass_header`] or `Cache-Control: no-store`.
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
    tag: String,
    options: EntryOptions,
    cached: bool,
}

impl Route {
    /// Responses cached under `tag` (letters, digits, `-`, `_`, `.`), invalidated together by
    /// [`ResponseCache::invalidate_tag`]; TTL [`DEFAULT_ROUTE_TTL`].
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

/// A response cache for tower services; build it with [`ResponseCache::builder`], wrap services
/// with [`ResponseCache::layer`], and invalidate from anywhere with the same handle (or from
/// another node: invalidations reach every node through the bus).
///
/// Cloning is cheap and shares the cache.
#[derive(Clone)]
pub struct ResponseCache {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Vec<(String, Route)>,
    default_route: Route,
    groups: BTreeMap<String, TieredCache<CachedResponse>>,
    vary: Vec<HeaderName>,
    bypass: Vec<HeaderName>,
    statuses: Vec<StatusCode>,
    max_body: usize,
    pass_ttl: Duration,
}

impl fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseCache")
            .field("tags", &self.inner.groups.keys().collect::<Vec<_>>())
            .field("vary", &self.inner.vary)
            .field("max_body", &self.inner.max_body)
            .finish_non_exhaustive()
    }
}

/// Builds a [`ResponseCache`]. Required: a Redis URL or a connection.
pub struct ResponseCacheBuilder {
    namespace: String,
    redis_url: Option<String>,
    connection: Option<Connection>,
    bus: Option<Bus>,
    bus_config: BusConfig,
    l1_max_bytes: u64,
    max_body: usize,
    vary: Vec<String>,
    bypass: Vec<String>,
    statuses: Vec<u16>,
    routes: Vec<(String, Route)>,
    default_route: Route,
    pass_ttl: Duration,
}

impl fmt::Debug for ResponseCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may carry a password.
        f.debug_struct("ResponseCacheBuilder")
            .field("namespace", &self.namespace)
            .field("routes", &self.routes)
            .field("vary", &self.vary)
            .finish_non_exhaustive()
    }
}

impl ResponseCache {
    /// A builder with the defaults: namespace `http`, bodies up to 1 MiB, status 200 only,
    /// requests with `Authorization` or `Cookie` bypass the cache, unmatched paths cached
    /// under [`DEFAULT_TAG`] for [`DEFAULT_ROUTE_TTL`].
    pub fn builder() -> ResponseCacheBuilder {
        ResponseCacheBuilder {
            namespace: "http".into(),
            redis_url: None,
            connection: None,
            bus: None,
            bus_config: BusConfig::default(),
            l1_max_bytes: 64 << 20,
            max_body: DEFAULT_MAX_BODY_BYTES,
            vary: Vec::new(),
            bypass: vec!["authorization".into(), "cookie".into()],
            statuses: vec![200],
            routes: Vec::new(),
            default_route: Route::tagged(DEFAULT_TAG),
            pass_ttl: DEFAULT_PASS_TTL,
        }
    }

    /// The tower layer that caches responses of the services it wraps.
    pub fn layer(&self) -> crate::ResponseCacheLayer {
        crate::ResponseCacheLayer::new(self.clone())
    }

    /// Drops every response cached under `tag`, on every node. Returns how many Redis keys
    /// were deleted.
    ///
    /// # Errors
    /// [`Error::UnknownTag`]; [`Error::Cache`] if Redis fails (this node's copies are dropped
    /// anyway).
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        let group = self
            .inner
            .groups
            .get(tag)
            .ok_or_else(|| Error::UnknownTag(tag.to_owned()))?;
        Ok(group.clear().await?)
    }

    /// Drops the response cached for this exact request (method, path, query and the
    /// configured `Vary` headers), on every node. To drop every variant of a resource, tag
    /// its route and use [`ResponseCache::invalidate_tag`].
    ///
    /// # Errors
    /// [`Error::Cache`] if Redis fails.
    pub async fn invalidate<B>(&self, request: &Request<B>) -> Result<()> {
        let route = self.inner.route_for(request.uri().path());
        let key = self.inner.key(request);
        if let Some(group) = self.inner.groups.get(&route.tag) {
            group.invalidate(&key).await?;
        }
        Ok(())
    }

    /// The cache behind each tag, for [`TieredCache::stats`], [`TieredCache::health`] and
    /// metrics (every group exports its own, labelled `<namespace>.<tag>`).
    pub fn caches(&self) -> impl Iterator<Item = (&str, &TieredCache<CachedResponse>)> {
        self.inner.groups.iter().map(|(t, c)| (t.as_str(), c))
    }

    /// Answers one request: from the cache, or through `inner` (the wrapped service).
    pub(crate) async fn serve<S, ReqB, ResB>(
        self,
        inner: S,
        request: Request<ReqB>,
    ) -> std::result::Result<Response<ResponseBody>, S::Error>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError> + Send + 'static,
        ReqB: Send + 'static,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let this = &self.inner;
        if !matches!(*request.method(), Method::GET | Method::HEAD)
            || request.headers().contains_key(header::UPGRADE)
        {
            return pass(inner, request, None).await;
        }
        let route = this.route_for(request.uri().path());
        if !route.cached {
            return pass(inner, request, None).await;
        }
        if this
            .bypass
            .iter()
            .any(|h| request.headers().contains_key(h))
        {
            return pass(inner, request, Some(CacheStatus::Bypass)).await;
        }
        let Some(group) = this.groups.get(&route.tag) else {
            return pass(inner, request, None).await;
        };
        let key = this.key(&request);
        let demands = has_directives(request.headers());
        if demands {
            if !request_allows_storing(&request) {
                return pass(inner, request, Some(CacheStatus::Bypass)).await;
            }
            // The request sets its own limits (`no-cache`, `max-age`, `min-fresh`): check what
            // is cached against them, and go to the handler if it does not satisfy them.
            if let Ok(Some(found)) = group.get_with(&key, route.options).await {
                match &found.0 {
                    Some(stored) if satisfies(stored, &request) => {
                        return Ok(respond(stored, label(stored), is_head(&request)));
                    }
                    Some(_) => return self.reload(inner, request, group, &key, route).await,
                    None => return pass(inner, request, Some(CacheStatus::Miss)).await,
                }
            }
        }
        let head = is_head(&request);
        let call = Arc::new(Call::new(request));
        let fallback = inner.clone();
        let loader = {
            let call = Arc::clone(&call);
            let cache = self.clone();
            let default_ttl = route.options.ttl();
            move || async move { cache.load(inner, call, default_ttl).await }
        };
        let result = group.get_or_set_with(&key, route.options, loader).await;
        match result {
            Ok(CachedResponse(Some(stored))) => {
                let status = if call.produced(&stored) {
                    CacheStatus::Miss
                } else {
                    label(&stored)
                };
                Ok(respond(&stored, status, head))
            }
            Ok(CachedResponse(None)) => call.answer_for_pass(fallback).await,
            Err(error) => Ok(call.answer_for_error(&error).await),
        }
    }

    /// Runs the handler for a request whose own limits the cached response does not meet, and
    /// stores its answer (without joining or waiting for other loads).
    async fn reload<S, ReqB, ResB>(
        &self,
        mut inner: S,
        request: Request<ReqB>,
        group: &TieredCache<CachedResponse>,
        key: &str,
        route: &Route,
    ) -> std::result::Result<Response<ResponseBody>, S::Error>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Send,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let probe = probe(&request);
        let head = is_head(&request);
        std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
        let response = inner.call(request).await?;
        let (parts, body) = response.into_parts();
        let Some(fresh) = self.inner.storable_for(&probe, &parts, route.options.ttl()) else {
            return Ok(marked(
                Response::from_parts(parts, body::boxed(body)),
                CacheStatus::Miss,
            ));
        };
        match body::collect(body, self.inner.max_body).await {
            Ok(Collected::Whole(bytes)) => {
                let stored = Arc::new(StoredResponse::new(&parts, bytes, fresh));
                let value = CachedResponse(Some(Arc::clone(&stored)));
                if let Err(error) = group
                    .set_with(key, &value, route.options.time_to_live(fresh))
                    .await
                {
                    tracing::debug!(%error, "storing a reloaded response failed");
                }
                Ok(respond(&stored, CacheStatus::Miss, head))
            }
            Ok(Collected::Streaming(body)) => {
                Ok(marked(Response::from_parts(parts, body), CacheStatus::Miss))
            }
            Err(error) => Ok(failure(StatusCode::BAD_GATEWAY, &error)),
        }
    }

    /// The loader: runs the handler with the leading request, and returns what to cache.
    async fn load<S, ReqB, ResB>(
        self,
        mut inner: S,
        call: Arc<Call<ReqB>>,
        default_ttl: Duration,
    ) -> std::result::Result<Loaded<CachedResponse>, BoxError>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Send,
        S::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        // Wakes this request's caller however the load ends, even if it is dropped.
        let _finished = Finished(Arc::clone(&call));
        self.run_handler(&mut inner, &call, default_ttl).await
    }

    async fn run_handler<S, ReqB, ResB>(
        &self,
        inner: &mut S,
        call: &Call<ReqB>,
        default_ttl: Duration,
    ) -> std::result::Result<Loaded<CachedResponse>, BoxError>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Send,
        S::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        let request = lock(&call.request).take().ok_or(Gone)?;
        let probe = probe(&request);
        std::future::poll_fn(|cx| inner.poll_ready(cx))
            .await
            .map_err(Into::into)?;
        let response = inner.call(request).await.map_err(Into::into)?;
        let (parts, body) = response.into_parts();
        if parts.status.is_server_error() {
            let status = parts.status;
            call.keep(Response::from_parts(parts, body::boxed(body)));
            return Err(Box::new(ServerError(status)));
        }
        let Some(fresh) = self.inner.storable_for(&probe, &parts, default_ttl) else {
            call.keep(Response::from_parts(parts, body::boxed(body)));
            return Ok(Loaded::new(CachedResponse::pass()).time_to_live(self.inner.pass_ttl));
        };
        match body::collect(body, self.inner.max_body).await? {
            Collected::Whole(bytes) => {
                let stored = Arc::new(StoredResponse::new(&parts, bytes, fresh));
                *lock(&call.produced) = Some(Arc::clone(&stored));
                Ok(Loaded::new(CachedResponse(Some(stored))).time_to_live(fresh))
            }
            Collected::Streaming(body) => {
                call.keep(Response::from_parts(parts, body));
                Ok(Loaded::new(CachedResponse::pass()).time_to_live(self.inner.pass_ttl))
            }
        }
    }
}

impl Inner {
    /// The route of `path`: the longest prefix that matches whole path segments.
    fn route_for(&self, path: &str) -> &Route {
        self.routes
            .iter()
            .filter(|(prefix, _)| {
                path.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                    rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/')
                })
            })
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(&self.default_route, |(_, route)| route)
    }

    /// The cache key: method, path, query parameters sorted by name (then value), and the
    /// configured `Vary` headers (absent and empty are distinct).
    fn key<B>(&self, request: &Request<B>) -> String {
        let uri = request.uri();
        let mut params: Vec<&str> = uri
            .query()
            .map(|q| q.split('&').filter(|p| !p.is_empty()).collect())
            .unwrap_or_default();
        params.sort_by(|a, b| split_param(a).cmp(&split_param(b)));
        let mut key =
            String::with_capacity(16 + uri.path().len() + uri.query().map_or(0, str::len));
        key.push_str(request.method().as_str());
        key.push(' ');
        key.push_str(uri.path());
        for (i, param) in params.iter().enumerate() {
            key.push(if i == 0 { '?' } else { '&' });
            key.push_str(param);
        }
        for name in &self.vary {
            key.push('\n');
            key.push_str(name.as_str());
            let mut values = request.headers().get_all(name).iter().peekable();
            if values.peek().is_none() {
                key.push('!');
            }
            for (i, value) in values.enumerate() {
                key.push(if i == 0 { ':' } else { ',' });
                key.push_str(&String::from_utf8_lossy(value.as_bytes()));
            }
        }
        key
    }

    /// How long the response is fresh, if the cache may keep it: a cached status, no
    /// `Set-Cookie`, a `Vary` within the configured headers, storable for a shared cache
    /// (`http-cache-semantics`: no `no-store`, no `private`, …), and a freshness of its own or
    /// the route's TTL.
    fn storable_for(
        &self,
        request: &Request<()>,
        parts: &http::response::Parts,
        default_ttl: Duration,
    ) -> Option<Duration> {
        let headers = &parts.headers;
        if !self.statuses.contains(&parts.status) || headers.contains_key(header::SET_COOKIE) {
            return None;
        }
        let vary_ok = headers.get_all(header::VARY).iter().all(|value| {
            value.to_str().is_ok_and(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .all(|n| self.vary.iter().any(|v| v.as_str().eq_ignore_ascii_case(n)))
            })
        });
        if !vary_ok {
            return None;
        }
        let now = SystemTime::now();
        let policy = CachePolicy::new_options(request, parts, now, shared());
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
}

/// One request on its way through the cache: its request (until a loader takes it), the
/// response its loader produced, and a non-cacheable answer kept for it alone.
struct Call<B> {
    head: bool,
    request: Mutex<Option<Request<B>>>,
    produced: Mutex<Option<Arc<StoredResponse>>>,
    kept: Mutex<Option<Response<ResponseBody>>>,
    finished: Notify,
}

impl<B> Call<B> {
    fn new(request: Request<B>) -> Self {
        Call {
            head: is_head(&request),
            request: Mutex::new(Some(request)),
            produced: Mutex::new(None),
            kept: Mutex::new(None),
            finished: Notify::new(),
        }
    }

    /// Whether `stored` is what this request's own loader produced.
    fn produced(&self, stored: &Arc<StoredResponse>) -> bool {
        lock(&self.produced)
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, stored))
    }

    fn keep(&self, response: Response<ResponseBody>) {
        *lock(&self.kept) = Some(response);
    }

    /// This request's own answer, when its loader ran (now, or as a background refresh it
    /// will finish).
    async fn own_answer(&self, wait: bool) -> Option<Response<ResponseBody>> {
        loop {
            let finished = self.finished.notified();
            if let Some(response) = lock(&self.kept).take() {
                return Some(response);
            }
            if lock(&self.request).is_some() {
                return None; // its loader never ran
            }
            if let Some(stored) = lock(&self.produced).as_ref() {
                return Some(respond(stored, CacheStatus::Miss, self.head));
            }
            if !wait {
                return None;
            }
            finished.await;
            if lock(&self.kept).is_none() && lock(&self.produced).is_none() {
                return None; // finished without an answer (the handler failed)
            }
        }
    }

    /// The cache said "pass": serve this request's own answer if its loader produced one, else
    /// call the handler with it.
    async fn answer_for_pass<S, ResB>(
        &self,
        fallback: S,
    ) -> std::result::Result<Response<ResponseBody>, S::Error>
    where
        S: Service<Request<B>, Response = Response<ResB>>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        if let Some(response) = self.own_answer(true).await {
            return Ok(marked(response, CacheStatus::Miss));
        }
        let request = lock(&self.request).take();
        match request {
            Some(request) => pass(fallback, request, Some(CacheStatus::Miss)).await,
            None => Ok(failure(
                StatusCode::BAD_GATEWAY,
                &"the load ended without an answer",
            )),
        }
    }

    /// The load failed: this request's own answer (the handler's 5xx) if it led the load, else
    /// an error status. Waiters do not each retry a failing handler.
    async fn answer_for_error(&self, error: &CacheError) -> Response<ResponseBody> {
        // Past the hard timeout, answer now; otherwise the handler's own answer is coming.
        let wait = !matches!(error, CacheError::WaitTimeout { .. });
        if let Some(response) = self.own_answer(wait).await {
            return marked(response, CacheStatus::Miss);
        }
        let status = match error {
            CacheError::WaitTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        failure(status, error)
    }
}

/// Tells a request's caller that its loader is over (finished, failed or dropped).
struct Finished<B>(Arc<Call<B>>);

impl<B> Drop for Finished<B> {
    fn drop(&mut self) {
        self.0.finished.notify_one();
    }
}

/// The handler failed with this status; its response went to the request that led the load.
#[derive(Debug, thiserror::Error)]
#[error("the handler answered {0}")]
struct ServerError(StatusCode);

/// The leading request was already taken (cannot happen: a loader runs once).
#[derive(Debug, thiserror::Error)]
#[error("the request was already handled")]
struct Gone;

impl ResponseCacheBuilder {
    /// The Redis namespace prefix; each tag caches under `<namespace>.<tag>`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Connect to this Redis (`redis://`, a password in the URL never appears in logs).
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }

    /// Use this connection (shared with other caches of the process).
    pub fn connection(mut self, connection: Connection) -> Self {
        self.connection = Some(connection);
        self
    }

    /// Use this invalidation bus (one per process is enough; shared with other caches).
    pub fn bus(mut self, bus: Bus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Heartbeat settings of the bus this builder connects (when no bus is given).
    pub fn bus_config(mut self, config: BusConfig) -> Self {
        self.bus_config = config;
        self
    }

    /// The L1 byte budget of each tag's cache.
    pub fn l1_max_bytes(mut self, bytes: u64) -> Self {
        self.l1_max_bytes = bytes;
        self
    }

    /// Bodies bigger than this are passed through, not cached (default 1 MiB).
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// A request header whose value is part of the key (`Accept-Language`, say). A response
    /// whose `Vary` names a header not listed here is not cached.
    pub fn vary(mut self, header: impl Into<String>) -> Self {
        self.vary.push(header.into());
        self
    }

    /// Requests carrying this header skip the cache (`X-Cache: BYPASS`). The defaults are
    /// `Authorization` and `Cookie`: responses to them are usually personal.
    pub fn bypass_header(mut self, header: impl Into<String>) -> Self {
        self.bypass.push(header.into());
        self
    }

    /// Cache requests whatever headers they carry (removes the default bypass headers).
    pub fn no_bypass_headers(mut self) -> Self {
        self.bypass.clear();
        self
    }

    /// The statuses that may be cached (default: 200 only).
    pub fn cached_statuses(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.statuses = statuses.into_iter().collect();
        self
    }

    /// Paths starting with `prefix` (whole segments: `/products` matches `/products/7`, not
    /// `/productsX`) follow `route`; the longest matching prefix wins.
    pub fn route(mut self, prefix: impl Into<String>, route: Route) -> Self {
        self.routes.push((prefix.into(), route));
        self
    }

    /// How paths that no route matches are cached (default: [`DEFAULT_TAG`], 60 s).
    pub fn default_route(mut self, route: Route) -> Self {
        self.default_route = route;
        self
    }

    /// How long a resource found not cacheable sends requests straight to the handler before
    /// the cache tries again (default 10 s).
    pub fn pass_time_to_live(mut self, ttl: Duration) -> Self {
        self.pass_ttl = ttl;
        self
    }

    /// Connects and builds one cache per tag.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting; [`Error::Cache`] when Redis cannot be reached.
    pub async fn build(self) -> Result<ResponseCache> {
        let header = |what: &str, name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Error::Config(format!("{what}: `{name}` is not a header name")))
        };
        let vary = self
            .vary
            .iter()
            .map(|n| header("vary", n))
            .collect::<Result<Vec<_>>>()?;
        let bypass = self
            .bypass
            .iter()
            .map(|n| header("bypass_header", n))
            .collect::<Result<Vec<_>>>()?;
        let statuses = self
            .statuses
            .iter()
            .map(|&s| {
                StatusCode::from_u16(s)
                    .map_err(|_| Error::Config(format!("cached_statuses: {s} is not a status")))
            })
            .collect::<Result<Vec<_>>>()?;
        if self.pass_ttl.is_zero() {
            return Err(Error::Config("pass_time_to_live must be above zero".into()));
        }
        for (prefix, route) in &self.routes {
            if !prefix.starts_with('/') {
                return Err(Error::Config(format!(
                    "route `{prefix}`: a prefix starts with `/`"
                )));
            }
            check_tag(route)?;
            route
                .options
                .validate()
                .map_err(|e| Error::Config(format!("route `{prefix}`: {e}")))?;
        }
        check_tag(&self.default_route)?;
        let connection = match (self.connection, self.redis_url) {
            (Some(c), _) => c,
            (None, Some(url)) => Connection::connect(url).await.map_err(CacheError::from)?,
            (None, None) => {
                return Err(Error::Config("redis_url or connection is required".into()));
            }
        };
        let bus = match self.bus {
            Some(bus) => bus,
            None => Bus::connect(&connection, self.bus_config)
                .await
                .map_err(CacheError::from)?,
        };
        let mut groups = BTreeMap::new();
        let tags = self
            .routes
            .iter()
            .map(|(_, r)| r)
            .chain([&self.default_route])
            .filter(|r| r.cached);
        for route in tags {
            if groups.contains_key(&route.tag) {
                continue;
            }
            let cache = TieredCache::builder()
                .namespace(format!("{}.{}", self.namespace, route.tag))
                .type_name("tiered-http/response/1")
                .connection(connection.clone())
                .bus(bus.clone())
                .l1_max_bytes(self.l1_max_bytes)
                .max_value_bytes(self.max_body + (64 << 10))
                .default_options(route.options)
                .build()
                .await?;
            groups.insert(route.tag.clone(), cache);
        }
        Ok(ResponseCache {
            inner: Arc::new(Inner {
                routes: self.routes,
                default_route: self.default_route,
                groups,
                vary,
                bypass,
                statuses,
                max_body: self.max_body,
                pass_ttl: self.pass_ttl,
            }),
        })
    }
}

fn check_tag(route: &Route) -> Result<()> {
    let ok = !route.tag.is_empty()
        && route
            .tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "route tag `{}`: use letters, digits, `-`, `_` or `.`",
            route.tag
        )))
    }
}

/// Passes `request` to the handler; marks the answer if `status` is given.
async fn pass<S, B, ResB>(
    mut inner: S,
    request: Request<B>,
    status: Option<CacheStatus>,
) -> std::result::Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
    let response = inner.call(request).await?.map(body::boxed);
    Ok(match status {
        Some(status) => marked(response, status),
        None => response,
    })
}

/// A stored response as an answer, with `Age` and `X-Cache`.
fn respond(stored: &StoredResponse, status: CacheStatus, head: bool) -> Response<ResponseBody> {
    let Some(code) = stored.status() else {
        return failure(
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
    marked(response, status)
}

fn marked(mut response: Response<ResponseBody>, status: CacheStatus) -> Response<ResponseBody> {
    response
        .headers_mut()
        .insert(X_CACHE, HeaderValue::from_static(status.as_str()));
    response
}

fn failure(status: StatusCode, error: &dyn fmt::Display) -> Response<ResponseBody> {
    tracing::debug!(%error, %status, "answering with an error status");
    let mut response = Response::new(body::empty());
    *response.status_mut() = status;
    marked(response, CacheStatus::Miss)
}

/// HIT if fresh, STALE past its freshness.
fn label(stored: &StoredResponse) -> CacheStatus {
    if stored.is_stale(SystemTime::now()) {
        CacheStatus::Stale
    } else {
        CacheStatus::Hit
    }
}

fn is_head<B>(request: &Request<B>) -> bool {
    request.method() == Method::HEAD
}

fn has_directives(headers: &HeaderMap) -> bool {
    headers.contains_key(header::CACHE_CONTROL) || headers.contains_key(header::PRAGMA)
}

/// The request's method, URI and headers, for `http-cache-semantics`.
fn probe<B>(request: &Request<B>) -> Request<()> {
    let mut probe = Request::new(());
    *probe.method_mut() = request.method().clone();
    *probe.uri_mut() = request.uri().clone();
    *probe.headers_mut() = request.headers().clone();
    probe
}

fn shared() -> CacheOptions {
    CacheOptions {
        shared: true,
        ..CacheOptions::default()
    }
}

/// A response that any shared cache may keep for `fresh`, stored at `at`: the request's own
/// directives are then all that decides (`http-cache-semantics` reads them).
fn reference(fresh: Duration) -> http::response::Parts {
    let value = format!("public, max-age={}", fresh.as_secs());
    let mut response = Response::new(());
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(header::CACHE_CONTROL, value);
    }
    response.into_parts().0
}

/// Whether the request allows storing its response (`Cache-Control: no-store` does not).
fn request_allows_storing<B>(request: &Request<B>) -> bool {
    let policy = CachePolicy::new_options(
        &probe(request),
        &reference(Duration::from_secs(60)),
        SystemTime::now(),
        shared(),
    );
    policy.is_storable()
}

/// Whether `stored` meets the request's own limits (`no-cache`, `max-age`, `min-fresh`).
fn satisfies<B>(stored: &StoredResponse, request: &Request<B>) -> bool {
    let request = probe(request);
    let policy = CachePolicy::new_options(
        &request,
        &reference(stored.fresh_for()),
        stored.stored_at(),
        shared(),
    );
    matches!(
        policy.before_request(&request, SystemTime::now()),
        BeforeRequest::Fresh(_)
    )
}

fn split_param(param: &str) -> (&str, &str) {
    param.split_once('=').unwrap_or((param, ""))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner(routes: Vec<(&str, Route)>, vary: &[&str]) -> Inner {
        Inner {
            routes: routes.into_iter().map(|(p, r)| (p.to_owned(), r)).collect(),
            default_route: Route::tagged(DEFAULT_TAG),
            groups: BTreeMap::new(),
            vary: vary
                .iter()
                .map(|v| HeaderName::from_bytes(v.as_bytes()).unwrap())
                .collect(),
            bypass: Vec::new(),
            statuses: vec![StatusCode::OK],
            max_body: 1024,
            pass_ttl: DEFAULT_PASS_TTL,
        }
    }

    fn get(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn keys_sort_query_parameters_and_include_vary_headers() {
        let c = inner(vec![], &["accept-language"]);
        let a = c.key(&get("/p?b=2&a=1&a=0", &[("accept-language", "en")]));
        let b = c.key(&get("/p?a=0&a=1&b=2", &[("accept-language", "en")]));
        assert_eq!(a, b);
        assert_ne!(
            a,
            c.key(&get("/p?a=0&a=1&b=2", &[("accept-language", "fr")]))
        );
        assert_ne!(a, c.key(&get("/p?a=0&a=1&b=2", &[])));
        assert_ne!(
            c.key(&get("/p", &[("accept-language", "")])),
            c.key(&get("/p", &[]))
        );
        assert_ne!(c.key(&get("/p?a=1", &[])), c.key(&get("/p?a=2", &[])));
        let mut head = get("/p", &[]);
        *head.method_mut() = Method::HEAD;
        assert_ne!(c.key(&head), c.key(&get("/p", &[])));
    }

    #[test]
    fn routes_match_whole_segments_longest_first() {
        let c = inner(
            vec![
                ("/products", Route::tagged("products")),
                ("/products/special", Route::tagged("special")),
                ("/static/", Route::tagged("static")),
            ],
            &[],
        );
        assert_eq!(c.route_for("/products").tag(), "products");
        assert_eq!(c.route_for("/products/7").tag(), "products");
        assert_eq!(c.route_for("/productsX").tag(), DEFAULT_TAG);
        assert_eq!(c.route_for("/products/special/1").tag(), "special");
        assert_eq!(c.route_for("/static/app.js").tag(), "static");
        assert_eq!(c.route_for("/").tag(), DEFAULT_TAG);
    }

    fn response(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
        let mut b = Response::builder().status(status);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn storability_follows_cache_control_and_the_route() {
        let c = inner(vec![], &["accept-language"]);
        let ttl42 = Duration::from_secs(42);
        let req = get("/p", &[]);
        let ttl = |headers: &[(&str, &str)]| c.storable_for(&req, &response(200, headers), ttl42);
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
        assert_eq!(c.storable_for(&req, &response(404, &[]), ttl42), None);
        assert_eq!(c.storable_for(&req, &response(500, &[]), ttl42), None);
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
        assert!(satisfies(&fresh, &get("/", &[])));
        assert!(satisfies(
            &fresh,
            &get("/", &[("cache-control", "max-age=30")])
        ));
        assert!(!satisfies(
            &fresh,
            &get("/", &[("cache-control", "no-cache")])
        ));
        assert!(!satisfies(&fresh, &get("/", &[("pragma", "no-cache")])));
        assert!(!satisfies(
            &fresh,
            &get("/", &[("cache-control", "min-fresh=120")])
        ));
        let old = StoredResponse::new(&parts, Bytes::new(), Duration::ZERO);
        assert!(!satisfies(
            &old,
            &get("/", &[("cache-control", "max-age=60")])
        ));
    }
}
