//! `callrecon demo`, the README's first command: its runs must reproduce the outcome counts that
//! samples/gen.py computed independently (samples/expected.json).

use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// Sums one outcome over every sample file of a phase in samples/expected.json.
fn expected(phase: &str, outcome: &str) -> u64 {
    let root = env!("CARGO_MANIFEST_DIR");
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/samples/expected.json")).unwrap()).unwrap();
    e["counts"][phase].as_object().unwrap().values().map(|f| f[outcome].as_u64().unwrap()).sum()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn demo_reproduces_the_sample_generators_expected_outcomes(pool: PgPool) {
    demo_matches_expected(&pool, &[]).await;
}

/// Matching in batches of 7 sessionless events (the next batch's calls read while one is
/// matched) decides exactly as one batch does: windows across batch boundaries are not lost.
/// Applying 2 groups (10 groupless calls) at a time writes the same values as one batch.
#[sqlx::test(migrator = "MIGRATOR")]
async fn demo_in_small_batches_decides_and_applies_the_same(pool: PgPool) {
    let env = [("CALLRECON_CHUNK_EVENTS", "7"), ("CALLRECON_APPLY_BATCH_GROUPS", "2")];
    let job = demo_matches_expected(&pool, &env).await;
    // A rematch under the same rules, read in pages of 21 events, re-evaluates every
    // sessionless event (neither SessionId nor MasterId) exactly once and changes nothing.
    let sessionless = count(&pool, "select count(*) from events where session_id is null and master_id is null").await;
    let out = callrecon_env(&pool, &["rematch", "--job", job.path().join("demo.toml").to_str().unwrap()], &env).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = format!("rematch   {sessionless:>6} events   0 newly matched · 0 moved · 0 newly unmatched");
    assert!(stdout(&out).contains(&expected), "{}\nexpected: {expected}", stdout(&out));
    assert!(sessionless > 21 * 3, "{sessionless} sessionless events: several pages");
    assert_eq!(misapplied(&pool).await, (vec![], vec![]));
}

/// A first run whose events fill many pages (a backlog, decided from the table in pages of 21)
/// stores each event once, with its decision: one row per digest, none lost (the outcomes are the
/// expected ones), no history row (a first decision is recorded in the event's row alone, where
/// storing it pending and then updating it writes one), and ids in arrival order.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_first_runs_backlog_stores_each_event_once_with_its_decision(pool: PgPool) {
    let env = [("CALLRECON_CHUNK_EVENTS", "7")];
    demo_matches_expected(&pool, &env).await;
    let first = "(select min(id) from runs)";
    let stored = count(&pool, &format!("select count(*) from events where ingested_run = {first}")).await;
    assert!(stored > 21 * 3, "{stored} events: a backlog of several pages");
    let digests =
        count(&pool, &format!("select count(distinct digest) from events where ingested_run = {first}")).await;
    assert_eq!(digests, stored, "each event stored once, with its digest");
    let undecided =
        count(&pool, &format!("select count(*) from events where ingested_run = {first} and decided_run is null"))
            .await;
    assert_eq!(undecided, 0, "every event of the first run stored with its decision");
    // The first run's history rows are only the first decisions the second run replaced
    // (copied there when replaced).
    let history = count(
        &pool,
        &format!(
            "select count(*) from event_history h where h.run_id = {first}
               and not exists (select 1 from event_history l where l.event_id = h.event_id and l.run_id > {first})"
        ),
    )
    .await;
    assert_eq!(history, 0, "a first decision has no history row until it is replaced");
    // Ids follow the queue's order (arrival order breaks merge ties).
    let disordered = count(
        &pool,
        &format!(
            "select count(*) from (select id, split_part(source, ':', 2)::bigint as q,
                                          lag(split_part(source, ':', 2)::bigint) over (order by id) as before
                                   from events where ingested_run = {first} and source like 'queue:%') s
             where q < before"
        ),
    )
    .await;
    assert_eq!(disordered, 0, "ids follow arrival order");
}

/// Calls and groups whose `async_metadata` is not the contract's merge of their matched
/// events, computed independently in SQL (ordered jsonb merge aggregate).
async fn misapplied(pool: &PgPool) -> (Vec<String>, Vec<String>) {
    let grp = "select target_id as gid, event_time, id, metadata as m, null::text as owner
               from events where state = 'matched' and target_kind = 'call_group'
               union all
               select c.call_group_id, e.event_time, e.id, e.group_part, c.id
               from events e join calls c on c.id = e.target_id
               where e.state = 'matched' and e.target_kind = 'call' and e.group_part <> '{}'
                 and c.call_group_id is not null";
    let calls = format!(
        "with grp as ({grp}),
         contrib as (select target_id as call_id, event_time, id, metadata as m
                     from events where state = 'matched' and target_kind = 'call'
                     union all
                     select c.id, g.event_time, g.id, g.m
                     from calls c join grp g on g.gid = c.call_group_id and g.owner is distinct from c.id)
         select c.id from calls c
         left join (select call_id, callrecon_merge(m order by event_time, id) as v from contrib group by call_id) x
           on x.call_id = c.id
         where c.async_metadata is distinct from coalesce(x.v, '{{}}') order by c.id"
    );
    let groups = format!(
        "with grp as ({grp})
         select g.id from call_groups g
         left join (select gid, callrecon_merge(m order by event_time, id) as v from grp group by gid) x on x.gid = g.id
         where g.async_metadata is distinct from coalesce(x.v, '{{}}') order by g.id"
    );
    (
        sqlx::query_scalar(sqlx::AssertSqlSafe(calls)).fetch_all(pool).await.unwrap(),
        sqlx::query_scalar(sqlx::AssertSqlSafe(groups)).fetch_all(pool).await.unwrap(),
    )
}

/// Runs the demo and checks its outcomes; returns the folder holding its job file.
async fn demo_matches_expected(pool: &PgPool, env: &[(&str, &str)]) -> tempfile::TempDir {
    demo_matches_expected_at(pool, &database_url(pool).await, env).await
}

/// [`demo_matches_expected`] with the binary connecting to `url`; `pool`'s sessions see
/// callrecon's tables and the platform's.
pub async fn demo_matches_expected_at(pool: &PgPool, url: &str, env: &[(&str, &str)]) -> tempfile::TempDir {
    let root = env!("CARGO_MANIFEST_DIR");
    // The demo job, in a temporary folder so its inbox, archive and reports stay out of the repo.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(format!("{root}/jobs/demo.toml"), dir.path().join("demo.toml")).unwrap();
    let samples = format!("{root}/samples");
    let job = dir.path().join("demo.toml");
    let out = callrecon_url(url, &["demo", "--samples", &samples, "--job", job.to_str().unwrap()], env).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);

    let runs: Vec<sqlx::types::Json<callrecon::report::Summary>> =
        sqlx::query_scalar("select summary from runs order by id").fetch_all(pool).await.unwrap();
    assert_eq!(runs.len(), 2, "{text}");
    assert_eq!(misapplied(pool).await, (vec![], vec![]), "values differ from the merge of their events");
    let with_values = count(pool, "select count(*) from calls where async_metadata <> '{}'").await;
    assert!(with_values > 200, "{with_values} calls carry metadata");
    let (first, second) = (&runs[0].0, &runs[1].0);
    assert_eq!(first.by_rule["session_id"], expected("first_run", "session"));
    assert_eq!(first.by_rule["phone-and-agent"], expected("first_run", "phone-and-agent"));
    assert_eq!(first.by_rule["crm-case"], expected("first_run", "crm-case"));
    assert_eq!(first.by_rule["master_id"], expected("first_run", "master_id"));
    for reason in ["unknown_session", "unknown_group", "no_candidate", "ambiguous", "missing_key"] {
        assert_eq!(first.by_reason.get(reason).copied().unwrap_or(0), expected("first_run", reason), "{reason}");
    }
    // The queue's line that is not JSON cannot be enqueued (jsonb); every other bad record is rejected.
    assert_eq!(first.rejected, expected("first_run", "bad") - 1);
    // The late call and group land: the events waiting for them attach, nothing else changes.
    let newly = |outcome: &str| expected("after_calls_late", outcome) - expected("first_run", outcome);
    assert_eq!(second.by_rule.get("session_id").copied(), Some(newly("session")));
    assert_eq!(second.by_rule.get("master_id").copied(), Some(newly("master_id")));
    assert_eq!(second.by_rule.len(), 2, "{:?}", second.by_rule);
    assert_eq!(second.by_reason["unknown_session"], expected("after_calls_late", "unknown_session"));
    assert_eq!(second.by_reason["unknown_group"], expected("after_calls_late", "unknown_group"));
    let report = text.lines().find_map(|l| l.strip_prefix("Open the report in a browser: ")).unwrap();
    assert!(std::path::Path::new(report).exists(), "{report}");
    dir
}
