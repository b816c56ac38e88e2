//! The queue's one door to the work itself: a [`TaskHandler`] value given
//! to the queue at start-up. The queue claims rows, runs their bodies
//! through it, and records what they return; it never knows what a task
//! does.
//!
//! What a task needs from the queue is offered as a generic facility:
//! exclusivity per key (a task type is exclusive unless the handler says it
//! is not), a progress reporter and an after-commit action ([`JobContext`]),
//! readiness checks the handler adds to the queue's own, and waiting out a
//! dependency's outage (the handler names what each task type depends on
//! and how to probe it).

use futures_util::future::BoxFuture;

use super::job::{JobError, JobSpec};
use super::progress::JobContext;

/// One readiness check's result.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &'static str, result: Result<(), String>) -> Check {
        match result {
            Ok(()) => Check {
                name,
                ok: true,
                detail: "ok".into(),
            },
            Err(detail) => Check {
                name,
                ok: false,
                detail,
            },
        }
    }
}

/// The job bodies, by task type.
pub trait TaskHandler: Send + Sync + 'static {
    /// Every task type this handler runs; a row of any other type fails
    /// permanently, naming these.
    fn task_types(&self) -> &[&'static str];

    /// Task types that may run beside another job with the same
    /// exclusivity key (`coalesce(document_id, id)`). Every other type runs
    /// one job per key at a time.
    fn unkeyed_task_types(&self) -> &[&'static str] {
        &[]
    }

    /// The services a task type's jobs need (names as in
    /// [`JobError::unavailable`]). While one of them is down the queue
    /// claims no job of that type.
    fn dependencies(&self, _task_type: &str) -> &'static [&'static str] {
        &[]
    }

    /// Whether `dependency` works again; asked when a job found it
    /// unavailable, and then with backoff until it does.
    fn probe(&self, _dependency: &'static str) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Runs a job's body. Cancellation (timeout, shutdown, SQL cancel, lost
    /// lease) drops this future, so bodies must keep no state that a drop at
    /// any `.await` would corrupt.
    fn run<'a>(
        &'a self,
        job: &'a JobSpec,
        ctx: &'a JobContext,
    ) -> BoxFuture<'a, Result<(), JobError>>;

    /// Checks what the bodies depend on once at start-up, so that a wrong
    /// setting shows in the log at once; only logs.
    fn check_at_start(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Readiness checks of what the bodies depend on, beside the queue's own.
    fn readiness(&self) -> BoxFuture<'_, Vec<Check>> {
        Box::pin(async { Vec::new() })
    }
}
