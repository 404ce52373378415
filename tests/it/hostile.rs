//! Issue 17: no record can stop a run, no value is altered, no wait is unbounded. Records a
//! hostile producer or a buggy one sends, a database that stops answering or drops the run's
//! connection at each stage.

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// `(source, reason)` of a run's rejected records.
fn rejected(done: &callrecon::run::Finished) -> Vec<(String, String)> {
    done.report.rejected.iter().map(|r| (r.source.clone(), r.reason.clone())).collect()
}

fn assert_rejected(done: &callrecon::run::Finished, expected: &[(&str, &str)]) {
    let got = rejected(done);
    assert_eq!(got.len(), expected.len(), "{got:#?}");
    for ((source, reason), (want_source, want_reason)) in got.iter().zip(expected) {
        assert_eq!(source, want_source, "{got:#?}");
        assert!(reason.contains(want_reason), "{source}: {reason:?} should say {want_reason:?}");
    }
}

/// Issue 17, 1: an EventTime of an unset .NET DateTime (or its maximum) failed every run
/// (`reading calls: date/time field value out of range`), and so did a `\u0000` in an inbox
/// file (`storing events: unsupported Unicode escape sequence`).
#[sqlx::test(migrator = "MIGRATOR")]
async fn poison_records_are_rejected_and_every_run_goes_on(pool: PgPool) {
    Call::new("c1", "2026-11-02T09:00:00Z", Some("2026-11-02T11:00:00Z")).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"EventTime": "0001-01-01T00:00:00Z", "Metadata": {"customerPhone": "1"}})).await;
    enqueue(&pool, json!({"EventTime": "9999-12-31T23:59:59Z", "Metadata": {"customerPhone": "1"}})).await;
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "0001-01-01T00:00:00", "Metadata": {}})).await;
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"q": 1}})).await;
    let ids: Vec<i64> = sqlx::query_scalar("select id from event_queue order by id").fetch_all(&pool).await.unwrap();
    job.drop_file(
        "a.ndjson",
        concat!(
            r#"{"SessionId": "s1", "EventTime": "2026-11-02T10:00:01Z", "Metadata": {"n": 1}}"#,
            "\n",
            r#"{"SessionId": "s1", "EventTime": "2026-11-02T10:00:02Z", "Metadata": {"v": "a\u0000b"}}"#,
            "\n",
            r#"{"SessionId": "s1", "EventTime": "2026-11-02T10:00:02Z", "Metadata": {"k\u0000": 1}}"#,
            "\n",
            r#"{"SessionId": "s\u0000", "EventTime": "2026-11-02T10:00:02Z", "Metadata": {}}"#,
            "\n",
            r#"{"SessionId": "s1", "EventTime": "2026-11-02T10:00:02Z", "Metadata": {"x": 1e-20000}}"#,
            "\n",
            r#"{"SessionId": "s1", "EventTime": "2026-11-02T10:00:03Z", "Metadata": {"n": 2}}"#,
            "\n",
        ),
    );
    job.drop_file(
        "b.json",
        "[\n{\"SessionId\": \"s1\", \"EventTime\": \"2026-11-02T10:00:04Z\", \"Metadata\": {\"deep\": [{\"x\": \"\\u0000\"}]}},\n\
         {\"SessionId\": \"s1\", \"EventTime\": \"2026-11-02T10:00:05Z\", \"Metadata\": {\"j\": 1}}\n]",
    );
    job.drop_file("c.csv", "SessionId,EventTime,note\ns1,2026-11-02T10:00:06Z,fine\ns1,2026-11-02T10:00:07Z,a\0b\n");

    let done = job.run(&pool).await;
    let q = |i: usize| format!("queue:{}", ids[i]);
    assert_rejected(
        &done,
        &[
            (&q(0), "outside the accepted range"),
            (&q(1), "outside the accepted range"),
            (&q(2), "outside the accepted range"),
            ("inbox/a.ndjson:2", "Metadata.v contains the character U+0000"),
            ("inbox/a.ndjson:3", "U+0000"),
            ("inbox/a.ndjson:4", "`SessionId` contains the character U+0000"),
            ("inbox/a.ndjson:5", "Metadata.x: the number 1e-20000 has 20000 decimal places"),
            ("inbox/b.json:2", "Metadata.deep[0].x contains the character U+0000"),
            ("inbox/c.csv:3", "Metadata.note contains the character U+0000"),
        ],
    );
    assert_eq!(done.report.summary.ingested, 5);
    assert_eq!(call_meta(&pool, "c1").await, json!({"q": 1, "n": 2, "j": 1, "note": "fine"}));
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 0);
    // The next run is not stopped either.
    enqueue(&pool, json!({"EventTime": "0001-01-01T00:00:00Z", "Metadata": {}})).await;
    assert_eq!(job.run(&pool).await.report.summary.rejected, 1);
}

/// Issue 17, 3: Metadata must come out exactly as it went in: `12345678901234567890123` was
/// stored as `12345678901234568000000`, `1.50` as `1.5`, from the queue and from files.
#[sqlx::test(migrator = "MIGRATOR")]
async fn numbers_keep_their_digits_from_every_source(pool: PgPool) {
    Call::new("c1", "2026-11-02T09:00:00Z", Some("2026-11-02T11:00:00Z")).session("s1").insert(&pool).await;
    Call::new("c2", "2026-11-02T09:00:00Z", Some("2026-11-02T11:00:00Z")).session("s2").insert(&pool).await;
    Call::new("c3", "2026-11-02T09:00:00Z", Some("2026-11-02T11:00:00Z")).session("s3").insert(&pool).await;
    let job = TestJob::new(RULES);
    sqlx::query(
        "insert into event_queue (payload) values ('{\"SessionId\": \"s1\", \"EventTime\": \"2026-11-02T10:00:00Z\",
         \"Metadata\": {\"acct\": 12345678901234567890123, \"price\": 1.50, \"rate\": 0.1000, \"e\": 1.5e-7}}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    job.drop_file(
        "a.ndjson",
        "{\"SessionId\": \"s2\", \"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {\"acct\": 12345678901234567890123, \"price\": 1.50, \"rate\": 0.1000, \"e\": 1.5e-7}}\n",
    );
    job.drop_file(
        "b.csv",
        "SessionId,EventTime,Metadata\ns3,2026-11-02T10:00:00Z,\"{\"\"acct\"\": 12345678901234567890123, \"\"price\"\": 1.50, \"\"rate\"\": 0.1000, \"\"e\"\": 1.5e-7}\"\n",
    );
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.ingested, 3, "{:?}", rejected(&done));
    let expected = r#"{"e": 0.00000015, "acct": 12345678901234567890123, "rate": 0.1000, "price": 1.50}"#;
    for call in ["c1", "c2", "c3"] {
        let text: String = sqlx::query_scalar("select async_metadata::text from calls where id = $1")
            .bind(call)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(text, expected, "{call}");
    }
    let stored: Vec<String> =
        sqlx::query_scalar("select metadata::text from events order by id").fetch_all(&pool).await.unwrap();
    assert!(stored.iter().all(|m| m == expected), "{stored:?}");
    // A second run recomputes nothing differently (no write: the printed values compare equal).
    let before = calls_snapshot(&pool).await;
    job.run(&pool).await;
    assert_eq!(calls_snapshot(&pool).await, before);
}

/// Issue 17, 6: an NDJSON file with one line in Latin-1, or a JSON array followed by trailing
/// garbage, was refused whole and its good records were not ingested.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_bad_line_rejects_that_line_only(pool: PgPool) {
    let job = TestJob::new(RULES);
    let mut ndjson = Vec::new();
    for i in 1..=51 {
        if i == 26 {
            ndjson.extend_from_slice(
                b"{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {\"city\": \"S\xE3o Paulo\"}}\n",
            );
        } else {
            ndjson.extend_from_slice(
                format!("{{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {{\"i\": {i}}}}}\n").as_bytes(),
            );
        }
    }
    std::fs::write(job.inbox().join("latin1.ndjson"), ndjson).unwrap();
    job.drop_file(
        "trailing.json",
        "[\n{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {\"t\": 1}},\n{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {\"t\": 2}}\n]\n\ngarbage after the array\n",
    );
    job.drop_file(
        "broken-element.json",
        "[{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {\"b\": 1}},\n {\"EventTime\": oops, \"Metadata\": {}},\n {\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {\"b\": 3}}]",
    );
    let done = job.run(&pool).await;
    assert_rejected(
        &done,
        &[
            ("inbox/broken-element.json:2", "not valid JSON"),
            ("inbox/latin1.ndjson:26", "not UTF-8 text: byte 0xE3 at line 26, column 62"),
            ("inbox/trailing.json:6", "not valid JSON after the end of the document"),
        ],
    );
    assert_eq!(done.report.summary.ingested, 50 + 2 + 2);
    assert_eq!(
        done.report.rejected[1].raw,
        "{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {\"city\": \"S\u{FFFD}o Paulo\"}}"
    );
    assert_eq!(done.report.rejected[2].raw, "garbage after the array");
    assert!(
        done.report.files.iter().all(|f| f.status == callrecon::report::FileStatus::Ingested),
        "{:?}",
        done.report.files
    );

    // A file that cannot be read at all still goes to archive/failed.
    job.drop_file("not-json.json", "hello, this is not JSON\n");
    job.drop_file("cut-short.json", "[{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {}},\n{\"Event");
    // A file in Latin-1 throughout is "not UTF-8" as the contract means it: refused whole.
    let latin1 = b"{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {\"city\": \"S\xE3o Paulo\"}}\n";
    std::fs::write(job.inbox().join("all-latin1.ndjson"), latin1.repeat(3)).unwrap();
    std::fs::write(job.inbox().join("all-latin1.csv"), b"EventTime,city\n2026-11-02T10:00:00Z,S\xE3o Paulo\n").unwrap();
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.ingested, 0);
    assert_eq!(done.report.summary.files_failed, 4, "{:?}", done.report.files);
    let sources: Vec<&str> = done.report.rejected.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(
        sources,
        ["inbox/all-latin1.csv", "inbox/all-latin1.ndjson", "inbox/cut-short.json", "inbox/not-json.json"]
    );
    let reason = &done.report.rejected[1].reason;
    assert!(reason.contains("nothing in the file can be read (inbox/all-latin1.ndjson:1: not UTF-8 text"), "{reason}");
    for f in &done.report.files {
        assert!(f.archived_to.as_deref().unwrap().contains("/failed/"), "{f:?}");
    }
}

/// Issue 17, 7: a rejected record's position is exact whatever the line endings and quoting,
/// and a CSV record's `raw` is its text as read, not its fields joined again.
#[sqlx::test(migrator = "MIGRATOR")]
async fn positions_and_raw_text_are_exact_whatever_the_line_endings(pool: PgPool) {
    let job = TestJob::new(RULES);
    // Distinct events (each event once: the same one again would be a duplicate).
    let good = |n: u32| format!("{{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {{\"n\": {n}}}}}");
    let (g1, g2, g3, g4, g5) = (good(1), good(2), good(3), good(4), good(5));
    job.drop_file("crlf.ndjson", &format!("{g1}\r\n{g2}\r\nnot json\r\n"));
    job.drop_file("cr.ndjson", &format!("{g3}\r{g4}\r\rnot json\r"));
    job.drop_file("crlf.json", &format!("[\r\n{g5},\r\n\r\n{{\"EventTime\": 1, \"Metadata\": {{}}}}\r\n]"));
    job.drop_file(
        "quoted.csv",
        "EventTime,note\r\n2026-11-02T10:00:00Z,\"two\r\nlines\"\r\n2026-11-02T10:00:00Z,\"a, \"\"quoted\"\" cell\"\r\nyesterday,\"x\"\r\n",
    );
    let done = job.run(&pool).await;
    let raws: Vec<(&str, &str)> = done.report.rejected.iter().map(|r| (r.source.as_str(), r.raw.as_str())).collect();
    assert_eq!(
        raws,
        [
            ("inbox/cr.ndjson:4", "not json"),
            ("inbox/crlf.json:4", "{\"EventTime\": 1, \"Metadata\": {}}"),
            ("inbox/crlf.ndjson:3", "not json"),
            ("inbox/quoted.csv:5", "yesterday,\"x\""),
        ]
    );
    assert_eq!(done.report.summary.ingested, 7, "{:?}", rejected(&done));
    let note: String = sqlx::query_scalar("select metadata->>'note' from events where source = 'inbox/quoted.csv:2'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(note, "two\r\nlines");
    assert_eq!(count(&pool, "select count(*) from events where source = 'inbox/quoted.csv:4'").await, 1);
}

/// Issue 17, 8: the losing concurrent run said "already running (since an unknown time)".
#[sqlx::test(migrator = "MIGRATOR")]
async fn losing_run_says_since_when_the_other_runs(pool: PgPool) {
    let job = TestJob::new(RULES);
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('callrecon.job:test', 0))")
        .execute(&mut *holder)
        .await
        .unwrap();
    let since: String = sqlx::query_scalar("select to_char(now() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI')")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    let out = callrecon(&pool, &["run", "--job", job.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("job test is already running (since {since}")), "{}", stderr(&out));
    holder.rollback().await.unwrap();
}

/// Issue 17, 4: against a server that accepts the connection and never answers, `callrecon run`
/// hung for as long as one waited.
#[tokio::test]
async fn an_unresponsive_server_ends_the_run_within_the_connect_timeout() {
    let job = TestJob::new(RULES);
    let (url, held) = silent_server(8);
    let started = Instant::now();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_callrecon"))
        .args(["--database-url", &url, "--connect-timeout", "2s", "run", "--job", job.path().to_str().unwrap()])
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    // The test's own limit: a hang fails it instead of hanging the suite.
    let out = tokio::time::timeout(Duration::from_secs(30), child).await.expect("callrecon hung").unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let err = stderr(&out);
    assert_eq!(err.lines().filter(|l| l.starts_with("callrecon: error")).count(), 1, "{err}");
    assert!(err.contains("cannot reach PostgreSQL at postgres://postgres@127.0.0.1"), "{err}");
    assert!(err.contains("timed out after 2s"), "{err}");
    drop(held);
}

/// Issue 17, 5: once a run has committed, nothing after it may turn it into a failure: a report
/// that cannot be written is a loud warning, and the exit status is 0.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_report_that_cannot_be_written_after_the_commit_exits_0(pool: PgPool) {
    Call::new("c1", "2026-11-02T09:00:00Z", Some("2026-11-02T11:00:00Z")).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"a": 1}})).await;
    // The run's report folder's place is taken by a file: the report is streamed into a
    // partial folder before the commit, and cannot be put in place after it.
    std::fs::create_dir(job.dir.path().join("reports")).unwrap();
    std::fs::write(job.dir.path().join("reports/1"), "not a folder").unwrap();
    let out = callrecon(&pool, &["run", "--job", job.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("warning: the run committed (its changes are kept), but its report could not be written")
    );
    assert_eq!(call_meta(&pool, "c1").await, json!({"a": 1}));
    let (status, error): (String, Option<String>) =
        sqlx::query_as("select status, error from runs").fetch_one(&pool).await.unwrap();
    assert_eq!(status, "succeeded");
    assert!(error.unwrap().contains("report could not be written"));
}

/// Calls with sessions, queued events for them and sessionless ones: enough work that every
/// stage of a run takes a moment.
async fn some_work(pool: &PgPool) {
    sqlx::raw_sql(
        "insert into calls (id, session_id, started_at, ended_at, ani, agent_id)
         select 'c' || i, 's' || i, timestamptz '2026-11-02 00:00Z' + i * interval '7 seconds',
                timestamptz '2026-11-02 00:05Z' + i * interval '7 seconds', '555' || lpad(i::text, 7, '0'), 'a' || (i % 50)
         from generate_series(1, 5000) i;
         insert into event_queue (payload)
         select jsonb_build_object('SessionId', 's' || i, 'EventTime', '2026-11-02T00:00:00Z', 'Metadata', jsonb_build_object('n', i))
         from generate_series(1, 5000) i
         union all
         select jsonb_build_object('EventTime', to_char(timestamptz '2026-11-02 00:01Z' + i * interval '7 seconds', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                                   'Metadata', jsonb_build_object('customerPhone', '555' || lpad(i::text, 7, '0'), 'agentId', 'a' || (i % 50)))
         from generate_series(1, 2000) i;",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Runs the binary and, when its log shows `line`, cuts it off from the database: no new
/// connection is accepted and its sessions are terminated. Returns the exit code and stderr.
async fn cut_off_at(pool: &PgPool, job: &TestJob, line: &str) -> (Option<i32>, String) {
    use sqlx::Connection as _;
    use tokio::io::AsyncBufReadExt as _;
    let url = database_url(pool).await;
    let db: String = sqlx::query_scalar("select current_database()").fetch_one(pool).await.unwrap();
    // ALTER DATABASE cannot close the database one is connected to: from the server's own.
    let mut admin = sqlx::PgConnection::connect(&std::env::var("DATABASE_URL").unwrap()).await.unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_callrecon"))
        .args(["--database-url", &url, "--connect-timeout", "3s", "run", "--job", job.path().to_str().unwrap()])
        .env("RUST_LOG", "callrecon=debug")
        .env("CALLRECON_SCHEMA", LEGACY_SCHEMA)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let mut cut = false;
    while let Some(l) = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await.unwrap().unwrap() {
        log.push_str(&l);
        log.push('\n');
        if !cut && l.contains(line) {
            cut = true;
            // Stopped while it is cut off, so that it cannot run ahead of the cut.
            let pid = child.id().unwrap().to_string();
            std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("alter database \"{db}\" allow_connections false")))
                .execute(&mut admin)
                .await
                .unwrap();
            sqlx::query(
                "select pg_terminate_backend(pid) from pg_stat_activity
                 where datname = $1 and application_name = 'callrecon'",
            )
            .bind(&db)
            .execute(&mut admin)
            .await
            .unwrap();
            std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap();
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.unwrap().unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("alter database \"{db}\" allow_connections true")))
        .execute(&mut admin)
        .await
        .unwrap();
    assert!(cut, "the run never logged {line:?}:\n{log}");
    (status.code(), log)
}

/// Issue 17, 5 and the contract: a run that exits non-zero has changed nothing; a run that
/// committed exits 0, whatever happens to its connections afterwards.
async fn connection_lost_at(pool: PgPool, line: &str, committed: Option<bool>) {
    some_work(&pool).await;
    let job = TestJob::new(RULES);
    let (code, log) = cut_off_at(&pool, &job, line).await;
    let applied = count(&pool, "select count(*) from calls where async_metadata <> '{}'").await;
    let (queued, stored) =
        (count(&pool, "select count(*) from event_queue").await, count(&pool, "select count(*) from events").await);
    match code {
        Some(0) => assert_eq!((applied, queued, stored), (5000, 0, 7000), "exit 0 but:\n{log}"),
        Some(1) => {
            assert_eq!((applied, queued, stored), (0, 7000, 0), "exit 1 but something changed:\n{log}");
            let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("callrecon: error:")).collect();
            assert_eq!(errors.len(), 1, "{log}");
        }
        other => panic!("exit {other:?}:\n{log}"),
    }
    if let Some(committed) = committed {
        assert_eq!(code, Some(if committed { 0 } else { 1 }), "{log}");
    }
    // Whatever happened, the next run completes the work.
    let done = job.run(&pool).await;
    assert_eq!(count(&pool, "select count(*) from events").await, 7000);
    assert_eq!(count(&pool, "select count(*) from calls where async_metadata <> '{}'").await, 5000);
    drop(done);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn connection_lost_when_the_run_starts(pool: PgPool) {
    connection_lost_at(pool, "run started", Some(false)).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn connection_lost_after_the_queue_is_drained(pool: PgPool) {
    connection_lost_at(pool, "queue drained", Some(false)).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn connection_lost_after_new_events_are_decided(pool: PgPool) {
    connection_lost_at(pool, "new events decided", None).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn connection_lost_while_the_report_is_built(pool: PgPool) {
    connection_lost_at(pool, "report built", None).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn connection_lost_right_after_the_commit(pool: PgPool) {
    connection_lost_at(pool, "committed", Some(true)).await;
}

/// Issue 17, 4: a run waiting for a lock someone else holds (here a row of `calls` the platform
/// keeps locked) gives up after `--lock-timeout`, names it, and changes nothing.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_lock_held_elsewhere_ends_the_run_within_the_lock_timeout(pool: PgPool) {
    Call::new("c1", "2026-11-02T09:00:00Z", Some("2026-11-02T11:00:00Z")).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"a": 1}})).await;
    let mut platform = pool.begin().await.unwrap();
    sqlx::query("select 1 from calls where id = 'c1' for update").execute(&mut *platform).await.unwrap();
    let started = Instant::now();
    let path = job.path();
    let args = ["--lock-timeout", "2s", "run", "--job", path.to_str().unwrap()];
    let out = tokio::time::timeout(Duration::from_secs(60), callrecon(&pool, &args)).await.expect("callrecon hung");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("callrecon: error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("lock timeout"), "{err}");
    platform.rollback().await.unwrap();
    assert_eq!(call_meta(&pool, "c1").await, json!({}));
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1);
}

/// The other side of the contract: when the report cannot be written at all (its folder is not
/// usable), the run fails before its commit, exits 1, and nothing is changed or consumed.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_report_folder_that_cannot_be_used_fails_the_run_before_its_commit(pool: PgPool) {
    Call::new("c1", "2026-11-02T09:00:00Z", Some("2026-11-02T11:00:00Z")).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"a": 1}})).await;
    std::fs::write(job.dir.path().join("reports"), "not a folder").unwrap();
    let out = callrecon(&pool, &["run", "--job", job.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(call_meta(&pool, "c1").await, json!({}));
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1);
    assert_eq!(count(&pool, "select count(*) from runs where status = 'failed'").await, 1);
}

/// Issue 17, 8: error lines repeated their cause ("X: X") and one said only "error returned from
/// database". A database error reads as PostgreSQL's message, once.
#[sqlx::test(migrator = "MIGRATOR")]
async fn database_errors_read_as_one_line_without_repeats(pool: PgPool) {
    use anyhow::Context as _;
    let failed = sqlx::query("select 1 / 0").execute(&pool).await;
    let e = anyhow::Error::from(failed.unwrap_err()).context("checking the division");
    assert_eq!(callrecon::db::error_line(&e), "checking the division: division by zero");
    // A context that says what its cause says is not printed twice.
    let repeated = Err::<(), _>(anyhow::anyhow!("cannot read the file")).context("cannot read the file").unwrap_err();
    assert_eq!(callrecon::db::error_line(&repeated), "cannot read the file");
    let failed =
        sqlx::query("insert into calls (id, started_at) values ('c1', now()), ('c1', now())").execute(&pool).await;
    let line = callrecon::db::error_line(&anyhow::Error::from(failed.unwrap_err()));
    assert!(
        line.starts_with(
            "duplicate key value violates unique constraint \"calls_pkey\" (Key (id)=(c1) already exists.)"
        ),
        "{line}"
    );
    assert!(!line.contains("error returned from database") && !line.contains('\n'), "{line}");
}

/// The parser's idea of which numbers PostgreSQL's jsonb holds is PostgreSQL's own, at and
/// around every limit.
#[sqlx::test(migrator = "MIGRATOR")]
async fn numbers_accepted_are_exactly_those_postgresql_stores(pool: PgPool) {
    let mut texts: Vec<String> = Vec::new();
    for e in [16_382i64, 16_383, 16_384, 20_000] {
        texts.extend([format!("1e-{e}"), format!("0e-{e}"), format!("1.5e-{}", e - 1), format!("0.1e-{e}")]);
    }
    for e in [131_070i64, 131_071, 131_072, 200_000, 1_073_741_822, 1_073_741_824] {
        texts.extend([
            format!("1e{e}"),
            format!("-1e{e}"),
            format!("0e{e}"),
            format!("10e{}", e - 1),
            format!("0.001e{}", e + 2),
        ]);
    }
    texts.extend(["1e99999999999999999999".into(), "0.0".into(), "-0".into(), "123.4500e-2".into()]);
    for text in texts {
        let ours = callrecon::event::numeric_storable(&text).is_ok();
        let theirs =
            sqlx::query(sqlx::AssertSqlSafe(format!("select '{{\"x\": {text}}}'::jsonb"))).execute(&pool).await.is_ok();
        assert_eq!(ours, theirs, "{text}: ours {ours}, PostgreSQL {theirs}");
    }
}

/// A tiny deterministic generator (xorshift), so the mix is the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A bad record as JSON text (for the queue: only what jsonb itself holds).
fn hostile_json(rng: &mut Rng, for_queue: bool) -> String {
    let t = "\"EventTime\": \"2026-11-02T10:00:00Z\"";
    let kinds = if for_queue { 11 } else { 15 };
    match rng.below(kinds) {
        0 => r#"{"EventTime": 1541152800, "Metadata": {}}"#.to_owned(),
        1 => format!("{{{t}, \"Metadata\": \"flat\"}}"),
        2 => format!("{{\"SessionId\": 42, {t}, \"Metadata\": {{}}}}"),
        3 => format!("{{{t}}}"),
        4 => r#"{"EventTime": "0001-01-01T00:00:00Z", "Metadata": {"x": 1}}"#.to_owned(),
        5 => r#"{"EventTime": "9999-12-31T23:59:59Z", "Metadata": {"x": 1}}"#.to_owned(),
        6 => format!("{{{t}, \"eventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {{}}}}"),
        7 => format!("{{{t}, \"Metadata\": {{}}, \"CustomerId\": 7}}"),
        8 => format!("{{{t}, \"Metadata\": {{\"deep\": {}1{}}}}}", "[".repeat(200), "]".repeat(200)),
        9 => r#"["an", "array"]"#.to_owned(),
        10 => format!("{{\"SessionId\": \"{}\", {t}, \"Metadata\": {{}}}}", "s".repeat(5000)),
        11 => format!("{{{t}, \"Metadata\": {{\"v\": \"a\\u0000b\"}}}}"),
        12 => format!("{{{t}, \"Metadata\": {{\"n\": 1e-20000}}}}"),
        13 => format!("{{\"SessionId\": \"\\u0000\", {t}, \"Metadata\": {{}}}}"),
        _ => format!("{{{t}, \"Metadata\": {{\"broken\": }}"),
    }
}

fn good_json(i: usize) -> String {
    format!(
        "{{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {{\"good\": {i}, \"sql\": \"'); drop table calls; --\", \"big\": 1234567890123456789012345678901234567890, \"u\": \"\\u00e9\\ud83d\\ude00\"}}}}"
    )
}

/// Issue 17: thousands of hostile records (wrong types, deep and huge values, NULs, invalid
/// UTF-8, extreme dates and numbers, duplicate keys, SQL-looking strings) mixed with good ones
/// across the queue and every file format: the run succeeds, every good record is ingested
/// exactly once, every bad one is rejected at its exact position.
#[sqlx::test(migrator = "MIGRATOR")]
async fn thousands_of_hostile_records_beside_good_ones(pool: PgPool) {
    let job = TestJob::new(RULES);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut good = 0usize;
    let mut bad_sources: Vec<String> = Vec::new();

    // The queue.
    let mut payloads = Vec::new();
    for _ in 0..800 {
        if rng.below(2) == 0 {
            payloads.push((true, good_json(good)));
            good += 1;
        } else {
            payloads.push((false, hostile_json(&mut rng, true)));
        }
    }
    for (is_good, text) in &payloads {
        let id: i64 = sqlx::query_scalar("insert into event_queue (payload) values ($1::jsonb) returning id")
            .bind(text)
            .fetch_one(&pool)
            .await
            .unwrap();
        if !is_good {
            bad_sources.push(format!("queue:{id}"));
        }
    }

    // NDJSON and JSON arrays, with every kind of line ending and bytes that are not UTF-8.
    for (name, array) in [("mix.ndjson", false), ("mix.json", true)] {
        let mut bytes: Vec<u8> = Vec::new();
        let mut line = 1;
        if array {
            bytes.extend_from_slice(b"[\r\n");
            line += 1;
        }
        for n in 0..800 {
            if array && n > 0 {
                bytes.push(b',');
            }
            let ending: &[u8] = match rng.below(3) {
                0 => b"\n",
                1 => b"\r\n",
                _ => b"\r",
            };
            if array && n > 0 {
                bytes.extend_from_slice(ending);
                line += 1;
            }
            if rng.below(2) == 0 {
                bytes.extend_from_slice(good_json(good).as_bytes());
                good += 1;
            } else if rng.below(8) == 0 {
                bytes.extend_from_slice(
                    b"{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {\"city\": \"S\xE3o\"}}",
                );
                bad_sources.push(format!("inbox/{name}:{line}"));
            } else {
                bytes.extend_from_slice(hostile_json(&mut rng, false).as_bytes());
                bad_sources.push(format!("inbox/{name}:{line}"));
            }
            if !array {
                bytes.extend_from_slice(ending);
                line += 1;
            }
        }
        if array {
            bytes.extend_from_slice(b"\n]\n");
        }
        std::fs::write(job.inbox().join(name), bytes).unwrap();
    }

    // CSV.
    let mut csv: Vec<u8> = b"SessionId,EventTime,Metadata,note\r\n".to_vec();
    for n in 0..800 {
        let line = n + 2;
        let row: Vec<u8> = match rng.below(12) {
            0 => b",2026-11-02T10:00:00Z,,a\0b".to_vec(),
            1 => b",0001-01-01T00:00:00Z,,x".to_vec(),
            2 => b",2026-11-02T10:00:00Z,,S\xE3o".to_vec(),
            3 => b",2026-11-02T10:00:00Z,{not json},x".to_vec(),
            4 => b",2026-11-02T10:00:00Z,\"{\"\"n\"\": 1e200000}\",x".to_vec(),
            5 => b",2026-11-02T10:00:00Z,,x,one too many".to_vec(),
            _ => {
                good += 1;
                format!(",2026-11-02T10:00:00Z,\"{{\"\"good\"\": {}}}\",\"'); drop table calls; --\"", good - 1)
                    .into_bytes()
            }
        };
        if !row.starts_with(b",2026-11-02T10:00:00Z,\"{\"\"good") {
            bad_sources.push(format!("inbox/mix.csv:{line}"));
        }
        csv.extend_from_slice(&row);
        csv.extend_from_slice(b"\r\n");
    }
    std::fs::write(job.inbox().join("mix.csv"), csv).unwrap();

    let done = job.run(&pool).await;
    let whole: Vec<&str> =
        done.report.rejected.iter().filter(|r| !r.source.contains(':')).map(|r| r.reason.as_str()).collect();
    assert!(whole.is_empty(), "files refused whole: {whole:?}");
    let mut got: Vec<String> = done.report.rejected.iter().map(|r| r.source.clone()).collect();
    got.sort();
    bad_sources.sort();
    let missing: Vec<_> = bad_sources.iter().filter(|s| !got.contains(s)).take(5).collect();
    let extra: Vec<_> = got.iter().filter(|s| !bad_sources.contains(s)).take(5).collect();
    assert_eq!((got.len(), &missing, &extra), (bad_sources.len(), &vec![], &vec![]));
    assert_eq!(done.report.summary.ingested as usize, good);
    let (events, distinct): (i64, i64) =
        sqlx::query_as("select count(*), count(distinct metadata->>'good') from events")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((events as usize, distinct as usize), (good, good));
    let big =
        count(&pool, "select count(*) from events where metadata->>'big' = '1234567890123456789012345678901234567890'")
            .await;
    let from_csv = count(&pool, "select count(*) from events where source like 'inbox/mix.csv:%'").await;
    assert_eq!(big as usize, good - from_csv as usize);
    assert!(
        done.report.files.iter().all(|f| f.status == callrecon::report::FileStatus::Ingested),
        "{:?}",
        done.report.files
    );
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 0);
}

/// Issue 17, 4: a statement that runs longer than `--statement-timeout` (here the events' insert,
/// slowed by a trigger) ends the run with exit 1, naming the timeout, and changes nothing.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_statement_over_the_statement_timeout_ends_the_run(pool: PgPool) {
    Call::new("c1", "2026-11-02T09:00:00Z", Some("2026-11-02T11:00:00Z")).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"a": 1}})).await;
    sqlx::raw_sql(
        "create function slow() returns trigger language plpgsql as $$ begin perform pg_sleep(30); return null; end $$;
         create trigger slow before insert on events for each statement execute function slow();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let path = job.path();
    let args = ["--statement-timeout", "2s", "run", "--job", path.to_str().unwrap()];
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(60), callrecon(&pool, &args)).await.expect("callrecon hung");
    assert!(started.elapsed() < Duration::from_secs(25), "took {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("canceling statement due to statement timeout"), "{}", stderr(&out));
    assert_eq!(call_meta(&pool, "c1").await, json!({}));
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1);
}

/// A rejected record's `raw` keeps at most 4 KiB of a huge bad line, marked as cut.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_huge_bad_record_keeps_4_kib_of_its_text(pool: PgPool) {
    let job = TestJob::new(RULES);
    let huge = format!("{{\"EventTime\": \"yesterday\", \"Metadata\": {{\"note\": \"{}\"}}}}", "é".repeat(50_000));
    job.drop_file("big.ndjson", &format!("{huge}\n"));
    let done = job.run(&pool).await;
    let raw = &done.report.rejected[0].raw;
    assert!(raw.len() <= callrecon::event::Rejected::MAX_RAW + '…'.len_utf8(), "{}", raw.len());
    assert!(raw.ends_with('…') && huge.starts_with(raw.trim_end_matches('…')), "{}", &raw[..80]);
}
