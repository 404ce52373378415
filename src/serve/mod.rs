//! The intake API (`callrecon serve`): customers post async-metadata events, which are answered
//! 200 only once they are committed on `event_queue`; the next run ingests them from there.
//!
//! - `POST /token`: OAuth2 client credentials → a bearer token ([`auth`]).
//! - `POST /callevent/v1/outofband/event`: one event, checked with [`crate::event`]'s parser (in
//!   UTC: the API does not know the job's time zone, so the body is stored as posted and the run
//!   parses it again in the job's zone), stored by the group-commit writer ([`queue_writer`]).
//! - `POST /callevent/v1/outofband/masterCall`: the same, for an event addressed to a call group
//!   by its `MasterId`, which it requires.
//! - `/callevent/v1/outofband/case`: the platform SDK's case endpoint, answered with a JSON 404
//!   (cases are not handled here).
//! - These paths match without regard to case, as on the platform, whose .NET SDK posts `/Token`
//!   and `/callEvent/…` ([`canonical_path`], before routing); the other routes keep theirs.
//! - `GET /healthz`: 200 while the database answers and commits; 503 `degraded` while commits
//!   stall.
//! - `GET /metrics`: Prometheus metrics ([`metrics`]); `GET /openapi.json`: this API described
//!   in OpenAPI 3.1 (`docs/openapi.json`, compiled in).
//! - `/review`: the analysts' review desk ([`review`]).
//!
//! **Architecture invariant:** the API never writes anything but `event_queue` and its own
//! `api_*` tables, and a 200 means the event's transaction has committed; the review desk writes
//! `review_sessions` and `review_claims`, and decisions only through `resolve`. Bearer tokens open no review page,
//! and an analyst's session posts no event. Every connection is served by [`crate::http`], so
//! every wait on a client is bounded; every wait on the database is bounded too (an event's by
//! `--request-timeout`).

pub mod auth;
pub mod metrics;
pub mod queue_writer;
pub mod review;
pub mod throttle;

use std::future::Future;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::cli::ServeArgs;
use crate::event::{self, Invalid};
use crate::http::{BodyError, Posted};
use crate::users;
use queue_writer::{Submission, Verdict, Writer};

/// The path the Async Metadata API article gives.
pub const EVENT_PATH: &str = "/callevent/v1/outofband/event";

/// The platform SDK's path for events addressed to a master call (a call group) by `MasterId`.
pub const MASTER_CALL_PATH: &str = "/callevent/v1/outofband/masterCall";

/// The token endpoint (the platform's SDK posts `/Token`).
pub const TOKEN_PATH: &str = "/token";

/// The platform SDK's path for metadata addressed to a case by its reference id: not handled here.
pub const CASE_PATH: &str = "/callevent/v1/outofband/case";

/// The intake API's paths, matched without regard to case as on the platform (its SDK posts
/// `/Token` and `/callEvent/…`); the other routes (the review desk's) keep theirs.
const API_PATHS: [&str; 4] = [TOKEN_PATH, EVENT_PATH, MASTER_CALL_PATH, CASE_PATH];

/// The request with an API path written in any case rewritten to the path routed.
fn canonical_path(mut request: Request) -> Request {
    let path = request.uri().path();
    if let Some(api) = API_PATHS.iter().find(|api| api.eq_ignore_ascii_case(path) && **api != path) {
        let query = request.uri().query().map_or(String::new(), |q| format!("?{q}"));
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = format!("{api}{query}").parse().ok();
        if let Ok(uri) = axum::http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    request
}

/// Which endpoint a body was posted to: what it must hold besides a valid event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Event,
    /// `MasterId` is required.
    MasterCall,
}

/// How long an `Idempotency-Key` is remembered.
const IDEMPOTENCY_KEYS_KEPT: &str = "24 hours";

/// `callrecon serve`: listens until SIGTERM or SIGINT, then answers the requests in flight
/// (within `--shutdown-timeout`) and stops.
pub async fn run(pool: &PgPool, args: &ServeArgs) -> Result<()> {
    let open_files = crate::http::raise_open_file_limit();
    // The pool's connections, files, the listener: what the open-file limit must leave room for.
    let reserve = args.writers as usize + 64;
    let args = &ServeArgs {
        max_connections: crate::http::connections_within(args.max_connections as usize, open_files, reserve) as u32,
        ..args.clone()
    };
    // A pool of its own: one connection per writer plus tokens and health checks.
    let pool = crate::db::pool_options()
        .max_connections(args.writers + 4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with((*pool.connect_options()).clone())
        .await
        .context("connecting the intake API's pool")?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("callrecon serve: listening on http://{addr}");
    std::io::stdout().flush()?;
    tracing::info!(
        %addr, max_body = args.max_body, writers = args.writers, max_connections = args.max_connections,
        open_files, "intake API listening"
    );
    serve(pool, args, listener, shutdown_signal()).await?;
    tracing::info!("intake API stopped");
    Ok(())
}

/// Serves on `listener` until `shutdown` completes, then stops accepting connections, closes
/// the idle ones, answers the requests in flight (their events committed or refused) within
/// `--shutdown-timeout`, and returns.
pub async fn serve(
    pool: PgPool,
    args: &ServeArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics = metrics::IntakeMetrics::new();
    let (writer, writer_task) =
        queue_writer::start(pool.clone(), args.max_batch, args.writers, metrics.batch_events.clone()).await?;
    // One queue of password checks for the token endpoint and the desk's sign-in.
    let checks = throttle::Checks::default();
    let trusted_proxies = Arc::new(args.trusted_proxies.clone());
    let guards = review::Guards {
        checks: checks.clone(),
        throttle: throttle::Throttle::new("sign_in", metrics.auth.clone()),
        trusted_proxies: trusted_proxies.clone(),
        login_key: review::session::LoginKey::read(&pool).await?,
    };
    let desk = review::Desk::new(pool.clone(), &args.review, guards)?;
    let issuer = auth::TokenIssuer {
        pool: pool.clone(),
        ttl: args.token_ttl,
        checks,
        throttle: throttle::Throttle::new("token", metrics.auth.clone()),
        trusted_proxies,
        issued: metrics.tokens_issued.clone(),
    };
    let housekeeping = tokio::spawn(housekeeping(pool.clone()));
    let app = router(pool, writer, args, metrics, desk, issuer);
    crate::http::serve(listener, app, limits(args), shutdown).await.context("serving HTTP")?;
    // Every connection is closed, so every handler (and its writer handle) is gone: wait for
    // the writer to answer the last batches.
    writer_task.await.context("the queue writer")?;
    housekeeping.abort();
    Ok(())
}

/// The connections' limits of `args`.
fn limits(args: &ServeArgs) -> crate::http::Limits {
    crate::http::Limits {
        header_timeout: args.header_timeout,
        body_timeout: args.body_timeout,
        idle_timeout: args.idle_timeout,
        max_connections: args.max_connections as usize,
        shutdown_timeout: args.shutdown_timeout,
    }
}

#[derive(Clone)]
struct App {
    pool: PgPool,
    writer: Writer,
    max_body: usize,
    request_timeout: Duration,
    metrics: metrics::IntakeMetrics,
}

/// The OpenAPI 3.1 description of this API, served at `/openapi.json` (a test replays its
/// examples against the server).
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

fn router(
    pool: PgPool,
    writer: Writer,
    args: &ServeArgs,
    metrics: metrics::IntakeMetrics,
    desk: review::Desk,
    issuer: auth::TokenIssuer,
) -> Router {
    let app =
        App { pool, writer, max_body: args.max_body, request_timeout: args.request_timeout, metrics: metrics.clone() };
    // Behind a transaction pooler the desk's statements would have no search path: it needs a
    // session (docs/database.md).
    let desk = match crate::db::pooler() {
        crate::db::Pooler::Session => review::router(desk),
        crate::db::Pooler::Transaction => Router::new()
            .route("/review", any(desk_needs_a_session))
            .route("/review/{*rest}", any(desk_needs_a_session)),
    };
    let routes = Router::new()
        .route(EVENT_PATH, post(post_event))
        .route(MASTER_CALL_PATH, post(post_master_call))
        .route(CASE_PATH, post(case_not_handled))
        .route("/healthz", get(healthz))
        .route("/metrics", get(|State(app): State<App>| async move { app.metrics.scrape(&app.pool).await }))
        .route("/openapi.json", get(|| async { ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .with_state(app)
        .merge(Router::new().route(TOKEN_PATH, post(auth::token)).with_state(issuer))
        .merge(desk)
        .layer(DefaultBodyLimit::max(args.max_body))
        .layer(axum::middleware::from_fn_with_state(metrics, metrics::track));
    // The paths are made canonical before routing.
    Router::new().fallback_service(tower::ServiceExt::map_request(routes, canonical_path))
}

/// The platform SDK's case endpoint: a JSON 404 saying what is handled here.
async fn case_not_handled() -> Response {
    let message = "cases are not handled here: callrecon attaches async metadata to calls (by SessionId, or by \
                   its matching rules) and to call groups (by MasterId); send case metadata to the platform itself";
    let endpoints = [TOKEN_PATH, EVENT_PATH, MASTER_CALL_PATH].map(|p| format!("POST {p}"));
    (StatusCode::NOT_FOUND, axum::Json(json!({"error": "not_found", "message": message, "endpoints": endpoints})))
        .into_response()
}

async fn desk_needs_a_session() -> Response {
    let message = "the review desk needs sessions of its own: serve it with --pooler session (docs/database.md)";
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "unavailable", "message": message}))).into_response()
}

async fn post_event(State(app): State<App>, request: Request) -> Response {
    post_to(Endpoint::Event, app, request).await
}

async fn post_master_call(State(app): State<App>, request: Request) -> Response {
    post_to(Endpoint::MasterCall, app, request).await
}

/// Both endpoints: the same auth, statuses, idempotency and group commit; only what the body must
/// hold differs ([`check_body`]).
async fn post_to(endpoint: Endpoint, app: App, request: Request) -> Response {
    let token = match caller(&app, request.headers()).await {
        Ok(token) => token,
        Err(refused) => return refused,
    };
    let idempotency_key = match idempotency_key(request.headers()) {
        Ok(key) => key,
        Err(message) => return bad_request(Some("Idempotency-Key"), message),
    };
    let body = match Posted::from_request(request, &()).await {
        Ok(Posted(body)) => body,
        Err(BodyError::TooLarge) => {
            let message = format!("the request body is larger than {} bytes", app.max_body);
            let body = axum::Json(json!({"error": "payload_too_large", "message": message}));
            return BodyError::TooLarge.closing((StatusCode::PAYLOAD_TOO_LARGE, body).into_response());
        }
        Err(e @ BodyError::TimedOut) => {
            let body = axum::Json(json!({"error": "request_timeout", "message": e.message()}));
            return e.closing((StatusCode::REQUEST_TIMEOUT, body).into_response());
        }
        Err(e) => return bad_request(None, &e.message()),
    };
    // The body is bounded by --body-timeout; from here on, the wait for the database.
    let deadline = tokio::time::Instant::now() + app.request_timeout;
    let (body_text, check) = check_body(&body, endpoint);
    let submission = Submission {
        token_sha256: token,
        idempotency_key,
        body: body_text,
        body_sha256: Sha256::digest(&body).into(),
        check,
        deadline,
    };
    answer(app.writer.submit(submission).await, app.request_timeout)
}

/// The digest of the request's bearer token, or its 401 (or 403 for an analyst's session: no
/// body is read for a request without a token).
async fn caller(app: &App, headers: &HeaderMap) -> Result<[u8; 32], Response> {
    let no_token = match auth::bearer(headers) {
        Ok(token) => return Ok(users::token_digest(token)),
        Err(no_token) => no_token,
    };
    // An analyst's session is no API credential: said plainly, as a 403.
    if let Ok(Some(analyst)) = review::session::current(&app.pool, headers).await {
        let message = format!(
            "{} is signed in to the review desk as an analyst; posting events needs an API user's bearer token ({} role)",
            analyst.name,
            users::ROLE_ASYNC_METADATA
        );
        return Err((StatusCode::FORBIDDEN, axum::Json(json!({"error": "insufficient_scope", "message": message})))
            .into_response());
    }
    Err(no_token.into_response())
}

/// The answer to a posted event.
fn answer(verdict: Verdict, request_timeout: Duration) -> Response {
    let error = |status: StatusCode, body: Value| (status, axum::Json(body)).into_response();
    match verdict {
        Verdict::Stored { queue_id, replayed } => {
            let mut resp = axum::Json(json!({"status": "accepted", "id": queue_id})).into_response();
            if replayed {
                resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            resp
        }
        Verdict::Unauthorized => auth::unauthorized(
            Some("invalid_token"),
            "the token is unknown, expired or its user revoked; get a new one from POST /token",
        ),
        Verdict::Forbidden { user } => {
            let message = format!("API user {user} lacks the {} role", users::ROLE_ASYNC_METADATA);
            let mut resp = error(StatusCode::FORBIDDEN, json!({"error": "insufficient_scope", "message": message}));
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"callrecon\", error=\"insufficient_scope\""),
            );
            resp
        }
        Verdict::Invalid(invalid) => bad_request(invalid.field.as_deref(), &invalid.reason),
        Verdict::KeyReused => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({
                "error": "idempotency_key_reused",
                "field": "Idempotency-Key",
                "message": "this Idempotency-Key was used before with a different body; use a new key for a new event",
            }),
        ),
        Verdict::Failed => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "storage_failed", "message": "the event could not be stored (nothing was stored); retry"}),
        ),
        Verdict::TimedOut => {
            let message = format!(
                "the database did not store the event within {} (nothing was stored); retry after the Retry-After seconds",
                humantime::format_duration(request_timeout)
            );
            let mut resp =
                error(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "storage_timeout", "message": message}));
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
            resp
        }
    }
}

/// `Retry-After` of an event the database did not store in time, in seconds.
const RETRY_AFTER: &str = "5";

/// The body as text and what the event parser says of it (and, for the masterCall endpoint,
/// whether it names a MasterId). Times are read in UTC here only to check them: the stored body
/// is parsed again by the run in the job's time zone.
fn check_body(body: &[u8], endpoint: Endpoint) -> (String, Result<(), Invalid>) {
    let not_json = |reason: String| (String::new(), Err(Invalid { field: None, reason }));
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return not_json(format!("the body is not JSON: {e}")),
    };
    let Ok(text) = std::str::from_utf8(body) else { return not_json("the body is not UTF-8".to_owned()) };
    let check = event::parse_naming_field(&value, chrono_tz::UTC).and_then(|e| match (endpoint, e.master_id) {
        (Endpoint::MasterCall, None) => Err(Invalid {
            field: Some("MasterId".to_owned()),
            reason: "missing MasterId: this endpoint takes events for a master call (the call group's id); \
                     post events for one call to /callevent/v1/outofband/event"
                .to_owned(),
        }),
        _ => Ok(()),
    });
    (text.to_owned(), check)
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, &'static str> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    match value.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()) => Ok(Some(k.to_owned())),
        _ => Err("the Idempotency-Key header must be 1 to 255 visible ASCII characters"),
    }
}

fn bad_request(field: Option<&str>, message: &str) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_event", "field": field, "message": message})))
        .into_response()
}

/// 200 while the database answers and commits; 503 `unavailable` when it does not answer, and
/// `degraded` while commits stall (a transaction waiting over a second, or a request timed out
/// in the last 30 seconds: events are being refused 503).
async fn healthz(State(app): State<App>) -> Response {
    let ping =
        async { sqlx::query_scalar::<_, i32>("select 1").fetch_one(&mut *crate::db::begin(&app.pool).await?).await };
    let status = |status: &str, message: &str| {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": status, "message": message}))).into_response()
    };
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => match app.writer.stalled() {
            None => axum::Json(json!({"status": "ok"})).into_response(),
            Some(why) => status("degraded", &format!("database: {why}")),
        },
        Ok(Err(e)) => status("unavailable", &format!("database: {e}")),
        Err(_) => status("unavailable", "database: no answer within 2s"),
    }
}

/// Forgets expired tokens and old idempotency keys, hourly.
async fn housekeeping(pool: PgPool) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        every.tick().await;
        let tokens = crate::db::execute(
            &pool,
            sqlx::query("delete from api_tokens where expires_at < now() - interval '1 day'"),
        )
        .await;
        let keys = crate::db::execute(
            &pool,
            sqlx::query("delete from api_idempotency where created_at < now() - $1::interval")
                .bind(IDEMPOTENCY_KEYS_KEPT),
        )
        .await;
        match (tokens, keys) {
            (Ok(t), Ok(k)) => tracing::debug!(tokens = t.rows_affected(), keys = k.rows_affected(), "housekeeping"),
            (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "housekeeping failed; will retry in an hour"),
        }
        if crate::db::pooler() == crate::db::Pooler::Session
            && let Err(e) = review::housekeeping(&pool).await
        {
            tracing::warn!(error = %crate::db::error_line(&e), "forgetting expired review sessions failed; will retry in an hour");
        }
    }
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: no new connections, idle ones closed; answering the requests in flight");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_checked_with_the_event_parser() {
        let ok = br#"{"SessionId": "abc123", "EventTime": "2018/10/15T09:00:00.000Z", "Metadata": {"a": 1}}"#;
        let (text, check) = check_body(ok, Endpoint::Event);
        assert_eq!(check, Ok(()));
        assert_eq!(text.as_bytes(), ok);

        let cases: [(&[u8], Option<&str>, &str); 5] = [
            (b"not json", None, "not JSON"),
            (br#"{"Metadata": {}}"#, Some("EventTime"), "missing EventTime"),
            (br#"{"EventTime": "2018-13-01T00:00:00Z", "Metadata": {}}"#, Some("EventTime"), "not a valid date-time"),
            (br#"{"EventTime": "2018-10-15T09:00:00Z", "metadata": [1]}"#, Some("metadata"), "must be a JSON object"),
            (br#"{"EventTime": "2018-10-15T09:00:00Z", "Metadata": {"a": "x\u0000"}}"#, Some("Metadata"), "U+0000"),
        ];
        for (body, field, reason) in cases {
            let err = check_body(body, Endpoint::Event).1.unwrap_err();
            assert_eq!(err.field.as_deref(), field, "{}", String::from_utf8_lossy(body));
            assert!(err.reason.contains(reason), "{err:?} should say {reason:?}");
        }
    }

    #[test]
    fn the_master_call_endpoint_requires_a_master_id() {
        let with = br#"{"MasterId": "grp-1", "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}"#;
        assert_eq!(check_body(with, Endpoint::MasterCall).1, Ok(()));
        assert_eq!(check_body(with, Endpoint::Event).1, Ok(()));
        let without = br#"{"SessionId": "s", "EventTime": "2018-10-15T09:00:00Z", "Metadata": {}}"#;
        assert_eq!(check_body(without, Endpoint::Event).1, Ok(()));
        let err = check_body(without, Endpoint::MasterCall).1.unwrap_err();
        assert_eq!(err.field.as_deref(), Some("MasterId"));
    }
}
