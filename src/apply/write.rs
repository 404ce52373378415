//! Writing: the changed values, in heap order, by ctid.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::this_run::ThisRun;
use super::types::{Applied, Batch, Merged, NewValue, Written};

impl Written {
    /// Merges a batch with this run's decisions it was read without, and writes the values
    /// that changed.
    pub(super) async fn merge_and_write(
        &mut self,
        conn: &mut PgConnection,
        batch: Batch,
        this_run: &ThisRun,
    ) -> Result<()> {
        let merged = batch.merge(this_run);
        // Freeing what was read (hundreds of thousands of small allocations: 0.07-0.09 s per
        // batch in the 5M-call nightly) is left to another thread while the database writes. It
        // is over before the next merge: frees from another thread contend with that merge's
        // allocations for malloc's locks (two to five times slower merges, measured).
        let freed = std::thread::spawn(move || drop(batch));
        self.write(conn, merged).await?;
        let _ = freed.join();
        Ok(())
    }

    /// Writes a batch's merged values.
    pub(super) async fn write(&mut self, conn: &mut PgConnection, mut m: Merged) -> Result<()> {
        let step = std::time::Instant::now();
        self.applied.groups_updated += write_values(conn, "call_groups", &mut m.group_changes)
            .await
            .context("updating call_groups.async_metadata")?;
        self.applied.calls_updated +=
            write_values(conn, "calls", &mut m.call_changes).await.context("updating calls.async_metadata")?;
        tracing::debug!(elapsed_ms = step.elapsed().as_millis() as u64, "values written");
        self.contributing.append(&mut m.contributing);
        self.not_contributing.append(&mut m.not_contributing);
        Ok(())
    }

    /// Records which groups contribute, for the trigger: a group whose merged value is empty
    /// gives its calls nothing, so calls joining or leaving it change nothing.
    pub(super) async fn finish(self, conn: &mut PgConnection, started: std::time::Instant) -> Result<Applied> {
        sqlx::query("delete from contributing_groups where id = any($1)")
            .bind(self.not_contributing)
            .execute(&mut *conn)
            .await
            .context("recording contributing groups")?;
        sqlx::query("insert into contributing_groups select unnest($1::text[]) on conflict do nothing")
            .bind(self.contributing)
            .execute(&mut *conn)
            .await
            .context("recording contributing groups")?;
        let Applied { calls_updated, groups_updated } = self.applied;
        tracing::info!(calls_updated, groups_updated, elapsed_ms = started.elapsed().as_millis() as u64, "applied");
        Ok(self.applied)
    }
}

/// Writes the changes, in heap order, into `table.async_metadata`; returns the rows written.
///
/// Each row is found by its ctid (one heap access instead of a primary-key probe and then the
/// heap), checked against its id. A ctid names a row within one heap: on a `calls` partitioned
/// by `started_at` the same ctid is in every partition, so a call is also checked against the
/// `started_at` it was read with, which lets PostgreSQL probe only the partition that holds it
/// (run-time pruning: one heap access per row, not one per partition). A row a concurrent
/// transaction updated since it was read has moved (within its heap, or to another partition)
/// and is not found there: its chunk is then written again by id, skipping rows already right.
pub async fn write_values(conn: &mut PgConnection, table: &str, changes: &mut [NewValue]) -> Result<u64> {
    changes.sort_unstable_by_key(|c| c.tid);
    let mut written = 0;
    for chunk in changes.chunks(WRITE_CHUNK) {
        let ids: Vec<&str> = chunk.iter().map(|c| c.id.as_str()).collect();
        let tids: Vec<String> = chunk.iter().map(|c| format!("({},{})", c.tid.0, c.tid.1)).collect();
        let starts: Vec<Option<DateTime<Utc>>> = chunk.iter().map(|c| c.start).collect();
        let values: Vec<&str> = chunk.iter().map(|c| c.value.as_str()).collect();
        // `table` is one of our two constants.
        let partition_key = if table == "calls" { " and t.started_at = u.s" } else { "" };
        let by_tid = format!(
            "update {table} t set async_metadata = u.v::jsonb
             from unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) u(id, tid, v, s)
             where t.ctid = u.tid::tid and t.id = u.id{partition_key}"
        );
        let statement = sqlx::query(sqlx::AssertSqlSafe(by_tid)).bind(&ids).bind(&tids).bind(&values).bind(&starts);
        let mut done = crate::db::with_index_probes(conn, statement).await?;
        if done < chunk.len() as u64 {
            tracing::debug!(table, moved = chunk.len() as u64 - done, "rows moved since read; writing by id");
            let by_id = format!(
                "update {table} t set async_metadata = u.v::jsonb
                 from unnest($1::text[], $2::text[]) u(id, v)
                 where t.id = u.id and t.async_metadata is distinct from u.v::jsonb"
            );
            let statement = sqlx::query(sqlx::AssertSqlSafe(by_id)).bind(&ids).bind(&values);
            done += crate::db::with_index_probes(conn, statement).await?;
        }
        written += done;
    }
    Ok(written)
}

/// Rows written per statement.
const WRITE_CHUNK: usize = 10_000;
