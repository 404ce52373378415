//! `serve` under attack (issue 43): clients that stop sending, floods of connections and of
//! wrong secrets, a stalled database, and shutdown with clients still connected. Raw sockets
//! where a client misbehaves, reqwest where it does not.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use callrecon::cli::ServeArgs;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// `serve` in-process on a free port with `args`; stopped when dropped.
struct Server {
    addr: SocketAddr,
    base: String,
    _stop: oneshot::Sender<()>,
}

impl Server {
    async fn start(pool: &PgPool, args: ServeArgs) -> Server {
        let listener = tokio::net::TcpListener::bind(args.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let pool = pool.clone();
        tokio::spawn(async move {
            callrecon::serve::serve(pool, &args, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap()
        });
        Server { addr, base: format!("http://{addr}"), _stop: stop }
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap()
}

/// A client whose connections come from `ip` (any of 127.0.0.0/8 on loopback).
fn http_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Waits (up to `limit`) for the server to close `stream`: how long that took, or `None`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {} // an answer (a 408, say): keep reading until the close
        }
    }
}

/// Sends `bytes` on a new connection and reads the whole answer (until the server closes).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn healthz(base: &str) -> (StatusCode, Value) {
    let resp = http().get(format!("{base}/healthz")).send().await.unwrap();
    (resp.status(), resp.json().await.unwrap())
}

async fn token(base: &str, http: &reqwest::Client, id: &str, secret: &str) -> reqwest::Response {
    http.post(format!("{base}/token"))
        .form(&[("grant_type", "client_credentials"), ("client_id", id), ("client_secret", secret)])
        .send()
        .await
        .unwrap()
}

fn event(n: usize) -> String {
    json!({"SessionId": "s", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"n": n}}).to_string()
}

async fn post(base: &str, token: &str, body: String) -> reqwest::Response {
    http().post(format!("{base}{}", callrecon::serve::EVENT_PATH)).bearer_auth(token).body(body).send().await.unwrap()
}

async fn poster_token(pool: &PgPool, base: &str) -> String {
    let user = callrecon::users::add(pool, "acme", &["AsyncMetaData".to_owned()]).await.unwrap();
    let body: Value = token(base, &http(), &user.client_id, &user.client_secret).await.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// Issue 43 finding 1: a request head that never ends, or one trickled a line at a time, held
/// its socket forever.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_request_head_that_never_ends_is_closed_at_the_header_timeout(pool: PgPool) {
    let header_timeout = Duration::from_secs(1);
    let server = Server::start(&pool, ServeArgs { header_timeout, ..ServeArgs::default() }).await;

    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut trickle = TcpStream::connect(server.addr).await.unwrap();
    trickle.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let trickling = tokio::spawn(async move {
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if trickle.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).await.is_err() {
                break;
            }
        }
        closed_within(&mut trickle, Duration::from_secs(5)).await
    });
    let took = closed_within(&mut partial, Duration::from_secs(10)).await.expect("closed");
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    assert!(trickling.await.unwrap().is_some(), "a head trickled a line at a time is closed too");
    // Meanwhile everyone else is served.
    assert_eq!(healthz(&server.base).await.0, StatusCode::OK);
}

/// A body that stops arriving is answered 408 at the body timeout, and its connection closed;
/// a keep-alive connection left idle is closed at the idle timeout.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_half_sent_body_gets_408_and_an_idle_connection_is_closed(pool: PgPool) {
    let args = ServeArgs {
        body_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ..ServeArgs::default()
    };
    let server = Server::start(&pool, args).await;
    let token = poster_token(&pool, &server.base).await;
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n{{\"Metadata\"",
        callrecon::serve::EVENT_PATH
    );
    half.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), half.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout") && answer.to_lowercase().contains("connection: close"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 0);

    // The same for the token endpoint's form.
    let answer = raw(server.addr, b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\ngrant_type=").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let took = closed_within(&mut idle, Duration::from_secs(10)).await.expect("closed");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "closed after {took:?}");
}

/// Finding 1 again: 300 sockets made `/healthz` time out for everyone (`accept error: Too many
/// open files`). With a cap, the connections idle the longest make room for a new client; when
/// every connection has a request in flight, a new one is answered 503 at once.
#[sqlx::test(migrator = "MIGRATOR")]
async fn idle_and_slow_connections_past_the_cap_do_not_stop_new_clients(pool: PgPool) {
    let cap = 8;
    let args = ServeArgs { max_connections: cap, request_timeout: Duration::from_secs(20), ..ServeArgs::default() };
    let server = Server::start(&pool, args).await;
    let token = poster_token(&pool, &server.base).await;

    // N+1 idle connections (kept alive after a request) and as many still sending their head.
    let mut held = Vec::new();
    for _ in 0..=cap {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf).await;
        held.push(s);
    }
    for _ in 0..=cap {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    // Held a while (a connection just opened may have its request on the way: never evicted).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = Instant::now();
    assert_eq!(healthz(&server.base).await.0, StatusCode::OK);
    assert_eq!(post(&server.base, &token, event(1)).await.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    drop(held);

    // Every connection busy: events waiting for a locked queue.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("lock table event_queue in access exclusive mode").execute(&mut *lock).await.unwrap();
    let busy: Vec<_> = (0..cap as usize)
        .map(|i| {
            let (base, token) = (server.base.clone(), token.clone());
            tokio::spawn(async move { post(&base, &token, event(100 + i)).await.status() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = raw(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("retry-after: 1") && refused.contains("too many connections"), "{refused}");
    lock.rollback().await.unwrap();
    for b in busy {
        assert_eq!(b.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1 + i64::from(cap));
}

/// The bar: 1,000 slow-client sockets (a head never finished) do not stop a new
/// client's `/healthz` or event POST.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_thousand_slow_clients_do_not_stop_healthz_or_an_event_post(pool: PgPool) {
    // Both ends of 1,000 sockets are in this process: room for them, as `serve` makes at start.
    callrecon::http::raise_open_file_limit();
    let server = Server::start(&pool, ServeArgs { max_connections: 256, ..ServeArgs::default() }).await;
    let token = poster_token(&pool, &server.base).await;
    let mut slow = Vec::new();
    for i in 0..1000 {
        let mut s = TcpStream::connect(server.addr).await.unwrap_or_else(|e| panic!("socket {i}: {e}"));
        let _ = s.write_all(b"POST /callevent/v1/outofband/event HTTP/1.1\r\nHost: x\r\n").await;
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = Instant::now();
    assert_eq!(healthz(&server.base).await.0, StatusCode::OK);
    assert_eq!(post(&server.base, &token, event(1)).await.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1);
}

/// Finding 10: with `event_queue` locked by another session, an event POST waited until the lock
/// was released (24 s, bounded only by the 10-minute lock timeout) and `/healthz` said ok. Now
/// it gets 503 with `Retry-After` at the request timeout, nothing is stored later, and `/healthz`
/// says the database is degraded.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_stalled_queue_answers_503_at_the_request_timeout_and_stores_nothing(pool: PgPool) {
    let server =
        Server::start(&pool, ServeArgs { request_timeout: Duration::from_secs(2), ..ServeArgs::default() }).await;
    let token = poster_token(&pool, &server.base).await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("lock table event_queue in access exclusive mode").execute(&mut *lock).await.unwrap();

    let started = Instant::now();
    let (base, t) = (server.base.clone(), token.clone());
    let posted = tokio::spawn(async move { post(&base, &t, event(1)).await });
    // A commit waiting over a second: degraded.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, body) = healthz(&server.base).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "degraded", "{body}");
    let resp = posted.await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "5");
    let took = started.elapsed();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "storage_timeout", "{body}");
    assert!(took < Duration::from_secs(4), "answered after {took:?}");
    lock.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 0, "nothing stored later");
    // Still degraded just after (a request timed out), then the retry is stored.
    assert_eq!(healthz(&server.base).await.1["status"], "degraded");
    assert_eq!(post(&server.base, &token, event(1)).await.status(), StatusCode::OK);
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1);
}

/// A COMMIT that itself outlasts the request (here a deferred trigger that ignores the
/// cancellation) stores the event after its request was answered 503: the client's retry of the
/// same body is answered as the first request would have been, and nothing is stored twice.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_retry_after_a_late_commit_is_not_stored_twice(pool: PgPool) {
    let server =
        Server::start(&pool, ServeArgs { request_timeout: Duration::from_secs(1), ..ServeArgs::default() }).await;
    let token = poster_token(&pool, &server.base).await;
    sqlx::raw_sql(
        "create function slow_commit() returns trigger language plpgsql as $$
         begin
           begin perform pg_sleep(10); exception when query_canceled then perform pg_sleep(3); end;
           return null;
         end $$;
         create constraint trigger slow_commit after insert on event_queue deferrable initially deferred
           for each row execute function slow_commit();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let first = post(&server.base, &token, event(7)).await;
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    sqlx::raw_sql("drop trigger slow_commit on event_queue; drop function slow_commit();")
        .execute(&pool)
        .await
        .unwrap();
    // Wait for the late commit.
    for _ in 0..100 {
        if count(&pool, "select count(*) from event_queue").await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1, "the COMMIT landed late");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let retry = post(&server.base, &token, event(7)).await;
    assert_eq!(retry.status(), StatusCode::OK);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let id: i64 = sqlx::query_scalar("select id from event_queue").fetch_one(&pool).await.unwrap();
    assert_eq!(retry.json::<Value>().await.unwrap()["id"], id);
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1);
    // A second identical event is a new one.
    assert_eq!(post(&server.base, &token, event(7)).await.status(), StatusCode::OK);
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 2);
}

/// Finding 2: wrong secrets were each answered after a full argon2 check, however many came.
/// Now a few are, then the address (and the client id) waits, answered 429 with Retry-After
/// without a check; another client's request from elsewhere is not held up; /metrics counts.
#[sqlx::test(migrator = "MIGRATOR")]
async fn wrong_secrets_are_throttled_per_address_and_client_id(pool: PgPool) {
    let server = Server::start(&pool, ServeArgs::default()).await;
    let victim = callrecon::users::add(&pool, "acme", &["AsyncMetaData".to_owned()]).await.unwrap();
    let other = callrecon::users::add(&pool, "other", &["AsyncMetaData".to_owned()]).await.unwrap();
    let attacker = http_from("127.0.0.2");
    for i in 0..callrecon::serve::throttle::FREE {
        let resp = token(&server.base, &attacker, &victim.client_id, &format!("guess-{i}")).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "guess {i}");
    }
    // The sixth is still checked, then the waits begin: 1 s, then 2 s, then 4 s (each wrong
    // secret after the last wait doubles it).
    for (i, wait) in [(5, 1.1), (6, 2.1), (7, 0.0)] {
        let resp = token(&server.base, &attacker, &victim.client_id, &format!("guess-{i}")).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "guess {i}");
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
    let started = Instant::now();
    let throttled = token(&server.base, &attacker, &other.client_id, &other.client_secret).await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS, "the address waits, whatever it asks");
    assert!(started.elapsed() < Duration::from_millis(1500), "no password check: {:?}", started.elapsed());
    let retry_after: u64 = throttled.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((2..=4).contains(&retry_after), "{retry_after}");
    let body: Value = throttled.json().await.unwrap();
    assert_eq!(body["error"], "temporarily_unavailable", "{body}");

    // The client id waits too, from any address but one it signed in from before.
    let elsewhere = http_from("127.0.0.3");
    assert_eq!(
        token(&server.base, &elsewhere, &victim.client_id, &victim.client_secret).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client from another address is served at once.
    assert_eq!(token(&server.base, &http(), &other.client_id, &other.client_secret).await.status(), StatusCode::OK);

    let metrics = http().get(format!("{}/metrics", server.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("callrecon_auth_failures_total{endpoint=\"token\"} 8"), "{metrics}");
    let throttled: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("callrecon_auth_throttled_total{endpoint=\"token\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(throttled, 2.0, "{metrics}");
}

/// `X-Content-Type-Options: nosniff` on every answer: the API's, errors, unknown paths, the
/// desk's redirects.
#[sqlx::test(migrator = "MIGRATOR")]
async fn every_response_says_nosniff(pool: PgPool) {
    let server = Server::start(&pool, ServeArgs::default()).await;
    let client = reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for (method, path) in [
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("POST", "/token"),
        ("POST", callrecon::serve::EVENT_PATH),
        ("GET", "/no/such/path"),
        ("GET", "/review"),
        ("GET", "/review/login"),
    ] {
        let resp = client.request(method.parse().unwrap(), format!("{}{path}", server.base)).send().await.unwrap();
        assert_eq!(
            resp.headers().get("x-content-type-options").map(|v| v.to_str().unwrap()),
            Some("nosniff"),
            "{method} {path}"
        );
    }
}

/// `callrecon serve` as a process, its stderr kept in a file.
struct Process {
    child: Child,
    base: String,
    addr: SocketAddr,
    log: tempfile::NamedTempFile,
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Process {
    async fn start(pool: &PgPool, args: &[&str]) -> Process {
        let url = database_url(pool).await;
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_callrecon"))
            .args(["--database-url", &url, "serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let base = line.trim().rsplit(' ').next().unwrap().to_owned();
        let addr = base.trim_start_matches("http://").parse().unwrap();
        Process { child, base, addr, log, _stdout: stdout }
    }

    fn terminate(&self) {
        let status =
            Command::new("sh").args(["-c", "kill -TERM \"$1\"", "sh", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// How long the process took to exit (up to `limit`; killed past it).
    async fn exited_within(&mut self, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status:?}");
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child.kill().unwrap();
        None
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }
}

/// Finding 11: SIGTERM with an idle keep-alive connection and a half-sent request open left
/// `serve` running until the client closed its sockets. Now idle connections (and one still
/// sending its head) close at once, a request in flight gets `--shutdown-timeout`, then the
/// process exits.
#[sqlx::test(migrator = "MIGRATOR")]
async fn sigterm_closes_idle_connections_at_once_and_waits_for_requests_at_most_the_shutdown_timeout(pool: PgPool) {
    let mut server = Process::start(&pool, &["--shutdown-timeout", "2s"]).await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let mut half_head = TcpStream::connect(server.addr).await.unwrap();
    half_head.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut half_body = TcpStream::connect(server.addr).await.unwrap();
    half_body.write_all(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\ngrant").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    server.terminate();
    let idle_closed = closed_within(&mut idle, Duration::from_secs(5)).await.expect("idle closed");
    let head_closed = closed_within(&mut half_head, Duration::from_secs(5)).await.expect("half head closed");
    assert!(
        idle_closed < Duration::from_secs(1) && head_closed < Duration::from_secs(1),
        "{idle_closed:?} {head_closed:?}"
    );
    let exited = server.exited_within(Duration::from_secs(10)).await.expect("exited");
    assert!(exited < Duration::from_secs(4), "exited after {exited:?}");
    assert!(closed_within(&mut half_body, Duration::from_secs(1)).await.is_some());
    assert!(server.log().contains("requests still in flight at the shutdown timeout"), "{}", server.log());
}

/// Finding 9: `/review/events/0` logged an ERROR ("could not be rendered") for what is a plain
/// 404; now it is a 404 page, logged at INFO.
#[sqlx::test(migrator = "MIGRATOR")]
async fn an_unknown_event_is_a_plain_404_logged_at_info(pool: PgPool) {
    let secret = callrecon::users::add(&pool, "ana", &["Analyst".to_owned()]).await.unwrap().client_secret;
    let mut server = Process::start(&pool, &[]).await;
    let client = reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let session = desk_session(&server.base, "ana", &secret).await;
    for path in ["/review/events/0", "/review/events/99999"] {
        let resp = client.get(format!("{}{path}", server.base)).header("cookie", &session).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(resp.text().await.unwrap().contains("Not found: event"));
    }
    server.terminate();
    server.exited_within(Duration::from_secs(10)).await.expect("exited");
    let log = server.log();
    assert!(!log.contains("ERROR"), "{log}");
    assert!(log.lines().any(|l| l.contains("INFO") && l.contains("not found") && l.contains("event 0")), "{log}");
}
