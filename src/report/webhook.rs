//! `[report] webhook`: POST each run's summary as JSON. A failed notification is logged and
//! recorded on the run; it never fails the run.

use std::time::Duration;

use serde_json::json;

use super::types::Report;
use crate::decision::RunKind;

/// Attempts per notification, and the wait before each retry.
pub const BACKOFF: &[Duration] = &[Duration::from_secs(1), Duration::from_secs(2)];
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The JSON body of a notification.
pub fn payload(report: &Report, report_dir: &std::path::Path) -> serde_json::Value {
    json!({
        "run_id": report.run_id.to_string(),
        "job": report.job,
        "kind": report.kind,
        "dry_run": report.dry_run,
        "status": "succeeded",
        "started_at": report.started_at,
        "finished_at": report.finished_at,
        "summary": report.summary,
        "report": report_dir.join("report.html"),
    })
}

/// The body for a run that failed: what an on-call person needs first.
pub fn failure_payload(run_id: i64, job: &str, kind: RunKind, dry_run: bool, error: &str) -> serde_json::Value {
    json!({ "run_id": run_id.to_string(), "job": job, "kind": kind, "dry_run": dry_run, "status": "failed", "error": error })
}

/// Sends the notification, retrying server errors and transport failures; returns `Ok` once
/// delivered, or the last error.
pub async fn notify(url: &url::Url, body: &serde_json::Value) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .user_agent(concat!("callrecon/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;
    let mut waits = BACKOFF.iter();
    loop {
        let error = match client.post(url.clone()).json(body).send().await {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            // A client error will not get better by retrying.
            Ok(resp) if resp.status().is_client_error() => return Err(format!("{url} answered {}", resp.status())),
            Ok(resp) => format!("{url} answered {}", resp.status()),
            Err(e) => format!("POST {url}: {e}"),
        };
        match waits.next() {
            Some(wait) => {
                tracing::warn!(%error, retry_in = ?wait, "webhook notification failed");
                tokio::time::sleep(*wait).await;
            }
            None => return Err(error),
        }
    }
}
