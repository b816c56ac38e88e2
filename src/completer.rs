//! The completer: writes every job's final outcome, many jobs per statement.
//!
//! Executors hand it an outcome and move on; it drains whatever has queued up
//! since its last write and records it all in one fenced UPDATE. Under load
//! that is hundreds of jobs per commit; when idle, one job is written as soon
//! as it finishes. A write that fails (database down) is retried until it
//! lands or the process is told to exit at once.
//!
//! Outcomes are turned into row states in SQL, from the row itself: whether
//! a transient failure is retried depends on `attempt < max_attempts`, and
//! the retry time comes from the database clock (see `retry`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::job::{Attempt, JobError};
use crate::retry::RetryPolicy;

/// Outcomes written per statement at most.
const MAX_BATCH: usize = 2_000;

/// How a job attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Transient errors are retried while attempts remain; permanent ones are final.
    Failed(JobError),
    /// Stopped by shutdown: back to `pending`, the attempt not counted.
    HandBack,
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub key: Attempt,
    pub batch_id: Option<Uuid>,
    pub outcome: Outcome,
}

/// The row's state after the completer wrote it.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// `status` is the new status; `retry_in` is set when it waits for a retry.
    Applied {
        status: String,
        retry_in: Option<Duration>,
    },
    /// The fence refused the write: the job is no longer ours.
    Rejected,
}

type Reply = Option<oneshot::Sender<Written>>;

#[derive(Clone)]
pub struct CompleterHandle {
    tx: mpsc::UnboundedSender<(Finished, Reply)>,
}

impl CompleterHandle {
    pub fn send(&self, finished: Finished) {
        if self.tx.send((finished, None)).is_err() {
            tracing::error!("completer stopped; an outcome was dropped and its job will be retried after its lease expires");
        }
    }

    /// Sends and waits until the outcome is written (for `worker --once`).
    pub async fn send_and_wait(&self, finished: Finished) -> Option<Written> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((finished, Some(tx))).ok()?;
        rx.await.ok()
    }
}

pub struct Completer {
    pool: Pool,
    worker_id: Arc<str>,
    policy: RetryPolicy,
    rx: mpsc::UnboundedReceiver<(Finished, Reply)>,
    /// Wakes the producer when a retry comes due.
    wake: Arc<tokio::sync::Notify>,
    sql: String,
}

impl Completer {
    pub fn new(
        pool: Pool,
        worker_id: Arc<str>,
        policy: RetryPolicy,
        wake: Arc<tokio::sync::Notify>,
    ) -> (Completer, CompleterHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let completer = Completer {
            pool,
            worker_id,
            policy,
            rx,
            wake,
            sql: complete_sql(),
        };
        (completer, CompleterHandle { tx })
    }

    /// Runs until every handle is dropped and the queue is written, or
    /// until `abandon` fires (exit at once: unwritten jobs come back by lease expiry).
    pub async fn run(mut self, abandon: CancellationToken) {
        let mut pending: Vec<(Finished, Reply)> = Vec::new();
        loop {
            if pending.is_empty() {
                match self.rx.recv().await {
                    Some(item) => pending.push(item),
                    None => return,
                }
            }
            while pending.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(item) => pending.push(item),
                    Err(_) => break,
                }
            }
            let mut delay = Duration::from_millis(50);
            loop {
                match self.write(&pending).await {
                    Ok(results) => {
                        for ((_, reply), written) in pending.drain(..).zip(results) {
                            if let Some(reply) = reply {
                                let _ = reply.send(written);
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), jobs = pending.len(), "could not record job outcomes; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = abandon.cancelled() => {
                                tracing::warn!(jobs = pending.len(), "exiting with unrecorded outcomes; those jobs run again after their leases expire");
                                return;
                            }
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    async fn write(&self, items: &[(Finished, Reply)]) -> Result<Vec<Written>> {
        let mut ids = Vec::with_capacity(items.len());
        let mut attempts = Vec::with_capacity(items.len());
        let mut outcomes = Vec::with_capacity(items.len());
        let mut kinds: Vec<Option<&str>> = Vec::with_capacity(items.len());
        let mut messages: Vec<Option<&str>> = Vec::with_capacity(items.len());
        let mut batches = BTreeSet::new();
        for (f, _) in items {
            ids.push(f.key.id);
            attempts.push(f.key.attempt);
            let (outcome, kind, message) = match &f.outcome {
                Outcome::Completed => ("completed", None, None),
                Outcome::Failed(e) => ("failed", Some(e.kind.as_str()), Some(e.message.as_str())),
                Outcome::HandBack => ("handback", None, None),
            };
            outcomes.push(outcome);
            kinds.push(kind);
            messages.push(message);
            batches.extend(f.batch_id);
        }
        let (base, max) = self.policy.params();
        let worker_id: &str = &self.worker_id;

        let handed_back = outcomes.contains(&"handback");
        let params: [&(dyn ToSql + Sync); 8] = [
            &ids, &attempts, &outcomes, &kinds, &messages, &base, &max, &worker_id,
        ];

        let mut client = self.pool.get().await?;
        let rows = if batches.is_empty() && !handed_back {
            // The common case is one autocommit statement: one round trip.
            let stmt = client.prepare_cached(&self.sql).await?;
            client.query(&stmt, &params).await?
        } else {
            let tx = client.transaction().await?;
            if !batches.is_empty() {
                // Lock the batches in one order before the rollup trigger
                // does, so two completers never lock them crosswise.
                let batches: Vec<Uuid> = batches.into_iter().collect();
                let lock = tx
                    .prepare_cached(
                        "SELECT 1 FROM job_batches WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
                    )
                    .await?;
                tx.execute(&lock, &[&batches]).await?;
            }
            let stmt = tx.prepare_cached(&self.sql).await?;
            let rows = tx.query(&stmt, &params).await?;
            if handed_back {
                // Handed-back jobs are due now: wake the other workers.
                tx.execute("SELECT pg_notify('docworker_jobs', '')", &[])
                    .await?;
            }
            tx.commit().await?;
            rows
        };

        let mut written = std::collections::HashMap::with_capacity(rows.len());
        for row in rows {
            let id: Uuid = row.get(0);
            let status: String = row.get(1);
            let retry_in: Option<f64> = row.get(2);
            let retry_in = retry_in.map(|s| Duration::from_secs_f64(s.max(0.0)));
            if let Some(delay) = retry_in {
                self.wake_after(delay);
            }
            written.insert(id, Written::Applied { status, retry_in });
        }
        Ok(items
            .iter()
            .map(|(f, _)| match written.remove(&f.key.id) {
                Some(w) => w,
                None => {
                    tracing::warn!(job = %f.key.id, attempt = f.key.attempt,
                        "outcome not recorded: the job was cancelled or taken over by another worker after its lease expired");
                    Written::Rejected
                }
            })
            .collect())
    }

    /// A retry that comes due should not wait for the next poll.
    fn wake_after(&self, delay: Duration) {
        let wake = self.wake.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            wake.notify_one();
        });
    }
}

fn complete_sql() -> String {
    let retry_at = RetryPolicy::retry_at_sql("t.attempt", "$6", "$7");
    format!(
        r#"
WITH o AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[])
        AS o(id, attempt, outcome, kind, message)
), p AS (
    SELECT o.*,
           (o.outcome = 'failed' AND o.kind = 'transient' AND t.attempt < t.max_attempts) AS will_retry,
           {retry_at} AS retry_at
      FROM o JOIN job_tasks t ON t.id = o.id
)
UPDATE job_tasks t SET
    status = CASE
        WHEN p.outcome = 'completed' THEN 'completed'
        WHEN p.outcome = 'handback' OR p.will_retry THEN 'pending'
        ELSE 'error' END,
    attempt = CASE WHEN p.outcome = 'handback' THEN t.attempt - 1 ELSE t.attempt END,
    run_at = CASE
        WHEN p.will_retry THEN p.retry_at
        WHEN p.outcome = 'handback' THEN now()
        ELSE t.run_at END,
    finished_at = CASE WHEN p.outcome = 'handback' OR p.will_retry THEN NULL ELSE now() END,
    stage = CASE WHEN p.outcome = 'completed' THEN 'done' ELSE t.stage END,
    error_message = CASE
        WHEN p.outcome = 'completed' THEN NULL
        WHEN p.outcome = 'handback' THEN t.error_message
        WHEN p.will_retry THEN format('Attempt %s of %s failed: %s Retrying at %s.',
            t.attempt, t.max_attempts, p.message,
            to_char(p.retry_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'))
        WHEN p.kind = 'transient' THEN format('Gave up after %s attempts. Last error: %s',
            t.attempt, p.message)
        ELSE p.message END,
    errors = CASE WHEN p.message IS NULL THEN t.errors
        ELSE t.errors || jsonb_build_array(jsonb_build_object(
            'attempt', t.attempt, 'at', now(), 'kind', p.kind,
            'message', p.message, 'worker', $8::text)) END,
    locked_by = NULL,
    locked_until = NULL,
    updated_at = now()
FROM p
WHERE t.id = p.id AND t.attempt = p.attempt AND t.locked_by = $8 AND t.status = 'processing'
RETURNING t.id, t.status::text,
    CASE WHEN p.will_retry THEN extract(epoch FROM p.retry_at - now())::float8 END
"#
    )
}
