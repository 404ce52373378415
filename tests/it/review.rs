//! The review desk (`/review`): by HTTP, every permission (API tokens and analysts' sessions
//! both ways), CSRF, sign-in, expiry and sign-out, the queue's filters and pages, the near
//! misses; and one analyst's journey in headless Chromium driven through chromedriver
//! (WebDriver): sign in, filter, open an event, attach it to a near miss, reopen, sign out.

use std::collections::BTreeSet;
use std::time::Duration;

use callrecon::cli::{ReviewArgs, ServeArgs};
use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::oneshot;

use crate::helpers::*;

pub(crate) const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// The desk in-process on a free port, with `job`'s file; stopped when dropped.
pub(crate) struct Desk {
    pub(crate) base: String,
    pub(crate) http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Desk {
    pub(crate) async fn start(pool: &PgPool, job: &TestJob, session_ttl: Duration) -> Desk {
        let args = ServeArgs {
            writers: 1,
            review: ReviewArgs { jobs: vec![job.path()], session_ttl, secure_cookies: false },
            ..ServeArgs::default()
        };
        let listener = tokio::net::TcpListener::bind(args.listen).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let pool = pool.clone();
        tokio::spawn(async move {
            callrecon::serve::serve(pool, &args, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap()
        });
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Desk { base, http, _stop: stop }
    }

    pub(crate) async fn get(&self, path: &str, cookie: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(c) = cookie {
            req = req.header(COOKIE, c);
        }
        req.send().await.unwrap()
    }

    pub(crate) async fn post(&self, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.http.post(format!("{}{path}", self.base)).form(form);
        if let Some(c) = cookie {
            req = req.header(COOKIE, c);
        }
        req.send().await.unwrap()
    }

    /// Signs in; the session cookie (`name=value`), or the refusing response's status.
    pub(crate) async fn sign_in(&self, name: &str, secret: &str) -> Result<String, StatusCode> {
        let page = self.get("/review/login", None).await;
        let login_cookie = cookie_of(&page, "callrecon_login").unwrap();
        let csrf = csrf_in(&page.text().await.unwrap());
        let resp = self
            .post(
                "/review/login",
                Some(&login_cookie),
                &[("name", name), ("secret", secret), ("csrf", &csrf), ("next", "/review")],
            )
            .await;
        match resp.status() {
            StatusCode::SEE_OTHER => Ok(cookie_of(&resp, "callrecon_review").expect("a session cookie")),
            status => {
                assert!(cookie_of(&resp, "callrecon_review").is_none(), "no session for a refused sign-in");
                Err(status)
            }
        }
    }

    /// A page's CSRF token for the session `cookie`.
    pub(crate) async fn csrf(&self, cookie: &str) -> String {
        let resp = self.get("/review", Some(cookie)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        csrf_in(&resp.text().await.unwrap())
    }

    /// The ids of the queue's rows at `path`, and the link to the next page.
    pub(crate) async fn queue(&self, path: &str, cookie: &str) -> (Vec<i64>, Option<String>) {
        let resp = self.get(path, Some(cookie)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let html = resp.text().await.unwrap();
        let ids = html.split("<tr data-id=\"").skip(1).map(|s| s[..s.find('"').unwrap()].parse().unwrap()).collect();
        let next = html.split("id=\"next\" href=\"").nth(1).map(|s| unescape(&s[..s.find('"').unwrap()]));
        (ids, next)
    }
}

/// `name=value` of the cookie `name` the response sets (value empty when it deletes it).
pub(crate) fn cookie_of(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

/// An attribute's text as the browser reads it (minijinja escapes `&`, `/`, quotes).
pub(crate) fn unescape(s: &str) -> String {
    s.replace("&#x2f;", "/")
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

pub(crate) fn csrf_in(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + 19;
    html[at..at + html[at..].find('"').unwrap()].to_owned()
}

/// Issue 43: the policy allowed any inline script (`'unsafe-inline'`), so it would not have
/// stopped an injection. Now it names each inline script and style of the page by its sha256,
/// and the page has no inline event handler or style attribute (which hashes cannot allow).
pub(crate) fn assert_only_own_inline_code(html: &str, csp: &str) {
    use base64::Engine as _;
    use sha2::Digest as _;
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(!csp.contains("unsafe"), "{csp}");
    let directive = |name: &str| {
        csp.split(';')
            .map(str::trim)
            .find(|d| d.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {csp}"))
    };
    for (tag, directive) in [("script", directive("script-src")), ("style", directive("style-src"))] {
        let bodies = callrecon::report::html::inline_elements(html, tag);
        for body in bodies {
            let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(body.as_bytes()));
            assert!(directive.contains(&format!("'sha256-{hash}'")), "{tag} {hash} not in {directive}");
        }
        assert_eq!(
            html.matches(&format!("<{tag}")).count(),
            html.matches(&format!("<{tag}>")).count(),
            "{tag} with attributes"
        );
    }
    assert!(!html.contains(" style="), "a style attribute");
    let handler = html.split_whitespace().find(|w| w.starts_with("on") && w.contains("=\""));
    assert_eq!(handler, None, "an inline event handler");
}

pub(crate) async fn analyst(pool: &PgPool, name: &str) -> String {
    callrecon::users::add(pool, name, &["Analyst".to_owned()]).await.unwrap().client_secret
}

/// Calls and events of every kind of unmatched event, after one run: `no_candidate` events with
/// near misses (same phone, other agent; every key, 30 minutes late), an ambiguous tie,
/// `missing_key` and `unknown_session` ones.
pub(crate) struct Backlog {
    pub(crate) job: TestJob,
    /// The event whose phone call `c-near` has, with another agent.
    pub(crate) other_agent: i64,
    /// The event 30 minutes after call `c-late`'s window closed.
    pub(crate) late: i64,
    /// The event tied between `c-t1` and `c-t2`.
    pub(crate) tied: i64,
}

pub(crate) async fn backlog(pool: &PgPool, missing_key: usize) -> Backlog {
    Call::new("c-near", "2026-11-02T14:00:00Z", Some("2026-11-02T14:10:00Z"))
        .phone("5551230000", "a1")
        .insert(pool)
        .await;
    Call::new("c-late", "2026-11-02T14:00:00Z", Some("2026-11-02T14:10:00Z"))
        .phone("5559990000", "a9")
        .insert(pool)
        .await;
    Call::new("c-t1", "2026-11-02T14:00:00Z", Some("2026-11-02T14:15:00Z"))
        .phone("5557770000", "a3")
        .insert(pool)
        .await;
    Call::new("c-t2", "2026-11-02T14:25:00Z", Some("2026-11-02T14:30:00Z"))
        .phone("5557770000", "a3")
        .insert(pool)
        .await;
    let job = TestJob::new(RULES);
    let phone = |p: &str, agent: &str, at: &str| json!({"EventTime": at, "Metadata": {"customerPhone": p, "agentId": agent, "note": "from the CRM"}});
    enqueue(pool, phone("(555) 123-0000", "a2", "2026-11-02T14:05:00Z")).await;
    enqueue(pool, phone("5559990000", "a9", "2026-11-02T14:50:00Z")).await;
    enqueue(pool, phone("5557770000", "a3", "2026-11-02T14:20:00Z")).await;
    for i in 0..missing_key {
        enqueue(pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"i": i}})).await;
    }
    enqueue(pool, json!({"SessionId": "nowhere", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {}})).await;
    job.run(pool).await;
    let id = |sql: &'static str| async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.unwrap() };
    Backlog {
        other_agent: id("select id from events where metadata->>'agentId' = 'a2'").await,
        late: id("select id from events where metadata->>'agentId' = 'a9'").await,
        tied: id("select id from events where metadata->>'agentId' = 'a3'").await,
        job,
    }
}

pub(crate) async fn event_state(pool: &PgPool, id: i64) -> (String, Option<String>, Option<String>) {
    sqlx::query_as("select state, target_id, decided_by from events where id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn review_pages_refuse_api_tokens_and_analysts_cannot_post_events(pool: PgPool) {
    let b = backlog(&pool, 2).await;
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let secret = analyst(&pool, "ana").await;
    let system = callrecon::users::add(&pool, "crm", &["AsyncMetaData".to_owned()]).await.unwrap();

    // No session: to the sign-in page, coming back here afterwards.
    let resp = desk.get("/review/events/1?job=test", None).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[LOCATION], "/review/login?next=%2Freview%2Fevents%2F1%3Fjob%3Dtest");

    // An API token of the AsyncMetaData role opens no page, nor posts a decision.
    let token: Value = desk
        .http
        .post(format!("{}/token", desk.base))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &system.client_id),
            ("client_secret", &system.client_secret),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = format!("Bearer {}", token["access_token"].as_str().unwrap());
    for path in ["/review", "/review/runs", &format!("/review/events/{}", b.other_agent)] {
        let resp = desk.http.get(format!("{}{path}", desk.base)).header("authorization", &bearer).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
    }
    let resp = desk
        .http
        .post(format!("{}/review/events/{}", desk.base, b.other_agent))
        .header("authorization", &bearer)
        .form(&[("action", "attach"), ("to", "call:c-near")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(event_state(&pool, b.other_agent).await.0, "pending");

    // An analyst's session opens the pages and posts no event.
    let session = desk.sign_in("ana", &secret).await.unwrap();
    let page = desk.get("/review", Some(&session)).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert_only_own_inline_code(&page.text().await.unwrap(), &csp);
    let resp = desk
        .http
        .post(format!("{}{}", desk.base, callrecon::serve::EVENT_PATH))
        .header(COOKIE, &session)
        .header("content-type", "application/json")
        .body(r#"{"EventTime": "2026-11-02T10:00:00Z", "Metadata": {}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.text().await.unwrap().contains("ana is signed in to the review desk"));
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 0);

    // Nor do the analyst's client credentials make a token that posts events.
    let resp = desk
        .http
        .post(format!("{}/token", desk.base))
        .form(&[("grant_type", "client_credentials"), ("client_id", "nobody"), ("client_secret", &secret)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn forms_without_the_sessions_csrf_token_are_refused(pool: PgPool) {
    let b = backlog(&pool, 2).await;
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let secret = analyst(&pool, "ana").await;
    let mine = desk.sign_in("ana", &secret).await.unwrap();
    let theirs = desk.sign_in("ana", &secret).await.unwrap();
    let their_csrf = desk.csrf(&theirs).await;
    let path = format!("/review/events/{}", b.other_agent);
    for csrf in ["", "forged", their_csrf.as_str()] {
        let resp = desk.post(&path, Some(&mine), &[("action", "attach"), ("to", "call:c-near"), ("csrf", csrf)]).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "csrf {csrf:?}");
        let resp = desk.post("/review/logout", Some(&mine), &[("csrf", csrf)]).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "csrf {csrf:?}");
    }
    assert_eq!(event_state(&pool, b.other_agent).await, ("pending".to_owned(), None, None));
    assert_eq!(desk.get("/review", Some(&mine)).await.status(), StatusCode::OK, "still signed in");

    // The sign-in form too: without its cookie, or with another form's token.
    let resp = desk.post("/review/login", None, &[("name", "ana"), ("secret", &secret), ("csrf", "x")]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let other_form = desk.get("/review/login", None).await;
    let other_csrf = csrf_in(&other_form.text().await.unwrap());
    let form = desk.get("/review/login", None).await;
    let cookie = cookie_of(&form, "callrecon_login").unwrap();
    let resp =
        desk.post("/review/login", Some(&cookie), &[("name", "ana"), ("secret", &secret), ("csrf", &other_csrf)]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // With the session's own token the decision is made, as the analyst, through resolve.
    let csrf = desk.csrf(&mine).await;
    let resp = desk.post(&path, Some(&mine), &[("action", "attach"), ("to", "call:c-near"), ("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        event_state(&pool, b.other_agent).await,
        ("matched".to_owned(), Some("c-near".to_owned()), Some("ana".to_owned()))
    );
    let history = callrecon(&pool, &["history", &b.other_agent.to_string()]).await;
    assert!(stdout(&history).contains("ana"), "{}", stdout(&history));
}

/// Issue 43 finding 7: the sign-in form's token was sha256 of the cookie's value, which the
/// client chooses, so whoever could plant a cookie for the desk's host could sign a victim into
/// their account. The token is now an HMAC under the installation's key, and a post the browser
/// says comes from another site is refused whatever its token.
#[sqlx::test(migrator = "MIGRATOR")]
async fn the_sign_in_form_is_bound_to_the_server_and_to_the_desks_own_pages(pool: PgPool) {
    use base64::Engine as _;
    use sha2::Digest as _;
    let job = TestJob::new(RULES);
    let desk = Desk::start(&pool, &job, Duration::from_secs(3600)).await;
    let secret = analyst(&pool, "ana").await;
    let sign_in = |cookie: String, csrf: String, headers: Vec<(&'static str, String)>| {
        let mut req = desk.http.post(format!("{}/review/login", desk.base)).header(COOKIE, cookie);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.form(&[("name", "ana"), ("secret", secret.as_str()), ("csrf", csrf.as_str())]).send()
    };

    // A cookie of the attacker's choosing, with the token the old derivation gave it.
    let planted = "attacker-chosen-nonce";
    let mut h = sha2::Sha256::new();
    h.update(b"callrecon review csrf\0");
    h.update(planted.as_bytes());
    let derived = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize());
    let resp = sign_in(format!("callrecon_login={planted}"), derived, vec![]).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // A form of the desk's own, posted from another site.
    let host = desk.base.trim_start_matches("http://").to_owned();
    for header in [("sec-fetch-site", "cross-site".to_owned()), ("origin", "http://evil.example".to_owned())] {
        let form = desk.get("/review/login", None).await;
        let cookie = cookie_of(&form, "callrecon_login").unwrap();
        let csrf = csrf_in(&form.text().await.unwrap());
        let resp = sign_in(cookie, csrf, vec![header.clone()]).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{header:?}");
        assert!(cookie_of(&resp, "callrecon_review").is_none());
    }
    // From its own page, as a browser says it.
    let form = desk.get("/review/login", None).await;
    let cookie = cookie_of(&form, "callrecon_login").unwrap();
    let csrf = csrf_in(&form.text().await.unwrap());
    let headers = vec![("sec-fetch-site", "same-origin".to_owned()), ("origin", format!("http://{host}"))];
    let resp = sign_in(cookie, csrf, headers).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let session = cookie_of(&resp, "callrecon_review").unwrap();
    // A decision form posted from another site is refused too.
    let csrf = desk.csrf(&session).await;
    let resp = desk
        .http
        .post(format!("{}/review/logout", desk.base))
        .header(COOKIE, &session)
        .header("origin", "http://evil.example")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

/// Finding 2, at the desk: a few wrong secrets, then the address waits (429, Retry-After),
/// without a password check; an analyst elsewhere still signs in.
#[sqlx::test(migrator = "MIGRATOR")]
async fn wrong_sign_ins_are_throttled(pool: PgPool) {
    let job = TestJob::new(RULES);
    let desk = Desk::start(&pool, &job, Duration::from_secs(3600)).await;
    let secret = analyst(&pool, "ana").await;
    analyst(&pool, "bo").await;
    let free = callrecon::serve::throttle::FREE;
    for i in 0..free {
        assert_eq!(desk.sign_in("bo", &format!("guess-{i}")).await, Err(StatusCode::UNAUTHORIZED), "guess {i}");
    }
    // The sixth is still checked, then the waits begin (1 s, 2 s, 4 s: a few seconds to look).
    for wait in [1.1, 2.1, 0.0] {
        assert_eq!(desk.sign_in("bo", "guess").await, Err(StatusCode::UNAUTHORIZED));
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
    let form = desk.get("/review/login", None).await;
    let cookie = cookie_of(&form, "callrecon_login").unwrap();
    let csrf = csrf_in(&form.text().await.unwrap());
    let resp =
        desk.post("/review/login", Some(&cookie), &[("name", "ana"), ("secret", &secret), ("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((2..=4).contains(&retry_after), "{retry_after}");
    assert!(resp.text().await.unwrap().contains("Too many wrong secrets for this address"));
    // From another address (its own form).
    let elsewhere = Desk { http: no_redirects_from("127.0.0.2"), base: desk.base.clone(), _stop: oneshot::channel().0 };
    assert_eq!(elsewhere.sign_in("bo", "guess").await, Err(StatusCode::TOO_MANY_REQUESTS), "the name waits too");
    assert!(elsewhere.sign_in("ana", &secret).await.is_ok());
}

fn no_redirects_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Findings 4, 5 and 6: a huge `min_days` or `expiring_hours` overflowed the date arithmetic (a
/// panic, the connection dropped), a NUL in a filter reached PostgreSQL (500), and `?error=` text
/// from the URL was shown in the desk's own error box. Every parameter is now checked: numbers
/// clamped or refused, NUL and invalid UTF-8 refused, unknown ones (`error`, `msg`) refused, each
/// with a 400 naming it.
#[sqlx::test(migrator = "MIGRATOR")]
async fn desk_parameters_are_checked_at_the_edge(pool: PgPool) {
    let b = backlog(&pool, 2).await;
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let session = desk.sign_in("ana", &analyst(&pool, "ana").await).await.unwrap();
    let event = format!("/review/events/{}", b.other_agent);
    for path in [
        "/review?min_days=106751991".to_owned(),
        "/review?expiring_hours=4294967295".to_owned(),
        "/review?min_days=99999999999999999999999999&expiring_hours=0".to_owned(),
        format!("{event}?min_days=106751991&expiring_hours=4294967295"),
    ] {
        assert_eq!(desk.get(&path, Some(&session)).await.status(), StatusCode::OK, "{path}");
    }
    let refused = [
        ("/review?q=%00".to_owned(), "q", "U+0000"),
        ("/review?job=%00".to_owned(), "job", "U+0000"),
        ("/review?reason=a%00".to_owned(), "reason", "U+0000"),
        ("/review?source=%00".to_owned(), "source", "U+0000"),
        ("/review?q=%FF%FE".to_owned(), "q", "UTF-8"),
        ("/review?min_days=lots".to_owned(), "min_days", "whole number"),
        ("/review?expiring_hours=-1".to_owned(), "expiring_hours", "whole number"),
        ("/review?after=-9000000000000000000.1".to_owned(), "after", "place in the queue"),
        ("/review?job=a&job=b".to_owned(), "job", "more than once"),
        ("/review/runs?job=%00".to_owned(), "job", "U+0000"),
        (format!("{event}?q=%00"), "q", "U+0000"),
        (format!("{event}?error=Your+secret+has+expired.+Re-enter+it+at+https://evil.example"), "error", "unknown"),
        (format!("{event}?msg=Done"), "msg", "unknown"),
        ("/review/login?next=%00".to_owned(), "next", "U+0000"),
    ];
    for (path, name, why) in refused {
        let resp = desk.get(&path, Some(&session)).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path}");
        let text = resp.text().await.unwrap();
        assert!(text.contains(&format!("parameter \"{name}\"")) && text.contains(why), "{path}: {text}");
        assert!(!text.contains("Your secret"), "{text}");
    }
    // The issue's link: after signing in, the page it leads to shows no text of the URL's.
    let next = format!("{event}?error=Your+secret+has+expired");
    let login = desk.get(&format!("/review/login?next={}", url_encode(&next)), None).await;
    let cookie = cookie_of(&login, "callrecon_login").unwrap();
    let html = login.text().await.unwrap();
    let csrf = csrf_in(&html);
    let secret = analyst(&pool, "bo").await;
    let resp = desk
        .post("/review/login", Some(&cookie), &[("name", "bo"), ("secret", &secret), ("csrf", &csrf), ("next", &next)])
        .await;
    let to = resp.headers()[LOCATION].to_str().unwrap().to_owned();
    let page = desk.get(&to, Some(&cookie_of(&resp, "callrecon_review").unwrap())).await;
    assert!(!page.text().await.unwrap().contains("Your secret has expired"));

    // Forms too: a NUL in a note is refused naming it, and nothing changes.
    let csrf = desk.csrf(&session).await;
    let resp = desk.post(&event, Some(&session), &[("action", "dismiss"), ("note", "a\0b"), ("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.text().await.unwrap().contains("parameter \"note\""));
    assert_eq!(event_state(&pool, b.other_agent).await.0, "pending");
    let resp = desk.post("/review/login", None, &[("name", "a\0"), ("secret", "x"), ("csrf", "x")]).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A property test over the desk's query parameters: any mix of known and unknown names with
/// hostile values (NUL, invalid UTF-8, huge and negative numbers, cursors out of range, long
/// text) on every page is answered, and never with a 5xx.
#[sqlx::test(migrator = "MIGRATOR")]
async fn no_query_string_makes_the_desk_fail(pool: PgPool) {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree as _;
    let b = backlog(&pool, 2).await;
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let session = desk.sign_in("ana", &analyst(&pool, "ana").await).await.unwrap();
    let name = prop_oneof![
        Just("job"),
        Just("reason"),
        Just("min_days"),
        Just("expiring_hours"),
        Just("source"),
        Just("q"),
        Just("after"),
        Just("before"),
        Just("next"),
        Just("error"),
        Just("%00"),
        Just("%FF"),
    ];
    let value = prop_oneof![
        "[0-9]{0,30}",
        "-[0-9]{1,25}",
        "-?[0-9]{1,20}\\.-?[0-9]{1,20}",
        "(%[0-9A-F]{2}){0,12}",
        "[a-z%+&=.#]{0,12}",
        proptest::collection::vec(any::<char>(), 0..10).prop_map(|c| url_encode(&String::from_iter(c))),
        Just("%00".to_owned()),
        Just("x".repeat(3000)),
        Just("4294967295".to_owned()),
        Just("106751991".to_owned()),
    ];
    let path = prop_oneof![
        Just("/review".to_owned()),
        Just(format!("/review/events/{}", b.other_agent)),
        Just("/review/events/0".to_owned()),
        Just("/review/runs".to_owned()),
        Just("/review/login".to_owned()),
    ];
    let case = (path, proptest::collection::vec((name, value), 0..5));
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let cases: usize = std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(300);
    for _ in 0..cases {
        let (path, params) = case.new_tree(&mut runner).unwrap().current();
        let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let url = format!("{path}?{}", query.join("&"));
        let status = desk.get(&url, Some(&session)).await.status();
        assert!(!status.is_server_error(), "{url}: {status}");
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn wrong_secrets_and_non_analysts_get_no_session(pool: PgPool) {
    let job = TestJob::new(RULES);
    let desk = Desk::start(&pool, &job, Duration::from_secs(3600)).await;
    let secret = analyst(&pool, "ana").await;
    let system = callrecon::users::add(&pool, "crm", &["AsyncMetaData".to_owned()]).await.unwrap();
    assert_eq!(desk.sign_in("ana", "wrong").await, Err(StatusCode::UNAUTHORIZED));
    assert_eq!(desk.sign_in("nobody", &secret).await, Err(StatusCode::UNAUTHORIZED));
    assert_eq!(desk.sign_in("crm", &system.client_secret).await, Err(StatusCode::UNAUTHORIZED));
    assert_eq!(count(&pool, "select count(*) from review_sessions").await, 0);
    assert!(desk.sign_in("ana", &secret).await.is_ok());
    // A revoked analyst's sessions end with it.
    callrecon::users::revoke(&pool, "ana").await.unwrap();
    assert_eq!(count(&pool, "select count(*) from review_sessions").await, 0);
    assert_eq!(desk.sign_in("ana", &secret).await, Err(StatusCode::UNAUTHORIZED));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn sessions_expire_are_stored_hashed_and_end_at_sign_out(pool: PgPool) {
    let job = TestJob::new(RULES);
    let secret = analyst(&pool, "ana").await;
    let short = Desk::start(&pool, &job, Duration::from_secs(90)).await;
    let session = short.sign_in("ana", &secret).await.unwrap();
    assert_eq!(short.get("/review", Some(&session)).await.status(), StatusCode::OK);
    let lifetime: f64 =
        sqlx::query_scalar("select extract(epoch from expires_at - created_at)::float8 from review_sessions")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!((89.0..=90.0).contains(&lifetime), "a session lives as long as the desk says: {lifetime}");
    // The session's time runs out (set in the database rather than waited for).
    let token = session.split_once('=').unwrap().1;
    let expired = sqlx::query(
        "update review_sessions set expires_at = now() - interval '1 second' where token_sha256 = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(token)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(expired.rows_affected(), 1);
    let resp = short.get("/review", Some(&session)).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "expired");
    assert!(resp.headers()[LOCATION].to_str().unwrap().starts_with("/review/login"));

    let desk = Desk::start(&pool, &job, Duration::from_secs(3600)).await;
    let page = desk.get("/review/login", None).await;
    let set = page.headers().get_all(SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert!(
        set.iter().all(|c| c.contains("HttpOnly") && c.contains("SameSite=Strict") && !c.contains("Secure")),
        "{set:?}"
    );
    let session = desk.sign_in("ana", &secret).await.unwrap();
    let token = session.split_once('=').unwrap().1;
    let stored: i64 =
        sqlx::query_scalar("select count(*) from review_sessions where token_sha256 = sha256(convert_to($1, 'UTF8'))")
            .bind(token)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, 1, "the session is stored as its digest");

    let csrf = desk.csrf(&session).await;
    let resp = desk.post("/review/logout", Some(&session), &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(cookie_of(&resp, "callrecon_review").as_deref(), Some("callrecon_review="), "the cookie is cleared");
    assert_eq!(desk.get("/review", Some(&session)).await.status(), StatusCode::SEE_OTHER, "signed out");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_queue_filters_counts_and_pages_every_pending_event_once(pool: PgPool) {
    let b = backlog(&pool, 120).await;
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let session = desk.sign_in("ana", &analyst(&pool, "ana").await).await.unwrap();

    // Every pending event, a page at a time, oldest first, each once.
    let (mut seen, mut next) = desk.queue("/review", &session).await;
    assert_eq!(seen.len(), 50);
    while let Some(link) = next {
        let (ids, n) = desk.queue(&link, &session).await;
        seen.extend(ids);
        next = n;
    }
    let expected: Vec<i64> =
        sqlx::query_scalar("select id from events where state = 'pending' order by received_at, id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(expected.len(), 124);
    assert_eq!(seen, expected);

    let html = desk.get("/review", Some(&session)).await.text().await.unwrap();
    for (reason, n) in [("missing_key", 120), ("no_candidate", 2), ("ambiguous", 1), ("unknown_session", 1)] {
        assert!(
            html.contains(&format!("data-reason=\"{reason}\" href=\"/review?reason={reason}\"><b>{n}</b>")),
            "{reason} {n}"
        );
    }
    let cases: [(&str, Vec<i64>); 7] = [
        ("/review?reason=no_candidate", vec![b.other_agent, b.late]),
        ("/review?reason=ambiguous&job=test", vec![b.tied]),
        ("/review?job=other", vec![]),
        ("/review?q=123-0000", vec![b.other_agent]),
        (&format!("/review?q={}", b.late), vec![b.late]),
        ("/review?q=nowhere&source=queue", vec![expected[123]]),
        ("/review?q=%25&reason=no_candidate", vec![]),
    ];
    for (path, ids) in cases {
        assert_eq!(desk.queue(path, &session).await.0, ids, "{path}");
    }
    // Expiring: pending_for is 72 hours; none expires within a day, all within four.
    assert_eq!(desk.queue("/review?expiring_hours=24", &session).await.0, Vec::<i64>::new());
    assert_eq!(desk.queue("/review?expiring_hours=96&reason=no_candidate", &session).await.0.len(), 2);
    assert_eq!(desk.queue("/review?min_days=1", &session).await.0, Vec::<i64>::new());
    // The previous page of the second is the first.
    let (_, second) = desk.queue("/review", &session).await;
    let html = desk.get(&second.unwrap(), Some(&session)).await.text().await.unwrap();
    let prev = html.split("id=\"prev\" href=\"").nth(1).map(|s| unescape(&s[..s.find('"').unwrap()]));
    assert_eq!(desk.queue(&prev.unwrap(), &session).await.0, expected[..50]);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn event_pages_explain_the_rules_and_list_the_near_misses(pool: PgPool) {
    let b = backlog(&pool, 1).await;
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let session = desk.sign_in("ana", &analyst(&pool, "ana").await).await.unwrap();
    let page = |id: i64| {
        let (desk, session) = (&desk, &session);
        async move {
            let resp = desk.get(&format!("/review/events/{id}"), Some(session)).await;
            assert_eq!(resp.status(), StatusCode::OK);
            resp.text().await.unwrap()
        }
    };
    let html = page(b.other_agent).await;
    assert!(html.contains("key customerPhone = <span class=\"keyhl\">&quot;5551230000&quot;</span>"), "{html}");
    assert!(html.contains("<span class=\"keyhl\">&quot;customerPhone&quot;: &quot;(555) 123-0000&quot;</span>"));
    assert!(html.contains("<span class=\"\">&quot;note&quot;"), "metadata the rules do not read is not highlighted");
    let row = |html: &str, to: &str| {
        let at = html.find(&format!("data-to=\"{to}\"")).unwrap_or_else(|| panic!("{to} is listed"));
        html[at..at + html[at..].find("</tr>").unwrap()].to_owned()
    };
    let near = row(&html, "call:c-near");
    assert!(near.contains("same customerPhone; other agentId a1"), "{near}");
    assert!(near.contains("2026-11-02 14:00:00") && near.contains("5551230000") && near.contains(">a1<"), "{near}");
    assert!(html.contains("result: unmatched (no_candidate)"));

    let html = page(b.late).await;
    assert!(row(&html, "call:c-late").contains("every key; 30 min after the window closes"));

    let html = page(b.tied).await;
    for call in ["call:c-t1", "call:c-t2"] {
        assert!(row(&html, call).contains("in the window, 5 min away; tied"), "{}", row(&html, call));
    }
    assert!(html.contains("ambiguous between c-t1, c-t2"));

    // A typed target that does not exist: refused, nothing changed, said on the page the form
    // redirects to (once: the message is the server's, kept for the session, not in the URL).
    let csrf = desk.csrf(&session).await;
    let path = format!("/review/events/{}", b.tied);
    let resp =
        desk.post(&path, Some(&session), &[("action", "attach"), ("typed", "call:c-none"), ("csrf", &csrf)]).await;
    let back = resp.headers()[LOCATION].to_str().unwrap().to_owned();
    assert_eq!(back, path);
    let message = |html: String, id: &str| {
        html.split(&format!("id=\"{id}\">")).nth(1).map(|s| s[..s.find('<').unwrap()].to_owned())
    };
    let html = desk.get(&back, Some(&session)).await.text().await.unwrap();
    assert!(message(html, "error").unwrap().contains("there is no call c-none"));
    let again = desk.get(&back, Some(&session)).await.text().await.unwrap();
    assert_eq!(message(again, "error"), None, "shown once");
    desk.post(&path, Some(&session), &[("action", "dismiss"), ("note", ""), ("csrf", &csrf)]).await;
    assert!(message(desk.get(&back, Some(&session)).await.text().await.unwrap(), "error").is_some());
    assert_eq!(event_state(&pool, b.tied).await.0, "pending");
    let resp = desk.post(&path, Some(&session), &[("action", "dismiss"), ("note", "test call"), ("csrf", &csrf)]).await;
    // Decided: on to the next event of the queue, saying what was done there.
    let next = resp.headers()[LOCATION].to_str().unwrap().to_owned();
    assert_ne!(next, path);
    let done = message(desk.get(&next, Some(&session)).await.text().await.unwrap(), "msg").unwrap();
    assert!(done.contains("dismissed"), "{done}");
    assert_eq!(event_state(&pool, b.tied).await, ("dismissed".to_owned(), None, Some("ana".to_owned())));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_runs_page_charts_each_run_and_serves_its_report(pool: PgPool) {
    let b = backlog(&pool, 3).await;
    b.job.run(&pool).await;
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let session = desk.sign_in("ana", &analyst(&pool, "ana").await).await.unwrap();
    let page = desk.get("/review/runs", Some(&session)).await;
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    let html = page.text().await.unwrap();
    assert_only_own_inline_code(&html, &csp);
    assert_eq!(html.matches("<g class=\"run\"").count(), 2);
    assert!(html.contains("<tr id=\"run-1\">") && html.contains("href=\"/review/runs/1/report\""));
    // The report is served under its own policy, the one its <meta> states.
    let report = desk.get("/review/runs/1/report", Some(&session)).await;
    assert_eq!(report.status(), StatusCode::OK);
    let csp = report.headers()["content-security-policy"].to_str().unwrap().to_owned();
    let html = report.text().await.unwrap();
    assert!(html.contains("Reconciliation report"));
    let meta = html.split("<meta http-equiv=\"Content-Security-Policy\" content=\"").nth(1).expect("a <meta> policy");
    assert_eq!(unescape(&meta[..meta.find('"').unwrap()]), csp);
    assert_only_own_inline_code(&html, &csp);
    assert_eq!(desk.get("/review/runs/99/report", Some(&session)).await.status(), StatusCode::NOT_FOUND);
}

/// Headless Chromium driven through chromedriver's WebDriver endpoint (plain HTTP + JSON).
pub(crate) struct Browser {
    http: reqwest::Client,
    session: String,
    driver: std::process::Child,
    _profile: tempfile::TempDir,
}

pub(crate) const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    pub(crate) async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let driver = std::process::Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver) runs");
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if http.get(format!("{base}/status")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--window-size=1400,1000",
                     format!("--user-data-dir={}", profile.path().display())]}}}});
        let resp: Value = http.post(format!("{base}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let id = resp["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {resp}"));
        Browser { session: format!("{base}/session/{id}"), http, driver, _profile: profile }
    }

    pub(crate) async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        self.try_call(method, path, body).await.unwrap_or_else(|v| panic!("WebDriver {path}: {v}"))
    }

    /// A WebDriver command, its error returned rather than failed on (an element read while the
    /// page navigates away is "stale": the waits below look again).
    pub(crate) async fn try_call(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value, Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if !body.is_null() {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let v: Value = resp.json().await.unwrap();
        match v["value"].get("error") {
            None => Ok(v["value"].clone()),
            Some(_) => Err(v),
        }
    }

    pub(crate) async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url})).await;
    }

    pub(crate) async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", Value::Null).await.as_str().unwrap().to_owned()
    }

    pub(crate) async fn find_all(&self, css: &str) -> Vec<String> {
        let v = self.call(reqwest::Method::POST, "/elements", json!({"using": "css selector", "value": css})).await;
        v.as_array().unwrap().iter().map(|e| e[ELEMENT].as_str().unwrap().to_owned()).collect()
    }

    /// The first element `css` finds, waiting up to 5 s for it: after a click the next page may
    /// still be loading (`wait_url("/review")` is already true on /review/login).
    pub(crate) async fn find(&self, css: &str) -> String {
        for _ in 0..100 {
            if let Some(first) = self.find_all(css).await.into_iter().next() {
                return first;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no element {css} on {}", self.url().await);
    }

    pub(crate) async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/click"), json!({})).await;
    }

    pub(crate) async fn type_in(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/clear"), json!({})).await;
        self.call(reqwest::Method::POST, &format!("/element/{e}/value"), json!({"text": text})).await;
    }

    pub(crate) async fn text(&self, css: &str) -> String {
        for _ in 0..100 {
            let e = self.find(css).await;
            if let Ok(v) = self.try_call(reqwest::Method::GET, &format!("/element/{e}/text"), Value::Null).await {
                return v.as_str().unwrap().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{css} kept going stale on {}", self.url().await);
    }

    /// Presses keys on the page (the keyboard shortcuts).
    pub(crate) async fn press(&self, keys: &str) {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|c| [json!({"type": "keyDown", "value": c}), json!({"type": "keyUp", "value": c})])
            .collect();
        self.call(
            reqwest::Method::POST,
            "/actions",
            json!({"actions": [{"type": "key", "id": "kb", "actions": actions}]}),
        )
        .await;
    }

    pub(crate) async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine as _;
        let png = self.call(reqwest::Method::GET, "/screenshot", Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// Waits until the element `css` (of the page a form's post redirected to) holds `part`.
    pub(crate) async fn wait_text(&self, css: &str, part: &str) -> String {
        for _ in 0..100 {
            if let Some(e) = self.find_all(css).await.into_iter().next() {
                let text = self.try_call(reqwest::Method::GET, &format!("/element/{e}/text"), Value::Null).await;
                if let Some(t) = text.as_ref().ok().and_then(Value::as_str).filter(|t| t.contains(part)) {
                    return t.to_owned();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {css} saying {part:?} on {}", self.url().await);
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page, returning its value.
    pub(crate) async fn execute(&self, script: &str, args: Value) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": args})).await
    }

    /// Waits until the page's URL contains `part` (after a click that navigates) and the page
    /// has loaded (its scripts listen for keys).
    pub(crate) async fn wait_url(&self, part: &str) -> String {
        for _ in 0..100 {
            let url = self.url().await;
            if url.contains(part) && self.execute("return document.readyState;", json!([])).await == "complete" {
                return url;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the browser never reached {part}: at {}", self.url().await);
    }
}

impl Drop for Browser {
    /// Ends the WebDriver session first, so that chromedriver closes Chromium (killed alone, it
    /// left Chromium's processes running after the tests), then stops chromedriver.
    fn drop(&mut self) {
        use std::io::{Read as _, Write as _};
        let quit = || -> std::io::Result<()> {
            let url = reqwest::Url::parse(&self.session).expect("a session URL");
            let addr = (url.host_str().unwrap_or("127.0.0.1"), url.port().unwrap_or(80));
            let mut stream = std::net::TcpStream::connect(addr)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                stream,
                "DELETE {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                url.path(),
                addr.0,
                addr.1
            )?;
            stream.read_to_end(&mut Vec::new()).map(drop)
        };
        let _ = quit();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_analyst_attaches_an_event_to_a_near_miss_and_reopens_it_in_a_real_browser(pool: PgPool) {
    let b = backlog(&pool, 60).await;
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let secret = analyst(&pool, "ana").await;
    let browser = Browser::start().await;

    browser.go(&format!("{}/review", desk.base)).await;
    browser.wait_url("/review/login").await;
    browser.type_in("#name", "ana").await;
    browser.type_in("#secret", &secret).await;
    browser.click("#sign-in").await;
    browser.wait_url("/review").await;
    assert_eq!(browser.text("#analyst").await, "ana");
    assert_eq!(browser.find_all("#queue tbody tr").await.len(), 50);
    if let Some(dir) = std::env::var_os("CALLRECON_SCREENSHOTS") {
        browser.screenshot(&std::path::Path::new(&dir).join("review-queue.png")).await;
    }

    // Filter: the no_candidate events, then a search within them.
    browser.click("a.tile[data-reason=no_candidate]").await;
    browser.wait_url("reason=no_candidate").await;
    assert_eq!(browser.find_all("#queue tbody tr").await.len(), 2);
    browser.type_in("#f-q", "123-0000").await;
    browser.click("#f-apply").await;
    browser.wait_url("q=123-0000").await;
    let rows = browser.find_all("#queue tbody tr").await;
    assert_eq!(rows.len(), 1);
    // Open it with the keyboard: the first row is selected, Enter opens it.
    browser.press("\u{E007}").await;
    browser.wait_url(&format!("/review/events/{}", b.other_agent)).await;
    if let Some(dir) = std::env::var_os("CALLRECON_SCREENSHOTS") {
        browser.screenshot(&std::path::Path::new(&dir).join("review-event.png")).await;
    }

    // Attach it to the near miss (same phone, other agent): choose it, press `a`.
    browser.click("tr[data-to='call:c-near'] input[type=radio]").await;
    browser.press("a").await;
    // None is left in the filtered queue: back to it, saying what was done.
    browser.wait_text("#msg", "matched call c-near by ana").await;
    assert!(browser.url().await.contains("/review?reason=no_candidate"), "{}", browser.url().await);
    assert!(!browser.url().await.contains("msg"), "the message is the server's, not in the URL");
    let meta = call_meta(&pool, "c-near").await;
    assert_eq!(meta, json!({"customerPhone": "(555) 123-0000", "agentId": "a2", "note": "from the CRM"}));
    assert_eq!(event_state(&pool, b.other_agent).await.2.as_deref(), Some("ana"));
    browser.go(&format!("{}/review/events/{}?reason=no_candidate&q=123-0000", desk.base, b.other_agent)).await;
    assert!(browser.text("#history").await.contains("ana"));

    // Reopen: pending again, the call's metadata gone.
    browser.click("#reopen").await;
    browser.wait_text("#msg", "-> pending").await;
    for _ in 0..100 {
        if event_state(&pool, b.other_agent).await.0 == "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(event_state(&pool, b.other_agent).await, ("pending".to_owned(), None, None));
    assert_eq!(call_meta(&pool, "c-near").await, json!({}));
    let history = callrecon(&pool, &["history", &b.other_agent.to_string()]).await;
    assert_eq!(stdout(&history).lines().filter(|l| l.contains("  ana  ")).count(), 2, "{}", stdout(&history));

    // `j` goes to the next event of the filtered queue: there is none after this one.
    assert!(browser.find_all("#next").await.is_empty());

    // Sign out: the queue asks for a sign-in again.
    browser.click("#sign-out").await;
    browser.wait_url("/review/login").await;
    browser.go(&format!("{}/review", desk.base)).await;
    browser.wait_url("/review/login?next=").await;
    let signed_in: BTreeSet<String> =
        sqlx::query_scalar("select u.name from review_sessions s join api_users u on u.id = s.user_id")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(signed_in.is_empty(), "{signed_in:?}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_analyst_clears_a_backlog_of_mixed_reasons_with_the_keyboard(pool: PgPool) {
    let b = backlog(&pool, 1).await;
    let queue: Vec<(i64, String)> =
        sqlx::query_as("select id, reason from events where state = 'pending' order by received_at, id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let reasons: Vec<&str> = queue.iter().map(|(_, r)| r.as_str()).collect();
    assert_eq!(reasons, ["no_candidate", "no_candidate", "ambiguous", "missing_key", "unknown_session"]);
    let desk = Desk::start(&pool, &b.job, Duration::from_secs(3600)).await;
    let secret = analyst(&pool, "ana").await;
    let browser = Browser::start().await;
    browser.go(&format!("{}/review/login", desk.base)).await;
    browser.type_in("#name", "ana").await;
    browser.type_in("#secret", &secret).await;
    browser.press("\u{E007}").await;
    browser.wait_url("/review").await;
    browser.find("#queue").await;

    // Enter opens the selected (first) row; then, per event: decide, `j` to the next.
    browser.press("\u{E007}").await;
    for (i, (id, reason)) in queue.iter().enumerate() {
        browser.wait_url(&format!("/review/events/{id}")).await;
        browser.find("#decide").await;
        if reason == "missing_key" || reason == "unknown_session" {
            // Nothing to attach to: `d` goes to the note, Enter dismisses.
            browser.press("d").await;
            browser.press("no keys, a test call\u{E007}").await;
        } else {
            // `1` chooses the first listed (none is chosen for the analyst), `a` attaches.
            browser.press("1a").await;
        }
        // The desk moves on by itself: to the next event, or the queue after the last.
        browser.wait_text("#msg", &format!("event {id}: ")).await;
        if i + 1 == queue.len() {
            browser.wait_url("/review").await;
            browser.find("#empty").await;
        }
    }
    assert_eq!(count(&pool, "select count(*) from events where state = 'pending'").await, 0);
    let decided: Vec<(i64, String, Option<String>, Option<String>)> =
        sqlx::query_as("select id, state, target_id, decided_by from events order by received_at, id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected = [
        ("matched", Some("c-near")),
        ("matched", Some("c-late")),
        ("matched", Some("c-t1")),
        ("dismissed", None),
        ("dismissed", None),
    ];
    for ((id, state, target, by), (s, t)) in decided.iter().zip(expected) {
        assert_eq!((state.as_str(), target.as_deref(), by.as_deref()), (s, t, Some("ana")), "event {id}");
        let history = callrecon(&pool, &["history", &id.to_string()]).await;
        assert!(stdout(&history).lines().any(|l| l.contains("  ana  ")), "{}", stdout(&history));
    }
    assert_eq!(call_meta(&pool, "c-late").await["agentId"], "a9");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_suggestions_page_lists_each_change_with_its_examples_and_the_accept_command(pool: PgPool) {
    let job = crate::suggest::dotted_phones_and_late_callbacks(&pool).await;
    let desk = Desk::start(&pool, &job, Duration::from_secs(3600)).await;
    let session = desk.sign_in("ana", &analyst(&pool, "ana").await).await.unwrap();
    let page = desk.get("/review/jobs/test/suggestions", Some(&session)).await;
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    let html = page.text().await.unwrap();
    assert_only_own_inline_code(&html, &csp);
    let found = callrecon::suggest::suggest(&pool, &job.job, Default::default(), 3).await.unwrap();
    assert!(!found.suggestions.is_empty());
    for s in &found.suggestions {
        assert!(html.contains(&format!("<div class=\"panel suggestion\" id=\"{}\">", s.id)), "{html}");
        let accept = format!("callrecon suggest --job {} --accept {} --write", job.path().display(), s.id);
        assert!(unescape(&html).contains(&accept), "{accept} in {html}");
        for id in &s.simulated.examples.matched_more {
            assert!(html.contains(&format!("href=\"/review/events/{id}\"")), "{html}");
        }
    }
    assert_eq!(desk.get("/review/jobs/nope/suggestions", Some(&session)).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(desk.get("/review/jobs/test/suggestions?x=1", Some(&session)).await.status(), StatusCode::BAD_REQUEST);
    // Without a session: to the sign-in page.
    assert_eq!(desk.get("/review/jobs/test/suggestions", None).await.status(), StatusCode::SEE_OTHER);
}
