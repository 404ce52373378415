//! Whole runs: attach, pending, expiry, idempotence, dry runs, exit codes.

use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

#[sqlx::test(migrator = "MIGRATOR")]
async fn session_id_event_attaches_to_its_call(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).session("abc123").insert(&pool).await;
    Call::new("c2", "2026-11-02T10:00:00Z", None).session("other").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(
        &pool,
        json!({"SessionId": "abc123", "EventTime": "2018/10/15T09:00:00.000Z", "Metadata": {"crmCaseId": "C-77"}}),
    )
    .await;

    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.matched, 1);
    assert_eq!(done.report.summary.by_rule["session_id"], 1);
    assert_eq!(call_meta(&pool, "c1").await, json!({"crmCaseId": "C-77"}));
    assert_eq!(call_meta(&pool, "c2").await, json!({}));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn merge_later_event_time_wins_ties_by_arrival(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).session("s").insert(&pool).await;
    let job = TestJob::new(RULES);
    // Arrives first but is later in time: wins `tier`.
    enqueue(
        &pool,
        json!({"SessionId": "s", "EventTime": "2026-11-02T10:03:00Z", "Metadata": {"tier": "platinum", "a": 1}}),
    )
    .await;
    enqueue(
        &pool,
        json!({"SessionId": "s", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"tier": "gold", "b": 2}}),
    )
    .await;
    // Same time as the first: arrival breaks the tie.
    enqueue(&pool, json!({"SessionId": "s", "EventTime": "2026-11-02T10:03:00Z", "Metadata": {"a": 3}})).await;
    job.run(&pool).await;
    assert_eq!(call_meta(&pool, "c1").await, json!({"tier": "platinum", "a": 3, "b": 2}));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn late_call_attaches_pending_event(pool: PgPool) {
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "late", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"x": 1}})).await;
    let first = job.run(&pool).await;
    assert_eq!(first.report.summary.matched, 0);
    assert_eq!(first.report.unmatched.events.len(), 1);
    assert_eq!(first.report.unmatched.events[0].reason, "unknown_session");

    Call::new("c1", "2026-11-02T09:59:00Z", None).session("late").insert(&pool).await;
    let second = job.run(&pool).await;
    assert_eq!(second.report.summary.ingested, 0);
    assert_eq!(second.report.summary.matched, 1);
    assert!(second.report.unmatched.events.is_empty());
    assert_eq!(call_meta(&pool, "c1").await, json!({"x": 1}));
}

/// A pending event is read back with only the metadata keys rules and group fields name,
/// extracted by PostgreSQL: a key with a quote, a JSON null, an object, a long number and a
/// nested key path must decide and apply as they would have on the event's first run.
#[sqlx::test(migrator = "MIGRATOR")]
async fn pending_event_read_back_keeps_its_key_values_exactly(pool: PgPool) {
    let job = TestJob::new(
        r#"
[[rules]]
name = "quoted-phone"
target = "call"
keys = [ { event = "cust\"phone", call = "ani", normalize = "phone" }, { event = "who.agent", call = "agent_id" } ]
window = { before = "10m", after = "10m" }

[apply]
group_fields = ["tier", "account", "big", "absent"]
"#,
    );
    // Parsed from text: json! would round the long number to an f64.
    let metadata: serde_json::Value = serde_json::from_str(
        r#"{"cust\"phone": "+1 (555) 010-0001", "who": {"agent": "a7", "team": "x"}, "tier": null,
            "account": {"n": [1, 2.5, "é"]}, "big": 123456789012345678901234567890.5, "other": "kept"}"#,
    )
    .unwrap();
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": metadata})).await;
    let first = job.run(&pool).await;
    assert_eq!(first.report.summary.matched, 0);
    assert_eq!(first.report.unmatched.events[0].reason, "no_candidate");

    add_group(&pool, "g1", json!({})).await;
    Call::new("c1", "2026-11-02T09:58:00Z", Some("2026-11-02T10:04:00Z"))
        .phone("5550100001", "a7")
        .group("g1")
        .insert(&pool)
        .await;
    Call::new("c2", "2026-11-02T09:50:00Z", Some("2026-11-02T09:55:00Z")).group("g1").insert(&pool).await;
    let second = job.run(&pool).await;
    assert_eq!(second.report.summary.ingested, 0);
    assert_eq!(second.report.summary.matched, 1, "{:?}", second.report.unmatched.events);
    assert_eq!(call_meta(&pool, "c1").await, metadata);
    let part: serde_json::Value = serde_json::from_str(
        r#"{"tier": null, "account": {"n": [1, 2.5, "é"]}, "big": 123456789012345678901234567890.5}"#,
    )
    .unwrap();
    assert_eq!(group_meta(&pool, "g1").await, part);
    assert_eq!(call_meta(&pool, "c2").await, part);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn unmatched_event_expires_after_pending_for(pool: PgPool) {
    let job = TestJob::new(RULES);
    sqlx::query("insert into event_queue (received_at, payload) values (now() - interval '73 hours', $1), (now() - interval '71 hours', $2)")
        .bind(json!({"SessionId": "old", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {}}))
        .bind(json!({"SessionId": "young", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {}}))
        .execute(&pool)
        .await
        .unwrap();
    let done = job.run(&pool).await;
    let reasons: Vec<(&str, &str, Option<&str>)> = done
        .report
        .unmatched
        .events
        .iter()
        .map(|u| (u.session_id.as_deref().unwrap(), u.reason.as_str(), u.last_reason.as_deref()))
        .collect();
    assert_eq!(reasons, [("old", "expired", Some("unknown_session")), ("young", "unknown_session", None)]);
    assert_eq!(done.report.summary.expired, 1);
    assert_eq!(done.report.summary.by_reason["expired"], 1);

    // An expired event is retried no more, even when its call lands.
    Call::new("c-old", "2026-11-02T10:00:00Z", None).session("old").insert(&pool).await;
    Call::new("c-young", "2026-11-02T10:00:00Z", None).session("young").insert(&pool).await;
    let next = job.run(&pool).await;
    assert_eq!(next.report.summary.matched, 1);
    assert!(next.report.unmatched.events.is_empty(), "expired events are reported only by the run that expired them");
    assert_eq!(count(&pool, "select count(*) from events where state = 'expired'").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn second_run_changes_nothing(pool: PgPool) {
    add_group(&pool, "g1", json!({"caseNumber": "C-1"})).await;
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).session("s1").group("g1").insert(&pool).await;
    Call::new("c2", "2026-11-02T11:00:00Z", Some("2026-11-02T11:05:00Z"))
        .group("g1")
        .phone("+1 555 123 4567", "a7")
        .insert(&pool)
        .await;
    let job = TestJob::new(RULES);
    enqueue(
        &pool,
        json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"accountTier": "gold"}}),
    )
    .await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T11:01:00Z", "Metadata": {"customerPhone": "5551234567", "agentId": "a7", "n": 1}})).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T11:01:00Z", "Metadata": {"crmCaseId": "C-1", "case": "open"}}))
        .await;
    enqueue(&pool, json!({"SessionId": "nowhere", "EventTime": "2026-11-02T11:01:00Z", "Metadata": {}})).await;
    let first = job.run(&pool).await;
    assert_eq!(first.report.summary.matched, 3);
    assert_eq!(
        call_meta(&pool, "c2").await,
        json!({"n": 1, "customerPhone": "5551234567", "agentId": "a7", "accountTier": "gold", "crmCaseId": "C-1", "case": "open"})
    );

    let before = calls_snapshot(&pool).await;
    let groups_before: Vec<(String, String)> =
        sqlx::query_as("select id, xmin::text from call_groups").fetch_all(&pool).await.unwrap();
    let second = job.run(&pool).await;
    assert_eq!(second.report.summary.matched, 0);
    assert_eq!((second.report.summary.calls_updated, second.report.summary.groups_updated), (0, 0));
    assert_eq!(calls_snapshot(&pool).await, before, "no call row was written (same xmin)");
    let groups_after: Vec<(String, String)> =
        sqlx::query_as("select id, xmin::text from call_groups").fetch_all(&pool).await.unwrap();
    assert_eq!(groups_after, groups_before);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn dry_run_changes_no_call_data_and_consumes_nothing(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"a": 1}})).await;
    job.drop_file(
        "f.ndjson",
        "{\"SessionId\": \"s1\", \"EventTime\": \"2026-11-02T10:02:00Z\", \"Metadata\": {\"b\": 2}}\n",
    );
    let before = calls_snapshot(&pool).await;

    let dry = job.dry_run(&pool).await;
    assert!(dry.report.dry_run);
    assert_eq!((dry.report.summary.ingested, dry.report.summary.matched, dry.report.summary.calls_updated), (2, 2, 1));
    assert!(
        dry.dir.join("report.json").exists()
            && dry.dir.join("unmatched.csv").exists()
            && dry.dir.join("report.html").exists()
    );
    assert_eq!(calls_snapshot(&pool).await, before);
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1);
    assert_eq!(count(&pool, "select count(*) from events").await, 0);
    assert!(job.inbox().join("f.ndjson").exists());
    let recorded: bool = sqlx::query_scalar("select dry_run from runs where id = $1")
        .bind(dry.report.run_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(recorded);

    // The real run afterwards does what the dry run showed.
    let real = job.run(&pool).await;
    assert_eq!(real.report.summary, dry.report.summary);
    assert_eq!(call_meta(&pool, "c1").await, json!({"a": 1, "b": 2}));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn job_file_with_an_error_is_refused_before_anything_runs(pool: PgPool) {
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:01:00Z", "Metadata": {}})).await;
    job.edit_file(&[("normalize = \"phone\"", "normalize = \"e164\"")]);

    let out = callrecon(&pool, &["run", "--job", job.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("job.toml:") && err.contains("unknown normaliser \"e164\""), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1);
    assert_eq!(count(&pool, "select count(*) from runs").await, 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn run_command_prints_summary_and_report_path(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"a": 1}})).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:01:00Z", "Metadata": {"nothing": "to match"}})).await;
    let out = callrecon(&pool, &["run", "--job", job.path().to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let words = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(words.contains("ingested 2 events"), "{text}");
    assert!(words.contains("matched 1 session_id 1"), "{text}");
    assert!(words.contains("unmatched 1 missing_key 1"), "{text}");
    let path = text.lines().last().unwrap().strip_prefix("report: ").unwrap();
    assert!(std::path::Path::new(path).exists(), "{path}");

    let list = callrecon(&pool, &["report", "list"]).await;
    assert!(stdout(&list).contains("succeeded"), "{}", stdout(&list));
    let show = callrecon(&pool, &["report", "show", "1", "--format", "json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(json["summary"]["matched"], 1);
    assert_eq!(json["unmatched"][0]["reason"], "missing_key");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn second_run_of_a_job_while_one_holds_the_lock_exits_non_zero(pool: PgPool) {
    let job = TestJob::new(RULES);
    // Hold the job's lock as a running run does.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(callrecon::db::job_lock_key("test"))
        .execute(&mut *holder)
        .await
        .unwrap();
    sqlx::query("insert into runs (job, kind, dry_run) values ('test', 'run', false)").execute(&pool).await.unwrap();
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:01:00Z", "Metadata": {}})).await;

    let out = callrecon(&pool, &["run", "--job", job.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("job test is already running (since "), "{}", stderr(&out));
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1);
    holder.rollback().await.unwrap();
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn unreachable_database_is_a_one_line_error(_pool: PgPool) {
    let job = TestJob::new(RULES);
    let out =
        callrecon_at("postgres://postgres@127.0.0.1:1/none", &["run", "--job", job.path().to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cannot reach PostgreSQL at postgres://postgres@127.0.0.1:1/none"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn json_log_format_writes_one_json_object_per_line(pool: PgPool) {
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:01:00Z", "Metadata": {}})).await;
    let out = callrecon(&pool, &["--log-format", "json", "run", "--job", job.path().to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> =
        stderr(&out).lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect();
    assert!(lines.iter().any(|l| l["fields"]["message"] == "run started" && l["fields"]["run_id"] == 1), "{lines:?}");
    assert!(lines.iter().all(|l| l["level"].is_string() && l["timestamp"].is_string()));
    // The summary for people still goes to stdout.
    assert!(stdout(&out).contains("callrecon: job test, run 1"));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn callrecons_connections_run_without_jit(pool: PgPool) {
    // PostgreSQL's default is on; callrecon's statements are index probes JIT only slows down.
    callrecon::db::set_schemas(callrecon::db::Schemas { own: LEGACY_SCHEMA.into(), platform: "public".into() });
    let ours = callrecon::db::connect(&database_url(&pool).await).await.unwrap();
    let jit: String = sqlx::query_scalar("show jit").fetch_one(&ours).await.unwrap();
    assert_eq!(jit, "off");
}

/// The process turns transparent huge pages off for itself (mimalloc asks for them on what it
/// maps; bench/RESULTS.md, "huge pages": a rematch spent 3.4 s in the kernel against 1.2 s). Read
/// from /proc while a run waits for a server that never answers.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_process_runs_without_transparent_huge_pages() {
    let job = TestJob::new(RULES);
    let (url, held) = silent_server(4);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_callrecon"))
        .args(["--database-url", &url, "--connect-timeout", "10s", "run", "--job", job.path().to_str().unwrap()])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id().unwrap());
    // Set first thing in main; give the process a moment to get there.
    let mut thp = String::new();
    for _ in 0..100 {
        let text = std::fs::read_to_string(&status).unwrap();
        thp = text.lines().find(|l| l.starts_with("THP_enabled:")).expect("a kernel that reports it").to_owned();
        if thp.ends_with('0') {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    child.kill().await.unwrap();
    drop(held);
    assert_eq!(thp.split_whitespace().collect::<Vec<_>>(), ["THP_enabled:", "0"]);
}
