//! The intake API's metrics, served at `/metrics`: requests by route and status, their latency,
//! group-commit batch sizes, tokens issued, wrong secrets and throttled requests, and
//! `event_queue` (read when scraped).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sqlx::PgPool;

use crate::metrics::{self, Histograms, Labels, QueueGauges};

/// Latency of a request: a posted event waits for its commit (milliseconds), a token for argon2
/// (tens of milliseconds).
fn latency_histogram() -> Histogram {
    Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

#[derive(Clone)]
pub struct IntakeMetrics {
    registry: std::sync::Arc<Registry>,
    requests: Family<Labels, Counter>,
    latency: Histograms,
    /// Events per group-commit transaction.
    pub batch_events: Histogram,
    pub tokens_issued: Counter,
    /// Wrong secrets, requests throttled and refused (token endpoint and desk sign-in).
    pub auth: super::throttle::AuthMetrics,
    queue: QueueGauges,
}

impl IntakeMetrics {
    pub fn new() -> IntakeMetrics {
        let mut registry = Registry::default();
        metrics::register_build_info(&mut registry);
        let requests: Family<Labels, Counter> = Family::default();
        let latency: Histograms = Family::new_with_constructor(latency_histogram);
        let batch_events = Histogram::new((0..11).map(|i| f64::from(1u32 << i)));
        let tokens_issued = Counter::default();
        registry.register(
            "callrecon_http_requests",
            "Requests to the intake API by route (the path template; `unmatched` for unknown paths) and status code",
            requests.clone(),
        );
        registry.register(
            "callrecon_http_request_duration_seconds",
            "Time from a request's arrival to its answer, by route",
            latency.clone(),
        );
        registry.register(
            "callrecon_intake_batch_events",
            "Events stored per group-commit transaction",
            batch_events.clone(),
        );
        registry.register(
            "callrecon_intake_tokens_issued",
            "Access tokens issued by POST /token",
            tokens_issued.clone(),
        );
        let auth = super::throttle::AuthMetrics::register(&mut registry);
        let queue = QueueGauges::register(&mut registry);
        IntakeMetrics {
            registry: std::sync::Arc::new(registry),
            requests,
            latency,
            batch_events,
            tokens_issued,
            auth,
            queue,
        }
    }

    /// `GET /metrics`: the counters, and `event_queue` as it is now.
    pub async fn scrape(&self, pool: &PgPool) -> Response {
        if let Err(e) = self.queue.refresh(pool).await {
            tracing::warn!(error = %crate::db::error_line(&e), "metrics: event_queue could not be read");
        }
        ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], metrics::encode(&self.registry)).into_response()
    }
}

impl Default for IntakeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Middleware: counts every request by route and status and times it.
pub async fn track(State(m): State<IntakeMetrics>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    m.requests.get_or_create(&vec![("route", route.clone()), ("status", status)]).inc();
    m.latency.get_or_create(&vec![("route", route)]).observe(started.elapsed().as_secs_f64());
    response
}
