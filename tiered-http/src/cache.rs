//! [`ResponseCache`]: the handle every layer and service shares (the routes, the settings and
//! one cache per tag), and invalidation.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::{Request, StatusCode};
use tiered::TieredCache;

use crate::error::{Error, Result};
use crate::key::cache_key;
use crate::route::Routes;
use crate::stored::CachedResponse;

/// A response cache for tower services; build it with [`ResponseCache::builder`], wrap services
/// with [`ResponseCache::layer`], and invalidate from anywhere with the same handle (or from
/// another node: invalidations reach every node through the bus).
///
/// Cloning is cheap and shares the cache.
#[derive(Clone)]
pub struct ResponseCache {
    pub(crate) inner: Arc<Inner>,
}

/// What every clone of the handle shares: the settings that serving reads, and one cache per tag.
pub(crate) struct Inner {
    /// Which route a path follows.
    pub(crate) routes: Routes,
    /// The cache of each tag.
    pub(crate) groups: BTreeMap<String, TieredCache<CachedResponse>>,
    /// The request headers keys vary on; a response varying on any other is not stored.
    pub(crate) vary: Vec<HeaderName>,
    /// Requests carrying any of these headers skip the cache.
    pub(crate) bypass: Vec<HeaderName>,
    /// The statuses that may be stored.
    pub(crate) statuses: Vec<StatusCode>,
    /// Bodies bigger than this are passed through.
    pub(crate) max_body: usize,
    /// How long a pass marker lasts.
    pub(crate) pass_ttl: Duration,
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

impl ResponseCache {
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
        let route = self.inner.routes.route_for(request.uri().path());
        let key = cache_key(request, &self.inner.vary);
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
}
