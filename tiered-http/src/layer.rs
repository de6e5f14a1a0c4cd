//! The tower [`Layer`] that puts a [`ResponseCache`] in front of a handler.

use tower_layer::Layer;

use crate::ResponseCache;
use crate::service::ResponseCacheService;

/// Wraps services in a [`ResponseCacheService`]; from [`ResponseCache::layer`].
#[derive(Debug, Clone)]
pub struct ResponseCacheLayer {
    cache: ResponseCache,
}

impl ResponseCacheLayer {
    /// A layer caching into `cache`.
    pub fn new(cache: ResponseCache) -> Self {
        ResponseCacheLayer { cache }
    }
}

impl<S> Layer<S> for ResponseCacheLayer {
    type Service = ResponseCacheService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResponseCacheService {
            inner,
            cache: self.cache.clone(),
        }
    }
}
