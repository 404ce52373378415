//! Load generator for `callrecon serve` (run by `scripts/bench-serve.sh`): for each number of
//! concurrent clients, posts a fixed number of events over HTTP/1.1 keep-alive and reports
//! events/s and latency percentiles; then checks on `event_queue` that every 200 was stored.
//!
//! With `--token-flood THREADS`, instead: a genuine client asks `POST /token` for a token
//! `--events` times in a row (from 127.0.0.1) while THREADS tasks flood the endpoint with wrong
//! secrets, and the genuine requests' latency is reported per kind of flood: none; wrong secrets
//! for the genuine client's id from another address (127.0.0.2); wrong secrets for made-up ids
//! from THREADS addresses (127.0.1.x); wrong secrets from the genuine client's own address.
//!
//! Loopback only: the URL must point at 127.0.0.0/8 or [::1], and the request count is bounded
//! (a flood lasts as long as its genuine requests, at most five minutes).
//!
//! ```sh
//! cargo run --release --example serve_load -- --url http://127.0.0.1:8080 \
//!     --client-id cr-... --client-secret ... --database-url postgres://... --clients 1,16,64 --events 20000
//! cargo run --release --example serve_load -- --url http://127.0.0.1:8080 \
//!     --client-id cr-... --client-secret ... --database-url postgres://... --token-flood 32 --events 300
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
    token_flood: Option<usize>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        url: "http://127.0.0.1:8080".into(),
        client_id: String::new(),
        client_secret: String::new(),
        database_url: String::new(),
        clients: vec![1, 16, 64],
        events: 20_000,
        token_flood: None,
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
            "--token-flood" => a.token_flood = Some(value()?.parse()?),
            other => bail!("unknown argument {other}"),
        }
    }
    let host = url::Url::parse(&a.url)?.host_str().unwrap_or_default().to_owned();
    ensure!(host.starts_with("127.") || host == "[::1]" || host == "localhost", "--url must be a loopback address");
    ensure!(a.events <= 1_000_000, "--events is capped at 1,000,000 per level");
    ensure!(!a.client_id.is_empty() && !a.database_url.is_empty(), "--client-id and --database-url are required");
    ensure!(a.token_flood.is_none_or(|t| (1..=200).contains(&t)), "--token-flood takes 1 to 200 threads");
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    if let Some(threads) = a.token_flood {
        return token_flood(&a, threads).await;
    }
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

/// A client whose connections come from `ip` (any of 127.0.0.0/8 on loopback).
fn client_from(ip: &str) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .local_address(ip.parse::<std::net::IpAddr>()?)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// Who floods `/token`, and as whom.
#[derive(Clone, Copy)]
enum Flood {
    None,
    /// Wrong secrets for the genuine client's id, from 127.0.0.2.
    SameId,
    /// Wrong secrets for made-up ids, each task from an address of its own (127.0.1.x).
    ManyAddresses,
    /// Wrong secrets for made-up ids from the genuine client's own address.
    SameAddress,
}

/// The genuine client's `/token` latency under each kind of flood.
async fn token_flood(a: &Args, threads: usize) -> Result<()> {
    let genuine = client_from("127.0.0.1")?;
    // The genuine client has had a token from its address before (as any client in service).
    let first = genuine
        .post(format!("{}/token", a.url))
        .basic_auth(&a.client_id, Some(&a.client_secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await?;
    ensure!(first.status() == reqwest::StatusCode::OK, "the genuine client's first token: {}", first.status());
    println!(
        "| flood ({threads} tasks) | genuine requests | p50 ms | p99 ms | max ms | genuine not 200 | flood requests/s | flood 401 / 429 / 503 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    let floods = [
        (Flood::None, "none"),
        (Flood::SameId, "wrong secrets for the genuine client's id, from another address"),
        (Flood::ManyAddresses, "wrong secrets for made-up ids, one address per task"),
        (Flood::SameAddress, "wrong secrets for made-up ids, from the genuine client's address"),
    ];
    for (n, (flood, label)) in floods.into_iter().enumerate() {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
        let tasks: Vec<_> = match flood {
            Flood::None => Vec::new(),
            _ => (0..threads)
                .map(|t| {
                    let ip = match flood {
                        Flood::SameId => "127.0.0.2".to_owned(),
                        Flood::ManyAddresses => format!("127.0.{}.{}", 1 + n, 1 + t),
                        _ => "127.0.0.1".to_owned(),
                    };
                    let id = match flood {
                        Flood::SameId => a.client_id.clone(),
                        _ => format!("cr-flood-{t}"),
                    };
                    let (url, stop, counts) = (a.url.clone(), stop.clone(), counts.clone());
                    tokio::spawn(async move {
                        let http = client_from(&ip)?;
                        let started = Instant::now();
                        let mut i = 0u64;
                        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300) {
                            i += 1;
                            let resp = http
                                .post(format!("{url}/token"))
                                .basic_auth(&id, Some(format!("wrong-{i}")))
                                .form(&[("grant_type", "client_credentials")])
                                .send()
                                .await;
                            let slot = match resp.map(|r| r.status().as_u16()) {
                                Ok(401) => 0,
                                Ok(429) => 1,
                                Ok(503) => 2,
                                _ => 3,
                            };
                            counts[slot].fetch_add(1, Ordering::Relaxed);
                        }
                        Ok::<_, anyhow::Error>(())
                    })
                })
                .collect(),
        };
        // Let the flood reach its steady state (its free wrong secrets spent).
        if !tasks.is_empty() {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let flood_started = Instant::now();
        let flood_before: usize = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let mut latencies = Vec::with_capacity(a.events);
        let mut refused = 0;
        for _ in 0..a.events.min(2_000) {
            let t = Instant::now();
            let resp = genuine
                .post(format!("{}/token", a.url))
                .basic_auth(&a.client_id, Some(&a.client_secret))
                .form(&[("grant_type", "client_credentials")])
                .send()
                .await?;
            let ok = resp.status() == reqwest::StatusCode::OK;
            resp.bytes().await?;
            latencies.push(t.elapsed());
            refused += usize::from(!ok);
        }
        let flood_secs = flood_started.elapsed().as_secs_f64();
        let flood_during: usize = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum::<usize>() - flood_before;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await??;
        }
        latencies.sort_unstable();
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
        let c = |i: usize| counts[i].load(Ordering::Relaxed);
        println!(
            "| {label} | {} | {:.1} | {:.1} | {:.1} | {refused} | {:.0} | {} / {} / {} |",
            latencies.len(),
            pct(0.5),
            pct(0.99),
            pct(1.0),
            flood_during as f64 / flood_secs,
            c(0),
            c(1),
            c(2)
        );
        // The waits of this flood's addresses and names must not leak into the next.
        if !matches!(flood, Flood::None) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    Ok(())
}
