//! A large backlog of unmatched events: the report streams every one into the CSV and the JSON
//! and keeps report.html an analyst's page; old report folders are pruned.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// Pending events of the backlog, a third of each reason; and events the run expires.
const BACKLOG: i64 = 30_000;
const EXPIRING: i64 = 10;

/// Stores `BACKLOG` pending events as earlier runs would have left them (received in the last
/// hours, so they do not expire), `EXPIRING` pending for four days, and one event per 100 with a
/// key of its own (300 metadata keys in all).
async fn insert_backlog(pool: &PgPool) {
    sqlx::query(
        "insert into events (job, source, session_id, event_time, received_at, metadata, ingested_run, state,
                             reason, decided_run)
         select 'test', 'queue:' || g,
                case when g % 3 = 2 then 'nowhere-' || g end,
                timestamptz '2026-11-02T10:00:00Z',
                case when g > $1 then now() - interval '4 days' - g * interval '1 second'
                     else now() - interval '10 hours' + g * interval '1 second' end,
                case g % 3 when 0 then jsonb_build_object('crmCaseId', 'C-' || g, 'i', g)
                           when 1 then jsonb_build_object('other', 'o' || g, 'i', g)
                           else jsonb_build_object('i', g) end
                  || case when g % 100 = 0 then jsonb_build_object('k' || g, g) else '{}' end,
                0, 'pending',
                case g % 3 when 0 then 'no_candidate' when 1 then 'missing_key' else 'unknown_session' end,
                0
         from generate_series(1, $1 + $2) g",
    )
    .bind(BACKLOG)
    .bind(EXPIRING)
    .execute(pool)
    .await
    .unwrap();
}

async fn last_run_dir(pool: &PgPool) -> PathBuf {
    let dir: String =
        sqlx::query_scalar("select report_dir from runs order by id desc limit 1").fetch_one(pool).await.unwrap();
    PathBuf::from(dir)
}

/// Ids of the events a report of the last run must list: pending, or expired by it.
async fn expected_ids(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar(
        "select id from events where state = 'pending'
            or (state = 'expired' and decided_run = (select max(id) from runs)) order by id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Asserts `ids` lists each of `expected` exactly once.
fn assert_each_once(what: &str, ids: &[i64], expected: &[i64]) {
    let set: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(set.len(), ids.len(), "{what} lists an event twice");
    assert_eq!(set.into_iter().collect::<Vec<_>>(), expected, "{what} lists other events than expected");
}

/// Rows of the unmatched table in report.html: (event id, reason).
fn html_rows(html: &str) -> Vec<(i64, String)> {
    let start = html.find("<table id=\"unmatched\">").expect("the unmatched table is in the page");
    let table = &html[start..start + html[start..].find("</table>").unwrap()];
    table
        .split("<tr data-reason=\"")
        .skip(1)
        .map(|tr| {
            let reason = tr[..tr.find('"').unwrap()].to_owned();
            let cell = &tr[tr.find("<td class=\"num\">").unwrap() + 16..];
            (cell[..cell.find('<').unwrap()].trim().parse().unwrap(), reason)
        })
        .collect()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn large_backlog_report_lists_every_event_in_csv_and_json_and_caps_the_html(pool: PgPool) {
    let job = TestJob::new(RULES);
    insert_backlog(&pool).await;
    let out = callrecon_env(
        &pool,
        &["run", "--job", job.path().to_str().unwrap()],
        // A page size that does not divide the backlog: the last page is a partial one.
        &[("CALLRECON_REPORT_PAGE", "997")],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = last_run_dir(&pool).await;
    let expected = expected_ids(&pool).await;
    assert_eq!(expected.len() as i64, BACKLOG + EXPIRING);
    let per_reason = BACKLOG / 3;

    // report.json: valid, the contract's fields, every event once, in received_at order.
    let r: serde_json::Value =
        serde_json::from_reader(std::io::BufReader::new(std::fs::File::open(dir.join("report.json")).unwrap()))
            .expect("report.json is valid JSON");
    for key in ["run_id", "job", "started_at", "finished_at", "dry_run", "summary", "unmatched", "rejected"] {
        assert!(r.get(key).is_some(), "report.json lacks {key}");
    }
    let s = &r["summary"];
    assert_eq!(s["unmatched"], BACKLOG + EXPIRING);
    assert_eq!(s["expired"], EXPIRING);
    assert_eq!(
        s["by_reason"],
        serde_json::json!({"expired": EXPIRING, "missing_key": per_reason, "no_candidate": per_reason,
                           "unknown_session": per_reason})
    );
    let unmatched = r["unmatched"].as_array().unwrap();
    let ids: Vec<i64> = unmatched.iter().map(|u| u["event_id"].as_str().unwrap().parse().unwrap()).collect();
    assert_each_once("report.json", &ids, &expected);
    let times: Vec<&str> = unmatched.iter().map(|u| u["received_at"].as_str().unwrap()).collect();
    assert!(times.first() < times.last(), "oldest first");
    for key in [
        "event_id",
        "source",
        "session_id",
        "master_id",
        "event_time",
        "received_at",
        "reason",
        "candidates",
        "metadata",
    ] {
        assert!(unmatched[0].get(key).is_some(), "unmatched entry lacks {key}");
    }

    // unmatched.csv: every event once; a column for each of the 100 most frequent metadata keys.
    let mut csv = csv::Reader::from_path(dir.join("unmatched.csv")).unwrap();
    let headers: Vec<String> = csv.headers().unwrap().iter().map(str::to_owned).collect();
    assert_eq!(headers.len(), 13 + 100, "the fixed columns and the capped key columns");
    for key in ["crmCaseId", "i", "other"] {
        assert!(headers.contains(&key.to_owned()), "the frequent key {key} has a column");
    }
    let ids: Vec<i64> = csv.records().map(|row| row.unwrap()[0].parse().unwrap()).collect();
    assert_each_once("unmatched.csv", &ids, &expected);

    // report.html: bounded, says it is capped and where the full list is, counts over everything.
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.len() < 1_500_000, "report.html is {} bytes", html.len());
    assert!(html.contains("This table is capped"), "the page says the table is capped");
    assert!(html.contains("<code>unmatched.csv</code> and <code>report.json</code>"), "and where the full list is");
    let shown = callrecon::tuning::REPORT_SHOWN_PER_END as i64;
    let omitted = per_reason - 2 * shown;
    for reason in ["missing_key", "no_candidate", "unknown_session"] {
        assert!(html.contains(&format!("data-reason=\"{reason}\">{reason} {omitted}</span>")), "{reason} omitted");
        assert!(
            html.contains(&format!("<tr><td>{reason}</td><td class=\"num\">{per_reason}</td><td class=\"muted\">")),
            "{reason} count"
        );
    }
    let rows = html_rows(&html);
    assert_eq!(rows.len() as i64, 3 * 2 * shown + EXPIRING);
    for reason in ["missing_key", "no_candidate", "unknown_session", "expired"] {
        let of: Vec<i64> = expected_of_reason(&pool, reason).await;
        let shown_ids: BTreeSet<i64> = rows.iter().filter(|r| r.1 == reason).map(|r| r.0).collect();
        let want: BTreeSet<i64> = if of.len() as i64 > 2 * shown {
            of[..shown as usize].iter().chain(&of[of.len() - shown as usize..]).copied().collect()
        } else {
            of.iter().copied().collect()
        };
        assert_eq!(shown_ids, want, "the oldest and newest {shown} {reason} events are shown");
    }

    // `report show` streams the same lists.
    let text = stdout(&callrecon(&pool, &["report", "show", r["run_id"].as_str().unwrap()]).await);
    assert_eq!(text.lines().filter(|l| l.starts_with("  event ")).count() as i64, BACKLOG + EXPIRING);
    assert!(text.contains(&format!("unmatched {:>6}", BACKLOG + EXPIRING)), "{}", &text[..500]);
    let json = callrecon(&pool, &["report", "show", r["run_id"].as_str().unwrap(), "--format", "json"]).await;
    let shown_json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(shown_json["unmatched"].as_array().unwrap().len() as i64, BACKLOG + EXPIRING);
}

/// Ids of the last run's report events of `reason`, oldest first (as the report orders them).
async fn expected_of_reason(pool: &PgPool, reason: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "select id from events
         where case when state = 'expired' then 'expired' else reason end = $1
           and (state = 'pending' or (state = 'expired' and decided_run = (select max(id) from runs)))
         order by received_at, id",
    )
    .bind(reason)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A job whose `[report]` section has `keep = <keep>`.
fn keeping(keep: &str) -> TestJob {
    let job = TestJob::new(RULES);
    TestJob { job: job.edit(&[("dir = \"reports\"", &format!("dir = \"reports\"\nkeep = {keep}"))]), dir: job.dir }
}

fn report_folders(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn report_keep_prunes_old_report_folders_and_keeps_the_history(pool: PgPool) {
    let job = keeping("2");
    let reports = job.dir.path().join("reports");
    for _ in 0..3 {
        job.run(&pool).await;
    }
    // What a killed run left.
    std::fs::create_dir_all(reports.join(".999.partial")).unwrap();
    job.dry_run(&pool).await;
    assert_eq!(report_folders(&reports), ["3", "4"], "the newest two reports are kept");
    let pruned: Vec<i64> = sqlx::query_scalar("select id from runs where report_pruned_at is not null order by id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(pruned, [1, 2]);

    let list = stdout(&callrecon(&pool, &["report", "list"]).await);
    assert_eq!(list.lines().count(), 1 + 4, "every run is still in the history:\n{list}");
    assert_eq!(list.matches("report pruned").count(), 2, "{list}");
    let show = callrecon(&pool, &["report", "show", "1"]).await;
    assert!(!show.status.success());
    assert!(stderr(&show).contains("the report of run 1 was pruned on "), "{}", stderr(&show));
    let show = callrecon(&pool, &["report", "show", "4"]).await;
    assert!(show.status.success(), "{}", stderr(&show));

    // By age: a report of a run started before the cut-off goes, the others stay.
    let job = keeping("\"30d\"");
    let reports = job.dir.path().join("reports");
    job.run(&pool).await;
    job.run(&pool).await;
    sqlx::query("update runs set started_at = now() - interval '31 days' where id = 5").execute(&pool).await.unwrap();
    job.run(&pool).await;
    assert_eq!(report_folders(&reports), ["6", "7"]);
    let pruned: i64 = count(&pool, "select count(*) from runs where report_pruned_at is not null").await;
    assert_eq!(pruned, 3);
}
