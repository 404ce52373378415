//! `callrecon schedule` as a process: jobs firing every 2 seconds against the test's database,
//! stopped with signals. (The DST rules are unit tests of `schedule::next_fire`.)

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;
const EVERY_2S: &str = "*/2 * * * * *";

/// A job like [`TestJob::new`] with another name and schedule.
fn job(name: &str, schedule: &str, rules: &str) -> TestJob {
    let job = TestJob::new(rules);
    edit(&job.path(), &[("name = \"test\"", &format!("name = \"{name}\"")), ("0 0 2 * * *", schedule)]);
    job
}

/// Replaces text in a file (each `from` must be there).
fn edit(path: &Path, replacements: &[(&str, &str)]) {
    let mut text = std::fs::read_to_string(path).unwrap();
    for (from, to) in replacements {
        assert!(text.contains(from), "{from:?} not in {text}");
        text = text.replacen(from, to, 1);
    }
    std::fs::write(path, text).unwrap();
}

/// A running `callrecon schedule`, its log in a file; killed if the test ends before it does.
struct Scheduler {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Scheduler {
    fn start(url: &str, jobs: &[PathBuf]) -> Scheduler {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_callrecon"));
        cmd.args(["--database-url", url, "schedule"]);
        for j in jobs {
            cmd.arg("--job").arg(j);
        }
        let child = cmd
            .env("RUST_LOG", "callrecon=info,warn")
            .env("CALLRECON_SCHEMA", LEGACY_SCHEMA)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        Scheduler { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }

    fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {name}");
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The exit status, waiting at most `within`.
    async fn exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "still running after {within:?}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then exit status 0 within a few seconds.
    async fn stop(&mut self) {
        self.signal("TERM");
        let status = self.exit(Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(0), "log:\n{}", self.log());
    }

    /// Waits until the log contains `text`.
    async fn logged(&self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(text) {
            assert!(Instant::now() < deadline, "{text:?} not logged within {within:?}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until the query (returning one boolean) is true.
async fn eventually(pool: &PgPool, sql: &str, within: Duration, s: &Scheduler) {
    let deadline = Instant::now() + within;
    loop {
        let ok: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(pool).await.unwrap();
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {sql}\nlog:\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, sqlx::FromRow)]
struct Run {
    id: i64,
    job: String,
    status: String,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    error: Option<String>,
}

async fn runs(pool: &PgPool) -> Vec<Run> {
    sqlx::query_as("select id, job, status, started_at, finished_at, error from runs order by started_at")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// No two runs of one job were running at the same time.
fn assert_no_overlap(runs: &[Run]) {
    for a in runs {
        for b in runs.iter().filter(|b| b.id != a.id && b.job == a.job) {
            let a_end = a.finished_at.expect("finished");
            assert!(b.started_at >= a_end || b.finished_at.unwrap() <= a.started_at, "{a:?} overlaps {b:?}");
        }
    }
}

/// One run per fire time: runs of a job firing every 2 seconds start in distinct 2-second slots
/// (a run starts within its slot however slow the machine, bar a 2-second stall).
fn assert_one_run_per_fire_time(runs: &[Run]) {
    let mut slots: Vec<(&str, i64)> = runs.iter().map(|r| (r.job.as_str(), r.started_at.timestamp() / 2)).collect();
    slots.sort();
    let n = slots.len();
    slots.dedup();
    assert_eq!(slots.len(), n, "two runs for one fire time: {runs:?}");
}

/// Sleeps to the middle of a 2-second interval; returns the fire time that ends it.
async fn to_mid_interval() -> DateTime<Utc> {
    let now = Utc::now().timestamp_millis();
    let mut mid = now / 2000 * 2000 + 1000;
    if mid <= now {
        mid += 2000;
    }
    tokio::time::sleep(Duration::from_millis((mid - now) as u64)).await;
    DateTime::from_timestamp_millis(mid + 1000).unwrap()
}

/// Holds `event_queue` locked, so that a run blocks in its ingest (as a slow run would) until
/// the returned transaction ends.
async fn block_ingest(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("lock table event_queue in exclusive mode").execute(&mut *tx).await.unwrap();
    tx
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn jobs_run_at_their_fire_times_and_are_recorded(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"crmCaseId": "C-1"}}))
        .await;
    let job = job("test", EVERY_2S, RULES);
    let mut s = Scheduler::start(&database_url(&pool).await, &[job.path()]);

    eventually(&pool, "select count(*) >= 3 from runs where status = 'succeeded'", secs(20), &s).await;
    assert_eq!(call_meta(&pool, "c1").await, json!({"crmCaseId": "C-1"}));
    s.stop().await;

    let runs = runs(&pool).await;
    assert!(runs.iter().all(|r| r.status == "succeeded" && r.job == "test" && r.error.is_none()), "{runs:?}");
    assert_one_run_per_fire_time(&runs);
    let log = s.log();
    assert!(log.contains("next run") && log.contains("job=test"), "{log}");
    assert!(log.contains("scheduler stopped"), "{log}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn two_jobs_interleave(pool: PgPool) {
    let a = job("a", EVERY_2S, RULES);
    let b = job("b", EVERY_2S, RULES);
    let mut s = Scheduler::start(&database_url(&pool).await, &[a.path(), b.path()]);
    eventually(
        &pool,
        "select count(*) filter (where job = 'a') >= 3 and count(*) filter (where job = 'b') >= 3
         from runs where status = 'succeeded'",
        secs(20),
        &s,
    )
    .await;
    s.stop().await;

    let runs = runs(&pool).await;
    assert!(runs.iter().all(|r| r.status == "succeeded"), "{runs:?}");
    // Each job's runs go on while the other's do: a run of b lies between two runs of a.
    let a_times: Vec<_> = runs.iter().filter(|r| r.job == "a").map(|r| r.started_at).collect();
    let (first_a, last_a) = (a_times[0], *a_times.last().unwrap());
    assert!(runs.iter().any(|r| r.job == "b" && r.started_at > first_a && r.started_at < last_a), "{runs:?}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_run_longer_than_the_interval_does_not_overlap_itself(pool: PgPool) {
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {}})).await;
    let job = job("test", EVERY_2S, RULES);
    let blocker = block_ingest(&pool).await;
    let mut s = Scheduler::start(&database_url(&pool).await, &[job.path()]);
    eventually(&pool, "select exists (select 1 from runs where status = 'running')", secs(20), &s).await;

    // Two or more fire times pass while the run is stuck: none starts another run.
    tokio::time::sleep(secs(5)).await;
    assert_eq!(count(&pool, "select count(*) from runs").await, 1, "log:\n{}", s.log());
    let next_fire = to_mid_interval().await;
    blocker.commit().await.unwrap();

    eventually(&pool, "select count(*) >= 3 from runs where status = 'succeeded'", secs(20), &s).await;
    s.stop().await;
    let runs = runs(&pool).await;
    assert_no_overlap(&runs);
    let long = &runs[0];
    assert!(long.finished_at.unwrap() - long.started_at >= chrono::Duration::seconds(4), "{runs:?}");
    // Skipped, not queued: the next run waits for the next fire time.
    assert!(runs[1].started_at >= next_fire, "{runs:?}");
    assert_one_run_per_fire_time(&runs);
    assert!(s.log().contains("fire times passed during this attempt: skipped, not queued"), "{}", s.log());
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_fire_time_finding_the_job_locked_elsewhere_is_skipped(pool: PgPool) {
    let job = job("test", EVERY_2S, RULES);
    // A manual `run` holds the job's lock.
    let mut holder = pool.acquire().await.unwrap();
    sqlx::query("select pg_advisory_lock(hashtextextended($1, 0))")
        .bind(callrecon::db::job_lock_key("test"))
        .execute(&mut *holder)
        .await
        .unwrap();
    let mut s = Scheduler::start(&database_url(&pool).await, &[job.path()]);
    s.logged("fire time skipped: the job is already running", secs(20)).await;
    assert_eq!(count(&pool, "select count(*) from runs").await, 0);

    let next_fire = to_mid_interval().await;
    sqlx::query("select pg_advisory_unlock(hashtextextended($1, 0))")
        .bind(callrecon::db::job_lock_key("test"))
        .execute(&mut *holder)
        .await
        .unwrap();
    eventually(&pool, "select count(*) >= 2 from runs where status = 'succeeded'", secs(20), &s).await;
    s.stop().await;
    let runs = runs(&pool).await;
    assert!(runs[0].started_at >= next_fire, "the skipped fire times were queued: {runs:?}");
    assert_one_run_per_fire_time(&runs);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_second_scheduler_never_runs_the_job_at_the_same_time(pool: PgPool) {
    // Enough pending events that a run takes a while.
    sqlx::query(
        "insert into event_queue (payload)
         select jsonb_build_object('SessionId', 's' || i, 'EventTime', '2026-11-02T00:00:00Z', 'Metadata', '{}'::jsonb)
         from generate_series(1, 2000) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let job = job("test", EVERY_2S, RULES);
    let url = database_url(&pool).await;
    let mut one = Scheduler::start(&url, &[job.path()]);
    let mut two = Scheduler::start(&url, &[job.path()]);
    eventually(&pool, "select count(*) >= 4 from runs where status = 'succeeded'", secs(25), &one).await;
    one.stop().await;
    two.stop().await;

    let runs = runs(&pool).await;
    assert!(runs.iter().all(|r| r.status == "succeeded"), "{runs:?}");
    assert_no_overlap(&runs);
    let logs = one.log() + &two.log();
    assert!(
        logs.contains("already running") || logs.contains("already served by another process"),
        "neither scheduler met the other:\n{logs}"
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_missed_fire_time_is_caught_up_on_start(pool: PgPool) {
    // Nightly jobs: `stale` last succeeded two days ago, `fresh` just now, `new` never ran.
    let stale = job("stale", "0 0 3 * * *", RULES);
    let fresh = job("fresh", "0 0 3 * * *", RULES);
    let new = job("new", "0 0 3 * * *", RULES);
    sqlx::query(
        "insert into runs (job, kind, dry_run, started_at, finished_at, status) values
         ('stale', 'run', false, now() - interval '2 days', now() - interval '2 days', 'succeeded'),
         ('fresh', 'run', false, now(), now(), 'succeeded')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut s = Scheduler::start(&database_url(&pool).await, &[stale.path(), fresh.path(), new.path()]);
    eventually(&pool, "select count(*) = 2 from runs where job = 'stale' and status = 'succeeded'", secs(20), &s).await;
    // The other two announce their next (nightly) run instead.
    s.logged("job=fresh next_run=", secs(10)).await;
    s.logged("job=new next_run=", secs(10)).await;
    s.stop().await;
    assert!(s.log().contains("catching up"), "{}", s.log());
    assert_eq!(count(&pool, "select count(*) from runs where job = 'fresh'").await, 1);
    assert_eq!(count(&pool, "select count(*) from runs where job = 'new'").await, 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn sigterm_during_a_run_lets_it_finish(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"a": 1}})).await;
    let job = job("test", EVERY_2S, RULES);
    let blocker = block_ingest(&pool).await;
    let mut s = Scheduler::start(&database_url(&pool).await, &[job.path()]);
    eventually(&pool, "select exists (select 1 from runs where status = 'running')", secs(20), &s).await;

    s.signal("TERM");
    tokio::time::sleep(secs(3)).await;
    assert!(s.running(), "exited during the run; log:\n{}", s.log());
    blocker.commit().await.unwrap();
    let status = s.exit(secs(15)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", s.log());

    let runs = runs(&pool).await;
    assert_eq!(runs.len(), 1, "no run after SIGTERM: {runs:?}");
    assert_eq!(runs[0].status, "succeeded");
    assert_eq!(call_meta(&pool, "c1").await, json!({"a": 1}));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_second_signal_rolls_the_running_run_back(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", None).session("s1").insert(&pool).await;
    enqueue(&pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"a": 1}})).await;
    let job = job("test", EVERY_2S, RULES);
    let blocker = block_ingest(&pool).await;
    let mut s = Scheduler::start(&database_url(&pool).await, &[job.path()]);
    eventually(&pool, "select exists (select 1 from runs where status = 'running')", secs(20), &s).await;

    s.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.signal("INT");
    // Exits without waiting for the stuck run.
    let status = s.exit(secs(10)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", s.log());
    blocker.commit().await.unwrap();

    // The server rolls the orphaned transaction back once it notices; wait for that.
    let deadline = Instant::now() + secs(30);
    let busy = "select count(*) from pg_stat_activity
                where datname = current_database() and pid <> pg_backend_pid() and state <> 'idle'";
    while count(&pool, busy).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(&pool, "select count(*) from event_queue").await, 1, "the event is not lost");
    assert_eq!(count(&pool, "select count(*) from events").await, 0);
    assert_eq!(call_meta(&pool, "c1").await, json!({}));
    assert_eq!(count(&pool, "select count(*) from runs where status = 'succeeded'").await, 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_broken_edit_of_the_job_file_keeps_the_previous_rules(pool: PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z"))
        .phone("5550000001", "agent-1")
        .insert(&pool)
        .await;
    Call::new("c2", "2026-11-02T11:00:00Z", Some("2026-11-02T11:05:00Z"))
        .phone("5550000002", "agent-1")
        .insert(&pool)
        .await;
    let job = job("test", EVERY_2S, RULES);
    let mut s = Scheduler::start(&database_url(&pool).await, &[job.path()]);
    eventually(&pool, "select count(*) >= 1 from runs where status = 'succeeded'", secs(20), &s).await;

    // An edit with an error: the phone rule stays as it was.
    edit(&job.path(), &[("normalize = \"phone\"", "normalize = \"e164\"")]);
    s.logged("job file refused", secs(10)).await;
    enqueue(
        &pool,
        json!({"EventTime": "2026-11-02T10:02:00Z",
               "Metadata": {"customerPhone": "+1 (555) 000-0001", "agentId": "agent-1", "n": 1}}),
    )
    .await;
    eventually(&pool, "select count(*) = 1 from events where state = 'matched'", secs(20), &s).await;
    assert_eq!(call_meta(&pool, "c1").await["n"], 1);
    assert!(s.log().contains("unknown normaliser \"e164\""), "{}", s.log());
    // The runs made meanwhile say so in `report list`.
    eventually(&pool, "select exists (select 1 from runs where error like '%file on disk is refused%')", secs(10), &s)
        .await;
    let out = callrecon(&pool, &["report", "list"]).await;
    assert!(stdout(&out).contains("the file on disk is refused"), "{}", stdout(&out));

    // A good edit takes effect without a restart: without the phone rule, nothing matches it.
    let text = std::fs::read_to_string(job.path()).unwrap();
    let start = text.find("[[rules]]").unwrap();
    let crm = text.rfind("[[rules]]").unwrap();
    std::fs::write(job.path(), format!("{}{}", &text[..start], &text[crm..])).unwrap();
    s.logged("job file changed: using the new version", secs(10)).await;
    enqueue(
        &pool,
        json!({"EventTime": "2026-11-02T11:02:00Z",
               "Metadata": {"customerPhone": "5550000002", "agentId": "agent-1", "n": 2}}),
    )
    .await;
    eventually(&pool, "select count(*) = 1 from events where reason = 'missing_key'", secs(20), &s).await;
    s.stop().await;
    assert_eq!(call_meta(&pool, "c2").await, json!({}));
    assert_eq!(count(&pool, "select count(*) from runs where status <> 'succeeded'").await, 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_database_going_away_and_coming_back_is_survived(pool: PgPool) {
    let job = job("test", EVERY_2S, RULES);
    let url = database_url(&pool).await;
    let db: String = sqlx::query_scalar("select current_database()").fetch_one(&pool).await.unwrap();
    // Turns connections to the test's database away (and ends the open ones), or lets them in.
    let server = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by scripts/test.sh");
    let mut admin = PgConnection::connect(&server).await.unwrap();
    let mut outage = async |on: bool| {
        let sql = format!("alter database \"{db}\" allow_connections {}", !on);
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.unwrap();
        if on {
            sqlx::query("select pg_terminate_backend(pid) from pg_stat_activity where datname = $1")
                .bind(&db)
                .execute(&mut admin)
                .await
                .unwrap();
        }
    };

    // Started while the database is away: it waits for it.
    outage(true).await;
    let mut s = Scheduler::start(&url, &[job.path()]);
    s.logged("cannot connect to or migrate the database", secs(10)).await;
    tokio::time::sleep(secs(2)).await;
    assert!(s.running(), "log:\n{}", s.log());
    outage(false).await;
    eventually(&pool, "select count(*) >= 1 from runs where status = 'succeeded'", secs(30), &s).await;

    // Goes away while it runs: runs fail to start, and resume once it is back.
    outage(true).await;
    s.logged("run failed: the database cannot be reached", secs(10)).await;
    assert!(s.running(), "log:\n{}", s.log());
    outage(false).await;
    let before = count(&pool, "select count(*) from runs where status = 'succeeded'").await;
    let sql = format!("select count(*) >= {} from runs where status = 'succeeded'", before + 2);
    eventually(&pool, &sql, secs(30), &s).await;
    s.stop().await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn schedule_refuses_bad_job_files_before_starting(pool: PgPool) {
    let unscheduled = TestJob::new(RULES);
    edit(&unscheduled.path(), &[("schedule = \"0 0 2 * * *\"\n", "")]);
    let out = callrecon(&pool, &["schedule", "--job", unscheduled.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("has no `schedule`"), "{}", stderr(&out));

    let bad = job("test", "every night", RULES);
    let out = callrecon(&pool, &["schedule", "--job", bad.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("job.toml:2:12: bad schedule"), "{}", stderr(&out));

    let (a, b) = (job("same", EVERY_2S, RULES), job("same", EVERY_2S, RULES));
    let out =
        callrecon(&pool, &["schedule", "--job", a.path().to_str().unwrap(), "--job", b.path().to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("are both job \"same\""), "{}", stderr(&out));
    assert_eq!(count(&pool, "select count(*) from runs").await, 0);
}
