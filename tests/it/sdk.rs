//! The platform's own .NET SDK (CollabIP `Tethr.sdk-dotnet`: `TethrSession`, `TethrAsyncMetadata`)
//! against the intake API, its requests replayed byte for byte over a raw TCP connection as its
//! source builds them:
//! - `GetClientCredentialsAsync`: `POST /Token`, a `FormUrlEncodedContent` of `grant_type`,
//!   `client_secret`, `client_id` (in that order); it wants `token_type` `bearer` and an
//!   `expires_in` over 45 s (a token is renewed 45 s before it expires);
//! - `PostAsync`: `POST /callEvent/v1/outofband/event`, `…/masterCall`, `…/case`, a `StreamContent`
//!   of System.Text.Json with camelCase names and nulls left out (`TethrModelSerializerContext`),
//!   `Content-Type: application/json`, the bearer token; any status but 2xx throws;
//! - `HttpClient`'s defaults: the `User-Agent` it builds (`TethrAudioBroker/{version}
//!   ({Environment.OSVersion}) DotNet-CLR/{Environment.Version}`), no `Accept`, keep-alive, and
//!   `DateTime` written as .NET writes it (7-digit ticks, `Z` for UTC, no offset for an unspecified
//!   kind, the local offset).

use std::time::Duration;

use callrecon::cli::ServeArgs;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// `HttpClient.DefaultRequestHeaders.UserAgent` as `TethrSession.CreateHttpClient` sets it, on
/// .NET 8 on Windows Server.
const USER_AGENT: &str = "TethrAudioBroker/1.0.0.0 (Microsoft Windows NT 10.0.20348.0) DotNet-CLR/8.0.8";

/// `FormUrlEncodedContent`'s encoding: `Uri.EscapeDataString`, then `%20` as `+`.
fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A request as `SocketsHttpHandler` writes it: the request line, `Host`, the request's own headers
/// (`Authorization`), then the client's defaults (`User-Agent`), then the content's headers.
fn request(host: &str, path: &str, bearer: Option<&str>, content_type: &str, body: &str) -> Vec<u8> {
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n");
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str(&format!(
        "User-Agent: {USER_AGENT}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    head.into_bytes()
}

/// One keep-alive connection, as `HttpClient` reuses it.
struct Sdk {
    host: String,
    conn: BufReader<TcpStream>,
}

/// A response: status, `Content-Type`, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: Value,
}

impl Sdk {
    async fn connect(addr: std::net::SocketAddr) -> Sdk {
        Sdk { host: addr.to_string(), conn: BufReader::new(TcpStream::connect(addr).await.unwrap()) }
    }

    async fn send(&mut self, path: &str, bearer: Option<&str>, content_type: &str, body: &str) -> Answer {
        let bytes = request(&self.host, path, bearer, content_type, body);
        tokio::time::timeout(Duration::from_secs(30), self.exchange(&bytes)).await.expect("an answer within 30 s")
    }

    async fn exchange(&mut self, bytes: &[u8]) -> Answer {
        self.conn.get_mut().write_all(bytes).await.unwrap();
        let mut line = String::new();
        self.conn.read_line(&mut line).await.unwrap();
        let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{line:?}"));
        let (mut length, mut content_type) = (0, String::new());
        loop {
            line.clear();
            self.conn.read_line(&mut line).await.unwrap();
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "content-type" => content_type = value.trim().to_owned(),
                "transfer-encoding" => panic!("a chunked answer: {header}"),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        self.conn.read_exact(&mut body).await.unwrap();
        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Answer { status, content_type, body }
    }

    /// `GetClientCredentialsAsync`.
    async fn token(&mut self, path: &str, client_id: &str, secret: &str) -> Answer {
        let form = format!(
            "grant_type=client_credentials&client_secret={}&client_id={}",
            form_encode(secret),
            form_encode(client_id)
        );
        self.send(path, None, "application/x-www-form-urlencoded", &form).await
    }

    /// `PostAsync` with a JSON body.
    async fn post(&mut self, path: &str, token: &str, json: &str) -> Answer {
        self.send(path, Some(token), "application/json", json).await
    }
}

/// 200 with a JSON body, as `EnsureSuccessStatusCode` and the SDK's readers want.
fn assert_accepted(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 200, "{what}: {answer:?}");
    assert!(answer.content_type.starts_with("application/json"), "{what}: {answer:?}");
    assert_eq!(answer.body["status"], "accepted", "{what}: {answer:?}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_platforms_sdk_works_unchanged(pool: PgPool) {
    let user = callrecon::users::add(&pool, "acme", &["AsyncMetaData".to_owned()]).await.unwrap();
    // Characters FormUrlEncodedContent escapes, in a client id the SDK is configured with.
    assert!(user.client_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)), "{}", user.client_id);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let args = ServeArgs { listen: addr, max_batch: 64, writers: 1, ..ServeArgs::default() };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = pool.clone();
    let server = tokio::spawn(async move {
        callrecon::serve::serve(served, &args, listener, async {
            let _ = stopped.await;
        })
        .await
    });
    let mut sdk = Sdk::connect(addr).await;

    // The token, from `/Token` as the SDK spells it.
    let answer = sdk.token("/Token", &user.client_id, &user.client_secret).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.content_type.starts_with("application/json"), "{answer:?}");
    assert_eq!(answer.body["token_type"], "bearer", "the SDK accepts only \"bearer\": {answer:?}");
    assert!(answer.body["expires_in"].as_i64().unwrap() > 45, "{answer:?}");
    let token = answer.body["access_token"].as_str().unwrap().to_owned();
    let wrong = sdk.token("/Token", &user.client_id, "not-the-secret").await;
    assert_eq!(wrong.status, 401, "{wrong:?}");

    // SessionInteractionMetadata, its EventTime a DateTime of each kind .NET writes.
    let events = [
        r#"{"sessionId":"s-1","eventTime":"2018-10-15T09:00:00.1234567Z","metadata":{"crmCaseId":"C-77"}}"#,
        r#"{"sessionId":"s-1","eventTime":"2018-10-15T09:00:01","metadata":{"agentNote":"unspecified kind"}}"#,
        r#"{"sessionId":"s-1","eventTime":"2018-10-15T11:00:02.19+02:00","metadata":{"disposition":"sale"}}"#,
    ];
    for body in events {
        assert_accepted(&sdk.post("/callEvent/v1/outofband/event", &token, body).await, body);
    }
    // MasterInteractionMetadata: `masterCallId`.
    let master = r#"{"masterCallId":"grp-7","eventTime":"2018-10-15T09:00:00Z","metadata":{"accountTier":"gold"}}"#;
    assert_accepted(&sdk.post("/callEvent/v1/outofband/masterCall", &token, master).await, master);
    // Its MasterCallId left null, so left out: 400 with a body naming the field.
    let no_master = r#"{"eventTime":"2018-10-15T09:00:00Z","metadata":{"accountTier":"gold"}}"#;
    let refused = sdk.post("/callEvent/v1/outofband/masterCall", &token, no_master).await;
    assert_eq!((refused.status, &refused.body["field"]), (400, &json!("MasterId")), "{refused:?}");
    assert!(refused.content_type.starts_with("application/json") && refused.body["message"].is_string());
    // CaseInteractionMetadata: not handled here, said in JSON, with the endpoints that are.
    let case = r#"{"caseReferenceId":"CASE-1","eventTime":"2018-10-15T09:00:00Z","metadata":{"a":1}}"#;
    let answer = sdk.post("/callEvent/v1/outofband/case", &token, case).await;
    assert_eq!(answer.status, 404, "{answer:?}");
    assert!(answer.content_type.starts_with("application/json"), "{answer:?}");
    assert!(answer.body["message"].as_str().unwrap().contains("cases are not handled here"), "{answer:?}");
    let endpoints = answer.body["endpoints"].to_string();
    for path in ["/token", "/callevent/v1/outofband/event", "/callevent/v1/outofband/masterCall"] {
        assert!(endpoints.contains(path), "{path} in {endpoints}");
    }

    // Any casing of the API's paths; the seed's lower-case ones too.
    assert_eq!(sdk.token("/TOKEN", &user.client_id, &user.client_secret).await.status, 200);
    assert_eq!(sdk.token("/token", &user.client_id, &user.client_secret).await.status, 200);
    let again = r#"{"sessionId":"s-2","eventTime":"2018-10-15T09:00:00Z","metadata":{"n":1}}"#;
    assert_accepted(&sdk.post("/callevent/v1/outofband/event", &token, again).await, "seed's path");
    assert_accepted(&sdk.post("/CALLEVENT/V1/OUTOFBAND/EVENT", &token, again).await, "upper case");
    assert_accepted(&sdk.post("/callevent/v1/outofband/mastercall", &token, master).await, "lower-case masterCall");
    assert_eq!(sdk.post("/CallEvent/v1/OutOfBand/Case", &token, case).await.status, 404);
    // Other routes keep their case: the review desk's.
    assert_eq!(sdk.send("/REVIEW/login", None, "application/x-www-form-urlencoded", "").await.status, 404);
    drop(sdk);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();

    // What the SDK posted comes out of the next run as it meant it: the times as written (the
    // unspecified kind in the job's time zone), the master call's fields on its group's calls.
    add_group(&pool, "grp-7", json!({})).await;
    Call::new("c1", "2018-10-15T08:55:00Z", Some("2018-10-15T15:30:00Z"))
        .session("s-1")
        .group("grp-7")
        .insert(&pool)
        .await;
    let job = TestJob::new(RULES);
    let done = job.run(&pool).await;
    let summary = &done.report.summary;
    assert_eq!(summary.by_rule.get("session_id"), Some(&3), "{summary:?}");
    assert!(summary.by_rule.get("master_id").is_some_and(|n| *n >= 1), "{summary:?}");
    let times: Vec<String> = sqlx::query_scalar(
        "select to_char(event_time at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS') from events
         where session_id = 's-1' order by event_time",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    // 09:00:01 in America/New_York is 13:00:01Z.
    assert_eq!(times, ["2018-10-15T09:00:00.123", "2018-10-15T09:00:02.190", "2018-10-15T13:00:01.000"]);
    assert_eq!(
        call_meta(&pool, "c1").await,
        json!({"crmCaseId": "C-77", "agentNote": "unspecified kind", "disposition": "sale", "accountTier": "gold"})
    );
}
