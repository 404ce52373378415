//! `callrecon gen` (module `datagen`): realistic call data and events at a chosen scale, for benchmarks.
//!
//! Deterministic from a seed without holding anything in memory: call `i` is a pure function of
//! `(seed, i)`, and its start time grows with `i`, so the calls of a day are an index range and an
//! event describing call `i` can be made by recomputing it. Everything is written with COPY.

use anyhow::{Context, Result};
use chrono::{DateTime, Duration, Utc};
use sqlx::PgConnection;

/// The shape of the data.
#[derive(Debug, Clone)]
pub struct Scale {
    pub calls: u64,
    pub days: u32,
    /// The end of the data (exclusive); calls span `days` before it.
    pub until: DateTime<Utc>,
    pub seed: u64,
    pub groups: Groups,
}

/// How calls are put in call groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Groups {
    /// A group is one customer's CRM case: 30% of customers have one, and all their calls are in
    /// it, so the group fields of its events (account id and tier) agree.
    Cases,
    /// 30% of calls, each in one of `calls / 20` groups at random: a group's calls are unrelated
    /// customers, so every event changes its group's account fields on all its calls (a stress
    /// shape; the benchmarks' data before 2026-11-25).
    Mixed,
}

/// A call, recomputed from its index.
pub struct GenCall {
    pub id: u64,
    pub start: DateTime<Utc>,
    pub seconds: i64,
    pub open: bool,
    pub customer: u64,
    pub agent: u64,
    pub group: Option<u64>,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Scale {
    fn h(&self, i: u64, salt: u64) -> u64 {
        splitmix(self.seed ^ splitmix(i.wrapping_mul(64).wrapping_add(salt)))
    }
    fn from(&self) -> DateTime<Utc> {
        self.until - Duration::days(i64::from(self.days))
    }
    /// When the calls start: `[from, until)`.
    pub fn span(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        (self.from(), self.until)
    }
    fn spacing_ms(&self) -> u64 {
        (u64::from(self.days) * 86_400_000 / self.calls.max(1)).max(1)
    }
    /// Repeat callers: about four calls per customer.
    fn customers(&self) -> u64 {
        (self.calls / 4).max(1)
    }
    /// The ids of the call groups (`g{id}`).
    pub fn groups(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        match self.groups {
            Groups::Cases => Box::new((0..self.customers()).filter(|&c| self.has_case(c))),
            Groups::Mixed => Box::new(0..self.mixed_groups()),
        }
    }
    /// How many groups the mixed shape spreads grouped calls over.
    fn mixed_groups(&self) -> u64 {
        (self.calls / 20).max(1)
    }
    /// Whether a customer has a CRM case (its id is the customer's number).
    fn has_case(&self, customer: u64) -> bool {
        // Salts of calls are below 64 (`h`): customers hash apart from calls.
        splitmix(self.seed ^ splitmix(customer.wrapping_mul(64).wrapping_add(63))) % 10 < 3
    }

    pub fn call(&self, i: u64) -> GenCall {
        let spacing = self.spacing_ms();
        let start = self.from() + Duration::milliseconds((i * spacing + self.h(i, 0) % spacing) as i64);
        let mut customer = self.h(i, 2) % self.customers();
        let mut agent = self.h(i, 3) % 2_000;
        // One call in 200 is a callback to the same agent right after the previous call: an event
        // inside both is a tie, the ambiguous case.
        if i > 0 && self.h(i, 4).is_multiple_of(200) {
            let prev = self.call(i - 1);
            customer = prev.customer;
            agent = prev.agent;
        }
        GenCall {
            id: i,
            start,
            seconds: 60 + (self.h(i, 1) % 1_140) as i64,
            open: self.h(i, 7).is_multiple_of(50),
            customer,
            agent,
            group: match self.groups {
                Groups::Cases => self.has_case(customer).then_some(customer),
                Groups::Mixed => (self.h(i, 5) % 10 < 3).then(|| self.h(i, 6) % self.mixed_groups()),
            },
        }
    }

    /// A call group that exists, chosen by `x`.
    fn some_group(&self, x: u64) -> u64 {
        match self.groups {
            Groups::Mixed => x % self.mixed_groups(),
            // Three customers in ten have a case: the first of the customers `x` picks that has one.
            Groups::Cases => (0..64)
                .map(|k| splitmix(x.wrapping_add(k)) % self.customers())
                .find(|&c| self.has_case(c))
                .unwrap_or_else(|| self.groups().next().unwrap_or(0)),
        }
    }

    /// Indices of the calls starting in `[from, to)`.
    pub fn calls_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> std::ops::Range<u64> {
        let index =
            |t: DateTime<Utc>| ((t - self.from()).num_milliseconds().max(0) as u64 / self.spacing_ms()).min(self.calls);
        index(from)..index(to)
    }
}

/// How the platform's `calls` table is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Layout {
    /// One heap, as migration 0001 creates it (`id` primary key, `session_id` unique).
    #[default]
    Plain,
    /// Range-partitioned by `started_at`, one partition a month (and a default one), as big
    /// platforms keep calls: primary key `(id, started_at)`, `session_id` indexed but not unique.
    Partitioned,
}

/// How much of `started_at` one partition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PartitionBy {
    /// A calendar month (UTC): what big platforms keep.
    #[default]
    Month,
    /// A day (UTC): 30 partitions for the bench's 30 days, to measure what many populated
    /// partitions cost (each lookup by id or by group probes every partition's index).
    Day,
}

/// The partitions `[start, end)` covering `[from, to)`, from the start of the month (or day)
/// `from` is in.
pub fn partitions(by: PartitionBy, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    use chrono::{Datelike as _, TimeZone as _};
    let first = |y: i32, m: u32| Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().expect("the first of a month");
    let next = |t: DateTime<Utc>| match by {
        PartitionBy::Month if t.month() == 12 => first(t.year() + 1, 1),
        PartitionBy::Month => first(t.year(), t.month() + 1),
        PartitionBy::Day => t + Duration::days(1),
    };
    let mut start = match by {
        PartitionBy::Month => first(from.year(), from.month()),
        PartitionBy::Day => from.date_naive().and_hms_opt(0, 0, 0).expect("midnight").and_utc(),
    };
    let mut out = Vec::new();
    while start < to {
        out.push((start, next(start)));
        start = next(start);
    }
    out
}

/// Replaces an empty plain `calls` with one range-partitioned by `started_at` into `ranges` (and
/// a default partition), keeping what callrecon installed on it (its indexes and triggers, taken
/// from the catalog and created again on the new table). On a `calls` partitioned already, only
/// adds the partitions of `ranges` that are missing. Refuses a plain `calls` that holds rows.
///
/// The platform owns `calls`; this is the fixture writer's stand-in for a platform that
/// partitions it (`callrecon gen calls --layout partitioned`, and the tests of that layout).
pub async fn partition_calls(conn: &mut PgConnection, ranges: &[(DateTime<Utc>, DateTime<Utc>)]) -> Result<()> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let (partitioned, schema): (bool, String) = sqlx::query_as(
        "select c.relkind = 'p', n.nspname::text from pg_class c
         join pg_namespace n on n.oid = c.relnamespace where c.oid = 'calls'::regclass",
    )
    .fetch_one(&mut *tx)
    .await
    .context("finding the calls table")?;
    let calls = format!("{}.calls", quoted(&schema));
    if !partitioned {
        repartition(&mut tx, &schema, &calls).await?;
    }
    for (from, to) in ranges {
        add_partition(&mut tx, &schema, &calls, *from, *to).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A name quoted as an SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Replaces the plain, empty `calls` (in `schema`; `calls`: its quoted name) by a partitioned
/// one with a default partition.
async fn repartition(tx: &mut PgConnection, schema: &str, calls: &str) -> Result<()> {
    let empty: bool = sqlx::query_scalar("select not exists (select 1 from calls)").fetch_one(&mut *tx).await?;
    anyhow::ensure!(empty, "calls holds rows: partitioning it needs an empty table (a fresh database)");
    // What callrecon (or anyone) put on calls beyond its columns and keys, as SQL the catalog
    // prints: created again on the partitioned table (indexes become partitioned indexes,
    // row triggers are cloned to every partition).
    let mut again: Vec<String> = sqlx::query_scalar(
        "select pg_get_indexdef(i.indexrelid) from pg_index i
         where i.indrelid = 'calls'::regclass
           and not exists (select 1 from pg_constraint k where k.conindid = i.indexrelid)
         order by i.indexrelid",
    )
    .fetch_all(&mut *tx)
    .await?;
    again.extend(
        sqlx::query_scalar::<_, String>(
            "select pg_get_triggerdef(oid) from pg_trigger
             where tgrelid = 'calls'::regclass and not tgisinternal order by oid",
        )
        .fetch_all(&mut *tx)
        .await?,
    );
    let create = format!(
        "drop table {calls};
         create table {calls} (
             id             text not null,
             session_id     text,
             call_group_id  text references call_groups(id),
             started_at     timestamptz not null,
             ended_at       timestamptz,
             ani            text,
             dnis           text,
             agent_id       text,
             metadata       jsonb not null default '{{}}',
             async_metadata jsonb not null default '{{}}',
             primary key (id, started_at)
         ) partition by range (started_at);
         create index calls_session_id_idx on {calls} (session_id);
         create table {schema}.calls_default partition of {calls} default with (fillfactor = 80);",
        schema = quoted(schema)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&mut *tx).await.context("creating partitioned calls")?;
    for sql in again {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.context("re-creating on calls")?;
    }
    Ok(())
}

/// The partition of `[from, to)` when it is missing.
async fn add_partition(
    tx: &mut PgConnection,
    schema: &str,
    calls: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<()> {
    let name = format!("calls_{}", from.format("%Y%m%d%H"));
    let exists: bool = sqlx::query_scalar(
        "select exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace
                        where n.nspname = $1 and c.relname = $2)",
    )
    .bind(schema)
    .bind(&name)
    .fetch_one(&mut *tx)
    .await?;
    if exists {
        return Ok(());
    }
    // Our own timestamps, printed by chrono.
    let sql = format!(
        "create table {}.{} partition of {calls} for values from ('{}') to ('{}') with (fillfactor = 80)",
        quoted(schema),
        quoted(&name),
        from.to_rfc3339(),
        to.to_rfc3339()
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.with_context(|| format!("creating {name}"))?;
    Ok(())
}

/// A customer's number in E.164, and written the way a CRM might.
fn phone(customer: u64, style: u64) -> String {
    let area = 201 + customer % 780;
    let exchange = 200 + (customer / 780) % 800;
    let line = (customer / 624_000) % 10_000 + customer % 7;
    let line = line % 10_000;
    match style % 4 {
        0 => format!("+1{area}{exchange}{line:04}"),
        1 => format!("({area}) {exchange}-{line:04}"),
        2 => format!("1{area}{exchange}{line:04}"),
        _ => format!("+1 {area}-{exchange}-{line:04}"),
    }
}

const TIERS: &[&str] = &["bronze", "silver", "gold", "platinum"];

/// Writes call groups and calls with COPY. Returns the number of calls.
pub async fn calls(conn: &mut PgConnection, s: &Scale) -> Result<u64> {
    let mut copy = conn.copy_in_raw("copy call_groups (id, metadata) from stdin (format csv)").await?;
    let mut buf = String::new();
    for g in s.groups() {
        buf.push_str(&format!("g{g},\"{{\"\"caseNumber\"\": \"\"C-{g}\"\", \"\"queue\"\": \"\"q{}\"\"}}\"\n", g % 12));
        if buf.len() > 1 << 20 {
            copy.send(std::mem::take(&mut buf).into_bytes()).await?;
        }
    }
    copy.send(buf.into_bytes()).await?;
    copy.finish().await.context("copying call groups")?;

    let mut copy = conn
        .copy_in_raw("copy calls (id, session_id, call_group_id, started_at, ended_at, ani, dnis, agent_id, metadata) from stdin (format csv)")
        .await?;
    let mut buf = String::with_capacity(1 << 21);
    for i in 0..s.calls {
        let c = s.call(i);
        let end = if c.open { String::new() } else { (c.start + Duration::seconds(c.seconds)).to_rfc3339() };
        let group = c.group.map(|g| format!("g{g}")).unwrap_or_default();
        buf.push_str(&format!(
            "c{i},s{i},{group},{},{end},{},+18005550{},agent-{:04},\"{{\"\"ivr\"\": \"\"path-{}\"\"}}\"\n",
            c.start.to_rfc3339(),
            phone(c.customer, 0),
            100 + i % 9,
            c.agent,
            i % 17
        ));
        if buf.len() > 1 << 21 {
            copy.send(std::mem::take(&mut buf).into_bytes()).await?;
        }
    }
    copy.send(buf.into_bytes()).await?;
    copy.finish().await.context("copying calls")?;
    Ok(s.calls)
}

/// Queues `n` events about the calls starting in `[from, to)`: mostly sessionless (phone and
/// agent in mixed formats; CRM cases for groups), some with a SessionId, some with no candidate
/// or no key; and `master_percent` of them addressed to a call group by MasterId (one in 20 of
/// those to a group that does not exist). `salt` keeps several batches apart. With
/// `master_percent` 0 the events are those generated before MasterId existed.
pub async fn events(
    conn: &mut PgConnection,
    s: &Scale,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    n: u64,
    (salt, master_percent): (u64, u64),
) -> Result<u64> {
    let range = s.calls_between(from, to);
    anyhow::ensure!(!range.is_empty(), "no calls between {from} and {to}");
    // Events reach the queue an hour after they happen, as from a CRM's hourly export: old ones
    // are then past pending_for, as they would be in production.
    let mut copy = conn.copy_in_raw("copy event_queue (received_at, payload) from stdin (format csv)").await?;
    let mut buf = String::with_capacity(1 << 21);
    for k in 0..n {
        let r = |x: u64| s.h(k ^ (salt << 40), 100 + x);
        let i = range.start + r(0) % (range.end - range.start);
        let c = s.call(i);
        let offset = (r(1) % (c.seconds as u64 + 600)) as i64 - 300;
        let at = c.start + Duration::seconds(offset);
        let time = at.to_rfc3339();
        let tier = TIERS[(c.customer % 4) as usize];
        let common = format!(
            "\"crmAccountId\": \"A-{}\", \"accountTier\": \"{tier}\", \"customerDataField1\": \"d{}\"",
            c.customer,
            r(2) % 1000
        );
        let master = (r(6) % 100 < master_percent).then(|| match c.group {
            _ if r(7).is_multiple_of(20) => format!("g-unknown-{}", r(8) % 1000),
            Some(g) => format!("g{g}"),
            None => format!("g{}", s.some_group(r(8))),
        });
        let payload = match r(3) % 100 {
            _ if master.is_some() => format!(
                "{{\"MasterId\": \"{}\", \"EventTime\": \"{time}\", \"Metadata\": {{\"caseStatus\": \"open\", {common}}}}}",
                master.expect("checked")
            ),
            0..=9 => format!(
                "{{\"SessionId\": \"s{i}\", \"EventTime\": \"{}\", \"Metadata\": {{{common}}}}}",
                (c.start + Duration::seconds(c.seconds / 2)).to_rfc3339()
            ),
            10..=14 if c.group.is_some() => format!(
                "{{\"EventTime\": \"{time}\", \"Metadata\": {{\"crmCaseId\": \"C-{}\", {common}}}}}",
                c.group.expect("checked")
            ),
            15..=16 => format!(
                "{{\"EventTime\": \"{time}\", \"Metadata\": {{\"customerPhone\": \"+1 999 555 {:04}\", \"agentId\": \"agent-{:04}\", {common}}}}}",
                r(4) % 10_000,
                c.agent
            ),
            17 => format!("{{\"EventTime\": \"{time}\", \"Metadata\": {{{common}}}}}"),
            _ => format!(
                "{{\"EventTime\": \"{time}\", \"Metadata\": {{\"customerPhone\": \"{}\", \"agentId\": \"agent-{:04}\", {common}}}}}",
                phone(c.customer, r(5)),
                c.agent
            ),
        };
        buf.push_str(&(at + Duration::hours(1)).to_rfc3339());
        buf.push_str(",\"");
        buf.push_str(&payload.replace('"', "\"\""));
        buf.push_str("\"\n");
        if buf.len() > 1 << 21 {
            copy.send(std::mem::take(&mut buf).into_bytes()).await?;
        }
    }
    copy.send(buf.into_bytes()).await?;
    copy.finish().await.context("copying events")?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scale() -> Scale {
        Scale {
            calls: 10_000,
            days: 10,
            until: "2026-10-31T00:00:00Z".parse().unwrap(),
            seed: 7,
            groups: Groups::Cases,
        }
    }

    #[test]
    fn a_case_group_holds_one_customers_calls() {
        let s = scale();
        let mut customer_of_group = std::collections::HashMap::new();
        let mut grouped = 0;
        for i in 0..s.calls {
            let c = s.call(i);
            if let Some(g) = c.group {
                grouped += 1;
                assert_eq!(*customer_of_group.entry(g).or_insert(c.customer), c.customer, "call {i}");
            }
        }
        // About 30% of calls, in groups that exist.
        assert!((2_500..3_500).contains(&grouped), "{grouped}");
        let groups: std::collections::HashSet<u64> = s.groups().collect();
        assert!(customer_of_group.keys().all(|g| groups.contains(g)));

        let mixed = Scale { groups: Groups::Mixed, ..s };
        let groups: std::collections::HashSet<u64> = mixed.groups().collect();
        let customers: std::collections::HashSet<u64> =
            (0..mixed.calls).map(|i| mixed.call(i)).filter(|c| c.group == Some(0)).map(|c| c.customer).collect();
        assert!(customers.len() > 1 && groups.len() == 500, "{customers:?}");
    }

    #[test]
    fn calls_are_deterministic_and_ordered_in_time() {
        let s = scale();
        let (a, b) = (s.call(1234), s.call(1234));
        assert_eq!((a.start, a.customer, a.agent, a.group), (b.start, b.customer, b.agent, b.group));
        assert!((0..9_999).all(|i| s.call(i).start <= s.call(i + 1).start));
        let day = s.calls_between("2026-10-30T00:00:00Z".parse().unwrap(), s.until);
        assert!(s.call(day.start).start >= "2026-10-30T00:00:00Z".parse::<DateTime<Utc>>().unwrap());
        assert!((900..=1_100).contains(&(day.end - day.start)), "{day:?}");
    }

    #[test]
    fn partitions_cover_the_period_from_the_start_of_its_first_month_or_day() {
        let months = |a, b| partitions(PartitionBy::Month, a, b);
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let bounds: Vec<String> = months(t("2026-09-21T00:00:00Z"), t("2026-10-31T00:00:00Z"))
            .into_iter()
            .map(|(a, b)| format!("{}..{}", a.date_naive(), b.date_naive()))
            .collect();
        assert_eq!(bounds, ["2026-09-01..2026-10-01", "2026-10-01..2026-11-01"]);
        let over_new_year = months(t("2026-12-31T23:00:00Z"), t("2027-01-01T00:00:01Z"));
        assert_eq!(over_new_year.len(), 2);
        assert_eq!(over_new_year[1], (t("2027-01-01T00:00:00Z"), t("2027-02-01T00:00:00Z")));
        // A period ending on the first of a month needs no partition for that month.
        assert_eq!(months(t("2026-10-01T00:00:00Z"), t("2026-11-01T00:00:00Z")).len(), 1);
        let days = partitions(PartitionBy::Day, t("2026-10-01T12:00:00Z"), t("2026-10-31T00:00:00Z"));
        assert_eq!((days.len(), days[0].0, days[29].1), (30, t("2026-10-01T00:00:00Z"), t("2026-10-31T00:00:00Z")));
    }

    #[test]
    fn phone_styles_normalise_to_the_same_number() {
        use crate::matching::rules::normalize;
        let n: Vec<_> =
            (0..4).map(|style| normalize(Some(crate::job::Normalizer::Phone), &phone(987_654, style))).collect();
        assert!(n.iter().all(|x| x == &n[0]), "{n:?}");
    }
}
