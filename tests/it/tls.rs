//! PostgreSQL over TLS: a server of its own that accepts only TLS connections (`hostssl`,
//! `hostnossl … reject`), its certificate naming `localhost` only, signed by a CA the test makes.
//! Every command, as an operator runs the binary, connects with `sslmode=require` and
//! `verify-full`; `verify-full` refuses a host name the certificate does not name; the scheduler
//! and the server reconnect over TLS after their sessions are killed.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{Connection as _, PgConnection};

use crate::helpers::{RULES, TestJob, stderr, stdout};
use crate::servers::{Daemon, TlsPostgres, callrecon_at_env};

/// Whether every session of callrecon on the server is encrypted, and how many there are.
async fn callrecons_sessions(db: &mut PgConnection) -> (bool, i64) {
    sqlx::query_as(
        "select coalesce(bool_and(s.ssl), false), count(*) from pg_stat_ssl s
         join pg_stat_activity a on a.pid = s.pid where a.application_name = 'callrecon'",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

/// Ends every session of callrecon: what a failover or a restart of the server does to them.
async fn kill_callrecons_sessions(db: &mut PgConnection) {
    sqlx::query("select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'callrecon'")
        .execute(db)
        .await
        .unwrap();
}

async fn succeeded_runs(db: &mut PgConnection) -> i64 {
    sqlx::query_scalar("select count(*) from callrecon.runs where status = 'succeeded'").fetch_one(db).await.unwrap()
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "not within 30 s: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_works_over_tls_and_verify_full_checks_the_host_name() {
    let pg = TlsPostgres::start();
    let ca = pg.file("ca.crt");
    let verify_full =
        |host: &str| pg.url(host, "postgres", "callrecon", &format!("sslmode=verify-full&sslrootcert={ca}"));
    let require = pg.url("127.0.0.1", "postgres", "callrecon", "sslmode=require");
    let migrate = |url: &str| callrecon_at_env(url, &["migrate"], &[]);

    // The server takes no plain connection: what callrecon without TLS support met.
    let plain = migrate(&pg.url("127.0.0.1", "postgres", "callrecon", "sslmode=disable"));
    assert_eq!(plain.status.code(), Some(1), "{}", stderr(&plain));
    assert!(stderr(&plain).contains("no encryption") || stderr(&plain).contains("rejects"), "{}", stderr(&plain));

    // verify-full with the name the certificate names: the database is created (on the
    // maintenance database) and migrated, over TLS.
    let out = migrate(&verify_full("localhost"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("database is up to date"), "{}", stdout(&out));

    // verify-full with a host name the certificate does not name (the same server by its
    // address), or without the CA that signed it: refused, saying why.
    let wrong_host = migrate(&verify_full("127.0.0.1"));
    assert_eq!(wrong_host.status.code(), Some(1), "{}", stderr(&wrong_host));
    assert!(stderr(&wrong_host).contains("certificate"), "{}", stderr(&wrong_host));
    let unknown_ca = migrate(&pg.url("localhost", "postgres", "callrecon", "sslmode=verify-full"));
    assert_eq!(unknown_ca.status.code(), Some(1), "{}", stderr(&unknown_ca));
    assert!(stderr(&unknown_ca).contains("certificate"), "{}", stderr(&unknown_ca));
    // verify-ca checks the CA, not the name; require encrypts without checking either.
    let verify_ca = pg.url("127.0.0.1", "postgres", "callrecon", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    for url in [&verify_ca, &require] {
        let out = migrate(url);
        assert!(out.status.success(), "{url}: {}", stderr(&out));
    }
    // A client certificate: role tlsuser logs in by it alone (pg_hba `cert`).
    let client = pg.url(
        "localhost",
        "tlsuser",
        "callrecon",
        &format!(
            "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
            pg.file("client.crt"),
            pg.file("client.key")
        ),
    );
    let out = migrate(&client);
    assert!(out.status.success(), "{}", stderr(&out));
    let without_key =
        migrate(&pg.url("localhost", "tlsuser", "callrecon", &format!("sslmode=verify-full&sslrootcert={ca}")));
    assert_eq!(without_key.status.code(), Some(1), "tlsuser without its certificate: {}", stderr(&without_key));

    // The test's own connection, encrypted as `require` says.
    let mut db = PgConnection::connect(&verify_full("localhost")).await.unwrap();
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert!(ssl);
    sqlx::query("insert into call_groups (id) values ('g1')").execute(&mut db).await.unwrap();
    sqlx::query(
        "insert into calls (id, session_id, call_group_id, started_at, ended_at)
         values ('c1', 's1', 'g1', '2026-11-02T10:00:00Z', '2026-11-02T10:05:00Z')",
    )
    .execute(&mut db)
    .await
    .unwrap();

    // The commands over verify-full: enqueue, run, rematch, verify.
    let job = TestJob::new(RULES);
    std::fs::write(
        job.dir.path().join("events.ndjson"),
        r#"{"SessionId": "s1", "EventTime": "2026-11-02T10:01:00Z", "Metadata": {"crmCaseId": "C-77"}}"#,
    )
    .unwrap();
    let job_file = job.path().display().to_string();
    let full = verify_full("localhost");
    for args in [
        vec!["enqueue", job.dir.path().join("events.ndjson").to_str().unwrap()],
        vec!["run", "--job", &job_file],
        vec!["rematch", "--job", &job_file],
        vec!["verify", "--job", &job_file],
    ] {
        let out = callrecon_at_env(&full, &args, &[]);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let applied: Value =
        sqlx::query_scalar("select async_metadata from calls where id = 'c1'").fetch_one(&mut db).await.unwrap();
    assert_eq!(applied, json!({"crmCaseId": "C-77"}));

    // The scheduler over require, a run every second; its sessions are encrypted, and after they
    // are killed it reconnects (over TLS: the server takes nothing else) and runs again.
    job.edit_file(&[("0 0 2 * * *", "* * * * * *")]);
    let before = succeeded_runs(&mut db).await;
    let mut scheduler = Daemon::start(&require, &["schedule", "--job", &job_file], &[]);
    eventually("a scheduled run", async || succeeded_runs(&mut db).await > before).await;
    assert!(callrecons_sessions(&mut db).await.0, "{}", scheduler.log());
    kill_callrecons_sessions(&mut db).await;
    let killed = succeeded_runs(&mut db).await;
    eventually("a scheduled run after its sessions were killed", async || succeeded_runs(&mut db).await > killed + 1)
        .await;
    assert!(callrecons_sessions(&mut db).await.0);
    scheduler.stop();

    // The intake API over verify-full: a token, an event, its sessions encrypted, and the same
    // after they are killed.
    let created = callrecon_at_env(&full, &["users", "add", "crm", "--role", "AsyncMetaData"], &[]);
    assert!(created.status.success(), "{}", stderr(&created));
    let text = stdout(&created);
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_owned();
    let (id, secret) = (field("client_id:"), field("client_secret:"));
    let mut server = Daemon::start(&full, &["serve", "--listen", "127.0.0.1:0"], &[]);
    let base = server.line_with("listening on").rsplit(' ').next().unwrap().to_owned();
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap();
    // The status of posting event `n` with a new token (0: no token).
    let post = async |http: &reqwest::Client, n: u32| {
        let form = [("grant_type", "client_credentials"), ("client_id", &id), ("client_secret", &secret)];
        let token: Value = http.post(format!("{base}/token")).form(&form).send().await.unwrap().json().await.unwrap();
        let Some(token) = token["access_token"].as_str() else { return 0 };
        let body = json!({"SessionId": "s1", "EventTime": "2026-11-02T10:02:00Z", "Metadata": {"n": n}});
        let url = format!("{base}/callevent/v1/outofband/event");
        http.post(url).bearer_auth(token).json(&body).send().await.unwrap().status().as_u16()
    };
    assert_eq!(post(&http, 1).await, 200, "{}", server.log());
    assert!(callrecons_sessions(&mut db).await.0);
    kill_callrecons_sessions(&mut db).await;
    // The pool finds its connections gone and opens new ones, with the URL's TLS settings.
    eventually("the API answering again", async || post(&http, 2).await == 200).await;
    let (encrypted, sessions) = callrecons_sessions(&mut db).await;
    assert!(encrypted && sessions > 0, "{sessions} sessions; log:\n{}", server.log());
    server.stop();
    let queued: i64 = sqlx::query_scalar("select count(*) from event_queue").fetch_one(&mut db).await.unwrap();
    assert_eq!(queued, 2);
}
