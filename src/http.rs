//! Serving a router over HTTP/1.1 with every wait bounded: `callrecon serve` and `schedule
//! --metrics-listen` both go through [`serve`].
//!
//! axum's own `serve` has no timeouts, so a client that stops sending holds its socket (and a
//! file descriptor) for as long as it likes. Here every connection is a hyper connection of our
//! own accept loop:
//! - the request head must arrive within the header timeout (hyper's `header_read_timeout`,
//!   whose clock also runs while a keep-alive connection waits for its next request);
//! - a request's body must arrive within the body timeout of its head (a deadline on the body:
//!   reading it fails with [`BodyError::TimedOut`], answered 408);
//! - a connection with no request in flight and no byte read or written for the idle timeout is
//!   closed, and so is one whose client stops reading its response for the body timeout;
//! - at most `max_connections` are open; past it the connection idle the longest (keep-alive, or
//!   still sending its head a second after it opened) is closed to make room, and when there is
//!   none (every connection has a request in flight or has just opened) the new one is answered
//!   503 and closed (never an `accept` error);
//! - on shutdown the listener closes, connections without a request in flight are closed at
//!   once, and the requests in flight get the shutdown timeout to finish.
//!
//! Every response carries `X-Content-Type-Options: nosniff`, and a handler that panics is
//! answered 500 (logged) rather than dropping the connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt as _;
use http_body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt as _;

/// The limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
}

impl Limits {
    /// A metrics endpoint's: scraped by a handful of clients.
    pub const METRICS: Limits = Limits {
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(90),
        max_connections: 64,
        shutdown_timeout: Duration::from_secs(5),
    };

    /// Each timeout at most a day: a larger one (which `humantime` reads happily) would overflow
    /// the timers' instants.
    fn bounded(self) -> Limits {
        let day = Duration::from_secs(86_400);
        Limits {
            header_timeout: self.header_timeout.min(day),
            body_timeout: self.body_timeout.min(day),
            idle_timeout: self.idle_timeout.min(day),
            max_connections: self.max_connections.max(1),
            shutdown_timeout: self.shutdown_timeout.min(day),
        }
    }
}

/// Connections answered 503 at once (past `max_connections`) while the next ones are dropped
/// unanswered: answering takes a moment (the request is read first, so closing does not reset
/// it), and those moments must not add up to unbounded file descriptors.
const REFUSING: usize = 64;
/// How long a connection refused at the cap has to send its request before the 503.
const REFUSE_READ: Duration = Duration::from_millis(500);
/// How long the accept loop waits for an evicted connection's slot.
const EVICT_WAIT: Duration = Duration::from_millis(200);
/// A connection is never evicted this soon after it was accepted: its request may be on its way
/// (closing it unanswered would fail a client that did nothing wrong).
const EVICT_AGE: Duration = Duration::from_secs(1);

/// Raises the soft limit on open files to the hard limit (systemd's default soft limit, 1024,
/// would otherwise cap the connections), and returns the limit now in force.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some(limit.rlim_cur)
}

/// `max_connections` as the open-file limit allows: the connections, those being refused, and
/// `reserve` more (database connections, files, the listener) must fit under it.
pub fn connections_within(max_connections: usize, open_files: Option<u64>, reserve: usize) -> usize {
    let Some(files) = open_files else { return max_connections };
    let room = usize::try_from(files).unwrap_or(usize::MAX).saturating_sub(REFUSING + reserve).max(1);
    if room < max_connections {
        tracing::warn!(
            max_connections,
            open_files = files,
            allowed = room,
            "--max-connections is more than the open-file limit allows; raise the hard limit (LimitNOFILE=) to serve that many"
        );
    }
    max_connections.min(room)
}

/// One open connection, as the accept loop and its own task see it.
struct Conn {
    /// Milliseconds since the server started, when it was accepted.
    opened: u64,
    /// Requests whose response has not been written out yet.
    in_flight: AtomicUsize,
    /// Responses being written (their handler has answered).
    writing: AtomicUsize,
    /// Milliseconds since the server started, at the last byte read or written.
    last_active: AtomicU64,
    /// Told to close (to make room for a new connection).
    evict: Notify,
}

impl Conn {
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }
}

struct Server {
    router: Router,
    limits: Limits,
    started: Instant,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Server {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Tells the connection idle the longest to close (one without a request in flight, open for
    /// a second at least: idle, or slow to send its request); false when there is none.
    fn evict_one(&self) -> bool {
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

/// Serves `router` on `listener` until `shutdown` completes, then closes the listener and the
/// idle connections, gives the requests in flight `limits.shutdown_timeout`, and returns once
/// every connection is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let limits = limits.bounded();
    let server = Arc::new(Server { router, limits, started: Instant::now(), conns: Mutex::default() });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let (stop, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    let mut accept_errors = AcceptErrors::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_errors.log(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let Some(slot) = slot(&server, &slots).await else {
            if let Ok(permit) = refusing.clone().try_acquire_owned() {
                tasks.spawn(async move {
                    refuse(stream).await;
                    drop(permit);
                });
            }
            continue;
        };
        next_id += 1;
        let conn = Arc::new(Conn {
            opened: server.now_ms(),
            in_flight: AtomicUsize::new(0),
            writing: AtomicUsize::new(0),
            last_active: AtomicU64::new(server.now_ms()),
            evict: Notify::new(),
        });
        server.conns.lock().expect("not poisoned").insert(next_id, conn.clone());
        let (server, stopping, id) = (server.clone(), stopping.clone(), next_id);
        tasks.spawn(async move {
            connection(&server, stream, peer, conn, stopping).await;
            server.conns.lock().expect("not poisoned").remove(&id);
            drop(slot);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drain(tasks, limits.shutdown_timeout).await;
    Ok(())
}

/// A slot for a new connection: a free one, or the one an evicted connection gives up.
async fn slot(server: &Server, slots: &Arc<Semaphore>) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match slots.clone().try_acquire_owned() {
        Ok(slot) => Some(slot),
        Err(_) if server.evict_one() => {
            tokio::time::timeout(EVICT_WAIT, slots.clone().acquire_owned()).await.ok().and_then(Result::ok)
        }
        Err(_) => None,
    }
}

/// Waits for the connections to close (told to: idle ones at once, busy ones after their
/// request) for `timeout`, then closes the rest.
async fn drain(mut tasks: JoinSet<()>, timeout: Duration) {
    let open = tasks.len();
    let drained = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(timeout, drained).await.is_err() {
        tracing::warn!(
            connections = tasks.len(),
            of = open,
            ?timeout,
            "requests still in flight at the shutdown timeout: closing their connections"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Logs failed accepts (out of file descriptors, say) at most once a second.
#[derive(Default)]
struct AcceptErrors {
    last: Option<Instant>,
    since: u64,
}

impl AcceptErrors {
    fn log(&mut self, e: &std::io::Error) {
        self.since += 1;
        if self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!(error = %e, failed = self.since, "accepting a connection failed");
            self.last = Some(Instant::now());
            self.since = 0;
        }
    }
}

/// The 503 of a connection past the cap: its request read (briefly) so that closing does not
/// reset it, then a short answer, then the close.
async fn refuse(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSE_READ, tokio::io::AsyncReadExt::read(&mut stream, &mut buf)).await;
    // An `Error` and a `Health` body of the OpenAPI document at once.
    let body = r#"{"error":"unavailable","status":"unavailable","message":"too many connections; retry shortly"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         x-content-type-options: nosniff\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_READ, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// One connection, until the client closes it, it times out or is evicted, or the server stops.
async fn connection(
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

/// A request body that must arrive whole before its deadline.
struct Deadline {
    inner: hyper::body::Incoming,
    sleep: Pin<Box<tokio::time::Sleep>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connections_fit_under_the_open_file_limit() {
        assert_eq!(connections_within(1000, None, 100), 1000);
        assert_eq!(connections_within(1000, Some(1_000_000), 100), 1000);
        assert_eq!(connections_within(1000, Some(1024), 100), 1024 - REFUSING - 100);
        assert_eq!(connections_within(1000, Some(10), 100), 1);
    }
}
