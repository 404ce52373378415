//! The database: connecting (creating the database when missing), migrations, and the per-job lock.
//!
//! callrecon's objects live in a schema of their own ([`Schemas::own`], `--schema`), the
//! platform's `calls`, `call_groups` and `event_queue` in theirs ([`Schemas::platform`]); every
//! connection's `search_path` names both, ours first, so queries name tables unqualified.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::migrate::MigrateDatabase;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgConnection, PgPool, Postgres};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./sql");

/// A task holding a connection that stops when its caller stops waiting for it (an error on
/// the way): the connection goes back to the pool.
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A further connection from `pool` for work beside the run's own, within `wait`; otherwise
/// why not (the pool cannot open one, or none was freed in time), for the caller to log before
/// it does the work on its own connection.
pub async fn spare_connection(pool: &PgPool, wait: Duration) -> Result<sqlx::pool::PoolConnection<Postgres>, String> {
    match tokio::time::timeout(wait, pool.acquire()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("none free within {wait:?}")),
    }
}

/// The default of `--database-url`.
pub const DEFAULT_URL: &str = "postgres://localhost:5432/callrecon";

/// How long callrecon waits on the database before it gives up.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Reaching the server, logging in, creating the database, taking a connection from a pool.
    pub connect: Duration,
    /// One statement (PostgreSQL's `statement_timeout`).
    pub statement: Duration,
    /// Waiting for a lock held by someone else (`lock_timeout`): a row of `calls` the platform
    /// holds, the apply lock while another job's run commits, a migration's table lock.
    pub lock: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            statement: Duration::from_secs(30 * 60),
            lock: Duration::from_secs(10 * 60),
        }
    }
}

static TIMEOUTS: OnceLock<Timeouts> = OnceLock::new();

/// Sets the timeouts of every connection this process opens; once, at start (later calls are
/// ignored). Without it the defaults apply.
pub fn set_timeouts(timeouts: Timeouts) {
    let _ = TIMEOUTS.set(timeouts);
}

pub fn timeouts() -> Timeouts {
    TIMEOUTS.get().copied().unwrap_or_default()
}

/// Where callrecon's objects are and where the platform's tables are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schemas {
    /// callrecon's tables, functions and aggregate, and its migrations table.
    pub own: String,
    /// The platform's `calls`, `call_groups` and `event_queue` (created there when absent).
    pub platform: String,
}

impl Default for Schemas {
    fn default() -> Self {
        Schemas { own: "callrecon".into(), platform: "public".into() }
    }
}

static SCHEMAS: OnceLock<Schemas> = OnceLock::new();

/// Sets the schemas of every connection this process opens; once, at start (later calls are
/// ignored). Without it the defaults apply.
pub fn set_schemas(schemas: Schemas) {
    let _ = SCHEMAS.set(schemas);
}

pub fn schemas() -> Schemas {
    SCHEMAS.get().cloned().unwrap_or_default()
}

/// `name` as an SQL identifier, quoted.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The search path of callrecon's sessions: its own schema, then the platform's.
fn search_path(s: &Schemas) -> String {
    format!("{}, {}", ident(&s.own), ident(&s.platform))
}

/// callrecon's settings for its connections.
pub fn session(options: PgConnectOptions) -> PgConnectOptions {
    let t = timeouts();
    // Long statements are expected (bulk matching and apply): sqlx's per-statement warnings
    // with their full SQL would drown the run's own log. Available with RUST_LOG=sqlx=debug.
    options
        // Operators (and the fault tests) can tell callrecon's sessions in pg_stat_activity.
        .application_name("callrecon")
        .log_statements(log::LevelFilter::Trace)
        .log_slow_statements(log::LevelFilter::Debug, std::time::Duration::from_secs(1))
        // Our big statements are many index probes, costed high enough for PostgreSQL to
        // JIT-compile them on every run: compiling costs more than it saves.
        .options([
            ("jit", "off".to_owned()),
            ("statement_timeout", format!("{}ms", t.statement.as_millis())),
            ("lock_timeout", format!("{}ms", t.lock.as_millis())),
            ("search_path", search_path(&schemas())),
        ])
}

/// `f`, or an error saying that it did not finish within the connect timeout.
pub async fn within<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    let limit = timeouts().connect;
    match tokio::time::timeout(limit, f).await {
        Ok(done) => done,
        Err(_) => bail!("timed out after {} (--connect-timeout)", humantime::format_duration(limit)),
    }
}

/// Connects to `url`, creating the database if it does not exist, and applies pending migrations.
/// Every step is bounded by the connect timeout: a server that accepts connections and never
/// answers is an error, not a hang.
pub async fn connect(url: &str) -> Result<PgPool> {
    let options = session(url.parse().with_context(|| format!("invalid database URL {}", redact(url)))?);
    let exists = within(async { Ok(Postgres::database_exists(url).await?) })
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {}", redact(url)))?;
    if !exists {
        let created = within(async { Ok(Postgres::create_database(url).await?) }).await;
        if let Err(e) = created {
            // Another process may have created it meanwhile.
            if !within(async { Ok(Postgres::database_exists(url).await?) }).await.unwrap_or(false) {
                return Err(e).with_context(|| format!("cannot create database {}", redact(url)));
            }
        }
        tracing::info!(database = %redact(url), "created database");
    }
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(timeouts().connect)
        .connect_with(options.clone())
        .await
        .with_context(|| format!("cannot connect to {}", redact(url)))?;
    // Bounded by the statement and lock timeouts.
    migrate(&options).await.context("applying migrations from sql/")?;
    Ok(pool)
}

/// The last migration written before callrecon had a schema of its own: it and those before it
/// run with the platform's schema first, as they always did (0001 creates the platform's tables
/// there when absent, and callrecon's beside them); 0010 moves callrecon's to its schema.
const LAST_IN_PLATFORM_SCHEMA: i64 = 9;

/// Applies pending migrations on a connection of its own, the migrations table in our schema.
///
/// Nothing is created or locked when every migration is applied already: a role that may only
/// read call data and use callrecon's tables (docs/database.md, "Privileges") runs every
/// command but `migrate` after the owner migrated.
async fn migrate(options: &PgConnectOptions) -> Result<()> {
    let s = schemas();
    let table = format!("{}._sqlx_migrations", ident(&s.own));
    let mut conn = within(async { Ok(options.clone().connect().await?) }).await?;
    if up_to_date(&mut conn, &table).await? {
        return Ok(conn.close().await?);
    }
    // One migrating process at a time, from adopting the old history to the last migration.
    sqlx::query("select pg_advisory_lock(hashtextextended('callrecon.migrate', 0))").execute(&mut conn).await?;
    adopt_history(&mut conn, &s).await?;
    let migrator = Migrator {
        migrations: MIGRATOR.migrations.clone(),
        ignore_missing: MIGRATOR.ignore_missing,
        locking: true,
        no_tx: MIGRATOR.no_tx,
        table_name: table.into(),
        create_schemas: Default::default(),
    };
    sqlx::query("select set_config('search_path', $1, false), set_config('callrecon.schema', $2, false)")
        .bind(ident(&s.platform))
        .bind(&s.own)
        .execute(&mut conn)
        .await?;
    migrator.run_to(LAST_IN_PLATFORM_SCHEMA, &mut conn).await?;
    sqlx::query("select set_config('search_path', $1, false)").bind(search_path(&s)).execute(&mut conn).await?;
    migrator.run(&mut conn).await?;
    Ok(conn.close().await?)
}

/// Whether every migration is applied, unchanged (as sqlx's migrator would check).
async fn up_to_date(conn: &mut PgConnection, table: &str) -> Result<bool> {
    let exists: Option<String> =
        sqlx::query_scalar("select to_regclass($1)::text").bind(table).fetch_one(&mut *conn).await?;
    if exists.is_none() {
        return Ok(false);
    }
    let applied: Vec<(i64, Vec<u8>, bool)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("select version, checksum, success from {table}")))
            .fetch_all(&mut *conn)
            .await?;
    let applied: std::collections::HashMap<i64, (Vec<u8>, bool)> =
        applied.into_iter().map(|(v, c, ok)| (v, (c, ok))).collect();
    Ok(applied.len() == MIGRATOR.iter().count()
        && MIGRATOR.iter().all(|m| applied.get(&m.version).is_some_and(|(c, ok)| *ok && c[..] == m.checksum[..])))
}

/// Creates our schema when missing, and takes over the migration history an install older
/// than migration 0010 kept in the platform's schema (otherwise every migration would run
/// again): the table moves to our schema, or, where the platform's own sqlx migrations share
/// it, our rows do.
async fn adopt_history(conn: &mut PgConnection, s: &Schemas) -> Result<()> {
    let exists: bool = sqlx::query_scalar("select exists (select 1 from pg_namespace where nspname = $1)")
        .bind(&s.own)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        sqlx::query(sqlx::AssertSqlSafe(format!("create schema {}", ident(&s.own)))).execute(&mut *conn).await?;
    }
    let ours = format!("{}._sqlx_migrations", ident(&s.own));
    let old = format!("{}._sqlx_migrations", ident(&s.platform));
    if s.own == s.platform
        || sqlx::query_scalar::<_, Option<String>>("select to_regclass($1)::text")
            .bind(&ours)
            .fetch_one(&mut *conn)
            .await?
            .is_some()
        || sqlx::query_scalar::<_, Option<String>>("select to_regclass($1)::text")
            .bind(&old)
            .fetch_one(&mut *conn)
            .await?
            .is_none()
    {
        return Ok(());
    }
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!("select version, checksum from {old}")))
        .fetch_all(&mut *conn)
        .await?;
    let mine: Vec<i64> = rows
        .iter()
        .filter(|(v, c)| MIGRATOR.iter().any(|m| m.version == *v && m.checksum[..] == c[..]))
        .map(|(v, _)| *v)
        .collect();
    if mine.is_empty() {
        return Ok(());
    }
    let mut tx = conn.begin().await?;
    if mine.len() == rows.len() {
        sqlx::query(sqlx::AssertSqlSafe(format!("alter table {old} set schema {}", ident(&s.own))))
            .execute(&mut *tx)
            .await?;
    } else {
        sqlx::query(sqlx::AssertSqlSafe(format!("create table {ours} (like {old} including all)")))
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

/// The SQL that gives `role` what callrecon needs to run every command but `migrate` (and the
/// bench's `demo` and `gen`, which write calls): use of callrecon's own tables; reading the
/// platform's calls and call groups and writing only their `async_metadata`; draining and
/// filling `event_queue`. Run by the owner after `callrecon migrate`.
pub fn grants(s: &Schemas, role: &str) -> String {
    let (own, platform, name) = (ident(&s.own), ident(&s.platform), role);
    let role = ident(name);
    let tables = OWN_TABLES.iter().map(|t| format!("{own}.{t}")).collect::<Vec<_>>().join(", ");
    let literal = |v: &str| format!("'{}'", v.replace('\'', "''"));
    format!(
        "-- callrecon's privileges for {role} (`callrecon grants`); run after `callrecon migrate`.\n\
         grant usage on schema {own} to {role};\n\
         grant select on {own}._sqlx_migrations to {role};\n\
         grant select, insert, update, delete on {tables} to {role};\n\
         grant usage on all sequences in schema {own} to {role};\n\
         grant usage on schema {platform} to {role};\n\
         grant select on {platform}.calls, {platform}.call_groups to {role};\n\
         grant update (async_metadata) on {platform}.calls, {platform}.call_groups to {role};\n\
         grant select, insert, update, delete on {platform}.event_queue to {role};\n\
         do $$ begin execute format('grant usage on sequence %s to %I', \
         pg_get_serial_sequence({}, 'id'), {}); end $$;\n",
        literal(&format!("{platform}.event_queue")),
        literal(name),
    )
}

/// callrecon's own tables (those of migrations 0001-0009, moved to its schema by 0010, and later ones).
pub const OWN_TABLES: [&str; 11] = [
    "runs",
    "inbox_files",
    "events",
    "contributing_groups",
    "call_group_changes",
    "api_users",
    "api_tokens",
    "api_idempotency",
    // 0011
    "event_history",
    // 0014
    "review_sessions",
    // 0018
    "installation_keys",
];

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// The advisory-lock key apply holds until its run's transaction ends. Runs of different jobs
/// can touch the same calls; apply recomputes each from the events it can see, so two applies at
/// once could each miss the other's uncommitted events, and the later commit would win. Taken at
/// the start of apply, the lock makes a second run's apply read after the first one committed.
pub const APPLY_LOCK_KEY: &str = "callrecon.apply";

/// The advisory-lock key of a job: the same for `run`, `rematch` and `schedule`.
pub fn job_lock_key(job: &str) -> String {
    format!("callrecon.job:{job}")
}

/// Runs `statement` with the planner told to probe indexes row by row (nested loops) instead of
/// hashing the small side and scanning the big table. For bulk updates of a few hundred
/// thousand rows of a table of millions, where the planner's costs for random reads, tuned for
/// disks, make it scan the whole table (100k values against 2M calls: 2.6 s against 1.4 s, and
/// the scan grows with the table). Scoped to the transaction and reset afterwards.
pub async fn with_index_probes(
    conn: &mut sqlx::PgConnection,
    statement: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
) -> Result<u64> {
    sqlx::query("set local enable_hashjoin = off").execute(&mut *conn).await?;
    sqlx::query("set local enable_mergejoin = off").execute(&mut *conn).await?;
    // On error the transaction is aborted (and the settings die with it): report that error.
    let done = statement.execute(&mut *conn).await?;
    sqlx::query("reset enable_hashjoin").execute(&mut *conn).await?;
    sqlx::query("reset enable_mergejoin").execute(&mut *conn).await?;
    Ok(done.rows_affected())
}

/// A database error as one line a person reads: PostgreSQL's message (and its detail) without
/// sqlx's "error returned from database" prefix; other errors as sqlx says them.
pub fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
            Some(pg) => match pg.detail() {
                Some(detail) => format!("{} ({detail})", pg.message()),
                None => pg.message().to_owned(),
            },
            None => db.message().to_owned(),
        },
        sqlx::Error::PoolTimedOut => {
            format!("no database connection within {}", humantime::format_duration(timeouts().connect))
        }
        other => other.to_string(),
    }
}

/// An error and its causes as one line: `what: why: …`, database errors as [`describe`] says
/// them, a cause that repeats the message before it left out, line breaks folded.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let database = cause.downcast_ref::<sqlx::Error>();
        let message = match database {
            Some(db) => describe(db),
            None => cause.to_string(),
        };
        let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        if !message.is_empty() && !parts.last().is_some_and(|last| last.ends_with(&message)) {
            parts.push(message);
        }
        if database.is_some() {
            // Its sources are sqlx's and PostgreSQL's own ("… at line 869" of PostgreSQL's C
            // source): `describe` said what a person needs.
            break;
        }
    }
    parts.join(": ")
}
