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

use deadpool_postgres::Pool;
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::completer::{Completer, Finished};
use super::executor::Executor;
use super::health::{Health, BEAT_EVERY};
use super::job::ClaimedJob;
use super::notifier::jittered;
use super::outage::Outages;
use super::running::RunningJobs;
use super::slots::Slots;
use crate::observe::metrics;
use crate::store::Written;

/// Outcomes recorded per statement at most.
const MAX_BATCH: usize = 1_000;
/// How many times a busy producer lets finishing executors report before
/// it writes: jobs claimed together tend to finish together, and one full
/// cycle costs the database what a single-job cycle does.
const GATHER_YIELDS: usize = 3;

/// An executor's report: the outcome to record, or none (the job is no
/// longer ours). Either way its slot comes back once this is handled.
struct Report(Option<Finished>);

pub struct Producer {
    pub pool: Pool,
    /// The number of slots; a reload may change it while jobs run.
    pub concurrency: watch::Receiver<usize>,
    pub executor: Arc<Executor>,
    /// A job leaves it once its outcome is written (the heartbeat renews
    /// its lease until then).
    pub running: Arc<RunningJobs>,
    pub completer: Completer,
    /// Which task types not to claim while a dependency is down.
    pub outages: Arc<Outages>,
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
        let mut concurrency = self.concurrency.clone();
        let mut slots = Slots::new(*concurrency.borrow_and_update());
        // Whether due jobs may be waiting: true until a claim comes back short.
        let mut busy = true;
        let mut next_poll = tokio::time::Instant::now() + jittered(self.poll_interval);
        let mut error_backoff = Duration::from_millis(100);
        loop {
            self.health.beat();
            if concurrency.has_changed().unwrap_or(false) {
                slots.resize(*concurrency.borrow_and_update());
                busy = true;
            }
            slots.take_due(Instant::now());
            let claiming = !stop_claiming.is_cancelled();
            if !claiming && slots.in_use() == 0 {
                return;
            }
            let free = slots.free_after_write();
            if slots.unwritten.is_empty() && !(claiming && busy && free > 0) {
                let can_claim = claiming && free > 0;
                let deferred_due = slots.next_due().map(tokio::time::Instant::from_std);
                tokio::select! {
                    report = rx.recv() => {
                        // The producer holds a sender, so the channel never closes.
                        if let Some(Report(finished)) = report {
                            slots.reported(finished);
                        }
                    }
                    _ = stop_claiming.cancelled(), if claiming => continue,
                    _ = changed(&mut concurrency) => {
                        slots.resize(*concurrency.borrow_and_update());
                        busy = true;
                        continue;
                    }
                    _ = self.wake.notified(), if can_claim => busy = true,
                    _ = tokio::time::sleep_until(next_poll), if can_claim => {
                        busy = true;
                        next_poll = tokio::time::Instant::now() + jittered(self.poll_interval);
                    }
                    _ = sleep_until_some(deferred_due), if deferred_due.is_some() => continue,
                    _ = abandon.cancelled() => return,
                    // Nothing to do; turning shows the loop is alive.
                    _ = tokio::time::sleep(BEAT_EVERY) => continue,
                }
            }
            drain(&mut rx, &mut slots);
            if claiming && busy {
                for _ in 0..GATHER_YIELDS {
                    if slots.all_reported() || slots.unwritten.len() >= MAX_BATCH {
                        break;
                    }
                    tokio::task::yield_now().await;
                    drain(&mut rx, &mut slots);
                }
            }
            let claim = slots.to_claim(claiming && busy);
            if slots.unwritten.is_empty() && claim == 0 {
                continue;
            }
            match self
                .completer
                .write(&self.pool, &slots.unwritten, claim, &self.outages.paused())
                .await
            {
                Ok(cycle) => {
                    error_backoff = Duration::from_millis(100);
                    let recorded = slots.cycle_done(cycle.claimed.len());
                    for (finished, written) in recorded.into_iter().zip(&cycle.written) {
                        if *written == Written::Deferred {
                            slots.defer(finished, Instant::now());
                            continue;
                        }
                        self.running.remove(finished.key);
                        if let Written::Applied {
                            retry_in: Some(delay),
                            ..
                        } = written
                        {
                            metrics::retry_scheduled();
                            self.wake_after(*delay);
                        }
                        if finished.after_commit.is_some() {
                            let written = written.clone();
                            tokio::spawn(async move { finished.after_written(&written).await });
                        }
                    }
                    if claim > 0 {
                        busy = cycle.claimed.len() as i64 == claim;
                        if !busy {
                            next_poll = tokio::time::Instant::now() + jittered(self.poll_interval);
                        }
                    }
                    for job in cycle.claimed {
                        self.start(job, cycle.claimed_at, tx.clone());
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        unrecorded = slots.unwritten.len(),
                        "writing job outcomes / claiming jobs failed; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(jittered(error_backoff)) => {}
                        _ = abandon.cancelled() => {
                            tracing::warn!(unrecorded = slots.unwritten.len(), "exiting with unrecorded outcomes; those jobs run again after their leases expire");
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

/// Resolves when the value changes; never, once its sender is gone.
async fn changed(rx: &mut watch::Receiver<usize>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

fn drain(rx: &mut mpsc::UnboundedReceiver<Report>, slots: &mut Slots) {
    while slots.unwritten.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(Report(finished)) => slots.reported(finished),
            Err(_) => break,
        }
    }
}
