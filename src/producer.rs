//! The producer: keeps the bounded pool of job slots filled.
//!
//! It owns the slots: a job holds one from its claim until its outcome is
//! written, so the table never shows more `processing` rows for this worker
//! than it has slots. Finished jobs report here; each write cycle records
//! their outcomes and claims replacements in the same statement (see
//! `completer`), never more than the slots that write frees. When a claim
//! comes back short the queue is drained, and the producer sleeps until a
//! NOTIFY, a due retry, or the jittered poll wakes it.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use deadpool_postgres::Pool;
use futures_util::FutureExt;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::completer::{Completer, Finished, Written};
use crate::executor::Executor;
use crate::health::{Health, BEAT_EVERY};
use crate::job::ClaimedJob;
use crate::metrics;
use crate::notifier::jittered;

/// Outcomes recorded per statement at most.
const MAX_BATCH: usize = 1_000;
/// How many times a busy producer lets finishing executors report before
/// it writes: jobs claimed together tend to finish together, and one full
/// cycle costs the database what a single-job cycle does.
const GATHER_YIELDS: usize = 3;

/// What a claim writes: a new attempt, our lease, fresh progress counters.
/// `worker` and `lease` name the parameters holding the worker id and the
/// lease in seconds.
pub fn claim_set(worker: &str, lease: &str) -> String {
    format!(
        "status = 'processing', attempt = t.attempt + 1, locked_by = {worker},
         locked_until = now() + make_interval(secs => {lease}::float8), heartbeat_at = now(),
         started_at = now(), finished_at = NULL, stage = 'started',
         total_chunks = 0, completed_chunks = 0, result = NULL, updated_at = now()"
    )
}

/// What a claim returns, in the order [`ClaimedJob::from_row_at`] reads.
pub fn claim_columns() -> &'static str {
    "t.id, t.attempt, t.max_attempts, t.task_type, t.filename::text, t.file_path, \
     coalesce(t.document_id, t.id), t.options, t.batch_id, \
     greatest(extract(epoch FROM now() - t.run_at), 0)::float8"
}

/// Claims the job $1 whatever its state, unless another worker holds a live
/// lease on it ($2 worker id, $3 lease seconds). For `worker --once --job`.
pub fn claim_one_sql() -> String {
    format!(
        "WITH c AS MATERIALIZED (
             SELECT id FROM job_tasks
              WHERE id = $1 AND (status <> 'processing' OR locked_until < now())
              FOR UPDATE SKIP LOCKED)
         UPDATE job_tasks t
            SET {}
           FROM c WHERE t.id = c.id
         RETURNING {}",
        claim_set("$2", "$3"),
        claim_columns()
    )
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
    Ok(row.map(|r| (ClaimedJob::from_row_at(&r, 0), claimed_at)))
}

/// An executor's report: the outcome to record, or none (the job is no
/// longer ours). Either way its slot comes back once this is handled.
struct Report(Option<Finished>);

pub struct Producer {
    pub pool: Pool,
    /// The number of slots.
    pub concurrency: usize,
    pub executor: Arc<Executor>,
    pub completer: Completer,
    pub wake: Arc<Notify>,
    pub poll_interval: Duration,
    /// Fed on every turn of the loop: this loop's liveness is the process's.
    pub health: Arc<Health>,
}

impl Producer {
    /// Claims and runs jobs until `stop_claiming` fires, then records the
    /// outcomes of the jobs still running and returns once all are recorded.
    /// `abandon` makes it return at once, recording nothing more.
    pub async fn run(self, stop_claiming: CancellationToken, abandon: CancellationToken) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
        // Jobs started whose outcome is not yet written: the slots in use.
        let mut in_use = 0usize;
        let mut unwritten: Vec<Finished> = Vec::new();
        // Whether due jobs may be waiting: true until a claim comes back short.
        let mut busy = true;
        let mut next_poll = tokio::time::Instant::now() + jittered(self.poll_interval);
        let mut error_backoff = Duration::from_millis(100);
        loop {
            self.health.beat();
            let claiming = !stop_claiming.is_cancelled();
            if !claiming && in_use == 0 {
                return;
            }
            // Slots free once `unwritten` is recorded.
            let free = self.concurrency - in_use + unwritten.len();
            if unwritten.is_empty() && !(claiming && busy && free > 0) {
                let can_claim = claiming && free > 0;
                tokio::select! {
                    report = rx.recv() => {
                        take(report, &mut unwritten, &mut in_use);
                    }
                    _ = stop_claiming.cancelled(), if claiming => continue,
                    _ = self.wake.notified(), if can_claim => busy = true,
                    _ = tokio::time::sleep_until(next_poll), if can_claim => {
                        busy = true;
                        next_poll = tokio::time::Instant::now() + jittered(self.poll_interval);
                    }
                    _ = abandon.cancelled() => return,
                    // Nothing to do; turning shows the loop is alive.
                    _ = tokio::time::sleep(BEAT_EVERY) => continue,
                }
            }
            drain(&mut rx, &mut unwritten, &mut in_use);
            if claiming && busy {
                for _ in 0..GATHER_YIELDS {
                    if unwritten.len() == in_use || unwritten.len() >= MAX_BATCH {
                        break;
                    }
                    tokio::task::yield_now().await;
                    drain(&mut rx, &mut unwritten, &mut in_use);
                }
            }
            let claim = if claiming && busy {
                (self.concurrency - in_use + unwritten.len()) as i64
            } else {
                0
            };
            if unwritten.is_empty() && claim == 0 {
                continue;
            }
            match self.completer.write(&self.pool, &unwritten, claim).await {
                Ok(cycle) => {
                    error_backoff = Duration::from_millis(100);
                    in_use -= unwritten.len();
                    for (finished, written) in unwritten.drain(..).zip(&cycle.written) {
                        if finished.after_success.is_some() {
                            let written = written.clone();
                            tokio::spawn(async move { finished.after_written(&written).await });
                        }
                    }
                    for written in &cycle.written {
                        if let Written::Applied {
                            retry_in: Some(delay),
                            ..
                        } = written
                        {
                            metrics::retry_scheduled();
                            self.wake_after(*delay);
                        }
                    }
                    if claim > 0 {
                        busy = cycle.claimed.len() as i64 == claim;
                        if !busy {
                            next_poll = tokio::time::Instant::now() + jittered(self.poll_interval);
                        }
                    }
                    for job in cycle.claimed {
                        in_use += 1;
                        self.start(job, cycle.claimed_at, tx.clone());
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        unrecorded = unwritten.len(),
                        "writing job outcomes / claiming jobs failed; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(jittered(error_backoff)) => {}
                        _ = abandon.cancelled() => {
                            tracing::warn!(unrecorded = unwritten.len(), "exiting with unrecorded outcomes; those jobs run again after their leases expire");
                            return;
                        }
                    }
                    error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
                    busy = true;
                }
            }
        }
    }

    fn start(&self, job: ClaimedJob, claimed_at: Instant, tx: mpsc::UnboundedSender<Report>) {
        let executor = self.executor.clone();
        tokio::spawn(async move {
            // The executor already turns a panicking body into an outcome;
            // this guards the slot against a panic anywhere else.
            let finished = AssertUnwindSafe(executor.execute(job, claimed_at))
                .catch_unwind()
                .await
                .unwrap_or(None);
            let _ = tx.send(Report(finished));
        });
    }

    /// A retry that comes due should not wait for the next poll.
    fn wake_after(&self, delay: Duration) {
        let wake = self.wake.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            wake.notify_one();
        });
    }
}

fn take(report: Option<Report>, unwritten: &mut Vec<Finished>, in_use: &mut usize) {
    match report {
        Some(Report(Some(finished))) => unwritten.push(finished),
        // Nothing to record: the slot is free now.
        Some(Report(None)) => *in_use -= 1,
        // The producer holds a sender, so the channel never closes.
        None => {}
    }
}

fn drain(
    rx: &mut mpsc::UnboundedReceiver<Report>,
    unwritten: &mut Vec<Finished>,
    in_use: &mut usize,
) {
    while unwritten.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(report) => take(Some(report), unwritten, in_use),
            Err(_) => break,
        }
    }
}
