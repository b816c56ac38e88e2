//! The executor: runs one claimed job from start to outcome.
//!
//! It validates the row, runs the body under the job's span with a time
//! limit, and turns whatever ends it (return, error, timeout, stop signal)
//! into an [`Outcome`] for the completer, or into nothing when the job is no
//! longer ours to write (cancelled from SQL, lease lost).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::FutureExt;
use tracing::Instrument;

use super::completer::{Finished, Outcome};
use super::handler::TaskHandler;
use super::job::{ClaimedJob, ErrorKind, JobError, JobSpec};
use super::outage::Outages;
use super::progress::JobContext;
use super::running::{RunningJobs, StopReason, StopSignal};
use crate::observe::metrics;

pub struct Executor {
    pub pool: Pool,
    pub worker_id: Arc<str>,
    pub running: Arc<RunningJobs>,
    pub job_timeout: Duration,
    pub lease: Duration,
    pub handler: Arc<dyn TaskHandler>,
    /// Decides what a failure on an unavailable dependency becomes.
    pub outages: Arc<Outages>,
}

impl Executor {
    /// Runs the job; `None` means nothing must be written for it.
    pub async fn execute(&self, job: ClaimedJob, claimed_at: Instant) -> Option<Finished> {
        let span = tracing::info_span!(
            "job",
            id = %job.key.id,
            attempt = job.key.attempt,
            task_type = %job.task_type,
        );
        async move {
            let started = Instant::now();
            let stop = StopSignal::default();
            self.running
                .insert(job.key, stop.clone(), claimed_at, self.lease);
            let ctx = JobContext::new(
                self.pool.clone(),
                self.worker_id.clone(),
                job.key,
                stop.clone(),
                self.running.clone(),
                self.lease,
            );
            metrics::job_claimed(job.waited);
            let outcome = match self.run_body(&job, &stop, &ctx).await {
                // Probing may take a while: a stop signal still ends it.
                Some(Outcome::Failed(e)) if e.dependency.is_some() => tokio::select! {
                    outcome = self.outages.judge(e) => Some(outcome),
                    _ = stop.stopped() => match stop.reason() {
                        Some(StopReason::Shutdown) => Some(Outcome::HandBack),
                        _ => None,
                    },
                },
                outcome => outcome,
            };
            ctx.end_stage();
            self.running.body_done(job.key);
            if outcome.is_none() {
                // Nothing to write. A job with an outcome stays registered,
                // its lease renewed, until the outcome is written.
                self.running.remove(job.key);
            }
            let elapsed_ms = started.elapsed().as_millis() as u64;
            let label = match &outcome {
                Some(Outcome::Completed) => {
                    tracing::info!(elapsed_ms, "job completed");
                    "completed"
                }
                Some(Outcome::Failed(e)) => {
                    tracing::warn!(elapsed_ms, kind = e.kind.as_str(), error = %e.message, "job failed");
                    match e.kind {
                        ErrorKind::Transient => "transient_error",
                        ErrorKind::Permanent => "permanent_error",
                    }
                }
                Some(Outcome::HandBack) => {
                    tracing::info!(elapsed_ms, "job stopped by shutdown; handing it back");
                    "handed_back"
                }
                Some(Outcome::DependencyDown(note)) => {
                    tracing::info!(elapsed_ms, note = %note, "a dependency is down; handing the job back");
                    "dependency_down"
                }
                None => {
                    tracing::info!(elapsed_ms, reason = ?stop.reason(), "job stopped; not ours to record");
                    "stopped"
                }
            };
            // The app may write any task_type: label only the known ones.
            let task_type = self
                .handler
                .task_types()
                .iter()
                .find(|t| **t == job.task_type)
                .copied()
                .unwrap_or("unknown");
            metrics::job_finished(task_type, label, started.elapsed());
            let after_commit = match outcome {
                Some(Outcome::Completed) => ctx.take_after_commit(),
                _ => None,
            };
            outcome.map(|outcome| Finished {
                key: job.key,
                outcome,
                after_commit,
                deferrals: 0,
            })
        }
        .instrument(span)
        .await
    }

    async fn run_body(
        &self,
        job: &ClaimedJob,
        stop: &StopSignal,
        ctx: &JobContext,
    ) -> Option<Outcome> {
        let spec = match JobSpec::validate(job, self.handler.task_types()) {
            Ok(spec) => spec,
            Err(e) => return Some(Outcome::Failed(e)),
        };
        tracing::debug!(filename = %spec.filename, "job started");
        // Dropping the body's future is what cancels it: a stop signal or the
        // time limit drops it at whatever await point it has reached.
        let result = tokio::select! {
            biased;
            _ = stop.stopped() => None,
            r = tokio::time::timeout(self.job_timeout, AssertUnwindSafe(self.handler.run(&spec, ctx)).catch_unwind()) => Some(r),
        };
        match (stop.reason(), result) {
            // A body that finished is recorded even if a stop raced it; the
            // fence decides whether the write still lands.
            (_, Some(Ok(Ok(Ok(()))))) => Some(Outcome::Completed),
            (Some(StopReason::Shutdown), _) => Some(Outcome::HandBack),
            (Some(StopReason::Cancelled | StopReason::LeaseLost), _) => None,
            (None, Some(Ok(Ok(Err(e))))) => Some(Outcome::Failed(e)),
            (None, Some(Ok(Err(panic)))) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(panic = %what, "job body panicked");
                Some(Outcome::Failed(JobError::permanent(format!(
                    "docworker hit an internal error while running this job ({what}); please report it with this job's id."
                ))))
            }
            (None, Some(Err(_elapsed))) => Some(Outcome::Failed(JobError::transient(format!(
                "The job ran longer than worker.job_timeout ({}) and was stopped.",
                humantime::format_duration(self.job_timeout)
            )))),
            (None, None) => unreachable!("the stop signal always carries a reason"),
        }
    }
}
