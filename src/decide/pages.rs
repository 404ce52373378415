//! The stored events in a decide stage's scope, a page at a time, with what matching needs read
//! ahead: a rematch reads each next page on another connection while the page before it is
//! matched (PostgreSQL extracts its keys while polars matches).

use anyhow::{Context, Result};
use sqlx::{PgConnection, PgPool};

use crate::db::AbortOnDrop;
use crate::job::Job;
use crate::ledger::{InScope, Scope, ToDecide};
use crate::matching::{self, Ahead, Reads};

/// A page of events and what was read ahead for it.
pub(super) struct Page {
    pub events: Vec<ToDecide<'static>>,
    pub ahead: Ahead,
}

/// What the task reading the next page hands back: the scope's reader, and the page.
type Reading = (InScope, Result<Page>);

/// Reads a scope a page at a time (see the module's comment).
pub(super) struct Pages<'a> {
    pool: &'a PgPool,
    job: &'a Job,
    chunk_events: usize,
    size: usize,
    /// The scope's reader, while no task is reading the next page with it.
    scope: Option<InScope>,
    reading: Option<AbortOnDrop<Reading>>,
    /// The last page was short: there is no next one.
    done: bool,
}

impl<'a> Pages<'a> {
    /// Opens `scope` and reads its first page. A rematch reads it on another connection while
    /// the run's connection reads the calls for the page's first chunk, whose span the time
    /// index tells: every event of a rematch's scope is sessionless (and `decide` checks the
    /// span).
    pub async fn open(conn: &mut PgConnection, reads: Reads<'a>, scope: Scope, size: usize) -> Result<(Self, Page)> {
        let mut in_scope = InScope::open(conn, reads.job, scope).await?;
        let first = match in_scope.next_span(conn, reads.chunk_events).await? {
            Some(span) => {
                let first_page = async {
                    let mut other = crate::db::begin(reads.pool).await.context("connecting to read the events")?;
                    in_scope.next(&mut other, size).await
                };
                let calls = matching::calls_ahead(conn, reads, span);
                let (events, calls) = tokio::try_join!(first_page, calls)?;
                Page { events, ahead: Ahead { calls: Some(calls), ..Default::default() } }
            }
            None => Page { events: in_scope.next(conn, size).await?, ahead: Ahead::default() },
        };
        let pages = Pages {
            pool: reads.pool,
            job: reads.job,
            chunk_events: reads.chunk_events,
            size,
            scope: Some(in_scope),
            reading: None,
            done: false,
        };
        Ok((pages, first))
    }

    /// Starts reading the page after `page` on another connection, when there is one and the
    /// scope reads the database page by page. `page.ahead.next_page` then hears the span of its
    /// first chunk (unheard when it has no sessionless events; unsent on an error, which
    /// [`Pages::next`] returns), so that matching reads that chunk's calls while it matches
    /// `page`'s last chunk. After the page, its call groups are read too, which its first chunk
    /// would otherwise wait for. Its events are not `page`'s, the only ones the run writes before
    /// it reads them, so it reads what the run's connection would.
    pub fn read_ahead(&mut self, page: &mut Page) {
        if page.events.len() < self.size {
            self.done = true;
            return;
        }
        let Some(mut scope) = self.scope.take_if(|s| s.reads_database()) else { return };
        let (pool, job, chunk_events, size) = (self.pool.clone(), self.job.clone(), self.chunk_events, self.size);
        let (span, spanned) = tokio::sync::oneshot::channel();
        page.ahead.next_page = Some(spanned);
        self.reading = Some(AbortOnDrop(tokio::spawn(async move {
            let next = async {
                let mut other = crate::db::begin(&pool).await.context("connecting to read the next events")?;
                let _ = span.send(scope.next_span(&mut other, chunk_events).await?);
                let events = scope.next(&mut other, size).await?;
                let groups = matching::groups_for(&mut other, &job, &events).await?;
                anyhow::Ok(Page { events, ahead: Ahead { groups: Some(groups), ..Default::default() } })
            };
            let next = next.await;
            (scope, next)
        })));
    }

    /// The next page: the one read ahead, or read now on `conn`; empty after the last.
    pub async fn next(&mut self, conn: &mut PgConnection) -> Result<Page> {
        if self.done {
            return Ok(Page { events: Vec::new(), ahead: Ahead::default() });
        }
        match self.reading.take() {
            Some(mut task) => {
                let (scope, next) = (&mut task.0).await.context("reading the next events")?;
                self.scope = Some(scope);
                next
            }
            None => {
                let scope = self.scope.as_mut().expect("kept when not read ahead");
                Ok(Page { events: scope.next(conn, self.size).await?, ahead: Ahead::default() })
            }
        }
    }
}
