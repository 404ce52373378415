//! The rule cascade: table-driven cases on the engine, then whole runs against PostgreSQL.

use std::collections::HashMap;
use std::path::Path;

use callrecon::decision::{Decision, Reason, TargetKind};
use callrecon::job::{self, TargetField};
use callrecon::matching::engine::{Candidates, EventIn, match_events};
use callrecon::pgcopy::Texts;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::*;

/// Calls used by the table: (id, start, end, ani, agent).
const CALLS: &[(&str, &str, Option<&str>, &str, &str)] = &[
    ("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z"), "+1 (555) 123-4567", "a1"),
    // Same caller and agent 30 minutes later.
    ("c2", "2026-11-02T10:30:00Z", Some("2026-11-02T10:35:00Z"), "5551234567", "a1"),
    // Still running (no end): the window closes `after` past its start.
    ("c3", "2026-11-02T12:00:00Z", None, "5559990000", "a2"),
    // Two calls of the same caller and agent: 10:20 is 5 minutes from each.
    ("c4", "2026-11-02T14:00:00Z", Some("2026-11-02T14:15:00Z"), "5557770000", "a3"),
    ("c5", "2026-11-02T14:25:00Z", Some("2026-11-02T14:30:00Z"), "5557770000", "a3"),
    // Numeric agent ids.
    ("c6", "2026-11-02T16:00:00Z", Some("2026-11-02T16:05:00Z"), "5551112222", "42"),
];

/// Call groups: (id, caseNumber).
const GROUPS: &[(&str, &str)] = &[("g1", "C-1"), ("g2", "C-2"), ("g2b", "C-2")];

fn targets() -> (Candidates, Candidates) {
    let mut calls = Candidates::default();
    let (mut ani, mut agent) = (Texts::default(), Texts::default());
    for (id, start, end, a, g) in CALLS {
        calls.ids.push(Some(id));
        calls.start.push(t(start).timestamp_micros());
        calls.end.push(t(end.unwrap_or(start)).timestamp_micros());
        ani.push(Some(a));
        agent.push(Some(g));
    }
    calls.fields = HashMap::from([(TargetField::Column("ani"), ani), (TargetField::Column("agent_id"), agent)]);
    let groups = Candidates {
        ids: GROUPS.iter().map(|g| Some(g.0)).collect(),
        fields: HashMap::from([(
            TargetField::Metadata(vec!["caseNumber".into()]),
            GROUPS.iter().map(|g| Some(g.1)).collect(),
        )]),
        ..Candidates::default()
    };
    (calls, groups)
}

fn rules(extra: &str) -> Vec<job::Rule> {
    let text = format!(
        "name = \"t\"\n{}",
        RULES.replace("[apply]\ngroup_fields = [\"accountTier\", \"crmAccountId\"]\n", "") + extra
    );
    job::parse(Path::new("t.toml"), &text).unwrap().rules
}

fn decide(rule_text: &str, events: &[(&str, Value)]) -> Vec<Decision> {
    let rules = rules(rule_text);
    let (calls, groups) = targets();
    let metas: Vec<serde_json::Map<String, Value>> = events.iter().map(|e| e.1.as_object().unwrap().clone()).collect();
    let input: Vec<EventIn> = events
        .iter()
        .zip(&metas)
        .enumerate()
        .map(|(i, (e, m))| EventIn { id: i as i64, time: t(e.0).timestamp_micros(), metadata: m })
        .collect();
    match_events(&rules, &input, &calls, &groups).unwrap()
}

fn matched(rule: &str, target: &str) -> Decision {
    let kind = if target.starts_with('g') { TargetKind::CallGroup } else { TargetKind::Call };
    Decision::Matched { rule: rule.into(), kind, target: target.into() }
}

fn unmatched(reason: Reason, candidates: &[&str]) -> Decision {
    Decision::Unmatched { reason, candidates: candidates.iter().map(|c| c.to_string()).collect() }
}

fn phone(p: &str, agent: &str) -> Value {
    json!({"customerPhone": p, "agentId": agent})
}

/// One row of the table: event time, metadata, expected decision.
fn check(rule_text: &str, cases: Vec<(&str, Value, Decision)>) {
    let events: Vec<(&str, Value)> = cases.iter().map(|c| (c.0, c.1.clone())).collect();
    let got = decide(rule_text, &events);
    assert_eq!(got.len(), cases.len(), "one decision per event: {got:?}");
    for ((time, meta, expected), got) in cases.iter().zip(got) {
        assert_eq!(&got, expected, "event at {time} {meta}");
    }
}

#[test]
fn every_phone_form_matches_the_same_call() {
    let at = "2026-11-02T10:02:00Z";
    check(
        "",
        vec![
            (at, phone("(555) 123-4567", "a1"), matched("phone-and-agent", "c1")),
            (at, phone("+1 555-123-4567", "a1"), matched("phone-and-agent", "c1")),
            (at, phone("15551234567", "a1"), matched("phone-and-agent", "c1")),
            (at, phone("5551234567", "a1"), matched("phone-and-agent", "c1")),
            (at, phone("555.123.4567", "a1"), matched("phone-and-agent", "c1")),
            (at, phone("25551234567", "a1"), unmatched(Reason::NoCandidate, &[])),
            (at, phone("5551234567", "A1"), unmatched(Reason::NoCandidate, &[])),
        ],
    );
}

#[test]
fn window_edges_are_inclusive() {
    check(
        "",
        vec![
            // c1 runs 10:00-10:05, window 10m either side.
            ("2026-11-02T09:50:00Z", phone("5551234567", "a1"), matched("phone-and-agent", "c1")),
            ("2026-11-02T09:49:59.999Z", phone("5551234567", "a1"), unmatched(Reason::NoCandidate, &[])),
            ("2026-11-02T10:15:00Z", phone("5551234567", "a1"), matched("phone-and-agent", "c1")),
            ("2026-11-02T10:15:00.001Z", phone("5551234567", "a1"), unmatched(Reason::NoCandidate, &[])),
            // ended_at null: coalesce(ended_at, started_at) + after.
            ("2026-11-02T12:10:00Z", phone("5559990000", "a2"), matched("phone-and-agent", "c3")),
            ("2026-11-02T12:10:01Z", phone("5559990000", "a2"), unmatched(Reason::NoCandidate, &[])),
            ("2026-11-02T11:50:00Z", phone("5559990000", "a2"), matched("phone-and-agent", "c3")),
        ],
    );
}

#[test]
fn nearest_takes_the_closest_and_a_tie_stays_ambiguous() {
    check(
        "",
        vec![
            // 14:18 is 3 min after c4 and 7 min before c5.
            ("2026-11-02T14:18:00Z", phone("5557770000", "a3"), matched("phone-and-agent", "c4")),
            ("2026-11-02T14:22:00Z", phone("5557770000", "a3"), matched("phone-and-agent", "c5")),
            // Inside c4 (distance 0) while c5 is 10 min away.
            ("2026-11-02T14:15:00Z", phone("5557770000", "a3"), matched("phone-and-agent", "c4")),
            // 14:20 is 5 min from both.
            ("2026-11-02T14:20:00Z", phone("5557770000", "a3"), unmatched(Reason::Ambiguous, &["c4", "c5"])),
        ],
    );
}

#[test]
fn report_mode_is_ambiguous_whenever_several() {
    let report = "";
    let cases = vec![
        ("2026-11-02T14:18:00Z", phone("5557770000", "a3"), unmatched(Reason::Ambiguous, &["c4", "c5"])),
        ("2026-11-02T10:02:00Z", phone("5551234567", "a1"), matched("phone-and-agent", "c1")),
    ];
    let events: Vec<(&str, Value)> = cases.iter().map(|c| (c.0, c.1.clone())).collect();
    let text = format!("name = \"t\"\n{}", RULES.replace("ambiguous = \"nearest\"", "ambiguous = \"report\"")) + report;
    let rules = job::parse(Path::new("t.toml"), &text).unwrap().rules;
    let (calls, groups) = targets();
    let metas: Vec<_> = events.iter().map(|e| e.1.as_object().unwrap().clone()).collect();
    let input: Vec<EventIn> = events
        .iter()
        .zip(&metas)
        .enumerate()
        .map(|(i, (e, m))| EventIn { id: i as i64, time: t(e.0).timestamp_micros(), metadata: m })
        .collect();
    let got = match_events(&rules, &input, &calls, &groups).unwrap();
    assert_eq!(got, cases.into_iter().map(|c| c.2).collect::<Vec<_>>());
}

#[test]
fn cascade_and_reasons() {
    check(
        "",
        vec![
            // First rule finds nothing (no phone key), second matches the group by metadata path.
            ("2026-11-02T10:02:00Z", json!({"crmCaseId": "C-1"}), matched("crm-case", "g1")),
            // First rule has keys but no candidate: the second still decides.
            (
                "2026-11-02T10:02:00Z",
                json!({"customerPhone": "5550000000", "agentId": "a1", "crmCaseId": "C-1"}),
                matched("crm-case", "g1"),
            ),
            // First rule ambiguous: the cascade ends there, even though crm-case would match.
            (
                "2026-11-02T14:20:00Z",
                json!({"customerPhone": "5557770000", "agentId": "a3", "crmCaseId": "C-1"}),
                unmatched(Reason::Ambiguous, &["c4", "c5"]),
            ),
            // Two groups share C-2: ambiguous (groups have no time to be nearer).
            ("2026-11-02T10:02:00Z", json!({"crmCaseId": "C-2"}), unmatched(Reason::Ambiguous, &["g2", "g2b"])),
            // A key present but only one of two keys of the first rule, none of the second.
            ("2026-11-02T10:02:00Z", json!({"customerPhone": "5551234567"}), unmatched(Reason::MissingKey, &[])),
            ("2026-11-02T10:02:00Z", json!({"other": 1}), unmatched(Reason::MissingKey, &[])),
            // Null and empty values are missing.
            ("2026-11-02T10:02:00Z", json!({"crmCaseId": null}), unmatched(Reason::MissingKey, &[])),
            ("2026-11-02T10:02:00Z", json!({"customerPhone": "", "agentId": "a1"}), unmatched(Reason::MissingKey, &[])),
            ("2026-11-02T10:02:00Z", json!({"crmCaseId": "C-9"}), unmatched(Reason::NoCandidate, &[])),
        ],
    );
}

#[test]
fn numeric_key_compares_as_text() {
    check(
        "",
        vec![(
            "2026-11-02T16:01:00Z",
            json!({"customerPhone": 5551112222u64, "agentId": 42}),
            matched("phone-and-agent", "c6"),
        )],
    );
}

#[test]
fn shuffling_the_input_never_changes_a_decision() {
    let mut events: Vec<(&str, Value)> = Vec::new();
    let times = [
        "2026-11-02T10:02:00Z",
        "2026-11-02T10:20:00Z",
        "2026-11-02T14:18:00Z",
        "2026-11-02T14:20:00Z",
        "2026-11-02T12:05:00Z",
    ];
    let metas = [
        phone("5551234567", "a1"),
        phone("5557770000", "a3"),
        phone("5559990000", "a2"),
        json!({"crmCaseId": "C-1"}),
        json!({"crmCaseId": "C-2"}),
        json!({}),
    ];
    for t in times {
        for m in &metas {
            events.push((t, m.clone()));
        }
    }
    let baseline = decide("", &events);
    // A small deterministic generator: the same permutations on every run.
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..50 {
        let mut order: Vec<usize> = (0..events.len()).collect();
        for i in (1..order.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        let shuffled: Vec<(&str, Value)> = order.iter().map(|&i| events[i].clone()).collect();
        let got = decide("", &shuffled);
        for (pos, &i) in order.iter().enumerate() {
            assert_eq!(got[pos], baseline[i], "event {i} ({:?}) decided differently after shuffling", events[i]);
        }
    }
}

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

crate::both_layouts! {
    async fn mixed_session_and_sessionless_events_in_one_run(pool: PgPool) {
        add_group(&pool, "g1", json!({"caseNumber": "C-1"})).await;
        Call::new("c1", "2026-11-02T15:00:00Z", Some("2026-11-02T15:05:00Z"))
            .session("s1")
            .group("g1")
            .phone("5551234567", "a1")
            .insert(&pool)
            .await;
        Call::new("c2", "2026-11-02T15:00:00Z", Some("2026-11-02T15:05:00Z")).phone("5552223333", "a2").insert(&pool).await;
        let job = TestJob::new(RULES);
        // A naive EventTime: 10:02 in New York on 2026-11-02 is 15:02Z.
        job.drop_file(
            "mixed.ndjson",
            "{\"SessionId\": \"s1\", \"EventTime\": \"2026-11-02T15:01:00Z\", \"Metadata\": {\"viaSession\": true}}\n\
             {\"EventTime\": \"2026-11-02 10:02:00\", \"Metadata\": {\"customerPhone\": \"+1 555-222-3333\", \"agentId\": \"a2\", \"accountTier\": \"gold\"}}\n\
             {\"EventTime\": \"2026-11-02T15:03:00Z\", \"Metadata\": {\"crmCaseId\": \"C-1\", \"case\": \"open\"}}\n\
             {\"EventTime\": \"2026-11-02T18:00:00Z\", \"Metadata\": {\"customerPhone\": \"5552223333\", \"agentId\": \"a2\"}}\n",
        );
        let done = job.run(&pool).await;
        let s = &done.report.summary;
        assert_eq!((s.matched, s.unmatched), (3, 1));
        assert_eq!(s.by_rule, [("crm-case".into(), 1), ("phone-and-agent".into(), 1), ("session_id".into(), 1)].into());
        assert_eq!(done.report.unmatched.events[0].reason, "no_candidate");
        assert_eq!(call_meta(&pool, "c1").await, json!({"viaSession": true, "crmCaseId": "C-1", "case": "open"}));
        assert_eq!(
            call_meta(&pool, "c2").await,
            json!({"customerPhone": "+1 555-222-3333", "agentId": "a2", "accountTier": "gold"})
        );
        assert_eq!(group_meta(&pool, "g1").await, json!({"crmCaseId": "C-1", "case": "open"}));
        // Every decision is recorded with its rule or its reason.
        let rows: Vec<(String, Option<String>, Option<String>)> =
            sqlx::query_as("select state, rule, reason from events order by id").fetch_all(&pool).await.unwrap();
        assert_eq!(
            rows,
            [
                ("matched".into(), Some("session_id".into()), None),
                ("matched".into(), Some("phone-and-agent".into()), None),
                ("matched".into(), Some("crm-case".into()), None),
                ("pending".into(), None, Some("no_candidate".into())),
            ]
        );
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn sessionless_event_matches_after_its_call_lands(pool: PgPool) {
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"EventTime": "2026-11-02T15:01:00Z", "Metadata": {"customerPhone": "5551234567", "agentId": "a1", "x": 1}})).await;
    let first = job.run(&pool).await;
    assert_eq!(first.report.unmatched.events[0].reason, "no_candidate");
    Call::new("c1", "2026-11-02T15:00:00Z", Some("2026-11-02T15:05:00Z")).phone("5551234567", "a1").insert(&pool).await;
    let second = job.run(&pool).await;
    assert_eq!(second.report.summary.by_rule["phone-and-agent"], 1);
    assert_eq!(call_meta(&pool, "c1").await["x"], 1);
}

crate::both_layouts! {
    async fn explain_answers_for_matched_and_unmatched_events(pool: PgPool) {
        Call::new("c4", "2026-11-02T14:00:00Z", Some("2026-11-02T14:15:00Z")).phone("5557770000", "a3").insert(&pool).await;
        Call::new("c5", "2026-11-02T14:25:00Z", Some("2026-11-02T14:30:00Z")).phone("5557770000", "a3").insert(&pool).await;
        let job = TestJob::new(RULES);
        let ev = |t: &str| json!({"EventTime": t, "Metadata": {"customerPhone": "+1 555 777 0000", "agentId": "a3"}});
        enqueue(&pool, ev("2026-11-02T14:18:00Z")).await; // nearer c4
        enqueue(&pool, ev("2026-11-02T14:20:00Z")).await; // a tie
        enqueue(&pool, json!({"EventTime": "2026-11-02T14:20:00Z", "Metadata": {"crmCaseId": "C-404"}})).await;
        job.run(&pool).await;
        let path = job.path();
        let explain = |id: &'static str| {
            let pool = pool.clone();
            let path = path.clone();
            async move { callrecon(&pool, &["explain", "--job", path.to_str().unwrap(), id]).await }
        };

        let out = explain("1").await;
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains("stored decision: matched c4 by phone-and-agent"), "{text}");
        assert!(text.contains("key customerPhone        \"5557770000\""), "{text}");
        assert!(text.contains("2 target(s) share these keys"), "{text}");
        assert!(text.contains("c4 (180s away)") && text.contains("c5 (420s away)"), "{text}");
        assert!(text.contains("-> matched c4"), "{text}");

        let text = stdout(&explain("2").await);
        assert!(text.contains("stored decision: pending (ambiguous), candidates c4, c5"), "{text}");
        assert!(text.contains("-> ambiguous between c4, c5; the cascade stops here"), "{text}");

        let text = stdout(&explain("3").await);
        assert!(text.contains("rule 1 `phone-and-agent`\n  key customerPhone        (missing)"), "{text}");
        assert!(
            text.contains("rule 2 `crm-case`\n  key crmCaseId            \"C-404\"\n  0 target(s) share these keys"),
            "{text}"
        );
        assert!(text.contains("result: unmatched (no_candidate)"), "{text}");

        let missing = explain("99").await;
        assert!(!missing.status.success());
        assert!(stderr(&missing).contains("no event 99"));
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn naive_event_time_on_a_dst_change_day_matches_in_the_job_time_zone(pool: PgPool) {
    // New York springs forward at 2026-03-08 02:00 EST. 03:30 EDT is 07:30Z; 01:30 EST is 06:30Z.
    Call::new("after", "2026-03-08T07:29:00Z", Some("2026-03-08T07:31:00Z"))
        .phone("5551234567", "a1")
        .insert(&pool)
        .await;
    Call::new("before", "2026-03-08T06:29:00Z", Some("2026-03-08T06:31:00Z"))
        .phone("5551234567", "a2")
        .insert(&pool)
        .await;
    let job = TestJob::new(
        &RULES
            .replace("window = { before = \"10m\", after = \"10m\" }", "window = { before = \"0s\", after = \"0s\" }"),
    );
    job.drop_file(
        "dst.csv",
        "EventTime,customerPhone,agentId\n2026-03-08 03:30:00,5551234567,a1\n2026-03-08 01:30:00,5551234567,a2\n",
    );
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.matched, 2, "{:?}", done.report.unmatched.events);
    assert_eq!(call_meta(&pool, "after").await["agentId"], "a1");
    assert_eq!(call_meta(&pool, "before").await["agentId"], "a2");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn group_rules_read_groups_by_normalised_keys(pool: PgPool) {
    add_group(&pool, "g-phone", json!({"phone": "+1 (555) 123-4567"})).await;
    add_group(&pool, "g-ref", json!({"ref": "REF-00042"})).await;
    add_group(&pool, "g-num", json!({"ref": 777})).await;
    for i in 0..50 {
        add_group(
            &pool,
            &format!("g-other-{i}"),
            json!({"phone": format!("555000{i:04}"), "ref": format!("X-{}", 1000 + i)}),
        )
        .await;
    }
    let rules = r#"
[[rules]]
name = "by-phone"
target = "call_group"
keys = [ { event = "phone", call_group = "metadata.phone", normalize = "phone" } ]

[[rules]]
name = "by-ref"
target = "call_group"
keys = [ { event = "ref", call_group = "metadata.ref", normalize = "digits" } ]
"#;
    let job = TestJob::new(rules);
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"phone": "15551234567"}})).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"ref": "42"}})).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"ref": "#00042"}})).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"ref": 777}})).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"ref": "REF-9"}})).await;
    let done = job.run(&pool).await;
    let targets: Vec<(Option<String>, Option<String>)> =
        sqlx::query_as("select target_id, reason from events order by id").fetch_all(&pool).await.unwrap();
    assert_eq!(
        targets,
        [
            (Some("g-phone".into()), None),
            (None, Some("no_candidate".into())), // digits "42" is not "00042"
            (Some("g-ref".into()), None),
            (Some("g-num".into()), None),
            (None, Some("no_candidate".into())),
        ]
    );
    assert_eq!(done.report.summary.matched, 3);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn call_rule_on_a_metadata_path_with_a_quote(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).insert(&pool).await;
    Call::new("c2", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).insert(&pool).await;
    sqlx::query("update calls set metadata = jsonb_build_object('crm', jsonb_build_object('o''brien', 'REF-' || id))")
        .execute(&pool)
        .await
        .unwrap();
    let rules = r#"
[[rules]]
name = "by-ref"
target = "call"
keys = [ { event = "ref", call = "metadata.crm.o'brien" } ]
window = { before = "1m", after = "1m" }
"#;
    let job = TestJob::new(rules);
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:02:00Z", "Metadata": {"ref": "REF-c2"}})).await;
    assert_eq!(job.run(&pool).await.report.summary.matched, 1);
    assert_eq!(call_meta(&pool, "c2").await, json!({"ref": "REF-c2"}));
}

/// Metadata paths reach the COPY that reads calls as SQL text (COPY takes no parameters): a
/// quote or a backslash in one must read as itself, whatever `standard_conforming_strings` the
/// database sets.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_metadata_path_with_quotes_and_backslashes_reads_as_itself_whatever_the_string_settings(pool: PgPool) {
    let db: String = sqlx::query_scalar("select current_database()").fetch_one(&pool).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("alter database \"{db}\" set standard_conforming_strings = off")))
        .execute(&pool)
        .await
        .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().connect_with((*pool.connect_options()).clone()).await.unwrap();
    let off: String = sqlx::query_scalar("show standard_conforming_strings").fetch_one(&pool).await.unwrap();
    assert_eq!(off, "off");
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).insert(&pool).await;
    Call::new("c2", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).insert(&pool).await;
    sqlx::query("update calls set metadata = jsonb_build_object('crm', jsonb_build_object($1::text, 'REF-' || id))")
        .bind(r"o'b\x41'; --")
        .execute(&pool)
        .await
        .unwrap();
    let rules = r#"
[[rules]]
name = "by-ref"
target = "call"
keys = [ { event = "ref", call = "metadata.crm.o'b\\x41'; --" } ]
window = { before = "1m", after = "1m" }
"#;
    let job = TestJob::new(rules);
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:02:00Z", "Metadata": {"ref": "REF-c2"}})).await;
    assert_eq!(job.run(&pool).await.report.summary.matched, 1);
    assert_eq!(call_meta(&pool, "c2").await, json!({"ref": "REF-c2"}));
}

crate::both_layouts! {
    async fn a_call_of_three_days_matches_an_event_on_its_second_day(pool: PgPool) {
        Call::new("marathon", "2026-11-01T00:00:00Z", Some("2026-11-04T00:00:00Z"))
            .phone("5551234567", "a1")
            .insert(&pool)
            .await;
        Call::new("short", "2026-11-02T11:00:00Z", Some("2026-11-02T11:05:00Z"))
            .phone("5550000000", "a1")
            .insert(&pool)
            .await;
        let job = TestJob::new(RULES);
        enqueue(
            &pool,
            json!({"EventTime": "2026-11-02T11:02:00Z", "Metadata": {"customerPhone": "5551234567", "agentId": "a1"}}),
        )
        .await;
        enqueue(
            &pool,
            json!({"EventTime": "2026-11-02T11:03:00Z", "Metadata": {"customerPhone": "5550000000", "agentId": "a1"}}),
        )
        .await;
        let done = job.run(&pool).await;
        assert_eq!(done.report.summary.matched, 2, "{:?}", done.report.unmatched.events);
        assert_eq!(call_meta(&pool, "marathon").await["customerPhone"], "5551234567");
    }
}

/// A chunk's calls read on two connections (a rematch's: the later half of the range of starts
/// on the second) are the calls read on one: the calls at either end and at the midpoint once,
/// the long calls started before the range with the first half, the same columns with them.
#[sqlx::test(migrator = "MIGRATOR")]
async fn calls_read_on_two_connections_are_the_calls_read_on_one(pool: PgPool) {
    // An event at 12:00 with windows 1 h either side: starts 09:00 (12:00 − 1 h − the 2 h a call
    // may last) to 13:00, halved at 11:00; a call must end at 11:00 or later.
    let calls = [
        ("at-lo", "2026-11-02T09:00:00Z", Some("2026-11-02T11:05:00Z")),
        ("ended-early", "2026-11-02T09:30:00Z", Some("2026-11-02T10:00:00Z")),
        ("at-mid", "2026-11-02T11:00:00Z", None),
        ("late", "2026-11-02T12:00:00Z", Some("2026-11-02T12:05:00Z")),
        ("at-hi", "2026-11-02T13:00:00Z", Some("2026-11-02T13:05:00Z")),
        ("after-hi", "2026-11-02T13:00:00.000001Z", None),
        ("long", "2026-11-02T07:00:00Z", Some("2026-11-02T11:30:00Z")),
        ("long-ended-early", "2026-11-02T07:00:00Z", Some("2026-11-02T10:30:00Z")),
    ];
    for g in ["g0", "g1"] {
        add_group(&pool, g, json!({})).await;
    }
    for (i, (id, start, end)) in calls.into_iter().enumerate() {
        Call::new(id, start, end).group(&format!("g{}", i % 2)).phone(&format!("555{i}"), "a1").insert(&pool).await;
    }
    let fields = [TargetField::Column("ani"), TargetField::Column("agent_id")];
    let at = t("2026-11-02T12:00:00Z");
    let hour = chrono::Duration::hours(1);
    for placed in [false, true] {
        let mut reads = Vec::new();
        for second in [false, true] {
            let mut conn = pool.acquire().await.unwrap();
            let other = if second { Some(pool.acquire().await.unwrap()) } else { None };
            let (calls, placement) =
                callrecon::calldata::load_calls(&mut conn, other, &fields, (at, at), (hour, hour), placed, 0)
                    .await
                    .unwrap();
            let mut rows: Vec<String> = (0..calls.ids.len())
                .map(|i| {
                    let values: Vec<&str> = fields.iter().map(|f| calls.fields[f].str(i)).collect();
                    let hint = placement.hint(i).map(|h| (h.group, h.start));
                    format!("{} {} {} {values:?} {hint:?}", calls.ids.str(i), calls.start[i], calls.end[i])
                })
                .collect();
            rows.sort();
            reads.push(rows);
        }
        let ids: Vec<&str> = reads[1].iter().map(|r| r.split(' ').next().unwrap()).collect();
        assert_eq!(ids, ["at-hi", "at-lo", "at-mid", "late", "long"], "placed: {placed}");
        assert_eq!(reads[0], reads[1], "placed: {placed}");
    }
}

/// A batch's call groups are read with a plan for that batch's key values. A statement cached on
/// the connection is planned generically from its sixth execution on, and PostgreSQL then
/// compares every group with each key value in turn: in a 4× rematch in pages of 60k events,
/// each page's group read went from 0.3 s to 12–14 s from the sixth page on (bench/RESULTS.md).
/// So that statement is never cached on the connection that runs it.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_group_read_by_key_values_is_planned_for_its_values_each_time(pool: PgPool) {
    for i in 0..20 {
        add_group(&pool, &format!("g{i}"), json!({"ref": format!("R-{i}")})).await;
    }
    let mut conn = pool.acquire().await.unwrap();
    let fields = [TargetField::Metadata(vec!["ref".into()])];
    for page in 0..7 {
        let filters = [callrecon::calldata::GroupFilter {
            field: fields[0].clone(),
            normalize: None,
            values: vec![format!("R-{page}"), "R-none".into()],
        }];
        let groups = callrecon::calldata::load_groups(&mut conn, &fields, Some(&filters)).await.unwrap();
        assert_eq!(groups.ids.len(), 1, "page {page}");
        assert_eq!(groups.ids.str(0), format!("g{page}"));
    }
    // Unnamed itself, so that it does not list itself.
    let cached: Vec<String> = sqlx::query_scalar(
        "select statement from pg_prepared_statements where statement like '%from call_groups where%'",
    )
    .persistent(false)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert!(cached.is_empty(), "cached on the connection: {cached:?}");
}
