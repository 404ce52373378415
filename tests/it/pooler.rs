//! Behind PgBouncer (Debian's package), configured as usual (`ignore_startup_parameters =
//! extra_float_digits`): the demo in session pooling; migrate, enqueue, run, rematch and the
//! intake API in transaction pooling (`--pooler transaction`), with fewer server connections than
//! callrecon opens, so its clients share them. callrecon's objects are in their own schema
//! (the default layout): nothing resolves unless each session or transaction sets the search path.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::*;
use crate::servers::{Daemon, PgBouncer, database_name};

/// A pool on the test's database whose sessions see callrecon's schema, then the platform's.
async fn with_our_path(pool: &PgPool) -> PgPool {
    let options: PgConnectOptions = (*pool.connect_options()).clone().options([("search_path", "callrecon, public")]);
    PgPoolOptions::new().max_connections(2).connect_with(options).await.unwrap()
}

const OWN_SCHEMA: (&str, &str) = ("CALLRECON_SCHEMA", "callrecon");

#[sqlx::test(migrations = false)]
async fn the_demo_runs_through_pgbouncer_in_session_pooling(pool: PgPool) {
    let bouncer = PgBouncer::start("session", 10);
    let url = bouncer.url(&database_name(&pool).await);
    crate::demo::demo_matches_expected_at(&with_our_path(&pool).await, &url, &[OWN_SCHEMA]).await;
    assert!(!bouncer.log().contains("unsupported startup parameter"), "{}", bouncer.log());
}

#[sqlx::test(migrations = false)]
async fn migrate_enqueue_run_rematch_and_the_api_work_in_transaction_pooling(pool: PgPool) {
    // Three server connections for the database: a run's transaction and its readers, the
    // migration lock's holder and the migrating connection share them with everyone else.
    let bouncer = PgBouncer::start("transaction", 3);
    let url = bouncer.url(&database_name(&pool).await);
    let env = [OWN_SCHEMA, ("CALLRECON_POOLER", "transaction")];
    let ours = with_our_path(&pool).await;

    // Two processes install callrecon at once: the migration lock, held by a transaction, lets
    // one apply each migration once while the other waits.
    let (a, b) = tokio::join!(callrecon_url(&url, &["migrate"], &env), callrecon_url(&url, &["migrate"], &env));
    for out in [&a, &b] {
        assert!(out.status.success(), "{}", stderr(out));
    }
    let applied = count(&ours, "select count(*) from callrecon._sqlx_migrations where success").await;
    assert_eq!(applied as usize, callrecon::db::MIGRATOR.iter().count());

    // The platform's calls; events from a file, enqueued and run through the pooler.
    crate::apply::two_agent_calls(&pool).await;
    add_group(&pool, "g1", json!({})).await;
    Call::new("c-s1", "2026-11-02T11:00:00Z", None).session("s1").group("g1").insert(&pool).await;
    let job = TestJob::new(RULES);
    let file = job.dir.path().join("events.ndjson");
    std::fs::write(
        &file,
        "{\"EventTime\": \"2026-11-02T10:14:00Z\", \"Metadata\": {\"customerPhone\": \"5551234567\", \"agentId\": \"a1\", \"note\": \"x\"}}\n\
         {\"SessionId\": \"s1\", \"EventTime\": \"2026-11-02T11:01:00Z\", \"Metadata\": {\"crm\": 1}}\n",
    )
    .unwrap();
    let path = job.path().display().to_string();
    for args in [vec!["enqueue", file.to_str().unwrap()], vec!["run", "--job", &path]] {
        let out = callrecon_url(&url, &args, &env).await;
        assert!(out.status.success(), "{args:?}: {}\n{}", stderr(&out), bouncer.log());
    }
    assert_eq!(call_meta(&pool, "c-a1").await, json!({"customerPhone": "5551234567", "agentId": "a1", "note": "x"}));
    assert_eq!(call_meta(&pool, "c-s1").await, json!({"crm": 1}));

    // The intake API through the pooler (its user made over a session of its own).
    let created =
        callrecon_url(&database_url(&pool).await, &["users", "add", "crm", "--role", "AsyncMetaData"], &[OWN_SCHEMA])
            .await;
    assert!(created.status.success(), "{}", stderr(&created));
    let text = stdout(&created);
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).unwrap().trim().to_owned();
    let (id, secret) = (field("client_id:"), field("client_secret:"));
    let mut server = Daemon::start(&url, &["serve", "--listen", "127.0.0.1:0", "--writers", "2"], &env);
    let base = server.line_with("listening on").rsplit(' ').next().unwrap().to_owned();
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap();
    let form = [("grant_type", "client_credentials"), ("client_id", id.as_str()), ("client_secret", secret.as_str())];
    let token: Value = http.post(format!("{base}/Token")).form(&form).send().await.unwrap().json().await.unwrap();
    let token = token["access_token"].as_str().unwrap_or_else(|| panic!("{token}; log:\n{}", server.log())).to_owned();
    // Many at once, on both endpoints: the writers' transactions and the tokens' checks share
    // the three server connections.
    let posts = (0..40).map(|n| {
        let (http, token, base) = (http.clone(), token.clone(), base.clone());
        async move {
            let (path, body) = match n % 2 {
                0 => (
                    "event",
                    json!({"SessionId": "s1", "EventTime": "2026-11-02T11:02:00Z", "Metadata": {format!("e{n}"): n}}),
                ),
                _ => (
                    "masterCall",
                    json!({"MasterId": "g1", "EventTime": "2026-11-02T11:02:00Z", "Metadata": {format!("m{n}"): n}}),
                ),
            };
            let url = format!("{base}/callEvent/v1/outofband/{path}");
            let resp = http.post(url).bearer_auth(&token).json(&body).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    });
    for (status, body) in futures_util::future::join_all(posts).await {
        assert_eq!(status, 200, "{body}; log:\n{}", server.log());
    }
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(http.get(format!("{base}/metrics")).send().await.unwrap().status(), 200);
    // The review desk needs sessions: said, not half-served.
    let desk = http.get(format!("{base}/review")).send().await.unwrap();
    assert_eq!(desk.status(), 503);
    assert!(desk.text().await.unwrap().contains("--pooler session"));
    server.stop();
    assert!(!server.log().contains("ERROR"), "{}", server.log());

    let out = callrecon_url(&url, &["run", "--job", &path], &env).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let c_s1 = call_meta(&pool, "c-s1").await;
    assert_eq!(c_s1.as_object().unwrap().len(), 41, "{c_s1}");

    // The rules change; the rematch through the pooler moves the event: 10:14 is nearer c-a2.
    job.phone_only();
    let out = callrecon_url(&url, &["rematch", "--job", &path, "--since", "2026-11-02T00:00:00Z"], &env).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("1 moved"), "{}", stdout(&out));
    assert_eq!(call_meta(&pool, "c-a1").await, json!({}));
    assert_eq!(call_meta(&pool, "c-a2").await["note"], "x");
    let out = callrecon_url(&url, &["verify", "--job", &path], &env).await;
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));

    // A command that needs a session says so instead of failing halfway.
    let out = callrecon_url(&url, &["report", "list"], &env).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("needs a session of its own"), "{}", stderr(&out));
    let log = bouncer.log();
    assert!(!log.contains("prepared statement") && !log.contains("unsupported startup parameter"), "{log}");
}
