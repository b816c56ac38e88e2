//! The completer: turns how job attempts ended into the store's write
//! cycle, which records them and claims their replacements in one statement
//! (see `store::cycle`), and runs each completed job's after-commit action
//! once its completion is committed, and only then.

use std::fmt;
use std::time::Duration;

use anyhow::Result;
use deadpool_postgres::Pool;
use tokio::sync::watch;

use super::job::{Attempt, JobError};
use super::retry::RetryPolicy;
use crate::store::{Cycle, Ended, Ending, JobStatus, WriteCycle, Written};

/// How a job attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Transient errors are retried while attempts remain; permanent ones are final.
    Failed(JobError),
    /// Stopped by shutdown: back to `pending`, the attempt not counted.
    HandBack,
    /// Failed on a dependency that is down: back to `pending`, the attempt
    /// not counted, until it is back. The note says so on the row.
    DependencyDown(String),
}

/// Something a job asked to be done once its completion is committed (the
/// pipeline moves or deletes the uploaded file): blocking work, run on a
/// blocking thread.
pub struct AfterCommit(Box<dyn FnOnce() + Send + Sync + 'static>);

impl AfterCommit {
    pub fn new(action: impl FnOnce() + Send + Sync + 'static) -> AfterCommit {
        AfterCommit(Box::new(action))
    }
}

impl fmt::Debug for AfterCommit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AfterCommit")
    }
}

/// An attempt that ended, waiting to be recorded.
#[derive(Debug)]
pub struct Finished {
    pub key: Attempt,
    pub outcome: Outcome,
    /// Run once the completion is recorded, and only then.
    pub after_commit: Option<AfterCommit>,
    /// Times its write found the row locked by another transaction.
    pub deferrals: u32,
}

impl Finished {
    pub fn new(key: Attempt, outcome: Outcome) -> Finished {
        Finished {
            key,
            outcome,
            after_commit: None,
            deferrals: 0,
        }
    }

    /// Runs the after-commit action if `written` says the job completed.
    pub async fn after_written(self, written: &Written) {
        let completed = matches!(
            written,
            Written::Applied {
                status: JobStatus::Completed,
                ..
            }
        );
        if let (Some(AfterCommit(action)), true) = (self.after_commit, completed) {
            let _ = tokio::task::spawn_blocking(action).await;
        }
    }

    fn ended(&self) -> Ended<'_> {
        Ended {
            key: self.key,
            ending: match &self.outcome {
                Outcome::Completed => Ending::Completed,
                Outcome::Failed(e) => Ending::Failed {
                    kind: e.kind,
                    message: &e.message,
                },
                Outcome::HandBack => Ending::HandBack { note: None },
                Outcome::DependencyDown(note) => Ending::HandBack { note: Some(note) },
            },
        }
    }
}

pub struct Completer {
    cycle: WriteCycle,
    /// A reload may change it while jobs run.
    policy: watch::Receiver<RetryPolicy>,
}

impl Completer {
    /// `unkeyed` are the task types exempt from one-per-key exclusivity.
    pub fn new(
        worker_id: &str,
        policy: watch::Receiver<RetryPolicy>,
        lease: Duration,
        unkeyed: &[&str],
    ) -> Completer {
        Completer {
            cycle: WriteCycle::new(worker_id, lease, unkeyed),
            policy,
        }
    }

    /// Records `finished` and claims up to `claim` due jobs, atomically,
    /// none of a task type in `paused`.
    pub async fn write(
        &self,
        pool: &Pool,
        finished: &[Finished],
        claim: i64,
        paused: &[&str],
    ) -> Result<Cycle> {
        let ended: Vec<Ended<'_>> = finished.iter().map(Finished::ended).collect();
        let backoff = self.policy.borrow().backoff();
        let cycle = self.cycle.run(pool, &ended, backoff, claim, paused).await?;
        for (f, w) in finished.iter().zip(&cycle.written) {
            if *w == Written::Rejected {
                tracing::warn!(job = %f.key.id, attempt = f.key.attempt,
                    "outcome not recorded: the job was cancelled, or taken over by another worker after its lease expired");
            }
        }
        Ok(cycle)
    }
}
