//! report.html in a real headless browser (Debian's chromium; scripts/test.sh installs it):
//! the table is there, sorting reorders it, filtering by reason narrows it.

use std::path::Path;

use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// The DOM of `page` after its scripts ran, as headless Chromium serialises it.
fn rendered_dom(page: &Path, hash: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}{hash}", page.display());
    let out = std::process::Command::new(chromium())
        .args(chromium_flags(profile.path()))
        .args(["--virtual-time-budget=5000", "--dump-dom", &url])
        .output()
        .expect("running chromium");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn chromium() -> &'static str {
    let path = "/usr/bin/chromium";
    assert!(Path::new(path).exists(), "{path} is missing: scripts/test.sh installs Debian's chromium");
    path
}

fn chromium_flags(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

/// (event id, reason, visible) of each row of the unmatched table, in DOM order.
fn rows(dom: &str) -> Vec<(u64, String, bool)> {
    let start = dom.find("<table id=\"unmatched\">").expect("the unmatched table is in the page");
    let table = &dom[start..start + dom[start..].find("</table>").unwrap()];
    table
        .split("<tr data-reason=\"")
        .skip(1)
        .map(|tr| {
            let reason = tr[..tr.find('"').unwrap()].to_owned();
            let open_tag = &tr[..tr.find('>').unwrap()];
            let hidden = open_tag.contains("display: none");
            let cell = &tr[tr.find("<td class=\"num\">").unwrap() + 16..];
            let id = cell[..cell.find('<').unwrap()].trim().parse().unwrap();
            (id, reason, !hidden)
        })
        .collect()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn report_table_sorts_and_filters_in_a_real_browser(pool: PgPool) {
    Call::new("c1", "2026-11-02T14:00:00Z", Some("2026-11-02T14:15:00Z")).phone("5557770000", "a3").insert(&pool).await;
    Call::new("c2", "2026-11-02T14:25:00Z", Some("2026-11-02T14:30:00Z")).phone("5557770000", "a3").insert(&pool).await;
    let job = TestJob::new(RULES);
    let mut payloads = Vec::new();
    for i in 0..300 {
        payloads.push(match i % 4 {
            0 => json!({"SessionId": format!("nowhere-{i}"), "EventTime": "2026-11-02T10:00:00Z", "Metadata": {"i": i}}),
            1 => json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"i": i}}),
            2 => json!({"EventTime": "2026-11-02T10:00:00Z", "Metadata": {"crmCaseId": format!("C-{i}")}}),
            // Each its own event (the same one again would be a duplicate).
            _ => json!({"EventTime": "2026-11-02T14:20:00Z", "Metadata": {"customerPhone": "5557770000", "agentId": "a3", "i": i}}),
        });
    }
    for p in payloads {
        enqueue(&pool, p).await;
    }
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.unmatched, 300);
    let page = done.dir.join("report.html");

    let all = rows(&rendered_dom(&page, ""));
    assert_eq!(all.len(), 300);
    assert!(all.iter().all(|r| r.2), "every row shown without a filter");

    let ambiguous = rows(&rendered_dom(&page, "#reason=ambiguous"));
    let shown: Vec<_> = ambiguous.iter().filter(|r| r.2).collect();
    assert_eq!(shown.len(), 75);
    assert!(shown.iter().all(|r| r.1 == "ambiguous"));

    let by_id_desc = rows(&rendered_dom(&page, "#sort=0&dir=desc"));
    let ids: Vec<u64> = by_id_desc.iter().map(|r| r.0).collect();
    let mut expected = ids.clone();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids, expected, "rows reordered by event id, descending");
    assert_ne!(ids, all.iter().map(|r| r.0).collect::<Vec<_>>());

    let both = rows(&rendered_dom(&page, "#sort=0&dir=desc&reason=missing_key"));
    let shown: Vec<u64> = both.iter().filter(|r| r.2).map(|r| r.0).collect();
    assert_eq!(shown.len(), 75);
    assert!(shown.windows(2).all(|w| w[0] > w[1]));
    assert!(both.iter().filter(|r| r.2).all(|r| r.1 == "missing_key"));
}
