//! The database: connecting (creating the database when missing), migrations, and the per-job lock.
//!
//! callrecon's objects live in a schema of their own ([`Schemas::own`], `--schema`), the
//! platform's `calls`, `call_groups` and `event_queue` in theirs ([`Schemas::platform`]); every
//! connection's `search_path` names both, ours first, so queries name tables unqualified.

mod connect;
pub mod migrate;

pub use connect::connect;

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
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

/// How callrecon's connections reach PostgreSQL (`--pooler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Pooler {
    /// Each connection is a session of its own: a direct connection, or PgBouncer in session
    /// pooling. callrecon's settings are `SET` once, after connecting.
    #[default]
    Session,
    /// PgBouncer (or another pooler) in transaction pooling: a connection is a PostgreSQL session
    /// only for the length of a transaction. Every statement runs in a transaction that sets
    /// callrecon's settings with `SET LOCAL` first and drops prepared statements it did not make;
    /// statements are never cached across transactions. Commands that need a session are refused.
    Transaction,
}

static POOLER: OnceLock<Pooler> = OnceLock::new();

/// Sets how this process's connections reach PostgreSQL; once, at start (later calls are
/// ignored). Without it, [`Pooler::Session`].
pub fn set_pooler(pooler: Pooler) {
    let _ = POOLER.set(pooler);
}

pub fn pooler() -> Pooler {
    POOLER.get().copied().unwrap_or_default()
}

static MIGRATE: OnceLock<bool> = OnceLock::new();

/// Whether [`connect`] applies pending migrations (the default) or, with `--no-migrate`, refuses
/// to work while any is pending. Once, at start.
pub fn set_auto_migrate(migrate: bool) {
    let _ = MIGRATE.set(migrate);
}

pub(crate) fn auto_migrate() -> bool {
    MIGRATE.get().copied().unwrap_or(true)
}

/// callrecon's settings as statements: `SET` (`scope` empty) or `SET LOCAL` (`scope` "local").
/// The values are our own (timeouts, the schemas given on the command line, quoted).
fn settings_sql(scope: &str) -> String {
    let t = timeouts();
    // Our big statements are many index probes, costed high enough for PostgreSQL to
    // JIT-compile them on every run: compiling costs more than it saves.
    format!(
        "set {scope} search_path = {}; set {scope} statement_timeout = {}; set {scope} lock_timeout = {}; \
         set {scope} jit = off",
        search_path(&schemas()),
        t.statement.as_millis(),
        t.lock.as_millis(),
    )
}

/// The options of callrecon's connections to `url`: its TLS settings (`sslmode`, `sslrootcert`,
/// `sslcert`, `sslkey`) as given, `application_name = callrecon` (a startup parameter PgBouncer
/// passes on in every pooling mode), and no statement cache across transactions behind a
/// transaction pooler. The other settings are `SET` after connecting ([`pool_options`], [`open`]),
/// never sent as startup `options`, which PgBouncer refuses.
pub fn connect_options(url: &str) -> Result<PgConnectOptions> {
    let options: PgConnectOptions = url.parse().with_context(|| format!("invalid database URL {}", redact(url)))?;
    // Long statements are expected (bulk matching and apply): sqlx's per-statement warnings
    // with their full SQL would drown the run's own log. Available with RUST_LOG=sqlx=debug.
    let options = options
        // Operators (and the fault tests) can tell callrecon's sessions in pg_stat_activity.
        .application_name("callrecon")
        .log_statements(log::LevelFilter::Trace)
        .log_slow_statements(log::LevelFilter::Debug, std::time::Duration::from_secs(1));
    Ok(match pooler() {
        Pooler::Session => options,
        // A cached statement lives on the server connection it was prepared on, which the
        // pooler hands to another client after the transaction.
        Pooler::Transaction => options.statement_cache_capacity(0),
    })
}

/// Sets callrecon's settings on a new connection: for the session in [`Pooler::Session`]; behind
/// a transaction pooler nothing (each transaction sets them: [`begin`]).
async fn set_session(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    if pooler() == Pooler::Session {
        sqlx::raw_sql(sqlx::AssertSqlSafe(settings_sql(""))).execute(conn).await?;
    }
    Ok(())
}

/// Pool options with callrecon's settings set on every connection the pool opens (reconnects
/// included); the caller sizes it.
pub fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new().after_connect(|conn, _| Box::pin(set_session(conn)))
}

/// One connection outside a pool, with callrecon's settings, within the connect timeout.
pub async fn open(options: &PgConnectOptions) -> Result<PgConnection> {
    within(async {
        let mut conn = options.connect().await?;
        set_session(&mut conn).await?;
        Ok(conn)
    })
    .await
}

/// How a transaction starts: `BEGIN` with its isolation, then, behind a transaction pooler,
/// callrecon's settings for this transaction and no prepared statement of another.
pub(crate) fn begin_sql(isolation: &str) -> String {
    match pooler() {
        Pooler::Session => format!("begin{isolation}"),
        // Prepared statements outlive a transaction on the server's connection, which the pooler
        // then hands to another client: one of callrecon's own, say, preparing the same name.
        Pooler::Transaction => format!("begin{isolation}; {}; deallocate all", settings_sql("local")),
    }
}

/// A transaction on a connection from `pool`: what every statement of callrecon runs in (or on
/// a connection holding one), so that behind a transaction pooler it has its settings. Dropped
/// without a commit, it rolls back: for reads, dropping it is the end.
pub async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin_with(sqlx::AssertSqlSafe(begin_sql(""))).await
}

/// [`begin`] on a connection of one's own.
pub async fn begin_on(conn: &mut PgConnection) -> Result<sqlx::Transaction<'_, Postgres>, sqlx::Error> {
    conn.begin_with(sqlx::AssertSqlSafe(begin_sql(""))).await
}

/// [`begin_on`] for reads in one snapshot: repeatable read, read only.
pub async fn begin_snapshot(conn: &mut PgConnection) -> Result<sqlx::Transaction<'_, Postgres>, sqlx::Error> {
    conn.begin_with(sqlx::AssertSqlSafe(begin_sql(" isolation level repeatable read, read only"))).await
}

/// Runs `statement` alone in a transaction of its own ([`begin`]) and commits it.
pub async fn execute(
    pool: &PgPool,
    statement: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
) -> Result<sqlx::postgres::PgQueryResult, sqlx::Error> {
    let mut tx = begin(pool).await?;
    let done = statement.execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(done)
}

/// `f`, or an error saying that it did not finish within the connect timeout.
pub async fn within<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    let limit = timeouts().connect;
    match tokio::time::timeout(limit, f).await {
        Ok(done) => done,
        Err(_) => bail!("timed out after {} (--connect-timeout)", humantime::format_duration(limit)),
    }
}

/// Whether `e` is PostgreSQL's error `code` (SQLSTATE).
pub fn is_code(e: &sqlx::Error, code: &str) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some(code))
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
pub const OWN_TABLES: [&str; 12] = [
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
    // 0020
    "review_claims",
];

/// The URL a connection failed with (without its password), and how to give another: a role or
/// database that does not exist is most often the wrong URL (the default one, or a URL without a
/// user, which logs in as the operating-system user).
pub(crate) fn which_url(url: &str) -> String {
    let default = if url == DEFAULT_URL { "the default; " } else { "" };
    format!(
        "{} ({default}set DATABASE_URL or --database-url to postgres://USER:PASSWORD@HOST:PORT/DATABASE)",
        redact(url)
    )
}

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

/// Turns the planner's `methods` (its `enable_*` settings) off in the transaction until
/// [`planner_reset`]: for the few bulk statements that need a plan the planner's costs, or a
/// table without statistics, would not give them. On error the transaction is aborted and the
/// settings die with it: report that error.
pub async fn planner_off(conn: &mut sqlx::PgConnection, methods: &[&str]) -> sqlx::Result<()> {
    sqlx::query("select set_config(m, 'off', true) from unnest($1::text[]) m")
        .bind(methods)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Puts the planner's `methods` back to what `RESET` gives them, for the rest of the transaction.
pub async fn planner_reset(conn: &mut sqlx::PgConnection, methods: &[&str]) -> sqlx::Result<()> {
    sqlx::query("select set_config(name, reset_val, true) from pg_settings where name = any($1::text[])")
        .bind(methods)
        .execute(&mut *conn)
        .await?;
    Ok(())
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
    const JOINS: &[&str] = &["enable_hashjoin", "enable_mergejoin"];
    planner_off(conn, JOINS).await?;
    let done = statement.execute(&mut *conn).await?;
    planner_reset(conn, JOINS).await?;
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
