//! The producer: claims due jobs into free slots of the bounded pool.
//!
//! It claims in one short statement, never more rows than it has free slots
//! for, and hands each row to an executor task that holds its slot until the
//! body ends and its outcome is written. When a claim fills every free slot
//! there is probably more work, so it claims again as soon as a slot frees
//! up; otherwise it sleeps until a NOTIFY, a due retry, or the jittered poll
//! wakes it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use deadpool_postgres::Pool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::completer::CompleterHandle;
use crate::executor::Executor;
use crate::job::{ClaimedJob, CLAIM_COLUMNS};
use crate::notifier::jittered;

/// Claims up to $1 due jobs for worker $2 with a lease of $3 seconds.
pub fn claim_sql() -> String {
    format!(
        "WITH c AS MATERIALIZED (
             SELECT id FROM job_tasks
              WHERE status = 'pending' AND run_at <= now()
              ORDER BY priority, run_at, id
              LIMIT $1
              FOR UPDATE SKIP LOCKED)
         UPDATE job_tasks t
            SET {CLAIM_SET}
           FROM c WHERE t.id = c.id
         RETURNING {CLAIM_COLUMNS}"
    )
}

/// Claims one given job, whatever its state, unless another worker holds a
/// live lease on it ($1 id, $2 worker, $3 lease seconds). For `worker --once --job`.
pub fn claim_one_sql() -> String {
    format!(
        "WITH c AS MATERIALIZED (
             SELECT id FROM job_tasks
              WHERE id = $1 AND (status <> 'processing' OR locked_until < now())
              FOR UPDATE SKIP LOCKED)
         UPDATE job_tasks t
            SET {CLAIM_SET}
           FROM c WHERE t.id = c.id
         RETURNING {CLAIM_COLUMNS}"
    )
}

/// What a claim writes: a new attempt, our lease, fresh progress counters.
const CLAIM_SET: &str = "status = 'processing', attempt = t.attempt + 1, locked_by = $2,
     locked_until = now() + make_interval(secs => $3::float8), heartbeat_at = now(),
     started_at = now(), finished_at = NULL, stage = 'started',
     total_chunks = 0, completed_chunks = 0, updated_at = now()";

/// How many times the producer lets finishing executors run before it claims.
const SLOT_GATHER_YIELDS: usize = 3;

pub struct Producer {
    pub pool: Pool,
    /// The pool's size: all the slots there are.
    pub concurrency: usize,
    pub worker_id: Arc<str>,
    pub slots: Arc<Semaphore>,
    pub executor: Arc<Executor>,
    pub completer: CompleterHandle,
    pub wake: Arc<Notify>,
    pub poll_interval: Duration,
    pub lease: Duration,
}

impl Producer {
    /// Claims and starts jobs until `stop_claiming` fires.
    pub async fn run(self, stop_claiming: CancellationToken) {
        let sql = claim_sql();
        let mut queue_may_have_more = true;
        let mut error_backoff = Duration::from_millis(100);
        loop {
            // A free slot first: never claim what we cannot start.
            let first = tokio::select! {
                _ = stop_claiming.cancelled() => return,
                p = self.slots.clone().acquire_owned() => p.expect("the slot semaphore is never closed"),
            };
            if !queue_may_have_more {
                tokio::select! {
                    _ = stop_claiming.cancelled() => return,
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(jittered(self.poll_interval)) => {}
                }
            }
            let mut permits = vec![first];
            self.gather_free_slots(&mut permits, queue_may_have_more)
                .await;
            let wanted = permits.len();
            match self.claim(&sql, wanted as i64).await {
                Ok((jobs, claimed_at)) => {
                    error_backoff = Duration::from_millis(100);
                    queue_may_have_more = jobs.len() == wanted;
                    for (job, permit) in jobs.into_iter().zip(permits) {
                        self.start(job, claimed_at, permit);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "claiming jobs failed; retrying");
                    drop(permits);
                    tokio::select! {
                        _ = stop_claiming.cancelled() => return,
                        _ = tokio::time::sleep(jittered(error_backoff)) => {}
                    }
                    error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
                    queue_may_have_more = true;
                }
            }
        }
    }

    /// Takes every free slot. When the queue is busy, slots tend to free up
    /// together (jobs claimed together finish together), so it lets the
    /// executors that are finishing right now run first: one full claim costs
    /// the database what one single-row claim does.
    async fn gather_free_slots(&self, permits: &mut Vec<OwnedSemaphorePermit>, busy: bool) {
        let mut yields = 0;
        loop {
            while let Ok(p) = self.slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            if !busy || permits.len() >= self.concurrency || yields == SLOT_GATHER_YIELDS {
                return;
            }
            yields += 1;
            tokio::task::yield_now().await;
        }
    }

    async fn claim(&self, sql: &str, limit: i64) -> Result<(Vec<ClaimedJob>, Instant)> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(sql).await?;
        let worker_id: &str = &self.worker_id;
        let lease = self.lease.as_secs_f64();
        let claimed_at = Instant::now();
        let rows = client.query(&stmt, &[&limit, &worker_id, &lease]).await?;
        Ok((rows.iter().map(ClaimedJob::from_row).collect(), claimed_at))
    }

    fn start(&self, job: ClaimedJob, claimed_at: Instant, permit: OwnedSemaphorePermit) {
        let executor = self.executor.clone();
        let completer = self.completer.clone();
        tokio::spawn(async move {
            if let Some(finished) = executor.execute(job, claimed_at).await {
                // The slot is free only once the row no longer says
                // `processing`: otherwise the next claim overlaps the
                // unwritten outcome, the table shows more running jobs than
                // slots, and slow writes would let outcomes pile up unbounded.
                completer.send_and_wait(finished).await;
            }
            drop(permit);
        });
    }
}

/// Claims the job `id` for `worker --once --job`.
pub async fn claim_one(
    pool: &Pool,
    worker_id: &str,
    lease: Duration,
    id: Uuid,
) -> Result<Option<(ClaimedJob, Instant)>> {
    let client = pool.get().await?;
    let claimed_at = Instant::now();
    let row = client
        .query_opt(&claim_one_sql(), &[&id, &worker_id, &lease.as_secs_f64()])
        .await?;
    Ok(row.map(|r| (ClaimedJob::from_row(&r), claimed_at)))
}
