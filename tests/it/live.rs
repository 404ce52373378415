//! Installing into a live database: the platform's `calls` already holds rows and the platform
//! keeps inserting while `callrecon migrate` runs. A writer inserts a call every few milliseconds,
//! each insert in a transaction that gives up when it waits longer than a short `lock_timeout`:
//! none may give up. Also: an index build interrupted earlier is rebuilt, migrations can be an
//! explicit step (`--no-migrate`), and a partitioned `calls` gets its indexes partition by
//! partition.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::helpers::*;

const OWN_SCHEMA: (&str, &str) = ("CALLRECON_SCHEMA", "callrecon");

/// The platform's tables as the contract gives them, before callrecon: `calls` with its primary
/// key and unique `session_id`, and no other index.
async fn platform_tables(pool: &PgPool) {
    sqlx::raw_sql(
        "create table call_groups (id text primary key, metadata jsonb not null default '{}',
                                   async_metadata jsonb not null default '{}');
         create table calls (id text primary key, session_id text unique, call_group_id text references call_groups(id),
                             started_at timestamptz not null, ended_at timestamptz, ani text, dnis text, agent_id text,
                             metadata jsonb not null default '{}', async_metadata jsonb not null default '{}');
         create table event_queue (id bigserial primary key, received_at timestamptz not null default now(),
                                   payload jsonb not null);",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// `n` calls over the last `n` minutes, one in ten in a group of ten, one in fifty over two hours.
async fn populate(pool: &PgPool, n: i64) {
    sqlx::query("insert into call_groups (id) select 'g' || i from generate_series(0, $1 / 10) i")
        .bind(n)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "insert into calls (id, session_id, call_group_id, started_at, ended_at)
         select 'c' || i, 's' || i, case when i % 10 = 0 then 'g' || (i / 10) end, now() - i * interval '1 minute',
                now() - i * interval '1 minute' + case when i % 50 = 0 then interval '3 hours' else interval '5 minutes' end
         from generate_series(1, $1) i",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

/// What the writer saw: inserts that went in, those that gave up (their errors), the longest.
struct Written {
    inserted: usize,
    failed: Vec<String>,
    longest: Duration,
}

/// The platform's writer: a call inserted every 10 ms until `stop`, each in a transaction that
/// waits at most `lock_wait` for a lock.
fn writer(pool: &PgPool, stop: &Arc<AtomicBool>, lock_wait: Duration) -> tokio::task::JoinHandle<Written> {
    let (pool, stop) = (pool.clone(), stop.clone());
    tokio::spawn(async move {
        let mut out = Written { inserted: 0, failed: Vec::new(), longest: Duration::ZERO };
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let inserted = async {
                let mut tx = pool.begin().await?;
                sqlx::query(sqlx::AssertSqlSafe(format!("set local lock_timeout = {}", lock_wait.as_millis())))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("insert into public.calls (id, started_at) values ($1, now())")
                    .bind(format!("w{}", out.inserted + out.failed.len()))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            }
            .await;
            out.longest = out.longest.max(started.elapsed());
            match inserted {
                Ok(()) => out.inserted += 1,
                Err(e) => out.failed.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        out
    })
}

/// The valid indexes among `names`.
async fn valid_indexes(pool: &PgPool, names: &[&str]) -> Vec<String> {
    sqlx::query_scalar(
        "select c.relname::text from pg_index i join pg_class c on c.oid = i.indexrelid
         where c.relname = any($1) and i.indisvalid order by 1",
    )
    .bind(names)
    .fetch_all(pool)
    .await
    .unwrap()
}

const PLATFORM_INDEXES: [&str; 3] = ["calls_call_group_id_idx", "calls_long_idx", "calls_started_at_idx"];

#[sqlx::test(migrations = false)]
async fn the_first_migrate_never_blocks_the_platforms_inserts(pool: PgPool) {
    platform_tables(&pool).await;
    // Enough calls for a plain CREATE INDEX to hold off inserts for longer than the writer waits.
    populate(&pool, 400_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(&pool, &stop, Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let out = callrecon_env(&pool, &["migrate"], &[OWN_SCHEMA]).await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let written = writing.await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        written.failed.is_empty(),
        "{} of the platform's inserts waited over 300 ms for a lock during `migrate` ({took:?}): {:?}",
        written.failed.len(),
        written.failed
    );
    assert!(written.inserted > 20, "the writer kept inserting: {} inserts in {took:?}", written.inserted);
    eprintln!("migrate took {took:?}; {} inserts meanwhile, the longest {:?}", written.inserted, written.longest);
    assert_eq!(valid_indexes(&pool, &PLATFORM_INDEXES).await, PLATFORM_INDEXES);
    let triggers =
        count(&pool, "select count(*) from pg_trigger where tgrelid = 'calls'::regclass and not tgisinternal").await;
    assert_eq!(triggers, 3);
}

#[sqlx::test(migrations = false)]
async fn an_index_left_invalid_by_an_interrupted_build_is_built_again(pool: PgPool) {
    platform_tables(&pool).await;
    populate(&pool, 2_000).await;
    // What an interrupted `CREATE INDEX CONCURRENTLY` leaves behind: the index, marked invalid.
    sqlx::query("create index calls_started_at_idx on calls (started_at)").execute(&pool).await.unwrap();
    sqlx::query("update pg_index set indisvalid = false where indexrelid = 'calls_started_at_idx'::regclass")
        .execute(&pool)
        .await
        .unwrap();
    let before: sqlx::postgres::types::Oid =
        sqlx::query_scalar("select 'calls_started_at_idx'::regclass::oid").fetch_one(&pool).await.unwrap();
    let out = callrecon_env(&pool, &["migrate"], &[OWN_SCHEMA]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    let after: sqlx::postgres::types::Oid =
        sqlx::query_scalar("select 'calls_started_at_idx'::regclass::oid").fetch_one(&pool).await.unwrap();
    assert_ne!(before, after, "built again");
    assert_eq!(valid_indexes(&pool, &PLATFORM_INDEXES).await, PLATFORM_INDEXES);
}

#[sqlx::test(migrations = false)]
async fn triggers_wait_out_a_long_transaction_without_holding_up_the_platforms_inserts(pool: PgPool) {
    platform_tables(&pool).await;
    populate(&pool, 1_000).await;
    // The indexes are there already (the platform's DBA made them): what waits is the brief lock
    // of migrations on `calls`, which the long transaction's insert keeps them from.
    for (name, definition) in [
        ("calls_started_at_idx", "(started_at)"),
        ("calls_call_group_id_idx", "(call_group_id)"),
        ("calls_long_idx", "(started_at) where ended_at - started_at > interval '2 hours'"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("create index {name} on calls {definition}")))
            .execute(&pool)
            .await
            .unwrap();
    }
    let mut long = pool.begin().await.unwrap();
    sqlx::query("insert into calls (id, started_at) values ('long', now())").execute(&mut *long).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Each of migrate's lock requests waits at most 200 ms, and the writer's inserts queued behind
    // it as long, with the moment the migration then holds its lock: 500 ms leaves room for both.
    let writing = writer(&pool, &stop, Duration::from_millis(500));
    let url = database_url(&pool).await;
    let migrating = tokio::spawn(async move { callrecon_url(&url, &["migrate"], &[OWN_SCHEMA]).await });
    // Until migrate has asked for its lock (however long a loaded machine takes to start it),
    // then a second more: it steps back and tries again while the long transaction lasts.
    let asked = "select exists (select from pg_locks l join pg_stat_activity a using (pid) \
                 where not l.granted and a.application_name = 'callrecon' and a.datname = current_database())";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sqlx::query_scalar::<_, bool>(asked).fetch_one(&pool).await.unwrap() {
        assert!(!migrating.is_finished(), "migrate finished without waiting for the long transaction");
        assert!(Instant::now() < deadline, "migrate never asked for a lock within 60 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!migrating.is_finished(), "migrate waits for the long transaction");
    long.commit().await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), migrating).await.unwrap().unwrap();
    stop.store(true, Ordering::Relaxed);
    let written = writing.await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(written.failed.is_empty(), "inserts held up over 500 ms: {:?}", written.failed);
    assert!(stderr(&out).contains("trying again"), "{}", stderr(&out));
    assert!(written.inserted > 50, "{} inserts", written.inserted);
    eprintln!("{} inserts while migrate waited, the longest {:?}", written.inserted, written.longest);
}

#[sqlx::test(migrations = false)]
async fn with_no_migrate_commands_refuse_while_migrations_are_pending(pool: PgPool) {
    let pending = callrecon::db::MIGRATOR.iter().count();
    let out = callrecon_env(&pool, &["--no-migrate", "report", "list"], &[OWN_SCHEMA]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(said.contains(&format!("{pending} migrations are pending (0001 init,")), "{said}");
    assert!(said.contains("`callrecon migrate`"), "{said}");
    assert_eq!(
        count(&pool, "select count(*) from pg_namespace where nspname = 'callrecon'").await,
        0,
        "nothing created"
    );
    let out = callrecon_env(&pool, &["report", "list"], &[OWN_SCHEMA, ("CALLRECON_NO_MIGRATE", "1")]).await;
    assert_eq!(out.status.code(), Some(1), "the setting in the environment: {}", stderr(&out));

    // Nor is a missing database created.
    let mut missing = url::Url::parse(&database_url(&pool).await).unwrap();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    missing.set_path(&format!("callrecon_absent_{}_{nanos}", std::process::id()));
    let missing = missing.to_string();
    let out = callrecon_url(&missing, &["--no-migrate", "report", "list"], &[OWN_SCHEMA]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist and --no-migrate is given"), "{}", stderr(&out));
    let name = missing.rsplit('/').next().unwrap().to_owned();
    let created = count(&pool, &format!("select count(*) from pg_database where datname = '{name}'")).await;
    assert_eq!(created, 0);

    let out = callrecon_env(&pool, &["--no-migrate", "migrate"], &[OWN_SCHEMA]).await;
    assert!(out.status.success(), "`migrate` migrates: {}", stderr(&out));
    let out = callrecon_env(&pool, &["--no-migrate", "report", "list"], &[OWN_SCHEMA]).await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[sqlx::test(migrations = false)]
async fn a_partitioned_calls_gets_its_indexes_partition_by_partition(pool: PgPool) {
    sqlx::raw_sql(
        "create table call_groups (id text primary key, metadata jsonb not null default '{}',
                                   async_metadata jsonb not null default '{}');
         create table calls (id text not null, session_id text, call_group_id text references call_groups(id),
                             started_at timestamptz not null, ended_at timestamptz, ani text, dnis text, agent_id text,
                             metadata jsonb not null default '{}', async_metadata jsonb not null default '{}',
                             primary key (id, started_at)) partition by range (started_at);
         create table calls_2026_10 partition of calls for values from ('2026-10-01') to ('2026-11-01');
         create table calls_2026_11 partition of calls for values from ('2026-11-01') to ('2026-12-01')
             partition by range (started_at);
         create table calls_2026_11_a partition of calls_2026_11 for values from ('2026-11-01') to ('2026-11-15');
         create table calls_2026_11_b partition of calls_2026_11 for values from ('2026-11-15') to ('2026-12-01');
         create table calls_default partition of calls default;
         create table event_queue (id bigserial primary key, received_at timestamptz not null default now(),
                                   payload jsonb not null);
         insert into calls (id, started_at, ended_at)
         select 'c' || i, timestamptz '2026-10-01' + i * interval '7 minutes', timestamptz '2026-10-01' + i * interval '7 minutes' + interval '3 hours'
         from generate_series(1, 20000) i;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let out = callrecon_env(&pool, &["migrate"], &[OWN_SCHEMA]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // Each partitioned index is valid (every partition's is attached), on both levels.
    assert_eq!(valid_indexes(&pool, &PLATFORM_INDEXES).await, PLATFORM_INDEXES);
    let per_partition: Vec<(String, i64)> = sqlx::query_as(
        "select t.relname::text, count(*) from pg_index i join pg_class t on t.oid = i.indrelid
         where t.relname like 'calls_2026%' or t.relname = 'calls_default'
         group by 1 order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    // Each table: its primary key's index and the three of callrecon.
    let expected: Vec<(String, i64)> =
        ["calls_2026_10", "calls_2026_11", "calls_2026_11_a", "calls_2026_11_b", "calls_default"]
            .iter()
            .map(|t| ((*t).to_owned(), 4))
            .collect();
    assert_eq!(per_partition, expected);
    let invalid = count(&pool, "select count(*) from pg_index where not indisvalid").await;
    assert_eq!(invalid, 0);
    let out = callrecon_env(&pool, &["migrate"], &[OWN_SCHEMA]).await;
    assert!(out.status.success() && stdout(&out).contains("up to date"), "{}", stderr(&out));
}
