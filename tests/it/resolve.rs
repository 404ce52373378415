//! Analysts' manual decisions through the binary: resolve, reopen, the CSV round trip, history,
//! undo; and that runs and rematches keep what a person decided.

use callrecon::db::MIGRATOR;
use callrecon::run::{self, Mode};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::*;

/// The id of the event whose metadata has `key` = `value`.
async fn event_id(pool: &PgPool, key: &str, value: &str) -> i64 {
    sqlx::query_scalar("select id from events where metadata ->> $1 = $2")
        .bind(key)
        .bind(value)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn state(pool: &PgPool, id: i64) -> (String, Option<String>, Option<String>, Option<String>) {
    sqlx::query_as("select state, target_id, rule, decided_by from events where id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// c1 and c2: two calls of one caller to agent a1, 30 minutes apart. The event `lost` matches
/// neither (its agent is a9): no_candidate.
async fn two_calls_and_a_lost_event(pool: &PgPool) -> (TestJob, i64) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).phone("5551234567", "a1").insert(pool).await;
    Call::new("c2", "2026-11-02T10:30:00Z", Some("2026-11-02T10:35:00Z")).phone("5551234567", "a1").insert(pool).await;
    let job = TestJob::new(RULES);
    enqueue(
        pool,
        json!({"EventTime": "2026-11-02T10:02:00Z", "Metadata": {"customerPhone": "5551234567", "agentId": "a9", "tag": "lost", "accountTier": "gold"}}),
    )
    .await;
    let done = job.run(pool).await;
    assert_eq!(done.report.summary.by_reason.get("no_candidate"), Some(&1));
    let id = event_id(pool, "tag", "lost").await;
    (job, id)
}

fn job_arg(job: &TestJob) -> String {
    job.path().to_string_lossy().into_owned()
}

crate::both_layouts! {
    async fn an_event_attached_by_hand_reaches_its_call_and_every_later_run_and_rematch_keeps_it(pool: PgPool) {
        let (job, id) = two_calls_and_a_lost_event(&pool).await;
        // Until something replaces it, the run's first decision is read from the event's own row.
        let first = stdout(&callrecon(&pool, &["history", &id.to_string()]).await);
        let lines: Vec<&str> = first.lines().collect();
        assert_eq!(lines.len(), 2, "{first}");
        assert!(lines[1].contains("new -> pending (no_candidate)") && lines[1].contains("run 1"), "{first}");
        assert_eq!(
            count(&pool, "select count(*) from event_history").await,
            0,
            "a new event's first decision writes no row"
        );
        let out = callrecon(
            &pool,
            &[
                "resolve",
                "--job",
                &job_arg(&job),
                &id.to_string(),
                "--to",
                "call:c1",
                "--by",
                "alice",
                "--note",
                "CRM typo",
            ],
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stdout(&out).contains(&format!("event {id}: pending (no_candidate) -> matched call c1 by alice (CRM typo)")),
            "{}",
            stdout(&out)
        );
        assert_eq!(call_meta(&pool, "c1").await["tag"], "lost");
        assert_eq!(
            state(&pool, id).await,
            ("matched".into(), Some("c1".into()), Some("manual".into()), Some("alice".into()))
        );

        // A run, and a rematch under rules that would match it elsewhere, keep it.
        let done = job.run(&pool).await;
        assert_eq!(done.report.summary.unmatched, 0);
        let wide = callrecon::job::load(&job.path()).unwrap();
        let done = run::execute(&pool, &wide, Mode::Rematch { since: None, until: None }, false).await.unwrap();
        assert_eq!(done.report.diff.as_ref().unwrap().kept_manual, 1);
        assert_eq!(state(&pool, id).await.1.as_deref(), Some("c1"));
        assert_eq!(call_meta(&pool, "c1").await["tag"], "lost");

        let explain = callrecon(&pool, &["explain", "--job", &job_arg(&job), &id.to_string()]).await;
        assert!(stdout(&explain).contains("matched c1 by hand, by alice: CRM typo"), "{}", stdout(&explain));

        let history = callrecon(&pool, &["history", &id.to_string()]).await;
        let text = stdout(&history);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].contains("new -> pending (no_candidate)") && lines[1].contains("run 1"), "{text}");
        assert!(lines[2].contains("alice") && lines[2].contains("-> matched call c1 by alice (CRM typo)"), "{text}");
        assert_eq!(lines.len(), 3, "runs that changed nothing add nothing: {text}");
        let json: serde_json::Value =
            serde_json::from_slice(&callrecon(&pool, &["history", &id.to_string(), "--format", "json"]).await.stdout)
                .unwrap();
        assert_eq!(json["history"][1]["by"]["person"], "alice");
        assert_eq!(json["history"][1]["from"]["reason"], "no_candidate");
        assert_eq!(json["history"][1]["to"]["target"], json!({"kind": "call", "id": "c1"}));
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_event_attached_to_a_group_gives_every_call_its_group_fields_until_reopened(pool: PgPool) {
    add_group(&pool, "g1", json!({})).await;
    Call::new("m1", "2026-11-03T10:00:00Z", None).group("g1").insert(&pool).await;
    Call::new("m2", "2026-11-03T11:00:00Z", None).group("g1").insert(&pool).await;
    let (job, id) = two_calls_and_a_lost_event(&pool).await;
    let out =
        callrecon(&pool, &["resolve", "--job", &job_arg(&job), &id.to_string(), "--to", "group:g1", "--by", "bob"])
            .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(group_meta(&pool, "g1").await["tag"], "lost");
    for call in ["m1", "m2"] {
        assert_eq!(call_meta(&pool, call).await["accountTier"], "gold", "{call}");
    }

    let out =
        callrecon(&pool, &["reopen", "--job", &job_arg(&job), &id.to_string(), "--by", "bob", "--note", "wrong group"])
            .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(group_meta(&pool, "g1").await, json!({}));
    assert_eq!(call_meta(&pool, "m1").await, json!({}));
    assert_eq!(state(&pool, id).await, ("pending".into(), None, None, None));
    // The next run decides it by the rules again.
    let done = job.run(&pool).await;
    assert_eq!(done.report.summary.by_reason.get("no_candidate"), Some(&1));
    // Reopening what the rules decided is refused.
    let out = callrecon(&pool, &["reopen", "--job", &job_arg(&job), &id.to_string(), "--by", "bob"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not decided by hand"), "{}", stderr(&out));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_dismissed_event_needs_a_reason_leaves_the_unmatched_list_and_never_expires(pool: PgPool) {
    let (job, id) = two_calls_and_a_lost_event(&pool).await;
    let args = ["resolve", "--job", &job_arg(&job), &id.to_string(), "--to", "dismiss", "--by", "carol"];
    let out = callrecon(&pool, &args).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("dismissing needs a note"), "{}", stderr(&out));
    assert_eq!(state(&pool, id).await.0, "pending", "refused: nothing changed");

    let out = callrecon(&pool, &[&args[..], &["--note", "test call"]].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // Long past its pending_for: a pending event would expire now.
    sqlx::query("update events set received_at = now() - interval '30 days' where id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    let done = job.run(&pool).await;
    assert_eq!((done.report.summary.unmatched, done.report.summary.expired, done.report.summary.dismissed), (0, 0, 1));
    assert_eq!(done.report.summary.manual, 1);
    assert_eq!(done.report.manual[0].by, "carol");
    assert_eq!(state(&pool, id).await.0, "dismissed");
    let html = std::fs::read_to_string(done.dir.join("report.html")).unwrap();
    assert!(html.contains("Decided by hand since the previous run") && html.contains("test call"));
    let list = stdout(&callrecon(&pool, &["report", "list"]).await);
    assert!(list.lines().next().unwrap().contains("dismissed"), "{list}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_manual_attach_overrides_an_automatic_match(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).phone("5551234567", "a1").insert(&pool).await;
    Call::new("c2", "2026-11-02T12:00:00Z", Some("2026-11-02T12:05:00Z")).phone("5550000000", "a2").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:02:00Z", "Metadata": {"customerPhone": "5551234567", "agentId": "a1", "tag": "x"}})).await;
    job.run(&pool).await;
    let id = event_id(&pool, "tag", "x").await;
    assert_eq!(call_meta(&pool, "c1").await["tag"], "x");
    let out =
        callrecon(&pool, &["resolve", "--job", &job_arg(&job), &id.to_string(), "--to", "call:c2", "--by", "dan"])
            .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("matched call c1 by rule phone-and-agent -> matched call c2 by dan"),
        "{}",
        stdout(&out)
    );
    assert_eq!(call_meta(&pool, "c1").await, json!({}));
    assert_eq!(call_meta(&pool, "c2").await["tag"], "x");
    // --dry-run shows and changes nothing.
    let out = callrecon(
        &pool,
        &["resolve", "--job", &job_arg(&job), &id.to_string(), "--to", "call:c1", "--by", "dan", "--dry-run"],
    )
    .await;
    assert!(stdout(&out).contains("would be made (dry run"), "{}", stdout(&out));
    assert_eq!(call_meta(&pool, "c2").await["tag"], "x");
}

/// Events of a morning: three unmatched, one of them with a formula-like note.
async fn a_morning(pool: &PgPool) -> (TestJob, [i64; 3], std::path::PathBuf) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).phone("5551234567", "a1").insert(pool).await;
    add_group(pool, "g1", json!({})).await;
    let job = TestJob::new(RULES);
    for tag in ["one", "two", "three"] {
        enqueue(pool, json!({"EventTime": "2026-11-02T10:02:00Z", "Metadata": {"customerPhone": "5559999999", "agentId": "a1", "tag": tag}})).await;
    }
    let done = job.run(pool).await;
    assert_eq!(done.report.summary.unmatched, 3);
    let ids =
        [event_id(pool, "tag", "one").await, event_id(pool, "tag", "two").await, event_id(pool, "tag", "three").await];
    (job, ids, done.dir.join("unmatched.csv"))
}

/// The report's CSV as a spreadsheet saves it: `;` between cells, a byte-order mark, CRLF line
/// ends, the columns reordered with one added, the rows given by `fill` (others deleted).
fn as_spreadsheet_saves_it(csv_path: &std::path::Path, fill: &[(i64, &str, &str)]) -> std::path::PathBuf {
    let mut reader = csv::Reader::from_path(csv_path).unwrap();
    let headers = reader.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.unwrap();
        let id: i64 = record[col("event_id")].parse().unwrap();
        if let Some((_, to, note)) = fill.iter().find(|(i, _, _)| *i == id) {
            rows.push(vec![
                "added by me".to_owned(),
                note.to_string(),
                record[col("reason")].to_owned(),
                to.to_string(),
                id.to_string(),
                record[col("source")].to_owned(),
            ]);
        }
    }
    let mut w =
        csv::WriterBuilder::new().delimiter(b';').terminator(csv::Terminator::CRLF).from_writer(vec![0xef, 0xbb, 0xbf]);
    w.write_record(["my column", "note", "reason", "resolve_to", "event_id", "source"]).unwrap();
    for row in rows {
        w.write_record(row).unwrap();
    }
    let path = csv_path.with_file_name("edited.csv");
    std::fs::write(&path, w.into_inner().unwrap()).unwrap();
    path
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_unmatched_csv_comes_back_from_a_spreadsheet_and_decides_its_filled_rows(pool: PgPool) {
    let (job, [one, two, three], csv_path) = a_morning(&pool).await;
    let header = std::fs::read_to_string(&csv_path).unwrap();
    assert!(header.starts_with("\u{feff}event_id,resolve_to,note,"), "a byte-order mark, then the header: {header}");
    let edited = as_spreadsheet_saves_it(
        &csv_path,
        &[(one, "call:c1", "'=found it"), (two, "dismiss", "test call"), (three, "", "")],
    );

    let dry = callrecon(
        &pool,
        &["resolve", "--job", &job_arg(&job), "--file", &edited.to_string_lossy(), "--by", "erin", "--dry-run"],
    )
    .await;
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(stdout(&dry).contains("2 decisions would be made"), "{}", stdout(&dry));
    assert_eq!(state(&pool, one).await.0, "pending");

    let out =
        callrecon(&pool, &["resolve", "--job", &job_arg(&job), "--file", &edited.to_string_lossy(), "--by", "erin"])
            .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        state(&pool, one).await,
        ("matched".into(), Some("c1".into()), Some("manual".into()), Some("erin".into()))
    );
    assert_eq!(state(&pool, two).await.0, "dismissed");
    assert_eq!(state(&pool, three).await.0, "pending", "an empty resolve_to is skipped");
    let note: String =
        sqlx::query_scalar("select note from events where id = $1").bind(one).fetch_one(&pool).await.unwrap();
    assert_eq!(note, "=found it", "the formula guard is taken off");
    assert_eq!(call_meta(&pool, "c1").await["tag"], "one");

    // The same file again: those events were decided since the report was written.
    let again =
        callrecon(&pool, &["resolve", "--job", &job_arg(&job), "--file", &edited.to_string_lossy(), "--by", "erin"])
            .await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("line 2: event") && stderr(&again).contains("decided since the report"),
        "{}",
        stderr(&again)
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_file_with_a_bad_row_is_refused_whole_listing_every_bad_row(pool: PgPool) {
    let (job, [one, two, three], csv_path) = a_morning(&pool).await;
    let edited =
        as_spreadsheet_saves_it(&csv_path, &[(one, "call:c1", ""), (two, "call:nope", ""), (three, "group:g404", "")]);
    let mut text = std::fs::read_to_string(&edited).unwrap();
    text.push_str("x;;pending;call:c1;999999;queue:9\r\n");
    text.push_str("x;;pending;teleport;1;queue:9\r\n");
    std::fs::write(&edited, text).unwrap();
    let out =
        callrecon(&pool, &["resolve", "--job", &job_arg(&job), "--file", &edited.to_string_lossy(), "--by", "erin"])
            .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("line 6: resolve_to \"teleport\" is not call:ID, group:ID or dismiss"),
        "{err}\n{}",
        std::fs::read_to_string(&edited).unwrap()
    );
    std::fs::write(&edited, std::fs::read_to_string(&edited).unwrap().replace("x;;pending;teleport;1;queue:9\r\n", ""))
        .unwrap();
    let out =
        callrecon(&pool, &["resolve", "--job", &job_arg(&job), "--file", &edited.to_string_lossy(), "--by", "erin"])
            .await;
    let err = stderr(&out);
    assert!(err.contains(&format!("line 3: event {two}: there is no call nope")), "{err}");
    assert!(err.contains(&format!("line 4: event {three}: there is no call group g404")), "{err}");
    assert!(err.contains("line 5: event 999999: no such event"), "{err}");
    assert_eq!(state(&pool, one).await.0, "pending", "nothing changed");
    assert_eq!(call_meta(&pool, "c1").await, json!({}));
    assert_eq!(count(&pool, "select count(*) from event_history where person is not null").await, 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn undo_reverts_a_run_skips_what_changed_since_and_an_undo_of_it_restores_the_run(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).phone("5551234567", "a1").insert(&pool).await;
    Call::new("c2", "2026-11-02T12:00:00Z", Some("2026-11-02T12:05:00Z")).phone("5550000000", "a2").insert(&pool).await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:02:00Z", "Metadata": {"customerPhone": "5551234567", "agentId": "a1", "tag": "a"}})).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T12:02:00Z", "Metadata": {"customerPhone": "5550000000", "agentId": "a2", "tag": "b"}})).await;
    let first = job.run(&pool).await;
    let (a, b) = (event_id(&pool, "tag", "a").await, event_id(&pool, "tag", "b").await);
    // b is decided by hand since.
    let out =
        callrecon(&pool, &["resolve", "--job", &job_arg(&job), &b.to_string(), "--to", "call:c1", "--by", "fay"]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    let out = callrecon(&pool, &["undo", &first.report.run_id.to_string()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("1 decisions of run {} reverted; 1 skipped", first.report.run_id)), "{text}");
    assert!(text.contains(&format!("event {b} skipped: changed since by fay")), "{text}");
    assert_eq!(state(&pool, a).await, ("pending".into(), None, None, None));
    assert_eq!(call_meta(&pool, "c1").await, json!({"customerPhone": "5550000000", "agentId": "a2", "tag": "b"}));
    let undo_run: i64 =
        sqlx::query_scalar("select max(id) from runs where kind = 'undo'").fetch_one(&pool).await.unwrap();
    let report: serde_json::Value = serde_json::from_slice(
        &std::fs::read(job.dir.path().join("reports").join(undo_run.to_string()).join("report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["kind"], "undo");
    assert_eq!(report["undo"]["skipped"][0]["changed_by"], "fay");

    // Undoing the undo gives a back its match.
    let out = callrecon(&pool, &["undo", &undo_run.to_string()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(state(&pool, a).await.1.as_deref(), Some("c1"));
    assert_eq!(call_meta(&pool, "c1").await["tag"], "b", "later EventTime wins");
    assert_eq!(call_meta(&pool, "c1").await["agentId"], "a2");
    let history = stdout(&callrecon(&pool, &["history", &a.to_string()]).await);
    assert_eq!(history.lines().filter(|l| l.contains(" -> ")).count(), 3, "{history}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn undo_of_a_rematch_puts_the_event_back_where_it_was(pool: PgPool) {
    Call::new("c-a1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z"))
        .phone("5551234567", "a1")
        .insert(&pool)
        .await;
    Call::new("c-a2", "2026-11-02T10:20:00Z", Some("2026-11-02T10:25:00Z"))
        .phone("5551234567", "a2")
        .insert(&pool)
        .await;
    let job = TestJob::new(RULES);
    enqueue(&pool, json!({"EventTime": "2026-11-02T10:14:00Z", "Metadata": {"customerPhone": "5551234567", "agentId": "a1", "note": "x"}})).await;
    job.run(&pool).await;
    let text = std::fs::read_to_string(job.path())
        .unwrap()
        .replace(",\n         { event = \"agentId\", call = \"agent_id\" } ]", " ]")
        .replace("before = \"10m\"", "before = \"90m\"");
    std::fs::write(job.path(), text).unwrap();
    let out = callrecon(&pool, &["rematch", "--job", &job_arg(&job)]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(call_meta(&pool, "c-a2").await["note"], "x");
    let rematch: i64 =
        sqlx::query_scalar("select max(id) from runs where kind = 'rematch'").fetch_one(&pool).await.unwrap();
    let out = callrecon(&pool, &["undo", &rematch.to_string(), "--dry-run"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(call_meta(&pool, "c-a2").await["note"], "x", "dry: nothing changed");
    let out = callrecon(&pool, &["undo", &rematch.to_string()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(call_meta(&pool, "c-a1").await["note"], "x");
    assert_eq!(call_meta(&pool, "c-a2").await, json!({}));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn resolve_waits_for_no_one_a_run_or_another_resolve_holding_the_job_gives_a_clear_error(pool: PgPool) {
    let (job, id) = two_calls_and_a_lost_event(&pool).await;
    // Another analyst's resolve holds the job while it waits for the event's row.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("select 1 from events where id = $1 for update").bind(id).execute(&mut *holder).await.unwrap();
    let first = {
        let (pool, path) = (pool.clone(), job_arg(&job));
        tokio::spawn(async move {
            callrecon(&pool, &["resolve", "--job", &path, &id.to_string(), "--to", "call:c1", "--by", "gus"]).await
        })
    };
    wait_for_lock_wait(&pool, Some("transactionid"), "the first resolve to wait for the event's row").await;
    let second =
        callrecon(&pool, &["resolve", "--job", &job_arg(&job), &id.to_string(), "--to", "call:c2", "--by", "hal"])
            .await;
    assert_eq!(second.status.code(), Some(3), "{}", stderr(&second));
    assert!(stderr(&second).contains("job test is already running"), "{}", stderr(&second));
    holder.rollback().await.unwrap();
    let first = first.await.unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(state(&pool, id).await.1.as_deref(), Some("c1"));
}

/// Under cron, systemd or in a container $USER is often unset: the decision is recorded as the
/// process's user, as the system's user database names its uid.
#[sqlx::test(migrator = "MIGRATOR")]
async fn without_user_a_decision_is_recorded_as_the_processs_user(pool: PgPool) {
    let (job, id) = two_calls_and_a_lost_event(&pool).await;
    let url = database_url(&pool).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_callrecon"))
        .args(["--database-url", &url, "resolve", "--job", &job_arg(&job), &id.to_string()])
        .args(["--to", "dismiss", "--note", "from a systemd unit"])
        .env("CALLRECON_SCHEMA", LEGACY_SCHEMA)
        .env_remove("USER")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let me = whoami::username().unwrap();
    assert!(!me.is_empty());
    assert_eq!(state(&pool, id).await.3.as_deref(), Some(me.as_str()));
    assert!(stdout(&out).contains(&format!("dismissed by {me}")), "{}", stdout(&out));
}
