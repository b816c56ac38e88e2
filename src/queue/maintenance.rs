//! Maintenance: the periodic sweeps every worker runs.
//!
//! - Rescue: jobs whose lease expired (their worker was killed, hung or cut
//!   off) go back to `pending`, the lost attempt counted, or to `error` when
//!   no attempts remain. This is how a SIGKILLed worker's job runs again.
//! - Prune: finished rows older than the retention are deleted a few hundred
//!   at a time, so the table and its indexes stay small.
//! - Rollups: batches whose rollup a task write skipped, because another
//!   transaction held the batch, are recounted about once a second.
//! - Vacuum, where autovacuum cannot: every job leaves two dead row
//!   versions behind (its claim and its outcome), so a queue table that
//!   nobody vacuums grows without bound and its scans slow down, however
//!   steady the load. When autovacuum is off (for the cluster, as on some
//!   CI and tuned hosts, or for the table), the worker vacuums the queue's
//!   tables itself at the thresholds autovacuum would use, one worker at a
//!   time; a role that may not is told once, in the log.
//!
//! Every replica sweeps; SKIP LOCKED keeps them out of each other's way.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::notifier::jittered;
use crate::observe::metrics;
use crate::store::{sweep, JobStatus};

/// Expired leases handled per statement.
const RESCUE_BATCH: i64 = 200;
/// Prune statements per sweep at most, so one sweep never runs long.
const PRUNE_ROUNDS: usize = 20;
/// How often batches whose rollup was skipped (their row was locked by
/// another transaction) are recounted, and how many at a time.
const ROLLUP_EVERY: Duration = Duration::from_secs(1);
const ROLLUP_BATCH: i32 = 100;

pub struct Maintenance {
    pub pool: Pool,
    pub interval: Duration,
    /// Zero keeps finished rows forever.
    pub retention: Duration,
    pub prune_batch_size: i64,
    /// Wakes the local producer when rescued jobs are due.
    pub wake: Arc<Notify>,
}

impl Maintenance {
    pub async fn run(self, stop: CancellationToken) {
        let mut told = HashSet::new();
        let mut next_sweep = tokio::time::Instant::now() + jittered(self.interval);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(jittered(ROLLUP_EVERY)) => {
                    if let Err(e) = sweep::refresh_dirty_batches(&self.pool, ROLLUP_BATCH).await {
                        tracing::warn!(error = %format!("{e:#}"), "refreshing batch rollups failed");
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(next_sweep) => {}
            }
            next_sweep = tokio::time::Instant::now() + jittered(self.interval);
            if let Err(e) = self.rescue_expired().await {
                tracing::warn!(error = %format!("{e:#}"), "lease sweep failed");
            }
            if !self.retention.is_zero() {
                if let Err(e) = self.prune().await {
                    tracing::warn!(error = %format!("{e:#}"), "pruning finished jobs failed");
                }
            }
            for table in sweep::QUEUE_TABLES {
                if let Err(e) = self.vacuum_if_nobody_does(table, &mut told).await {
                    tracing::warn!(table, error = %format!("{e:#}"), "vacuuming failed");
                }
            }
        }
    }

    /// Vacuums `table` when autovacuum is off and it holds more dead rows
    /// than autovacuum would allow; returns whether it did. `told` holds
    /// the tables whose state was logged already (once per table).
    pub async fn vacuum_if_nobody_does(
        &self,
        table: &'static str,
        told: &mut HashSet<&'static str>,
    ) -> Result<bool> {
        let state = sweep::vacuum_state(&self.pool, table).await?;
        if state.autovacuum || !state.needs_vacuum() {
            return Ok(false);
        }
        if !state.may_vacuum {
            if told.insert(table) {
                tracing::warn!(
                    table,
                    dead_rows = state.dead_rows,
                    "autovacuum is off and this role may not vacuum the table: it will keep growing; turn autovacuum on, or have its owner run VACUUM on it regularly"
                );
            }
            return Ok(false);
        }
        if told.insert(table) {
            tracing::info!(
                table,
                "autovacuum is off for this table: the workers vacuum it themselves"
            );
        }
        let started = std::time::Instant::now();
        let vacuumed = sweep::vacuum(&self.pool, table).await?;
        if vacuumed {
            tracing::debug!(
                table,
                dead_rows = state.dead_rows,
                took_ms = started.elapsed().as_millis() as u64,
                "autovacuum is off: vacuumed the table"
            );
        }
        Ok(vacuumed)
    }

    /// Returns how many expired jobs were put back or failed.
    pub async fn rescue_expired(&self) -> Result<usize> {
        let mut total = 0;
        loop {
            let rescued = sweep::rescue_expired(&self.pool, RESCUE_BATCH).await?;
            for (id, status) in &rescued {
                tracing::warn!(job = %id, new_status = status.as_str(), "reclaimed a job whose lease expired");
                metrics::lease_reclaimed(if *status == JobStatus::Pending {
                    "retry"
                } else {
                    "failed"
                });
            }
            if rescued.iter().any(|(_, s)| *s == JobStatus::Pending) {
                // Committed: only now can the local producer see them.
                self.wake.notify_one();
            }
            total += rescued.len();
            if (rescued.len() as i64) < RESCUE_BATCH {
                return Ok(total);
            }
        }
    }

    /// Returns how many task rows were deleted.
    pub async fn prune(&self) -> Result<u64> {
        let retention = self.retention.as_secs_f64();
        let mut deleted = 0;
        for _ in 0..PRUNE_ROUNDS {
            let n = sweep::prune_tasks(&self.pool, retention, self.prune_batch_size).await?;
            deleted += n;
            if (n as i64) < self.prune_batch_size {
                break;
            }
        }
        for _ in 0..PRUNE_ROUNDS {
            let n = sweep::prune_batches(&self.pool, retention, self.prune_batch_size).await?;
            if (n as i64) < self.prune_batch_size {
                break;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "pruned finished jobs");
        }
        Ok(deleted)
    }
}
