//! Maintenance: the periodic sweeps every worker runs.
//!
//! - Rescue: jobs whose lease expired (their worker was killed, hung or cut
//!   off) go back to `pending`, the lost attempt counted, or to `error` when
//!   no attempts remain. This is how a SIGKILLed worker's job runs again.
//! - Prune: finished rows older than the retention are deleted a few hundred
//!   at a time, so the table and its indexes stay small.
//!
//! Every replica sweeps; SKIP LOCKED keeps them out of each other's way.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::completer::LOCK_BATCHES_SQL;
use crate::metrics;
use crate::notifier::jittered;

/// Expired leases handled per statement.
const RESCUE_BATCH: i64 = 200;
/// Prune statements per sweep at most, so one sweep never runs long.
const PRUNE_ROUNDS: usize = 20;

const RESCUE_SQL: &str = "
WITH expired AS MATERIALIZED (
    SELECT id FROM job_tasks
     WHERE status = 'processing' AND locked_until < now()
     ORDER BY locked_until
     LIMIT $1
     FOR UPDATE SKIP LOCKED
), p AS (
    SELECT t.id, t.attempt < t.max_attempts AS will_retry,
           format('Attempt %s of %s was interrupted: worker %s stopped renewing its lease (it crashed, hung or lost its database connection)',
                  t.attempt, t.max_attempts, coalesce(t.locked_by, '?')) AS message
      FROM job_tasks t JOIN expired e ON e.id = t.id
)
UPDATE job_tasks t SET
    status = CASE WHEN p.will_retry THEN 'pending' ELSE 'error' END,
    run_at = now(),
    finished_at = CASE WHEN p.will_retry THEN NULL ELSE now() END,
    error_message = CASE WHEN p.will_retry
        THEN p.message || '. Retrying now.'
        ELSE format('Gave up after %s attempts. Last error: %s.', t.attempt, p.message) END,
    errors = t.errors || jsonb_build_array(jsonb_build_object(
        'attempt', t.attempt, 'at', now(), 'kind', 'lease_expired',
        'message', p.message, 'worker', t.locked_by)),
    locked_by = NULL,
    locked_until = NULL,
    updated_at = now()
FROM p
WHERE t.id = p.id
RETURNING t.id, t.status::text";

const EXPIRED_BATCHES_SQL: &str = "
SELECT DISTINCT batch_id FROM (
    SELECT batch_id FROM job_tasks
     WHERE status = 'processing' AND locked_until < now() AND batch_id IS NOT NULL
     ORDER BY locked_until
     LIMIT $1) expired";

const PRUNE_TASKS_SQL: &str = "
DELETE FROM job_tasks WHERE id IN (
    SELECT t.id FROM job_tasks t LEFT JOIN job_batches b ON b.id = t.batch_id
     WHERE t.status IN ('completed', 'error', 'cancelled')
       AND t.finished_at < now() - make_interval(secs => $1::float8)
       AND (t.batch_id IS NULL
            OR (b.status <> 'pending' AND b.finished_at < now() - make_interval(secs => $1::float8)))
     LIMIT $2
     FOR UPDATE OF t SKIP LOCKED)";

const PRUNE_BATCHES_SQL: &str = "
DELETE FROM job_batches WHERE id IN (
    SELECT b.id FROM job_batches b
     WHERE b.status <> 'pending'
       AND b.finished_at < now() - make_interval(secs => $1::float8)
       AND NOT EXISTS (SELECT 1 FROM job_tasks t WHERE t.batch_id = b.id)
     LIMIT $2
     FOR UPDATE SKIP LOCKED)";

pub struct Maintenance {
    pub pool: Pool,
    pub interval: Duration,
    /// Zero keeps finished rows forever.
    pub retention: Duration,
    pub prune_batch_size: i64,
    /// Wakes the local producer when rescued jobs are due.
    pub wake: Arc<Notify>,
}

impl Maintenance {
    pub async fn run(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(jittered(self.interval)) => {}
            }
            if let Err(e) = self.rescue_expired().await {
                tracing::warn!(error = %format!("{e:#}"), "lease sweep failed");
            }
            if !self.retention.is_zero() {
                if let Err(e) = self.prune().await {
                    tracing::warn!(error = %format!("{e:#}"), "pruning finished jobs failed");
                }
            }
        }
    }

    /// Returns how many expired jobs were put back or failed.
    pub async fn rescue_expired(&self) -> Result<usize> {
        let mut client = self.pool.get().await?;
        let mut total = 0;
        loop {
            let tx = client.transaction().await?;
            // Jobs that run out of attempts here finish, and their batches
            // are rolled up: lock those batches first, as the completer does.
            let batches: Vec<Uuid> = tx
                .query(EXPIRED_BATCHES_SQL, &[&RESCUE_BATCH])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !batches.is_empty() {
                tx.execute(LOCK_BATCHES_SQL, &[&batches]).await?;
            }
            let rows = tx.query(RESCUE_SQL, &[&RESCUE_BATCH]).await?;
            for row in &rows {
                let id: Uuid = row.get(0);
                let status: String = row.get(1);
                tracing::warn!(job = %id, new_status = %status, "reclaimed a job whose lease expired");
                metrics::lease_reclaimed(if status == "pending" {
                    "retry"
                } else {
                    "failed"
                });
            }
            let due_again = rows.iter().any(|r| r.get::<_, String>(1) == "pending");
            if due_again {
                tx.execute("SELECT pg_notify('docworker_jobs', '')", &[])
                    .await?;
            }
            tx.commit().await?;
            if due_again {
                // Only now can the local producer see them.
                self.wake.notify_one();
            }
            total += rows.len();
            if (rows.len() as i64) < RESCUE_BATCH {
                return Ok(total);
            }
        }
    }

    /// Returns how many task rows were deleted.
    pub async fn prune(&self) -> Result<u64> {
        let client = self.pool.get().await?;
        let retention = self.retention.as_secs_f64();
        let tasks = client.prepare_cached(PRUNE_TASKS_SQL).await?;
        let batches = client.prepare_cached(PRUNE_BATCHES_SQL).await?;
        let mut deleted = 0;
        for _ in 0..PRUNE_ROUNDS {
            let n = client
                .execute(&tasks, &[&retention, &self.prune_batch_size])
                .await?;
            deleted += n;
            if (n as i64) < self.prune_batch_size {
                break;
            }
        }
        for _ in 0..PRUNE_ROUNDS {
            let n = client
                .execute(&batches, &[&retention, &self.prune_batch_size])
                .await?;
            if (n as i64) < self.prune_batch_size {
                break;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "pruned finished jobs");
        }
        Ok(deleted)
    }
}
