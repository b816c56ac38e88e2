//! Talking to systemd under `Type=notify`: `READY=1` once the database and
//! the LISTEN connection are up (and again after a reload, which
//! `RELOADING=1` begins), `STOPPING=1` when shutdown begins, and
//! `WATCHDOG=1` only while the main loop turns.
//!
//! Outside systemd (no `$NOTIFY_SOCKET`) every call here does nothing.

use std::sync::Arc;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::queue::health::{Health, BEAT_EVERY};

pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("running jobs")]);
}

/// Between `RELOADING=1` and the next `READY=1` systemd holds
/// `systemctl reload` (and other jobs) back.
pub fn reloading() {
    send(&[
        NotifyState::Reloading,
        NotifyState::Status("reloading the configuration"),
    ]);
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("shutting down: finishing running jobs"),
    ]);
}

/// Feeds the watchdog (`WatchdogSec=`) at half its period, but only while
/// the producer's loop is turning: a worker whose claim loop hangs stops
/// feeding it and systemd restarts it.
pub fn feed_watchdog(health: Arc<Health>, stop: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = period / 2;
    // The idle loop turns every BEAT_EVERY: a shorter watchdog period must
    // not read a loop between two turns as stalled.
    let stalled_after = every.max(BEAT_EVERY * 2);
    tracing::info!(?period, "systemd watchdog enabled");
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let since = health.since_beat();
            if since < stalled_after {
                send(&[NotifyState::Watchdog]);
            } else {
                tracing::warn!(
                    ?since,
                    "the main loop has not turned; not feeding the systemd watchdog"
                );
            }
        }
    });
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}
