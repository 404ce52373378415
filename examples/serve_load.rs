//! Load generator for `callrecon serve` (run by `scripts/bench-serve.sh`): for each number of
//! concurrent clients, posts a fixed number of events over HTTP/1.1 keep-alive and reports
//! events/s and latency percentiles; then checks on `event_queue` that every 200 was stored.
//!
//! Loopback only: the URL must point at 127.0.0.0/8 or [::1], and the request count is bounded.
//!
//! ```sh
//! cargo run --release --example serve_load -- --url http://127.0.0.1:8080 \
//!     --client-id cr-... --client-secret ... --database-url postgres://... --clients 1,16,64 --events 20000
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

struct Args {
    url: String,
    client_id: String,
    client_secret: String,
    database_url: String,
    clients: Vec<usize>,
    events: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        url: "http://127.0.0.1:8080".into(),
        client_id: String::new(),
        client_secret: String::new(),
        database_url: String::new(),
        clients: vec![1, 16, 64],
        events: 20_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value()?,
            "--client-id" => a.client_id = value()?,
            "--client-secret" => a.client_secret = value()?,
            "--database-url" => a.database_url = value()?,
            "--clients" => a.clients = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--events" => a.events = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let host = url::Url::parse(&a.url)?.host_str().unwrap_or_default().to_owned();
    ensure!(host.starts_with("127.") || host == "[::1]" || host == "localhost", "--url must be a loopback address");
    ensure!(a.events <= 1_000_000, "--events is capped at 1,000,000 per level");
    ensure!(!a.client_id.is_empty() && !a.database_url.is_empty(), "--client-id and --database-url are required");
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let max_clients = a.clients.iter().copied().max().unwrap_or(1);
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(max_clients)
        .timeout(Duration::from_secs(30))
        .build()?;
    let token: Value = http
        .post(format!("{}/token", a.url))
        .basic_auth(&a.client_id, Some(&a.client_secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = token["access_token"].as_str().context("no access_token")?.to_owned();
    let db = sqlx::PgPool::connect(&a.database_url).await?;

    println!("| clients | events | seconds | events/s | p50 ms | p99 ms | max ms | stored |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &clients in &a.clients {
        let before: i64 = sqlx::query_scalar("select count(*) from event_queue").fetch_one(&db).await?;
        // Warm the connections up (not measured).
        level(&http, &a.url, &token, clients, clients * 4).await?;
        let warm: i64 = sqlx::query_scalar("select count(*) from event_queue").fetch_one(&db).await?;
        let started = Instant::now();
        let mut latencies = level(&http, &a.url, &token, clients, a.events).await?;
        let secs = started.elapsed().as_secs_f64();
        let after: i64 = sqlx::query_scalar("select count(*) from event_queue").fetch_one(&db).await?;
        let stored = after - warm;
        ensure!(stored == a.events as i64, "{} events answered 200 but {stored} stored", a.events);
        ensure!(warm - before == (clients * 4) as i64, "warm-up events missing");
        latencies.sort_unstable();
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
        println!(
            "| {clients} | {} | {secs:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {stored} |",
            a.events,
            a.events as f64 / secs,
            pct(0.50),
            pct(0.99),
            pct(1.0)
        );
    }
    Ok(())
}

/// `clients` tasks post `events` events between them; every answer must be 200.
async fn level(http: &reqwest::Client, url: &str, token: &str, clients: usize, events: usize) -> Result<Vec<Duration>> {
    let next = Arc::new(AtomicUsize::new(0));
    let endpoint = Arc::new(format!("{url}/callevent/v1/outofband/event"));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, endpoint, token, next) = (http.clone(), endpoint.clone(), token.to_owned(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= events {
                        return Ok::<_, anyhow::Error>(latencies);
                    }
                    let body = format!(
                        r#"{{"EventTime": "2026-11-02T10:{:02}:{:02}Z", "Metadata": {{"customerPhone": "555{n:07}", "agentId": "a{}", "n": {n}}}}}"#,
                        (n / 60) % 60,
                        n % 60,
                        n % 50
                    );
                    let t = Instant::now();
                    let resp = http.post(endpoint.as_str()).bearer_auth(&token).body(body).send().await?;
                    let status = resp.status();
                    resp.bytes().await?;
                    latencies.push(t.elapsed());
                    ensure!(status == reqwest::StatusCode::OK, "event {n} answered {status}");
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(events);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}
