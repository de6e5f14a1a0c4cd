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
use crate::policy::{has_directives, probe, request_allows_storing, satisfies, storable_for};
use crate::response::{CacheStatus, failure, is_head, label, marked, respond};
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
            return pass(inner, request, None).await;
        }
        let route = this.routes.route_for(request.uri().path());
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
        let key = cache_key(&request, &this.vary);
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
        let Some(fresh) = storable_for(
            &probe,
            &parts,
            &self.inner.statuses,
            &self.inner.vary,
            route.options.ttl(),
        ) else {
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
}

/// Passes `request` to the handler; marks the answer if `status` is given.
pub(crate) async fn pass<S, B, ResB>(
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
