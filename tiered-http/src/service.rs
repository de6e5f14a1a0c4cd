//! The tower [`Service`] that answers requests through a [`ResponseCache`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tiered::BoxError;
use tower_service::Service;

use crate::ResponseCache;
use crate::body::ResponseBody;

/// A service answering GET and HEAD requests from the cache when it can; every other request
/// goes to the wrapped service untouched.
#[derive(Debug, Clone)]
pub struct ResponseCacheService<S> {
    pub(crate) inner: S,
    pub(crate) cache: ResponseCache,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for ResponseCacheService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // The ready service serves this request; a clone takes its place for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(self.cache.clone().serve(inner, request))
    }
}
