//! One connection: hyper's HTTP/1.1 over the socket, closed when idle, evicted or told to stop;
//! each request answered by the router with its body's deadline, `nosniff`, and a 500 for a
//! panic, and counted in flight until its response is written.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use futures_util::FutureExt as _;
use http_body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tower::ServiceExt as _;

use super::body::Deadline;
use super::limits::Limits;

/// A connection is never evicted this soon after it was accepted: its request may be on its way
/// (closing it unanswered would fail a client that did nothing wrong).
const EVICT_AGE: Duration = Duration::from_secs(1);

/// One open connection, as the accept loop and its own task see it.
pub(super) struct Conn {
    /// Milliseconds since the server started, when it was accepted.
    pub(super) opened: u64,
    /// Requests whose response has not been written out yet.
    pub(super) in_flight: AtomicUsize,
    /// Responses being written (their handler has answered).
    pub(super) writing: AtomicUsize,
    /// Milliseconds since the server started, at the last byte read or written.
    pub(super) last_active: AtomicU64,
    /// Told to close (to make room for a new connection).
    pub(super) evict: Notify,
}

impl Conn {
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }
}

pub(super) struct Server {
    pub(super) router: Router,
    pub(super) limits: Limits,
    pub(super) started: Instant,
    pub(super) conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Server {
    pub(super) fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Tells the connection idle the longest to close (one without a request in flight, open for
    /// a second at least: idle, or slow to send its request); false when there is none.
    pub(super) fn evict_one(&self) -> bool {
        let old_enough = self.now_ms().saturating_sub(EVICT_AGE.as_millis() as u64);
        let conns = self.conns.lock().expect("not poisoned");
        let victim = conns
            .values()
            .filter(|c| c.idle() && c.opened <= old_enough)
            .min_by_key(|c| c.last_active.load(Ordering::Relaxed));
        match victim {
            Some(c) => {
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// One connection, until the client closes it, it times out or is evicted, or the server stops.
pub(super) async fn connection(
    server: &Arc<Server>,
    stream: TcpStream,
    peer: SocketAddr,
    conn: Arc<Conn>,
    mut stopping: watch::Receiver<bool>,
) {
    let limits = server.limits;
    let io = TokioIo::new(Activity { inner: stream, conn: conn.clone(), server: server.clone() });
    let service = {
        let (server, conn) = (server.clone(), conn.clone());
        hyper::service::service_fn(move |request| handle(server.clone(), conn.clone(), peer, request))
    };
    let http = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(io, service);
    tokio::pin!(http);
    let mut draining = false;
    loop {
        if *stopping.borrow() && !draining {
            if conn.idle() {
                return;
            }
            http.as_mut().graceful_shutdown();
            draining = true;
        }
        let quiet_since = Duration::from_millis(conn.last_active.load(Ordering::Relaxed));
        let wait = limits.idle_timeout.min(limits.body_timeout);
        let check_at = server.started.checked_add(quiet_since + wait).unwrap_or_else(far_future);
        // Past it with a request still running: look again a while later, not at once.
        let check_at = check_at.max(Instant::now() + wait.min(Duration::from_secs(1)));
        tokio::select! {
            done = http.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "connection closed");
                }
                return;
            }
            () = conn.evict.notified() => {
                if conn.idle() {
                    tracing::debug!(%peer, "idle connection closed to make room for a new one");
                    return;
                }
            }
            changed = stopping.changed(), if !draining => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(check_at) => {
                let quiet = Duration::from_millis(server.now_ms().saturating_sub(conn.last_active.load(Ordering::Relaxed)));
                if conn.idle() && quiet >= limits.idle_timeout {
                    tracing::debug!(%peer, "idle connection closed");
                    return;
                }
                if conn.writing.load(Ordering::Acquire) > 0 && quiet >= limits.body_timeout {
                    tracing::info!(%peer, "connection closed: the client stopped reading its response");
                    return;
                }
            }
        }
    }
}

/// An instant no timer reaches (a timeout of years).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// A request: its body given a deadline, the peer's address as [`ConnectInfo`], the router's
/// answer (500 should it panic) with `nosniff`, its body counted in flight until written.
async fn handle(
    server: Arc<Server>,
    conn: Arc<Conn>,
    peer: SocketAddr,
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Tracked>, Infallible> {
    let guard = InFlight::new(conn);
    let timeout = server.limits.body_timeout;
    let mut request = request.map(|b| Body::new(Deadline { inner: b, sleep: Box::pin(tokio::time::sleep(timeout)) }));
    request.extensions_mut().insert(ConnectInfo(peer));
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let answer = std::panic::AssertUnwindSafe(server.router.clone().oneshot(request)).catch_unwind().await;
    let mut response = match answer {
        Ok(Ok(response)) => response,
        Ok(Err(never)) => match never {},
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%method, path, panic = what, "a request's handler panicked; answered 500");
            (StatusCode::INTERNAL_SERVER_ERROR, "the request failed; see the server's log").into_response()
        }
    };
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    Ok(response.map(|body| Tracked { inner: body, _writing: Writing::new(&guard.0), _guard: guard }))
}

/// Counts a request in flight from its head until its response's body is dropped (written out,
/// or the connection closed).
struct InFlight(Arc<Conn>);

impl InFlight {
    fn new(conn: Arc<Conn>) -> InFlight {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a response being written, until its body is dropped.
struct Writing(Arc<Conn>);

impl Writing {
    fn new(conn: &Arc<Conn>) -> Writing {
        conn.writing.fetch_add(1, Ordering::AcqRel);
        Writing(conn.clone())
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.0.writing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body holding its request's [`InFlight`] and [`Writing`].
struct Tracked {
    inner: Body,
    _writing: Writing,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting when a byte last went either way.
struct Activity {
    inner: TcpStream,
    conn: Arc<Conn>,
    server: Arc<Server>,
}

impl Activity {
    fn touch(&self) {
        self.conn.last_active.store(self.server.now_ms(), Ordering::Relaxed);
    }
}

impl AsyncRead for Activity {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl AsyncWrite for Activity {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
