//! The task handler docworker runs: the job bodies by `task_type`.
//!
//! `ingest` and `delete` are the document pipeline's ([`crate::pipeline`]);
//! `noop` exists to exercise and benchmark the queue itself. This is where
//! the queue's generic facilities meet documents: `ingest` and `delete` run
//! one job per document at a time (the queue's exclusivity key is the
//! document id), `noop` touches no document and is exempt; `ingest` needs
//! the embedder, Chroma and the upload root, `delete` only Chroma, so an
//! outage of one pauses only the jobs that need it; readiness adds them to
//! the queue's checks.

pub mod noop;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use crate::pipeline::{Pipeline, CHROMA, EMBEDDER, UPLOADS};
use crate::queue::health::CHECK_TIMEOUT;
use crate::queue::{Check, JobContext, JobError, JobSpec, TaskHandler};

pub const INGEST: &str = "ingest";
pub const DELETE: &str = "delete";
pub const NOOP: &str = "noop";

pub struct DocumentTasks {
    pub pipeline: Arc<Pipeline>,
}

impl TaskHandler for DocumentTasks {
    fn task_types(&self) -> &[&'static str] {
        &[INGEST, DELETE, NOOP]
    }

    fn unkeyed_task_types(&self) -> &[&'static str] {
        &[NOOP]
    }

    fn dependencies(&self, task_type: &str) -> &'static [&'static str] {
        match task_type {
            INGEST => &[EMBEDDER, CHROMA, UPLOADS],
            DELETE => &[CHROMA],
            _ => &[],
        }
    }

    fn probe(&self, dependency: &'static str) -> BoxFuture<'_, Result<(), String>> {
        async move {
            match dependency {
                EMBEDDER => self.pipeline.embedder_probe().await,
                CHROMA => self.pipeline.chroma_reachable().await,
                UPLOADS => self.pipeline.upload_root_present(),
                other => Err(format!("no probe for {other:?}")),
            }
        }
        .boxed()
    }

    fn run<'a>(
        &'a self,
        job: &'a JobSpec,
        ctx: &'a JobContext,
    ) -> BoxFuture<'a, Result<(), JobError>> {
        match job.task_type {
            INGEST => async move {
                if job.file_path.is_none() {
                    return Err(JobError::permanent(
                        "This ingest job has no file_path: set it to the uploaded file's path.",
                    ));
                }
                self.pipeline.ingest(job, ctx).await
            }
            .boxed(),
            DELETE => self.pipeline.delete(job, ctx).boxed(),
            _ => noop::run(job, ctx).boxed(),
        }
    }

    fn check_at_start(&self) -> BoxFuture<'_, ()> {
        self.pipeline.check().boxed()
    }

    fn readiness(&self) -> BoxFuture<'_, Vec<Check>> {
        async move {
            let (embedder, chroma) = tokio::join!(
                tokio::time::timeout(CHECK_TIMEOUT, self.pipeline.embedder_reachable()),
                timed(self.pipeline.chroma_reachable())
            );
            let embedder = embedder.unwrap_or_else(|_| {
                Check::new(EMBEDDER, Err(format!("no answer within {CHECK_TIMEOUT:?}")))
            });
            vec![
                embedder,
                Check::new(CHROMA, chroma),
                Check::new(UPLOADS, self.pipeline.upload_root_present()),
            ]
        }
        .boxed()
    }
}

async fn timed(f: impl std::future::Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(CHECK_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}")))
}
