//! Group commit: requests hand their event to the writer and wait; the writer stores every
//! submission waiting at that moment in one transaction, then answers each of them.
//!
//! There is no fixed delay: a batch is whatever arrived while the previous transactions were
//! committing, so one client pays one commit per event and many clients share commits. Up to
//! `writers` transactions are in flight at once. The token check happens in the same transaction
//! as the insert (a revoked user's token stops working for the next batch), and an
//! `Idempotency-Key` is recorded in that transaction too: the key exists exactly when its event
//! was stored.
//!
//! Every submission has a deadline (`--request-timeout` after it arrived). A batch's statements
//! run under a statement and lock timeout ending at its earliest deadline, and it is rolled back
//! rather than committed once that has passed, so a stalled database answers
//! [`Verdict::TimedOut`] (503) with nothing stored. Only a COMMIT that itself stalls past the
//! deadline can store an event whose request was already answered 503: the writer remembers such
//! late commits for a while ([`LATE_KEPT`]), and the client's retry of the same body is answered
//! as the first request would have been, storing nothing again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use prometheus_client::metrics::histogram::Histogram;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::event::Invalid;
use crate::users::ROLE_ASYNC_METADATA;

/// How much longer than its deadline a request waits for the writer's answer: a COMMIT under
/// way is not interrupted.
const COMMIT_GRACE: Duration = Duration::from_secs(2);
/// How long an event committed after its request was answered 503 is remembered, so that its
/// retry is not stored twice.
pub const LATE_KEPT: Duration = Duration::from_secs(15 * 60);
/// A transaction in flight longer than this makes `/healthz` say the database is degraded.
const STALL: Duration = Duration::from_secs(1);
/// And for this long after a request timed out.
const STALL_REMEMBERED: Duration = Duration::from_secs(30);

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
    /// Committed by then, or answered [`Verdict::TimedOut`] with nothing stored.
    pub deadline: Instant,
}

/// How a submission ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Committed on `event_queue` with this id (`replayed`: by an earlier request with the same
    /// `Idempotency-Key`, or by a request answered 503 whose commit came late).
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
    /// The database did not commit it by its deadline: nothing was stored.
    TimedOut,
}

type Item = (Submission, oneshot::Sender<Verdict>);

/// The requests' side of the writer; when every clone is dropped, the writer finishes the
/// batches it holds and stops.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Item>,
    health: Arc<Health>,
}

impl Writer {
    /// Hands the event to the writer and waits for its outcome (past its deadline, a little
    /// longer should a COMMIT be under way).
    pub async fn submit(&self, submission: Submission) -> Verdict {
        let deadline = submission.deadline;
        let (answer, outcome) = oneshot::channel();
        match tokio::time::timeout_at(deadline, self.tx.send((submission, answer))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Verdict::Failed,
            Err(_) => return self.health.timed_out(),
        }
        match tokio::time::timeout_at(deadline + COMMIT_GRACE, outcome).await {
            Ok(Ok(Verdict::TimedOut)) | Err(_) => self.health.timed_out(),
            Ok(Ok(verdict)) => verdict,
            Ok(Err(_)) => Verdict::Failed,
        }
    }

    /// Why the database is slow to commit, if it is: a transaction in flight for more than a
    /// second, or a request that timed out in the last 30 seconds.
    pub fn stalled(&self) -> Option<String> {
        self.health.stalled()
    }
}

/// What `/healthz` reads of the writer.
#[derive(Default)]
struct Health {
    state: Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    /// Start of each transaction in flight, by a number of its own.
    batches: HashMap<u64, Instant>,
    next: u64,
    last_timeout: Option<Instant>,
}

impl Health {
    fn timed_out(&self) -> Verdict {
        self.state.lock().expect("not poisoned").last_timeout = Some(Instant::now());
        Verdict::TimedOut
    }

    fn batch(self: &Arc<Self>) -> InFlight {
        let mut s = self.state.lock().expect("not poisoned");
        s.next += 1;
        let id = s.next;
        s.batches.insert(id, Instant::now());
        InFlight { health: self.clone(), id }
    }

    fn stalled(&self) -> Option<String> {
        let s = self.state.lock().expect("not poisoned");
        if let Some(oldest) = s.batches.values().min().filter(|t| t.elapsed() > STALL) {
            return Some(format!("a commit has been waiting for {:.1} s", oldest.elapsed().as_secs_f64()));
        }
        s.last_timeout
            .filter(|t| t.elapsed() < STALL_REMEMBERED)
            .map(|t| format!("a request timed out waiting for its commit {:.0} s ago", t.elapsed().as_secs_f64()))
    }
}

/// A transaction in flight, until dropped.
struct InFlight {
    health: Arc<Health>,
    id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.health.state.lock().expect("not poisoned").batches.remove(&self.id);
    }
}

/// Events committed after their request was answered 503, by user and body, with when.
type Late = Mutex<HashMap<(i64, [u8; 32]), (i64, Instant)>>;

/// What every batch's task shares.
struct Shared {
    pool: PgPool,
    /// `event_queue`'s id sequence.
    sequence: String,
    health: Arc<Health>,
    late: Late,
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
    let health = Arc::new(Health::default());
    let shared = Arc::new(Shared { pool, sequence, health: health.clone(), late: Mutex::default() });
    let task = tokio::spawn(dispatch(shared, rx, max_batch, writers as usize, batch_sizes));
    Ok((Writer { tx, health }, task))
}

async fn dispatch(
    shared: Arc<Shared>,
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
        let shared = shared.clone();
        in_flight.spawn(async move {
            write_batch(&shared, batch).await;
            drop(permit);
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
}

/// The answers of a batch, each sent once.
struct Answers(Vec<Option<oneshot::Sender<Verdict>>>);

impl Answers {
    fn send(&mut self, i: usize, outcome: Verdict) {
        if let Some(a) = self.0[i].take() {
            // The client may have gone away; what was stored stays stored.
            let _ = a.send(outcome);
        }
    }

    fn waiting(&self, i: usize) -> bool {
        self.0[i].is_some()
    }

    /// Whether the request stopped waiting (it was answered 503 past its deadline).
    fn abandoned(&self, i: usize) -> bool {
        self.0[i].as_ref().is_some_and(oneshot::Sender::is_closed)
    }
}

async fn write_batch(shared: &Shared, batch: Vec<Item>) {
    let started = Instant::now();
    // Submissions that waited past their deadline for a free writer are not stored at all.
    let (batch, expired): (Vec<Item>, Vec<Item>) = batch.into_iter().partition(|(s, _)| s.deadline > started);
    for (_, answer) in expired {
        let _ = answer.send(Verdict::TimedOut);
    }
    let n = batch.len();
    if n == 0 {
        return;
    }
    let (submissions, answers): (Vec<Submission>, Vec<_>) = batch.into_iter().map(|(s, a)| (s, Some(a))).unzip();
    let mut answers = Answers(answers);
    let _in_flight = shared.health.batch();
    match store(shared, &submissions, &mut |i, o| answers.send(i, o)).await {
        Ok(committed) => {
            let stored =
                committed.outcomes.iter().filter(|o| matches!(o, Verdict::Stored { replayed: false, .. })).count();
            remember_late(shared, &submissions, &committed, |i| answers.abandoned(i));
            for (i, o) in committed.outcomes.into_iter().enumerate() {
                answers.send(i, o);
            }
            tracing::debug!(n, stored, ms = started.elapsed().as_secs_f64() * 1e3, "batch committed");
        }
        Err(e) if timed_out(&e) => {
            tracing::warn!(
                n,
                error = crate::db::error_line(&e),
                "the database did not store a batch of events in time; answering 503, nothing stored"
            );
            for i in 0..n {
                answers.send(i, Verdict::TimedOut);
            }
        }
        Err(e) if n == 1 => {
            tracing::error!(
                error = crate::db::error_line(&e),
                "storing an event failed; answering 500, nothing stored"
            );
            answers.send(0, Verdict::Failed);
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
                if answers.waiting(i) {
                    let outcome = store_alone(shared, sub, &mut answers, i).await;
                    answers.send(i, outcome);
                }
            }
        }
    }
}

async fn store_alone(shared: &Shared, sub: &Submission, answers: &mut Answers, i: usize) -> Verdict {
    match store(shared, std::slice::from_ref(sub), &mut |_, o| answers.send(i, o)).await {
        Ok(mut committed) => {
            remember_late(shared, std::slice::from_ref(sub), &committed, |_| answers.abandoned(i));
            committed.outcomes.pop().unwrap_or(Verdict::Failed)
        }
        Err(e) if timed_out(&e) => Verdict::TimedOut,
        Err(e) => {
            tracing::error!(
                error = crate::db::error_line(&e),
                "storing an event failed; answering 500, nothing stored"
            );
            Verdict::Failed
        }
    }
}

/// Events stored for requests that stopped waiting (answered 503 while the COMMIT stalled),
/// remembered so that their retries store nothing again.
fn remember_late(shared: &Shared, subs: &[Submission], committed: &Committed, abandoned: impl Fn(usize) -> bool) {
    let mut late = shared.late.lock().expect("not poisoned");
    late.retain(|_, (_, at)| at.elapsed() < LATE_KEPT);
    for (i, outcome) in committed.outcomes.iter().enumerate() {
        if let (Verdict::Stored { queue_id, replayed: false }, Some(user)) = (outcome, committed.users[i])
            && abandoned(i)
        {
            tracing::warn!(
                queue_id,
                "an event was committed after its request was answered 503; its retry will not be stored again"
            );
            late.insert((user, subs[i].body_sha256), (*queue_id, Instant::now()));
        }
    }
}

/// The transaction's statements were cancelled at the deadline, or it was not committed past it.
#[derive(Debug, thiserror::Error)]
#[error("the batch's deadline passed before its commit")]
struct DeadlinePassed;

/// Whether `e` is the database giving up at the deadline (statement or lock timeout, no free
/// connection) rather than refusing the batch.
fn timed_out(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<DeadlinePassed>()
            || match c.downcast_ref::<sqlx::Error>() {
                Some(sqlx::Error::PoolTimedOut) => true,
                Some(sqlx::Error::Database(db)) => matches!(db.code().as_deref(), Some("57014" | "55P03")),
                _ => false,
            }
    })
}

/// A committed batch: each submission's outcome, and the user of each one that was stored.
struct Committed {
    outcomes: Vec<Verdict>,
    users: Vec<Option<i64>>,
}

/// One transaction for the batch, under a statement and lock timeout ending at its earliest
/// deadline. Submissions that fail before the insert (token, role, event) are answered through
/// `early` as soon as that is known; the outcomes of the others are returned once the
/// transaction has committed.
async fn store(shared: &Shared, subs: &[Submission], early: &mut impl FnMut(usize, Verdict)) -> Result<Committed> {
    let deadline = subs.iter().map(|s| s.deadline).min().context("an empty batch")?;
    let mut tx = tokio::time::timeout_at(deadline, crate::db::begin(&shared.pool))
        .await
        .map_err(|_| DeadlinePassed)?
        .context("starting a transaction")?;
    let left = deadline.saturating_duration_since(Instant::now()).as_millis().max(1);
    sqlx::query("select set_config('statement_timeout', $1, true), set_config('lock_timeout', $1, true)")
        .bind(format!("{left}ms"))
        .execute(&mut *tx)
        .await
        .context("setting the batch's timeouts")?;

    let holders = holders(&mut tx, subs).await?;
    let mut plan = sort_out(subs, &holders, &shared.late, early);
    if plan.to_store.is_empty() {
        tx.rollback().await.ok();
        return Ok(plan.finish(subs, HashMap::new()));
    }
    let mut queue_id = insert(&mut tx, &shared.sequence, subs, &plan.to_store).await?;
    claim_keys(&mut tx, subs, &plan.to_store, &mut queue_id, &mut plan.outcomes).await?;
    if Instant::now() >= deadline {
        tx.rollback().await.ok();
        return Err(DeadlinePassed.into());
    }
    tx.commit().await.context("committing events")?;
    Ok(plan.finish(subs, queue_id))
}

/// A token's holder: user id, name, whether it has the role.
type Holder = (i64, String, bool);

/// Who is asking: the distinct tokens of the batch, in one query.
async fn holders(conn: &mut PgConnection, subs: &[Submission]) -> Result<HashMap<Vec<u8>, Holder>> {
    let mut tokens: Vec<&[u8]> = subs.iter().map(|s| &s.token_sha256[..]).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let rows: Vec<(Vec<u8>, i64, String, bool)> = sqlx::query_as(
        "select t.token_sha256, u.id, u.name, $2 = any(u.roles)
         from api_tokens t join api_users u on u.id = t.user_id
         where t.token_sha256 = any($1) and t.expires_at > now() and u.revoked_at is null",
    )
    .bind(&tokens)
    .bind(ROLE_ASYNC_METADATA)
    .fetch_all(conn)
    .await
    .context("checking tokens")?;
    Ok(rows.into_iter().map(|(t, id, name, role)| (t, (id, name, role))).collect())
}

/// What a batch does with each submission.
struct Plan {
    outcomes: Vec<Option<Verdict>>,
    users: Vec<Option<i64>>,
    /// Submissions to insert, by index, with their user.
    to_store: Vec<(usize, i64)>,
    /// A submission with the (user, key) of an earlier one in the batch, and that one.
    followers: Vec<(usize, usize)>,
}

/// Answers what the batch can answer without writing (token, role, event, a late commit's
/// retry) and lists the rest: stored, or following the first submission with their key.
fn sort_out(
    subs: &[Submission],
    holders: &HashMap<Vec<u8>, Holder>,
    late: &Late,
    early: &mut impl FnMut(usize, Verdict),
) -> Plan {
    let mut plan = Plan {
        outcomes: vec![None; subs.len()],
        users: vec![None; subs.len()],
        to_store: Vec::new(),
        followers: Vec::new(),
    };
    let mut leaders: HashMap<(i64, &str), usize> = HashMap::new();
    let mut late = late.lock().expect("not poisoned");
    for (i, s) in subs.iter().enumerate() {
        let answer = match holders.get(&s.token_sha256[..]) {
            None => Some(Verdict::Unauthorized),
            Some((_, name, false)) => Some(Verdict::Forbidden { user: name.clone() }),
            Some(_) if s.check.is_err() => s.check.clone().err().map(Verdict::Invalid),
            Some((id, _, true)) => match late.remove(&(*id, s.body_sha256)) {
                Some((queue_id, _)) => Some(Verdict::Stored { queue_id, replayed: true }),
                None => {
                    plan.users[i] = Some(*id);
                    match s.idempotency_key.as_deref() {
                        Some(key) => match leaders.get(&(*id, key)) {
                            Some(&leader) => plan.followers.push((i, leader)),
                            None => {
                                leaders.insert((*id, key), i);
                                plan.to_store.push((i, *id));
                            }
                        },
                        None => plan.to_store.push((i, *id)),
                    }
                    None
                }
            },
        };
        if let Some(o) = answer {
            early(i, o.clone());
            plan.outcomes[i] = Some(o);
        }
    }
    plan
}

impl Plan {
    /// The outcomes once the transaction committed with `queue_id` (by submission) stored.
    fn finish(mut self, subs: &[Submission], queue_id: HashMap<usize, i64>) -> Committed {
        for (i, id) in queue_id {
            self.outcomes[i] = Some(Verdict::Stored { queue_id: id, replayed: false });
        }
        for (i, leader) in std::mem::take(&mut self.followers) {
            let outcome = match &self.outcomes[leader] {
                Some(Verdict::Stored { queue_id, .. }) if subs[i].body_sha256 == subs[leader].body_sha256 => {
                    Verdict::Stored { queue_id: *queue_id, replayed: true }
                }
                Some(Verdict::Stored { .. } | Verdict::KeyReused) => Verdict::KeyReused,
                other => other.clone().unwrap_or(Verdict::Failed),
            };
            self.outcomes[i] = Some(outcome);
        }
        Committed {
            outcomes: self.outcomes.into_iter().map(|o| o.unwrap_or(Verdict::Failed)).collect(),
            users: self.users,
        }
    }
}

/// Inserts the bodies of `to_store` in one statement; their queue ids by submission.
async fn insert(
    conn: &mut PgConnection,
    sequence: &str,
    subs: &[Submission],
    to_store: &[(usize, i64)],
) -> Result<HashMap<usize, i64>> {
    let bodies: Vec<&str> = to_store.iter().map(|(i, _)| subs[*i].body.as_str()).collect();
    let inserted: Vec<(i64, i64)> = sqlx::query_as(
        "with rows as materialized (
             select ord, nextval($2::regclass) as id, p from unnest($1::text[]) with ordinality as u(p, ord)),
         ins as (insert into event_queue (id, payload) select id, p::jsonb from rows)
         select ord, id from rows",
    )
    .bind(&bodies)
    .bind(sequence)
    .fetch_all(conn)
    .await
    .context("inserting into event_queue")?;
    ensure!(inserted.len() == to_store.len(), "inserted {} of {} events", inserted.len(), to_store.len());
    Ok(inserted.into_iter().map(|(ord, id)| (to_store[ord as usize - 1].0, id)).collect())
}

/// Claims the idempotency keys of the inserted submissions; a key claimed before (or by a
/// concurrent batch, which we wait for) is a retry: answered as the first time, its row taken
/// out again before anyone can see it.
async fn claim_keys(
    conn: &mut PgConnection,
    subs: &[Submission],
    to_store: &[(usize, i64)],
    queue_id: &mut HashMap<usize, i64>,
    outcomes: &mut [Option<Verdict>],
) -> Result<()> {
    let mut keyed: Vec<(i64, &str, &[u8], i64, usize)> = to_store
        .iter()
        .filter_map(|&(i, user)| {
            let key = subs[i].idempotency_key.as_deref()?;
            Some((user, key, &subs[i].body_sha256[..], queue_id[&i], i))
        })
        .collect();
    if keyed.is_empty() {
        return Ok(());
    }
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
    .fetch_all(&mut *conn)
    .await
    .context("recording idempotency keys")?;
    let claimed: HashSet<(i64, String)> = claimed.into_iter().collect();
    let retried: Vec<_> = keyed.iter().filter(|k| !claimed.contains(&(k.0, k.1.to_owned()))).collect();
    if retried.is_empty() {
        return Ok(());
    }
    let earlier: Vec<(i64, String, Vec<u8>, i64)> = sqlx::query_as(
        "select user_id, key, body_sha256, queue_id from api_idempotency
         where (user_id, key) in (select * from unnest($1::bigint[], $2::text[]))",
    )
    .bind(retried.iter().map(|k| k.0).collect::<Vec<_>>())
    .bind(retried.iter().map(|k| k.1).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await
    .context("reading idempotency keys")?;
    let earlier: HashMap<(i64, &str), (&[u8], i64)> =
        earlier.iter().map(|(u, k, h, q)| ((*u, k.as_str()), (&h[..], *q))).collect();
    let mut withdrawn = Vec::new();
    for k in retried {
        let outcome = match earlier.get(&(k.0, k.1)) {
            Some((hash, id)) if *hash == k.2 => Verdict::Stored { queue_id: *id, replayed: true },
            Some(_) => Verdict::KeyReused,
            // Forgotten just now (keys are kept 24 hours): store nothing; the client retries and
            // the key is claimed afresh.
            None => Verdict::Failed,
        };
        withdrawn.extend(queue_id.remove(&k.4));
        outcomes[k.4] = Some(outcome);
    }
    sqlx::query("delete from event_queue where id = any($1)")
        .bind(&withdrawn)
        .execute(conn)
        .await
        .context("withdrawing retried events")?;
    Ok(())
}
