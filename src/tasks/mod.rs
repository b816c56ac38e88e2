//! Task handlers: the job bodies, one module per `task_type`.
//!
//! The queue engine knows nothing of documents. It validates a claimed row
//! into a [`JobSpec`] and calls [`run`]; whatever the body returns decides the
//! row's fate (completed, retried, failed). `ingest` and `delete` are the
//! document pipeline's ([`crate::pipeline`]); `noop` exists to exercise and
//! benchmark the queue itself.

pub mod noop;

use crate::job::{JobError, JobSpec, TaskType};
use crate::pipeline::Pipeline;
use crate::progress::JobContext;

/// Runs a job's body. Cancellation (timeout, shutdown, SQL cancel, lost
/// lease) drops this future, so bodies must keep no state that a drop at any
/// `.await` would corrupt.
pub async fn run(job: &JobSpec, ctx: &JobContext, pipeline: &Pipeline) -> Result<(), JobError> {
    match job.task_type {
        TaskType::Noop => noop::run(job, ctx).await,
        TaskType::Ingest => pipeline.ingest(job, ctx).await,
        TaskType::Delete => pipeline.delete(job, ctx).await,
    }
}
