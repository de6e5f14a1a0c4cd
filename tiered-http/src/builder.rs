//! [`ResponseCacheBuilder`]: the settings and their defaults, their checks, and connecting one
//! cache per tag.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http::header::HeaderName;
use tiered::Connection;
use tiered::{Bus, BusConfig};
use tiered::{Error as CacheError, TieredCache};

use crate::cache::{Inner, ResponseCache};
use crate::error::{Error, Result};
use crate::route::{DEFAULT_TAG, Route, Routes};

/// The default limit on a cached body: see [`ResponseCacheBuilder::max_body_bytes`].
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// How long a "pass" marker lasts by default: see [`ResponseCacheBuilder::pass_time_to_live`].
pub const DEFAULT_PASS_TTL: Duration = Duration::from_secs(10);

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
    /// under [`DEFAULT_TAG`] for [`DEFAULT_ROUTE_TTL`](crate::DEFAULT_ROUTE_TTL).
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
}

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
                routes: Routes {
                    by_prefix: self.routes,
                    default: self.default_route,
                },
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
