//! Task handlers: the job bodies, one module per `task_type`.
//!
//! The queue engine knows nothing of documents. It validates a claimed row
//! into a [`JobSpec`] and calls [`run`]; whatever the body returns decides the
//! row's fate (completed, retried, failed). The document pipeline plugs in at
//! [`ingest::run`] and [`delete::run`].

pub mod delete;
pub mod ingest;
pub mod noop;

use crate::job::{JobError, JobSpec, TaskType};
use crate::progress::JobContext;

/// Runs a job's body. Cancellation (timeout, shutdown, SQL cancel, lost
/// lease) drops this future, so bodies must keep no state that a drop at any
/// `.await` would corrupt.
pub async fn run(job: &JobSpec, ctx: &JobContext) -> Result<(), JobError> {
    match job.task_type {
        TaskType::Noop => noop::run(job, ctx).await,
        TaskType::Ingest => ingest::run(job, ctx).await,
        TaskType::Delete => delete::run(job, ctx).await,
    }
}
