//! How the metrics leave the process: [`Endpoint`] (`/metrics`, `/healthz`) and
//! [`write_textfile`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;

use super::queue::QueueGauges;
use super::run_metrics::RunMetrics;
use super::{CONTENT_TYPE, Ended, encode, register_build_info};

/// `callrecon run --metrics-file PATH`: the run's gauges and the job's state, in the Prometheus
/// text format, written to a temporary file beside PATH and renamed over it (a collector never
/// reads half a file). The database state is left out when the database cannot be read.
pub async fn write_textfile(path: &Path, job_name: &str, ended: &Ended<'_>, pool: Option<&PgPool>) -> Result<()> {
    let mut registry = Registry::default();
    register_build_info(&mut registry);
    let runs = RunMetrics::register(&mut registry, false);
    runs.record(job_name, "run", ended);
    if let Some(pool) = pool {
        let queue = QueueGauges::register(&mut registry);
        let read = async {
            runs.refresh(pool, &[job_name.to_owned()]).await?;
            queue.refresh(pool).await
        };
        if let Err(e) = read.await {
            tracing::warn!(error = %crate::db::error_line(&e), "the metrics file leaves out the job's backlog");
        }
    }
    let name = path.file_name().with_context(|| format!("--metrics-file {}: not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    std::fs::write(&tmp, encode(&registry)).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming {} to {}", tmp.display(), path.display())
    })?;
    Ok(())
}

/// `callrecon schedule --metrics-listen ADDR`: `/metrics` and `/healthz`, answering from the
/// moment the scheduler starts (before the database is reached).
#[derive(Clone)]
pub struct Endpoint {
    registry: Arc<Registry>,
    pub runs: RunMetrics,
    queue: QueueGauges,
    /// Set once the scheduler has its pool.
    pub pool: Arc<OnceLock<PgPool>>,
    jobs: Arc<Vec<String>>,
}

impl Endpoint {
    pub fn new(jobs: Vec<String>) -> Endpoint {
        let mut registry = Registry::default();
        register_build_info(&mut registry);
        let runs = RunMetrics::register(&mut registry, true);
        let queue = QueueGauges::register(&mut registry);
        Endpoint { registry: Arc::new(registry), runs, queue, pool: Arc::default(), jobs: Arc::new(jobs) }
    }

    /// Binds `addr` (port 0: a free port) and serves (every wait on a client bounded, as
    /// `serve`'s) until `stop` completes; returns the address and the serving task, which ends
    /// within a few seconds of `stop`.
    pub async fn listen(
        self,
        addr: SocketAddr,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        crate::http::raise_open_file_limit();
        let listener =
            TcpListener::bind(addr).await.with_context(|| format!("--metrics-listen: cannot listen on {addr}"))?;
        let bound = listener.local_addr()?;
        let app = Router::new().route("/metrics", get(scrape)).route("/healthz", get(healthz)).with_state(self);
        let task = tokio::spawn(async move {
            if let Err(e) = crate::http::serve(listener, app, crate::http::Limits::METRICS, stop).await {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        });
        Ok((bound, task))
    }
}

async fn scrape(State(e): State<Endpoint>) -> Response {
    if let Some(pool) = e.pool.get() {
        let read = async {
            e.runs.refresh(pool, &e.jobs).await?;
            e.queue.refresh(pool).await
        };
        if let Err(err) = read.await {
            // The values read last are served; /healthz says the database is not answering.
            tracing::warn!(error = %crate::db::error_line(&err), "metrics: the database could not be read");
        }
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], encode(&e.registry)).into_response()
}

/// 200 while the database answers; 503 while it does not (or is not reached yet). The
/// scheduler itself keeps retrying: a readiness signal, not a reason to restart it.
async fn healthz(State(e): State<Endpoint>) -> Response {
    let unavailable = |message: String| {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "unavailable", "message": message})))
            .into_response()
    };
    let Some(pool) = e.pool.get() else { return unavailable("connecting to the database".to_owned()) };
    let ping = async { sqlx::query_scalar::<_, i32>("select 1").fetch_one(&mut *crate::db::begin(pool).await?).await };
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => axum::Json(json!({"status": "ok", "jobs": e.jobs.as_slice()})).into_response(),
        Ok(Err(err)) => unavailable(format!("database: {err}")),
        Err(_) => unavailable("database: no answer within 2s".to_owned()),
    }
}
