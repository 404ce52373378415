//! Feeds as partners send them (issue 41): uploads in progress, overlapping exports, the same
//! event by two routes. Each event is stored once, and a file still being written is never
//! half-read.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// Event `n` of a feed: sessionless, with a key the rules look at.
fn line(n: usize) -> String {
    json!({"EventTime": format!("2026-11-02T10:{:02}:{:02}Z", n / 60, n % 60),
           "Metadata": {"customerPhone": format!("201555{n:04}"), "agentId": "agent-1", "n": n}})
    .to_string()
}

/// Events `from..=to` as NDJSON.
fn feed(from: usize, to: usize) -> String {
    (from..=to).map(|n| line(n) + "\n").collect()
}

async fn events(pool: &PgPool) -> i64 {
    count(pool, "select count(*) from events").await
}

/// Dates a file back, as if its upload had ended `ago`.
fn age(path: &std::path::Path, ago: Duration) {
    let f = std::fs::File::options().append(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

fn inbox_names(job: &TestJob) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(job.inbox())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_half_uploaded_file_is_left_alone_and_the_whole_one_stores_100_events(pool: PgPool) {
    // Run every minute, settle 10 minutes: the next run comes sooner than the file would settle,
    // so the run does not wait for it.
    let job = TestJob::with_sources("0 * * * * *", "pending_for = \"72h\"", "settle = \"10m\"", RULES);
    let whole = feed(1, 100);
    let half = &whole[..whole.len() / 2 + 7];
    assert!(!half.ends_with('\n'), "cut mid-line");
    job.drop_file("crm.ndjson", half);

    let first = job.run(&pool).await;
    let s = &first.report.summary;
    assert_eq!((s.ingested, s.rejected, s.files_later, s.files_ingested), (0, 0, 1, 0));
    let file = &first.report.files[0];
    assert_eq!(file.file, "inbox/crm.ndjson");
    assert_eq!(file.status, callrecon::report::FileStatus::Later);
    assert!(file.reason.as_deref().unwrap().contains("still being written"), "{file:?}");
    assert_eq!(inbox_names(&job), ["crm.ndjson"], "left in the inbox");
    let html = std::fs::read_to_string(first.dir.join("report.html")).unwrap();
    assert!(html.contains("crm.ndjson") && html.contains("still being written"), "the report lists it");

    // The upload ends; a while later, the next run.
    job.drop_file("crm.ndjson", &whole);
    age(&job.inbox().join("crm.ndjson"), Duration::from_secs(3600));
    let second = job.run(&pool).await;
    let s = &second.report.summary;
    assert_eq!((s.ingested, s.rejected, s.duplicates, s.files_later), (100, 0, 0, 0));
    assert_eq!(events(&pool).await, 100);
    assert!(inbox_names(&job).is_empty(), "archived");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_young_file_is_waited_for_and_read_once_it_settled(pool: PgPool) {
    // A nightly job: waiting 2 s is sooner than the next run.
    let job = TestJob::with_sources("0 0 2 * * *", "pending_for = \"72h\"", "settle = \"2s\"", RULES);
    job.drop_file("crm.ndjson", &feed(1, 10));
    let started = std::time::Instant::now();
    let done = job.run(&pool).await;
    let s = &done.report.summary;
    assert_eq!((s.ingested, s.files_ingested, s.files_later), (10, 1, 0));
    assert!(started.elapsed() >= Duration::from_millis(1500), "the run waited for the file to settle");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_file_written_to_while_the_run_waits_is_left_for_the_next_run(pool: PgPool) {
    let job = TestJob::with_sources("0 0 2 * * *", "pending_for = \"72h\"", "settle = \"3s\"", RULES);
    job.drop_file("crm.ndjson", &feed(1, 10));
    let path = job.inbox().join("crm.ndjson");
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        use std::io::Write as _;
        let mut f = std::fs::File::options().append(true).open(path).unwrap();
        f.write_all(feed(11, 20).as_bytes()).unwrap();
    });
    let done = job.run(&pool).await;
    writer.join().unwrap();
    let s = &done.report.summary;
    assert_eq!((s.ingested, s.rejected, s.files_later), (0, 0, 1));
    assert!(done.report.files[0].reason.as_deref().unwrap().contains("changed while the run waited"));
    assert_eq!(inbox_names(&job), ["crm.ndjson"]);

    age(&job.inbox().join("crm.ndjson"), Duration::from_secs(60));
    let done = job.run(&pool).await;
    assert_eq!((done.report.summary.ingested, done.report.summary.rejected), (20, 0));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_complete_file_without_a_final_newline_is_read(pool: PgPool) {
    let job = TestJob::with_sources("0 0 2 * * *", "pending_for = \"72h\"", "settle = \"30s\"", RULES);
    let text = feed(1, 5);
    job.drop_file("crm.ndjson", text.trim_end());
    job.drop_file("crm.csv", "SessionId,EventTime,crmCaseId\n,2026-11-02T10:00:00Z,C-1\n,2026-11-02T10:00:01Z,C-2");
    for name in ["crm.ndjson", "crm.csv"] {
        age(&job.inbox().join(name), Duration::from_secs(60));
    }
    let done = job.run(&pool).await;
    let s = &done.report.summary;
    assert_eq!((s.ingested, s.rejected, s.files_ingested, s.files_later), (7, 0, 2, 0));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn overlapping_exports_store_the_union(pool: PgPool) {
    let job = TestJob::new(RULES);
    job.drop_file("week-1.ndjson", &feed(1, 70));
    let first = job.run(&pool).await;
    assert_eq!((first.report.summary.ingested, first.report.summary.duplicates), (70, 0));

    // The next export repeats 40 of them (in another order) and adds 30.
    let mut lines: Vec<String> = (31..=100).map(line).collect();
    lines.reverse();
    job.drop_file("week-2.ndjson", &(lines.join("\n") + "\n"));
    let second = job.run(&pool).await;
    let s = &second.report.summary;
    assert_eq!((s.ingested, s.rejected, s.duplicates), (30, 0, 40));
    assert_eq!(s.duplicates_by_source, [("inbox/week-2.ndjson".to_owned(), 40)].into());
    let file = &second.report.files[0];
    assert_eq!((file.events, file.duplicates), (30, 40));
    assert_eq!(events(&pool).await, 100);
    let ns: Vec<i64> =
        sqlx::query_scalar("select (metadata->>'n')::int8 from events order by 1").fetch_all(&pool).await.unwrap();
    assert_eq!(ns, (1..=100).collect::<Vec<i64>>());

    let text = callrecon::report::history::summary_text(&second.report, &second.dir);
    assert!(text.contains("duplicate     40 events") && text.contains("inbox/week-2.ndjson 40"), "{text}");
    let html = std::fs::read_to_string(second.dir.join("report.html")).unwrap();
    assert!(html.contains("Duplicate events (40)"), "the report lists them");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(second.dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["summary"]["duplicates_by_source"], json!({"inbox/week-2.ndjson": 40}));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_same_event_from_the_queue_and_a_file_in_one_run_is_stored_once(pool: PgPool) {
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"a": 1, "b": [1, 2]}}))
        .await;
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"a": 1, "b": [1, 2]}}))
        .await;
    job.drop_file(
        "export.ndjson",
        "{\"Metadata\": {\"b\": [1, 2], \"a\": 1}, \"eventTime\": \"2026-11-02T05:00:00-05:00\", \"sessionId\": \"s1\"}\n",
    );
    let done = job.run(&pool).await;
    let s = &done.report.summary;
    assert_eq!((s.ingested, s.duplicates), (1, 2));
    assert_eq!(s.duplicates_by_source, [("queue".to_owned(), 1), ("inbox/export.ndjson".to_owned(), 1)].into());
    assert_eq!(events(&pool).await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_resent_event_of_a_dismissed_one_stays_dismissed(pool: PgPool) {
    let job = TestJob::new(RULES);
    let lost =
        json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"customerPhone": "2015550000", "agentId": "a"}});
    enqueue(&pool, lost.clone()).await;
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.by_reason.get("no_candidate"), Some(&1));
    let id: i64 = sqlx::query_scalar("select id from events").fetch_one(&pool).await.unwrap();
    let path = job.path().to_string_lossy().into_owned();
    let args = ["resolve", "--job", &path, &id.to_string(), "--to", "dismiss", "--note", "test call", "--by", "carol"];
    let out = callrecon(&pool, &args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let history = |pool: PgPool| async move { count(&pool, "select count(*) from event_history").await };
    let before = history(pool.clone()).await;

    // The partner sends it again, by the queue and in a file.
    enqueue(&pool, lost.clone()).await;
    job.drop_file("again.json", &lost.to_string());
    let done = job.run(&pool).await;
    let s = &done.report.summary;
    assert_eq!((s.ingested, s.duplicates, s.unmatched, s.dismissed), (0, 2, 0, 1));
    let state: String = sqlx::query_scalar("select state from events").fetch_one(&pool).await.unwrap();
    assert_eq!((events(&pool).await, state.as_str()), (1, "dismissed"));
    assert_eq!(history(pool.clone()).await, before, "no decision changed");
}

/// Whether a second event is the first one again: `same` says it should be.
async fn check(pool: &PgPool, job: &TestJob, case: usize, first: Value, second: Value, same: bool) {
    let mut stored = events(pool).await;
    for payload in [first, second.clone()] {
        enqueue(pool, payload).await;
        let done = job.run(pool).await;
        assert_eq!(done.report.summary.rejected, 0, "case {case}");
        stored += 1;
    }
    let expected = if same { stored - 1 } else { stored };
    assert_eq!(
        events(pool).await,
        expected,
        "case {case}: {second} is {}the same event",
        if same { "" } else { "not " }
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn identical_means_same_address_instant_and_metadata_key_order_aside_numbers_as_written(pool: PgPool) {
    let job = TestJob::new(RULES);
    let at = |t: &str, session: Value, meta: Value| json!({"SessionId": session, "EventTime": t, "Metadata": meta});
    let text = |json: &str| serde_json::from_str::<Value>(json).unwrap();
    let t = "2026-11-02T10:00:00Z";
    let cases: Vec<(Value, Value, bool)> = vec![
        // Key order, at any depth, is not part of the event.
        (
            at(t, json!("k1"), json!({"a": 1, "b": {"x": 1, "y": 2}})),
            at(t, json!("k1"), json!({"b": {"y": 2, "x": 1}, "a": 1})),
            true,
        ),
        // The same instant in another offset or spelling.
        (at(t, json!("k2"), json!({})), at("2026/11/02 05:00:00.000-05:00", json!("k2"), json!({})), true),
        // Numbers as written: 1.5 and 1.50 differ (`json!` would print both 1.5), and so do 1 and "1".
        (at(t, json!("k3"), text(r#"{"amount": 1.5}"#)), at(t, json!("k3"), text(r#"{"amount": 1.50}"#)), false),
        (at(t, json!("k4"), json!({"n": 1})), at(t, json!("k4"), json!({"n": "1"})), false),
        // Another address, another instant, another value.
        (at(t, json!("k5"), json!({})), at(t, json!("k5b"), json!({})), false),
        (at(t, json!("k6"), json!({})), at("2026-11-02T10:00:00.001Z", json!("k6"), json!({})), false),
        (at(t, json!("k7"), json!({"a": [1, 2]})), at(t, json!("k7"), json!({"a": [2, 1]})), false),
        // A SessionId is not a MasterId of the same text.
        (at(t, json!("k8"), json!({})), json!({"MasterId": "k8", "EventTime": t, "Metadata": {}}), false),
        // Empty and missing SessionIds are both sessionless.
        (at(t, json!(""), json!({"k9": 1})), json!({"EventTime": t, "Metadata": {"k9": 1}}), true),
    ];
    for (case, (first, second, same)) in cases.into_iter().enumerate() {
        check(&pool, &job, case, first, second, same).await;
    }
    // Spellings of one value: an escape and its character; an exponent and the number `numeric`
    // keeps (`1E2` is stored as 100); `1.5` is still not `1.50`.
    let raw = |meta: &str| format!(r#"{{"SessionId": "r", "EventTime": "{t}", "Metadata": {meta}}}"#);
    job.drop_file("a.ndjson", &(raw(r#"{"s": "\u00e9", "n": 1.50, "m": 100}"#) + "\n"));
    job.drop_file(
        "b.ndjson",
        &(raw(r#"{"m": 1E2, "n": 1.50, "s": "é"}"#) + "\n" + &raw(r#"{"m": 100, "n": 1.5, "s": "é"}"#) + "\n"),
    );
    let done = job.run(&pool).await;
    assert_eq!((done.report.summary.ingested, done.report.summary.duplicates), (2, 1));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn digests_made_on_ingest_agree_with_the_migrations_definition(pool: PgPool) {
    let job = TestJob::new(RULES);
    let metadata = [
        json!({}),
        json!({"s": "é ✓ 😀 \"quoted\" back\\slash /slash \t tab \n line \u{1} \u{1f} \u{7f}", "": "empty key"}),
        json!({"a much longer key than the others": [1, {"z": null, "y": true, "x": false}], "b": 2}),
    ];
    for (i, m) in metadata.iter().enumerate() {
        enqueue(
            &pool,
            json!({"SessionId": format!("s{i}"), "EventTime": "2026-11-02T10:00:00.123456Z", "Metadata": m}),
        )
        .await;
        enqueue(
            &pool,
            json!({"MasterId": format!("g{i}"), "EventTime": "1999-12-31T23:59:59.9999997Z", "Metadata": m}),
        )
        .await;
        enqueue(&pool, json!({"EventTime": "2000-01-01T00:00:00.0000004Z", "Metadata": m})).await;
    }
    job.drop_file(
        "numbers.ndjson",
        "{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {\"a\": 1e2, \"b\": -0, \"c\": 1.50, \"d\": 1E-3, \"e\": -12.5e1, \"f\": 123456789012345678901234567890, \"g\": 0.000}}\n",
    );
    let done = job.run(&pool).await;
    assert_eq!((done.report.summary.ingested, done.report.summary.rejected), (10, 0));
    let disagree = count(
        &pool,
        "select count(*) from events
         where digest is distinct from callrecon_event_digest(job, session_id, master_id, event_time, metadata)",
    )
    .await;
    assert_eq!(disagree, 0);
}

#[sqlx::test(migrations = false)]
async fn events_stored_before_migration_0019_are_recognised_and_earlier_copies_kept(pool: PgPool) {
    let before = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(MIGRATOR.iter().filter(|m| m.version <= 18).cloned().collect()),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&pool).await.unwrap();
    // Stored by an earlier version: the same event twice (an overlapping export), and another.
    for (source, n) in [("inbox/week-1.ndjson:1", 1), ("inbox/week-2.ndjson:1", 1), ("inbox/week-2.ndjson:2", 2)] {
        sqlx::query(
            "insert into events (job, source, event_time, received_at, metadata, ingested_run)
             values ('test', $1, '2026-11-02T10:00:00Z', now(), jsonb_build_object('n', $2::int, 'b', 1.50), 1)",
        )
        .bind(source)
        .bind(n)
        .execute(&pool)
        .await
        .unwrap();
    }
    MIGRATOR.run(&pool).await.unwrap();
    let digests: Vec<(String, bool)> =
        sqlx::query_as("select source, digest is not null from events order by id").fetch_all(&pool).await.unwrap();
    assert_eq!(
        digests,
        [
            ("inbox/week-1.ndjson:1".into(), true),
            ("inbox/week-2.ndjson:1".into(), false),
            ("inbox/week-2.ndjson:2".into(), true)
        ]
    );

    // Sent again: recognised by the digest the migration computed.
    let job = TestJob::new(RULES);
    let again = r#"{"EventTime": "2026-11-02T05:00:00-05:00", "Metadata": {"b": 1.50, "n": 2}}"#;
    job.drop_file("week-3.ndjson", &format!("{again}\n{}\n", again.replace("\"n\": 2", "\"n\": 3")));
    let done = job.run(&pool).await;
    assert_eq!((done.report.summary.ingested, done.report.summary.duplicates), (1, 1));
    assert_eq!(events(&pool).await, 4);
}
