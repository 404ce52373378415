//! Group commit: requests hand their event to the writer and wait; the writer stores every
//! submission waiting at that moment in one transaction, then answers each of them.
//!
//! There is no fixed delay: a batch is whatever arrived while the previous transactions were
//! committing, so one client pays one commit per event and many clients share commits. Up to
//! `writers` transactions are in flight at once. The token check happens in the same transaction
//! as the insert (a revoked user's token stops working for the next batch), and an
//! `Idempotency-Key` is recorded in that transaction too: the key exists exactly when its event
//! was stored.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::event::Invalid;
use crate::users::ROLE_ASYNC_METADATA;

/// One posted event, checked as far as it can be without the database.
#[derive(Debug)]
pub struct Submission {
    pub token_sha256: [u8; 32],
    pub idempotency_key: Option<String>,
    /// The body as posted (valid JSON), stored as is: the run parses it in the job's time zone.
    pub body: String,
    pub body_sha256: [u8; 32],
    /// What `event::parse` said of it; an invalid event is answered 400 once the caller is known.
    pub check: Result<(), Invalid>,
}

/// How a submission ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Committed on `event_queue` with this id (`replayed`: by an earlier request with the same
    /// `Idempotency-Key`).
    Stored {
        queue_id: i64,
        replayed: bool,
    },
    /// Unknown, expired or revoked token.
    Unauthorized,
    /// The user lacks the role.
    Forbidden {
        user: String,
    },
    Invalid(Invalid),
    /// The `Idempotency-Key` was used before with a different body.
    KeyReused,
    /// The transaction failed: nothing of the batch was stored.
    Failed,
}

type Item = (Submission, oneshot::Sender<Verdict>);

/// The requests' side of the writer; when every clone is dropped, the writer finishes the
/// batches it holds and stops.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Item>,
}

impl Writer {
    /// Hands the event to the writer and waits for its outcome.
    pub async fn submit(&self, submission: Submission) -> Verdict {
        let (answer, outcome) = oneshot::channel();
        if self.tx.send((submission, answer)).await.is_err() {
            return Verdict::Failed;
        }
        outcome.await.unwrap_or(Verdict::Failed)
    }
}

/// Starts the writer. The returned task ends once every [`Writer`] is dropped and every
/// submission received has been answered.
pub async fn start(
    pool: PgPool,
    max_batch: usize,
    writers: u32,
    batch_sizes: Histogram,
) -> Result<(Writer, tokio::task::JoinHandle<()>)> {
    let sequence: Option<String> = sqlx::query_scalar("select pg_get_serial_sequence('event_queue', 'id')")
        .fetch_one(&mut *crate::db::begin(&pool).await?)
        .await
        .context("finding the id sequence of event_queue")?;
    let sequence = sequence.context("event_queue.id has no sequence (expected bigserial)")?;
    let max_batch = max_batch.max(1);
    let (tx, rx) = mpsc::channel(max_batch * writers as usize * 2);
    let task = tokio::spawn(dispatch(pool, Arc::new(sequence), rx, max_batch, writers as usize, batch_sizes));
    Ok((Writer { tx }, task))
}

async fn dispatch(
    pool: PgPool,
    sequence: Arc<String>,
    mut rx: mpsc::Receiver<Item>,
    max_batch: usize,
    writers: usize,
    batch_sizes: Histogram,
) {
    let slots = Arc::new(Semaphore::new(writers));
    let mut in_flight = JoinSet::new();
    loop {
        let permit = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let Some(first) = rx.recv().await else { break };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        batch_sizes.observe(batch.len() as f64);
        let pool = pool.clone();
        let sequence = sequence.clone();
        in_flight.spawn(async move {
            write_batch(&pool, &sequence, batch).await;
            drop(permit);
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
}

async fn write_batch(pool: &PgPool, sequence: &str, batch: Vec<Item>) {
    let started = Instant::now();
    let n = batch.len();
    let (submissions, mut answers): (Vec<Submission>, Vec<Option<oneshot::Sender<Verdict>>>) =
        batch.into_iter().map(|(s, a)| (s, Some(a))).unzip();
    fn answer(answers: &mut [Option<oneshot::Sender<Verdict>>], i: usize, outcome: Verdict) {
        if let Some(a) = answers[i].take() {
            // The client may have gone away; what was stored stays stored.
            let _ = a.send(outcome);
        }
    }
    match store(pool, sequence, &submissions, &mut |i, o| answer(&mut answers, i, o)).await {
        Ok(outcomes) => {
            let stored = outcomes.iter().filter(|o| matches!(o, Verdict::Stored { replayed: false, .. })).count();
            for (i, o) in outcomes.into_iter().enumerate() {
                answer(&mut answers, i, o);
            }
            tracing::debug!(n, stored, ms = started.elapsed().as_secs_f64() * 1e3, "batch committed");
        }
        Err(e) if n == 1 => {
            tracing::error!(
                error = crate::db::error_line(&e),
                "storing an event failed; answering 500, nothing stored"
            );
            answer(&mut answers, 0, Verdict::Failed);
        }
        Err(e) => {
            // One submission the database refuses must not fail the others: each one still
            // waiting is stored again in a transaction of its own.
            tracing::warn!(
                n,
                error = crate::db::error_line(&e),
                "storing a batch of events failed; storing them one by one"
            );
            for (i, sub) in submissions.iter().enumerate() {
                if answers[i].is_none() {
                    continue;
                }
                let alone =
                    store(pool, sequence, std::slice::from_ref(sub), &mut |_, o| answer(&mut answers, i, o)).await;
                let outcome = match alone {
                    Ok(mut outcomes) => outcomes.pop().unwrap_or(Verdict::Failed),
                    Err(e) => {
                        tracing::error!(
                            error = crate::db::error_line(&e),
                            "storing an event failed; answering 500, nothing stored"
                        );
                        Verdict::Failed
                    }
                };
                answer(&mut answers, i, outcome);
            }
        }
    }
}

/// One transaction for the batch. Submissions that fail before the insert (token, role, event)
/// are answered through `early` as soon as that is known; the outcomes of the others are
/// returned once the transaction has committed.
async fn store(
    pool: &PgPool,
    sequence: &str,
    subs: &[Submission],
    early: &mut impl FnMut(usize, Verdict),
) -> Result<Vec<Verdict>> {
    let mut tx = crate::db::begin(pool).await.context("starting a transaction")?;

    // Who is asking: the distinct tokens of the batch, in one query.
    let mut tokens: Vec<&[u8]> = subs.iter().map(|s| &s.token_sha256[..]).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let holders: Vec<(Vec<u8>, i64, String, bool)> = sqlx::query_as(
        "select t.token_sha256, u.id, u.name, $2 = any(u.roles)
         from api_tokens t join api_users u on u.id = t.user_id
         where t.token_sha256 = any($1) and t.expires_at > now() and u.revoked_at is null",
    )
    .bind(&tokens)
    .bind(ROLE_ASYNC_METADATA)
    .fetch_all(&mut *tx)
    .await
    .context("checking tokens")?;
    let holders: HashMap<Vec<u8>, (i64, String, bool)> =
        holders.into_iter().map(|(t, id, name, role)| (t, (id, name, role))).collect();

    let mut outcomes: Vec<Option<Verdict>> = vec![None; subs.len()];
    // Submissions to store, by index; the first of each (user, key) leads the others.
    let mut to_store = Vec::new();
    let mut leaders: HashMap<(i64, &str), usize> = HashMap::new();
    let mut followers = Vec::new();
    for (i, s) in subs.iter().enumerate() {
        let user = match holders.get(&s.token_sha256[..]) {
            None => Some(Verdict::Unauthorized),
            Some((_, name, false)) => Some(Verdict::Forbidden { user: name.clone() }),
            Some(_) if s.check.is_err() => Some(Verdict::Invalid(s.check.clone().unwrap_err())),
            Some((id, _, true)) => {
                match s.idempotency_key.as_deref() {
                    Some(key) => match leaders.get(&(*id, key)) {
                        Some(&leader) => followers.push((i, leader)),
                        None => {
                            leaders.insert((*id, key), i);
                            to_store.push((i, Some(*id)));
                        }
                    },
                    None => to_store.push((i, None)),
                }
                None
            }
        };
        if let Some(o) = user {
            early(i, o.clone());
            outcomes[i] = Some(o);
        }
    }
    if to_store.is_empty() {
        tx.rollback().await.ok();
        return Ok(outcomes.into_iter().map(|o| o.unwrap_or(Verdict::Failed)).collect());
    }

    // Insert first (one statement, ids in the order of `to_store`); a retried key below takes
    // its row out again before anyone can see it.
    let bodies: Vec<&str> = to_store.iter().map(|(i, _)| subs[*i].body.as_str()).collect();
    let inserted: Vec<(i64, i64)> = sqlx::query_as(
        "with rows as materialized (
             select ord, nextval($2::regclass) as id, p from unnest($1::text[]) with ordinality as u(p, ord)),
         ins as (insert into event_queue (id, payload) select id, p::jsonb from rows)
         select ord, id from rows",
    )
    .bind(&bodies)
    .bind(sequence)
    .fetch_all(&mut *tx)
    .await
    .context("inserting into event_queue")?;
    ensure!(inserted.len() == to_store.len(), "inserted {} of {} events", inserted.len(), to_store.len());
    let mut queue_id: HashMap<usize, i64> =
        inserted.into_iter().map(|(ord, id)| (to_store[ord as usize - 1].0, id)).collect();

    // Claim the keys; a key claimed before (or by a concurrent batch, which we wait for) is a
    // retry: answer as the first time, store nothing.
    let mut keyed: Vec<(i64, &str, &[u8], i64, usize)> = to_store
        .iter()
        .filter_map(|&(i, user)| {
            let key = subs[i].idempotency_key.as_deref()?;
            Some((user?, key, &subs[i].body_sha256[..], queue_id[&i], i))
        })
        .collect();
    if !keyed.is_empty() {
        // A fixed order of locks: concurrent batches claiming the same keys cannot deadlock.
        keyed.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let claimed: Vec<(i64, String)> = sqlx::query_as(
            "insert into api_idempotency (user_id, key, body_sha256, queue_id)
             select * from unnest($1::bigint[], $2::text[], $3::bytea[], $4::bigint[])
             on conflict do nothing
             returning user_id, key",
        )
        .bind(keyed.iter().map(|k| k.0).collect::<Vec<_>>())
        .bind(keyed.iter().map(|k| k.1).collect::<Vec<_>>())
        .bind(keyed.iter().map(|k| k.2).collect::<Vec<_>>())
        .bind(keyed.iter().map(|k| k.3).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await
        .context("recording idempotency keys")?;
        let claimed: std::collections::HashSet<(i64, String)> = claimed.into_iter().collect();
        let retried: Vec<_> = keyed.iter().filter(|k| !claimed.contains(&(k.0, k.1.to_owned()))).collect();
        if !retried.is_empty() {
            let earlier: Vec<(i64, String, Vec<u8>, i64)> = sqlx::query_as(
                "select user_id, key, body_sha256, queue_id from api_idempotency
                 where (user_id, key) in (select * from unnest($1::bigint[], $2::text[]))",
            )
            .bind(retried.iter().map(|k| k.0).collect::<Vec<_>>())
            .bind(retried.iter().map(|k| k.1).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await
            .context("reading idempotency keys")?;
            let earlier: HashMap<(i64, &str), (&[u8], i64)> =
                earlier.iter().map(|(u, k, h, q)| ((*u, k.as_str()), (&h[..], *q))).collect();
            let mut withdrawn = Vec::new();
            for k in retried {
                let outcome = match earlier.get(&(k.0, k.1)) {
                    Some((hash, id)) if *hash == k.2 => Verdict::Stored { queue_id: *id, replayed: true },
                    Some(_) => Verdict::KeyReused,
                    // Forgotten just now (keys are kept 24 hours): store nothing; the client
                    // retries and the key is claimed afresh.
                    None => Verdict::Failed,
                };
                withdrawn.extend(queue_id.remove(&k.4));
                outcomes[k.4] = Some(outcome);
            }
            sqlx::query("delete from event_queue where id = any($1)")
                .bind(&withdrawn)
                .execute(&mut *tx)
                .await
                .context("withdrawing retried events")?;
        }
    }

    tx.commit().await.context("committing events")?;

    for (i, id) in queue_id {
        outcomes[i] = Some(Verdict::Stored { queue_id: id, replayed: false });
    }
    for (i, leader) in followers {
        let outcome = match &outcomes[leader] {
            Some(Verdict::Stored { queue_id, .. }) if subs[i].body_sha256 == subs[leader].body_sha256 => {
                Verdict::Stored { queue_id: *queue_id, replayed: true }
            }
            Some(Verdict::Stored { .. } | Verdict::KeyReused) => Verdict::KeyReused,
            other => other.clone().unwrap_or(Verdict::Failed),
        };
        outcomes[i] = Some(outcome);
    }
    Ok(outcomes.into_iter().map(|o| o.unwrap_or(Verdict::Failed)).collect())
}
