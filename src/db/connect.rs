//! Connecting at a command's start: the database created when it is missing, the migrations
//! applied (or, with `--no-migrate`, refused while any is pending), every step bounded.

use anyhow::{Context, Result, bail};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions as _, Connection as _, PgPool};

use super::migrate;
use crate::db::{auto_migrate, connect_options, ident, is_code, pool_options, redact, timeouts, which_url, within};

/// Connects to `url`, creating the database if it does not exist, and applies pending migrations
/// (or, with `--no-migrate`, refuses while any is pending). Every step is bounded by the connect
/// timeout: a server that accepts connections and never answers is an error, not a hang.
pub async fn connect(url: &str) -> Result<PgPool> {
    let options = connect_options(url)?;
    create_if_missing(&options, url).await?;
    let pool = pool_options()
        .max_connections(4)
        .acquire_timeout(timeouts().connect)
        .connect_with(options.clone())
        .await
        .with_context(|| format!("cannot connect to {}", redact(url)))?;
    if auto_migrate() {
        // Bounded by the statement and lock timeouts.
        migrate::run(&options).await.context("applying migrations from sql/")?;
    } else {
        migrate::refuse_pending(&options).await?;
    }
    Ok(pool)
}

/// Creates the database when connecting to it says it does not exist (through a pooler too,
/// which knows no maintenance database): on the server's maintenance database, `postgres` (or
/// `template1` for a database named `postgres`), as `createdb` does.
async fn create_if_missing(options: &PgConnectOptions, url: &str) -> Result<()> {
    let first = within(async { Ok(options.connect().await?) }).await;
    let missing = match &first {
        Ok(_) => false,
        Err(e) => e.downcast_ref::<sqlx::Error>().is_some_and(|e| is_code(e, "3D000")),
    };
    if !missing {
        return match first {
            Ok(conn) => Ok(conn.close().await?),
            Err(e) => Err(e).with_context(|| format!("cannot reach PostgreSQL at {}", which_url(url))),
        };
    }
    let name = options.get_database().unwrap_or(options.get_username()).to_owned();
    if !auto_migrate() {
        bail!("database {} does not exist and --no-migrate is given: `callrecon migrate` creates it", ident(&name));
    }
    let maintenance = options.clone().database(if name == "postgres" { "template1" } else { "postgres" });
    let created = within(async {
        let mut conn = maintenance.connect().await?;
        let created =
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {}", ident(&name)))).execute(&mut conn).await;
        let _ = conn.close().await;
        match created {
            // Another process created it meanwhile.
            Err(e) if is_code(&e, "42P04") => Ok(()),
            other => Ok(other.map(drop)?),
        }
    })
    .await;
    created.with_context(|| format!("cannot create database {}", which_url(url)))?;
    tracing::info!(database = %redact(url), "created database");
    Ok(())
}
