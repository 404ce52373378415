//! Applying: group fields, membership changes, rematch after a rule change.

use callrecon::run::{self, Mode};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

crate::both_layouts! {
    async fn group_fields_reach_every_call_of_the_group_including_one_added_later(pool: PgPool) {
        add_group(&pool, "g1", json!({})).await;
        Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").group("g1").insert(&pool).await;
        Call::new("c2", "2026-11-02T11:00:00Z", None).group("g1").insert(&pool).await;
        Call::new("solo", "2026-11-02T11:00:00Z", None).insert(&pool).await;
        let job = TestJob::new(RULES);
        enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"accountTier": "gold", "private": 1}})).await;
        job.run(&pool).await;
        assert_eq!(call_meta(&pool, "c1").await, json!({"accountTier": "gold", "private": 1}));
        assert_eq!(call_meta(&pool, "c2").await, json!({"accountTier": "gold"}), "group_fields only, not the rest");
        assert_eq!(group_meta(&pool, "g1").await, json!({"accountTier": "gold"}));
        assert_eq!(call_meta(&pool, "solo").await, json!({}));

        // Call data for the group lands later; an existing call joins the group.
        Call::new("c3", "2026-11-03T09:00:00Z", None).group("g1").insert(&pool).await;
        sqlx::query("update calls set call_group_id = 'g1' where id = 'solo'").execute(&pool).await.unwrap();
        let done = job.run(&pool).await;
        assert_eq!(done.report.summary.matched, 0);
        assert_eq!(call_meta(&pool, "c3").await, json!({"accountTier": "gold"}));
        assert_eq!(call_meta(&pool, "solo").await, json!({"accountTier": "gold"}));

        // A later event on another call of the group overrides the field for every call.
        Call::new("c4", "2026-11-03T12:00:00Z", None).session("s4").group("g1").insert(&pool).await;
        enqueue(
            &pool,
            json!({"SessionId": "s4", "EventTime": "2026-11-03T12:01:00Z", "Metadata": {"accountTier": "platinum"}}),
        )
        .await;
        job.run(&pool).await;
        for c in ["c1", "c2", "c3", "c4", "solo"] {
            assert_eq!(call_meta(&pool, c).await["accountTier"], "platinum", "{c}");
        }
        assert_eq!(call_meta(&pool, "c1").await["private"], 1, "c1 keeps its own fields");
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_recomputed_call_whose_value_stays_the_same_is_not_written(pool: PgPool) {
    add_group(&pool, "g1", json!({})).await;
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").group("g1").insert(&pool).await;
    Call::new("c2", "2026-11-02T11:00:00Z", None).session("s2").group("g1").insert(&pool).await;
    let job = TestJob::new(RULES);
    // Keys PostgreSQL orders its own way (by length first), escapes, nesting, numbers it prints
    // differently from how they were sent.
    let own = json!({"accountTier": "gold", "zz": 1.50, "a": {"y": [1, 2.0], "x": "\u{e9}\"\\n"},
                     "na\u{ef}ve": null, "bb": 1e3, "\u{1F600}": true, "big": 12345678901234567890u64});
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": own})).await;
    let first = job.run(&pool).await;
    assert_eq!(first.report.summary.calls_updated, 2, "c1 gets the event, c2 its group field");

    // An event on c2 with the same group field: both calls of the group are recomputed, only c2
    // gains a field; c1's value comes out as stored and is not written again.
    enqueue(
        &pool,
        json!({"SessionId": "s2", "EventTime": "2026-11-02T11:01:00Z", "Metadata": {"accountTier": "gold", "note": "x"}}),
    )
    .await;
    let second = job.run(&pool).await;
    assert_eq!(second.report.summary.calls_updated, 1, "only c2 changed");
    assert_eq!(second.report.summary.groups_updated, 0, "the group's value is unchanged");
    let stored: String =
        sqlx::query_scalar("select async_metadata::text from calls where id = 'c1'").fetch_one(&pool).await.unwrap();
    let sent: String =
        sqlx::query_scalar("select $1::jsonb::text").bind(own.to_string()).fetch_one(&pool).await.unwrap();
    assert_eq!(stored, sent);
    assert_eq!(call_meta(&pool, "c2").await, json!({"accountTier": "gold", "note": "x"}));
}

/// This run's new events are not read back from the database: their contributions are printed
/// from memory (`apply::jsonb_text`). Printed differently from PostgreSQL's jsonb, a value that
/// did not change would compare as changed and be written again.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_new_event_that_changes_nothing_writes_nothing(pool: PgPool) {
    add_group(&pool, "g1", json!({})).await;
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").group("g1").insert(&pool).await;
    Call::new("c2", "2026-11-02T11:00:00Z", None).group("g1").insert(&pool).await;
    let job = TestJob::new(RULES);
    // The group field too: its value reaches c2 and the group from the new event alone.
    let metadata = json!({"accountTier": {"b": 1e-7, "aa": [1.50, -0.0, 1e21], "a": "\u{e9}\"\\\n\u{1}"},
                          "zz": 2.5e-8, "bb": 1e3, "na\u{ef}ve": null, "big": 12345678901234567890u64});
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": metadata})).await;
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.matched, 1);
    // Equal as jsonb: numbers keep their text in memory (`1e-7` here, `0.0000001` stored).
    let equal = |call: &'static str, expected: serde_json::Value| {
        let pool = pool.clone();
        async move {
            let same: bool = sqlx::query_scalar("select async_metadata = $2 from calls where id = $1")
                .bind(call)
                .bind(&expected)
                .fetch_one(&pool)
                .await
                .unwrap();
            assert!(same, "{call}: {} is not {expected}", call_meta(&pool, call).await);
        }
    };
    equal("c1", metadata.clone()).await;
    equal("c2", json!({"accountTier": metadata["accountTier"]})).await;

    // The same metadata again, later: merged over the stored event, it changes nothing.
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:02:00Z", "Metadata": metadata})).await;
    let again = job.run(&pool).await;
    assert_eq!(again.report.summary.matched, 1);
    assert_eq!(again.report.summary.calls_updated, 0, "c1 and c2 come out as stored");
    assert_eq!(again.report.summary.groups_updated, 0);
}

/// `apply::jsonb_text` prints what PostgreSQL prints for the jsonb stored from the same value.
#[sqlx::test(migrator = "MIGRATOR")]
async fn values_print_as_postgresql_prints_them_as_jsonb(pool: PgPool) {
    let samples = [
        r#"{"b": 1, "aa": [1, 2.5, {"yy": null, "x": true}], "a": "q\"b\\s\n\t\u0001\u001f\u007f é / 😀"}"#,
        "0.1",
        "1.50",
        "100.0",
        "1e3",
        "1E+3",
        "1e21",
        "1.5e21",
        "1.5e-7",
        "-2.5E-8",
        "123.456e2",
        "-0.0",
        "-0",
        "0.000001",
        "1e16",
        "12345678901234567890",
        "-9223372036854775808",
        "1.7976931348623157e308",
        "5e-324",
        "[]",
        "{}",
        r#""""#,
        r#"[[], {}, [1, [2, [3]]], {"": 0, "ab": {"c": [{}]}}]"#,
    ];
    for text in samples {
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        // What the run binds when it stores an event.
        let stored: String =
            sqlx::query_scalar("select $1::jsonb::text").bind(value.to_string()).fetch_one(&pool).await.unwrap();
        assert_eq!(callrecon::apply::jsonb_text(&value), stored, "{text}");
    }
}

crate::both_layouts! {
    async fn a_call_the_platform_updates_while_the_run_writes_it_still_gets_its_value(pool: PgPool) {
        Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
        let job = TestJob::new(RULES);
        enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"note": "x"}})).await;
        // The platform writes the call (a new row version, elsewhere in the table) and has not
        // committed when the run reads it.
        let mut platform = pool.begin().await.unwrap();
        sqlx::query("update calls set dnis = '+18005550999' where id = 'c1'").execute(&mut *platform).await.unwrap();
        let run = spawn_run(&pool, job);
        // The run's write waits for the platform's row lock; the platform then commits.
        wait_for_lock_wait(&pool, None, "the row lock").await;
        platform.commit().await.unwrap();
        let (_job, done) = run.await.unwrap();
        assert_eq!(done.report.summary.calls_updated, 1);
        assert_eq!(call_meta(&pool, "c1").await, json!({"note": "x"}), "written where the row moved to");
        let dnis: String = sqlx::query_scalar("select dnis from calls where id = 'c1'").fetch_one(&pool).await.unwrap();
        assert_eq!(dnis, "+18005550999", "the platform's write stands");
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_run_applies_after_another_jobs_run_has_committed_and_keeps_its_events(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:05:00Z", "Metadata": {"mine": 1}})).await;
    // Another job's run is applying: it holds the apply lock and has matched an event to c1,
    // not committed yet.
    let other = other_jobs_apply(
        &pool,
        "s1",
        "2026-11-02T10:01:00Z",
        "c1",
        r#"{"theirs": 2, "mine": 0}"#,
        r#"{"theirs": 2, "mine": 0}"#,
    )
    .await;
    let run = spawn_run(&pool, job);
    wait_for_lock_wait(&pool, Some("advisory"), "the other apply").await;
    other.commit().await.unwrap();
    let (_job, done) = run.await.unwrap();
    assert_eq!(done.report.summary.matched, 1);
    // Both jobs' events, merged in EventTime order: this run's later event wins "mine".
    assert_eq!(call_meta(&pool, "c1").await, json!({"theirs": 2, "mine": 1}));
}

crate::both_layouts! {
    async fn call_that_leaves_a_group_loses_its_fields_and_takes_its_own_along(pool: PgPool) {
        add_group(&pool, "g1", json!({"caseNumber": "C-1"})).await;
        add_group(&pool, "g2", json!({})).await;
        Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").group("g1").insert(&pool).await;
        Call::new("c2", "2026-11-02T11:00:00Z", None).session("s2").group("g1").insert(&pool).await;
        let job = TestJob::new(RULES);
        enqueue(&pool, json!({"EventTime": "2026-11-02T10:01:00Z", "Metadata": {"crmCaseId": "C-1", "case": "open"}}))
            .await;
        enqueue(
            &pool,
            json!({"SessionId": "s2", "EventTime": "2026-11-02T11:01:00Z", "Metadata": {"crmAccountId": "A-2"}}),
        )
        .await;
        job.run(&pool).await;
        assert_eq!(call_meta(&pool, "c1").await, json!({"crmCaseId": "C-1", "case": "open", "crmAccountId": "A-2"}));
        assert_eq!(group_meta(&pool, "g1").await, json!({"crmCaseId": "C-1", "case": "open", "crmAccountId": "A-2"}));

        // c2 moves to g2: g1 and c1 lose its group field, g2 gains it, c2 loses g1's case.
        sqlx::query("update calls set call_group_id = 'g2' where id = 'c2'").execute(&pool).await.unwrap();
        job.run(&pool).await;
        assert_eq!(call_meta(&pool, "c1").await, json!({"crmCaseId": "C-1", "case": "open"}));
        assert_eq!(group_meta(&pool, "g1").await, json!({"crmCaseId": "C-1", "case": "open"}));
        assert_eq!(call_meta(&pool, "c2").await, json!({"crmAccountId": "A-2"}));
        assert_eq!(group_meta(&pool, "g2").await, json!({"crmAccountId": "A-2"}));
    }
}

crate::both_layouts! {
    /// Apply reads each touched call where matching saw it (its hint) and checks: a call that
    /// changed group in between is recomputed where it is now. Here the hints are wrong both ways.
    async fn a_call_found_elsewhere_than_matching_saw_it_is_recomputed_where_it_is(pool: PgPool) {
        use callrecon::apply;
        add_group(&pool, "g1", json!({})).await;
        add_group(&pool, "g2", json!({})).await;
        Call::new("grouped", "2026-11-02T10:00:00Z", None).group("g1").insert(&pool).await;
        Call::new("sibling", "2026-11-02T11:00:00Z", None).group("g1").insert(&pool).await;
        Call::new("solo", "2026-11-02T12:00:00Z", None).insert(&pool).await;
        Call::new("other", "2026-11-02T13:00:00Z", None).group("g2").insert(&pool).await;
        // Events matched and stored, not applied yet.
        for (call, metadata, part) in [
            ("grouped", json!({"accountTier": "gold", "own": 1}), json!({"accountTier": "gold"})),
            ("solo", json!({"own": 2}), json!({})),
        ] {
            sqlx::query(
                "insert into events (job, source, event_time, received_at, metadata, ingested_run, state,
                                     target_kind, target_id, rule, group_part)
                 values ('test', 'queue:0', '2026-11-02T10:01:00Z', now(), $1, 0, 'matched', 'call', $2, 'r', $3)",
            )
            .bind(metadata)
            .bind(call)
            .bind(part)
            .execute(&pool)
            .await
            .unwrap();
        }
        let hints = [("grouped", None), ("solo", Some("g2"))]
            .into_iter()
            .map(|(call, group)| (call.to_owned(), callrecon::calldata::Hint { group: group.map(str::to_owned), start: 0, block: 0 }))
            .collect();

        let mut tx = pool.begin().await.unwrap();
        apply::lock(&mut tx).await.unwrap();
        let touched = ["grouped".to_owned(), "solo".to_owned()];
        let targets = apply::Touched::take_changes(&mut tx, &touched, &[]).await.unwrap().with_hints(hints);
        let reader = apply::Reader::start(pool.acquire().await.unwrap(), targets, Default::default(), apply::Sizes::of(&callrecon::tuning::Tuning::default()));
        let applied = reader.merge(apply::ThisRun::default(), |_| {}).write(&mut tx).await.unwrap();
        tx.commit().await.unwrap();

        assert_eq!(applied, apply::Applied { calls_updated: 3, groups_updated: 1 });
        assert_eq!(call_meta(&pool, "grouped").await, json!({"accountTier": "gold", "own": 1}));
        assert_eq!(call_meta(&pool, "sibling").await, json!({"accountTier": "gold"}));
        assert_eq!(group_meta(&pool, "g1").await, json!({"accountTier": "gold"}));
        assert_eq!(call_meta(&pool, "solo").await, json!({"own": 2}));
        assert_eq!(call_meta(&pool, "other").await, json!({}));
        assert_eq!(group_meta(&pool, "g2").await, json!({}));
    }
}

/// A run merges its new events before they are stored, so before they have ids, which break
/// ties of EventTime: a new event tied with a stored one wins, as the later arrival, and the
/// value stays the same once both are stored and read back.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_new_event_tied_with_a_stored_one_wins_as_the_later_arrival(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    let at =
        |time: &str, metadata: serde_json::Value| json!({"SessionId": "s1", "EventTime": time, "Metadata": metadata});
    enqueue(&pool, at("2026-11-02T10:01:00Z", json!({"k": "first", "a": 1}))).await;
    job.run(&pool).await;
    enqueue(&pool, at("2026-11-02T10:01:00Z", json!({"k": "second"}))).await;
    enqueue(&pool, at("2026-11-02T10:01:00Z", json!({"k": "third"}))).await;
    job.run(&pool).await;
    assert_eq!(call_meta(&pool, "c1").await, json!({"k": "third", "a": 1}));
    // Recomputed from the stored events alone.
    enqueue(&pool, at("2026-11-02T09:00:00Z", json!({"b": 2}))).await;
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.calls_updated, 1);
    assert_eq!(call_meta(&pool, "c1").await, json!({"k": "third", "a": 1, "b": 2}));
}

/// Two calls of the same caller, 15 minutes apart, to agents a1 and a2.
pub async fn two_agent_calls(pool: &PgPool) {
    Call::new("c-a1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z"))
        .phone("5551234567", "a1")
        .insert(pool)
        .await;
    Call::new("c-a2", "2026-11-02T10:20:00Z", Some("2026-11-02T10:25:00Z"))
        .phone("5551234567", "a2")
        .insert(pool)
        .await;
}

/// Two calls of the same caller to different agents; the event names agent a1.
async fn two_agents(pool: &PgPool) -> TestJob {
    two_agent_calls(pool).await;
    let job = TestJob::new(RULES);
    enqueue(pool, json!({"EventTime": "2026-11-02T10:14:00Z", "Metadata": {"customerPhone": "5551234567", "agentId": "a1", "note": "x"}})).await;
    enqueue(pool, json!({"EventTime": "2026-11-02T09:00:00Z", "Metadata": {"customerPhone": "5551234567", "agentId": "a1", "early": true}})).await;
    job.run(pool).await;
    assert_eq!(call_meta(pool, "c-a1").await["note"], "x");
    job
}

crate::both_layouts! {
    async fn rematch_after_a_rule_change_moves_an_event_between_calls(pool: PgPool) {
        let job = two_agents(&pool).await;
        let new_rules = job.phone_only();
        assert_ne!(new_rules.rules_fingerprint, job.job.rules_fingerprint);

        let done =
            run::execute(&pool, &new_rules, Mode::Rematch { since: Some(t("2026-11-02T00:00:00Z")), until: None }, false)
                .await
                .unwrap();
        let diff = done.report.diff.as_ref().unwrap();
        assert_eq!((diff.evaluated, diff.moved, diff.newly_matched, diff.newly_unmatched, diff.unchanged), (2, 1, 1, 0, 0));
        let moved = diff.changes.iter().find(|c| c.change == callrecon::report::ChangeKind::Moved).unwrap();
        assert_eq!((moved.from.as_ref().unwrap().id.as_str(), moved.to.as_ref().unwrap().id.as_str()), ("c-a1", "c-a2"));
        // 10:14 is 6 minutes from c-a2 and 9 from c-a1: nearest wins now that agent is not a key.
        assert_eq!(call_meta(&pool, "c-a1").await, json!({"customerPhone": "5551234567", "agentId": "a1", "early": true}));
        assert_eq!(call_meta(&pool, "c-a2").await, json!({"customerPhone": "5551234567", "agentId": "a1", "note": "x"}));
        let fp: Vec<String> =
            sqlx::query_scalar("select distinct rules_fingerprint from events").fetch_all(&pool).await.unwrap();
        assert_eq!(fp, std::slice::from_ref(&new_rules.rules_fingerprint));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(done.dir.join("report.json")).unwrap()).unwrap();
        assert_eq!(report["kind"], "rematch");
        assert_eq!(report["diff"]["moved"], 1);
        assert!(std::fs::read_to_string(done.dir.join("report.html")).unwrap().contains("Rematch: what changed"));

        // Rematching again under the same rules changes nothing.
        let before = calls_snapshot(&pool).await;
        let again = run::execute(&pool, &new_rules, Mode::Rematch { since: None, until: None }, false).await.unwrap();
        assert_eq!(again.report.diff.as_ref().unwrap().unchanged, 2);
        assert_eq!(calls_snapshot(&pool).await, before);
    }
}

crate::both_layouts! {
    /// A rematch reads a stored event's group part and group fields only when they were taken
    /// with other group fields than the job's (events.group_fields_fingerprint): a moved event
    /// gets its group part from its stored metadata, and a change of group fields reaches every
    /// event, including those decided before the fingerprint was recorded.
    async fn a_rematch_takes_group_parts_with_the_job_s_group_fields(pool: PgPool) {
        add_group(&pool, "g1", json!({})).await;
        add_group(&pool, "g2", json!({})).await;
        Call::new("c-a1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).phone("5551234567", "a1").group("g1").insert(&pool).await;
        Call::new("c-a2", "2026-11-02T10:20:00Z", Some("2026-11-02T10:25:00Z")).phone("5551234567", "a2").group("g2").insert(&pool).await;
        Call::new("g1-other", "2026-11-02T12:00:00Z", None).group("g1").insert(&pool).await;
        Call::new("g2-other", "2026-11-02T12:00:00Z", None).group("g2").insert(&pool).await;
        let job = TestJob::new(RULES);
        let meta = json!({"customerPhone": "5551234567", "agentId": "a1", "accountTier": "gold", "crmAccountId": 7, "note": "x"});
        enqueue(&pool, json!({"EventTime": "2026-11-02T10:14:00Z", "Metadata": meta})).await;
        job.run(&pool).await;
        let both = json!({"accountTier": "gold", "crmAccountId": 7});
        assert_eq!(call_meta(&pool, "g1-other").await, both);
        let stored = |pool: PgPool| async move {
            sqlx::query_as::<_, (Option<String>, serde_json::Value, Option<String>)>(
                "select target_id, group_part, group_fields_fingerprint from events",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        };

        // The same group fields: the moved event's group part comes from its stored metadata.
        let rematch = |job: callrecon::job::Job, pool: PgPool| async move {
            run::execute(&pool, &job, Mode::Rematch { since: None, until: None }, false).await.unwrap()
        };
        let new_rules = job.phone_only();
        assert_eq!(rematch(new_rules.clone(), pool.clone()).await.report.diff.unwrap().moved, 1);
        let (target, part, fp) = stored(pool.clone()).await;
        assert_eq!((target.as_deref(), &part), (Some("c-a2"), &both));
        assert_eq!(fp.as_deref(), Some(new_rules.group_fields_fingerprint.as_str()));
        assert_eq!(call_meta(&pool, "g2-other").await, both);
        assert_eq!(call_meta(&pool, "g1-other").await, json!({}));

        // Fewer group fields: no decision changes, every group part does.
        let fewer = job.edit(&[("[\"accountTier\", \"crmAccountId\"]", "[\"accountTier\"]")]);
        assert_ne!(fewer.group_fields_fingerprint, new_rules.group_fields_fingerprint);
        let done = rematch(fewer.clone(), pool.clone()).await;
        assert_eq!(done.report.diff.unwrap().unchanged, 1);
        assert_eq!(stored(pool.clone()).await.1, json!({"accountTier": "gold"}));
        assert_eq!(call_meta(&pool, "g2-other").await, json!({"accountTier": "gold"}));

        // An event decided before the fingerprint was recorded, with other group fields.
        sqlx::query("update events set group_fields_fingerprint = null, group_part = $1").bind(&both).execute(&pool).await.unwrap();
        rematch(fewer.clone(), pool.clone()).await;
        let (_, part, fp) = stored(pool.clone()).await;
        assert_eq!((part, fp), (json!({"accountTier": "gold"}), Some(fewer.group_fields_fingerprint.clone())));
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn rematch_only_touches_events_in_range_and_never_session_attaches(pool: PgPool) {
    let job = two_agents(&pool).await;
    Call::new("c-s", "2026-11-02T10:00:00Z", None).session("s").insert(&pool).await;
    enqueue(&pool, json!({"SessionId": "s", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"viaSession": 1}})).await;
    job.run(&pool).await;
    let new_rules = job.phone_only();
    // Only the 10:14 event is in range.
    let done = run::execute(
        &pool,
        &new_rules,
        Mode::Rematch { since: Some(t("2026-11-02T10:00:00Z")), until: Some(t("2026-11-02T11:00:00Z")) },
        false,
    )
    .await
    .unwrap();
    let diff = done.report.diff.unwrap();
    assert_eq!((diff.evaluated, diff.moved), (1, 1));
    // The 09:00 event was out of range: not re-evaluated, so still unmatched (the new rules would match it).
    let early: (String, Option<i64>) = sqlx::query_as("select state, decided_run from events where metadata ? 'early'")
        .fetch_one(&pool)
        .await
        .unwrap();
    // decided_run is the run that last changed a decision: run 1; later runs confirmed it.
    assert_eq!(early, ("pending".into(), Some(1)));
    assert_eq!(call_meta(&pool, "c-a1").await, json!({}));
    assert_eq!(call_meta(&pool, "c-s").await, json!({"viaSession": 1}));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn rematch_dry_run_reports_the_diff_and_changes_nothing(pool: PgPool) {
    let job = two_agents(&pool).await;
    let new_rules = job.phone_only();
    let before = calls_snapshot(&pool).await;
    let events_before: Vec<(i64, Option<String>)> =
        sqlx::query_as("select id, target_id from events order by id").fetch_all(&pool).await.unwrap();

    let out =
        callrecon(&pool, &["rematch", "--job", job.path().to_str().unwrap(), "--since", "2026-11-02", "--dry-run"])
            .await;
    assert!(!out.status.success(), "a date without a time is refused");
    assert!(stderr(&out).contains("--since \"2026-11-02\""), "{}", stderr(&out));

    let out = callrecon(
        &pool,
        &["rematch", "--job", job.path().to_str().unwrap(), "--since", "2026-11-02 00:00:00", "--dry-run"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("dry run"), "{text}");
    let words = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(words.contains("rematch 2 events 1 newly matched · 1 moved"), "{text}");
    assert_eq!(calls_snapshot(&pool).await, before);
    let events_after: Vec<(i64, Option<String>)> =
        sqlx::query_as("select id, target_id from events order by id").fetch_all(&pool).await.unwrap();
    assert_eq!(events_after, events_before);
    drop(new_rules);
}

/// Runs, a pending event that finds its call, a later group field, and a rematch that moves an
/// event: the same call data whichever way apply reads (`env`). Batches of one group, so the
/// reader hands over several.
async fn apply_scenario(pool: &PgPool, env: &[(&str, &str)], reader: bool) {
    add_group(pool, "g1", json!({"caseNumber": "C-1"})).await;
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").group("g1").insert(pool).await;
    Call::new("c2", "2026-11-02T11:00:00Z", Some("2026-11-02T11:05:00Z"))
        .phone("5550000002", "a2")
        .group("g1")
        .insert(pool)
        .await;
    Call::new("c3", "2026-11-02T12:00:00Z", Some("2026-11-02T12:05:00Z")).phone("5550000003", "a3").insert(pool).await;
    two_agent_calls(pool).await;
    let job = TestJob::new(RULES);
    let path = job.path();
    let mut env = env.to_vec();
    env.push(("RUST_LOG", "callrecon=debug"));
    // Looking touched calls up in one pass over `calls` needs the planner's count of the table.
    let one_pass = env.iter().any(|(k, _)| *k == "CALLRECON_APPLY_SCAN_FROM");
    let run = async |args: &[&str]| {
        if one_pass {
            sqlx::query("analyze calls").execute(pool).await.unwrap();
        }
        let out = callrecon_env(pool, args, &env).await;
        assert!(out.status.success(), "{}", stderr(&out));
        // The reader's mark: this run's events are stored while it reads.
        assert_eq!(stderr(&out).contains("this run's events stored"), reader, "{}", stderr(&out));
        assert_eq!(stderr(&out).contains("looked up in one pass over calls"), one_pass, "{}", stderr(&out));
        // Every row found by its ctid (and, on a partitioned `calls`, in its partition).
        assert!(!stderr(&out).contains("writing by id"), "{}", stderr(&out));
        // And read where the plan placed it (by its hint, or its start on a partitioned `calls`).
        assert!(!stderr(&out).contains("found elsewhere than planned"), "{}", stderr(&out));
        stderr(&out)
    };
    let phone = |p: &str, a: &str, time: &str, extra: serde_json::Value| {
        let mut m = json!({"customerPhone": p, "agentId": a});
        m.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({"EventTime": time, "Metadata": m})
    };
    enqueue(
        pool,
        json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"accountTier": "gold", "own1": 1}}),
    )
    .await;
    enqueue(pool, phone("5550000002", "a2", "2026-11-02T11:02:00Z", json!({"crmAccountId": "A-2", "own2": 2}))).await;
    enqueue(pool, json!({"EventTime": "2026-11-02T11:30:00Z", "Metadata": {"crmCaseId": "C-1", "case": "open"}})).await;
    enqueue(pool, phone("5550000004", "a4", "2026-11-02T13:00:00Z", json!({"own4": 4}))).await;
    enqueue(pool, phone("5551234567", "a1", "2026-11-02T10:14:00Z", json!({"note": "x"}))).await;
    let first = run(&["run", "--job", path.to_str().unwrap()]).await;
    // So many touched calls (all of them, here) have their groups read in passes over the tables.
    assert_eq!(first.contains("a batch of groups read in passes"), one_pass, "{first}");
    let case = json!({"crmCaseId": "C-1", "case": "open"});
    let with = |a: serde_json::Value, b: &serde_json::Value| {
        let mut a = a;
        a.as_object_mut().unwrap().extend(b.as_object().unwrap().clone());
        a
    };
    assert_eq!(group_meta(pool, "g1").await, with(json!({"accountTier": "gold", "crmAccountId": "A-2"}), &case));
    assert_eq!(
        call_meta(pool, "c1").await,
        with(json!({"accountTier": "gold", "own1": 1, "crmAccountId": "A-2"}), &case)
    );
    let c2 = json!({"customerPhone": "5550000002", "agentId": "a2", "crmAccountId": "A-2", "own2": 2});
    assert_eq!(call_meta(pool, "c2").await, with(with(c2.clone(), &json!({"accountTier": "gold"})), &case));
    assert_eq!(call_meta(pool, "c3").await, json!({}));
    assert_eq!(call_meta(pool, "c-a1").await, json!({"customerPhone": "5551234567", "agentId": "a1", "note": "x"}));

    // The pending event's call arrives (a stored event decided again), a new event on c3, and a
    // later account tier on c1 for the whole group.
    Call::new("c4", "2026-11-02T12:55:00Z", Some("2026-11-02T13:05:00Z")).phone("5550000004", "a4").insert(pool).await;
    enqueue(pool, phone("5550000003", "a3", "2026-11-02T12:02:00Z", json!({"accountTier": "silver", "own3": 3}))).await;
    enqueue(
        pool,
        json!({"SessionId": "s1", "EventTime": "2026-11-02T10:30:00Z", "Metadata": {"accountTier": "platinum"}}),
    )
    .await;
    run(&["run", "--job", path.to_str().unwrap()]).await;
    assert_eq!(call_meta(pool, "c4").await, json!({"customerPhone": "5550000004", "agentId": "a4", "own4": 4}));
    assert_eq!(
        call_meta(pool, "c3").await,
        json!({"customerPhone": "5550000003", "agentId": "a3", "accountTier": "silver", "own3": 3})
    );
    let platinum = json!({"accountTier": "platinum"});
    assert_eq!(group_meta(pool, "g1").await, with(with(json!({"crmAccountId": "A-2"}), &case), &platinum));
    assert_eq!(call_meta(pool, "c1").await, with(with(json!({"own1": 1, "crmAccountId": "A-2"}), &case), &platinum));
    assert_eq!(call_meta(pool, "c2").await, with(with(c2, &case), &platinum));

    // Support drops the agent key: the 10:14 event moves to the nearer c-a2 (a stored event
    // whose old target the reader still sees).
    job.phone_only();
    run(&["rematch", "--job", path.to_str().unwrap(), "--since", "2026-11-02T00:00:00Z"]).await;
    assert_eq!(call_meta(pool, "c-a1").await, json!({}));
    assert_eq!(call_meta(pool, "c-a2").await, json!({"customerPhone": "5551234567", "agentId": "a1", "note": "x"}));
    assert_eq!(call_meta(pool, "c4").await, json!({"customerPhone": "5550000004", "agentId": "a4", "own4": 4}));
}

crate::both_layouts! {
    async fn apply_reading_on_a_second_connection_while_the_run_stores(pool: PgPool) {
        apply_scenario(&pool, &[("CALLRECON_APPLY_BATCH_GROUPS", "1")], true).await;
    }
}

crate::both_layouts! {
    async fn apply_reading_many_touched_calls_in_passes_over_calls(pool: PgPool) {
        let env = [
            ("CALLRECON_APPLY_BATCH_GROUPS", "1"),
            ("CALLRECON_APPLY_READER", "off"),
            ("CALLRECON_APPLY_SCAN_FROM", "1"),
            ("CALLRECON_APPLY_PASS_GROUPS", "1"),
        ];
        apply_scenario(&pool, &env, false).await;
    }
}

crate::both_layouts! {
    async fn apply_reading_after_the_run_has_stored(pool: PgPool) {
        apply_scenario(&pool, &[("CALLRECON_APPLY_BATCH_GROUPS", "1"), ("CALLRECON_APPLY_READER", "off")], false).await;
    }
}
