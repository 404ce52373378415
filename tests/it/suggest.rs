//! `callrecon suggest`: rule changes learned from the analysts' attaches, simulated on the
//! job's events, accepted into the job file; on the real database.

use std::collections::BTreeSet;

use callrecon::db::MIGRATOR;
use callrecon::resolve::{Request, To};
use callrecon::suggest::{self, Scope, Suggestion, Suggestions};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::*;

/// Phone (raw, no normaliser) and agent, ten minutes either side, nearest of ties.
const RAW_PHONE: &str = r#"
[[rules]]
name = "phone-and-agent"   # the CRM's fields
target = "call"
keys = [ { event = "customerPhone", call = "ani" },
         { event = "agentId", call = "agent_id" } ]
window = { before = "10m", after = "10m" }
ambiguous = "nearest"
"#;

/// Call `c{i}`: 5 minutes from 08:00 + 30 min × i on 2026-11-02, phone 55512300ii, agent a(i%3).
async fn call(pool: &PgPool, i: i64) {
    let start = t("2026-11-02T08:00:00Z") + chrono::Duration::minutes(30 * i);
    sqlx::query("insert into calls (id, started_at, ended_at, ani, agent_id) values ($1, $2, $3, $4, $5)")
        .bind(format!("c{i}"))
        .bind(start)
        .bind(start + chrono::Duration::minutes(5))
        .bind(format!("55512300{i:02}"))
        .bind(format!("a{}", i % 3))
        .execute(pool)
        .await
        .unwrap();
}

/// An event about call `i`, `seconds` after its start, with `phone` and `agent`, tagged `tag`.
async fn event(pool: &PgPool, i: i64, seconds: i64, phone: &str, agent: &str, tag: &str) {
    let time = t("2026-11-02T08:00:00Z") + chrono::Duration::minutes(30 * i) + chrono::Duration::seconds(seconds);
    enqueue(
        pool,
        json!({"EventTime": time.to_rfc3339(), "Metadata": {"customerPhone": phone, "agentId": agent, "tag": tag}}),
    )
    .await;
}

/// A tag without digits (digits in a tag would agree with the calls' ids under `digits`).
fn tag(kind: &str, i: i64) -> String {
    format!("{kind}-{}{}", (b'a' + (i / 26) as u8) as char, (b'a' + (i % 26) as u8) as char)
}

async fn id_of(pool: &PgPool, tag: &str) -> i64 {
    sqlx::query_scalar("select id from events where metadata ->> 'tag' = $1").bind(tag).fetch_one(pool).await.unwrap()
}

/// Analysts' decisions: each tagged event to its `to`.
async fn decide(pool: &PgPool, job: &TestJob, decisions: &[(String, To)]) {
    let mut requests = Vec::new();
    for (tag, to) in decisions {
        let event_id = id_of(pool, tag).await;
        let note = (*to == To::Dismiss).then(|| "a test call".to_owned());
        requests.push(Request { line: None, event_id, to: to.clone(), note, reported_reason: None, seen: None });
    }
    callrecon::resolve::resolve(pool, &job.job, &requests, "alice", false).await.unwrap();
}

fn attach(tag: String, call: i64) -> (String, To) {
    (tag, To::Attach(callrecon::decision::TargetKind::Call, format!("c{call}")))
}

async fn suggestions(pool: &PgPool, job: &TestJob) -> Suggestions {
    suggest::suggest(pool, &job.job, Scope::default(), suggest::MIN_SUPPORT).await.unwrap()
}

fn find<'s>(found: &'s Suggestions, kind: &str, change: &str) -> &'s Suggestion {
    found.suggestions.iter().find(|s| s.kind == kind && s.change.contains(change)).unwrap_or_else(|| {
        panic!(
            "no {kind} suggestion with {change:?} in {:#?}",
            found.suggestions.iter().map(|s| &s.change).collect::<Vec<_>>()
        )
    })
}

/// The ids of events not matched now.
async fn unmatched(pool: &PgPool) -> BTreeSet<i64> {
    sqlx::query_scalar::<_, i64>("select id from events where state <> 'matched'")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// The issue's scenario: a feed whose phones come as 555.123.00ii (the rule compares raw), and
/// callbacks 20½-31½ minutes after the call (the window says 10). Analysts attach a dozen of each;
/// four more of each wait; four events match today.
pub(crate) async fn dotted_phones_and_late_callbacks(pool: &PgPool) -> TestJob {
    for i in 0..36 {
        call(pool, i).await;
    }
    let job = TestJob::new(RAW_PHONE);
    for i in 0..12 {
        event(pool, i, 120, &format!("555.123.00{i:02}"), &format!("a{}", i % 3), &tag("dotted", i)).await;
    }
    for i in 12..24 {
        // 20½ to 31½ minutes after the call's end: the window must become 32 minutes.
        event(pool, i, (5 + 8 + i) * 60 + 30, &format!("55512300{i:02}"), &format!("a{}", i % 3), &tag("late", i))
            .await;
    }
    for i in 24..28 {
        event(pool, i, 180, &format!("555.123.00{i:02}"), &format!("a{}", i % 3), &tag("dotted", i)).await;
    }
    for i in 28..32 {
        event(pool, i, (5 + 25) * 60, &format!("55512300{i:02}"), &format!("a{}", i % 3), &tag("late", i)).await;
    }
    for i in 32..36 {
        event(pool, i, 60, &format!("55512300{i:02}"), &format!("a{}", i % 3), &tag("ok", i)).await;
    }
    let done = job.run(pool).await;
    assert_eq!(done.report.summary.matched, 4);
    let mut decisions: Vec<(String, To)> = (0..12).map(|i| attach(tag("dotted", i), i)).collect();
    decisions.extend((12..24).map(|i| attach(tag("late", i), i)));
    decide(pool, &job, &decisions).await;
    job
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_normaliser_and_a_window_are_suggested_and_match_what_the_rematch_then_matches(pool: PgPool) {
    let job = dotted_phones_and_late_callbacks(&pool).await;
    let found = suggestions(&pool, &job).await;

    let phone = find(&found, "normalize", "\"phone\"");
    assert_eq!(phone.rule.as_deref(), Some("phone-and-agent"));
    assert_eq!((phone.support, phone.simulated.matched_more, phone.simulated.conflicts), (12, 4, 0), "{phone:#?}");
    let window = find(&found, "window", "after = \"32m\"");
    assert!(!window.change.contains("before"), "{}", window.change);
    assert_eq!((window.support, window.simulated.matched_more, window.simulated.conflicts), (12, 4, 0), "{window:#?}");
    assert_eq!(window.simulated.changed, 0);
    let late: BTreeSet<i64> = [
        id_of(&pool, &tag("late", 28)).await,
        id_of(&pool, &tag("late", 29)).await,
        id_of(&pool, &tag("late", 30)).await,
    ]
    .into_iter()
    .collect();
    assert_eq!(window.simulated.examples.matched_more.iter().copied().collect::<BTreeSet<_>>(), late);
    // The simulation wrote nothing.
    assert_eq!(count(&pool, "select count(*) from events where state = 'matched'").await, 4 + 24);

    // Ids come from the change: the same on the same data.
    let again = suggestions(&pool, &job).await;
    let ids = |s: &Suggestions| s.suggestions.iter().map(|s| (s.id.clone(), s.change.clone())).collect::<Vec<_>>();
    assert_eq!(ids(&found), ids(&again));

    // Accepted, written and rematched through the binary: exactly the simulated events match.
    let before = unmatched(&pool).await;
    let path = job.path().to_string_lossy().into_owned();
    let out = callrecon(&pool, &["suggest", "--job", &path, "--accept", &window.id, "--write", "--rematch"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("+window = { before = \"10m\", after = \"32m\" }"), "{}", stdout(&out));
    let now_matched: BTreeSet<i64> = before.difference(&unmatched(&pool).await).copied().collect();
    assert_eq!(now_matched, late.iter().copied().chain([id_of(&pool, &tag("late", 31)).await]).collect());
    assert_eq!(now_matched.len() as u64, window.simulated.matched_more);
    let text = std::fs::read_to_string(job.path()).unwrap();
    assert_eq!(text, window.job_file);
    assert!(text.contains("# the CRM's fields"), "comments kept:\n{text}");

    // `run` takes the written job file; the normaliser, accepted next, still matches its four.
    let out = callrecon(&pool, &["run", "--job", &path]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let job = TestJob { job: callrecon::job::load(&job.path()).unwrap(), ..job };
    let found = suggestions(&pool, &job).await;
    let phone = find(&found, "normalize", "\"phone\"");
    // The late attaches are inside the window now: the normaliser would have made them too.
    assert_eq!((phone.support, phone.simulated.matched_more, phone.simulated.conflicts), (24, 4, 0));
    let before = unmatched(&pool).await;
    let accepted = suggest::accept(&pool, &job.job, Scope::default(), &phone.id).await.unwrap();
    suggest::write(&job.job, &accepted).unwrap();
    let changed = callrecon::job::load(&job.path()).unwrap();
    let mode = callrecon::run::Mode::Rematch { since: None, until: None };
    callrecon::run::execute(&pool, &changed, mode, false).await.unwrap();
    let now_matched: BTreeSet<i64> = before.difference(&unmatched(&pool).await).copied().collect();
    assert_eq!(now_matched.len() as u64, phone.simulated.matched_more);
    assert!(phone.simulated.examples.matched_more.iter().all(|id| now_matched.contains(id)));
}

/// Agent ids the CRM gets wrong: dropping the agent key matches the attached events, but also a
/// dismissed one, and it turns a confirmed match into a tie (report).
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_change_that_matches_dismissed_events_or_moves_confirmed_matches_shows_conflicts(pool: PgPool) {
    for i in 0..8 {
        call(&pool, i).await;
    }
    // c7's phone again, for another agent, on a call overlapping c7.
    sqlx::query(
        "insert into calls (id, started_at, ended_at, ani, agent_id) values ('twin', $1, $2, '5551230007', 'a9')",
    )
    .bind(t("2026-11-02T11:31:00Z"))
    .bind(t("2026-11-02T11:36:00Z"))
    .execute(&pool)
    .await
    .unwrap();
    let job = TestJob::new(&RAW_PHONE.replace("\"nearest\"", "\"report\""));
    for i in 0..5 {
        event(&pool, i, 120, &format!("55512300{i:02}"), "zz", &tag("wrong-agent", i)).await;
    }
    event(&pool, 5, 120, "5551230005", "zz", "test-call").await;
    event(&pool, 6, 120, "5551230006", "zz", "pending").await;
    event(&pool, 7, 120, "5551230007", "a1", "confirmed").await;
    job.run(&pool).await;
    let mut decisions: Vec<(String, To)> = (0..5).map(|i| attach(tag("wrong-agent", i), i)).collect();
    decisions.push(("test-call".into(), To::Dismiss));
    decide(&pool, &job, &decisions).await;

    let found = suggestions(&pool, &job).await;
    let drop = find(&found, "drop_key", "drop key agentId -> agent_id");
    assert_eq!(drop.support, 5);
    assert_eq!(drop.simulated.matched_more, 1);
    assert_eq!(drop.simulated.examples.matched_more, [id_of(&pool, "pending").await]);
    assert_eq!(drop.simulated.changed, 1);
    assert_eq!(drop.simulated.examples.changed, [id_of(&pool, "confirmed").await]);
    assert_eq!(drop.simulated.conflicts, 2);
    let conflicts: BTreeSet<i64> = drop.simulated.examples.conflicts.iter().copied().collect();
    assert_eq!(conflicts, [id_of(&pool, "test-call").await, id_of(&pool, "confirmed").await].into_iter().collect());
    // Ranked after every suggestion without conflicts.
    let rank = found.suggestions.iter().position(|s| s.id == drop.id).unwrap();
    assert!(found.suggestions[..rank].iter().all(|s| s.simulated.conflicts == 0));
    assert!(found.suggestions[rank..].iter().all(|s| s.simulated.conflicts > 0));
}

/// Events carrying the dialled extension, which no rule compares: a new rule `ext = dnis`.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_new_rule_is_suggested_from_a_metadata_key_agreeing_with_a_call_column(pool: PgPool) {
    for i in 0..6 {
        call(&pool, i).await;
        sqlx::query("update calls set dnis = $1 where id = $2")
            .bind(format!("47{i:02}"))
            .bind(format!("c{i}"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let job = TestJob::new(RAW_PHONE);
    for i in 0..6 {
        let time = t("2026-11-02T08:00:00Z") + chrono::Duration::minutes(30 * i + 4);
        enqueue(
            &pool,
            json!({"EventTime": time.to_rfc3339(), "Metadata": {"ext": format!("ext 47{i:02}"), "tag": tag("ext", i)}}),
        )
        .await;
    }
    job.run(&pool).await;
    decide(&pool, &job, &(0..4).map(|i| attach(tag("ext", i), i)).collect::<Vec<_>>()).await;

    let found = suggestions(&pool, &job).await;
    let rule = find(&found, "new_rule", "ext = dnis normalised with \"digits\"");
    assert_eq!(rule.rule.as_deref(), Some("suggested-ext-dnis"));
    assert_eq!((rule.support, rule.simulated.matched_more, rule.simulated.conflicts), (4, 2, 0), "{rule:#?}");
    let job_file = callrecon::job::parse(&job.path(), &rule.job_file).unwrap();
    assert_eq!(job_file.rules.len(), 2);
    assert!(rule.change.contains("window before = \"0m\", after = \"0m\""), "{}", rule.change);
}

/// Two calls of one caller and agent 35 minutes apart; the rule reports ties, the analysts take
/// the nearer call every time.
#[sqlx::test(migrator = "MIGRATOR")]
async fn nearest_is_suggested_when_the_analysts_always_took_the_nearest_tied_call(pool: PgPool) {
    for i in 0..5 {
        let start = t("2026-11-02T08:00:00Z") + chrono::Duration::hours(2 * i);
        for (id, offset) in [(format!("near{i}"), 0), (format!("far{i}"), 35)] {
            sqlx::query(
                "insert into calls (id, started_at, ended_at, ani, agent_id) values ($1, $2, $3, '5550000000', 'a1')",
            )
            .bind(id)
            .bind(start + chrono::Duration::minutes(offset))
            .bind(start + chrono::Duration::minutes(offset + 5))
            .execute(&pool)
            .await
            .unwrap();
        }
        let time = start + chrono::Duration::minutes(8);
        enqueue(&pool, json!({"EventTime": time.to_rfc3339(), "Metadata": {"customerPhone": "5550000000", "agentId": "a1", "tag": tag("tie", i)}})).await;
    }
    let job = TestJob::new(&RAW_PHONE.replace("\"10m\"", "\"60m\"").replace("\"nearest\"", "\"report\""));
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.by_reason.get("ambiguous"), Some(&5));
    let decisions: Vec<(String, To)> = (0..3)
        .map(|i| (tag("tie", i), To::Attach(callrecon::decision::TargetKind::Call, format!("near{i}"))))
        .collect();
    decide(&pool, &job, &decisions).await;

    let found = suggestions(&pool, &job).await;
    let nearest = find(&found, "ambiguous_nearest", "ambiguous = \"nearest\"");
    assert_eq!((nearest.support, nearest.simulated.matched_more, nearest.simulated.conflicts), (3, 2, 0));
    assert_eq!(nearest.simulated.ambiguous_more, 0);
}

/// A run after analysts decided events by hand says that conflict-free changes exist; a run
/// after none does not look.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_run_after_manual_decisions_reports_the_conflict_free_suggestions(pool: PgPool) {
    let job = dotted_phones_and_late_callbacks(&pool).await;
    let done = job.run(&pool).await;
    let suggested = done.report.suggested.clone().expect("a line about suggestions");
    assert_eq!((suggested.changes, suggested.matched_more), (4, 4), "{suggested:?}");
    let text = callrecon::report::history::summary_text(&done.report, &done.dir);
    assert!(
        text.contains(
            "suggest        4 rule changes without conflicts would match up to 4 more events: `callrecon suggest --job"
        ),
        "{text}"
    );
    let json: Value = serde_json::from_slice(&std::fs::read(done.dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["suggested"]["changes"], 4);
    let again = job.run(&pool).await;
    assert_eq!(again.report.suggested, None, "no manual decision since the previous run");
}

/// The contract's JSON shape, `--min-support`, and the text a person reads, through the binary.
#[sqlx::test(migrator = "MIGRATOR")]
async fn suggest_prints_the_contracts_json_and_honours_min_support(pool: PgPool) {
    let job = dotted_phones_and_late_callbacks(&pool).await;
    let path = job.path().to_string_lossy().into_owned();
    let out = callrecon(&pool, &["suggest", "--job", &path, "--format", "json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<BTreeSet<String>>();
    let set = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<BTreeSet<String>>();
    assert_eq!(keys(&json), set(&["job", "scope", "suggestions"]));
    assert_eq!(json["scope"], json!({"since": null, "until": null}));
    let first = &json["suggestions"][0];
    assert_eq!(keys(first), set(&["id", "kind", "rule", "change", "support", "simulated", "job_file"]));
    assert_eq!(keys(&first["simulated"]), set(&["matched_more", "changed", "conflicts", "ambiguous_more", "examples"]));
    assert_eq!(keys(&first["simulated"]["examples"]), set(&["matched_more", "changed", "conflicts", "ambiguous_more"]));

    let out = callrecon(&pool, &["suggest", "--job", &path, "--min-support", "13"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("no rule change suggested"), "{}", stdout(&out));
    let out = callrecon(&pool, &["suggest", "--job", &path, "--since", "2026-11-02T19:30:00Z"]).await;
    assert!(stdout(&out).contains("no rule change suggested"), "only 2 late attaches from 19:30 on: {}", stdout(&out));

    let out = callrecon(&pool, &["suggest", "--job", &path]).await;
    let text = stdout(&out);
    assert!(text.contains("would match 4 more"), "{text}");
    assert!(text.contains(&format!("--accept {}", json["suggestions"][0]["id"].as_str().unwrap())), "{text}");

    let out = callrecon(&pool, &["suggest", "--job", &path, "--accept", "s00000000"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no suggestion \"s00000000\""), "{}", stderr(&out));
    let out =
        callrecon(&pool, &["suggest", "--job", &path, "--accept", json["suggestions"][0]["id"].as_str().unwrap()])
            .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("not written"), "{}", stdout(&out));
    assert!(!std::fs::read_to_string(job.path()).unwrap().contains("32m"), "not written");
}
