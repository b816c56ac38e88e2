//! Is this process well? Liveness (its main loop is turning) and readiness
//! (what its jobs need can be reached), as used by `/healthz`, `/readyz`,
//! the systemd watchdog and `READY=1`.
//!
//! Liveness is fed by the producer's loop, not by a timer of its own: a
//! process whose claim loop hangs must look dead, however healthy its other
//! tasks are. Readiness is asked fresh each time, with short timeouts, so a
//! probe never waits on a job's long request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::Notify;

use super::handler::{Check, TaskHandler};

/// The producer's loop turns at least this often, even when idle.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// A main loop silent for longer than this is considered stalled.
pub const STALLED_AFTER: Duration = Duration::from_secs(30);
/// Each readiness check gets this long (a handler's checks too).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Health {
    started: Instant,
    /// Milliseconds after `started` of the main loop's last turn.
    last_beat_ms: AtomicU64,
    /// Whether LISTEN is expected at all (`worker.listen`).
    listen: bool,
    listening: AtomicBool,
    listening_changed: Notify,
}

impl Health {
    pub fn new(listen: bool) -> Arc<Health> {
        Arc::new(Health {
            started: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            listen,
            listening: AtomicBool::new(false),
            listening_changed: Notify::new(),
        })
    }

    /// Called by the main loop on every turn.
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the main loop last turned.
    pub fn since_beat(&self) -> Duration {
        let last = Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    pub fn is_live(&self) -> bool {
        self.since_beat() < STALLED_AFTER
    }

    /// The notifier reports whether its connection is listening.
    pub fn set_listening(&self, on: bool) {
        if self.listening.swap(on, Ordering::Relaxed) != on {
            self.listening_changed.notify_waiters();
        }
    }

    /// Resolves once LISTEN is up (at once in poll-only mode).
    pub async fn listening_up(&self) {
        loop {
            let changed = self.listening_changed.notified();
            if !self.listen || self.listening.load(Ordering::Relaxed) {
                return;
            }
            changed.await;
        }
    }

    /// Every readiness check, run concurrently.
    /// The queue's own (database, LISTEN) and then the handler's.
    pub async fn readiness(&self, pool: &Pool, handler: &dyn TaskHandler) -> Vec<Check> {
        let database = database(pool);
        let listener = async {
            let state = if !self.listen || self.listening.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("the LISTEN connection is down; polling until it is back".to_string())
            };
            Check::new("listener", state)
        };
        let (a, b, mut theirs) = tokio::join!(database, listener, handler.readiness());
        let mut checks = vec![a, b];
        checks.append(&mut theirs);
        checks
    }
}

/// `SELECT 1` on a pooled connection within [`CHECK_TIMEOUT`].
pub async fn database(pool: &Pool) -> Check {
    let result = tokio::time::timeout(CHECK_TIMEOUT, async {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    match result {
        Ok(Ok(_)) => Check::new("database", Ok(())),
        Ok(Err(e)) => Check::new("database", Err(e)),
        Err(_) => Check::new(
            "database",
            Err(format!("no answer within {CHECK_TIMEOUT:?}")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listening_up_waits_for_listen_and_not_in_poll_only_mode() {
        let polling = Health::new(false);
        tokio::time::timeout(Duration::from_millis(100), polling.listening_up())
            .await
            .expect("poll-only mode is ready at once");

        let listening = Health::new(true);
        let waiter = tokio::spawn({
            let h = listening.clone();
            async move { h.listening_up().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        listening.set_listening(true);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("ready once LISTEN is up")
            .unwrap();
    }
}
