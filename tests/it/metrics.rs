//! Prometheus metrics as an operator's Prometheus sees them: `/metrics` of the intake API and of
//! the schedule daemon scraped over HTTP, the textfile `run --metrics-file` writes, the run's
//! summary log line, and the alert rules in docs/ (promtool, and only series that exist).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use callrecon::cli::ServeArgs;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::*;

const MIGRATOR: &sqlx::migrate::Migrator = &callrecon::db::MIGRATOR;

/// One sample of a scrape: the metric name, its labels, its value.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of a Prometheus text exposition (label values here never hold `,` or `"`).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("sample line {l:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap();
                    let labels = inner
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once('=').unwrap();
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {l:?}")),
            };
            Sample { name, labels, value }
        })
        .collect()
}

/// The value of the one sample named `name` whose labels include `labels`; `None` when absent.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect();
    assert!(found.len() <= 1, "{name}{labels:?} matches several samples: {found:?}");
    found.first().map(|s| s.value)
}

#[track_caller]
fn expect(samples: &[Sample], name: &str, labels: &[(&str, &str)], expected: f64) {
    let got = value(samples, name, labels);
    assert_eq!(got, Some(expected), "{name}{labels:?}; samples:\n{samples:#?}");
}

/// Names of the metric families and their series (`_bucket`, `_sum`, `_count` of histograms).
fn series_names(text: &str) -> BTreeSet<String> {
    parse(text).into_iter().map(|s| s.name).collect()
}

/// `promtool check metrics`: the exposition parses and follows Prometheus' naming conventions.
fn promtool_lints(text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        stdout(&out),
        stderr(&out)
    );
}

/// promtool comes with Debian's `prometheus` package (scripts/test.sh installs it).
fn promtool() -> &'static str {
    let found = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found, "promtool not found: install Debian's `prometheus` package (scripts/test.sh does)");
    "promtool"
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap()
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, String) {
    let resp = http.get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The intake API in-process on a free port; stopped by dropping the sender.
pub async fn start_server(pool: &PgPool) -> (String, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let args = ServeArgs { max_body: 4096, ..ServeArgs::default() };
    let listener = tokio::net::TcpListener::bind(args.listen).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let pool = pool.clone();
    let task = tokio::spawn(async move {
        callrecon::serve::serve(pool, &args, listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (base, stop, task)
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn intake_metrics_count_requests_batches_tokens_and_the_queue(pool: PgPool) {
    let (base, stop, task) = start_server(&pool).await;
    let http = client();
    let user = callrecon::users::add(&pool, "acme", &["AsyncMetaData".to_owned()]).await.unwrap();
    let token = &api_token(&http, &base, &user.client_id, &user.client_secret).await;
    let post =
        |body: Value| http.post(format!("{base}/callevent/v1/outofband/event")).bearer_auth(token).json(&body).send();
    let event = json!({"SessionId": "abc123", "EventTime": "2018/10/15T09:00:00.000Z", "Metadata": {"a": 1}});
    assert_eq!(post(event.clone()).await.unwrap().status(), 200);
    assert_eq!(post(event).await.unwrap().status(), 200);
    assert_eq!(post(json!({"Metadata": {}})).await.unwrap().status(), 400);
    assert_eq!(get(&http, &format!("{base}/no/such/path")).await.0, 404);

    let (status, text) = get(&http, &format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    let m = parse(&text);
    let event_route = ("route", "/callevent/v1/outofband/event");
    expect(&m, "callrecon_http_requests_total", &[event_route, ("status", "200")], 2.0);
    expect(&m, "callrecon_http_requests_total", &[event_route, ("status", "400")], 1.0);
    expect(&m, "callrecon_http_requests_total", &[("route", "/token"), ("status", "200")], 1.0);
    expect(&m, "callrecon_http_requests_total", &[("route", "unmatched"), ("status", "404")], 1.0);
    expect(&m, "callrecon_http_request_duration_seconds_count", &[event_route], 3.0);
    expect(&m, "callrecon_http_request_duration_seconds_bucket", &[event_route, ("le", "+Inf")], 3.0);
    expect(&m, "callrecon_intake_tokens_issued_total", &[], 1.0);
    // Each request waited alone: three batches of one (the invalid event is answered by the writer).
    expect(&m, "callrecon_intake_batch_events_count", &[], 3.0);
    expect(&m, "callrecon_intake_batch_events_sum", &[], 3.0);
    expect(&m, "callrecon_event_queue_events", &[], 2.0);
    assert!(value(&m, "callrecon_event_queue_oldest_age_seconds", &[]).unwrap() >= 0.0);
    expect(&m, "callrecon_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    promtool_lints(&text);

    // The queue gauge is read when scraped: a run drains the queue.
    TestJob::new(RULES).run(&pool).await;
    let (_, text) = get(&http, &format!("{base}/metrics")).await;
    let m = parse(&text);
    expect(&m, "callrecon_event_queue_events", &[], 0.0);
    expect(&m, "callrecon_event_queue_oldest_age_seconds", &[], 0.0);
    expect(&m, "callrecon_http_requests_total", &[("route", "/metrics"), ("status", "200")], 1.0);
    stop.send(()).unwrap();
    task.await.unwrap();
}

/// A job whose events leave this after its run: 1 attached by SessionId, 1 matched by phone and
/// agent, 2 pending (no candidate), 1 rejected record.
async fn mixed_events(pool: &PgPool) {
    Call::new("c1", "2026-11-02T10:00:00Z", Some("2026-11-02T10:05:00Z")).session("s1").insert(pool).await;
    Call::new("c2", "2026-11-02T11:00:00Z", Some("2026-11-02T11:05:00Z"))
        .phone("2014522627", "agent-04")
        .insert(pool)
        .await;
    enqueue(pool, json!({"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"x": 1}})).await;
    enqueue(
        pool,
        json!({"EventTime": "2026-11-02T11:01:00Z", "Metadata": {"customerPhone": "+1 201 452 2627", "agentId": "agent-04"}}),
    )
    .await;
    for minute in ["01", "02"] {
        let time = format!("2026-11-02T15:{minute}:00Z");
        enqueue(pool, json!({"EventTime": time, "Metadata": {"customerPhone": "999", "agentId": "agent-09"}})).await;
    }
    enqueue(pool, json!({"Metadata": {}})).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn run_metrics_file_and_summary_log_line_carry_the_runs_numbers(pool: PgPool) {
    mixed_events(&pool).await;
    // One of them again: a duplicate, not stored.
    enqueue(
        &pool,
        json!({"EventTime": "2026-11-02T15:01:00Z", "Metadata": {"customerPhone": "999", "agentId": "agent-09"}}),
    )
    .await;
    let job = TestJob::new(RULES);
    let file = job.dir.path().join("callrecon.prom");
    let out = callrecon(
        &pool,
        &[
            "--log-format",
            "json",
            "run",
            "--job",
            job.path().to_str().unwrap(),
            "--metrics-file",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = std::fs::read_to_string(&file).unwrap();
    let m = parse(&text);
    let j = ("job_name", "test");
    expect(&m, "callrecon_last_run_ingested_events", &[j], 4.0);
    expect(&m, "callrecon_last_run_rejected_records", &[j], 1.0);
    expect(&m, "callrecon_last_run_duplicate_events", &[j], 1.0);
    expect(&m, "callrecon_last_run_inbox_files_left", &[j], 0.0);
    expect(&m, "callrecon_last_run_matched_events", &[j], 2.0);
    expect(&m, "callrecon_last_run_unmatched_events", &[j, ("reason", "no_candidate")], 2.0);
    expect(&m, "callrecon_last_run_unmatched_events", &[j, ("reason", "ambiguous")], 0.0);
    expect(&m, "callrecon_last_run_unmatched_ratio", &[j], 0.5);
    expect(&m, "callrecon_pending_events", &[j], 2.0);
    expect(&m, "callrecon_pending_growing_runs", &[j], 0.0);
    expect(&m, "callrecon_event_queue_events", &[], 0.0);
    for stage in ["ingest", "match", "apply", "report"] {
        let took = value(&m, "callrecon_last_run_stage_duration_seconds", &[j, ("stage", stage)]).unwrap();
        assert!((0.0..60.0).contains(&took), "{stage}: {took}");
    }
    let age = value(&m, "callrecon_pending_oldest_age_seconds", &[j]).unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");
    let success = value(&m, "callrecon_last_success_timestamp_seconds", &[j]).unwrap();
    assert!((chrono::Utc::now().timestamp() as f64 - success).abs() < 60.0, "{success}");
    assert_eq!(value(&m, "callrecon_last_failure_timestamp_seconds", &[j]), None);
    // A textfile is rewritten by every run: it holds no counter a run would reset.
    assert!(!text.contains("_total"), "{text}");
    promtool_lints(&text);
    let leftovers: Vec<_> = std::fs::read_dir(job.dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!leftovers.iter().any(|n| n.to_string_lossy().ends_with(".tmp")), "{leftovers:?}");

    // The same numbers as one JSON log line.
    let lines: Vec<Value> = stderr(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summaries: Vec<&Value> = lines.iter().filter(|l| l["fields"]["message"] == "run summary").collect();
    assert_eq!(summaries.len(), 1, "{lines:#?}");
    let f = &summaries[0]["fields"];
    assert_eq!(summaries[0]["level"], "INFO");
    assert_eq!(
        (f["job"].as_str(), f["kind"].as_str(), f["status"].as_str()),
        (Some("test"), Some("run"), Some("succeeded"))
    );
    assert_eq!((f["ingested"].as_u64(), f["rejected"].as_u64(), f["matched"].as_u64()), (Some(4), Some(1), Some(2)));
    assert_eq!((f["unmatched"].as_u64(), f["pending"].as_u64()), (Some(2), Some(2)));
    assert_eq!(f["unmatched_ratio"].as_f64(), Some(0.5));
    assert_eq!((f["calls_written"].as_u64(), f["call_groups_written"].as_u64()), (Some(2), Some(0)));
    let by_rule: Value = serde_json::from_str(f["matched_by_rule"].as_str().unwrap()).unwrap();
    assert_eq!(by_rule, json!({"phone-and-agent": 1, "session_id": 1}));
    let by_reason: Value = serde_json::from_str(f["unmatched_by_reason"].as_str().unwrap()).unwrap();
    assert_eq!(by_reason, json!({"no_candidate": 2}));
    assert_eq!(f["duplicates"].as_u64(), Some(1));
    let by_source: Value = serde_json::from_str(f["duplicates_by_source"].as_str().unwrap()).unwrap();
    assert_eq!(by_source, json!({"queue": 1}));
    for stage in ["ingest_seconds", "match_seconds", "apply_seconds", "report_seconds", "duration_seconds"] {
        assert!(f[stage].as_f64().is_some(), "{stage} in {f}");
    }

    // A failed run: the file says so (the database could not even be reached).
    let out = callrecon_at(
        "postgres://postgres@127.0.0.1:1/none",
        &[
            "--connect-timeout",
            "2s",
            "run",
            "--job",
            job.path().to_str().unwrap(),
            "--metrics-file",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let m = parse(&std::fs::read_to_string(&file).unwrap());
    let failure = value(&m, "callrecon_last_failure_timestamp_seconds", &[j]).unwrap();
    assert!((chrono::Utc::now().timestamp() as f64 - failure).abs() < 60.0, "{failure}");
    assert_eq!(value(&m, "callrecon_last_run_ingested_events", &[j]), None);
}

/// A running `callrecon schedule --metrics-listen 127.0.0.1:0`: its metrics URL, from stdout.
struct Daemon {
    child: std::process::Child,
    base: String,
    /// Kept open: the daemon may print more.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Daemon {
    fn start(url: &str, jobs: &[std::path::PathBuf]) -> Daemon {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_callrecon"));
        cmd.args(["--database-url", url, "schedule", "--metrics-listen", "127.0.0.1:0"]);
        for j in jobs {
            cmd.arg("--job").arg(j);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut line).unwrap();
        let base = line
            .trim()
            .strip_prefix("callrecon schedule: metrics on ")
            .and_then(|u| u.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("first line on stdout: {line:?}"))
            .to_owned();
        Daemon { child, base, _stdout: stdout }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn schedule_serves_metrics_while_it_waits_and_after_a_run(pool: PgPool) {
    // `waits` ran once by hand, leaving 2 events pending; its next fire time is a year away.
    mixed_events(&pool).await;
    let waits = TestJob::new(RULES);
    let waits = TestJob {
        job: waits.edit(&[("name = \"test\"", "name = \"waits\""), ("0 0 2 * * *", "0 0 0 1 1 *")]),
        dir: waits.dir,
    };
    waits.run(&pool).await;
    enqueue(&pool, json!({"EventTime": "2026-11-02T15:01:00Z", "Metadata": {}})).await;
    // `often` fires every 2 seconds and reads only its inbox (the queue stays for `waits`).
    let often = TestJob::new(RULES);
    often.edit_file(&[
        ("name = \"test\"", "name = \"often\""),
        ("0 0 2 * * *", "*/2 * * * * *"),
        ("queue = true", "queue = false"),
    ]);
    often.drop_file(
        "feed.ndjson",
        "{\"SessionId\": \"s1\", \"EventTime\": \"2026-11-02T10:02:00Z\", \"Metadata\": {\"y\": 2}}\n\
         {\"EventTime\": \"2026-11-02T16:00:00Z\", \"Metadata\": {\"crmCaseId\": \"C-404\"}}\nnot json\n",
    );

    let daemon = Daemon::start(&database_url(&pool).await, &[waits.path(), often.path()]);
    let http = client();
    let (status, body) = get(&http, &format!("{}/healthz", daemon.base)).await;
    // The scheduler answers from its start; it may still be reaching the database.
    assert!(status == 200 || (status == 503 && body.contains("connecting")), "{status} {body}");

    // While `waits` waits: its state comes from the database, and no run of it is counted.
    let deadline = Instant::now() + Duration::from_secs(20);
    let m = loop {
        let (_, text) = get(&http, &format!("{}/metrics", daemon.base)).await;
        let m = parse(&text);
        if value(&m, "callrecon_pending_events", &[("job_name", "waits")]).is_some() {
            promtool_lints(&text);
            break m;
        }
        assert!(Instant::now() < deadline, "no backlog after 20 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let w = ("job_name", "waits");
    expect(&m, "callrecon_pending_events", &[w], 2.0);
    expect(&m, "callrecon_event_queue_events", &[], 1.0);
    let success = value(&m, "callrecon_last_success_timestamp_seconds", &[w]).unwrap();
    assert!((chrono::Utc::now().timestamp() as f64 - success).abs() < 60.0, "{success}");
    assert_eq!(value(&m, "callrecon_runs_total", &[w, ("status", "succeeded")]), None);
    let (status, body) = get(&http, &format!("{}/healthz", daemon.base)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"status": "ok", "jobs": ["waits", "often"]}));

    // After `often` has run (at least twice: every run after the first finds nothing new).
    let o = ("job_name", "often");
    let deadline = Instant::now() + Duration::from_secs(30);
    let m = loop {
        let m = parse(&get(&http, &format!("{}/metrics", daemon.base)).await.1);
        if value(&m, "callrecon_runs_total", &[o, ("kind", "run"), ("status", "succeeded")]).is_some_and(|n| n >= 2.0) {
            break m;
        }
        assert!(Instant::now() < deadline, "`often` did not run twice in 30 s: {m:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let runs = value(&m, "callrecon_runs_total", &[o, ("kind", "run"), ("status", "succeeded")]).unwrap();
    expect(&m, "callrecon_run_stage_duration_seconds_count", &[o, ("kind", "run"), ("stage", "apply")], runs);
    expect(&m, "callrecon_events_ingested_total", &[o], 2.0);
    expect(&m, "callrecon_records_rejected_total", &[o], 1.0);
    expect(&m, "callrecon_events_matched_total", &[o, ("rule", "session_id")], 1.0);
    expect(&m, "callrecon_calls_written_total", &[o], 1.0);
    expect(&m, "callrecon_call_groups_written_total", &[o], 0.0);
    expect(&m, "callrecon_last_run_unmatched_events", &[o, ("reason", "no_candidate")], 1.0);
    expect(&m, "callrecon_pending_events", &[o], 1.0);
    expect(&m, "callrecon_last_run_unmatched_ratio", &[o], 1.0);
    // `waits` is still waiting; the queue is still there for it.
    assert_eq!(value(&m, "callrecon_runs_total", &[w, ("status", "succeeded")]), None);
    expect(&m, "callrecon_event_queue_events", &[], 1.0);
}

/// Issue 43: the scheduler's metrics endpoint is served like `serve` (every answer `nosniff`),
/// and stops with the scheduler on SIGTERM, whatever its clients hold open: an idle keep-alive
/// connection and a request head never finished.
#[sqlx::test(migrator = "MIGRATOR")]
async fn the_schedulers_metrics_endpoint_stops_with_it_whatever_its_clients_hold(pool: PgPool) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let job = TestJob::new(RULES);
    job.edit_file(&[("0 0 2 * * *", "0 0 0 1 1 *")]);
    let mut daemon = Daemon::start(&database_url(&pool).await, &[job.path()]);
    let resp = client().get(format!("{}/healthz", daemon.base)).send().await.unwrap();
    assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    let addr = daemon.base.trim_start_matches("http://").to_owned();
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    assert!(idle.read(&mut buf).await.unwrap() > 0);
    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let id = daemon.child.id().to_string();
    assert!(Command::new("sh").args(["-c", "kill -TERM \"$1\"", "sh", &id]).status().unwrap().success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = daemon.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "schedule still running 10 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    for s in [&mut idle, &mut half] {
        let closed = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn alert_rules_pass_promtool_and_name_only_exported_series(pool: PgPool) {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for args in [["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]] {
        let out = Command::new(promtool()).args(args).current_dir(&docs).output().unwrap();
        assert!(out.status.success(), "promtool {args:?}:\n{}{}", stdout(&out), stderr(&out));
    }

    // What the rules name must be in what callrecon exports: the intake API's /metrics, and
    // the textfile of a one-off run (the run alerts must work without the scheduler).
    mixed_events(&pool).await;
    let job = TestJob::new(RULES);
    let done = job.run(&pool).await;
    let file = job.dir.path().join("callrecon.prom");
    callrecon::metrics::write_textfile(&file, "test", &callrecon::metrics::Ended::Succeeded(&done), Some(&pool))
        .await
        .unwrap();
    let mut exported = series_names(&std::fs::read_to_string(&file).unwrap());
    let failed = anyhow::anyhow!("the database went away");
    callrecon::metrics::write_textfile(&file, "test", &callrecon::metrics::Ended::Failed(&failed), None).await.unwrap();
    exported.extend(series_names(&std::fs::read_to_string(&file).unwrap()));
    let (base, stop, task) = start_server(&pool).await;
    let http = client();
    get(&http, &format!("{base}/healthz")).await;
    exported.extend(series_names(&get(&http, &format!("{base}/metrics")).await.1));
    stop.send(()).unwrap();
    task.await.unwrap();

    let rules = std::fs::read_to_string(docs.join("alerts.yml")).unwrap();
    let named: BTreeSet<&str> = rules
        .match_indices("callrecon_")
        .map(|(i, _)| {
            let rest = &rules[i..];
            &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
        })
        .collect();
    assert!(named.len() >= 6, "{named:?}");
    let missing: Vec<&&str> = named.iter().filter(|n| !exported.contains(**n)).collect();
    assert!(missing.is_empty(), "the rules name series callrecon does not export: {missing:?}\nexported: {exported:?}");
}
