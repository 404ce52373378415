//! callrecon's footprint on the platform's database: its objects in their own schema, the
//! upgrade of an install migrated before that, the triggers on `calls`, and a run as a role that
//! may only read call data and write `async_metadata`.

use std::borrow::Cow;
use std::process::Output;

use serde_json::json;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::*;

const MIGRATOR: &Migrator = &callrecon::db::MIGRATOR;

/// Runs `sql` (several statements) on `pool`.
async fn exec(pool: &PgPool, sql: impl Into<String>) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.into())).execute(pool).await.unwrap();
}

/// The binary on the test's database as `user` (the server's own user when `None`), with the
/// given `--schema` and `--platform-schema`.
fn callrecon_as(url: &str, user: Option<&str>, schemas: (&str, &str), args: &[&str]) -> Output {
    callrecon_as_env(url, user, schemas, args, &[])
}

/// [`callrecon_as`] with environment variables.
fn callrecon_as_env(
    url: &str,
    user: Option<&str>,
    schemas: (&str, &str),
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut url = url::Url::parse(url).unwrap();
    if let Some(user) = user {
        url.set_username(user).unwrap();
    }
    std::process::Command::new(env!("CARGO_BIN_EXE_callrecon"))
        .args(["--database-url", url.as_str(), "--schema", schemas.0, "--platform-schema", schemas.1])
        .args(args)
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// A pool on the test's database whose sessions see callrecon's schema and the platform's, as
/// callrecon's own do (the helpers' unqualified SQL then reaches both).
async fn pool_with_path(url: &str, path: &str) -> PgPool {
    let options: PgConnectOptions = url.parse::<PgConnectOptions>().unwrap().options([("search_path", path)]);
    PgPoolOptions::new().max_connections(2).connect_with(options).await.unwrap()
}

async fn names(pool: &PgPool, sql: &str, schema: &str) -> Vec<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).bind(schema).fetch_all(pool).await.unwrap()
}

/// Tables and sequences, functions and aggregates, triggers' functions of a schema.
async fn objects(pool: &PgPool, schema: &str) -> Vec<String> {
    let mut all = names(
        pool,
        "select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = $1 and c.relkind in ('r', 'S', 'v', 'm', 'p') order by 1",
        schema,
    )
    .await;
    all.extend(
        names(
            pool,
            "select p.proname || '()' from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             where n.nspname = $1 order by 1",
            schema,
        )
        .await,
    );
    all
}

const OWN_OBJECTS: [&str; 22] = [
    "_sqlx_migrations",
    "api_idempotency",
    "api_tokens",
    "api_users",
    "api_users_id_seq",
    "call_group_changes",
    "contributing_groups",
    "event_history",
    "event_history_id_seq",
    "events",
    "events_id_seq",
    "inbox_files",
    "installation_keys",
    "review_claims",
    "review_sessions",
    "runs",
    "runs_id_seq",
    "callrecon_event_digest()",
    "callrecon_log_group_change()",
    "callrecon_log_inserted_calls()",
    "callrecon_log_moved_call()",
    "callrecon_merge()",
];

fn own_objects() -> Vec<String> {
    OWN_OBJECTS.iter().map(|s| s.to_string()).collect()
}

const PLATFORM_TABLES: [&str; 4] = ["call_groups", "calls", "event_queue", "event_queue_id_seq"];

/// The triggers on calls, as `name: definition`.
async fn triggers(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "select tgname || ': ' || pg_get_triggerdef(oid) from pg_trigger
         where tgrelid = (select oid from pg_class where relname = 'calls') and not tgisinternal order by tgname",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_fresh_install_keeps_callrecons_objects_in_their_own_schema(pool: PgPool) {
    let url = database_url(&pool).await;
    let out = callrecon_as(&url, None, ("callrecon", "public"), &["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let mut own = objects(&pool, "callrecon").await;
    own.sort();
    let mut expected = own_objects();
    expected.sort();
    assert_eq!(own, expected);
    assert_eq!(objects(&pool, "public").await, PLATFORM_TABLES, "only the platform's tables in public");
    let triggers = triggers(&pool).await;
    assert_eq!(triggers.len(), 3, "{triggers:?}");
    assert!(triggers[0].starts_with("callrecon_call_moved: ") && triggers[0].contains("BEFORE UPDATE"));
    assert!(triggers[1].starts_with("callrecon_calls_inserted: ") && triggers[1].contains("FOR EACH STATEMENT"));
    assert!(triggers[2].starts_with("callrecon_group_change: ") && triggers[2].contains("WHEN"));

    // The pipeline in that layout: a group field reaches a call that joins the group later.
    let db = pool_with_path(&url, "callrecon, public").await;
    add_group(&db, "g1", json!({})).await;
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").group("g1").insert(&db).await;
    enqueue(&db, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"accountTier": "gold"}}))
        .await;
    let job = TestJob::new(RULES);
    let run = |job: &TestJob| {
        callrecon_as(&url, None, ("callrecon", "public"), &["run", "--job", job.path().to_str().unwrap()])
    };
    let out = run(&job);
    assert!(out.status.success(), "{}", stderr(&out));
    Call::new("c2", "2026-11-03T10:00:00Z", None).group("g1").insert(&db).await;
    let out = run(&job);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(call_meta(&db, "c2").await, json!({"accountTier": "gold"}));
    // A second migrate finds nothing to do.
    let out = callrecon_as(&url, None, ("callrecon", "public"), &["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(count(&db, "select count(*) from callrecon._sqlx_migrations").await, MIGRATOR.iter().count() as i64);
}

/// An install migrated by callrecon before migration 0010 (its objects and migration history
/// in `public`), with data: a run's events and runs, a contributing group, and a call that joined
/// it since, logged by the old trigger and not yet applied.
async fn install_as_before_0010(pool: &PgPool) {
    let before = Migrator {
        migrations: Cow::Owned(MIGRATOR.iter().filter(|m| m.version <= 9).cloned().collect()),
        ignore_missing: false,
        locking: true,
        no_tx: false,
        table_name: Cow::Borrowed("_sqlx_migrations"),
        create_schemas: Cow::Borrowed(&[]),
    };
    before.run(pool).await.unwrap();
    exec(pool, "insert into call_groups (id, metadata) values ('g1', '{}');
         insert into calls (id, session_id, call_group_id, started_at) values ('c1', 's1', 'g1', '2026-11-02T10:00:00Z');
         insert into runs (job, kind, dry_run, status) values ('test', 'run', false, 'succeeded');
         insert into events (job, source, session_id, event_time, received_at, metadata, ingested_run, state,
                             target_kind, target_id, rule, group_part, decided_run)
         values ('test', 'queue:1', 's1', '2026-11-02T10:01:00Z', now(), '{\"accountTier\": \"gold\"}', 1, 'matched',
                 'call', 'c1', 'session_id', '{\"accountTier\": \"gold\"}', 1);
         update calls set async_metadata = '{\"accountTier\": \"gold\"}' where id = 'c1';
         update call_groups set async_metadata = '{\"accountTier\": \"gold\"}' where id = 'g1';
         insert into contributing_groups values ('g1');
         insert into calls (id, call_group_id, started_at) values ('c2', 'g1', '2026-11-03T10:00:00Z');").await;
    assert_eq!(count(pool, "select count(*) from call_group_changes").await, 1, "logged by 0007's trigger");
}

#[sqlx::test(migrations = false)]
async fn upgrading_an_install_of_before_0010_moves_its_objects_and_keeps_its_history_and_data(pool: PgPool) {
    install_as_before_0010(&pool).await;
    let url = database_url(&pool).await;
    let out = callrecon_as(&url, None, ("callrecon", "public"), &["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let mut own = objects(&pool, "callrecon").await;
    own.sort();
    let mut expected = own_objects();
    expected.sort();
    assert_eq!(own, expected, "everything of callrecon's moved, the migration history with it");
    assert_eq!(objects(&pool, "public").await, PLATFORM_TABLES);
    let history: Vec<i64> =
        sqlx::query_scalar("select version from callrecon._sqlx_migrations where success order by version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(history, MIGRATOR.iter().map(|m| m.version).collect::<Vec<_>>(), "0001-0009 were not run again");

    // The data came along; the sequences go on; the call the old trigger logged is applied.
    let db = pool_with_path(&url, "callrecon, public").await;
    assert_eq!(count(&db, "select count(*) from events").await, 1);
    assert_eq!(count(&db, "select count(*) from call_group_changes").await, 1);
    let job = TestJob::new(RULES);
    let out = callrecon_as(&url, None, ("callrecon", "public"), &["run", "--job", job.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("run 2 "), "{}", stdout(&out));
    assert_eq!(call_meta(&db, "c2").await, json!({"accountTier": "gold"}));
    // And a call joining the group after the upgrade, through the new trigger.
    Call::new("c3", "2026-11-04T10:00:00Z", None).group("g1").insert(&db).await;
    let out = callrecon_as(&url, None, ("callrecon", "public"), &["run", "--job", job.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(call_meta(&db, "c3").await, json!({"accountTier": "gold"}));
    assert_eq!(count(&db, "select count(*) from call_group_changes").await, 0);
}

/// The platform's own sqlx migrations share `public._sqlx_migrations` with callrecon's: only
/// callrecon's rows move, the platform's stay.
#[sqlx::test(migrations = false)]
async fn upgrading_leaves_the_platforms_own_migration_history_where_it_is(pool: PgPool) {
    install_as_before_0010(&pool).await;
    exec(
        &pool,
        "insert into _sqlx_migrations (version, description, success, checksum, execution_time)
         values (20240101000000, 'the platform''s own', true, '\\x00', 1)",
    )
    .await;
    let url = database_url(&pool).await;
    let out = callrecon_as(&url, None, ("callrecon", "public"), &["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let left: Vec<i64> =
        sqlx::query_scalar("select version from public._sqlx_migrations").fetch_all(&pool).await.unwrap();
    assert_eq!(left, [20240101000000]);
    assert_eq!(count(&pool, "select count(*) from callrecon._sqlx_migrations").await, MIGRATOR.iter().count() as i64);
}

crate::both_layouts! {
    /// What the triggers log: calls inserted (by INSERT of many rows or COPY) into a group carrying
    /// contributions, and calls whose group changed from or to such a group; nothing else.
    async fn the_triggers_log_exactly_the_calls_joining_or_leaving_a_contributing_group(pool: PgPool) {
        exec(
            &pool,
            "insert into call_groups (id) values ('on'), ('off'), ('on2');
             insert into contributing_groups values ('on'), ('on2');
             insert into calls (id, call_group_id, started_at) values
                 ('i-on', 'on', now()), ('i-off', 'off', now()), ('i-none', null, now()), ('i-on2', 'on2', now());",
        )
        .await;
        let mut conn = pool.acquire().await.unwrap();
        let mut copy =
            conn.copy_in_raw("copy calls (id, call_group_id, started_at) from stdin (format csv)").await.unwrap();
        copy.send(
            b"k-on,on,2026-11-02T10:00:00Z\nk-off,off,2026-11-02T10:00:00Z\nk-none,,2026-11-02T10:00:00Z\n".as_slice(),
        )
        .await
        .unwrap();
        copy.finish().await.unwrap();
        drop(conn);
        exec(
            &pool,
            "update calls set ended_at = now();                                        -- no group change
             update calls set call_group_id = call_group_id where id = 'i-on';         -- named, unchanged
             update calls set call_group_id = 'off' where id = 'i-none';               -- none -> off
             update calls set call_group_id = 'on' where id = 'k-none';                -- none -> on
             update calls set call_group_id = 'off' where id = 'k-on';                 -- on -> off
             update calls set call_group_id = null where id = 'i-on2';                 -- on2 -> none
             insert into calls (id, call_group_id, started_at) values ('solo-on', 'on', now());",
        )
        .await;
        let logged: Vec<(String, Option<String>)> =
            sqlx::query_as("select call_id, old_group_id from call_group_changes order by call_id, old_group_id")
                .fetch_all(&pool)
                .await
                .unwrap();
        let expected: Vec<(String, Option<String>)> = [
            ("i-on", None),
            ("i-on2", Some("on2")),
            ("i-on2", None),
            ("k-none", None),
            ("k-on", Some("on")),
            ("k-on", None),
            ("solo-on", None),
        ]
        .into_iter()
        .map(|(c, g)| (c.to_owned(), g.map(str::to_owned)))
        .collect();
        assert_eq!(logged, expected);
    }
}

#[sqlx::test(migrations = false)]
async fn the_pipeline_runs_as_a_least_privilege_role_with_schemas_of_its_choice(pool: PgPool) {
    least_privilege_pipeline(pool, false).await;
}

/// The same on a `calls` partitioned by `started_at` (after `migrate`, as `gen --layout
/// partitioned` does): the role reads and writes the partitions through `calls` alone, with no
/// privilege on any partition.
#[sqlx::test(migrations = false)]
async fn the_pipeline_runs_as_a_least_privilege_role_on_a_partitioned_calls(pool: PgPool) {
    least_privilege_pipeline(pool, true).await;
}

async fn least_privilege_pipeline(pool: PgPool, partitioned: bool) {
    let url = database_url(&pool).await;
    let db: String = sqlx::query_scalar("select current_database()").fetch_one(&pool).await.unwrap();
    // Role names are cluster-wide and cut at 63 bytes: the end of the test database's name.
    let unique = &db[db.len() - 16..];
    let (role, platform_role) = (format!("callrecon_app_{unique}"), format!("platform_{unique}"));
    let schemas = ("recon", "platform");
    exec(&pool, "create schema platform").await;
    let out = callrecon_as(&url, None, schemas, &["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(objects(&pool, "public").await, Vec::<String>::new(), "nothing in public");
    assert_eq!(objects(&pool, "platform").await, PLATFORM_TABLES);
    assert_eq!(objects(&pool, "recon").await.len(), OWN_OBJECTS.len());
    if partitioned {
        let platform = pool_with_path(&url, "platform").await;
        let start = t("2026-11-02T00:00:00Z");
        let ranges: Vec<_> =
            (0..3).map(|d| (start + chrono::Duration::days(d), start + chrono::Duration::days(d + 1))).collect();
        callrecon::datagen::partition_calls(&mut platform.acquire().await.unwrap(), &ranges).await.unwrap();
        platform.close().await;
        let partitions = count(&pool, "select count(*) from pg_partition_tree('platform.calls') where isleaf").await;
        assert_eq!(partitions, 4, "three days and the default partition");
    }

    // The role, with exactly what `callrecon grants` prints; the platform writes calls as
    // another role that has no privilege on callrecon's schema.
    for r in [&role, &platform_role] {
        exec(&pool, format!("drop role if exists \"{r}\"; create role \"{r}\" login")).await;
    }
    let grants = callrecon_as(&url, None, schemas, &["grants", &role]);
    assert!(grants.status.success(), "{}", stderr(&grants));
    exec(&pool, stdout(&grants)).await;
    exec(&pool, format!(
        "grant usage on schema platform to \"{platform_role}\";
         grant select, insert, update on platform.calls, platform.call_groups, platform.event_queue to \"{platform_role}\";
         grant usage on all sequences in schema platform to \"{platform_role}\";"
    )).await;
    let mut as_platform = url::Url::parse(&url).unwrap();
    as_platform.set_username(&platform_role).unwrap();
    let platform = pool_with_path(as_platform.as_str(), "platform").await;

    add_group(&platform, "g1", json!({"caseNumber": "C-1"})).await;
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:10:00Z"))
        .session("s1")
        .group("g1")
        .insert(&platform)
        .await;
    Call::new("c2", "2026-11-02T11:00:00Z", Some("2026-11-02T11:10:00Z"))
        .phone("+1 201 555 0100", "agent-7")
        .insert(&platform)
        .await;
    enqueue(
        &platform,
        json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"accountTier": "gold"}}),
    )
    .await;
    enqueue(
        &platform,
        json!({"EventTime": "2026-11-02T11:05:00Z",
               "Metadata": {"customerPhone": "2015550100", "agentId": "agent-7", "note": "by phone"}}),
    )
    .await;
    enqueue(&platform, json!({"EventTime": "2026-11-02T12:00:00Z", "Metadata": {"crmCaseId": "C-1", "case": "open"}}))
        .await;

    let job = TestJob::new(RULES);
    let job_path = job.path();
    let as_role = |args: &[&str]| callrecon_as(&url, Some(&role), schemas, args);
    let out = as_role(&["run", "--job", job_path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let db = pool_with_path(&url, "recon, platform").await;
    assert_eq!(call_meta(&db, "c1").await, json!({"accountTier": "gold", "crmCaseId": "C-1", "case": "open"}));
    assert_eq!(
        call_meta(&db, "c2").await,
        json!({"customerPhone": "2015550100", "agentId": "agent-7", "note": "by phone"})
    );
    assert_eq!(count(&db, "select count(*) from event_queue").await, 0, "the queue is drained");

    // A call the platform adds to the group is logged (the trigger runs as callrecon's owner) and
    // the next run, still as the role, gives it the group's fields.
    Call::new("c3", "2026-11-03T10:00:00Z", None).group("g1").insert(&platform).await;
    let out = as_role(&["run", "--job", job_path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(call_meta(&db, "c3").await, json!({"accountTier": "gold", "crmCaseId": "C-1", "case": "open"}));

    for args in [
        &["rematch", "--job", job_path.to_str().unwrap()][..],
        &["verify"],
        &["report", "list"],
        &["migrate"],
        &["explain", "--job", job_path.to_str().unwrap(), "2"],
    ] {
        let out = as_role(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }

    // The role cannot change anything of the platform's but async_metadata.
    let mut as_role_url = url::Url::parse(&url).unwrap();
    as_role_url.set_username(&role).unwrap();
    let app = pool_with_path(as_role_url.as_str(), "recon, platform").await;
    for sql in [
        "update calls set metadata = '{}' where id = 'c1'",
        "update calls set call_group_id = null where id = 'c1'",
        "insert into calls (id, started_at) values ('x', now())",
        "delete from calls where id = 'c1'",
        "update call_groups set metadata = '{}'",
        "create table recon.mine (x int)",
        "create table platform.mine (x int)",
    ] {
        let e = match sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&app).await {
            Ok(done) => panic!("{sql}: allowed ({done:?})"),
            Err(e) => e,
        };
        assert!(e.to_string().contains("permission denied"), "{sql}: {e}");
    }

    // A backlog (pages of 3 events) is staged in a temporary table when the role may create one
    // (PostgreSQL grants TEMPORARY to every role by default): each event inserted once, its first
    // decision without a history row. Without the privilege it is stored pending, then updated
    // with its decision (a history row each). Both store every event once, decided.
    for (privilege, change, history_rows) in [("granted", "grant %s to", 0), ("revoked", "revoke %s from", 4)] {
        let change = change.replace("%s", "temporary on database %I");
        exec(&pool, format!("do $$ begin execute format('{change} public', current_database()); end $$")).await;
        let before = count(&db, "select max(id) from events").await;
        for i in 0..4 {
            let metadata =
                json!({"customerPhone": "2015550100", "agentId": "agent-7", "i": format!("{privilege} {i}")});
            enqueue(&platform, json!({"EventTime": "2026-11-02T11:05:00Z", "Metadata": metadata})).await;
        }
        let run = ["run", "--job", job_path.to_str().unwrap()];
        let out = callrecon_as_env(&url, Some(&role), schemas, &run, &[("CALLRECON_CHUNK_EVENTS", "1")]);
        assert!(out.status.success(), "{privilege}: {}", stderr(&out));
        let new = format!("from events where id > {before}");
        assert_eq!(count(&db, &format!("select count(*) {new}")).await, 4, "{privilege}");
        assert_eq!(count(&db, &format!("select count(distinct digest) {new} and decided_run is not null")).await, 4);
        let history =
            count(&db, &format!("select count(*) from event_history where event_id in (select id {new})")).await;
        assert_eq!(history, history_rows, "{privilege}: history rows of the backlog's first decisions");
    }
    app.close().await;
    platform.close().await;
    db.close().await;
    for r in [&role, &platform_role] {
        exec(&pool, format!("drop owned by \"{r}\"; drop role \"{r}\"")).await;
    }
}
