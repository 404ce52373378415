//! A run retries a pending sessionless event only where calls or call groups changed since the
//! job's last run with the same rules; every event whose decision can change still changes.

use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// One call rule (no group rule), reporting ties.
const CALL_RULE: &str = r#"
[[rules]]
name = "phone-and-agent"
target = "call"
keys = [ { event = "customerPhone", call = "ani", normalize = "phone" },
         { event = "agentId", call = "agent_id" } ]
window = { before = "10m", after = "10m" }
ambiguous = "report"
"#;

/// A run of the binary that always looks for what can have changed (no threshold); returns how
/// many stored events it read to decide again, and its stderr.
async fn run(pool: &PgPool, job: &TestJob) -> (i64, String) {
    settle(pool).await;
    let out =
        callrecon_env(pool, &["run", "--job", job.path().to_str().unwrap()], &[("CALLRECON_RETRY_ALL_BELOW", "0")])
            .await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let line = err.lines().find(|l| l.contains("stored events to match read")).expect("the read is logged");
    let read = line.split("events=").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    (read, err)
}

/// Waits until every transaction that began before now has ended, other tests' too: a run
/// counts as changed every row written by a transaction as new as the oldest one running when
/// it starts, so without this the rows written before the last run could count again. The tests
/// that settle run one at a time (`serially`), so that none waits for another's runs.
async fn settle(pool: &PgPool) {
    let xid = |sql: &'static str| async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.unwrap() };
    let now = xid("select pg_snapshot_xmax(pg_current_snapshot())::text::bigint").await;
    for _ in 0..1200 {
        if xid("select pg_snapshot_xmin(pg_current_snapshot())::text::bigint").await >= now {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("transactions older than the test's writes still running after 60 s");
}

async fn event(pool: &PgPool, crm: &str) -> (String, Option<String>, Option<String>) {
    sqlx::query_as("select state, reason, target_id from events where metadata->>'crmCaseId' = $1")
        .bind(crm)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn sessionless(time: &str, phone: Option<&str>, crm: &str) -> serde_json::Value {
    let mut metadata = json!({"agentId": "a1", "crmCaseId": crm});
    if let Some(p) = phone {
        metadata["customerPhone"] = json!(p);
    }
    json!({"EventTime": time, "Metadata": metadata})
}

crate::both_layouts! {
async fn only_events_whose_calls_changed_are_retried_and_each_such_change_is_seen(pool: PgPool) {
    let _one_at_a_time = serially("retry").await;
    let job = TestJob::new(CALL_RULE);
    // Calls that match nothing yet: one beside "far" with another phone, two tied for "tie", one
    // an hour from "wider" (outside the 10-minute window).
    Call::new("c-far", "2026-11-05T10:03:00Z", None).phone("5550000999", "a1").insert(&pool).await;
    Call::new("c-tie1", "2026-11-03T10:02:00Z", None).phone("5550000004", "a1").insert(&pool).await;
    Call::new("c-tie2", "2026-11-03T09:58:00Z", None).phone("5550000004", "a1").insert(&pool).await;
    Call::new("c-wider", "2026-11-07T11:00:00Z", None).phone("5550000005", "a1").insert(&pool).await;
    enqueue(&pool, sessionless("2026-11-02T10:00:00Z", Some("5550000001"), "near")).await;
    enqueue(&pool, sessionless("2026-11-05T10:00:00Z", Some("5550000002"), "far")).await;
    enqueue(&pool, sessionless("2026-11-02T10:00:00Z", None, "keyless")).await;
    enqueue(&pool, sessionless("2026-11-03T10:00:00Z", Some("5550000004"), "tie")).await;
    enqueue(&pool, sessionless("2026-11-07T10:00:00Z", Some("5550000005"), "wider")).await;
    // No earlier run: everything is decided (as it arrives).
    let (read, err) = run(&pool, &job).await;
    assert_eq!(read, 0, "{err}");
    assert!(err.contains("no earlier run of the job decided with these rules"), "{err}");
    assert_eq!(event(&pool, "near").await.1.as_deref(), Some("no_candidate"));
    assert_eq!(event(&pool, "keyless").await.1.as_deref(), Some("missing_key"));
    assert_eq!(event(&pool, "tie").await.1.as_deref(), Some("ambiguous"));

    // Nothing changed: only the tie is retried (a deleted call could settle it), and an event
    // an earlier run left pending that expires now.
    sqlx::query(
        "insert into events (job, source, event_time, received_at, metadata, ingested_run, state, reason, decided_run)
         values ('test', 'queue', '2026-11-02T10:00:00Z', now() - interval '4 days', '{\"crmCaseId\": \"old\"}', 0,
                 'pending', 'no_candidate', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();

    let (read, err) = run(&pool, &job).await;
    assert_eq!(read, 2, "{err}");
    assert!(err.contains("pending events retried only where calls changed"), "{err}");
    assert_eq!(event(&pool, "old").await.0, "expired");

    // A new call beside "near", and "c-far" now has "far"'s phone: both are retried and match;
    // "wider" is not read, nor "keyless" beside "near" (no rule finds its keys: calls play no
    // part).
    Call::new("c-near", "2026-11-02T10:02:00Z", None).phone("5550000001", "a1").insert(&pool).await;
    sqlx::query("update calls set ani = '5550000002' where id = 'c-far'").execute(&pool).await.unwrap();
    let (read, err) = run(&pool, &job).await;
    assert_eq!(read, 3, "near, far and the tie\n{err}");
    assert_eq!(event(&pool, "near").await, ("matched".into(), None, Some("c-near".into())));
    assert_eq!(event(&pool, "far").await, ("matched".into(), None, Some("c-far".into())));
    assert_eq!(call_meta(&pool, "c-near").await["crmCaseId"], "near");
    assert_eq!(event(&pool, "tie").await.1.as_deref(), Some("ambiguous"));

    // A deletion settles the tie; apply's own writes of the last run count as changes (a
    // platform change can hide behind them), so the events near them are read again: none left.
    sqlx::query("delete from calls where id = 'c-tie2'").execute(&pool).await.unwrap();
    let (read, err) = run(&pool, &job).await;
    assert_eq!(read, 1, "{err}");
    assert_eq!(event(&pool, "tie").await, ("matched".into(), None, Some("c-tie1".into())));

    // Other rules: no run decided with them, so everything pending is retried, and the wider
    // window matches "wider" to the call an hour away that did not change.
    let wider =
        TestJob::new(&CALL_RULE.replace("before = \"10m\", after = \"10m\"", "before = \"2h\", after = \"2h\""));
    let (read, err) = run(&pool, &wider).await;
    assert_eq!(read, 2, "keyless and wider\n{err}");
    assert_eq!(event(&pool, "wider").await, ("matched".into(), None, Some("c-wider".into())));
    assert_eq!(event(&pool, "keyless").await.1.as_deref(), Some("missing_key"));
}
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_new_call_group_retries_every_event_of_a_job_with_group_rules(pool: PgPool) {
    let _one_at_a_time = serially("retry").await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"crmCaseId": "CASE-1"}})).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"crmCaseId": "CASE-2"}})).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"note": "no key"}})).await;
    run(&pool, &job).await;
    let (read, err) = run(&pool, &job).await;
    assert_eq!(read, 0, "{err}");
    add_group(&pool, "g1", json!({"caseNumber": "CASE-1"})).await;
    let (read, err) = run(&pool, &job).await;
    assert_eq!(read, 2, "both cases; not the event missing a key\n{err}");
    assert!(err.contains("call data changed everywhere"), "{err}");
    assert_eq!(event(&pool, "CASE-1").await, ("matched".into(), None, Some("g1".into())));
    assert_eq!(event(&pool, "CASE-2").await.1.as_deref(), Some("no_candidate"));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_small_backlog_is_retried_whole_by_default(pool: PgPool) {
    let job = TestJob::new(CALL_RULE);
    enqueue(&pool, sessionless("2026-11-02T10:00:00Z", Some("5550000001"), "near")).await;
    for _ in 0..2 {
        let out = callrecon(&pool, &["run", "--job", job.path().to_str().unwrap()]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!stderr(&out).contains("retried only where"), "{}", stderr(&out));
    }
    assert!(stderr(&callrecon(&pool, &["run", "--job", job.path().to_str().unwrap()]).await).contains("events=1 "));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_event_reopened_by_hand_is_decided_again_though_no_call_changed(pool: PgPool) {
    let _one_at_a_time = serially("retry").await;
    let job = TestJob::new(CALL_RULE);
    let path = job.path();
    let path = path.to_str().unwrap();
    Call::new("c1", "2026-11-02T10:02:00Z", None).phone("5550000001", "a2").insert(&pool).await;
    enqueue(&pool, sessionless("2026-11-02T10:00:00Z", Some("5550000001"), "near")).await;
    run(&pool, &job).await;
    assert_eq!(event(&pool, "near").await.1.as_deref(), Some("no_candidate"));
    let id: i64 = sqlx::query_scalar("select id from events").fetch_one(&pool).await.unwrap();
    let out = callrecon(
        &pool,
        &["resolve", "--job", path, &id.to_string(), "--to", "dismiss", "--by", "ana", "--note", "test"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    // The call becomes the event's match while the event is dismissed; the next run sees that
    // change, but the event is not pending then.
    sqlx::query("update calls set agent_id = 'a1' where id = 'c1'").execute(&pool).await.unwrap();
    run(&pool, &job).await;
    let out = callrecon(&pool, &["reopen", "--job", path, &id.to_string(), "--by", "ana"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // No call changed since that run, but the reopened event has no decision of a run's.
    let (read, err) = run(&pool, &job).await;
    assert_eq!(read, 1, "{err}");
    assert_eq!(event(&pool, "near").await, ("matched".into(), None, Some("c1".into())));
}
