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
//!
//! `limits.rs`: the limits; `connection.rs`: one connection and its requests; `body.rs`: a
//! request body's deadline and reading it whole.

mod body;
mod connection;
mod limits;

pub use body::{BodyError, BodyTimedOut, Posted};
pub use limits::{Limits, connections_within, raise_open_file_limit};

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use connection::{Conn, Server, connection};
use limits::REFUSING;

/// How long a connection refused at the cap has to send its request before the 503.
const REFUSE_READ: Duration = Duration::from_millis(500);
/// How long the accept loop waits for an evicted connection's slot.
const EVICT_WAIT: Duration = Duration::from_millis(200);
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
