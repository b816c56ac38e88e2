//! The worker: wires notifier, producer, executors, heartbeat, completer and
//! maintenance together, and takes them down in order on shutdown.
//!
//! Also the single-job mode behind `worker --once`, which reuses the same
//! claim, executor, heartbeat and completer so that it behaves exactly like
//! one slot of the daemon.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use deadpool_postgres::Pool;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::completer::{Completer, CompleterHandle, Written};
use crate::config::Settings;
use crate::executor::Executor;
use crate::heartbeat::Heartbeat;
use crate::job::ClaimedJob;
use crate::maintenance::Maintenance;
use crate::notifier::Notifier;
use crate::producer::{self, Producer};
use crate::retry::RetryPolicy;
use crate::running::{RunningJobs, StopReason};
use crate::shutdown::Shutdown;
use crate::{db, schema};

/// How long handed-back jobs and the last outcomes get to be written after
/// the grace period.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh id per process start: host, pid and a random suffix, so that a
/// restarted process never inherits the leases of its previous life.
pub fn new_worker_id() -> String {
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// The parts every mode shares.
struct Core {
    pool: Pool,
    worker_id: Arc<str>,
    running: Arc<RunningJobs>,
    wake: Arc<Notify>,
    cancels: Arc<Notify>,
    executor: Arc<Executor>,
    completer: CompleterHandle,
    completer_task: tokio::task::JoinHandle<()>,
    /// Stops the heartbeat, notifier and maintenance at the very end.
    background: CancellationToken,
    /// Fires when the process must stop writing and go.
    abandon: CancellationToken,
}

impl Core {
    async fn start(settings: &Settings, shutdown: &Shutdown) -> Result<Core> {
        let worker_id: Arc<str> = new_worker_id().into();
        let pool = db::pool(&settings.database, &format!("docworker {worker_id}"))?;
        wait_for_database(&pool, shutdown).await?;
        {
            let client = pool.get().await?;
            schema::ensure_current(&client).await?;
        }
        let running = Arc::new(RunningJobs::default());
        let wake = Arc::new(Notify::new());
        let cancels = Arc::new(Notify::new());
        let background = CancellationToken::new();
        let abandon = CancellationToken::new();
        let w = &settings.worker;

        let (completer, handle) = Completer::new(
            pool.clone(),
            worker_id.clone(),
            RetryPolicy::from_settings(&settings.retry),
            wake.clone(),
        );
        let completer_task = tokio::spawn(completer.run(abandon.clone()));
        tokio::spawn(
            Heartbeat {
                pool: pool.clone(),
                worker_id: worker_id.clone(),
                running: running.clone(),
                interval: w.heartbeat_interval,
                lease: w.lease_duration,
                poke: cancels.clone(),
            }
            .run(background.clone()),
        );
        let executor = Arc::new(Executor {
            pool: pool.clone(),
            worker_id: worker_id.clone(),
            running: running.clone(),
            job_timeout: w.job_timeout,
            lease: w.lease_duration,
        });
        tracing::info!(worker_id = %worker_id, database = %db::redacted(&db::pg_config(&settings.database, "")?), "worker started");
        Ok(Core {
            pool,
            worker_id,
            running,
            wake,
            cancels,
            executor,
            completer: handle,
            completer_task,
            background,
            abandon,
        })
    }

    fn start_notifier(&self, settings: &Settings) -> tokio::sync::watch::Receiver<bool> {
        let (connected, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(
            Notifier {
                db: settings.database.clone(),
                application_name: format!("docworker-listener {}", self.worker_id),
                jobs: self.wake.clone(),
                cancels: self.cancels.clone(),
                connected,
            }
            .run(self.background.clone()),
        );
        rx
    }

    /// Lets the completer write what is queued, then stops the rest.
    async fn finish(self) {
        let Core {
            completer,
            completer_task,
            background,
            abandon,
            ..
        } = self;
        drop(completer);
        if tokio::time::timeout(FINAL_WRITE_TIMEOUT, completer_task)
            .await
            .is_err()
        {
            tracing::warn!("gave up writing the last job outcomes; those jobs run again after their leases expire");
            abandon.cancel();
        }
        background.cancel();
    }
}

/// Retries the first connection until it works or shutdown begins, so a
/// worker started alongside its database (Compose, boot) simply waits.
async fn wait_for_database(pool: &Pool, shutdown: &Shutdown) -> Result<()> {
    let mut delay = Duration::from_millis(200);
    loop {
        match pool.get().await {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "database not reachable yet");
                tokio::select! {
                    _ = shutdown.begun() => return Err(e).context("database not reachable"),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// The daemon. Returns when a graceful shutdown has completed.
pub async fn run(settings: &Settings, shutdown: Shutdown) -> Result<()> {
    let core = Core::start(settings, &shutdown).await?;
    let w = &settings.worker;
    if w.listen {
        core.start_notifier(settings);
    } else {
        tracing::info!(poll_interval = ?w.poll_interval, "poll-only mode: not listening for notifications");
    }
    tokio::spawn(
        Maintenance {
            pool: core.pool.clone(),
            interval: settings.maintenance.interval,
            retention: settings.maintenance.retention,
            prune_batch_size: settings.maintenance.prune_batch_size,
            wake: core.wake.clone(),
        }
        .run(core.background.clone()),
    );

    let slots = Arc::new(Semaphore::new(w.concurrency));
    let producer = tokio::spawn(
        Producer {
            pool: core.pool.clone(),
            concurrency: w.concurrency,
            worker_id: core.worker_id.clone(),
            slots: slots.clone(),
            executor: core.executor.clone(),
            completer: core.completer.clone(),
            wake: core.wake.clone(),
            poll_interval: w.poll_interval,
            lease: w.lease_duration,
        }
        .run(shutdown.token()),
    );
    tracing::info!(concurrency = w.concurrency, "ready");

    shutdown.begun().await;
    producer.await.ok();

    // Phase two: running jobs get the grace period, then are stopped and
    // handed back. All slots free means every executor has sent its outcome.
    let all = w.concurrency as u32;
    let running = core.running.len();
    if running > 0 {
        tracing::info!(running, grace = ?w.shutdown_grace, "waiting for running jobs");
    }
    if tokio::time::timeout(w.shutdown_grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::info!(
            running = core.running.len(),
            "grace period over: stopping running jobs and handing them back"
        );
        core.running.stop_all(StopReason::Shutdown);
        if tokio::time::timeout(FINAL_WRITE_TIMEOUT, slots.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("some job bodies did not stop in time; their jobs run again after their leases expire");
        }
    }
    core.finish().await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// What `worker --once` saw happen.
#[derive(Debug)]
pub enum OnceResult {
    NothingToDo,
    Finished {
        job: ClaimedJob,
        written: Written,
    },
    /// The body stopped without an outcome to write (cancelled, lease lost).
    Stopped {
        job: ClaimedJob,
    },
}

/// Claims one due job (or `job_id`), runs it in the foreground and waits
/// until its outcome is written.
pub async fn run_once(
    settings: &Settings,
    job_id: Option<Uuid>,
    shutdown: Shutdown,
) -> Result<OnceResult> {
    let core = Core::start(settings, &shutdown).await?;
    let lease = settings.worker.lease_duration;
    let claimed = match job_id {
        Some(id) => producer::claim_one(&core.pool, &core.worker_id, lease, id).await?,
        None => {
            let client = core.pool.get().await?;
            let worker_id: &str = &core.worker_id;
            let claimed_at = Instant::now();
            client
                .query_opt(
                    &producer::claim_sql(),
                    &[&1i64, &worker_id, &lease.as_secs_f64()],
                )
                .await?
                .map(|row| (ClaimedJob::from_row(&row), claimed_at))
        }
    };
    let Some((job, claimed_at)) = claimed else {
        core.finish().await;
        return Ok(OnceResult::NothingToDo);
    };
    tracing::info!(job = %job.key.id, attempt = job.key.attempt, task_type = %job.task_type, filename = %job.filename, "claimed");

    // A signal during the job hands it back, like the daemon would.
    let running = core.running.clone();
    let watcher = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            shutdown.begun().await;
            running.stop_all(StopReason::Shutdown);
        }
    });
    let finished = core.executor.execute(job.clone(), claimed_at).await;
    watcher.abort();
    let result = match finished {
        Some(finished) => match core.completer.send_and_wait(finished).await {
            Some(written) => OnceResult::Finished { job, written },
            None => anyhow::bail!("the outcome could not be recorded"),
        },
        None => OnceResult::Stopped { job },
    };
    core.finish().await;
    Ok(result)
}
