//! Applying the migrations of `sql/` ([`db::MIGRATOR`]) gently on a live database.
//!
//! - **One migrating process at a time**: an advisory lock held by a transaction of its own on a
//!   second connection for the whole of it (transaction-scoped, so a transaction pooler keeps it).
//! - **Each migration in a transaction that sets what it needs** (search path, callrecon's schema)
//!   with `SET LOCAL`, and waits at most [`LOCK_WAIT`] for any lock: a migration that needs one
//!   the platform's transactions hold (a trigger on `calls`) is rolled back and tried again a
//!   little later, rather than queueing behind a long transaction with the platform's inserts
//!   queued behind it. The history is sqlx's table (`<our schema>._sqlx_migrations`), written in
//!   the migration's transaction.
//! - **Indexes on the platform's tables are built `CONCURRENTLY`** ([`PLATFORM_INDEXES`]), before
//!   the migration that creates them `if not exists` (which then finds them): the platform's
//!   writes go on while they are built. An invalid index left by an interrupted build is dropped
//!   and built again; on a partitioned `calls` each partition's index is built concurrently and
//!   attached.
//!
//! Nothing is created or locked when every migration is applied already: a role that may only
//! read call data and use callrecon's tables (docs/database.md, "Privileges") runs every command
//! but `migrate` after the owner migrated.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::future::BoxFuture;
use sqlx::migrate::Migration;
use sqlx::postgres::{PgConnectOptions, types::Oid};
use sqlx::{Connection as _, PgConnection};

use crate::db::{self, MIGRATOR, Schemas, ident};

/// The last migration written before callrecon had a schema of its own: it and those before it
/// run with the platform's schema alone on the search path, as they always did (0001 creates the
/// platform's tables there when absent, and callrecon's beside them); 0010 moves callrecon's to
/// its schema.
const LAST_IN_PLATFORM_SCHEMA: i64 = 9;

/// How long a migration (or a step on a partitioned `calls`) waits for a lock before it is rolled
/// back and tried again. While a lock request waits, PostgreSQL queues the requests that conflict
/// with it behind it: the platform's inserts into `calls` wait at most this long for a trigger
/// being created.
pub const LOCK_WAIT: Duration = Duration::from_millis(200);

/// The first pause before a migration that could not take its locks is tried again; doubled
/// each time up to [`RETRY_MAX`], for at most `--lock-timeout` in all.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The key of the migration lock (the key earlier versions took as a session lock: the same lock).
const LOCK_KEY: &str = "callrecon.migrate";

/// An index callrecon keeps on the platform's `calls`, built concurrently before migration
/// `version` (which creates it `if not exists`) runs.
pub struct PlatformIndex {
    pub version: i64,
    pub name: &'static str,
    /// Columns and predicate, as after `ON calls`.
    pub definition: &'static str,
}

/// Every index callrecon creates on the platform's tables: matching reads calls by a range of
/// starts (with the long calls apart: `calldata::LONG_CALL` repeats the predicate), apply reads
/// the calls of a group.
pub const PLATFORM_INDEXES: [PlatformIndex; 3] = [
    PlatformIndex { version: 1, name: "calls_started_at_idx", definition: "(started_at)" },
    PlatformIndex { version: 1, name: "calls_call_group_id_idx", definition: "(call_group_id)" },
    PlatformIndex {
        version: 6,
        name: "calls_long_idx",
        definition: "(started_at) where ended_at - started_at > interval '2 hours'",
    },
];

/// Applies the pending migrations.
pub async fn run(options: &PgConnectOptions) -> Result<()> {
    let s = db::schemas();
    let table = history_table(&s);
    let mut conn = db::open(options).await?;
    if pending(&mut conn, &table).await?.is_empty() {
        return Ok(conn.close().await?);
    }
    let mut holder = db::open(options).await?;
    hold_lock(&mut holder).await?;
    adopt_history(&mut conn, &s).await?;
    ensure_history(&mut conn, &table).await?;
    // Read again under the lock: another process may have migrated meanwhile.
    for m in pending(&mut conn, &table).await? {
        for index in PLATFORM_INDEXES.iter().filter(|i| i.version == m.version) {
            build_platform_index(&mut conn, &s, index).await?;
        }
        let what = format!("migration {} ({})", m.version, m.description);
        with_retries(&mut conn, &what, Step::Migration { m, table: &table, schemas: &s }).await?;
    }
    release(&mut holder).await?;
    holder.close().await?;
    Ok(conn.close().await?)
}

/// With `--no-migrate`: an error naming the pending migrations and `callrecon migrate`, if any.
pub async fn refuse_pending(options: &PgConnectOptions) -> Result<()> {
    let mut conn = db::open(options).await?;
    let todo = pending(&mut conn, &history_table(&db::schemas())).await?;
    conn.close().await?;
    if todo.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = todo.iter().map(|m| format!("{:04} {}", m.version, m.description)).collect();
    bail!(
        "{} migration{} pending ({}) and --no-migrate is given: apply {} with `callrecon migrate` first",
        todo.len(),
        if todo.len() == 1 { " is" } else { "s are" },
        names.join(", "),
        if todo.len() == 1 { "it" } else { "them" },
    )
}

fn history_table(s: &Schemas) -> String {
    format!("{}._sqlx_migrations", ident(&s.own))
}

/// The migrations not applied yet, after checking the applied ones as sqlx's migrator would: none
/// failed partway, none unknown to this callrecon, none changed since it was applied.
async fn pending(conn: &mut PgConnection, table: &str) -> Result<Vec<&'static Migration>> {
    let mut tx = db::begin_on(conn).await?;
    let exists: Option<String> =
        sqlx::query_scalar("select to_regclass($1)::text").bind(table).fetch_one(&mut *tx).await?;
    let applied: Vec<(i64, Vec<u8>, bool)> = match exists {
        None => Vec::new(),
        Some(_) => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!("select version, checksum, success from {table}")))
                .fetch_all(&mut *tx)
                .await?
        }
    };
    tx.commit().await?;
    for (version, checksum, success) in &applied {
        let Some(m) = MIGRATOR.iter().find(|m| m.version == *version) else {
            bail!(
                "migration {version} is applied to this database but unknown to this callrecon: a newer version migrated it"
            );
        };
        if !success {
            bail!("migration {version} ({}) failed partway before ({table} says so): repair it by hand", m.description);
        }
        if checksum[..] != m.checksum[..] {
            bail!("migration {version} ({}) was changed after it was applied to this database", m.description);
        }
    }
    Ok(MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !applied.iter().any(|(v, _, _)| *v == m.version))
        .collect())
}

/// Takes the migration lock in a transaction of `holder`, which stays open until [`release`]:
/// the lock is held until then. It holds no snapshot between its statements, and neither does
/// the wait for it (a try every [`RETRY_FIRST`], outside any transaction): an index built
/// concurrently waits for every transaction holding an older snapshot, which a second `migrate`
/// waiting for the lock would hold until this one ended.
///
/// (The transaction is begun and ended with plain statements: a `Transaction` returned from the
/// loop would borrow `holder` across its iterations.)
async fn hold_lock(holder: &mut PgConnection) -> Result<()> {
    let started = Instant::now();
    let mut said = false;
    loop {
        sqlx::raw_sql(sqlx::AssertSqlSafe(db::begin_sql(""))).execute(&mut *holder).await?;
        let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(LOCK_KEY)
            .fetch_one(&mut *holder)
            .await?;
        if locked {
            return Ok(());
        }
        release(holder).await?;
        let limit = db::timeouts().lock;
        if started.elapsed() > limit {
            bail!(
                "another process has been applying migrations for over {} (--lock-timeout)",
                humantime::format_duration(limit)
            );
        }
        if !said {
            tracing::info!("waiting for another process's migrations to finish");
            said = true;
        }
        tokio::time::sleep(RETRY_FIRST).await;
    }
}

/// Ends the transaction [`hold_lock`] began.
async fn release(holder: &mut PgConnection) -> Result<()> {
    sqlx::raw_sql("rollback").execute(holder).await?;
    Ok(())
}

/// Creates the history table (sqlx's layout) when missing.
async fn ensure_history(conn: &mut PgConnection, table: &str) -> Result<()> {
    let mut tx = db::begin_on(conn).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create table if not exists {table} (
            version bigint primary key,
            description text not null,
            installed_on timestamptz not null default now(),
            success boolean not null,
            checksum bytea not null,
            execution_time bigint not null
        )"
    )))
    .execute(&mut *tx)
    .await?;
    Ok(tx.commit().await?)
}

/// What [`with_retries`] does, in one transaction.
enum Step<'a> {
    /// A migration, and its row in the history.
    Migration { m: &'static Migration, table: &'a str, schemas: &'a Schemas },
    /// DDL naming its objects with their schemas.
    Ddl(String),
}

/// Runs `step`, again after a pause while it cannot take a lock within [`LOCK_WAIT`] (or a
/// deadlock chose it), for at most the lock timeout in all.
async fn with_retries(conn: &mut PgConnection, what: &str, step: Step<'_>) -> Result<()> {
    let started = Instant::now();
    let mut pause = RETRY_FIRST;
    let mut attempts = 1;
    loop {
        let error = match once(conn, &step).await {
            Ok(()) => {
                tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "{what}: done");
                return Ok(());
            }
            Err(e) => e,
        };
        let busy = db::is_code(&error, "55P03") || db::is_code(&error, "40P01");
        if !busy {
            return Err(error).with_context(|| what.to_owned());
        }
        let limit = db::timeouts().lock;
        if started.elapsed() + pause > limit {
            bail!(
                "{what}: gave up after {attempts} attempts over {}: each time another transaction held a lock it \
                 needs (on `calls`, say) for longer than {}; migrate at a quieter time, or give it longer with \
                 --lock-timeout",
                humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())),
                humantime::format_duration(LOCK_WAIT),
            );
        }
        tracing::info!(
            attempts,
            retry_in_ms = pause.as_millis() as u64,
            "{what}: another transaction holds a lock it needs; rolled back, trying again shortly ({})",
            db::describe(&error)
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
        attempts += 1;
    }
}

async fn once(conn: &mut PgConnection, step: &Step<'_>) -> Result<(), sqlx::Error> {
    let started = Instant::now();
    let mut tx = db::begin_on(conn).await?;
    let wait = format!("set local lock_timeout = {}", LOCK_WAIT.as_millis());
    match step {
        Step::Migration { m, table, schemas } => {
            // The search path of migrations 0001-0009 is the platform's schema alone.
            let path = match m.version <= LAST_IN_PLATFORM_SCHEMA {
                true => ident(&schemas.platform),
                false => format!("{}, {}", ident(&schemas.own), ident(&schemas.platform)),
            };
            // 0010 reads callrecon's schema from `callrecon.schema`.
            let own = format!("'{}'", schemas.own.replace('\'', "''"));
            let setup = format!("{wait}; set local search_path = {path}; set local callrecon.schema = {own}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(setup)).execute(&mut *tx).await?;
            sqlx::raw_sql(m.sql.clone()).execute(&mut *tx).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "insert into {table} (version, description, success, checksum, execution_time)
                 values ($1, $2, true, $3, $4)"
            )))
            .bind(m.version)
            .bind(&*m.description)
            .bind(&*m.checksum)
            .bind(started.elapsed().as_nanos() as i64)
            .execute(&mut *tx)
            .await?;
        }
        Step::Ddl(sql) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("{wait}; {sql}"))).execute(&mut *tx).await?;
        }
    }
    tx.commit().await
}

/// The platform's `calls`, or one of its partitions.
struct Table {
    oid: Oid,
    schema: String,
    name: String,
    partitioned: bool,
}

impl Table {
    fn qualified(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }
}

/// An index of that name in the schema: its oid, whether it is valid and the table it is on.
struct IndexState {
    oid: Oid,
    valid: bool,
    table: Oid,
}

/// Builds `index` on the platform's `calls` concurrently, unless it is there and valid; nothing
/// when `calls` does not exist yet (migration 0001 then creates it, and the index, empty).
async fn build_platform_index(conn: &mut PgConnection, s: &Schemas, index: &PlatformIndex) -> Result<()> {
    let mut tx = db::begin_on(conn).await?;
    let calls: Option<(Oid, bool)> = sqlx::query_as(
        "select c.oid, c.relkind = 'p' from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = $1 and c.relname = 'calls' and c.relkind in ('r', 'p')",
    )
    .bind(&s.platform)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    let Some((oid, partitioned)) = calls else { return Ok(()) };
    let table = Table { oid, schema: s.platform.clone(), name: "calls".into(), partitioned };
    build(conn, table, index.name.to_owned(), index.definition).await
}

/// Builds index `name` on `table` (a partition of `calls` too) without blocking its writes.
fn build<'a>(conn: &'a mut PgConnection, table: Table, name: String, definition: &'a str) -> BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        let state = index_state(conn, &table.schema, &name).await?;
        if let Some(state) = &state {
            anyhow::ensure!(
                state.table == table.oid,
                "an index named {name} exists in schema {} on another table than {}: rename it",
                table.schema,
                table.qualified()
            );
            if state.valid {
                return Ok(());
            }
        }
        let index = format!("{}.{}", ident(&table.schema), ident(&name));
        if !table.partitioned {
            if state.is_some() {
                tracing::warn!(index = %index, "an earlier build of this index was interrupted (it is invalid): dropping it to build it again");
                concurrently(conn, &format!("drop index concurrently if exists {index}")).await?;
            }
            let pb = crate::progress::spinner("migrate", "");
            pb.set_message(format!("building index {index} concurrently (the platform's writes go on)"));
            tracing::info!(index = %index, table = %table.qualified(), "building an index concurrently");
            let built = concurrently(
                conn,
                &format!(
                    "create index concurrently if not exists {} on {} {definition}",
                    ident(&name),
                    table.qualified()
                ),
            )
            .await;
            pb.finish_and_clear();
            return built;
        }
        // A partitioned table: the index on it alone (no rows: it takes a moment), each
        // partition's built concurrently, then attached; it is valid once all are.
        if state.is_none() {
            let sql = format!("create index if not exists {} on only {} {definition}", ident(&name), table.qualified());
            with_retries(conn, &format!("creating {index}"), Step::Ddl(sql)).await?;
        }
        let parent = index_state(conn, &table.schema, &name).await?.context("the index just created")?.oid;
        for child in children(conn, table.oid).await? {
            if let Some((attached, valid)) = attached(conn, parent, child.oid).await? {
                if !valid {
                    build(conn, child, attached, definition).await?;
                }
                continue;
            }
            let child_name = child_index_name(&child.name, &name);
            let child_index = format!("{}.{}", ident(&child.schema), ident(&child_name));
            build(conn, child, child_name, definition).await?;
            let sql = format!("alter index {index} attach partition {child_index}");
            with_retries(conn, &format!("attaching {child_index} to {index}"), Step::Ddl(sql)).await?;
        }
        Ok(())
    })
}

/// A statement that cannot run in a transaction block (`CREATE INDEX CONCURRENTLY`), alone. Its
/// waits are bounded by the session's timeouts, and by the statement and lock timeouts together
/// here (behind a transaction pooler the session's are the server's defaults).
async fn concurrently(conn: &mut PgConnection, sql: &str) -> Result<()> {
    let t = db::timeouts();
    let limit = t.statement + t.lock;
    match tokio::time::timeout(limit, sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(conn)).await {
        Ok(done) => Ok(done.map(drop).with_context(|| sql.to_owned())?),
        Err(_) => bail!(
            "{sql}: not done after {}; a later `callrecon migrate` builds it again",
            humantime::format_duration(limit)
        ),
    }
}

async fn index_state(conn: &mut PgConnection, schema: &str, name: &str) -> Result<Option<IndexState>> {
    let mut tx = db::begin_on(conn).await?;
    let row: Option<(Oid, bool, Oid)> = sqlx::query_as(
        "select i.indexrelid, i.indisvalid, i.indrelid from pg_index i
         join pg_class c on c.oid = i.indexrelid join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = $1 and c.relname = $2",
    )
    .bind(schema)
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row.map(|(oid, valid, table)| IndexState { oid, valid, table }))
}

/// The partitions of `table` that can hold an index (foreign tables cannot).
async fn children(conn: &mut PgConnection, table: Oid) -> Result<Vec<Table>> {
    let mut tx = db::begin_on(conn).await?;
    let rows: Vec<(Oid, String, String, bool)> = sqlx::query_as(
        "select c.oid, n.nspname::text, c.relname::text, c.relkind = 'p' from pg_inherits h
         join pg_class c on c.oid = h.inhrelid join pg_namespace n on n.oid = c.relnamespace
         where h.inhparent = $1 and c.relkind in ('r', 'p') order by c.relname",
    )
    .bind(table)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows.into_iter().map(|(oid, schema, name, partitioned)| Table { oid, schema, name, partitioned }).collect())
}

/// The index of partition `table` attached to the partitioned index `parent`, and whether it is valid.
async fn attached(conn: &mut PgConnection, parent: Oid, table: Oid) -> Result<Option<(String, bool)>> {
    let mut tx = db::begin_on(conn).await?;
    let row = sqlx::query_as(
        "select c.relname::text, i.indisvalid from pg_inherits h
         join pg_index i on i.indexrelid = h.inhrelid join pg_class c on c.oid = h.inhrelid
         where h.inhparent = $1 and i.indrelid = $2",
    )
    .bind(parent)
    .bind(table)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// The name of a partition's index for the partitioned index `index`: `<partition>_started_at_idx`
/// for `calls_started_at_idx`, as PostgreSQL names them; shortened with a digest of the partition's
/// name where that would pass 63 bytes.
fn child_index_name(partition: &str, index: &str) -> String {
    let rest = index.strip_prefix("calls_").unwrap_or(index);
    let name = format!("{partition}_{rest}");
    if name.len() <= 63 {
        return name;
    }
    use sha2::Digest as _;
    let digest: String = sha2::Sha256::digest(partition.as_bytes())[..4].iter().map(|b| format!("{b:02x}")).collect();
    let mut keep = 63 - rest.len() - digest.len() - 2;
    while !partition.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}_{digest}_{rest}", &partition[..keep])
}

/// Creates our schema when missing, and takes over the migration history an install older
/// than migration 0010 kept in the platform's schema (otherwise every migration would run
/// again): the table moves to our schema, or, where the platform's own sqlx migrations share
/// it, our rows do.
async fn adopt_history(conn: &mut PgConnection, s: &Schemas) -> Result<()> {
    let mut tx = db::begin_on(conn).await?;
    let exists: bool = sqlx::query_scalar("select exists (select 1 from pg_namespace where nspname = $1)")
        .bind(&s.own)
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create schema {}", ident(&s.own)))).execute(&mut *tx).await?;
    }
    let ours = history_table(s);
    let old = format!("{}._sqlx_migrations", ident(&s.platform));
    let regclass = "select to_regclass($1)::text";
    if s.own == s.platform
        || sqlx::query_scalar::<_, Option<String>>(regclass).bind(&ours).fetch_one(&mut *tx).await?.is_some()
        || sqlx::query_scalar::<_, Option<String>>(regclass).bind(&old).fetch_one(&mut *tx).await?.is_none()
    {
        return Ok(tx.commit().await?);
    }
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("select version, checksum from {old}"))).fetch_all(&mut *tx).await?;
    let mine: Vec<i64> = rows
        .iter()
        .filter(|(v, c)| MIGRATOR.iter().any(|m| m.version == *v && m.checksum[..] == c[..]))
        .map(|(v, _)| *v)
        .collect();
    if mine.is_empty() {
        return Ok(tx.commit().await?);
    }
    if mine.len() == rows.len() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("alter table {old} set schema {}", ident(&s.own))))
            .execute(&mut *tx)
            .await?;
    } else {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create table {ours} (like {old} including all)")))
            .execute(&mut *tx)
            .await?;
        for statement in [
            format!("insert into {ours} select * from {old} where version = any($1)"),
            format!("delete from {old} where version = any($1)"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(statement)).bind(&mine).execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    tracing::info!(from = %s.platform, to = %s.own, "moved callrecon's migration history to its schema");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_index_names_fit_in_63_bytes() {
        assert_eq!(child_index_name("calls_2026100100", "calls_started_at_idx"), "calls_2026100100_started_at_idx");
        let long = "calls_partition_with_a_very_long_name_for_the_year_2026_month_10";
        let name = child_index_name(long, "calls_call_group_id_idx");
        assert!(name.len() <= 63 && name.ends_with("_call_group_id_idx"), "{name}");
        assert_ne!(name, child_index_name(&format!("{long}x"), "calls_call_group_id_idx"));
    }
}
