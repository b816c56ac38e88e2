//! The notifier: one LISTEN connection that turns NOTIFYs into wake-ups.
//!
//! NOTIFY is only a hint. The connection is health-checked (is it alive, and
//! is it still listening?), re-established with backoff when it breaks, and
//! every (re)connect wakes the producer at once, because anything sent while
//! we were deaf is lost. The producer's poll covers whatever slips through.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::health::Health;
use crate::config::DatabaseSettings;
use crate::observe::metrics;

/// New or due jobs; payload is empty.
pub const JOBS_CHANNEL: &str = "docworker_jobs";
/// A running job was cancelled; payload is its id.
pub const CANCEL_CHANNEL: &str = "docworker_cancel";

const HEALTH_EVERY: Duration = Duration::from_secs(10);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Notifier {
    pub db: DatabaseSettings,
    pub application_name: String,
    /// Wakes the producer.
    pub jobs: Arc<Notify>,
    /// Wakes the heartbeat, which finds out which job was cancelled.
    pub cancels: Arc<Notify>,
    /// Told whether the connection is listening (readiness, `READY=1`).
    pub health: Arc<Health>,
}

impl Notifier {
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut reconnects: u64 = 0;
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.listen_once(&stop) => r,
            };
            self.health.set_listening(false);
            if stop.is_cancelled() {
                return;
            }
            let healthy_for = match result {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "LISTEN connection lost; polling until it is back");
                    Duration::ZERO
                }
            };
            // A connection that served a while starts the backoff over.
            if healthy_for > Duration::from_secs(30) {
                backoff = Duration::from_millis(100);
            }
            reconnects += 1;
            metrics::listener_reconnected();
            let sleep = jittered(backoff);
            tracing::info!(
                reconnects,
                retry_in_ms = sleep.as_millis() as u64,
                "reconnecting the LISTEN connection"
            );
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(sleep) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Listens until the connection fails; returns how long it was healthy.
    async fn listen_once(&self, stop: &CancellationToken) -> Result<Duration> {
        let target = crate::db::target(&self.db, &self.application_name)?;
        let (client, mut connection) =
            target.config.connect(target.tls).await.with_context(|| {
                format!("connecting to {}", crate::db::redacted(&target.config))
            })?;

        // The connection object yields notifications; drive it in a task and
        // forward them. The task ends when the socket does.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.channel().to_owned()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        let _abort_driver = AbortOnDrop(driver.abort_handle());

        client
            .batch_execute(&format!("LISTEN {JOBS_CHANNEL}; LISTEN {CANCEL_CHANNEL}"))
            .await
            .context("LISTEN")?;
        let since = tokio::time::Instant::now();
        tracing::info!("listening for job notifications");
        self.health.set_listening(true);
        // Whatever was announced while we were not listening is lost: look now.
        self.jobs.notify_one();

        let mut health = tokio::time::interval_at(since + HEALTH_EVERY, HEALTH_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(since.elapsed()),
                channel = rx.recv() => match channel.as_deref() {
                    Some(JOBS_CHANNEL) => self.jobs.notify_one(),
                    Some(CANCEL_CHANNEL) => self.cancels.notify_one(),
                    Some(_) => {}
                    None => bail!("the LISTEN connection closed"),
                },
                _ = health.tick() => {
                    let check = client.query_one(
                        "SELECT count(*) FROM pg_listening_channels() AS c WHERE c IN ($1, $2)",
                        &[&JOBS_CHANNEL, &CANCEL_CHANNEL],
                    );
                    match tokio::time::timeout(HEALTH_TIMEOUT, check).await {
                        Ok(Ok(row)) if row.get::<_, i64>(0) == 2 => {}
                        Ok(Ok(_)) => bail!("the connection is no longer listening on both channels"),
                        Ok(Err(e)) => return Err(e).context("health check of the LISTEN connection"),
                        Err(_) => bail!("health check of the LISTEN connection timed out"),
                    }
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `d` shortened by up to a quarter at random, so replicas do not move in step.
pub fn jittered(d: Duration) -> Duration {
    d.mul_f64(1.0 - rand::random::<f64>() * 0.25)
}
