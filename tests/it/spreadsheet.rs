//! The spreadsheet round trip in a real spreadsheet program: a report's `unmatched.csv` opened in
//! LibreOffice Calc (Debian's `libreoffice-calc-nogui`, headless), decisions typed into its cells,
//! saved back as CSV, and `resolve --file` applies what was typed.

use std::path::{Path, PathBuf};
use std::process::Command;

use callrecon::db::MIGRATOR;
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

/// Calc's CSV filter: comma-separated, `"` quoted, UTF-8 (76), from line 1.
const CSV_UTF8: &str = "Text - txt - csv (StarCalc):44,34,76,1";

/// Runs headless LibreOffice with its own profile, converting `file` into `outdir`.
fn soffice(profile: &Path, args: &[&str], file: &Path, outdir: &Path) {
    let out = Command::new("soffice")
        .arg(format!("-env:UserInstallation=file://{}", profile.display()))
        .arg("--headless")
        .args(args)
        .arg("--outdir")
        .arg(outdir)
        .arg(file)
        .output()
        .expect("soffice (Debian's libreoffice-calc-nogui) runs");
    assert!(out.status.success(), "soffice {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Types a decision and its note into the empty `resolve_to` and `note` cells of the sheet row
/// whose first cell is `event_id`: in the flat ODF document they are one repeated empty cell.
fn type_decision(fods: &str, event_id: i64, to: &str, note: &str) -> String {
    let id_cell = format!("<text:p>{event_id}</text:p>\n     </table:table-cell>");
    let at = fods.find(&id_cell).unwrap_or_else(|| panic!("no row for event {event_id} in the sheet")) + id_cell.len();
    let empty = "<table:table-cell table:number-columns-repeated=\"2\"/>";
    let rest = fods[at..].trim_start();
    assert!(rest.starts_with(empty), "resolve_to and note are empty in the sheet: {}", &rest[..200.min(rest.len())]);
    let cell = |text: &str| {
        format!("<table:table-cell office:value-type=\"string\"><text:p>{text}</text:p></table:table-cell>")
    };
    let typed = cell(to) + &cell(note);
    format!("{}{typed}{}", &fods[..at], &rest[empty.len()..])
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_report_csv_edited_in_libreoffice_calc_is_applied_by_resolve(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).phone("5551234567", "a1").insert(&pool).await;
    let job = TestJob::new(RULES);
    for (tag, name) in [("one", "Müller"), ("two", "Ñúñez")] {
        enqueue(
            &pool,
            json!({"EventTime": "2026-11-02T10:02:00Z", "Metadata": {"customerPhone": "5559999999", "agentId": "a1", "tag": tag, "customerName": name}}),
        )
        .await;
    }
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.unmatched, 2);
    let id = |tag: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("select id from events where metadata ->> 'tag' = $1")
                .bind(tag)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (one, two) = (id("one").await, id("two").await);

    let work = tempfile::tempdir().unwrap();
    let profile = work.path().join("profile");
    let sheet_dir = work.path().join("sheet");
    let infilter = format!("--infilter={CSV_UTF8}");
    soffice(&profile, &[&infilter, "--convert-to", "fods"], &done.dir.join("unmatched.csv"), &sheet_dir);
    let fods_path: PathBuf = sheet_dir.join("unmatched.fods");
    let sheet = std::fs::read_to_string(&fods_path).unwrap();
    assert!(
        sheet.contains("<text:p>Müller</text:p>") && sheet.contains("<text:p>Ñúñez</text:p>"),
        "Calc reads the names as written"
    );
    assert!(sheet.contains("<text:p>event_id</text:p>"), "the byte-order mark is not part of the first heading");

    let typed = type_decision(&type_decision(&sheet, one, "call:c1", "found by hand"), two, "dismiss", "test call");
    std::fs::write(&fods_path, typed).unwrap();
    let saved_dir = work.path().join("saved");
    soffice(&profile, &["--convert-to", &format!("csv:{CSV_UTF8}")], &fods_path, &saved_dir);
    let saved = saved_dir.join("unmatched.csv");

    let out = callrecon(
        &pool,
        &["resolve", "--job", &job.path().to_string_lossy(), "--file", &saved.to_string_lossy(), "--by", "erin"],
    )
    .await;
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let state = |id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (String, Option<String>)>("select state, target_id from events where id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(state(one).await, ("matched".into(), Some("c1".into())));
    assert_eq!(state(two).await.0, "dismissed");
    assert_eq!(call_meta(&pool, "c1").await["customerName"], "Müller", "the name reaches the call unchanged");
}
