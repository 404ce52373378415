//! The database: connecting (creating the database when missing), migrations, and the per-job lock.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, PgPool, Postgres};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./sql");

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
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to {}", redact(url)))?;
    // Bounded by the statement and lock timeouts.
    MIGRATOR.run(&pool).await.context("applying migrations from sql/")?;
    Ok(pool)
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
