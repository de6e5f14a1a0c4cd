//! Answering one request: passed through, `BYPASS`, `HIT`, `STALE`, or a `MISS` that loads
//! through the handler; and a reload for a request whose own limits the cached response does
//! not meet.

use std::sync::Arc;

use bytes::Bytes;
use http::header;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use tiered::{BoxError, TieredCache};
use tower_service::Service;

use crate::body::{self, Collected, ResponseBody};
use crate::cache::ResponseCache;
use crate::key::cache_key;
use crate::load::Call;
use crate::policy::{
    has_cache_directives, meets_request_limits, request_allows_storing, storable_for, without_body,
};
use crate::response::{
    CacheStatus, answer_from_stored, error_answer, hit_or_stale, is_head, with_x_cache,
};
use crate::route::Route;
use crate::stored::{CachedResponse, StoredResponse};

impl ResponseCache {
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
            return pass_through(inner, request, None).await;
        }
        let route = this.routes.route_for(request.uri().path());
        if !route.cached {
            return pass_through(inner, request, None).await;
        }
        if this
            .bypass
            .iter()
            .any(|h| request.headers().contains_key(h))
        {
            return pass_through(inner, request, Some(CacheStatus::Bypass)).await;
        }
        let Some(group) = this.groups.get(&route.tag) else {
            return pass_through(inner, request, None).await;
        };
        let key = cache_key(&request, &this.vary);
        if has_cache_directives(request.headers()) {
            if !request_allows_storing(&request) {
                return pass_through(inner, request, Some(CacheStatus::Bypass)).await;
            }
            // The request sets its own limits (`no-cache`, `max-age`, `min-fresh`): check what
            // is cached against them, and go to the handler if it does not satisfy them.
            if let Ok(Some(found)) = group.get_with(&key, route.options).await {
                match &found.0 {
                    Some(stored) if meets_request_limits(stored, &request) => {
                        return Ok(answer_from_stored(
                            stored,
                            hit_or_stale(stored),
                            is_head(&request),
                        ));
                    }
                    Some(_) => return self.reload(inner, request, group, &key, route).await,
                    None => return pass_through(inner, request, Some(CacheStatus::Miss)).await,
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
                    hit_or_stale(&stored)
                };
                Ok(answer_from_stored(&stored, status, head))
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
        let bodiless = without_body(&request);
        let head = is_head(&request);
        let response = call_when_ready(&mut inner, request).await?;
        let (parts, body) = response.into_parts();
        let Some(fresh) = storable_for(
            &bodiless,
            &parts,
            &self.inner.statuses,
            &self.inner.vary,
            route.options.ttl(),
        ) else {
            return Ok(with_x_cache(
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
                Ok(answer_from_stored(&stored, CacheStatus::Miss, head))
            }
            Ok(Collected::Streaming(body)) => Ok(with_x_cache(
                Response::from_parts(parts, body),
                CacheStatus::Miss,
            )),
            Err(error) => Ok(error_answer(StatusCode::BAD_GATEWAY, &error)),
        }
    }
}

/// Passes `request` through to the handler; sets `X-Cache` on the answer if `status` is given.
pub(crate) async fn pass_through<S, B, ResB>(
    mut inner: S,
    request: Request<B>,
    status: Option<CacheStatus>,
) -> std::result::Result<Response<ResponseBody>, S::Error>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let response = call_when_ready(&mut inner, request).await?.map(body::boxed);
    Ok(match status {
        Some(status) => with_x_cache(response, status),
        None => response,
    })
}

/// Calls `service` with `request` once it is ready.
pub(crate) async fn call_when_ready<S, R>(
    service: &mut S,
    request: R,
) -> std::result::Result<S::Response, S::Error>
where
    S: Service<R>,
{
    std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
    service.call(request).await
}
