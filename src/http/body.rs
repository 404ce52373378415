//! A request's body: its deadline ([`BodyTimedOut`]), and [`Posted`], the whole body read within
//! the limits or a [`BodyError`] that answers for itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};

/// A request body that must arrive whole before its deadline.
pub(super) struct Deadline {
    pub(super) inner: hyper::body::Incoming,
    pub(super) sleep: Pin<Box<tokio::time::Sleep>>,
}

/// The body did not arrive within the body timeout.
#[derive(Debug)]
pub struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive within the body timeout")
    }
}

impl std::error::Error for BodyTimedOut {}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request's body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Larger than the router's `DefaultBodyLimit`.
    TooLarge,
    /// Not whole within the body timeout.
    TimedOut,
    Unreadable(String),
}

impl BodyError {
    /// What a person reads about it.
    pub fn message(&self) -> String {
        match self {
            BodyError::TooLarge => "the request body is larger than this server accepts".to_owned(),
            BodyError::TimedOut => "the request body did not arrive within the body timeout".to_owned(),
            BodyError::Unreadable(why) => format!("could not read the request body: {why}"),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::TimedOut => StatusCode::REQUEST_TIMEOUT,
            BodyError::Unreadable(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// `response` with `Connection: close` when the rest of the body may still be on its way.
    pub fn closing(&self, mut response: Response) -> Response {
        if !matches!(self, BodyError::Unreadable(_)) {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        let response =
            (self.status(), [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], self.message()).into_response();
        self.closing(response)
    }
}

/// A request's whole body, read within the limits (the router's `DefaultBodyLimit`, the body
/// timeout), or a [`BodyError`].
pub struct Posted(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Posted {
    type Rejection = BodyError;

    async fn from_request(request: Request, state: &S) -> Result<Posted, BodyError> {
        match Bytes::from_request(request, state).await {
            Ok(bytes) => Ok(Posted(bytes)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(BodyError::TooLarge),
            Err(rejection) => {
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&rejection);
                while let Some(e) = source {
                    if e.is::<BodyTimedOut>() {
                        return Err(BodyError::TimedOut);
                    }
                    source = e.source();
                }
                Err(BodyError::Unreadable(rejection.body_text()))
            }
        }
    }
}
