//! The database: connecting (creating the database when missing), migrations, and the per-job lock.

use anyhow::{Context, Result};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, PgPool, Postgres};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./sql");

/// The default of `--database-url`.
pub const DEFAULT_URL: &str = "postgres://localhost:5432/callrecon";

/// callrecon's settings for its connections.
pub fn session(options: PgConnectOptions) -> PgConnectOptions {
    // Long statements are expected (bulk matching and apply): sqlx's per-statement warnings
    // with their full SQL would drown the run's own log. Available with RUST_LOG=sqlx=debug.
    options
        .log_statements(log::LevelFilter::Trace)
        .log_slow_statements(log::LevelFilter::Debug, std::time::Duration::from_secs(1))
        // Our big statements are many index probes, costed high enough for PostgreSQL to
        // JIT-compile them on every run: compiling costs more than it saves.
        .options([("jit", "off")])
}

/// Connects to `url`, creating the database if it does not exist, and applies pending migrations.
pub async fn connect(url: &str) -> Result<PgPool> {
    let options = session(url.parse().with_context(|| format!("invalid database URL {}", redact(url)))?);
    let exists =
        Postgres::database_exists(url).await.with_context(|| format!("cannot reach PostgreSQL at {}", redact(url)))?;
    if !exists {
        if let Err(e) = Postgres::create_database(url).await {
            // Another process may have created it meanwhile.
            if !Postgres::database_exists(url).await.unwrap_or(false) {
                return Err(e).with_context(|| format!("cannot create database {}", redact(url)));
            }
        }
        tracing::info!(database = %redact(url), "created database");
    }
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to {}", redact(url)))?;
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
