//! The loader: runs the handler for the request that leads a load and decides what to cache;
//! and [`Call`], through which each request of the flight gets its answer (the cached
//! response, its own non-cacheable one, or an error status).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use tiered::{BoxError, Error as CacheError, Loaded};
use tokio::sync::Notify;
use tower_service::Service;

use crate::body::{self, Collected, ResponseBody};
use crate::cache::ResponseCache;
use crate::policy::{storable_for, without_body};
use crate::response::{CacheStatus, answer_from_stored, error_answer, is_head, with_x_cache};
use crate::serve::{call_when_ready, pass_through};
use crate::stored::{CachedResponse, StoredResponse};

impl ResponseCache {
    /// The loader: runs the handler with the leading request, and returns what to cache.
    pub(crate) async fn load<S, ReqB, ResB>(
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
        let request = lock(&call.request).take().ok_or(Gone)?;
        let bodiless = without_body(&request);
        let response = call_when_ready(&mut inner, request)
            .await
            .map_err(Into::into)?;
        let (parts, body) = response.into_parts();
        if parts.status.is_server_error() {
            let status = parts.status;
            call.keep(Response::from_parts(parts, body::boxed(body)));
            return Err(Box::new(ServerError(status)));
        }
        let Some(fresh) = storable_for(
            &bodiless,
            &parts,
            &self.inner.statuses,
            &self.inner.vary,
            default_ttl,
        ) else {
            call.keep(Response::from_parts(parts, body::boxed(body)));
            return Ok(self.pass_marker());
        };
        match body::collect(body, self.inner.max_body).await? {
            Collected::Whole(bytes) => {
                let stored = Arc::new(StoredResponse::new(&parts, bytes, fresh));
                *lock(&call.produced) = Some(Arc::clone(&stored));
                Ok(Loaded::new(CachedResponse(Some(stored))).time_to_live(fresh))
            }
            Collected::Streaming(body) => {
                call.keep(Response::from_parts(parts, body));
                Ok(self.pass_marker())
            }
        }
    }

    /// What a load that found the resource not cacheable stores: the pass marker, for
    /// [`ResponseCacheBuilder::pass_time_to_live`](crate::ResponseCacheBuilder::pass_time_to_live).
    fn pass_marker(&self) -> Loaded<CachedResponse> {
        Loaded::new(CachedResponse::pass()).time_to_live(self.inner.pass_ttl)
    }
}

/// One request on its way through the cache: its request (until a loader takes it), the
/// response its loader produced, and a non-cacheable answer kept for it alone.
pub(crate) struct Call<B> {
    head: bool,
    request: Mutex<Option<Request<B>>>,
    produced: Mutex<Option<Arc<StoredResponse>>>,
    kept: Mutex<Option<Response<ResponseBody>>>,
    finished: Notify,
}

impl<B> Call<B> {
    pub(crate) fn new(request: Request<B>) -> Self {
        Call {
            head: is_head(&request),
            request: Mutex::new(Some(request)),
            produced: Mutex::new(None),
            kept: Mutex::new(None),
            finished: Notify::new(),
        }
    }

    /// Whether `stored` is what this request's own loader produced.
    pub(crate) fn produced(&self, stored: &Arc<StoredResponse>) -> bool {
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
                return Some(answer_from_stored(stored, CacheStatus::Miss, self.head));
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
    pub(crate) async fn answer_for_pass<S, ResB>(
        &self,
        fallback: S,
    ) -> std::result::Result<Response<ResponseBody>, S::Error>
    where
        S: Service<Request<B>, Response = Response<ResB>>,
        ResB: Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        if let Some(response) = self.own_answer(true).await {
            return Ok(with_x_cache(response, CacheStatus::Miss));
        }
        let request = lock(&self.request).take();
        match request {
            Some(request) => pass_through(fallback, request, Some(CacheStatus::Miss)).await,
            None => Ok(error_answer(
                StatusCode::BAD_GATEWAY,
                &"the load ended without an answer",
            )),
        }
    }

    /// The load failed: this request's own answer (the handler's 5xx) if it led the load, else
    /// an error status. Waiters do not each retry a failing handler.
    pub(crate) async fn answer_for_error(&self, error: &CacheError) -> Response<ResponseBody> {
        // Past the hard timeout, answer now; otherwise the handler's own answer is coming.
        let wait = !matches!(error, CacheError::WaitTimeout { .. });
        if let Some(response) = self.own_answer(wait).await {
            return with_x_cache(response, CacheStatus::Miss);
        }
        let status = match error {
            CacheError::WaitTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        error_answer(status, error)
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
