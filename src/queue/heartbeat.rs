//! The heartbeat: keeps the leases of this process's running jobs alive and
//! stops the jobs it no longer owns.
//!
//! One statement per tick renews every lease this process holds, fenced by
//! (id, attempt, worker id), and reports the jobs it could not renew: those
//! were cancelled from SQL or taken over after their lease expired, and
//! their bodies are stopped at once. A cancel NOTIFY makes it tick early.
//!
//! When renewals fail (database unreachable) the worker cannot know whether
//! it still owns a job once the lease it last renewed has run out, so it
//! stops those jobs itself rather than risk running them twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::running::{RunningJobs, StopReason};
use crate::store::fence::renew_leases;
use crate::store::JobStatus;

pub struct Heartbeat {
    pub pool: Pool,
    pub worker_id: Arc<str>,
    pub running: Arc<RunningJobs>,
    pub interval: Duration,
    pub lease: Duration,
    /// Poked by the notifier when a job was cancelled from SQL.
    pub poke: Arc<Notify>,
}

impl Heartbeat {
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.poke.notified() => {}
            }
            if self.running.is_empty() {
                continue;
            }
            // A renewal that hangs (a half-open connection, a saturated
            // pool) must not keep this loop from stopping expiring jobs.
            match tokio::time::timeout(self.interval, self.beat()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "could not renew job leases")
                }
                Err(_) => tracing::warn!("renewing job leases timed out"),
            }
            // Stop what could expire before the next tick gets a chance to
            // renew it: by then another worker may have taken it over.
            for id in self.running.stop_expiring(Instant::now() + self.interval) {
                tracing::warn!(job = %id, "stopping job: its lease could not be renewed in time, another worker may run it");
            }
        }
    }

    async fn beat(&self) -> Result<()> {
        let keys = self.running.snapshot();
        if keys.is_empty() {
            return Ok(());
        }
        let sent_at = Instant::now();
        let lost = renew_leases(&self.pool, &self.worker_id, &keys, self.lease).await?;
        let mut renewed = keys;
        for lost in lost {
            let key = lost.key;
            renewed.retain(|r| *r != key);
            if lost.busy {
                // Still ours, its row locked by someone else: its lease runs
                // on from the last renewal, and stop_expiring stops it only
                // if the lock outlasts that lease.
                tracing::debug!(job = %key.id, "lease not renewed: another transaction holds the row");
                continue;
            }
            // A job that finished since the snapshot is simply gone: no news.
            if lost.status == Some(JobStatus::Cancelled) {
                if self.running.stop(key, StopReason::Cancelled) {
                    tracing::info!(job = %key.id, "job was cancelled; stopping it");
                }
            } else if self.running.stop(key, StopReason::LeaseLost) {
                tracing::warn!(job = %key.id, status = ?lost.status.map(JobStatus::as_str), "job is no longer ours (its lease expired and another worker took it, or it was changed from outside); stopping it");
            }
        }
        self.running.renewed(&renewed, sent_at, self.lease);
        Ok(())
    }
}
