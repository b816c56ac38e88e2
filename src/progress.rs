//! What a job body may write to its own row while it runs: stage and chunk
//! counts. Every write is fenced by (id, attempt, worker id): a write that
//! changes nothing means the job now belongs to someone else, and the body
//! is stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;

use crate::job::{Attempt, JobError};
use crate::metrics;
use crate::pipeline::source::Disposal;
use crate::running::{RunningJobs, StopReason, StopSignal};

/// Count updates closer together than this are coalesced (stage changes and
/// the final count are always written).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

pub struct JobContext {
    pool: Pool,
    worker_id: Arc<str>,
    key: Attempt,
    stop: StopSignal,
    running: Arc<RunningJobs>,
    lease: Duration,
    last_count_write: Mutex<Option<Instant>>,
    after_success: std::sync::Mutex<Option<Disposal>>,
    /// The stage being run and since when, for the stage-duration metric.
    stage: std::sync::Mutex<(String, Instant)>,
}

impl JobContext {
    pub fn new(
        pool: Pool,
        worker_id: Arc<str>,
        key: Attempt,
        stop: StopSignal,
        running: Arc<RunningJobs>,
        lease: Duration,
    ) -> JobContext {
        JobContext {
            pool,
            worker_id,
            key,
            stop,
            running,
            lease,
            last_count_write: Mutex::new(None),
            after_success: std::sync::Mutex::new(None),
            stage: std::sync::Mutex::new(("started".into(), Instant::now())),
        }
    }

    /// Records the stage the job has entered (parsing, chunking, ...).
    pub async fn set_stage(&self, stage: &str) -> Result<(), JobError> {
        tracing::info!(stage, "stage");
        self.stage_clock(stage);
        self.fenced_write(
            "UPDATE job_tasks SET stage = $4, updated_at = now()
              WHERE id = $1 AND attempt = $2 AND locked_by = $3 AND status = 'processing'",
            &[&stage],
        )
        .await
    }

    /// Records chunk progress, at most about once a second unless finished.
    pub async fn set_progress(&self, completed: i32, total: i32) -> Result<(), JobError> {
        {
            let mut last = self.last_count_write.lock().await;
            let due = last.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
            if !due && completed < total {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        tracing::debug!(completed, total, "progress");
        self.fenced_write(
            "UPDATE job_tasks SET completed_chunks = $4, total_chunks = $5, updated_at = now()
              WHERE id = $1 AND attempt = $2 AND locked_by = $3 AND status = 'processing'",
            &[&completed, &total],
        )
        .await
    }

    /// Ends the stage clock when the body ends, however it ended.
    pub fn end_stage(&self) {
        self.stage_clock("");
    }

    /// Reports the stage that just ended and starts timing `next`.
    fn stage_clock(&self, next: &str) {
        let mut stage = self.stage.lock().unwrap_or_else(|e| e.into_inner());
        let (ended, since) = std::mem::replace(&mut *stage, (next.to_owned(), Instant::now()));
        if !ended.is_empty() {
            metrics::stage_finished(&ended, since.elapsed());
        }
    }

    /// Call before a write outside PostgreSQL (the vector store), which no
    /// fence can guard: refuses, and stops the job, unless the lease is sure
    /// to last a while yet (a third of it: the heartbeat renews at least
    /// that often). A worker that was paused, or cut off from the database,
    /// past its lease must not overwrite what the job's new owner wrote.
    pub fn ensure_lease(&self) -> Result<(), JobError> {
        let left = self.running.lease_left(self.key).unwrap_or_default();
        if left >= self.lease / 3 {
            return Ok(());
        }
        self.stop.stop(StopReason::LeaseLost);
        Err(JobError::transient(
            "This worker's lease on the job ran low (no heartbeat got through), so it stopped before writing to the vector store.",
        ))
    }

    /// Records what the job produced (chunk count, whether it was skipped
    /// as unchanged, ...) in the row's `result` column.
    pub async fn set_result(&self, result: serde_json::Value) -> Result<(), JobError> {
        self.fenced_write(
            "UPDATE job_tasks SET result = $4, updated_at = now()
              WHERE id = $1 AND attempt = $2 AND locked_by = $3 AND status = 'processing'",
            &[&result],
        )
        .await
    }

    /// Asks for the uploaded file to be deleted or moved once, and only
    /// once, the job's completion is recorded.
    pub fn dispose_after_success(&self, disposal: Option<Disposal>) {
        *self.after_success.lock().unwrap_or_else(|e| e.into_inner()) = disposal;
    }

    pub fn take_disposal(&self) -> Option<Disposal> {
        self.after_success
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    async fn fenced_write(&self, sql: &str, extra: &[&(dyn ToSql + Sync)]) -> Result<(), JobError> {
        let worker_id: &str = &self.worker_id;
        let mut params: Vec<&(dyn ToSql + Sync)> =
            vec![&self.key.id, &self.key.attempt, &worker_id];
        params.extend_from_slice(extra);
        let result = async {
            let client = self.pool.get().await?;
            let stmt = client.prepare_cached(sql).await?;
            anyhow::Ok(client.execute(&stmt, &params).await?)
        }
        .await;
        match result {
            Ok(0) => {
                self.stop.stop(StopReason::LeaseLost);
                Err(JobError::transient(
                    "This worker no longer owns the job (cancelled, or its lease expired and another worker took it over).",
                ))
            }
            Ok(_) => Ok(()),
            Err(e) => {
                // Progress is advisory; the final write is what matters and
                // has its own retries.
                tracing::warn!(error = %e, "could not record progress");
                Ok(())
            }
        }
    }
}
