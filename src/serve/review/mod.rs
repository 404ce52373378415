//! The review desk (`/review`, served by `callrecon serve`): analysts sign in and work the
//! unmatched events of every job as a queue, each explained (the rules' view of `explain`, and
//! the near misses), and decided through `resolve` — the same code, locks and history as
//! `callrecon resolve`, recorded under the analyst's name.
//!
//! - `GET /review/login`, `POST /review/login`, `POST /review/logout`: sessions ([`session`]).
//! - `GET /review`: the queue ([`queue`]); `GET /review/events/{id}`: one event;
//!   `POST /review/events/{id}`: attach, dismiss or reopen it.
//! - `GET /review/runs`: the run history and its chart ([`runs`]); `GET /review/runs/{id}/report`:
//!   a run's report.html.
//! - `GET /review/jobs/{job}/suggestions`: the job's suggested rule changes ([`suggestions`]).
//!
//! Server-rendered HTML (minijinja, templates compiled in), working without JavaScript; a small
//! inline script adds keyboard shortcuts. The Content-Security-Policy allows exactly the inline
//! scripts and styles of the templates, by their sha256, and nothing else. Every form is a POST
//! carrying the session's CSRF token, answered with a redirect (post/redirect/get) and a one-time
//! message the server chose ([`session::Flash`]); no text on a page comes from the URL. Every
//! query and form parameter is checked first ([`params`]: 400 naming it). Handlers are thin: they
//! parse the request, call what the CLI calls (`resolve::resolve`, `inspect::examine`,
//! `ledger::history`), and render.
//!
//! **Architecture invariant:** the desk writes nothing itself but `review_sessions`: decisions go
//! through `resolve`, and so through the ledger and apply under the job's lock. An API token never
//! opens a page, and a page never takes a bearer token in place of a session.

pub mod params;
pub mod queue;
pub mod runs;
pub mod session;
mod suggestions;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use super::throttle::{Checks, Throttle};
use crate::cli::ReviewArgs;
use crate::http::{BodyError, Posted};
use crate::inspect::{self, Near};
use crate::job::{self, Job, Target};
use crate::ledger;
use crate::matching::{Decision, TargetKind};
use crate::resolve::{self, Refused, Request, To};
use minijinja::value::Serde;
use params::{BadParam, Params};
use queue::{At, Filters};
use session::{Analyst, Flash, LoginKey};

/// How far around an event its page looks for calls sharing its keys: a day is enough to show
/// a near miss outside the window, and keeps the page fast on a busy platform.
const LOOK_AROUND: chrono::Duration = chrono::Duration::days(1);

/// The desk's state, shared by its handlers.
#[derive(Clone)]
pub struct Desk {
    pool: PgPool,
    templates: Arc<minijinja::Environment<'static>>,
    /// Jobs given with `--job`, by name (their files are read again at each use).
    given: Arc<BTreeMap<String, std::path::PathBuf>>,
    session_ttl: Duration,
    secure: bool,
    /// The password checks (shared with the token endpoint) and the sign-in's throttle.
    checks: Checks,
    throttle: Throttle,
    trusted_proxies: Arc<Vec<IpAddr>>,
    login_key: LoginKey,
    /// The pages' Content-Security-Policy: the templates' inline scripts and styles by hash.
    csp: HeaderValue,
}

/// What the desk shares with the rest of `serve`.
pub struct Guards {
    pub checks: Checks,
    pub throttle: Throttle,
    pub trusted_proxies: Arc<Vec<IpAddr>>,
    pub login_key: LoginKey,
}

impl Desk {
    /// Loads the job files given (refusing a bad one) and compiles the templates.
    pub fn new(pool: PgPool, args: &ReviewArgs, guards: Guards) -> Result<Desk> {
        let mut given = BTreeMap::new();
        for path in &args.jobs {
            let job = job::load(path)?;
            given.insert(job.name, path.clone());
        }
        let mut env = minijinja::Environment::new();
        env.add_filter("urlencode", |s: String| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>());
        for (name, text) in TEMPLATES {
            env.add_template(name, text)?;
        }
        let csp = HeaderValue::from_str(&crate::report::html::content_security_policy(
            TEMPLATES.iter().map(|(_, text)| *text),
            "form-action 'self'; frame-ancestors 'none'",
        ))?;
        Ok(Desk {
            pool,
            templates: Arc::new(env),
            given: Arc::new(given),
            session_ttl: args.session_ttl,
            secure: args.secure_cookies,
            checks: guards.checks,
            throttle: guards.throttle,
            trusted_proxies: guards.trusted_proxies,
            login_key: guards.login_key,
            csp,
        })
    }

    /// Every job the desk can explain and decide: those given, and each other job through the
    /// job file of its latest run.
    async fn jobs(&self) -> Result<BTreeMap<String, Job>> {
        let mut files: BTreeMap<String, std::path::PathBuf> = queue::job_files(&self.pool)
            .await?
            .into_iter()
            .map(|(name, file)| (name, std::path::PathBuf::from(file)))
            .collect();
        files.extend(self.given.iter().map(|(n, p)| (n.clone(), p.clone())));
        let mut jobs = BTreeMap::new();
        for (name, path) in files {
            match job::load(&path) {
                Ok(job) if job.name == name => {
                    jobs.insert(name, job);
                }
                Ok(job) => {
                    tracing::debug!(job = %name, file = %path.display(), now = %job.name, "the job file names another job now")
                }
                // Logged quietly: every page asks again (a run started elsewhere may name a file not here).
                Err(e) => tracing::debug!(job = %name, error = %e, "review desk: job file not loaded"),
            }
        }
        Ok(jobs)
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> Response {
        match self.templates.get_template(name).and_then(|t| t.render(ctx)) {
            Ok(html) => no_store(Html(html).into_response(), &self.csp),
            Err(e) => {
                tracing::error!(error = %e, template = name, "review desk: rendering failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "the page could not be rendered; see the server's log")
                    .into_response()
            }
        }
    }
}

const TEMPLATES: [(&str, &str); 6] = [
    ("layout.html", include_str!("templates/layout.html")),
    ("login.html", include_str!("templates/login.html")),
    ("queue.html", include_str!("templates/queue.html")),
    ("event.html", include_str!("templates/event.html")),
    ("runs.html", include_str!("templates/runs.html")),
    ("suggestions.html", include_str!("templates/suggestions.html")),
];

/// The desk's routes.
pub fn router(desk: Desk) -> Router {
    Router::new()
        .route("/review", get(queue_page))
        .route("/review/", get(|| async { redirect("/review") }))
        .route("/review/login", get(login_page).post(login))
        .route("/review/logout", post(logout))
        .route("/review/events/{id}", get(event_page).post(decide))
        .route("/review/runs", get(runs_page))
        .route("/review/runs/{id}/report", get(run_report))
        .route("/review/jobs/{job}/suggestions", get(suggestions::page))
        .with_state(desk)
}

/// Forgets expired sessions (the API's hourly housekeeping).
pub async fn housekeeping(pool: &PgPool) -> Result<u64> {
    session::forget_expired(pool).await
}

fn redirect(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static("/review")));
    resp
}

/// A page's headers: never cached (it shows a session's data), never framed (a decision button
/// under someone else's page), nothing loaded from elsewhere and no script or style but the
/// page's own (`csp`: the pages are self-contained).
fn no_store(mut resp: Response, csp: &HeaderValue) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_SECURITY_POLICY, csp.clone());
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    resp
}

fn forbidden(message: &str) -> Response {
    (StatusCode::FORBIDDEN, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message.to_owned()).into_response()
}

fn failed(e: &anyhow::Error) -> Response {
    tracing::error!(error = crate::db::error_line(e), "review desk: request failed");
    (StatusCode::INTERNAL_SERVER_ERROR, "the request failed; see the server's log").into_response()
}

/// The signed-in analyst, or the answer for a request without one: 403 for a bearer token (the
/// API's credentials open no page), otherwise a redirect to the sign-in page.
async fn gate(desk: &Desk, headers: &HeaderMap, uri: &Uri) -> Result<Analyst, Response> {
    if headers.contains_key(header::AUTHORIZATION) {
        return Err(forbidden(
            "API tokens cannot open the review desk: it is for analysts (role Analyst), who sign in at /review/login",
        ));
    }
    match session::current(&desk.pool, headers).await {
        Ok(Some(analyst)) => Ok(analyst),
        Ok(None) => {
            let here = uri.path_and_query().map_or("/review", |p| p.as_str());
            let next = url::form_urlencoded::Serializer::new(String::new()).append_pair("next", here).finish();
            Err(redirect(&format!("/review/login?{next}")))
        }
        Err(e) => Err(failed(&e)),
    }
}

/// The parameters of `uri`'s query, only `known` ones, each checked.
fn query(uri: &Uri, known: &[&str]) -> Result<Params, BadParam> {
    Params::parse(uri.query().unwrap_or_default().as_bytes(), known)
}

/// Why a form was not read.
enum BadForm {
    Body(BodyError),
    Param(BadParam),
}

impl IntoResponse for BadForm {
    fn into_response(self) -> Response {
        match self {
            BadForm::Body(e) => e.into_response(),
            BadForm::Param(e) => e.into_response(),
        }
    }
}

/// A posted form's fields, only `known` ones, each checked.
fn form(body: Result<Posted, BodyError>, known: &[&str]) -> Result<Params, BadForm> {
    let Posted(body) = body.map_err(BadForm::Body)?;
    Params::parse(&body, known).map_err(BadForm::Param)
}

/// [`gate`] for a form: also checks that the browser posted it from the desk's own pages, and
/// its CSRF token (403 when wrong or missing).
async fn gate_form(desk: &Desk, headers: &HeaderMap, uri: &Uri, fields: &Params) -> Result<Analyst, Response> {
    let analyst = gate(desk, headers, uri).await?;
    let token = session::cookie(headers, session::COOKIE).unwrap_or_default();
    if let Err(why) = session::same_site(headers) {
        tracing::warn!(user = %analyst.name, path = uri.path(), why, "review desk: form refused");
        return Err(forbidden(&format!("{why}: open the desk at its own address and submit the form there")));
    }
    if !session::csrf_ok(token, fields.raw("csrf")) {
        tracing::warn!(user = %analyst.name, path = uri.path(), "review desk: form refused, bad CSRF token");
        return Err(forbidden("this form's CSRF token is missing or wrong: reload the page and submit it again"));
    }
    Ok(analyst)
}

/// A path of the desk to go to after signing in (never another site).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/review") && !n.contains("//") && !n.contains('\\') => n.to_owned(),
        _ => "/review".to_owned(),
    }
}

async fn login_page(State(desk): State<Desk>, headers: HeaderMap, uri: Uri) -> Response {
    let q = match query(&uri, &["next"]) {
        Ok(q) => q,
        Err(bad) => return bad.into_response(),
    };
    if let Ok(Some(_)) = session::current(&desk.pool, &headers).await {
        return redirect("/review");
    }
    login_form(&desk, safe_next(q.get("next")), None, StatusCode::OK)
}

/// The sign-in form, with a fresh nonce in a cookie of its own.
fn login_form(desk: &Desk, next: String, error: Option<&str>, status: StatusCode) -> Response {
    let nonce = crate::users::random_string(32);
    let ctx = minijinja::context! { csrf => desk.login_key.csrf_of(&nonce), next, error, title => "Sign in" };
    let mut resp = desk.render("login.html", ctx);
    *resp.status_mut() = status;
    resp.headers_mut().append(
        header::SET_COOKIE,
        session::set_cookie(session::LOGIN_COOKIE, &nonce, Duration::from_secs(3600), desk.secure),
    );
    resp
}

async fn login(
    State(desk): State<Desk>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Posted, BodyError>,
) -> Response {
    let f = match form(body, &["csrf", "next", "name", "secret"]) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let nonce = session::cookie(&headers, session::LOGIN_COOKIE).unwrap_or_default();
    if let Err(why) = session::same_site(&headers) {
        tracing::warn!(why, "review desk: sign-in form refused");
        return forbidden(&format!("{why}: open /review/login at the desk's own address and sign in there"));
    }
    if !desk.login_key.csrf_ok(nonce, f.raw("csrf")) {
        return forbidden("this sign-in form's CSRF token is missing or wrong: reload /review/login and sign in again");
    }
    let next = safe_next(f.get("next"));
    let (name, secret) = (f.get("name").unwrap_or_default(), f.raw("secret"));
    let address = super::throttle::client_address(peer.ip(), &headers, &desk.trusted_proxies);
    let passed = match desk.throttle.check(address, name) {
        Ok(passed) => passed,
        Err(throttled) => {
            throttled.pause().await;
            return too_many_sign_ins(&desk, next, throttled);
        }
    };
    match session::sign_in(&desk.pool, &desk.checks, (name, passed), secret, desk.session_ttl).await {
        Ok(Ok(Some(token))) => {
            desk.throttle.succeeded(address, name);
            let mut resp = redirect(&next);
            let h = resp.headers_mut();
            h.append(header::SET_COOKIE, session::set_cookie(session::COOKIE, &token, desk.session_ttl, desk.secure));
            h.append(header::SET_COOKIE, session::set_cookie(session::LOGIN_COOKIE, "", Duration::ZERO, desk.secure));
            resp
        }
        Ok(Ok(None)) => {
            desk.throttle.failed(address, name);
            let error = "Wrong name or secret, or this user is not an analyst (role Analyst).";
            login_form(&desk, next, Some(error), StatusCode::UNAUTHORIZED)
        }
        Ok(Err(_busy)) => {
            let error = "Too many sign-ins are being checked right now: wait a second, then sign in again.";
            let mut resp = login_form(&desk, next, Some(error), StatusCode::SERVICE_UNAVAILABLE);
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        Err(e) => failed(&e),
    }
}

/// 429: the sign-in form again, saying how long to wait.
fn too_many_sign_ins(desk: &Desk, next: String, throttled: super::throttle::Throttled) -> Response {
    let error = format!(
        "Too many wrong secrets for this {}: wait {} s, then sign in again.",
        if throttled.by == "name" { "name" } else { "address" },
        throttled.retry_after_secs()
    );
    let mut resp = login_form(desk, next, Some(&error), StatusCode::TOO_MANY_REQUESTS);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(throttled.retry_after_secs()));
    resp
}

async fn logout(State(desk): State<Desk>, headers: HeaderMap, uri: Uri, body: Result<Posted, BodyError>) -> Response {
    let f = match form(body, &["csrf"]) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let analyst = match gate_form(&desk, &headers, &uri, &f).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    if let Err(e) = session::sign_out(&desk.pool, &headers).await {
        return failed(&e);
    }
    tracing::info!(user = %analyst.name, "review desk: signed out");
    let mut resp = redirect("/review/login");
    resp.headers_mut()
        .append(header::SET_COOKIE, session::set_cookie(session::COOKIE, "", Duration::ZERO, desk.secure));
    resp
}

/// A time as a person reads it in a table.
fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// `3.2 d`, `5 h`, `12 min`.
fn span(d: chrono::Duration) -> String {
    let m = d.num_minutes();
    if m.abs() >= 2 * 1440 {
        format!("{:.1} d", m as f64 / 1440.0)
    } else if m.abs() >= 120 {
        format!("{} h", m / 60)
    } else {
        format!("{m} min")
    }
}

#[derive(Serialize)]
struct QueueRow {
    id: i64,
    job: String,
    source: String,
    address: String,
    event_time: String,
    received_at: String,
    pending: String,
    expires_in: String,
    expiring: bool,
    reason: String,
    candidates: String,
    metadata: String,
}

async fn queue_page(State(desk): State<Desk>, headers: HeaderMap, uri: Uri) -> Response {
    let analyst = match gate(&desk, &headers, &uri).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let (filters, at) = match queue_request(&uri) {
        Ok(request) => request,
        Err(bad) => return bad.into_response(),
    };
    match queue_view(&desk, &analyst, filters, at).await {
        Ok(resp) => resp,
        Err(e) => failed(&e),
    }
}

/// The queue's filters and page, from its query string.
fn queue_request(uri: &Uri) -> Result<(Filters, At), BadParam> {
    const KEYS: [&str; 8] = ["job", "reason", "min_days", "expiring_hours", "source", "q", "after", "before"];
    let p = Params::parse(uri.query().unwrap_or_default().as_bytes(), &KEYS)?;
    let at = match (queue::Cursor::param(&p, "after")?, queue::Cursor::param(&p, "before")?) {
        (Some(c), _) => At::After(c),
        (None, Some(c)) => At::Before(c),
        _ => At::First,
    };
    Ok((Filters::parse(&p)?, at))
}

async fn queue_view(desk: &Desk, analyst: &Analyst, filters: Filters, at: At) -> Result<Response> {
    let jobs = desk.jobs().await?;
    let pending_for: queue::PendingFor = jobs.iter().map(|(n, j)| (n.clone(), j.pending_for)).collect();
    let started = std::time::Instant::now();
    let page = queue::page(&desk.pool, &filters, &pending_for, at, queue::PAGE).await?;
    let counts = queue::counts(&desk.pool, filters.job.as_deref()).await?;
    let took_ms = started.elapsed().as_millis() as u64;
    let mut job_names: Vec<String> = queue::jobs(&desk.pool).await?;
    job_names.extend(jobs.keys().cloned());
    job_names.sort();
    job_names.dedup();
    let now = Utc::now();
    let rows: Vec<QueueRow> = page
        .rows
        .iter()
        .map(|r| {
            let expires = pending_for.get(&r.job).map(|p| r.received_at + *p);
            QueueRow {
                id: r.id,
                job: r.job.clone(),
                source: r.source.clone(),
                address: match (&r.session_id, &r.master_id) {
                    (Some(s), _) => format!("SessionId {s}"),
                    (_, Some(m)) => format!("MasterId {m}"),
                    _ => String::new(),
                },
                event_time: when(r.event_time),
                received_at: when(r.received_at),
                pending: span(now - r.received_at),
                expires_in: expires.map_or("?".to_owned(), |e| span(e - now)),
                expiring: expires.is_some_and(|e| e - now < chrono::Duration::hours(24)),
                reason: r.reason.clone(),
                candidates: r.candidates.join(", "),
                metadata: r.metadata.clone(),
            }
        })
        .collect();
    let filter_query = filters.to_query();
    let link = |key: &str, c: queue::Cursor| {
        let mut s = url::form_urlencoded::Serializer::new(filter_query.clone());
        s.append_pair(key, &c.text());
        format!("/review?{}", s.finish())
    };
    let total: i64 = counts.values().sum();
    let capped = counts.values().any(|n| *n > queue::COUNT_CAP);
    let counts: BTreeMap<String, String> = counts
        .into_iter()
        .map(|(r, n)| (r, if n > queue::COUNT_CAP { format!("{}+", queue::COUNT_CAP) } else { n.to_string() }))
        .collect();
    // With a capped reason the total is a lower bound: each capped reason counts COUNT_CAP.
    let n_capped = counts.values().filter(|n| n.ends_with('+')).count() as i64;
    let total = if capped { format!("{}+", total - n_capped) } else { total.to_string() };
    let (next, prev) = (page.next.map(|c| link("after", c)), page.prev.map(|c| link("before", c)));
    let ctx = minijinja::context! {
        title => "Queue",
        analyst => analyst.name.as_str(),
        csrf => analyst.csrf.as_str(),
        rows => Serde(&rows),
        counts => Serde(&counts),
        total,
        jobs => Serde(&job_names),
        reasons => Serde(&queue::REASONS),
        f => minijinja::context! {
            job => filters.job, reason => filters.reason, min_days => filters.min_days,
            expiring_hours => filters.expiring_hours, source => filters.source, q => filters.search,
        },
        filter_query,
        next,
        prev,
        took_ms,
    };
    Ok(desk.render("queue.html", ctx))
}

/// A call or group an analyst can attach the event to, and why it is listed.
#[derive(Serialize)]
struct Choice {
    to: String,
    kind: &'static str,
    id: String,
    why: String,
    /// `candidate` (in the window), `outside`, `partial` or `tie`.
    class: &'static str,
    start: String,
    end: String,
    ani: String,
    agent: String,
    group: String,
}

#[derive(Serialize)]
struct StepView {
    n: usize,
    rule: String,
    target: &'static str,
    keys: Vec<(String, String, bool)>,
    applicable: bool,
    sharing: usize,
    windowed: bool,
    decision: String,
    options: Vec<Choice>,
}

async fn event_page(State(desk): State<Desk>, headers: HeaderMap, uri: Uri, Path(id): Path<i64>) -> Response {
    let analyst = match gate(&desk, &headers, &uri).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let filters = match query(&uri, &Filters::KEYS).and_then(|p| Filters::parse(&p)) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let flash = match session::take_flash(&desk.pool, &headers, id).await {
        Ok(flash) => flash,
        Err(e) => return failed(&e),
    };
    match event_view(&desk, &analyst, id, filters, flash).await {
        Ok(resp) => resp,
        Err(e) => failed(&e),
    }
}

/// A plain 404 for an id that names nothing: the analyst's typo, logged as such.
fn not_found(desk: &Desk, analyst: &Analyst, what: &str, flash: Option<Flash>) -> Response {
    tracing::info!(user = %analyst.name, what, "review desk: not found");
    let ctx = minijinja::context! {
        title => "Not found", missing => what, analyst => analyst.name.as_str(), csrf => analyst.csrf.as_str(),
        error => flash.filter(|f| f.kind == "error").map(|f| f.text),
    };
    let mut resp = desk.render("event.html", ctx);
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp
}

async fn event_view(
    desk: &Desk,
    analyst: &Analyst,
    id: i64,
    filters: Filters,
    flash: Option<Flash>,
) -> Result<Response> {
    let jobs = desk.jobs().await?;
    let Some(job_name) = inspect::job_of(&desk.pool, id).await? else {
        return Ok(not_found(desk, analyst, &format!("event {id}"), flash));
    };
    let (msg, error) = match flash {
        Some(f) if f.kind == "error" => (None, Some(f.text)),
        Some(f) => (Some(f.text), None),
        None => (None, None),
    };
    let job = jobs.get(&job_name);
    let examined = match job {
        Some(job) => Some(inspect::examine(&desk.pool, job, id, LOOK_AROUND).await?),
        None => None,
    };
    let mut conn = desk.pool.acquire().await?;
    let history: Vec<Value> = ledger::history(&mut conn, id)
        .await?
        .iter()
        .map(|h| {
            let who = match (&h.run_id, &h.decided.person) {
                (Some(run), _) => format!("{} {run}", h.run_kind.as_deref().unwrap_or("run")),
                (None, Some(p)) => p.clone(),
                (None, None) => "?".to_owned(),
            };
            serde_json::json!({"at": when(h.at), "who": who, "what": h.decided.describe(), "note": h.decided.note})
        })
        .collect();
    drop(conn);
    let pending_for: queue::PendingFor = jobs.iter().map(|(n, j)| (n.clone(), j.pending_for)).collect();
    let (next, prev) = match queue::position(&desk.pool, id).await? {
        Some(pos) => {
            let after = queue::page(&desk.pool, &filters, &pending_for, At::After(pos), 1).await?;
            let before = queue::page(&desk.pool, &filters, &pending_for, At::Before(pos), 1).await?;
            (after.rows.first().map(|r| r.id), before.rows.first().map(|r| r.id))
        }
        None => (None, None),
    };
    let filter_query = filters.to_query();
    let event_link = |other: i64| {
        if filter_query.is_empty() {
            format!("/review/events/{other}")
        } else {
            format!("/review/events/{other}?{filter_query}")
        }
    };

    let Some(x) = examined else {
        let ctx = minijinja::context! {
            title => format!("Event {id}"), analyst => analyst.name.as_str(), csrf => analyst.csrf.as_str(), id,
            no_job => job_name, history => Serde(&history), next => next.map(event_link), prev => prev.map(event_link),
            filter_query, msg, error,
        };
        return Ok(desk.render("event.html", ctx));
    };
    let job = job.expect("examined with it");
    let e = &x.event;
    // The top-level metadata keys the rules read, highlighted.
    let key_fields: HashSet<&str> =
        job.rules.iter().flat_map(|r| r.keys.iter().filter_map(|k| k.event.first().map(String::as_str))).collect();
    let metadata: Vec<Value> = e
        .metadata
        .iter()
        .map(|(k, v)| {
            let text = serde_json::to_string_pretty(v).unwrap_or_default();
            serde_json::json!({"key": serde_json::to_string(k).unwrap_or_default(), "value": text, "rule_key": key_fields.contains(k.as_str())})
        })
        .collect();
    let call_cols = |kind: TargetKind, id: &str| -> (String, String, String, String, String) {
        match (kind, x.calls.get(id)) {
            (TargetKind::Call, Some(c)) => (
                when(c.started_at),
                c.ended_at.map(when).unwrap_or_else(|| "(running)".to_owned()),
                c.ani.clone().unwrap_or_default(),
                c.agent_id.clone().unwrap_or_default(),
                c.call_group_id.clone().unwrap_or_default(),
            ),
            _ => Default::default(),
        }
    };
    let option = |kind: TargetKind, id: &str, why: String, class: &'static str| {
        let (start, end, ani, agent, group) = call_cols(kind, id);
        let prefix = if kind == TargetKind::Call { "call" } else { "group" };
        Choice {
            to: format!("{prefix}:{id}"),
            kind: prefix,
            id: id.to_owned(),
            why,
            class,
            start,
            end,
            ani,
            agent,
            group,
        }
    };
    let steps: Vec<StepView> = job
        .rules
        .iter()
        .zip(&x.steps)
        .enumerate()
        .map(|(i, (rule, s))| {
            let kind =
                if matches!(rule.target, Target::Call { .. }) { TargetKind::Call } else { TargetKind::CallGroup };
            let applicable = s.keys.iter().all(|k| k.1.is_some());
            let mut options: Vec<Choice> = s
                .in_window
                .iter()
                .map(|(id, d)| {
                    let why = if s.windowed {
                        format!("in the window, {} away", span_secs(*d as i64))
                    } else {
                        "shares every key".to_owned()
                    };
                    option(kind, id, why, "candidate")
                })
                .collect();
            for n in x.near.iter().filter(|n| n.rule == rule.name) {
                let (why, class) = match &n.near {
                    Near::OutsideWindow { by_secs } if *by_secs < 0 => {
                        (format!("every key; {} before the window opens", span_secs(-by_secs)), "outside")
                    }
                    Near::OutsideWindow { by_secs } => {
                        (format!("every key; {} after the window closes", span_secs(*by_secs)), "outside")
                    }
                    Near::SomeKeys { equal, differing } => {
                        let other: Vec<String> = differing
                            .iter()
                            .map(|(k, v)| format!("{k} {}", v.as_deref().unwrap_or("(none)")))
                            .collect();
                        (format!("same {}; other {}", equal.join(", "), other.join(", ")), "partial")
                    }
                    Near::Tie => ("one of the tie".to_owned(), "tie"),
                };
                if let Some(o) = options.iter_mut().find(|o| o.id == n.id && o.kind == kind_name(n.kind)) {
                    if matches!(n.near, Near::Tie) {
                        o.why.push_str("; tied");
                        o.class = "tie";
                    }
                    continue;
                }
                options.push(option(n.kind, &n.id, why, class));
            }
            let decision = match &s.decision {
                Some(Decision::Matched { target, .. }) => format!("matched {target}"),
                Some(Decision::Unmatched { candidates, .. }) => {
                    format!("ambiguous between {}; the cascade stops here", candidates.join(", "))
                }
                None if !applicable => {
                    "not applicable: a key is missing from the event's Metadata; next rule".to_owned()
                }
                None => "no candidate; next rule".to_owned(),
            };
            StepView {
                n: i + 1,
                rule: rule.name.clone(),
                target: if kind == TargetKind::Call { "call" } else { "call group" },
                keys: s
                    .keys
                    .iter()
                    .map(|(p, v)| {
                        (p.clone(), v.as_deref().map_or("(missing)".to_owned(), |v| format!("{v:?}")), v.is_some())
                    })
                    .collect(),
                applicable,
                sharing: s.sharing.len(),
                windowed: s.windowed,
                decision,
                options,
            }
        })
        .collect();
    let result = match x.steps.last().and_then(|s| s.decision.as_ref()) {
        Some(_) => None,
        None if x.attach.is_some() => None,
        None => {
            let any = x.steps.iter().any(|s| s.keys.iter().all(|k| k.1.is_some()));
            Some(if any { "unmatched (no_candidate)" } else { "unmatched (missing_key)" })
        }
    };
    let now = Utc::now();
    let ctx = minijinja::context! {
        title => format!("Event {id}"),
        analyst => analyst.name.as_str(),
        csrf => analyst.csrf.as_str(),
        id,
        ev => minijinja::context! {
            job => e.job.clone(), source => e.source.clone(), session_id => e.session_id.clone(),
            master_id => e.master_id.clone(), event_time => when(e.event_time),
            received_at => when(e.received_at), state => e.state.clone(),
            pending => span(now - e.received_at),
            expires_in => (e.state == "pending").then(|| span(e.received_at + job.pending_for - now)),
            decided_by => e.decided_by.clone(), note => e.note.clone(), run => e.decided_run,
        },
        stored => x.stored,
        attach => x.attach,
        metadata => Serde(&metadata),
        steps => Serde(&steps),
        result,
        look_around_h => x.look_around.num_hours(),
        explain_text => crate::matching::explain::render(&x.steps),
        can_reopen => e.decided_by.is_some(),
        history => Serde(&history),
        next => next.map(event_link),
        prev => prev.map(event_link),
        filter_query,
        msg,
        error,
    };
    Ok(desk.render("event.html", ctx))
}

fn kind_name(kind: TargetKind) -> &'static str {
    if kind == TargetKind::Call { "call" } else { "group" }
}

fn span_secs(s: i64) -> String {
    if s < 120 { format!("{s} s") } else { span(chrono::Duration::seconds(s)) }
}

/// `POST /review/events/{id}`: `action` = attach (to the chosen `to`, or the call/group id
/// typed in `typed`), dismiss (with a `note`) or reopen; through `resolve`, as the analyst. The
/// outcome is left as the session's one-time message for the event page it redirects to.
async fn decide(
    State(desk): State<Desk>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<i64>,
    body: Result<Posted, BodyError>,
) -> Response {
    let f = match form(body, &["csrf", "filters", "action", "to", "typed", "note"]) {
        Ok(f) => f,
        Err(bad) => return bad.into_response(),
    };
    let analyst = match gate_form(&desk, &headers, &uri, &f).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let filters = match Filters::from_query(f.raw("filters")) {
        Ok(filters) => filters,
        Err(bad) => return BadParam::new("filters", bad.to_string()).into_response(),
    };
    let (kind, text) = decision(&desk, &analyst, id, &f).await;
    let flash = Flash { event: id, kind: kind.to_owned(), text };
    if let Err(e) = session::set_flash(&desk.pool, &headers, &flash).await {
        return failed(&e);
    }
    let query = filters.to_query();
    redirect(&if query.is_empty() { format!("/review/events/{id}") } else { format!("/review/events/{id}?{query}") })
}

/// What an analyst's form decided: `("msg", what changed)` or `("error", why nothing did)`.
async fn decision(desk: &Desk, analyst: &Analyst, id: i64, f: &Params) -> (&'static str, String) {
    let refused = |text: &str| ("error", text.to_owned());
    let to = match f.get("action") {
        Some("attach") => match f.get("typed").or_else(|| f.get("to")).map(|t| t.parse::<To>()) {
            Some(Ok(to @ To::Attach(..))) => to,
            Some(Ok(_) | Err(_)) => return refused("type the target as call:ID or group:ID"),
            None => return refused("choose a call or group to attach the event to, or type one"),
        },
        Some("dismiss") => To::Dismiss,
        Some("reopen") => To::Reopen,
        _ => return refused("unknown action"),
    };
    let jobs = match desk.jobs().await {
        Ok(j) => j,
        Err(e) => return ("error", format!("nothing was changed: {}", crate::db::error_line(&e))),
    };
    let job = match inspect::job_of(&desk.pool, id).await {
        Ok(Some(name)) => match jobs.get(&name) {
            Some(job) => job.clone(),
            None => return ("error", format!("no job file is known for job {name}: start serve with --job FILE")),
        },
        Ok(None) => return refused("no such event"),
        Err(e) => return ("error", format!("nothing was changed: {}", crate::db::error_line(&e))),
    };
    let request =
        Request { line: None, event_id: id, to, note: f.get("note").map(str::to_owned), reported_reason: None };
    match resolve::resolve(&desk.pool, &job, &[request], &analyst.name, false).await {
        Ok(done) => {
            let text = done.first().map_or("nothing changed".to_owned(), |r| {
                format!("event {}: {} -> {}", r.event_id, r.before.describe(), r.after.describe())
            });
            ("msg", text)
        }
        Err(e) => match e.downcast_ref::<Refused>() {
            Some(refused) => ("error", refused.problems.join("; ")),
            // A run of the job holding its lock, the database: said on the page, and logged.
            None => {
                tracing::warn!(user = %analyst.name, event = id, error = crate::db::error_line(&e), "review desk: decision failed");
                ("error", format!("nothing was changed: {}", crate::db::error_line(&e)))
            }
        },
    }
}

async fn runs_page(State(desk): State<Desk>, headers: HeaderMap, uri: Uri) -> Response {
    let analyst = match gate(&desk, &headers, &uri).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let q = match query(&uri, &["job"]) {
        Ok(q) => q,
        Err(bad) => return bad.into_response(),
    };
    let job = q.get("job");
    let (runs, jobs) = match (runs::latest(&desk.pool, job).await, queue::jobs(&desk.pool).await) {
        (Ok(r), Ok(j)) => (r, j),
        (Err(e), _) | (_, Err(e)) => return failed(&e),
    };
    let chart = runs::chart(&runs);
    #[derive(Serialize)]
    struct RunView<'r> {
        #[serde(flatten)]
        run: &'r runs::RunRow,
        started: String,
        took: String,
    }
    let rows: Vec<RunView> = runs
        .iter()
        .map(|r| RunView {
            run: r,
            started: when(r.started_at),
            took: r.seconds.map(|s| format!("{s:.1} s")).unwrap_or_default(),
        })
        .collect();
    let ctx = minijinja::context! {
        title => "Runs", analyst => analyst.name.as_str(), csrf => analyst.csrf.as_str(), runs => Serde(&rows), jobs => Serde(&jobs), job,
        chart => Serde(&chart), n => runs.len(),
    };
    desk.render("runs.html", ctx)
}

async fn run_report(State(desk): State<Desk>, headers: HeaderMap, uri: Uri, Path(id): Path<i64>) -> Response {
    let analyst = match gate(&desk, &headers, &uri).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let path = match runs::report_file(&desk.pool, id).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            tracing::info!(user = %analyst.name, run = id, "review desk: no report for this run");
            return (StatusCode::NOT_FOUND, "this run has no report (failed, still running, or pruned)")
                .into_response();
        }
        Err(e) => return failed(&e),
    };
    match tokio::fs::read(&path).await {
        // The report's own policy (its scripts and styles by hash), as its <meta> says.
        Ok(html) => no_store(
            ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
            &HeaderValue::from_str(&crate::report::html::csp()).expect("ASCII"),
        ),
        Err(e) => {
            tracing::warn!(run = id, file = %path.display(), error = %e, "review desk: report not readable");
            (StatusCode::NOT_FOUND, format!("the report of run {id} cannot be read on this server ({e})"))
                .into_response()
        }
    }
}
