//! The review desk (`/review`, served by `callrecon serve`): analysts sign in and work the
//! unmatched events of every job as a queue, each explained (the rules' view of `explain`, and
//! the near misses), and decided through `resolve` — the same code, locks and history as
//! `callrecon resolve`, recorded under the analyst's name.
//!
//! - `GET /review/login`, `POST /review/login`, `POST /review/logout`: sessions ([`session`]).
//! - `GET /review`: the queue ([`queue`], [`queue_page`]); `GET /review/events/{id}`: one
//!   event ([`event`], which claims it for the analyst: [`claims`]); `POST /review/events/{id}`:
//!   attach, dismiss or reopen it, then on to the next event with an undo ([`decide`]);
//!   `POST /review/bulk`: a decision on many events, confirmed first ([`bulk`]).
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
//! **Architecture invariant:** the desk writes nothing itself but `review_sessions` and
//! `review_claims` (who has an event open): decisions go through `resolve`, and so through the
//! ledger and apply under the job's lock. An API token never opens a page, and a page never takes
//! a bearer token in place of a session.

mod bulk;
mod claims;
mod decide;
mod event;
mod job_files;
pub mod params;
pub mod queue;
mod queue_page;
pub mod runs;
pub mod session;
mod suggestions;

use std::collections::BTreeMap;
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
use sqlx::PgPool;

use super::throttle::{Checks, Throttle};
use crate::cli::ReviewArgs;
use crate::http::{BodyError, Posted};
use crate::job::{self, Job};
use minijinja::value::Serde;
use params::{BadParam, Params};
use queue::Filters;
use session::{Analyst, Flash, LoginKey};

/// How far around an event its page looks for calls sharing its keys: a day is enough to show
/// a near miss outside the window, and keeps the page fast on a busy platform.
const LOOK_AROUND: chrono::Duration = chrono::Duration::days(1);

/// The desk's state, shared by its handlers.
#[derive(Clone)]
pub struct Desk {
    pool: PgPool,
    templates: Arc<minijinja::Environment<'static>>,
    /// Jobs given with `--job`, by name (their files are read again when they change).
    given: Arc<BTreeMap<String, std::path::PathBuf>>,
    /// Job files parsed, each once until it changes.
    job_files: Arc<job_files::JobFiles>,
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
            job_files: Default::default(),
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
            match self.job_files.load(&path) {
                Ok(job) if job.name == name => {
                    jobs.insert(name, Job::clone(&job));
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

const TEMPLATES: [(&str, &str); 8] = [
    ("bulk.html", include_str!("templates/bulk.html")),
    ("layout.html", include_str!("templates/layout.html")),
    ("flash.html", include_str!("templates/flash.html")),
    ("login.html", include_str!("templates/login.html")),
    ("queue.html", include_str!("templates/queue.html")),
    ("event.html", include_str!("templates/event.html")),
    ("runs.html", include_str!("templates/runs.html")),
    ("suggestions.html", include_str!("templates/suggestions.html")),
];

/// The desk's routes.
pub fn router(desk: Desk) -> Router {
    Router::new()
        .route("/review", get(queue_page::queue_page))
        .route("/review/", get(|| async { redirect("/review") }))
        .route("/review/login", get(login_page).post(login))
        .route("/review/logout", post(logout))
        .route("/review/events/{id}", get(event_page).post(decide::decide))
        .route("/review/bulk", post(bulk::bulk))
        .route("/review/runs", get(runs_page))
        .route("/review/runs/{id}/report", get(run_report))
        .route("/review/jobs/{job}/suggestions", get(suggestions::page))
        .with_state(desk)
}

/// Forgets expired sessions (the API's hourly housekeeping).
pub async fn housekeeping(pool: &PgPool) -> Result<u64> {
    Ok(session::forget_expired(pool).await? + claims::forget_expired(pool).await?)
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
    form_lists(body, known, &[])
}

/// [`form`] where the fields `lists` may be given many times ([`Params::list`]).
fn form_lists(body: Result<Posted, BodyError>, known: &[&str], lists: &[&str]) -> Result<Params, BadForm> {
    let Posted(body) = body.map_err(BadForm::Body)?;
    Params::parse_lists(&body, known, lists).map_err(BadForm::Param)
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
    match event::view(&desk, &analyst, id, filters, flash).await {
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
        .map(|r| RunView { run: r, started: when(r.started_at), took: r.seconds.map(runs::took).unwrap_or_default() })
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
