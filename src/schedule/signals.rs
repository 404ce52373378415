//! The scheduler's stop signals: the first SIGTERM or SIGINT takes no new runs, a second rolls
//! back the running ones.

use anyhow::{Context, Result};
use tokio::sync::watch;

/// Counts SIGTERM/SIGINT: 1 = take no new runs, let running ones finish; 2 = roll them back.
pub(super) fn watch_signals() -> Result<watch::Receiver<u32>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            let n = *tx.borrow() + 1;
            if n == 1 {
                tracing::info!(
                    signal = name,
                    "stopping: no new runs; running ones finish (send the signal again to roll them back)"
                );
            } else {
                tracing::warn!(signal = name, "stopping now: running runs are rolled back");
            }
            tx.send_replace(n);
        }
    });
    Ok(rx)
}

/// Resolves once `n` signals have come (never, should the signal watcher be gone).
pub(super) async fn signalled(stop: &mut watch::Receiver<u32>, n: u32) {
    if stop.wait_for(|count| *count >= n).await.is_err() {
        std::future::pending::<()>().await;
    }
}
