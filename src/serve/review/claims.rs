//! Who has an event open on the desk: opening an event's page claims it for [`CLAIM`] (renewed
//! at each opening), and the others see "ana is on this" on the page and in the queue. A claim
//! informs and blocks nothing; what keeps two analysts from overwriting each other is that a
//! decision is refused when the event changed since its page was loaded (`resolve`'s `seen`).

use std::collections::HashMap;

use anyhow::{Context, Result};
use sqlx::PgPool;

/// How long opening an event claims it.
pub const CLAIM: chrono::Duration = chrono::Duration::minutes(5);

/// Claims event `event` for `analyst` unless another analyst's claim still holds; returns that
/// other analyst, if any.
pub async fn claim(pool: &PgPool, event: i64, analyst: &str) -> Result<Option<String>> {
    let mine: Option<String> = sqlx::query_scalar(
        "insert into review_claims as c (event_id, analyst, until) values ($1, $2, now() + $3)
         on conflict (event_id) do update set analyst = excluded.analyst, until = excluded.until
           where c.analyst = excluded.analyst or c.until < now()
         returning analyst",
    )
    .bind(event)
    .bind(analyst)
    .bind(CLAIM)
    .fetch_optional(pool)
    .await
    .context("claiming the event")?;
    if mine.is_some() {
        return Ok(None);
    }
    let other: Option<String> =
        sqlx::query_scalar("select analyst from review_claims where event_id = $1 and until >= now()")
            .bind(event)
            .fetch_optional(pool)
            .await
            .context("reading the event's claim")?;
    Ok(other.filter(|o| o != analyst))
}

/// Ends `analyst`'s claim of `events` (once decided).
pub async fn release(pool: &PgPool, events: &[i64], analyst: &str) -> Result<()> {
    sqlx::query("delete from review_claims where event_id = any($1) and analyst = $2")
        .bind(events)
        .bind(analyst)
        .execute(pool)
        .await
        .context("releasing claims")?;
    Ok(())
}

/// The analysts other than `analyst` holding a claim on any of `events`.
pub async fn others(pool: &PgPool, events: &[i64], analyst: &str) -> Result<HashMap<i64, String>> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "select event_id, analyst from review_claims where event_id = any($1) and until >= now() and analyst <> $2",
    )
    .bind(events)
    .bind(analyst)
    .fetch_all(pool)
    .await
    .context("reading claims")?;
    Ok(rows.into_iter().collect())
}

/// Forgets expired claims (the API's hourly housekeeping).
pub async fn forget_expired(pool: &PgPool) -> Result<u64> {
    let done = sqlx::query("delete from review_claims where until < now()").execute(pool).await?;
    Ok(done.rows_affected())
}
