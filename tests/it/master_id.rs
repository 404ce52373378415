//! Events addressed to a call group by id (`MasterId`): from every source to the group and every
//! call in it, pending as `unknown_group` until the group lands or `pending_for` passes, never
//! rematched, merged with the other events of the same calls by EventTime.

use callrecon::run::{self, Mode};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// Group `g1` (case C-1) with calls `c1` (session `s1`, phone 5551234567 / agent a1) and `c2`;
/// `c3` is in no group.
async fn group_of_two(pool: &PgPool) {
    add_group(pool, "g1", json!({"caseNumber": "C-1"})).await;
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:10:00Z"))
        .session("s1")
        .group("g1")
        .phone("5551234567", "a1")
        .insert(pool)
        .await;
    Call::new("c2", "2026-11-02T11:00:00Z", Some("2026-11-02T11:05:00Z")).group("g1").insert(pool).await;
    Call::new("c3", "2026-11-02T12:00:00Z", Some("2026-11-02T12:05:00Z")).insert(pool).await;
}

/// `(master_id, state, reason, rule)` of every event, in id order.
async fn events(pool: &PgPool) -> Vec<(Option<String>, String, Option<String>, Option<String>)> {
    sqlx::query_as("select master_id, state, reason, rule from events order by id").fetch_all(pool).await.unwrap()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn master_id_from_every_source_reaches_the_group_and_each_of_its_calls(pool: PgPool) {
    group_of_two(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"MasterId": "g1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"fromQueue": 1}})).await;
    job.drop_file(
        "a.ndjson",
        "{\"masterId\": \"g1\", \"EventTime\": \"2026-11-02T10:02:00Z\", \"Metadata\": {\"fromNdjson\": 2}}\n",
    );
    job.drop_file(
        "b.json",
        r#"[{"MASTERID": " g1 ", "eventTime": "2026-11-02T10:03:00Z", "metadata": {"fromJson": 3}}]"#,
    );
    job.drop_file("c.csv", "EventTime,MasterId,fromCsv\n2026-11-02T10:04:00Z,g1,4\n");
    let done = job.run(&pool).await;

    let s = &done.report.summary;
    assert_eq!((s.ingested, s.rejected, s.matched, s.unmatched), (4, 0, 4, 0), "{:?}", done.report.rejected);
    assert_eq!(s.by_rule, [("master_id".to_owned(), 4)].into());
    let all = json!({"fromQueue": 1, "fromNdjson": 2, "fromJson": 3, "fromCsv": "4"});
    assert_eq!(group_meta(&pool, "g1").await, all);
    assert_eq!(call_meta(&pool, "c1").await, all);
    assert_eq!(call_meta(&pool, "c2").await, all);
    assert_eq!(call_meta(&pool, "c3").await, json!({}));
    // Attached to the group, as a group match is; the id is kept as sent (trimmed).
    let stored: Vec<(String, String, String)> =
        sqlx::query_as("select master_id, target_kind, target_id from events order by id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(stored.iter().all(|r| r == &("g1".to_owned(), "call_group".to_owned(), "g1".to_owned())), "{stored:?}");
    // The record of matches says the same as a from-scratch recomputation.
    let out = callrecon(&pool, &["verify"]).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

crate::both_layouts! {
    async fn a_call_that_joins_the_group_later_gets_the_fields_and_one_that_leaves_loses_them(pool: PgPool) {
        group_of_two(&pool).await;
        let job = TestJob::new(RULES);
        enqueue(&pool, json!({"MasterId": "g1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"case": "open"}})).await;
        job.run(&pool).await;
        assert_eq!(call_meta(&pool, "c2").await, json!({"case": "open"}));

        Call::new("c4", "2026-11-03T09:00:00Z", None).group("g1").insert(&pool).await;
        sqlx::query("update calls set call_group_id = null where id = 'c2'").execute(&pool).await.unwrap();
        let next = job.run(&pool).await;
        assert_eq!(next.report.summary.ingested, 0);
        assert_eq!(call_meta(&pool, "c4").await, json!({"case": "open"}));
        assert_eq!(call_meta(&pool, "c2").await, json!({}));
        assert_eq!(call_meta(&pool, "c1").await, json!({"case": "open"}));
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn unknown_group_stays_pending_then_attaches_when_the_group_lands(pool: PgPool) {
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"MasterId": "g-late", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"crm": "X"}})).await;
    let first = job.run(&pool).await;
    assert_eq!(first.report.summary.by_reason, [("unknown_group".to_owned(), 1)].into());
    assert_eq!(events(&pool).await, [(Some("g-late".into()), "pending".into(), Some("unknown_group".into()), None)]);

    // Every part of the report knows the reason and shows the group asked for.
    let report: Value = serde_json::from_slice(&std::fs::read(first.dir.join("report.json")).unwrap()).unwrap();
    let entry = &report["unmatched"][0];
    assert_eq!(
        (&entry["reason"], &entry["master_id"], &entry["session_id"]),
        (&json!("unknown_group"), &json!("g-late"), &Value::Null)
    );
    let mut csv = csv::Reader::from_path(first.dir.join("unmatched.csv")).unwrap();
    let headers = csv.headers().unwrap().clone();
    let row = csv.records().next().unwrap().unwrap();
    let cell = |name: &str| row[headers.iter().position(|h| h == name).unwrap()].to_owned();
    assert_eq!((cell("reason"), cell("master_id")), ("unknown_group".into(), "g-late".into()));
    let html = std::fs::read_to_string(first.dir.join("report.html")).unwrap();
    assert!(html.contains("unknown_group") && html.contains("its MasterId names no call group yet"), "{html}");
    let webhook = callrecon::report::webhook::payload(&first.report, &first.dir);
    assert_eq!(webhook["summary"]["by_reason"]["unknown_group"], 1);
    let id = sqlx::query_scalar::<_, i64>("select id from events").fetch_one(&pool).await.unwrap().to_string();
    let explain = callrecon(&pool, &["explain", "--job", job.path().to_str().unwrap(), &id]).await;
    assert!(stdout(&explain).contains("no call group has this id yet -> unknown_group"), "{}", stdout(&explain));

    // Still no group: still pending. Then the group and its call land.
    assert_eq!(job.run(&pool).await.report.summary.by_reason["unknown_group"], 1);
    add_group(&pool, "g-late", json!({})).await;
    Call::new("c-late", "2026-11-02T10:00:00Z", None).group("g-late").insert(&pool).await;
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.by_rule, [("master_id".to_owned(), 1)].into());
    assert_eq!(done.report.summary.unmatched, 0);
    assert_eq!(group_meta(&pool, "g-late").await, json!({"crm": "X"}));
    assert_eq!(call_meta(&pool, "c-late").await, json!({"crm": "X"}));
    let explain = callrecon(&pool, &["explain", "--job", job.path().to_str().unwrap(), &id]).await;
    assert!(stdout(&explain).contains("matched g-late by master_id"), "{}", stdout(&explain));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn unknown_group_expires_after_pending_for(pool: PgPool) {
    let job = TestJob::new(RULES);
    sqlx::query(
        "insert into event_queue (received_at, payload) values (now() - interval '73 hours', $1), (now() - interval '71 hours', $2)",
    )
    .bind(json!({"MasterId": "g-old", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"a": 1}}))
    .bind(json!({"MasterId": "g-young", "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"b": 2}}))
    .execute(&pool)
    .await
    .unwrap();
    let done = job.run(&pool).await;
    let reasons: Vec<(&str, &str, Option<&str>)> = done
        .report
        .unmatched
        .events
        .iter()
        .map(|u| (u.master_id.as_deref().unwrap(), u.reason.as_str(), u.last_reason.as_deref()))
        .collect();
    assert_eq!(reasons, [("g-old", "expired", Some("unknown_group")), ("g-young", "unknown_group", None)]);

    // An expired event is retried no more, even when its group lands.
    add_group(&pool, "g-old", json!({})).await;
    add_group(&pool, "g-young", json!({})).await;
    let next = job.run(&pool).await;
    assert_eq!(next.report.summary.by_rule, [("master_id".to_owned(), 1)].into());
    assert_eq!(group_meta(&pool, "g-old").await, json!({}));
    assert_eq!(group_meta(&pool, "g-young").await, json!({"b": 2}));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn session_id_and_master_id_together_are_rejected_naming_both(pool: PgPool) {
    group_of_two(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(
        &pool,
        json!({"SessionId": "s1", "MasterId": "g1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"a": 1}}),
    )
    .await;
    job.drop_file("both.csv", "SessionId,MasterId,EventTime\ns1,g1,2026-11-02T10:01:00Z\n,g1,2026-11-02T10:02:00Z\n");
    let done = job.run(&pool).await;
    let rejected: Vec<(&str, &str)> =
        done.report.rejected.iter().map(|r| (r.source.as_str(), r.reason.as_str())).collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!((rejected[0].0, rejected[1].0), ("queue:1", "inbox/both.csv:2"));
    for (_, reason) in &rejected {
        assert!(reason.contains("`SessionId`") && reason.contains("`MasterId`"), "{reason}");
    }
    // The row beside it is ingested.
    assert_eq!((done.report.summary.ingested, done.report.summary.matched), (1, 1));
    assert_eq!(call_meta(&pool, "c1").await, json!({}));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_rematch_leaves_master_id_attaches_alone(pool: PgPool) {
    group_of_two(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"MasterId": "g1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"viaMaster": 1}})).await;
    enqueue(&pool, json!({"MasterId": "g-none", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"never": 1}})).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:02:00Z", "Metadata": {"crmCaseId": "C-1", "viaCase": 1}})).await;
    job.run(&pool).await;
    assert_eq!(group_meta(&pool, "g1").await, json!({"viaMaster": 1, "crmCaseId": "C-1", "viaCase": 1}));

    // Support drops the case rule: the case event loses its group, the MasterId event keeps it,
    // and neither MasterId event is re-evaluated.
    let changed = job.edit(&[("metadata.caseNumber", "metadata.noSuchField")]);
    let done = run::execute(&pool, &changed, Mode::Rematch { since: None, until: None }, false).await.unwrap();
    let diff = done.report.diff.unwrap();
    assert_eq!((diff.evaluated, diff.newly_unmatched, diff.unchanged), (1, 1, 0));
    assert_eq!(group_meta(&pool, "g1").await, json!({"viaMaster": 1}));
    assert_eq!(call_meta(&pool, "c2").await, json!({"viaMaster": 1}));
    assert_eq!(
        events(&pool).await[..2],
        [
            (Some("g1".into()), "matched".into(), None, Some("master_id".into())),
            (Some("g-none".into()), "pending".into(), Some("unknown_group".into()), None)
        ]
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn master_id_session_and_rule_events_on_the_same_calls_merge_by_event_time(pool: PgPool) {
    group_of_two(&pool).await;
    let job = TestJob::new(RULES);
    // Arrival order is not EventTime order: the merge follows EventTime.
    for (time, payload) in [
        (
            "10:03",
            json!({"EventTime": "", "Metadata": {"customerPhone": "(555) 123-4567", "agentId": "a1", "k": "rule", "r": 1}}),
        ),
        ("10:00", json!({"MasterId": "g1", "EventTime": "", "Metadata": {"k": "master-early", "m0": 1}})),
        ("10:04", json!({"MasterId": "g1", "EventTime": "", "Metadata": {"k": "master-late", "m1": 1}})),
        ("10:02", json!({"SessionId": "s1", "EventTime": "", "Metadata": {"k": "session", "s": 1}})),
        ("10:01", json!({"EventTime": "", "Metadata": {"crmCaseId": "C-1", "k": "case", "g": 1}})),
    ] {
        let mut payload = payload;
        payload["EventTime"] = json!(format!("2026-11-02T{time}:00Z"));
        enqueue(&pool, payload).await;
    }
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.matched, 5);
    let on_c1 = json!({"k": "master-late", "m0": 1, "m1": 1, "g": 1, "crmCaseId": "C-1", "s": 1,
                       "customerPhone": "(555) 123-4567", "agentId": "a1", "r": 1});
    assert_eq!(call_meta(&pool, "c1").await, on_c1);
    let group = json!({"k": "master-late", "m0": 1, "m1": 1, "g": 1, "crmCaseId": "C-1"});
    assert_eq!(call_meta(&pool, "c2").await, group);
    assert_eq!(group_meta(&pool, "g1").await, group);

    // A later rule-matched event wins over the MasterId events on its call only.
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:05:00Z", "Metadata": {"customerPhone": "5551234567", "agentId": "a1", "k": "rule-late"}}))
        .await;
    job.run(&pool).await;
    assert_eq!(call_meta(&pool, "c1").await["k"], "rule-late");
    assert_eq!(call_meta(&pool, "c2").await["k"], "master-late");
}
