//! `callrecon verify`: stored values compared with the record of matches, and `--repair`.

use callrecon::verify::{self, Verified};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// Values PostgreSQL prints its own way (key order, numbers, escapes): verify must compare them
/// as apply does, equal when jsonb-equal.
fn tricky() -> Value {
    json!({"accountTier": "gold", "zz": 1.50, "a": {"y": [1, 2.0, 1e-7], "x": "\u{e9}\"\\n"},
           "na\u{ef}ve": null, "bb": 1e3, "\u{1F600}": true, "big": 12345678901234567890u64})
}

/// A group with a case number and three calls (c1 and c2 with sessions), a call without a group
/// (solo, with a session) and one no event reaches (quiet); events on c1 (with group fields),
/// c2, solo and the group (by its case), run once.
async fn matched(pool: &PgPool) -> TestJob {
    add_group(pool, "g1", json!({"caseNumber": "C-1"})).await;
    add_group(pool, "g2", json!({})).await;
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").group("g1").insert(pool).await;
    Call::new("c2", "2026-11-02T11:00:00Z", None).session("s2").group("g1").insert(pool).await;
    Call::new("c3", "2026-11-02T12:00:00Z", None).group("g1").insert(pool).await;
    Call::new("solo", "2026-11-02T13:00:00Z", None).session("s4").insert(pool).await;
    Call::new("quiet", "2026-11-02T14:00:00Z", None).group("g2").insert(pool).await;
    let job = TestJob::new(RULES);
    enqueue(pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": tricky()})).await;
    enqueue(
        pool,
        json!({"SessionId": "s2", "EventTime": "2026-11-02T11:01:00Z", "Metadata": {"note": "c2's", "accountTier": "silver"}}),
    )
    .await;
    enqueue(pool, json!({"SessionId": "s4", "EventTime": "2026-11-02T13:01:00Z", "Metadata": {"solo": 1}})).await;
    enqueue(pool, json!({"EventTime": "2026-11-02T12:30:00Z", "Metadata": {"crmCaseId": "C-1", "caseOwner": "ann"}}))
        .await;
    let done = job.run(pool).await;
    assert_eq!(done.report.summary.matched, 4);
    assert_eq!(call_meta(pool, "c3").await, json!({"accountTier": "silver", "crmCaseId": "C-1", "caseOwner": "ann"}));
    job
}

async fn check(pool: &PgPool, job: Option<&str>) -> Verified {
    verify::verify(pool, job, false).await.unwrap()
}

/// `(table, id)` of the examples.
fn ids(v: &Verified) -> Vec<(&str, &str)> {
    let mut ids: Vec<(&str, &str)> = v.examples.iter().map(|d| (d.table, d.id.as_str())).collect();
    ids.sort();
    ids
}

/// `text` with every run of whitespace one space.
fn squeeze(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn set_call(pool: &PgPool, id: &str, value: &str) {
    sqlx::query("update calls set async_metadata = $2::jsonb where id = $1")
        .bind(id)
        .bind(value)
        .execute(pool)
        .await
        .unwrap();
}

/// `(id, async_metadata, xmin)` of every call group.
async fn groups_snapshot(pool: &PgPool) -> Vec<(String, Value, String)> {
    sqlx::query_as("select id, async_metadata, xmin::text from call_groups order by id").fetch_all(pool).await.unwrap()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn after_a_run_verify_finds_no_difference_and_exits_0(pool: PgPool) {
    matched(&pool).await;
    let v = check(&pool, None).await;
    assert_eq!((v.calls_checked, v.groups_checked), (5, 2));
    assert_eq!((v.calls_differing, v.groups_differing), (0, 0), "{:?}", v.examples);
    let out = callrecon(&pool, &["verify"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(squeeze(&stdout(&out)).contains("differ 0 calls, 0 call groups"), "{}", stdout(&out));
}

crate::both_layouts! {
    async fn hand_edits_wiped_values_and_stale_keys_are_reported_and_repaired(pool: PgPool) {
        matched(&pool).await;
        let before = calls_snapshot(&pool).await;
        let group_before = group_meta(&pool, "g1").await;
        // A hand edit of a call and of a group, a call wiped (as after restoring an old backup), a
        // stale key on a call no event reaches.
        set_call(&pool, "c1", r#"{"accountTier": "bronze", "zz": 1.50}"#).await;
        sqlx::query(r#"update call_groups set async_metadata = async_metadata || '{"caseOwner": "bob"}' where id = 'g1'"#)
            .execute(&pool)
            .await
            .unwrap();
        set_call(&pool, "solo", "{}").await;
        set_call(&pool, "quiet", r#"{"oldKey": 1}"#).await;

        let v = check(&pool, None).await;
        assert_eq!((v.calls_checked, v.groups_checked), (5, 2));
        assert_eq!((v.calls_differing, v.groups_differing), (3, 1));
        assert_eq!(ids(&v), [("call_groups", "g1"), ("calls", "c1"), ("calls", "quiet"), ("calls", "solo")]);
        let quiet = v.examples.iter().find(|d| d.id == "quiet").unwrap();
        assert_eq!((quiet.stored.as_str(), quiet.expected.as_str()), (r#"{"oldKey": 1}"#, "{}"));
        assert_eq!(quiet.keys(), ["oldKey"]);
        let g1 = v.examples.iter().find(|d| d.id == "g1").unwrap();
        assert_eq!(g1.keys(), ["caseOwner"]);
        let c1 = v.examples.iter().find(|d| d.table == "calls" && d.id == "c1").unwrap();
        let mut expected = tricky();
        // c2's later event sets the group field; the case's event adds its fields.
        expected["accountTier"] = json!("silver");
        expected["crmCaseId"] = json!("C-1");
        expected["caseOwner"] = json!("ann");
        // Equal as jsonb (numbers keep their text in memory: `1e-7` here, `0.0000001` printed).
        let same: bool =
            sqlx::query_scalar("select $1::jsonb = $2").bind(&c1.expected).bind(&expected).fetch_one(&pool).await.unwrap();
        assert!(same, "{} is not {expected}", c1.expected);

        // The binary: the same counts and ids, exit 4, nothing written.
        let out = callrecon(&pool, &["verify"]).await;
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        let text = squeeze(&stdout(&out));
        assert!(text.contains("differ 3 calls, 1 call groups"), "{text}");
        for id in ["call c1 (keys ", "call solo (keys solo)", "call quiet (keys oldKey)", "call group g1 (keys caseOwner)"]
        {
            assert!(text.contains(id), "{id} in {text}");
        }
        assert!(stderr(&out).contains("3 calls and 1 call groups differ"), "{}", stderr(&out));

        let out = callrecon(&pool, &["verify", "--repair"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(stdout(&out).contains("repaired: wrote 3 calls, 1 call groups"), "{}", stdout(&out));
        let after: Vec<(String, Value)> = calls_snapshot(&pool).await.into_iter().map(|(id, v, _)| (id, v)).collect();
        let expected: Vec<(String, Value)> = before.into_iter().map(|(id, v, _)| (id, v)).collect();
        assert_eq!(after, expected, "every call as the run left it");
        assert_eq!(group_meta(&pool, "g1").await, group_before);
        let again = callrecon(&pool, &["verify"]).await;
        assert_eq!(again.status.code(), Some(0), "{}", stdout(&again));
        assert!(squeeze(&stdout(&again)).contains("differ 0 calls, 0 call groups"), "{}", stdout(&again));
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn group_fields_and_group_events_reaching_calls_are_checked(pool: PgPool) {
    matched(&pool).await;
    // c3 has no event of its own: all it holds comes from its group. c2 has its own event, and
    // the group part of c1's event that its own does not override.
    set_call(&pool, "c3", r#"{"accountTier": "silver", "crmCaseId": "C-1"}"#).await;
    sqlx::query("update calls set async_metadata = async_metadata - 'crmAccountId' - 'caseOwner' where id = 'c2'")
        .execute(&pool)
        .await
        .unwrap();
    let v = check(&pool, None).await;
    assert_eq!((v.calls_differing, v.groups_differing), (2, 0), "{:?}", v.examples);
    let c3 = v.examples.iter().find(|d| d.id == "c3").unwrap();
    assert_eq!(c3.keys(), ["caseOwner"]);
    let c2 = v.examples.iter().find(|d| d.id == "c2").unwrap();
    assert_eq!(
        c2.keys(),
        ["caseOwner"],
        "c2's own accountTier is later than c1's, so only the case's field is missing"
    );
    // A group field of c1's event moved onto c2 by hand: c2 carries its own event's value.
    set_call(&pool, "c2", r#"{"note": "c2's", "accountTier": "gold", "crmCaseId": "C-1", "caseOwner": "ann"}"#).await;
    let v = check(&pool, None).await;
    let c2 = v.examples.iter().find(|d| d.id == "c2").unwrap();
    assert_eq!(c2.keys(), ["accountTier"]);
    verify::verify(&pool, None, true).await.unwrap();
    assert_eq!(call_meta(&pool, "c2").await["accountTier"], "silver");
    assert!(!check(&pool, None).await.differs());
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_verify_without_repair_writes_nothing(pool: PgPool) {
    matched(&pool).await;
    set_call(&pool, "c1", "{}").await;
    set_call(&pool, "quiet", r#"{"oldKey": 1}"#).await;
    sqlx::query("update call_groups set async_metadata = '{}'").execute(&pool).await.unwrap();
    let (calls, groups) = (calls_snapshot(&pool).await, groups_snapshot(&pool).await);
    let v = check(&pool, None).await;
    assert_eq!((v.calls_differing, v.groups_differing), (2, 1));
    assert!(v.repaired.is_none());
    let out = callrecon(&pool, &["verify"]).await;
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(calls_snapshot(&pool).await, calls, "no call row written (xmin unchanged)");
    assert_eq!(groups_snapshot(&pool).await, groups, "no group row written (xmin unchanged)");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn repair_writes_only_the_rows_that_differ(pool: PgPool) {
    matched(&pool).await;
    set_call(&pool, "solo", "{}").await;
    let calls = calls_snapshot(&pool).await;
    let groups = groups_snapshot(&pool).await;
    let v = verify::verify(&pool, None, true).await.unwrap();
    let repaired = v.repaired.unwrap();
    assert_eq!((repaired.calls_updated, repaired.groups_updated), (1, 0));
    let now = calls_snapshot(&pool).await;
    for ((id, _, xmin), (_, _, was)) in now.iter().zip(&calls) {
        assert_eq!(xmin != was, id == "solo", "{id}");
    }
    assert_eq!(groups_snapshot(&pool).await, groups);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn verify_job_checks_the_rows_its_events_reach(pool: PgPool) {
    let job = matched(&pool).await;
    // g3 is reached only through an event on its call c5 (which carries no group field).
    add_group(&pool, "g3", json!({})).await;
    Call::new("c5", "2026-11-03T10:00:00Z", None).session("s5").group("g3").insert(&pool).await;
    Call::new("c6", "2026-11-03T11:00:00Z", None).group("g3").insert(&pool).await;
    enqueue(&pool, json!({"SessionId": "s5", "EventTime": "2026-11-03T10:01:00Z", "Metadata": {"n": 5}})).await;
    job.run(&pool).await;
    set_call(&pool, "quiet", r#"{"oldKey": 1}"#).await;
    set_call(&pool, "c3", "{}").await;
    set_call(&pool, "c6", r#"{"n": 5}"#).await;
    // Rows the job's events reach: c1, c2, solo, c5, every call of g1 (c3) and of g3 (c6); not
    // quiet.
    let v = check(&pool, Some("test")).await;
    assert_eq!((v.calls_checked, v.groups_checked), (6, 2));
    assert_eq!(ids(&v), [("calls", "c3"), ("calls", "c6")]);
    let path = job.path();
    let out = callrecon(&pool, &["verify", "--job", path.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stdout(&out).contains("rows job test's events reach"), "{}", stdout(&out));
    // Another job's events reach nothing.
    let v = check(&pool, Some("other")).await;
    assert_eq!((v.calls_checked, v.groups_checked, v.calls_differing), (0, 0, 0));
    // Without --job, quiet too.
    assert_eq!(ids(&check(&pool, None).await), [("calls", "c3"), ("calls", "c6"), ("calls", "quiet")]);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn repair_waits_for_a_running_apply(pool: PgPool) {
    matched(&pool).await;
    set_call(&pool, "solo", "{}").await;
    // The other run (holding the apply lock) matches a new event to solo and writes its value.
    let other = other_jobs_apply(
        &pool,
        "s4",
        "2026-11-02T13:05:00Z",
        "solo",
        r#"{"theirs": 2}"#,
        r#"{"solo": 1, "theirs": 2}"#,
    )
    .await;
    let repair = tokio::spawn({
        let pool = pool.clone();
        async move { verify::verify(&pool, None, true).await.unwrap() }
    });
    wait_for_lock_wait(&pool, Some("advisory"), "the other apply").await;
    other.commit().await.unwrap();
    let v = repair.await.unwrap();
    assert_eq!(v.calls_differing, 0, "read after the other apply committed: {:?}", v.examples);
    assert_eq!(call_meta(&pool, "solo").await, json!({"solo": 1, "theirs": 2}));
}
