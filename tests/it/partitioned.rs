//! A `calls` range-partitioned by `started_at` (`callrecon gen calls --layout partitioned`): what
//! differs from one heap. The scenarios every layout shares run on both (`both_layouts!` in
//! apply.rs, matching.rs, crash.rs, verify.rs, resolve.rs, master_id.rs).

use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

crate::both_layouts! {
    /// On a partitioned `calls`, a call whose start moves to another month is a DELETE and an
    /// INSERT: AFTER UPDATE row triggers do not fire. The move still reaches the change log
    /// (sql/0015), so the groups it left and joined are recomputed.
    async fn a_call_that_changes_group_and_partition_at_once_is_recomputed(pool: PgPool) {
        add_group(&pool, "g1", json!({})).await;
        add_group(&pool, "g2", json!({})).await;
        Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").group("g1").insert(&pool).await;
        Call::new("c2", "2026-11-02T11:00:00Z", None).session("s2").group("g1").insert(&pool).await;
        Call::new("c3", "2026-11-02T12:00:00Z", None).group("g2").insert(&pool).await;
        let job = TestJob::new(RULES);
        enqueue(&pool, json!({"SessionId": "s2", "EventTime": "2026-11-02T11:01:00Z", "Metadata": {"accountTier": "gold"}}))
            .await;
        job.run(&pool).await;
        assert_eq!(call_meta(&pool, "c1").await, json!({"accountTier": "gold"}));

        // c2 moves to g2 and to another partition (a corrected start time) in one statement.
        sqlx::query("update calls set call_group_id = 'g2', started_at = '2026-11-02T15:00:00Z' where id = 'c2'")
            .execute(&pool)
            .await
            .unwrap();
        let done = job.run(&pool).await;
        assert_eq!(done.report.summary.matched, 0);
        assert_eq!(call_meta(&pool, "c1").await, json!({}), "g1 lost its only group field");
        assert_eq!(group_meta(&pool, "g1").await, json!({}));
        assert_eq!(call_meta(&pool, "c3").await, json!({"accountTier": "gold"}), "g2 gained it");
        assert_eq!(call_meta(&pool, "c2").await, json!({"accountTier": "gold"}));
        let out = callrecon(&pool, &["verify"]).await;
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    }
}

crate::both_layouts! {
    /// Calls in different partitions have the same ctids: each write reaches only its own call
    /// (the ctid, the id and the partition's `started_at` together), and a value written by
    /// `verify --repair` too.
    async fn calls_sharing_a_ctid_in_different_partitions_are_written_apart(pool: PgPool) {
        // The first row of six partitions: each is at ctid (0,1) on the partitioned layout.
        let starts = ["09:00", "09:20", "09:40", "10:00", "10:20", "10:40"];
        for (i, at) in starts.iter().enumerate() {
            let (id, session) = (format!("c{i}"), format!("s{i}"));
            let start = format!("2026-11-02T{at}:00Z");
            Call::new(&id, &start, None).session(&session).insert(&pool).await;
        }
        let job = TestJob::new(RULES);
        enqueue(&pool, json!({"SessionId": "s3", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"n": 3}})).await;
        let done = job.run(&pool).await;
        assert_eq!(done.report.summary.calls_updated, 1);
        for i in 0..starts.len() {
            let expected = if i == 3 { json!({"n": 3}) } else { json!({}) };
            assert_eq!(call_meta(&pool, &format!("c{i}")).await, expected, "c{i}");
        }
        // A hand edit on two calls at the same ctid, repaired.
        sqlx::query("update calls set async_metadata = '{\"edited\": 1}' where id in ('c1', 'c3')")
            .execute(&pool)
            .await
            .unwrap();
        let out = callrecon_env(&pool, &["verify", "--repair"], &[("RUST_LOG", "callrecon=debug")]).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("repaired: wrote 2 calls"), "{}", stdout(&out));
        assert!(!stderr(&out).contains("writing by id"), "each found by its ctid: {}", stderr(&out));
        for i in 0..starts.len() {
            let expected = if i == 3 { json!({"n": 3}) } else { json!({}) };
            assert_eq!(call_meta(&pool, &format!("c{i}")).await, expected, "c{i}");
        }
    }
}

/// The platform moves a call to another partition (a corrected start time) and commits while
/// the run waits to write it: PostgreSQL refuses an update of a row moved to another partition by
/// a concurrent transaction (a serialization failure), so the run fails and changes nothing; the
/// next run applies it.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_call_moved_to_another_partition_while_the_run_writes_it_fails_the_run_and_the_next_applies(pool: PgPool) {
    partition_calls(&pool).await;
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"note": "x"}})).await;
    let mut platform = pool.begin().await.unwrap();
    sqlx::query("update calls set started_at = '2026-11-02T13:00:00Z' where id = 'c1'")
        .execute(&mut *platform)
        .await
        .unwrap();
    let pool2 = pool.clone();
    let path = job.path();
    let run = tokio::spawn(async move { callrecon(&pool2, &["run", "--job", path.to_str().unwrap()]).await });
    wait_for_lock_wait(&pool, None, "the row lock").await;
    platform.commit().await.unwrap();
    let out = run.await.unwrap();
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("moved to another partition"), "{}", stderr(&out));
    assert_eq!(call_meta(&pool, "c1").await, json!({}));
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1, "the event is still queued");

    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.calls_updated, 1);
    assert_eq!(call_meta(&pool, "c1").await, json!({"note": "x"}));
}

/// `callrecon gen calls --layout partitioned` on a migrated database: the empty plain `calls`
/// becomes one partition a month with callrecon's indexes and triggers, and a run, a rematch
/// and verify work on it.
#[sqlx::test(migrator = "MIGRATOR")]
async fn gen_lays_calls_out_in_monthly_partitions_with_callrecons_triggers(pool: PgPool) {
    let triggers = |pool: PgPool| async move {
        let names: Vec<String> = sqlx::query_scalar(
            "select tgname::text from pg_trigger where tgrelid = 'calls'::regclass and not tgisinternal order by 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        names
    };
    let before = triggers(pool.clone()).await;
    assert_eq!(before.len(), 3, "{before:?}");
    let generate = ["gen", "calls", "--calls", "3000", "--days", "40", "--layout", "partitioned"];
    let out = callrecon(&pool, &generate).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let partitions: Vec<String> = sqlx::query_scalar(
        "select c.relid::regclass::text from pg_partition_tree('calls') c where c.level = 1 order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    // 40 days to 2026-10-31: 2026-09-21 to 2026-10-31, two months, and the default partition.
    assert_eq!(partitions, ["calls_2026090100", "calls_2026100100", "calls_default"]);
    assert_eq!(triggers(pool.clone()).await, before, "callrecon's triggers are on the new table");
    let indexes: Vec<String> = sqlx::query_scalar(
        "select indexrelid::regclass::text from pg_index where indrelid = 'calls'::regclass order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        indexes,
        ["calls_call_group_id_idx", "calls_long_idx", "calls_pkey", "calls_session_id_idx", "calls_started_at_idx"]
    );
    assert_eq!(
        count(&pool, "select count(*) from calls_2026100100").await
            + count(&pool, "select count(*) from calls_2026090100").await,
        3000
    );

    let out = callrecon(
        &pool,
        &[
            "gen",
            "events",
            "--calls",
            "3000",
            "--days",
            "40",
            "--from",
            "2026-09-22T00:00:00Z",
            "--to",
            "2026-10-31T00:00:00Z",
            "--count",
            "400",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let job = TestJob::new(RULES);
    let done = job.run(&pool).await;
    assert!(done.report.summary.matched > 250, "{:?}", done.report.summary);
    assert!(count(&pool, "select count(*) from calls where async_metadata <> '{}'").await > 250);
    let out = callrecon(&pool, &["verify"]).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
}

/// A partitioned `calls` cannot keep `session_id` unique: a SessionId two calls share attaches to
/// the one that started last, whatever order the partitions are read in (here the earlier call
/// is in the default partition, read last).
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_session_id_two_partitions_share_attaches_to_the_call_that_started_last(pool: PgPool) {
    partition_calls(&pool).await;
    Call::new("later", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    Call::new("earlier", "2026-11-01T08:00:00Z", None).session("s1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"n": 1}})).await;
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.matched, 1);
    assert_eq!(call_meta(&pool, "later").await, json!({"n": 1}));
    assert_eq!(call_meta(&pool, "earlier").await, json!({}));
}

/// A platform whose `calls` was partitioned before callrecon was installed: the migrations
/// leave the table as it is and put callrecon's indexes and triggers on it (partitioned indexes,
/// row triggers cloned to each partition), and a run works on it.
#[sqlx::test(migrations = false)]
async fn migrations_install_on_a_calls_the_platform_partitioned_first(pool: PgPool) {
    sqlx::raw_sql(
        "create table call_groups (id text primary key, metadata jsonb not null default '{}',
                                   async_metadata jsonb not null default '{}');
         create table calls (id text not null, session_id text, call_group_id text references call_groups(id),
                             started_at timestamptz not null, ended_at timestamptz, ani text, dnis text,
                             agent_id text, metadata jsonb not null default '{}',
                             async_metadata jsonb not null default '{}', primary key (id, started_at))
             partition by range (started_at);
         create table calls_2026_10 partition of calls for values from ('2026-10-01') to ('2026-11-01');
         create table calls_2026_11 partition of calls for values from ('2026-11-01') to ('2026-12-01');",
    )
    .execute(&pool)
    .await
    .unwrap();
    let out = callrecon(&pool, &["migrate"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let relkind: String = sqlx::query_scalar("select relkind::text from pg_class where oid = 'calls'::regclass")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(relkind, "p", "the platform's table is left as it is");
    let on_partition: Vec<String> = sqlx::query_scalar(
        "select tgname::text from pg_trigger where tgrelid = 'calls_2026_11'::regclass and not tgisinternal order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(on_partition, ["callrecon_call_moved", "callrecon_group_change"], "row triggers are cloned");

    add_group(&pool, "g1", json!({})).await;
    Call::new("c1", "2026-10-31T23:59:00Z", None).session("s1").group("g1").insert(&pool).await;
    Call::new("c2", "2026-11-02T10:00:00Z", None).group("g1").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(
        &pool,
        json!({"SessionId": "s1", "EventTime": "2026-11-01T00:01:00Z", "Metadata": {"accountTier": "gold"}}),
    )
    .await;
    job.run(&pool).await;
    assert_eq!(call_meta(&pool, "c2").await, json!({"accountTier": "gold"}));
    // A call inserted into the group later (the statement trigger on the partitioned table).
    Call::new("c3", "2026-10-15T10:00:00Z", None).group("g1").insert(&pool).await;
    job.run(&pool).await;
    assert_eq!(call_meta(&pool, "c3").await, json!({"accountTier": "gold"}));
}
