//! `callrecon demo`: load `samples/` as a platform would, then run `jobs/demo.toml` twice — once
//! as events arrive, once after a late call and a late call group land — and show the report.

use std::path::Path;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::ingest::{inbox, queue};
use crate::job::Job;
use crate::run::{self, Finished, Mode};

/// Loads the sample call data, queue events and inbox files, runs the job, loads the late call
/// group and call, runs again. Returns both runs.
pub async fn demo(pool: &PgPool, samples: &Path, job: &Job) -> Result<Vec<Finished>> {
    let loaded: bool =
        sqlx::query_scalar("select exists (select 1 from calls where id = 'call-0001')").fetch_one(pool).await?;
    if loaded {
        println!(
            "samples are already in this database: running the demo job again (nothing new to ingest; \
             scripts/demo.sh without DATABASE_URL starts over in an empty demo database)"
        );
    } else {
        let groups = load_groups(pool, &samples.join("call_groups.csv")).await?;
        let calls = load_calls(pool, &samples.join("calls.csv")).await?;
        println!("loaded {groups} call groups and {calls} calls from {}", samples.display());

        // Producers can write anything to the queue; the bad JSON-valid records go on it so the
        // demo shows them rejected (a non-JSON line cannot be stored in a jsonb column).
        let (payloads, _not_json) = inbox::payloads_of(&inbox::list(&samples.join("queue"))?)?;
        let n = queue::enqueue(&mut *pool.acquire().await?, &payloads).await?;
        println!("queued {n} API events on event_queue");

        if let Some(inbox_dir) = &job.inbox {
            std::fs::create_dir_all(inbox_dir)?;
            for path in inbox::list(&samples.join("inbox"))? {
                let dest = inbox_dir.join(path.file_name().expect("file name"));
                std::fs::copy(&path, &dest)
                    .with_context(|| format!("copying {} to {}", path.display(), dest.display()))?;
                // Written whole just now: dated back past `[sources] settle`, so the run reads
                // it at once rather than waiting for it to settle.
                let settled = std::time::SystemTime::now() - job.settle - std::time::Duration::from_secs(1);
                std::fs::File::options()
                    .append(true)
                    .open(&dest)
                    .and_then(|f| f.set_modified(settled))
                    .with_context(|| format!("dating {}", dest.display()))?;
                println!("dropped {} into {}", path.display(), inbox_dir.display());
            }
        }
    }

    let mut runs = Vec::new();
    println!("\n== the first run: ingest and match ==");
    runs.push(run::execute(pool, job, Mode::Run, false).await?);
    println!("{}", crate::report::history::summary_text(&runs[0].report, &runs[0].dir));

    let late_groups = load_groups(pool, &samples.join("call_groups_late.csv")).await?;
    let late = load_calls(pool, &samples.join("calls_late.csv")).await?;
    println!(
        "\n== a late call group and call land ({late_groups} new group, {late} new call): the next run attaches the events waiting for them =="
    );
    runs.push(run::execute(pool, job, Mode::Run, false).await?);
    println!("{}", crate::report::history::summary_text(&runs[1].report, &runs[1].dir));
    Ok(runs)
}

/// What to do after the demo, for this machine: the database and binary it used, and the README's
/// next commands with the job file as given and one of the events the demo left ambiguous.
pub async fn next_steps(pool: &PgPool, url: &str, job: &Job) -> Result<String> {
    let ambiguous: Option<i64> =
        sqlx::query_scalar("select min(id) from events where job = $1 and state = 'pending' and reason = 'ambiguous'")
            .bind(&job.name)
            .fetch_one(pool)
            .await?;
    let event = ambiguous.map_or_else(|| "EVENT_ID".to_owned(), |id| id.to_string());
    let job = job.path.display();
    let mut out = String::from("\n== what next (README.md, \"What to do next\") ==\n");
    let redacted = crate::db::redact(url);
    let note = if redacted == url { "" } else { "   # with your password in place of ***" };
    out += &format!("export DATABASE_URL={redacted}{note}\n");
    if let Some(dir) = std::env::current_exe().ok().as_deref().and_then(Path::parent) {
        out += &format!("export PATH=\"{}:$PATH\"\n", dir.display());
    }
    let next = [
        (format!("callrecon explain --job {job} {event}"), "why this event did not match"),
        ("callrecon users add ana --role Analyst".to_owned(), "a login to the review desk (prints its secret)"),
        (format!("callrecon serve --job {job}"), "the desk: http://127.0.0.1:8080/review/login"),
        (format!("callrecon rematch --job {job} --dry-run"), "after a rule change: what would change"),
    ];
    let width = next.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    for (command, what) in next {
        out += &format!("{command:width$}   # {what}\n");
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
struct GroupRow {
    id: String,
    metadata: String,
}

#[derive(serde::Deserialize)]
struct CallRow {
    id: String,
    session_id: Option<String>,
    call_group_id: Option<String>,
    started_at: DateTime<Utc>,
    ended_at: Option<DateTime<Utc>>,
    ani: Option<String>,
    dnis: Option<String>,
    agent_id: Option<String>,
    metadata: String,
}

fn read_csv<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("opening {}", path.display()))?;
    reader.deserialize().map(|r| r.with_context(|| format!("reading {}", path.display()))).collect()
}

/// Inserts call groups not yet present; returns how many were new.
pub async fn load_groups(pool: &PgPool, path: &Path) -> Result<u64> {
    let rows: Vec<GroupRow> = read_csv(path)?;
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let meta: Vec<&str> = rows.iter().map(|r| r.metadata.as_str()).collect();
    Ok(sqlx::query(
        "insert into call_groups (id, metadata) select * from unnest($1::text[], $2::jsonb[]) on conflict do nothing",
    )
    .bind(&ids)
    .bind(&meta)
    .execute(pool)
    .await
    .context("loading call groups")?
    .rows_affected())
}

/// Inserts calls not yet present; returns how many were new.
pub async fn load_calls(pool: &PgPool, path: &Path) -> Result<u64> {
    let rows: Vec<CallRow> = read_csv(path)?;
    let col = |f: fn(&CallRow) -> Option<&str>| rows.iter().map(f).collect::<Vec<_>>();
    Ok(sqlx::query(
        "insert into calls (id, session_id, call_group_id, started_at, ended_at, ani, dnis, agent_id, metadata)
         select * from unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[],
                              $6::text[], $7::text[], $8::text[], $9::jsonb[])
         on conflict do nothing",
    )
    .bind(col(|r| Some(r.id.as_str())))
    .bind(col(|r| r.session_id.as_deref()))
    .bind(col(|r| r.call_group_id.as_deref()))
    .bind(rows.iter().map(|r| r.started_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.ended_at).collect::<Vec<_>>())
    .bind(col(|r| r.ani.as_deref()))
    .bind(col(|r| r.dnis.as_deref()))
    .bind(col(|r| r.agent_id.as_deref()))
    .bind(col(|r| Some(r.metadata.as_str())))
    .execute(pool)
    .await
    .context("loading calls")?
    .rows_affected())
}
