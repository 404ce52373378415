//! The report analysts work from and the run history.

use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

#[sqlx::test(migrator = "MIGRATOR")]
async fn failed_run_is_recorded_with_its_error_and_changes_nothing(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"a": 1}})).await;
    job.drop_file(
        "f.ndjson",
        "{\"SessionId\": \"s1\", \"EventTime\": \"2026-11-02T10:02:00Z\", \"Metadata\": {\"b\": 2}}\n",
    );
    // The platform refuses writes to calls mid-apply.
    sqlx::query(
        "create function refuse() returns trigger language plpgsql as
         $$ begin raise exception 'calls are read-only during maintenance'; end $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("create trigger refuse before update on calls for each row execute function refuse()")
        .execute(&pool)
        .await
        .unwrap();

    let out = callrecon(&pool, &["run", "--job", job.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("calls are read-only during maintenance"), "{}", stderr(&out));
    assert_eq!(call_meta(&pool, "c1").await, json!({}));
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1, "the queued event is still there");
    assert_eq!(count(&pool, "select count(*) from events").await, 0);
    assert!(job.inbox().join("f.ndjson").exists(), "the file is still in the inbox");

    let list = stdout(&callrecon(&pool, &["report", "list"]).await);
    assert!(list.contains("failed: updating calls.async_metadata: "), "{list}");
    assert!(list.contains("calls are read-only during maintenance"), "{list}");
    let show = callrecon(&pool, &["report", "show", "1"]).await;
    assert!(!show.status.success());
    assert!(stderr(&show).contains("run 1 has no report (failed: "), "{}", stderr(&show));

    // Once the platform allows writes again, the next run does the work.
    sqlx::query("drop trigger refuse on calls").execute(&pool).await.unwrap();
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.ingested, 2);
    assert_eq!(call_meta(&pool, "c1").await, json!({"a": 1, "b": 2}));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn unmatched_csv_parses_back_with_metadata_columns_and_formula_escaping(pool: PgPool) {
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:01:00Z", "Metadata": {"note": "=HYPERLINK(\"http://x\")", "crmCaseId": "C-9", "n": 3}})).await;
    enqueue(
        &pool,
        json!({"EventTime": "2026-11-02T10:02:00Z", "Metadata": {"note": "+1 555", "other": "é, \"quoted\"\nline"}}),
    )
    .await;
    let done = job.run(&pool).await;
    let mut reader = csv::Reader::from_path(done.dir.join("unmatched.csv")).unwrap();
    let headers: Vec<String> = reader.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(
        headers,
        [
            "event_id",
            "resolve_to",
            "note",
            "source",
            "session_id",
            "master_id",
            "event_time",
            "received_at",
            "expires_at",
            "reason",
            "last_reason",
            "candidates",
            "metadata",
            "crmCaseId",
            "n",
            "metadata.note",
            "other"
        ]
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2);
    let col = |row: &csv::StringRecord, name: &str| row[headers.iter().position(|h| h == name).unwrap()].to_owned();
    assert_eq!(col(&rows[0], "reason"), "no_candidate");
    assert_eq!(col(&rows[0], "metadata.note"), "'=HYPERLINK(\"http://x\")");
    assert_eq!(col(&rows[0], "crmCaseId"), "C-9");
    assert_eq!(col(&rows[0], "n"), "3");
    assert_eq!(col(&rows[1], "reason"), "missing_key");
    assert_eq!(col(&rows[1], "metadata.note"), "'+1 555");
    assert_eq!(col(&rows[1], "other"), "é, \"quoted\"\nline");
    let meta: serde_json::Value = serde_json::from_str(&col(&rows[1], "metadata")).unwrap();
    assert_eq!(meta["other"], "é, \"quoted\"\nline");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn report_json_has_the_contract_fields_and_counts(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {}})).await;
    enqueue(&pool, json!({"SessionId": "s9", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"k": "v"}})).await;
    enqueue(&pool, json!({"EventTime": "not a time", "Metadata": {}})).await;
    let done = job.run(&pool).await;
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(done.dir.join("report.json")).unwrap()).unwrap();
    for key in ["run_id", "job", "started_at", "finished_at", "dry_run", "summary", "unmatched", "rejected"] {
        assert!(r.get(key).is_some(), "report.json lacks {key}");
    }
    assert_eq!(r["job"], "test");
    assert_eq!(r["dry_run"], false);
    let s = &r["summary"];
    assert_eq!(
        (s["ingested"].as_u64(), s["rejected"].as_u64(), s["matched"].as_u64(), s["unmatched"].as_u64()),
        (Some(2), Some(1), Some(1), Some(1))
    );
    assert_eq!(s["by_rule"], json!({"session_id": 1}));
    assert_eq!(s["by_reason"], json!({"unknown_session": 1}));
    let u = &r["unmatched"][0];
    for key in ["event_id", "source", "session_id", "event_time", "received_at", "reason", "candidates", "metadata"] {
        assert!(u.get(key).is_some(), "unmatched entry lacks {key}");
    }
    assert_eq!(
        (u["session_id"].as_str(), u["reason"].as_str(), &u["metadata"]),
        (Some("s9"), Some("unknown_session"), &json!({"k": "v"}))
    );
    let rej = &r["rejected"][0];
    assert!(rej["source"].as_str().unwrap().starts_with("queue:"));
    assert!(rej["reason"].as_str().unwrap().contains("EventTime \"not a time\""));
    assert!(rej["raw"].as_str().unwrap().contains("not a time"));
}

/// A tiny HTTP server on loopback answering every request with `status`; returns its URL and the
/// request bodies it received.
async fn http_server(status: u16) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/callrecon", listener.local_addr().unwrap());
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then as many body bytes as Content-Length says.
            let body = loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break String::new();
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    }
                }
            };
            seen.lock().unwrap().push(body);
            let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = sock.write_all(reply.as_bytes()).await;
        }
    });
    (url, bodies)
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn webhook_receives_the_run_summary(pool: PgPool) {
    let (url, bodies) = http_server(200).await;
    let job = webhook_job(&url);
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {}})).await;
    let done = job.run(&pool).await;
    let got = bodies.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let body: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(body["run_id"], done.report.run_id.to_string().as_str());
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["summary"]["matched"], 1);
    let note: Option<String> = sqlx::query_scalar("select notification from runs").fetch_one(&pool).await.unwrap();
    assert_eq!(note.as_deref(), Some("delivered"));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn failing_webhook_is_retried_recorded_and_never_fails_the_run(pool: PgPool) {
    let (url, bodies) = http_server(503).await;
    let job = webhook_job(&url);
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:01:00Z", "Metadata": {}})).await;
    let out = callrecon(&pool, &["run", "--job", job.path().to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("webhook notification failed"), "{}", stderr(&out));
    assert_eq!(bodies.lock().unwrap().len(), 3, "three attempts");
    let (status, note): (String, Option<String>) =
        sqlx::query_as("select status, notification from runs").fetch_one(&pool).await.unwrap();
    assert_eq!(status, "succeeded");
    assert!(note.as_deref().unwrap().contains("503"), "{note:?}");
    assert_eq!(count(&pool, "select count(*) from events").await, 1);
    let list = stdout(&callrecon(&pool, &["report", "list"]).await);
    assert!(list.contains("webhook: "), "{list}");
}

/// A job whose `[report]` section also names a webhook.
fn webhook_job(url: &str) -> TestJob {
    let job = TestJob::new(RULES);
    TestJob {
        job: job.edit(&[("dir = \"reports\"", &format!("dir = \"reports\"\nwebhook = \"{url}\""))]),
        dir: job.dir,
    }
}
