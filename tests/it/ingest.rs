//! Ingestion from the queue and the inbox, against PostgreSQL.

use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

#[sqlx::test(migrator = "MIGRATOR")]
async fn every_inbox_format_is_ingested_with_positions(pool: PgPool) {
    let job = TestJob::new(RULES);
    job.drop_file("one.json", r#"{"SessionId": "s1", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"a": 1}}"#);
    job.drop_file(
        "many.json",
        "[\n {\"EventTime\": \"2026/11/02T10:00:00.000Z\", \"Metadata\": {}},\n {\"eventTime\": \"2026-11-02 05:00:00\", \"metaData\": {\"n\": 2}}\n]",
    );
    job.drop_file("lines.ndjson", "{\"EventTime\": \"2026-11-02T10:00:00+01:00\", \"Metadata\": {}}\n");
    job.drop_file("lines.jsonl", "\n{\"EventTime\": \"2026-11-02T10:00:00.5Z\", \"Metadata\": {}}\n");
    job.drop_file("rows.csv", "SessionId,EventTime,crmCaseId\n,2026-11-02T10:00:00Z,C-1\n");
    // Not picked: hidden, partial, unknown extension.
    job.drop_file(".hidden.json", "{}");
    job.drop_file("upload.json.part", "{}");
    job.drop_file("upload.tmp", "{}");
    job.drop_file("notes.txt", "hello");

    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.ingested, 6);
    assert_eq!(done.report.summary.rejected, 0);

    let rows: Vec<(String, String)> = sqlx::query_as(
        "select source, to_char(event_time at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') from events order by source",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let got: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        got,
        [
            ("inbox/lines.jsonl:2", "2026-11-02 10:00:00.500"),
            ("inbox/lines.ndjson:1", "2026-11-02 09:00:00.000"),
            ("inbox/many.json:2", "2026-11-02 10:00:00.000"),
            // No offset: the job's time zone (EST on 2026-11-02).
            ("inbox/many.json:3", "2026-11-02 10:00:00.000"),
            ("inbox/one.json:1", "2026-11-02 10:00:00.000"),
            ("inbox/rows.csv:2", "2026-11-02 10:00:00.000"),
        ]
    );
    let csv_meta: serde_json::Value =
        sqlx::query_scalar("select metadata from events where source = 'inbox/rows.csv:2'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(csv_meta, json!({"crmCaseId": "C-1"}));

    // Picked files are archived, never deleted; the others stay.
    let mut left: Vec<String> = std::fs::read_dir(job.inbox())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [".hidden.json", "notes.txt", "upload.json.part", "upload.tmp"]);
    let archived =
        done.report.files.iter().filter(|f| f.archived_to.as_deref().is_some_and(|p| std::path::Path::new(p).exists()));
    assert_eq!(archived.count(), 5);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn bad_record_between_good_ones_is_rejected_alone(pool: PgPool) {
    let job = TestJob::new(RULES);
    job.drop_file(
        "crm.ndjson",
        "{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {\"n\": 1}}\n\
         {\"EventTime\": \"yesterday\", \"Metadata\": {}}\n\
         not json at all\n\
         {\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": \"flat\"}\n\
         {\"EventTime\": \"2026-11-02T11:00:00Z\", \"Metadata\": {\"n\": 2}}\n",
    );
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z"})).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"q": 1}})).await;

    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.ingested, 3);
    let rejected: Vec<(&str, &str)> =
        done.report.rejected.iter().map(|r| (r.source.as_str(), r.reason.as_str())).collect();
    assert_eq!(rejected.len(), 4, "{rejected:?}");
    assert!(rejected[0].0.starts_with("queue:") && rejected[0].1.contains("missing Metadata"), "{rejected:?}");
    assert_eq!(rejected[1].0, "inbox/crm.ndjson:2");
    assert!(rejected[1].1.contains("EventTime \"yesterday\""), "{}", rejected[1].1);
    assert_eq!(rejected[2].0, "inbox/crm.ndjson:3");
    assert!(rejected[2].1.contains("not valid JSON"));
    assert_eq!(rejected[3].0, "inbox/crm.ndjson:4");
    assert!(rejected[3].1.contains("`Metadata` must be a JSON object, found a string"));
    // The report carries them too.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(done.dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["summary"]["rejected"], 4);
    assert_eq!(json["rejected"][1]["raw"], "{\"EventTime\": \"yesterday\", \"Metadata\": {}}");
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn same_file_dropped_twice_is_ingested_once(pool: PgPool) {
    let job = TestJob::new(RULES);
    let content = "{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {}}\n";
    job.drop_file("a.ndjson", content);
    assert_eq!(job.run(&pool).await.report.summary.ingested, 1);

    job.drop_file("a-again.ndjson", content);
    job.drop_file("a.ndjson", content);
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.ingested, 0);
    assert_eq!(done.report.summary.files_duplicate, 2);
    assert_eq!(count(&pool, "select count(*) from events").await, 1);
    for f in &done.report.files {
        assert_eq!(f.status, callrecon::report::FileStatus::Duplicate);
        let to = f.archived_to.as_deref().unwrap();
        assert!(to.contains("/duplicate/") && std::path::Path::new(to).exists(), "{to}");
        assert!(f.reason.as_deref().unwrap().contains("same content as a.ndjson"));
    }
    // The first a.ndjson was archived already: the second keeps a distinct name.
    assert!(std::fs::read_dir(job.inbox()).unwrap().next().is_none());
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn unparseable_file_is_archived_as_failed_and_reported(pool: PgPool) {
    let job = TestJob::new(RULES);
    job.drop_file("broken.json", "[{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {}},");
    job.drop_file("good.json", "{\"EventTime\": \"2026-11-02T10:00:00Z\", \"Metadata\": {}}");
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.ingested, 1);
    assert_eq!(done.report.summary.files_failed, 1);
    let failed = done.report.files.iter().find(|f| f.status == callrecon::report::FileStatus::Failed).unwrap();
    assert!(failed.archived_to.as_deref().unwrap().contains("/failed/"));
    assert!(std::path::Path::new(failed.archived_to.as_deref().unwrap()).exists());
    assert_eq!(done.report.rejected[0].source, "inbox/broken.json");
    assert!(done.report.rejected[0].reason.contains("the JSON array is not closed"));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn queue_drained_while_a_producer_inserts_loses_and_duplicates_nothing(pool: PgPool) {
    let job = TestJob::new(RULES);
    const N: usize = 3_000;
    let producer = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for i in 0..N {
                enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"i": i}})).await;
            }
        })
    };
    let mut stored = 0;
    while !producer.is_finished() {
        stored += job.run(&pool).await.report.summary.ingested;
    }
    producer.await.unwrap();
    stored += job.run(&pool).await.report.summary.ingested;

    assert_eq!(stored as usize, N);
    assert_eq!(count(&pool, "select count(*) from events").await as usize, N);
    assert_eq!(count(&pool, "select count(distinct metadata->>'i') from events").await as usize, N);
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 0);
}

/// A drain reads each of the queue's index entries about twice (to pick its batch, to delete it),
/// however long the queue: the rows a batch deletes stay in the index until the run commits, so
/// a drain that starts every batch from the queue's first id steps over every earlier batch
/// again (40k rows in batches of 5k: 180k entries more), and one whose plan reads every row left
/// for every batch (a queue without statistics, as here) as many: a drain that grows with the
/// square of the queue. The count is PostgreSQL's own (`idx_tup_read`), flushed when the run's
/// connection closes.
#[sqlx::test(migrator = "MIGRATOR")]
async fn draining_a_long_queue_reads_each_queue_entry_about_once(pool: PgPool) {
    const N: i64 = 40_000;
    let job = TestJob::new(RULES);
    sqlx::query(
        "insert into event_queue (payload)
         select jsonb_build_object('EventTime', '2026-11-02T10:00:00Z', 'Metadata', jsonb_build_object('i', i))
         from generate_series(1, $1) i",
    )
    .bind(N)
    .execute(&pool)
    .await
    .unwrap();
    let path = job.path();
    let out = callrecon(&pool, &["run", "--job", path.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(count(&pool, "select count(*) from events").await, N);
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 0);
    let read_sql = "select coalesce(sum(idx_tup_read), 0)::bigint from pg_stat_user_indexes
                    where relname = 'event_queue'";
    let mut read = 0;
    for _ in 0..100 {
        sqlx::query("select pg_stat_clear_snapshot()").execute(&pool).await.unwrap();
        read = count(&pool, read_sql).await;
        if read >= N {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(read >= N, "the run's index reads were not counted within 10 s: {read}");
    assert!(read <= 2 * N + 10, "draining {N} queued rows read {read} entries of the queue's index");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn enqueue_command_puts_file_events_on_the_queue(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.csv");
    std::fs::write(&file, "SessionId,EventTime,Metadata\ns1,2026-11-02T10:00:00Z,\"{\"\"a\"\":1}\"\n,x,{oops\n")
        .unwrap();
    let out = callrecon(&pool, &["enqueue", file.to_str().unwrap()]).await;
    assert!(!out.status.success(), "a record that cannot be read makes the exit status non-zero");
    assert!(stderr(&out).contains("events.csv:3: the Metadata column is not valid JSON"), "{}", stderr(&out));
    let payloads: Vec<serde_json::Value> =
        sqlx::query_scalar("select payload from event_queue").fetch_all(&pool).await.unwrap();
    assert_eq!(payloads, [json!({"SessionId": "s1", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"a": 1}})]);
}

/// A queue batch that cannot be taken off the queue fails the run with that error (not with a
/// later statement's "transaction is aborted"), and leaves the queue and `events` as they were.
/// 12k queued events are three batches; with matching batches of 1k a page is 3k events, so the
/// first batch is stored (as a backlog) while the second is taken.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_failed_queue_batch_fails_the_run_with_its_own_error(pool: PgPool) {
    let job = TestJob::new(RULES);
    sqlx::query(
        "insert into event_queue (payload)
         select jsonb_build_object('EventTime', '2026-11-02T10:00:00Z', 'Metadata', jsonb_build_object('i', i))
         from generate_series(1, 12000) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::raw_sql(
        "create function refuse_7000() returns trigger language plpgsql as $$
         begin
             if (old.payload->'Metadata'->>'i')::int = 7000 then
                 raise exception 'queue row 7000 is locked by the test';
             end if;
             return old;
         end $$;
         create trigger refuse_7000 before delete on event_queue for each row execute function refuse_7000();",
    )
    .execute(&pool)
    .await
    .unwrap();

    let path = job.path();
    let out =
        callrecon_env(&pool, &["run", "--job", path.to_str().unwrap()], &[("CALLRECON_CHUNK_EVENTS", "1000")]).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("draining event_queue") && err.contains("queue row 7000 is locked by the test"), "{err}");
    assert!(!err.contains("transaction is aborted"), "{err}");
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 12000);
    assert_eq!(count(&pool, "select count(*) from events").await, 0);
}
