//! [`QueueGauges`]: `event_queue`'s depth and oldest entry, read when scraped.

use anyhow::{Context, Result};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::PgPool;

use super::{GaugeF64, timed};

/// `event_queue`: how many events wait on it and how long the oldest has waited.
#[derive(Clone, Default)]
pub struct QueueGauges {
    events: Gauge,
    oldest_age: GaugeF64,
}

impl QueueGauges {
    pub fn register(registry: &mut Registry) -> QueueGauges {
        let q = QueueGauges::default();
        registry.register(
            "callrecon_event_queue_events",
            "Events waiting on event_queue for the next run (read when scraped)",
            q.events.clone(),
        );
        registry.register(
            "callrecon_event_queue_oldest_age_seconds",
            "Age of the oldest event on event_queue by its received_at; 0 when the queue is empty",
            q.oldest_age.clone(),
        );
        q
    }

    /// Reads the queue (one statement, index-free: `count(*)` and `min(received_at)`).
    pub async fn refresh(&self, pool: &PgPool) -> Result<()> {
        let (n, age): (i64, Option<f64>) = timed(async {
            sqlx::query_as("select count(*), extract(epoch from now() - min(received_at))::float8 from event_queue")
                .fetch_one(&mut *crate::db::begin(pool).await?)
                .await
        })
        .await
        .context("reading event_queue's depth")?;
        self.events.set(n);
        self.oldest_age.set(age.unwrap_or(0.0).max(0.0));
        Ok(())
    }
}
