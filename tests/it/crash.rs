//! A run killed at any moment leaves call data as before it, loses no event, and the next run
//! completes the work. Also: two runs of one job started together.

use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;
const N: i64 = 20_000;

/// N calls with sessions and N queued events for them, plus N/4 sessionless events.
async fn big_batch(pool: &PgPool) {
    sqlx::query(
        "insert into calls (id, session_id, started_at, ended_at, ani, agent_id)
         select 'c' || i, 's' || i, timestamptz '2026-11-02 00:00Z' + i * interval '7 seconds',
                timestamptz '2026-11-02 00:00Z' + i * interval '7 seconds' + interval '5 minutes',
                '555' || lpad(i::text, 7, '0'), 'a' || (i % 50)
         from generate_series(1, $1) i",
    )
    .bind(N)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into event_queue (payload)
         select jsonb_build_object('SessionId', 's' || i, 'EventTime', '2026-11-02T00:00:00Z',
                                   'Metadata', jsonb_build_object('n', i))
         from generate_series(1, $1) i
         union all
         select jsonb_build_object('EventTime', to_char(timestamptz '2026-11-02 00:01Z' + i * interval '7 seconds', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                                   'Metadata', jsonb_build_object('customerPhone', '555' || lpad(i::text, 7, '0'), 'agentId', 'a' || (i % 50), 'm', i))
         from generate_series(1, $1 / 4) i",
    )
    .bind(N)
    .execute(pool)
    .await
    .unwrap();
}

/// (calls carrying metadata, events left on the queue, events stored).
async fn state(pool: &PgPool) -> (i64, i64, i64) {
    (
        count(pool, "select count(*) from calls where async_metadata <> '{}'").await,
        count(pool, "select count(*) from event_queue").await,
        count(pool, "select count(*) from events").await,
    )
}

/// The log lines of a run of `big_batch`, in the order it writes them: a moment in each of its
/// stages, the last one after its commit.
const MOMENTS: [&str; 8] = [
    "run started",
    "queue drained",
    "stored events to match read",
    "decisions stored",
    "contributions read",
    "values written",
    "report built",
    "committed",
];

/// Runs the binary and kills it (SIGKILL) as soon as its log shows `line`; returns its log.
async fn killed_at(url: &str, job: &TestJob, line: &str) -> String {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_callrecon"))
        .args(["--database-url", url, "run", "--job", job.path().to_str().unwrap()])
        .env("RUST_LOG", "callrecon=debug")
        .env("CALLRECON_SCHEMA", LEGACY_SCHEMA)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    while let Some(l) = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await.unwrap().unwrap() {
        log.push_str(&l);
        log.push('\n');
        if l.contains(line) {
            child.start_kill().unwrap();
            break;
        }
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait()).await.unwrap().unwrap();
    assert!(log.lines().any(|l| l.contains(line)), "the run never logged {line:?}:\n{log}");
    log
}

crate::both_layouts! {
    async fn run_killed_at_any_moment_changes_all_or_nothing(pool: PgPool) {
        big_batch(&pool).await;
        let job = TestJob::new(RULES);
        let url = database_url(&pool).await;
        let queued = N + N / 4;
        let before = state(&pool).await;
        assert_eq!(before, (0, queued, 0));

        for moment in MOMENTS {
            let log = killed_at(&url, &job, moment).await;
            // The server notices the dead client and rolls its transaction back; wait for that.
            let deadline = Instant::now() + Duration::from_secs(30);
            while count(&pool, "select count(*) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid() and state <> 'idle'").await > 0
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let now = state(&pool).await;
            let all_new = (N, 0, queued);
            match moment {
                "committed" => assert_eq!(now, all_new, "killed after its commit, its work is kept:\n{log}"),
                // The kill lands a moment after the line; the commit follows this one closely.
                "report built" => assert!(now == before || now == all_new, "half a run is visible: {now:?}\n{log}"),
                _ => assert_eq!(now, before, "killed at {moment:?}, before its commit, yet it changed data:\n{log}"),
            }
        }

        job.run(&pool).await;
        assert_eq!(state(&pool).await, (N, 0, queued), "the next run completes the work");
        assert_eq!(count(&pool, "select count(*) from events where state = 'matched'").await, queued);
        assert_eq!(
            call_meta(&pool, "c1").await,
            serde_json::json!({"n": 1, "m": 1, "customerPhone": "5550000001", "agentId": "a1"})
        );
        // Killed runs are marked abandoned; the one killed after its commit is recorded as
        // succeeded, because its status commits with its work.
        let statuses: Vec<String> =
            sqlx::query_scalar("select status from runs where not dry_run order by id").fetch_all(&pool).await.unwrap();
        assert_eq!(statuses.len(), MOMENTS.len() + 1, "{statuses:?}");
        assert!(statuses[..MOMENTS.len() - 2].iter().all(|s| s == "abandoned"), "{statuses:?}");
        assert!(statuses[MOMENTS.len() - 1..].iter().all(|s| s == "succeeded"), "{statuses:?}");
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn two_runs_of_one_job_started_together_never_both_work(pool: PgPool) {
    big_batch(&pool).await;
    let job = TestJob::new(RULES);
    let url = database_url(&pool).await;
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_callrecon"))
            .args(["--database-url", &url, "run", "--job", job.path().to_str().unwrap()])
            .env("CALLRECON_SCHEMA", LEGACY_SCHEMA)
            .output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(spawn);
        let b = s.spawn(spawn);
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    let codes = [a.status.code(), b.status.code()];
    // Either one was refused at once (exit 3), or the second started after the first committed.
    assert!(codes.contains(&Some(0)), "{codes:?} {} {}", stderr(&a), stderr(&b));
    if codes.contains(&Some(3)) {
        let refused = if a.status.code() == Some(3) { &a } else { &b };
        assert!(stderr(refused).contains("job test is already running"), "{}", stderr(refused));
    } else {
        assert_eq!(codes, [Some(0), Some(0)]);
    }
    assert_eq!(state(&pool).await, (N, 0, N + N / 4), "every event stored once");
    // The runs never overlapped: one run did all the work (the queue would let two runs share
    // it, each taking the rows the other has not locked), and a second, if it ran at all,
    // started after that one committed and found nothing left.
    let ingested: Vec<i64> = sqlx::query_scalar(
        "select (summary ->> 'ingested')::bigint from runs where status = 'succeeded' and not dry_run order by id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected = if codes.contains(&Some(3)) { vec![N + N / 4] } else { vec![N + N / 4, 0] };
    assert_eq!(ingested, expected, "{} {}", stderr(&a), stderr(&b));
}
