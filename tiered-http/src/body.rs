//! Response bodies: the boxed body every answer carries, and reading a handler's body up to
//! the size limit without losing it when it is bigger.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tiered::BoxError;

/// The body of every response the layer returns: the handler's own body when it passes
/// through, the stored bytes when served from the cache.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body of `bytes`.
pub(crate) fn full(bytes: Bytes) -> ResponseBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body (HEAD answers, errors without text).
pub(crate) fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes a handler's body.
pub(crate) fn boxed<B>(body: B) -> ResponseBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A handler's body after reading at most the limit.
pub(crate) enum Collected {
    /// The whole body, within the limit and without trailers: cacheable.
    Whole(Bytes),
    /// Too big or with trailers: what was read, followed by the rest, for the caller alone.
    Streaming(ResponseBody),
}

/// Reads `body` until its end or until more than `limit` bytes came (or trailers).
///
/// # Errors
/// The body's own error.
pub(crate) async fn collect<B>(body: B, limit: usize) -> Result<Collected, BoxError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    let mut frames = VecDeque::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        let over = match frame.data_ref() {
            Some(data) => {
                len = len.saturating_add(data.len());
                len > limit
            }
            None => true, // trailers: not kept by the cache
        };
        frames.push_back(frame);
        if over {
            return Ok(Collected::Streaming(
                Prefixed {
                    prefix: frames,
                    rest: Some(body),
                }
                .boxed_unsync(),
            ));
        }
    }
    let mut whole = BytesMut::with_capacity(len);
    for frame in frames {
        if let Ok(data) = frame.into_data() {
            whole.extend_from_slice(&data);
        }
    }
    Ok(Collected::Whole(whole.freeze()))
}

/// Frames already read, then the rest of the body.
struct Prefixed<B> {
    prefix: VecDeque<Frame<Bytes>>,
    rest: Option<Pin<Box<B>>>,
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(frame) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match rest.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                this.rest = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .prefix
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let rest = self
            .rest
            .as_ref()
            .map(|r| r.size_hint())
            .unwrap_or_default();
        let mut hint = SizeHint::new();
        hint.set_lower(read.saturating_add(rest.lower()));
        if let Some(upper) = rest.upper() {
            hint.set_upper(read.saturating_add(upper));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body sent in chunks.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunks(parts: &[&'static [u8]]) -> Chunks {
        Chunks(parts.iter().map(|p| Bytes::from_static(p)).collect())
    }

    #[tokio::test]
    async fn small_bodies_are_collected_whole() {
        match collect(chunks(&[b"ab", b"cd"]), 4).await.unwrap() {
            Collected::Whole(b) => assert_eq!(&b[..], b"abcd"),
            Collected::Streaming(_) => panic!("within the limit"),
        }
    }

    #[tokio::test]
    async fn big_bodies_stream_on_in_full() {
        match collect(chunks(&[b"ab", b"cd", b"ef", b"gh"]), 3)
            .await
            .unwrap()
        {
            Collected::Whole(_) => panic!("over the limit"),
            Collected::Streaming(body) => {
                let all = body.collect().await.unwrap().to_bytes();
                assert_eq!(&all[..], b"abcdefgh");
            }
        }
    }
}
