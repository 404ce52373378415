//! The work queue: pending events of every job, filtered, a page at a time.
//!
//! Pages are found by keyset: the next page is the events after the last one shown in
//! (received_at, id) order, one range scan of the partial index `events_review_queue_idx`
//! (sql/0014) however deep in the backlog, never an OFFSET or a scan per page. Filters are bound
//! parameters; a user's text never reaches SQL text.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};

use super::params::{BadParam, Params};

/// Events per page.
pub const PAGE: usize = 50;
/// Characters of metadata shown in a row.
const ROW_METADATA: i32 = 300;

/// What the queue is narrowed to (the query string of `/review`, carried to event pages).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    pub job: Option<String>,
    /// A reason, or `undecided` (stored pending by a run with a backlog, not decided yet).
    pub reason: Option<String>,
    /// Pending (received) at least this many days ago.
    pub min_days: Option<u32>,
    /// Expiring within this many hours (jobs whose `pending_for` is known).
    pub expiring_hours: Option<u32>,
    /// The start of the source: `queue`, `inbox/crm-` …
    pub source: Option<String>,
    /// An event id, a SessionId or MasterId, or text in the metadata.
    pub search: Option<String>,
}

/// The largest `min_days` taken (a century; a larger one is taken as this).
pub const MAX_DAYS: u32 = 36_500;
/// The largest `expiring_hours` taken (a century).
pub const MAX_HOURS: u32 = 876_000;

impl Filters {
    /// The parameters [`Filters::parse`] reads.
    pub const KEYS: [&'static str; 6] = ["job", "reason", "min_days", "expiring_hours", "source", "q"];

    /// From checked parameters; empty values are no filter, numbers are whole and clamped to a
    /// century ([`MAX_DAYS`], [`MAX_HOURS`]), text is cut at 200 characters.
    pub fn parse(p: &Params) -> Result<Filters, BadParam> {
        let text = |k: &str| p.get(k).map(|v| v.chars().take(200).collect::<String>());
        Ok(Filters {
            job: text("job"),
            reason: text("reason"),
            min_days: p.number("min_days", MAX_DAYS, "days")?,
            expiring_hours: p.number("expiring_hours", MAX_HOURS, "hours")?,
            source: text("source"),
            search: text("q"),
        })
    }

    /// From a query string holding only filters (the `filters` field of an event page's forms).
    pub fn from_query(query: &str) -> Result<Filters, BadParam> {
        Filters::parse(&Params::parse(query.as_bytes(), &Filters::KEYS)?)
    }

    /// As a query string (without `?`), for links that keep the filters.
    pub fn to_query(&self) -> String {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        let pairs = [
            ("job", self.job.clone()),
            ("reason", self.reason.clone()),
            ("min_days", self.min_days.map(|d| d.to_string())),
            ("expiring_hours", self.expiring_hours.map(|h| h.to_string())),
            ("source", self.source.clone()),
            ("q", self.search.clone()),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                s.append_pair(k, &v);
            }
        }
        s.finish()
    }
}

/// A place in the queue's order: an event's (received_at, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub received_at: DateTime<Utc>,
    pub id: i64,
}

impl Cursor {
    /// `micros.id`, as links carry it.
    pub fn text(&self) -> String {
        format!("{}.{}", self.received_at.timestamp_micros(), self.id)
    }

    /// A cursor of a link, within PostgreSQL's (and chrono's) range of times: years 1 to 9999.
    pub fn parse(s: &str) -> Option<Cursor> {
        let (t, id) = s.split_once('.')?;
        let received_at = DateTime::from_timestamp_micros(t.parse().ok()?)?;
        (1..=9999).contains(&chrono::Datelike::year(&received_at)).then_some(())?;
        Some(Cursor { received_at, id: id.parse().ok()? })
    }

    /// The cursor parameter `name` of `p`, if given; a 400 when it is not a cursor.
    pub fn param(p: &Params, name: &str) -> Result<Option<Cursor>, BadParam> {
        p.get(name)
            .map(|c| Cursor::parse(c).ok_or_else(|| BadParam::new(name, "is not a place in the queue (MICROS.ID)")))
            .transpose()
    }
}

/// Which page.
#[derive(Debug, Clone, Copy)]
pub enum At {
    First,
    After(Cursor),
    Before(Cursor),
}

/// A pending event as a row of the queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub id: i64,
    pub job: String,
    pub source: String,
    pub session_id: Option<String>,
    pub master_id: Option<String>,
    pub event_time: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub reason: String,
    pub candidates: Vec<String>,
    pub metadata: String,
}

impl Row {
    pub fn cursor(&self) -> Cursor {
        Cursor { received_at: self.received_at, id: self.id }
    }
}

/// A page of the queue, oldest first, with where the pages beside it start.
pub struct Page {
    pub rows: Vec<Row>,
    /// Show the events after this one (there are more).
    pub next: Option<Cursor>,
    /// Show the events before this one (there are some).
    pub prev: Option<Cursor>,
    /// The search was taken for an event id.
    pub by_id: bool,
}

/// How long each job's events stay pending (`pending_for`), for the expiry filter and column.
pub type PendingFor = BTreeMap<String, chrono::Duration>;

/// The conditions of [`Filters`], bound as `$1`–`$9` by [`bind_filters`].
macro_rules! filter_sql {
    () => {
        " and ($1::text is null or job = $1)
          and ($2::text is null or reason = $2 or ($2 = 'undecided' and reason is null))
          and ($3::timestamptz is null or received_at <= $3)
          and ($4::text is null or source like $4)
          and ($6::bigint is null or id = $6)
          and ($5::text is null or session_id = $5 or master_id = $5 or metadata::text ilike $7)
          and ($8::text[] is null or received_at < (select x.c from unnest($8::text[], $9::timestamptz[]) as x(j, c)
                                                   where x.j = events.job))"
    };
}

/// A page of at most `limit` pending events matching `filters`. A search that is a number is
/// first taken for an event id (a primary-key probe); when no such event is in the queue, it is
/// searched as text like any other.
pub async fn page(
    pool: &sqlx::PgPool,
    filters: &Filters,
    pending_for: &PendingFor,
    at: At,
    limit: usize,
) -> Result<Page> {
    if let Some(id) = filters.search.as_deref().and_then(|s| s.parse::<i64>().ok()) {
        let found = page_of(pool, filters, Search::Id(id), pending_for, at, limit).await?;
        if !found.rows.is_empty() {
            return Ok(Page { by_id: true, ..found });
        }
    }
    let search = filters.search.as_deref().map_or(Search::None, Search::Text);
    page_of(pool, filters, search, pending_for, at, limit).await
}

/// How the queue is searched.
#[derive(Clone, Copy)]
enum Search<'s> {
    None,
    Id(i64),
    /// A SessionId or MasterId, or text anywhere in the metadata.
    Text(&'s str),
}

async fn page_of(
    pool: &sqlx::PgPool,
    filters: &Filters,
    search: Search<'_>,
    pending_for: &PendingFor,
    at: At,
    limit: usize,
) -> Result<Page> {
    let (cursor, forward) = match at {
        // Before any event (within PostgreSQL's range of timestamps).
        At::First => {
            (Cursor { received_at: DateTime::from_timestamp(-30_000_000_000, 0).expect("year 1019"), id: 0 }, true)
        }
        At::After(c) => (c, true),
        At::Before(c) => (c, false),
    };
    let sql = if forward {
        concat!(
            "select id, job, source, session_id, master_id, event_time, received_at, coalesce(reason, 'undecided'),
                    coalesce(candidates, '{}'), left(metadata::text, $13)
             from events
             where state = 'pending' and (received_at, id) > ($10, $11)",
            filter_sql!(),
            " order by received_at, id limit $12"
        )
    } else {
        concat!(
            "select id, job, source, session_id, master_id, event_time, received_at, coalesce(reason, 'undecided'),
                    coalesce(candidates, '{}'), left(metadata::text, $13)
             from events
             where state = 'pending' and (received_at, id) < ($10, $11)",
            filter_sql!(),
            " order by received_at desc, id desc limit $12"
        )
    };
    type R = (
        i64,
        String,
        String,
        Option<String>,
        Option<String>,
        DateTime<Utc>,
        DateTime<Utc>,
        String,
        Vec<String>,
        String,
    );
    // Unnamed (not persistent): planned with the values each time, so an unused filter's
    // `$n is null or …` folds away and a search by id is a primary-key probe; a generic plan
    // kept for the statement could not tell.
    let query = bind_filters(sqlx::query_as::<_, R>(sql).persistent(false), filters, search, pending_for)
        .bind(cursor.received_at)
        .bind(cursor.id)
        .bind(limit as i64 + 1)
        .bind(ROW_METADATA);
    let mut rows: Vec<Row> =
        query
            .fetch_all(pool)
            .await
            .context("reading the queue")?
            .into_iter()
            .map(|(id, job, source, session_id, master_id, event_time, received_at, reason, candidates, metadata)| {
                Row { id, job, source, session_id, master_id, event_time, received_at, reason, candidates, metadata }
            })
            .collect();
    let more = rows.len() > limit;
    rows.truncate(limit);
    if !forward {
        rows.reverse();
    }
    let (first, last) = (rows.first().map(Row::cursor), rows.last().map(Row::cursor));
    let (next, prev) = match at {
        At::First => (last.filter(|_| more), None),
        At::After(_) => (last.filter(|_| more), first),
        At::Before(_) => (last, first.filter(|_| more)),
    };
    Ok(Page { rows, next, prev, by_id: false })
}

fn bind_filters<'q, O>(
    q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    f: &Filters,
    search: Search<'_>,
    pending_for: &PendingFor,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    let now = Utc::now();
    // Checked: the filters are clamped to a century, but a panic must not hang on that.
    let ago = |d: chrono::Duration| now.checked_sub_signed(d).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let received_before = f.min_days.map(|d| ago(chrono::Duration::days(d.into())));
    let source = f.source.as_deref().map(|s| format!("{}%", like_escape(s)));
    let (search, search_id) = match search {
        Search::None => (None, None),
        Search::Id(id) => (None, Some(id)),
        Search::Text(text) => (Some(text), None),
    };
    let search_like = search.map(|s| format!("%{}%", like_escape(s)));
    // Expiring within the horizon: received before `now - pending_for + horizon`, per job.
    let (jobs, cutoffs): (Option<Vec<String>>, Option<Vec<DateTime<Utc>>>) = match f.expiring_hours {
        None => (None, None),
        Some(h) => {
            let horizon = chrono::Duration::hours(h.into());
            let cutoff = |p: &chrono::Duration| {
                now.checked_sub_signed(*p)
                    .and_then(|t| t.checked_add_signed(horizon))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC)
            };
            let (j, c) = pending_for.iter().map(|(job, p)| (job.clone(), cutoff(p))).unzip();
            (Some(j), Some(c))
        }
    };
    q.bind(f.job.clone())
        .bind(f.reason.clone())
        .bind(received_before)
        .bind(source)
        .bind(search.map(str::to_owned))
        .bind(search_id)
        .bind(search_like)
        .bind(jobs)
        .bind(cutoffs)
}

/// `s` matched literally by LIKE (its `\`, `%` and `_` escaped).
fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

/// The reasons an event is pending for, and `undecided` (stored pending by a run with a
/// backlog, not decided yet), each with what it means.
pub const REASONS: [(&str, &str); 6] = [
    ("unknown_session", "its SessionId names no call yet; retried on every run until it expires"),
    ("unknown_group", "its MasterId names no call group yet; retried on every run until it expires"),
    ("missing_key", "its Metadata has the keys of no rule"),
    ("no_candidate", "no call or call group has its key values (in the time window)"),
    ("ambiguous", "several calls or groups are equally good candidates"),
    ("undecided", "stored while a run had a backlog and not decided by the rules yet: the next run decides it"),
];

/// Counts stop here: past it the page says "1000+". Counting a backlog's every event on every
/// page would make a page's cost grow with the backlog.
pub const COUNT_CAP: i64 = 1_000;

/// Pending events per reason matching `filters` but for its reason, each counted up to
/// [`COUNT_CAP`] + 1 (a range of `events_review_reason_idx` when no other filter narrows it);
/// reasons with none are left out. `by_id`: the search was taken for an event id (as the page
/// found it: [`Page::by_id`]).
pub async fn counts(
    pool: &sqlx::PgPool,
    filters: &Filters,
    by_id: bool,
    pending_for: &PendingFor,
) -> Result<BTreeMap<String, i64>> {
    // One capped count per reason, each with its own value (bound, and planned with it).
    let count = |condition: &str| {
        format!(
            "(select count(*) from (select 1 from events where state = 'pending' and {condition} {} limit $10) capped)",
            filter_sql!()
        )
    };
    let columns: Vec<String> = REASONS
        .iter()
        .enumerate()
        .map(
            |(i, (r, _))| {
                if *r == "undecided" { count("reason is null") } else { count(&format!("reason = ${}", i + 11)) }
            },
        )
        .collect();
    let sql = format!("select array[{}]", columns.join(", "));
    let all_reasons = Filters { reason: None, ..filters.clone() };
    let search = match filters.search.as_deref() {
        Some(s) if by_id => s.parse().map_or(Search::Text(s), Search::Id),
        Some(s) => Search::Text(s),
        None => Search::None,
    };
    let q = sqlx::query_as::<_, (Vec<i64>,)>(sqlx::AssertSqlSafe(sql)).persistent(false);
    let mut q = bind_filters(q, &all_reasons, search, pending_for).bind(COUNT_CAP + 1);
    for (r, _) in REASONS.iter().filter(|(r, _)| *r != "undecided") {
        q = q.bind(*r);
    }
    let (n,) = q.fetch_one(pool).await.context("counting the queue")?;
    Ok(REASONS.iter().zip(n).filter(|(_, n)| *n > 0).map(|((r, _), n)| (r.to_string(), n)).collect())
}

/// Where an event is in the queue's order (its received_at), if it is pending.
pub async fn position(pool: &sqlx::PgPool, id: i64) -> Result<Option<Cursor>> {
    let at: Option<DateTime<Utc>> = sqlx::query_scalar("select received_at from events where id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .context("reading the event")?;
    Ok(at.map(|received_at| Cursor { received_at, id }))
}

/// The pending events of `filters` just after and just before event `id` in the queue's order
/// (the event itself may be decided already).
pub async fn neighbours(
    pool: &sqlx::PgPool,
    filters: &Filters,
    pending_for: &PendingFor,
    id: i64,
) -> Result<(Option<i64>, Option<i64>)> {
    let Some(pos) = position(pool, id).await? else { return Ok((None, None)) };
    let after = page(pool, filters, pending_for, At::After(pos), 1).await?;
    let before = page(pool, filters, pending_for, At::Before(pos), 1).await?;
    Ok((after.rows.first().map(|r| r.id), before.rows.first().map(|r| r.id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_round_trip_through_the_query_string() {
        let f = Filters::from_query("job=nightly&reason=ambiguous&min_days=2&expiring_hours=&source=inbox%2F&q=C-7%25")
            .unwrap();
        assert_eq!(f.job.as_deref(), Some("nightly"));
        assert_eq!(f.min_days, Some(2));
        assert_eq!(f.expiring_hours, None);
        assert_eq!(f.search.as_deref(), Some("C-7%"));
        assert_eq!(Filters::from_query(&f.to_query()), Ok(f));
    }

    /// Issue 43: an unknown parameter and `min_days=lots` were silently ignored, a NUL reached
    /// PostgreSQL (500), and a huge `min_days` overflowed the date arithmetic (a panic).
    #[test]
    fn bad_filters_are_refused_naming_the_parameter_and_huge_ones_clamped() {
        let refused = |q: &str| Filters::from_query(q).unwrap_err().name;
        assert_eq!(refused("min_days=lots"), "min_days");
        assert_eq!(refused("x=1"), "x");
        assert_eq!(refused("q=%00"), "q");
        assert_eq!(refused("source=%C3%28"), "source");
        let huge = Filters::from_query("min_days=106751991&expiring_hours=4294967295").unwrap();
        assert_eq!((huge.min_days, huge.expiring_hours), (Some(MAX_DAYS), Some(MAX_HOURS)));
        let pending_for: PendingFor = [("j".to_owned(), chrono::Duration::days(36_500))].into();
        // Binding them computes the dates: no panic.
        let _ = bind_filters(sqlx::query_as::<_, (i64,)>("select 1"), &huge, Search::None, &pending_for);
    }

    #[test]
    fn cursors_and_like_patterns() {
        let c = Cursor { received_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(), id: 42 };
        assert_eq!(Cursor::parse(&c.text()), Some(c));
        assert_eq!(Cursor::parse("x.1"), None);
        assert_eq!(Cursor::parse("-9000000000000000000.1"), None);
        assert_eq!(Cursor::parse("253402300800000000.1"), None, "year 10000");
        assert_eq!(like_escape(r"50%_a\b"), r"50\%\_a\\b");
    }
}
