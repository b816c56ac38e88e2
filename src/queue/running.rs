//! The jobs this process is running right now, and how to stop one.
//!
//! Shared by the executor (adds and removes its job), the heartbeat (renews
//! every lease in one statement, stops jobs it lost) and shutdown (stops all).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::job::Attempt;

/// Why a running body was stopped before it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The process is shutting down and the grace period is over: hand back.
    Shutdown,
    /// Cancelled from SQL: the row is already final, write nothing.
    Cancelled,
    /// Another worker may own the job now (lease expired or stolen): write nothing.
    LeaseLost,
}

/// Stops one job's body; the first reason given wins.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    token: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
}

impl StopSignal {
    pub fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.get().copied()
    }

    pub async fn stopped(&self) {
        self.token.cancelled().await
    }
}

struct Entry {
    attempt: i32,
    stop: StopSignal,
    /// After this instant the lease may have expired on the server (no
    /// renewal succeeded): the job must stop, someone else may run it.
    lease_expires: Instant,
    /// The body has returned; the job stays here (its lease renewed) only
    /// until its outcome is written, and there is nothing left to stop.
    body_done: bool,
}

#[derive(Default)]
pub struct RunningJobs {
    jobs: Mutex<HashMap<Uuid, Entry>>,
}

impl RunningJobs {
    pub fn insert(&self, key: Attempt, stop: StopSignal, claimed_at: Instant, lease: Duration) {
        let entry = Entry {
            attempt: key.attempt,
            stop,
            lease_expires: claimed_at + lease,
            body_done: false,
        };
        if let Some(stale) = self.lock().insert(key.id, entry) {
            // Cannot happen while attempts fence claims; stop the old body
            // rather than let two run.
            stale.stop.stop(StopReason::LeaseLost);
        }
    }

    pub fn remove(&self, key: Attempt) {
        let mut jobs = self.lock();
        if jobs.get(&key.id).is_some_and(|e| e.attempt == key.attempt) {
            jobs.remove(&key.id);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every running job's (id, attempt), for one batched heartbeat.
    pub fn snapshot(&self) -> Vec<Attempt> {
        self.lock()
            .iter()
            .map(|(id, e)| Attempt {
                id: *id,
                attempt: e.attempt,
            })
            .collect()
    }

    /// Records that the leases of `keys` were renewed by a statement sent at `sent_at`.
    pub fn renewed(&self, keys: &[Attempt], sent_at: Instant, lease: Duration) {
        let mut jobs = self.lock();
        for key in keys {
            if let Some(e) = jobs.get_mut(&key.id).filter(|e| e.attempt == key.attempt) {
                e.lease_expires = e.lease_expires.max(sent_at + lease);
            }
        }
    }

    /// How long this attempt's lease surely lasts on the server (zero once
    /// it may have expired); `None` if the attempt is not running here.
    pub fn lease_left(&self, key: Attempt) -> Option<Duration> {
        self.lock()
            .get(&key.id)
            .filter(|e| e.attempt == key.attempt)
            .map(|e| e.lease_expires.saturating_duration_since(Instant::now()))
    }

    /// The attempt's body has returned an outcome, which waits to be
    /// written: the heartbeat renews its lease but has nothing to stop.
    pub fn body_done(&self, key: Attempt) {
        if let Some(e) = self
            .lock()
            .get_mut(&key.id)
            .filter(|e| e.attempt == key.attempt)
        {
            e.body_done = true;
        }
    }

    /// Stops this attempt of the job if its body is still running here;
    /// says whether it was. A newer attempt of the same job is left alone.
    pub fn stop(&self, key: Attempt, reason: StopReason) -> bool {
        match self
            .lock()
            .get(&key.id)
            .filter(|e| e.attempt == key.attempt && !e.body_done)
        {
            Some(e) => {
                e.stop.stop(reason);
                true
            }
            None => false,
        }
    }

    pub fn stop_all(&self, reason: StopReason) {
        for e in self.lock().values() {
            e.stop.stop(reason);
        }
    }

    /// Stops the jobs whose lease may have run out on the server by
    /// `deadline`; returns them.
    pub fn stop_expiring(&self, deadline: Instant) -> Vec<Uuid> {
        let jobs = self.lock();
        jobs.iter()
            .filter(|(_, e)| e.lease_expires <= deadline && !e.body_done)
            .map(|(id, e)| {
                e.stop.stop(StopReason::LeaseLost);
                *id
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Entry>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u128, attempt: i32) -> Attempt {
        Attempt {
            id: Uuid::from_u128(n),
            attempt,
        }
    }

    const LEASE: Duration = Duration::from_secs(30);

    #[test]
    fn a_lease_runs_from_the_claim_and_a_renewal_only_extends_it() {
        let jobs = RunningJobs::default();
        let claimed = Instant::now();
        jobs.insert(key(1, 1), StopSignal::default(), claimed, LEASE);
        let left = jobs.lease_left(key(1, 1)).unwrap();
        assert!(
            left <= LEASE && left > LEASE - Duration::from_secs(5),
            "{left:?}"
        );
        // A renewal sent before the claim (a slow statement) must not shorten it.
        jobs.renewed(&[key(1, 1)], claimed - Duration::from_secs(20), LEASE);
        assert!(jobs.lease_left(key(1, 1)).unwrap() > LEASE - Duration::from_secs(5));
        // A later one extends it.
        jobs.renewed(&[key(1, 1)], claimed + Duration::from_secs(20), LEASE);
        assert!(jobs.lease_left(key(1, 1)).unwrap() > LEASE);
        // Another attempt of the same job is not this one.
        assert_eq!(jobs.lease_left(key(1, 2)), None);
    }

    #[test]
    fn jobs_whose_lease_may_lapse_before_the_next_tick_are_stopped() {
        let jobs = RunningJobs::default();
        let now = Instant::now();
        let (old, fresh) = (StopSignal::default(), StopSignal::default());
        jobs.insert(key(1, 1), old.clone(), now - Duration::from_secs(25), LEASE);
        jobs.insert(key(2, 1), fresh.clone(), now, LEASE);
        let heartbeat = Duration::from_secs(10);
        let stopped = jobs.stop_expiring(now + heartbeat);
        assert_eq!(stopped, vec![Uuid::from_u128(1)]);
        assert_eq!(old.reason(), Some(StopReason::LeaseLost));
        assert_eq!(fresh.reason(), None);
    }

    #[test]
    fn the_first_stop_reason_wins_and_a_stale_attempt_is_left_alone() {
        let jobs = RunningJobs::default();
        let stop = StopSignal::default();
        jobs.insert(key(1, 2), stop.clone(), Instant::now(), LEASE);
        assert!(!jobs.stop(key(1, 1), StopReason::Cancelled));
        assert!(jobs.stop(key(1, 2), StopReason::Shutdown));
        jobs.stop_all(StopReason::LeaseLost);
        assert_eq!(stop.reason(), Some(StopReason::Shutdown));
        jobs.remove(key(1, 1));
        assert_eq!(jobs.len(), 1, "removing another attempt keeps this one");
        jobs.remove(key(1, 2));
        assert!(jobs.is_empty());
    }

    /// A job whose outcome waits to be written (its row completed by the
    /// write racing the heartbeat, or locked by another transaction) has
    /// nothing to stop: no "no longer ours" report, no lease-lost stop.
    #[test]
    fn a_finished_body_is_not_stopped() {
        let jobs = RunningJobs::default();
        let stop = StopSignal::default();
        let long_ago = Instant::now() - Duration::from_secs(60);
        jobs.insert(key(1, 1), stop.clone(), long_ago, LEASE);
        jobs.body_done(key(1, 1));
        assert!(!jobs.stop(key(1, 1), StopReason::LeaseLost));
        assert!(jobs.stop_expiring(Instant::now()).is_empty());
        assert_eq!(stop.reason(), None);
        assert_eq!(
            jobs.snapshot(),
            vec![key(1, 1)],
            "its lease is still renewed"
        );
    }

    #[test]
    fn a_second_insert_of_one_job_stops_the_first_body() {
        let jobs = RunningJobs::default();
        let first = StopSignal::default();
        jobs.insert(key(1, 1), first.clone(), Instant::now(), LEASE);
        jobs.insert(key(1, 2), StopSignal::default(), Instant::now(), LEASE);
        assert_eq!(first.reason(), Some(StopReason::LeaseLost));
        assert_eq!(jobs.snapshot(), vec![key(1, 2)]);
    }
}
