//! Shared test helpers: a job in a temporary folder, call data, runs, and the binary.

use std::path::{Path, PathBuf};
use std::process::Output;

use callrecon::job::{self, Job};
use callrecon::run::{self, Finished, Mode};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

/// The rules of the contract's example job.
pub const RULES: &str = r#"
[[rules]]
name = "phone-and-agent"
target = "call"
keys = [ { event = "customerPhone", call = "ani", normalize = "phone" },
         { event = "agentId", call = "agent_id" } ]
window = { before = "10m", after = "10m" }
ambiguous = "nearest"

[[rules]]
name = "crm-case"
target = "call_group"
keys = [ { event = "crmCaseId", call_group = "metadata.caseNumber" } ]

[apply]
group_fields = ["accountTier", "crmAccountId"]
"#;

/// A job file in its own temporary folder, with `inbox/`, `archive/` and `reports/` beside it.
pub struct TestJob {
    pub dir: tempfile::TempDir,
    pub job: Job,
}

impl TestJob {
    /// A job named `test` with the queue and inbox sources and the given rules/apply sections.
    pub fn new(rules: &str) -> TestJob {
        Self::with_header("pending_for = \"72h\"", rules)
    }

    pub fn with_header(header: &str, rules: &str) -> TestJob {
        // Tests write their files whole before a run: nothing to wait for.
        Self::with_sources("0 0 2 * * *", header, "settle = \"0s\"", rules)
    }

    /// A job with the given schedule and more `[sources]` lines (`settle`).
    pub fn with_sources(schedule: &str, header: &str, sources: &str, rules: &str) -> TestJob {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("inbox")).unwrap();
        let text = format!(
            "name = \"test\"\nschedule = \"{schedule}\"\ntimezone = \"America/New_York\"\n{header}\n\n\
             [sources]\nqueue = true\ninbox = \"inbox\"\narchive = \"archive\"\n{sources}\n{rules}\n\n\
             [report]\ndir = \"reports\"\n"
        );
        let path = dir.path().join("job.toml");
        std::fs::write(&path, text).unwrap();
        let job = job::load(&path).unwrap();
        TestJob { dir, job }
    }

    pub fn path(&self) -> PathBuf {
        self.job.path.clone()
    }

    /// Edits the job file, each `(from, to)` in turn, and returns the job as loaded again. Fails
    /// when a `from` is not in the file, so an edit never silently does nothing.
    pub fn edit(&self, edits: &[(&str, &str)]) -> Job {
        self.edit_file(edits);
        job::load(&self.path()).unwrap()
    }

    /// `edit` without loading the job again (for a file the edit makes invalid).
    pub fn edit_file(&self, edits: &[(&str, &str)]) {
        let mut text = std::fs::read_to_string(self.path()).unwrap();
        for (from, to) in edits {
            assert!(text.contains(from), "the job file has no {from:?} to replace:\n{text}");
            text = text.replace(from, to);
        }
        std::fs::write(self.path(), text).unwrap();
    }

    /// The rules a support engineer would widen to: the phone alone, within 90 minutes.
    pub fn phone_only(&self) -> Job {
        self.edit(&[
            (",\n         { event = \"agentId\", call = \"agent_id\" } ]", " ]"),
            ("before = \"10m\"", "before = \"90m\""),
        ])
    }

    pub fn inbox(&self) -> PathBuf {
        self.dir.path().join("inbox")
    }

    /// Drops a file into the inbox.
    pub fn drop_file(&self, name: &str, content: &str) {
        std::fs::write(self.inbox().join(name), content).unwrap();
    }

    pub async fn run(&self, pool: &PgPool) -> Finished {
        run::execute(pool, &self.job, Mode::Run, false).await.unwrap()
    }

    pub async fn dry_run(&self, pool: &PgPool) -> Finished {
        run::execute(pool, &self.job, Mode::Run, true).await.unwrap()
    }
}

pub fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A call; `ani`/`agent` as given, no group.
pub struct Call<'a> {
    pub id: &'a str,
    pub session: Option<&'a str>,
    pub group: Option<&'a str>,
    pub start: &'a str,
    pub end: Option<&'a str>,
    pub ani: Option<&'a str>,
    pub agent: Option<&'a str>,
}

impl<'a> Call<'a> {
    pub fn new(id: &'a str, start: &'a str, end: Option<&'a str>) -> Self {
        Call { id, session: None, group: None, start, end, ani: None, agent: None }
    }
    pub fn session(mut self, s: &'a str) -> Self {
        self.session = Some(s);
        self
    }
    pub fn group(mut self, g: &'a str) -> Self {
        self.group = Some(g);
        self
    }
    pub fn phone(mut self, ani: &'a str, agent: &'a str) -> Self {
        self.ani = Some(ani);
        self.agent = Some(agent);
        self
    }
    pub async fn insert(self, pool: &PgPool) {
        sqlx::query(
            "insert into calls (id, session_id, call_group_id, started_at, ended_at, ani, agent_id)
             values ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(self.id)
        .bind(self.session)
        .bind(self.group)
        .bind(t(self.start))
        .bind(self.end.map(t))
        .bind(self.ani)
        .bind(self.agent)
        .execute(pool)
        .await
        .unwrap();
    }
}

pub async fn add_group(pool: &PgPool, id: &str, metadata: Value) {
    sqlx::query("insert into call_groups (id, metadata) values ($1, $2)")
        .bind(id)
        .bind(metadata)
        .execute(pool)
        .await
        .unwrap();
}

pub async fn enqueue(pool: &PgPool, payload: Value) {
    sqlx::query("insert into event_queue (payload) values ($1)").bind(payload).execute(pool).await.unwrap();
}

pub async fn call_meta(pool: &PgPool, id: &str) -> Value {
    sqlx::query_scalar("select async_metadata from calls where id = $1").bind(id).fetch_one(pool).await.unwrap()
}

pub async fn group_meta(pool: &PgPool, id: &str) -> Value {
    sqlx::query_scalar("select async_metadata from call_groups where id = $1").bind(id).fetch_one(pool).await.unwrap()
}

/// `(id, async_metadata, xmin)` of every call: a snapshot that also shows whether rows were written.
pub async fn calls_snapshot(pool: &PgPool) -> Vec<(String, Value, String)> {
    sqlx::query_as("select id, async_metadata, xmin::text from calls order by id").fetch_all(pool).await.unwrap()
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(pool).await.unwrap()
}

/// Where callrecon's objects are in a test's database. `#[sqlx::test]` migrates it without
/// callrecon's session settings, so migration 0010 leaves them beside the platform's tables in
/// `public` (the layout of `--schema public`): the binary is run with that schema. The default
/// layout, other schemas and the upgrade are tested in `footprint.rs`.
pub const LEGACY_SCHEMA: &str = "public";

/// The URL of the test's own database, for running the binary against it.
pub async fn database_url(pool: &PgPool) -> String {
    let db: String = sqlx::query_scalar("select current_database()").fetch_one(pool).await.unwrap();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by scripts/test.sh");
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(&db);
    url.to_string()
}

/// Runs the binary with `--database-url` of the test's database, letting the test's other
/// tasks (a local HTTP server, say) run meanwhile.
pub async fn callrecon(pool: &PgPool, args: &[&str]) -> Output {
    callrecon_env(pool, args, &[]).await
}

/// [`callrecon`] with extra environment variables.
pub async fn callrecon_env(pool: &PgPool, args: &[&str], env: &[(&str, &str)]) -> Output {
    callrecon_url(&database_url(pool).await, args, env).await
}

/// [`callrecon_env`] with the database at `url` (through a pooler, say).
pub async fn callrecon_url(url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_callrecon"))
        .arg("--database-url")
        .arg(url)
        .args(args)
        .env("NO_COLOR", "1")
        .env("CALLRECON_SCHEMA", LEGACY_SCHEMA)
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap()
}

pub fn callrecon_at(url: &str, args: &[&str], cwd: Option<&Path>) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_callrecon"));
    cmd.arg("--database-url").arg(url).args(args).env("NO_COLOR", "1").env("CALLRECON_SCHEMA", LEGACY_SCHEMA);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().unwrap()
}

/// A PostgreSQL URL whose server accepts up to `connections` connections and never says a
/// word, and the thread that holds them open until the last has come.
pub fn silent_server(
    connections: usize,
) -> (String, std::thread::JoinHandle<Vec<std::io::Result<std::net::TcpStream>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::thread::spawn(move || listener.incoming().take(connections).collect::<Vec<_>>());
    (format!("postgres://postgres@127.0.0.1:{port}/callrecon"), held)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `job` in a task, for a test that holds a lock the run is to wait for.
pub fn spawn_run(pool: &PgPool, job: TestJob) -> tokio::task::JoinHandle<(TestJob, Finished)> {
    let pool = pool.clone();
    tokio::spawn(async move {
        let done = job.run(&pool).await;
        (job, done)
    })
}

/// Returns once a session of this test's database waits for a lock (of the `wait_event` kind,
/// e.g. `advisory`, when given); fails the test after 30 s, naming `what` it waited for.
pub async fn wait_for_lock_wait(pool: &PgPool, wait_event: Option<&str>, what: &str) {
    let started = std::time::Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where datname = current_database()
             and wait_event_type = 'Lock' and ($1::text is null or wait_event = $1)",
        )
        .bind(wait_event)
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the run never waited for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Another job's run in the middle of its apply: it holds the apply lock, has matched an event
/// (`metadata`, JSON text) of session `session` at `time` to `call`, and written `value` to the
/// call; not committed. Commit or roll back the returned transaction.
pub async fn other_jobs_apply(
    pool: &PgPool,
    session: &str,
    time: &str,
    call: &str,
    metadata: &str,
    value: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut other = pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(callrecon::db::APPLY_LOCK_KEY)
        .execute(&mut *other)
        .await
        .unwrap();
    sqlx::query(
        "insert into events (job, source, session_id, event_time, received_at, metadata, ingested_run,
                             state, target_kind, target_id, rule)
         values ('other', 'queue:0', $1, $2::timestamptz, now(), $3::jsonb, 0, 'matched', 'call', $4, 'session_id')",
    )
    .bind(session)
    .bind(time)
    .bind(metadata)
    .bind(call)
    .execute(&mut *other)
    .await
    .unwrap();
    sqlx::query("update calls set async_metadata = $2::jsonb where id = $1")
        .bind(call)
        .bind(value)
        .execute(&mut *other)
        .await
        .unwrap();
    other
}

/// Makes the test database's `calls` range-partitioned by `started_at`, as `callrecon gen calls
/// --layout partitioned` does (the same code), but with partitions of 20 minutes over
/// 2026-11-02 09:00–17:00Z (and a default one for every other time): the calls of one test land
/// in several partitions, so rows of different partitions share ctids.
pub async fn partition_calls(pool: &PgPool) {
    let start = t("2026-11-02T09:00:00Z");
    let step = chrono::Duration::minutes(20);
    let ranges: Vec<_> = (0..24).map(|i| (start + step * i, start + step * (i + 1))).collect();
    let mut conn = pool.acquire().await.unwrap();
    callrecon::datagen::partition_calls(&mut conn, &ranges).await.unwrap();
}

/// A scenario run on both layouts of `calls`: `mod NAME { plain, partitioned }`, the second after
/// [`partition_calls`]. The scenario is written as the body of `async fn NAME(pool: PgPool)`.
#[macro_export]
macro_rules! both_layouts {
    ($(#[$meta:meta])* async fn $name:ident($pool:ident: PgPool) $body:block) => {
        $(#[$meta])*
        mod $name {
            use super::*;

            async fn scenario($pool: PgPool) $body

            #[sqlx::test(migrator = "MIGRATOR")]
            async fn plain(pool: PgPool) {
                scenario(pool).await
            }

            #[sqlx::test(migrator = "MIGRATOR")]
            async fn partitioned(pool: PgPool) {
                $crate::helpers::partition_calls(&pool).await;
                scenario(pool).await
            }
        }
    };
}

/// An access token from the intake API at `base` (`http://ADDR`) for the API client `id`
/// (`client_credentials`, the secret by HTTP basic auth), which must be granted.
pub async fn api_token(http: &reqwest::Client, base: &str, id: &str, secret: &str) -> String {
    let resp = http
        .post(format!("{base}/token"))
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK, "a token for {id}");
    let body: Value = resp.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// An analyst's session cookie (`callrecon_review=…`), signed in through the desk's own form at
/// `base` (`http://ADDR`).
pub async fn desk_session(base: &str, name: &str, secret: &str) -> String {
    let http = reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let page = http.get(format!("{base}/review/login")).send().await.unwrap();
    let nonce = page.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let html = page.text().await.unwrap();
    let at = html.find("name=\"csrf\" value=\"").unwrap() + 19;
    let csrf = &html[at..at + html[at..].find('"').unwrap()];
    let resp = http
        .post(format!("{base}/review/login"))
        .header("cookie", nonce)
        .form(&[("name", name), ("secret", secret), ("csrf", csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::SEE_OTHER, "signing in as {name}");
    let cookie = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("callrecon_review="))
        .expect("a session");
    cookie.split(';').next().unwrap().to_owned()
}

/// Held for a test's length: the tests that take the same `name` run one at a time, in this
/// process and any other testing on the server (a session-level advisory lock on the server's
/// maintenance database: advisory locks are per database, and each test has its own). Waits at
/// most ten minutes.
pub struct Serially(#[allow(dead_code)] sqlx::PgConnection);

pub async fn serially(name: &str) -> Serially {
    use sqlx::Connection as _;
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by scripts/test.sh");
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("set lock_timeout = '600s'").execute(&mut conn).await.unwrap();
    sqlx::query("select pg_advisory_lock(hashtext('callrecon tests: ' || $1))")
        .bind(name)
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("waited ten minutes to run serially with the other {name} tests: {e}"));
    Serially(conn)
}
