//! The progress reporter a job body gets: what it may write to its own row
//! while it runs (stage, counts, result), the lease check before writes
//! outside PostgreSQL, and an action to run once its completion is
//! committed. Every row write is fenced (see `store::fence`): a write that
//! changes nothing means the job now belongs to someone else, and the body
//! is stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::Mutex;

use super::completer::AfterCommit;
use super::job::{Attempt, JobError};
use super::running::{RunningJobs, StopReason, StopSignal};
use crate::observe::metrics;
use crate::store::fence::Fence;
use crate::store::Stage;

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
    after_commit: std::sync::Mutex<Option<AfterCommit>>,
    /// The stage being run and since when, for the stage-duration metric.
    stage: std::sync::Mutex<(Option<Stage>, Instant)>,
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
            after_commit: std::sync::Mutex::new(None),
            stage: std::sync::Mutex::new((Some(Stage::Started), Instant::now())),
        }
    }

    /// Records the stage the job has entered (parsing, chunking, ...).
    pub async fn set_stage(&self, stage: Stage) -> Result<(), JobError> {
        tracing::info!(stage = stage.as_str(), "stage");
        self.stage_clock(Some(stage));
        self.fenced(self.fence().set_stage(stage).await)
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
        self.fenced(self.fence().set_progress(completed, total).await)
    }

    /// Ends the stage clock when the body ends, however it ended.
    pub fn end_stage(&self) {
        self.stage_clock(None);
    }

    /// Reports the stage that just ended and starts timing `next`.
    fn stage_clock(&self, next: Option<Stage>) {
        let mut stage = self.stage.lock().unwrap_or_else(|e| e.into_inner());
        let (ended, since) = std::mem::replace(&mut *stage, (next, Instant::now()));
        if let Some(ended) = ended {
            metrics::stage_finished(ended, since.elapsed());
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
        self.fenced(self.fence().set_result(&result).await)
    }

    /// Asks for `action` to run once, and only once, the job's completion
    /// is recorded; it replaces any action asked for earlier.
    pub fn after_commit(&self, action: Option<AfterCommit>) {
        *self.after_commit.lock().unwrap_or_else(|e| e.into_inner()) = action;
    }

    pub fn take_after_commit(&self) -> Option<AfterCommit> {
        self.after_commit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn fence(&self) -> Fence<'_> {
        Fence {
            pool: &self.pool,
            worker_id: &self.worker_id,
            key: self.key,
        }
    }

    /// Turns a fenced write's result into the body's: a refused write stops it.
    fn fenced(&self, result: anyhow::Result<bool>) -> Result<(), JobError> {
        match result {
            Ok(false) => {
                self.stop.stop(StopReason::LeaseLost);
                Err(JobError::transient(
                    "This worker no longer owns the job (cancelled, or its lease expired and another worker took it over).",
                ))
            }
            Ok(true) => Ok(()),
            Err(e) => {
                // Progress is advisory; the final write is what matters and
                // has its own retries.
                tracing::warn!(error = %e, "could not record progress");
                Ok(())
            }
        }
    }
}
