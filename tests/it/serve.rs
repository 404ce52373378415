//! The intake API against a real server on loopback, reqwest as the client: tokens, every status
//! code, idempotent retries, bursts, graceful shutdown, and events posted coming out of the next
//! run matched.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use callrecon::cli::ServeArgs;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// The body of the Async Metadata API article's example, byte for byte.
const ARTICLE_EXAMPLE: &str = r#"{"SessionId": "abc123", "EventTime": "2018/10/15T09:00:00.000Z", "Metadata": {"customerDataField1": "someData"}}"#;

fn args() -> ServeArgs {
    ServeArgs::default()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap()
}

/// The router in-process on 127.0.0.1:0, stopped gracefully by [`Server::stop`].
struct Server {
    base: String,
    http: reqwest::Client,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(pool: &PgPool) -> Server {
        Self::start_with(pool, args()).await
    }

    async fn start_with(pool: &PgPool, args: ServeArgs) -> Server {
        let listener = tokio::net::TcpListener::bind(args.listen).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let pool = pool.clone();
        let task = tokio::spawn(async move {
            callrecon::serve::serve(pool, &args, listener, async {
                let _ = stopped.await;
            })
            .await
        });
        Server { base, http: client(), stop, task }
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }

    async fn token(&self, user: &Creds) -> String {
        let resp = self
            .http
            .post(format!("{}/token", self.base))
            .form(&[("grant_type", "client_credentials"), ("client_id", &user.id), ("client_secret", &user.secret)])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// Posts a raw body with an optional bearer token and idempotency key.
    async fn post(&self, token: Option<&str>, key: Option<&str>, body: &str) -> (StatusCode, Value) {
        let (status, _, body) = self.post_full(token, key, body).await;
        (status, body)
    }

    async fn post_full(
        &self,
        token: Option<&str>,
        key: Option<&str>,
        body: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        post_event(&self.http, &self.base, token, key, body.to_owned()).await.unwrap()
    }
}

async fn post_event(
    http: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    key: Option<&str>,
    body: String,
) -> reqwest::Result<(StatusCode, reqwest::header::HeaderMap, Value)> {
    let mut req = http.post(format!("{base}/callevent/v1/outofband/event")).body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: body is not JSON: {text:?}"));
    Ok((status, headers, body))
}

/// Form fields and HTTP Basic credentials of a token request.
type Form<'a> = Vec<(&'a str, &'a str)>;
type Basic<'a> = Option<(&'a str, &'a str)>;

struct Creds {
    id: String,
    secret: String,
}

/// A user made with the library (the CLI has its own test).
async fn user(pool: &PgPool, name: &str, roles: &[&str]) -> Creds {
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    let c = callrecon::users::add(pool, name, &roles).await.unwrap();
    Creds { id: c.client_id, secret: c.client_secret }
}

async fn poster(pool: &PgPool) -> Creds {
    user(pool, "acme", &["AsyncMetaData"]).await
}

async fn queued(pool: &PgPool) -> Vec<(i64, Value)> {
    sqlx::query_as("select id, payload from event_queue order by id").fetch_all(pool).await.unwrap()
}

fn event(session: &str, n: usize) -> String {
    json!({"SessionId": session, "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"n": n}}).to_string()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn users_cli_adds_lists_and_revokes(pool: PgPool) {
    let out = callrecon(&pool, &["users", "add", "acme", "--role", "AsyncMetaData"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).unwrap_or_else(|| panic!("{text}"))
    };
    let (id, secret) = (field("client_id:"), field("client_secret:"));
    assert!(id.starts_with("cr-") && secret.len() >= 40, "{text}");

    // Stored hashed, never in clear.
    let (hash, roles): (String, Vec<String>) =
        sqlx::query_as("select secret_hash, roles from api_users where client_id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains(&secret));
    assert_eq!(roles, ["AsyncMetaData"]);
    assert!(callrecon::users::verify_secret(&secret, &hash));

    let dup = callrecon(&pool, &["users", "add", "acme", "--role", "AsyncMetaData"]).await;
    assert_eq!(dup.status.code(), Some(1));
    assert!(stderr(&dup).contains("already exists"), "{}", stderr(&dup));
    let typo = callrecon(&pool, &["users", "add", "bob", "--role", "AsyncMetadata"]).await;
    assert_eq!(typo.status.code(), Some(2), "clap refuses an unknown role: {}", stderr(&typo));

    let list = stdout(&callrecon(&pool, &["users", "list"]).await);
    let row = list.lines().find(|l| l.starts_with("acme")).unwrap_or_else(|| panic!("{list}"));
    assert!(row.contains(&id) && row.contains("AsyncMetaData") && row.ends_with("active"), "{list}");
    assert!(!list.contains(&secret));

    let revoke = callrecon(&pool, &["users", "revoke", "acme"]).await;
    assert!(revoke.status.success(), "{}", stderr(&revoke));
    let list = stdout(&callrecon(&pool, &["users", "list"]).await);
    assert!(list.lines().any(|l| l.starts_with("acme") && l.contains("revoked")), "{list}");
    let again = callrecon(&pool, &["users", "revoke", "acme"]).await;
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("no active API user named \"acme\""), "{}", stderr(&again));
    // The name is free again.
    assert!(callrecon(&pool, &["users", "add", "acme", "--role", "AsyncMetaData"]).await.status.success());
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn article_example_is_accepted_verbatim_and_queued_as_posted(pool: PgPool) {
    let server = Server::start(&pool).await;
    let user = poster(&pool).await;

    let resp = server
        .http
        .post(format!("{}/token", server.base))
        .form(&[("grant_type", "client_credentials"), ("client_id", &user.id), ("client_secret", &user.secret)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 1799);
    let token = body["access_token"].as_str().unwrap();
    assert!(token.len() >= 43, "{token}");
    // Stored hashed only.
    let stored: Vec<Vec<u8>> =
        sqlx::query_scalar("select token_sha256 from api_tokens").fetch_all(&pool).await.unwrap();
    assert_eq!(stored, [callrecon::users::token_digest(token).to_vec()]);

    let (status, body) = server.post(Some(token), None, ARTICLE_EXAMPLE).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "accepted");
    let q = queued(&pool).await;
    assert_eq!(q.len(), 1);
    assert_eq!(body["id"], q[0].0);
    assert_eq!(q[0].1, serde_json::from_str::<Value>(ARTICLE_EXAMPLE).unwrap());
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn token_endpoint_takes_http_basic_and_refuses_bad_clients(pool: PgPool) {
    let server = Server::start(&pool).await;
    let user = poster(&pool).await;
    let url = format!("{}/token", server.base);

    let resp = server
        .http
        .post(&url)
        .basic_auth(&user.id, Some(&user.secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let token: Value = resp.json().await.unwrap();
    let (status, _) = server.post(token["access_token"].as_str(), None, ARTICLE_EXAMPLE).await;
    assert_eq!(status, StatusCode::OK);

    let wrong = user.secret.chars().rev().collect::<String>();
    let cases: Vec<(Form, Basic, StatusCode, &str)> = vec![
        (
            vec![("grant_type", "client_credentials")],
            Some((&user.id, &wrong)),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            vec![("grant_type", "client_credentials"), ("client_id", &user.id), ("client_secret", &wrong)],
            None,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            vec![("grant_type", "client_credentials"), ("client_id", "cr-nobody"), ("client_secret", &user.secret)],
            None,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (vec![("grant_type", "client_credentials")], None, StatusCode::UNAUTHORIZED, "invalid_client"),
        (
            vec![("grant_type", "password")],
            Some((&user.id, &user.secret)),
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (vec![], Some((&user.id, &user.secret)), StatusCode::BAD_REQUEST, "invalid_request"),
    ];
    for (form, basic, status, error) in cases {
        let mut req = server.http.post(&url).form(&form);
        if let Some((id, secret)) = basic {
            req = req.basic_auth(id, Some(secret));
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), status, "{form:?} {basic:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], error, "{form:?} {basic:?}: {body}");
    }
    assert_eq!(count(&pool, "select count(*) from api_tokens").await, 1);
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn mixed_case_keys_are_accepted(pool: PgPool) {
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;
    for body in [
        r#"{"sessionID": "s1", "eventTime": "2018-10-15T09:00:00Z", "metaData": {"a": 1}}"#,
        r#"{"sessionid": "s2", "EVENTTIME": "2018-10-15 09:00:00.5+02:00", "metadata": {"a": 2}}"#,
        r#"{"EventTime": "2018/10/15T09:00:00", "Metadata": {}}"#,
    ] {
        let (status, resp) = server.post(Some(&token), None, body).await;
        assert_eq!(status, StatusCode::OK, "{body}: {resp}");
    }
    assert_eq!(queued(&pool).await.len(), 3);
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn invalid_events_get_400_naming_the_field(pool: PgPool) {
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;
    let cases = [
        (r#"{"SessionId": "s", "Metadata": {"a": 1}}"#, Value::from("EventTime"), "missing EventTime"),
        (
            r#"{"SessionId": "s", "EventTime": "15/10/2018 09:00", "Metadata": {}}"#,
            "EventTime".into(),
            "expected a date-time",
        ),
        (r#"{"eventTime": "2018-02-30T09:00:00Z", "Metadata": {}}"#, "eventTime".into(), "not a valid date-time"),
        (
            r#"{"EventTime": "2018-10-15T09:00:00Z", "Metadata": "someData"}"#,
            "Metadata".into(),
            "must be a JSON object",
        ),
        (r#"{"EventTime": "2018-10-15T09:00:00Z", "metaData": null}"#, "metaData".into(), "must be a JSON object"),
        (r#"{"EventTime": "2018-10-15T09:00:00Z"}"#, "Metadata".into(), "missing Metadata"),
        (r#"{"EventTime": "2018-10-15T09:00:00Z", "Metadata": {}, "crmCaseId": "C-1"}"#, "crmCaseId".into(), "unknown"),
        (r#"{"SessionId": "abc123", "EventTime": "2018/10/15T09:00:00.000Z", "#, Value::Null, "not JSON"),
        ("SessionId=abc123", Value::Null, "not JSON"),
        ("", Value::Null, "not JSON"),
        (r#"["2018-10-15T09:00:00Z"]"#, Value::Null, "expected a JSON object"),
    ];
    for (body, field, message) in cases {
        let (status, resp) = server.post(Some(&token), None, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {resp}");
        assert_eq!(resp["error"], "invalid_event", "{body}");
        assert_eq!(resp["field"], field, "{body}: {resp}");
        assert!(resp["message"].as_str().unwrap().contains(message), "{body}: {resp} should say {message:?}");
    }
    assert!(queued(&pool).await.is_empty());
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn requests_without_a_valid_token_get_401(pool: PgPool) {
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;
    let url = format!("{}/callevent/v1/outofband/event", server.base);
    let requests = [
        server.http.post(&url).body(ARTICLE_EXAMPLE),
        server.http.post(&url).header("Authorization", "Bearer").body(ARTICLE_EXAMPLE),
        server.http.post(&url).header("Authorization", format!("Basic {token}")).body(ARTICLE_EXAMPLE),
        server.http.post(&url).bearer_auth("not-a-token-we-issued").body(ARTICLE_EXAMPLE),
        server.http.post(&url).bearer_auth(format!("{token}x")).body(ARTICLE_EXAMPLE),
        // The caller is checked before the body: no 400 (or 413) for a stranger.
        server.http.post(&url).body("not json"),
        server.http.post(&url).bearer_auth("not-a-token-we-issued").body("not json"),
    ];
    for req in requests {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer realm="));
        let body: Value = resp.json().await.unwrap();
        assert!(body["message"].is_string(), "{body}");
    }
    assert!(queued(&pool).await.is_empty());
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn expired_token_gets_401(pool: PgPool) {
    let server = Server::start_with(&pool, ServeArgs { token_ttl: Duration::from_secs(90), ..args() }).await;
    let user = poster(&pool).await;
    let resp: Value = server
        .http
        .post(format!("{}/token", server.base))
        .form(&[("grant_type", "client_credentials"), ("client_id", &user.id), ("client_secret", &user.secret)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resp["expires_in"], 89);
    let token = resp["access_token"].as_str().unwrap();
    let (status, _) = server.post(Some(token), None, &event("s", 1)).await;
    assert_eq!(status, StatusCode::OK);
    let lifetime: f64 = sqlx::query_scalar("select extract(epoch from expires_at - issued_at)::float8 from api_tokens")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!((89.0..=90.0).contains(&lifetime), "a token lives --token-ttl: {lifetime}");

    // The token's time runs out (set in the database rather than waited for).
    let expired = sqlx::query(
        "update api_tokens set expires_at = now() - interval '1 second' where token_sha256 = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(token)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(expired.rows_affected(), 1);
    let (status, body) = server.post(Some(token), None, &event("s", 2)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_token");
    assert_eq!(queued(&pool).await.len(), 1);
    // A new token works again.
    let (status, _) = server.post(Some(&server.token(&user).await), None, &event("s", 3)).await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn revoked_user_can_neither_post_nor_get_tokens(pool: PgPool) {
    let server = Server::start(&pool).await;
    let user = poster(&pool).await;
    let token = server.token(&user).await;
    assert_eq!(server.post(Some(&token), None, &event("s", 1)).await.0, StatusCode::OK);

    let out = callrecon(&pool, &["users", "revoke", "acme"]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let (status, body) = server.post(Some(&token), None, &event("s", 2)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let resp = server
        .http
        .post(format!("{}/token", server.base))
        .basic_auth(&user.id, Some(&user.secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(queued(&pool).await.len(), 1);
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn user_without_the_role_gets_403(pool: PgPool) {
    let server = Server::start(&pool).await;
    let reader = user(&pool, "reporting", &[]).await;
    let token = server.token(&reader).await;
    let (status, body) = server.post(Some(&token), None, ARTICLE_EXAMPLE).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "insufficient_scope");
    assert!(body["message"].as_str().unwrap().contains("AsyncMetaData"), "{body}");
    // Not told whether its event would have been valid.
    assert_eq!(server.post(Some(&token), None, "not json").await.0, StatusCode::FORBIDDEN);
    assert!(queued(&pool).await.is_empty());
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn bodies_over_the_limit_get_413(pool: PgPool) {
    let big = json!({"EventTime": "2018-10-15T09:00:00Z", "Metadata": {"blob": "x".repeat(1024 * 1024)}}).to_string();
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;
    let (status, body) = server.post(Some(&token), None, &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"], "payload_too_large");
    // Just under the default limit is fine.
    let fits = json!({"EventTime": "2018-10-15T09:00:00Z", "Metadata": {"blob": "x".repeat(1000 * 1000)}}).to_string();
    assert_eq!(server.post(Some(&token), None, &fits).await.0, StatusCode::OK);
    server.stop().await;

    let small = Server::start_with(&pool, ServeArgs { max_body: 200, ..args() }).await;
    let token = small.token(&poster_named(&pool, "small").await).await;
    let just_over = json!({"EventTime": "2018-10-15T09:00:00Z", "Metadata": {"blob": "x".repeat(200)}}).to_string();
    assert_eq!(small.post(Some(&token), None, &just_over).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(small.post(Some(&token), None, ARTICLE_EXAMPLE).await.0, StatusCode::OK);
    assert_eq!(queued(&pool).await.len(), 2);
    small.stop().await;
}

async fn poster_named(pool: &PgPool, name: &str) -> Creds {
    user(pool, name, &["AsyncMetaData"]).await
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn storage_failure_gets_500_and_stores_nothing(pool: PgPool) {
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;
    // The database refuses every insert into event_queue, as a full disk or a lost primary would.
    sqlx::raw_sql(
        "create function refuse() returns trigger language plpgsql as $$
         begin raise exception 'event_queue is read-only for this test'; end $$;
         create trigger refuse before insert on event_queue for each row execute function refuse();",
    )
    .execute(&pool)
    .await
    .unwrap();

    let (status, body) = server.post(Some(&token), Some("retry-me"), ARTICLE_EXAMPLE).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"], "storage_failed");
    assert!(queued(&pool).await.is_empty());
    // Nothing half-stored: not even the idempotency key.
    assert_eq!(count(&pool, "select count(*) from api_idempotency").await, 0);

    sqlx::raw_sql("drop trigger refuse on event_queue").execute(&pool).await.unwrap();
    let (status, body) = server.post(Some(&token), Some("retry-me"), ARTICLE_EXAMPLE).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(queued(&pool).await.len(), 1);
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn idempotent_retry_stores_once_and_answers_as_the_first_time(pool: PgPool) {
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;

    let (status, headers, first) = server.post_full(Some(&token), Some("evt-0001"), ARTICLE_EXAMPLE).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("idempotent-replayed").is_none());
    let (status, headers, again) = server.post_full(Some(&token), Some("evt-0001"), ARTICLE_EXAMPLE).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, first);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(queued(&pool).await.len(), 1);

    // The same key with another body is a client bug, not a retry.
    let (status, body) = server.post(Some(&token), Some("evt-0001"), &event("other", 1)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["field"], "Idempotency-Key");

    // Retries racing each other: one event, one id for all.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (http, base, token) = (server.http.clone(), server.base.clone(), token.clone());
            tokio::spawn(async move { post_event(&http, &base, Some(&token), Some("evt-0002"), event("s", 2)).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        let (status, _, body) = t.await.unwrap().unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        ids.push(body["id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(queued(&pool).await.len(), 2);

    // Keys are per user: another customer's "evt-0001" is another event.
    let other = server.token(&poster_named(&pool, "globex").await).await;
    let (status, body) = server.post(Some(&other), Some("evt-0001"), ARTICLE_EXAMPLE).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(body["id"], first["id"]);
    assert_eq!(queued(&pool).await.len(), 3);

    let (status, body) = server.post(Some(&token), Some("with space"), ARTICLE_EXAMPLE).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "Idempotency-Key");
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn burst_of_concurrent_requests_every_200_is_queued_and_nothing_else(pool: PgPool) {
    let server = Server::start_with(&pool, ServeArgs { max_batch: 16, ..args() }).await;
    let token = server.token(&poster(&pool).await).await;
    let stranger = server.token(&user(&pool, "stranger", &[]).await).await;
    const CLIENTS: usize = 48;
    const EACH: usize = 25;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (http, base, token, stranger) =
                (server.http.clone(), server.base.clone(), token.clone(), stranger.clone());
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for i in 0..EACH {
                    let n = c * EACH + i;
                    // Every 5th is invalid, every 7th from a user without the role.
                    let body = if n.is_multiple_of(5) {
                        format!(r#"{{"Metadata": {{"n": {n}}}}}"#)
                    } else {
                        event("burst", n)
                    };
                    let token = if n.is_multiple_of(7) { &stranger } else { &token };
                    let (status, _, resp) = post_event(&http, &base, Some(token), None, body).await.unwrap();
                    answers.push((n, status, resp));
                }
                answers
            })
        })
        .collect();
    let mut accepted = Vec::new();
    for t in tasks {
        for (n, status, resp) in t.await.unwrap() {
            let expected = if n.is_multiple_of(7) {
                StatusCode::FORBIDDEN
            } else if n.is_multiple_of(5) {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::OK
            };
            assert_eq!(status, expected, "request {n}: {resp}");
            if status == StatusCode::OK {
                accepted.push((resp["id"].as_i64().unwrap(), n as i64));
            }
        }
    }
    accepted.sort();
    let on_queue: Vec<(i64, i64)> =
        queued(&pool).await.into_iter().map(|(id, p)| (id, p["Metadata"]["n"].as_i64().unwrap())).collect();
    let expected = (0..CLIENTS * EACH).filter(|n| !n.is_multiple_of(5) && !n.is_multiple_of(7)).count();
    assert_eq!(accepted.len(), expected);
    assert_eq!(on_queue, accepted, "every 200 is on the queue under its id, and nothing else is");
    server.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn posted_events_are_matched_by_the_next_run(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).session("abc123").insert(&pool).await;
    Call::new("c2", "2026-11-02T11:00:00Z", Some("2026-11-02T11:05:00Z"))
        .phone("+1 (201) 452-2627", "agent-04")
        .insert(&pool)
        .await;
    let job = TestJob::new(RULES);
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;
    let bodies = [
        ARTICLE_EXAMPLE.to_owned(),
        // No offset: the run reads it in the job's zone (New York, EST on this date): 11:02Z.
        json!({"EventTime": "2026-11-02 06:02:00", "Metadata": {"customerPhone": "2014522627", "agentId": "agent-04", "crm": "X"}})
            .to_string(),
    ];
    for body in &bodies {
        let (status, resp) = server.post(Some(&token), None, body).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
    }
    server.stop().await;

    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.ingested, 2);
    assert_eq!(done.report.summary.matched, 2);
    assert_eq!(done.report.summary.by_rule["session_id"], 1);
    assert_eq!(done.report.summary.by_rule["phone-and-agent"], 1);
    assert_eq!(call_meta(&pool, "c1").await, json!({"customerDataField1": "someData"}));
    assert_eq!(call_meta(&pool, "c2").await, json!({"customerPhone": "2014522627", "agentId": "agent-04", "crm": "X"}));
    assert!(queued(&pool).await.is_empty());
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_event_posted_and_later_exported_in_a_file_is_stored_once(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).session("abc123").insert(&pool).await;
    let job = TestJob::new(RULES);
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;
    let (status, resp) = server.post(Some(&token), None, ARTICLE_EXAMPLE).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    server.stop().await;
    let first = job.run(&pool).await;
    assert_eq!((first.report.summary.ingested, first.report.summary.matched), (1, 1));

    // The CRM's nightly export holds the same event, spelled its own way, and a new one.
    job.drop_file(
        "crm-export.csv",
        "SessionId,EventTime,customerDataField1\nabc123,2018-10-15T09:00:00Z,someData\nabc123,2018-10-15T09:01:00Z,more\n",
    );
    let second = job.run(&pool).await;
    let s = &second.report.summary;
    assert_eq!((s.ingested, s.duplicates, s.matched), (1, 1, 1));
    assert_eq!(s.duplicates_by_source, [("inbox/crm-export.csv".to_owned(), 1)].into());
    assert_eq!(count(&pool, "select count(*) from events").await, 2);
    assert_eq!(count(&pool, "select count(*) from event_history").await, 0, "no decision replaced");
}

/// `callrecon serve` as a process on a free port, its address read from its stdout.
struct Process {
    child: Child,
    base: String,
    /// Kept open: the server may still write to its stdout.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Process {
    async fn start(pool: &PgPool) -> Process {
        let url = database_url(pool).await;
        let mut child = Command::new(env!("CARGO_BIN_EXE_callrecon"))
            .args(["--database-url", &url, "serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("NO_COLOR", "1")
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let base = line.trim().rsplit(' ').next().unwrap().to_owned();
        assert!(base.starts_with("http://127.0.0.1:"), "{line:?}");
        Process { child, base, _stdout: stdout }
    }

    fn terminate(&self) {
        // The shell's own `kill`: no procps needed.
        let status =
            Command::new("sh").args(["-c", "kill -TERM \"$1\"", "sh", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the exit (bounded), returning its status.
    async fn wait(mut self) -> std::process::ExitStatus {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child.kill().unwrap();
        panic!("callrecon serve did not stop within 15 s of SIGTERM");
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn sigterm_answers_every_accepted_request_then_exits_0(pool: PgPool) {
    let server = Process::start(&pool).await;
    let http = client();
    let health = http.get(format!("{}/healthz", server.base)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");

    let user = poster(&pool).await;
    let token = api_token(&http, &server.base, &user.id, &user.secret).await;

    // 32 clients posting until the server goes away; SIGTERM once some have been answered.
    let (first_answers, mut answered) = tokio::sync::mpsc::channel::<()>(1024);
    let tasks: Vec<_> = (0..32)
        .map(|c| {
            let (http, base, token, first_answers) =
                (http.clone(), server.base.clone(), token.clone(), first_answers.clone());
            tokio::spawn(async move {
                let mut ok = Vec::new();
                let mut refused = 0;
                for i in 0..200 {
                    match post_event(&http, &base, Some(&token), None, event("term", c * 1000 + i)).await {
                        Ok((StatusCode::OK, _, body)) => {
                            ok.push(body["id"].as_i64().unwrap());
                            let _ = first_answers.try_send(());
                        }
                        Ok((status, _, body)) => panic!("an accepted request was answered {status}: {body}"),
                        // Not accepted: the listener is closed.
                        Err(_) => refused += 1,
                    }
                    if refused > 0 {
                        break;
                    }
                }
                ok
            })
        })
        .collect();
    drop(first_answers);
    for _ in 0..100 {
        answered.recv().await.unwrap();
    }
    server.terminate();
    let mut accepted = Vec::new();
    for t in tasks {
        accepted.extend(t.await.unwrap());
    }
    let status = server.wait().await;
    assert!(status.success(), "{status:?}");
    accepted.sort();
    let on_queue: Vec<i64> = queued(&pool).await.into_iter().map(|(id, _)| id).collect();
    assert!(accepted.len() >= 100);
    assert_eq!(on_queue, accepted, "every request answered 200 is on the queue, and nothing else");
}

/// Issue 17: a number PostgreSQL's jsonb refuses was answered 500, and so was every request
/// committed in the same batch.
#[sqlx::test(migrator = "MIGRATOR")]
async fn unstorable_values_get_400_naming_the_field(pool: PgPool) {
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;
    let cases = [
        (r#"{"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"x": 1e-20000}}"#, "Metadata", "decimal places"),
        (r#"{"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"x": [1, 1e131072]}}"#, "Metadata", "Metadata.x[1]"),
        (r#"{"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"k\u0000": 1}}"#, "Metadata", "U+0000"),
        (r#"{"SessionId": "s\u0000", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {}}"#, "SessionId", "U+0000"),
        // An unset .NET DateTime and its maximum.
        (r#"{"EventTime": "0001-01-01T00:00:00Z", "Metadata": {}}"#, "EventTime", "outside the accepted range"),
        (r#"{"eventTime": "9999-12-31T23:59:59Z", "Metadata": {}}"#, "eventTime", "outside the accepted range"),
    ];
    for (body, field, message) in cases {
        let (status, answer) = server.post(Some(&token), None, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["field"], field, "{body}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains(message), "{body}: {answer}");
    }
    assert!(queued(&pool).await.is_empty());
    server.stop().await;
}

/// Issue 17: one client re-sending a body the database refuses failed 22% of 63 honest
/// clients' requests (those committed in the same group-commit batch).
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_row_the_database_refuses_fails_only_its_own_request(pool: PgPool) {
    // A body the parser accepts but the database refuses (as a constraint, a full tablespace or
    // a bug of ours might): its row alone must fail.
    sqlx::raw_sql(
        "create function refuse_poison() returns trigger language plpgsql as $$
         begin if new.payload->'Metadata' ? 'poison' then raise exception 'poison row'; end if; return new; end $$;
         create trigger refuse_poison before insert on event_queue for each row execute function refuse_poison();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;
    let poison = r#"{"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"poison": 1}}"#;
    let mut requests = tokio::task::JoinSet::new();
    for round in 0..5 {
        for n in 0..40 {
            let (http, base, token) = (server.http.clone(), server.base.clone(), token.clone());
            requests.spawn(async move {
                let body = if n == 0 { poison.to_owned() } else { event(&format!("s{round}-{n}"), n) };
                (n == 0, post_event(&http, &base, Some(&token), None, body).await.unwrap())
            });
        }
    }
    let (mut honest, mut refused) = (0, 0);
    while let Some(done) = requests.join_next().await {
        let (is_poison, (status, _, body)) = done.unwrap();
        if is_poison {
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
            refused += 1;
        } else {
            assert_eq!(status, StatusCode::OK, "an honest request failed: {body}");
            honest += 1;
        }
    }
    assert_eq!((honest, refused), (195, 5));
    assert_eq!(queued(&pool).await.len(), 195);
    server.stop().await;
}

/// Issue 17: digits were lost on the way (`12345678901234567890123` stored as
/// `12345678901234568000000`, `1.50` as `1.5`).
#[sqlx::test(migrator = "MIGRATOR")]
async fn posted_numbers_reach_the_call_digit_for_digit(pool: PgPool) {
    Call::new("c1", "2026-11-02T09:00:00Z", Some("2026-11-02T11:00:00Z")).session("s1").insert(&pool).await;
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;
    let body = r#"{"SessionId": "s1", "EventTime": "2026-11-02T10:00:00Z",
                  "Metadata": {"acct": 12345678901234567890123, "price": 1.50, "rate": 0.1000, "tiny": 1.5e-7, "big": 1E+2}}"#;
    let (status, answer) = server.post(Some(&token), None, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    server.stop().await;
    TestJob::new(RULES).run(&pool).await;
    let text: String =
        sqlx::query_scalar("select async_metadata::text from calls where id = 'c1'").fetch_one(&pool).await.unwrap();
    assert_eq!(
        text,
        r#"{"big": 100, "acct": 12345678901234567890123, "rate": 0.1000, "tiny": 0.00000015, "price": 1.50}"#
    );
}

/// Posts to the masterCall endpoint, with an optional bearer token and idempotency key.
async fn post_master_call(server: &Server, token: Option<&str>, key: Option<&str>, body: &str) -> (StatusCode, Value) {
    let mut req = server.http.post(format!("{}/callevent/v1/outofband/masterCall", server.base)).body(body.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: body is not JSON: {text:?}")))
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn master_call_endpoint_answers_as_the_event_endpoint_and_requires_master_id(pool: PgPool) {
    add_group(&pool, "grp-7", json!({})).await;
    Call::new("c1", "2026-11-02T10:00:00Z", None).group("grp-7").insert(&pool).await;
    let server = Server::start(&pool).await;
    let token = server.token(&poster(&pool).await).await;
    let body = r#"{"MasterId": "grp-7", "EventTime": "2026/11/02T10:00:00.000Z", "Metadata": {"caseStatus": "open"}}"#;

    // 401 before anything else, then 403 for a user without the role.
    for bad in [None, Some("not-a-token-we-issued")] {
        let (status, resp) = post_master_call(&server, bad, None, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{resp}");
    }
    let reader = server.token(&user(&pool, "reporting", &[]).await).await;
    let (status, resp) = post_master_call(&server, Some(&reader), None, body).await;
    assert_eq!((status, &resp["error"]), (StatusCode::FORBIDDEN, &json!("insufficient_scope")), "{resp}");

    // 400 naming the field: MasterId missing (or blank), both ids, an invalid event.
    let cases = [
        (r#"{"EventTime": "2026-11-02T10:00:00Z", "Metadata": {}}"#, "MasterId", "missing MasterId"),
        (r#"{"MasterId": " ", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {}}"#, "MasterId", "missing MasterId"),
        (r#"{"SessionId": "s1", "Metadata": {}, "EventTime": "2026-11-02T10:00:00Z"}"#, "MasterId", "missing MasterId"),
        (
            r#"{"SessionId": "s1", "masterId": "grp-7", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {}}"#,
            "masterId",
            "`SessionId`",
        ),
        (r#"{"MasterId": 7, "EventTime": "2026-11-02T10:00:00Z", "Metadata": {}}"#, "MasterId", "must be a string"),
        (r#"{"MasterId": "grp-7", "Metadata": {}}"#, "EventTime", "missing EventTime"),
    ];
    for (bad, field, message) in cases {
        let (status, resp) = post_master_call(&server, Some(&token), None, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {resp}");
        assert_eq!((&resp["error"], &resp["field"]), (&json!("invalid_event"), &json!(field)), "{bad}: {resp}");
        assert!(resp["message"].as_str().unwrap().contains(message), "{bad}: {resp} should say {message:?}");
    }
    assert!(queued(&pool).await.is_empty());

    // 200 once queued as posted; a retry with the same key is answered the same, stored once.
    let (status, first) = post_master_call(&server, Some(&token), Some("k-1"), body).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (status, again) = post_master_call(&server, Some(&token), Some("k-1"), body).await;
    assert_eq!((status, &again["id"]), (StatusCode::OK, &first["id"]));
    let on_queue = queued(&pool).await;
    assert_eq!(on_queue.len(), 1);
    assert_eq!(on_queue[0].1, serde_json::from_str::<Value>(body).unwrap());
    // The event endpoint takes a MasterId too (the contract's payloads are the same everywhere).
    let other = r#"{"masterid": "grp-7", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"viaEvent": true}}"#;
    assert_eq!(server.post(Some(&token), None, other).await.0, StatusCode::OK);
    server.stop().await;

    let done = TestJob::new(RULES).run(&pool).await;
    assert_eq!(done.report.summary.by_rule, [("master_id".to_owned(), 2)].into());
    assert_eq!(call_meta(&pool, "c1").await, json!({"caseStatus": "open", "viaEvent": true}));
    assert_eq!(group_meta(&pool, "grp-7").await, json!({"caseStatus": "open", "viaEvent": true}));
}
