//! The worker: wires notifier, producer, executors, heartbeat and
//! maintenance together, and takes them down in order on shutdown.
//!
//! Also the single-job mode behind `worker --once`, which uses the same
//! claim, executor, heartbeat and completer, so it behaves exactly like one
//! slot of the daemon.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use deadpool_postgres::Pool;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Settings;
use crate::db;
use crate::observe::metrics;
use crate::ops::dashboard::Dashboard;
use crate::ops::http::StatusServer;
use crate::ops::reload::{ConfigSource, Live, Reloader};
use crate::ops::systemd;
use crate::pipeline::Pipeline;
use crate::queue::completer::{Completer, Finished};
use crate::queue::executor::Executor;
use crate::queue::health::Health;
use crate::queue::heartbeat::Heartbeat;
use crate::queue::maintenance::Maintenance;
use crate::queue::notifier::Notifier;
use crate::queue::outage::Outages;
use crate::queue::producer::Producer;
use crate::queue::retry::RetryPolicy;
use crate::queue::running::{RunningJobs, StopReason};
use crate::queue::shutdown::Shutdown;
use crate::queue::TaskHandler;
use crate::store::claim::claim_one;
use crate::store::{schema, ClaimedJob, Written};
use crate::tasks::DocumentTasks;

/// How long the last outcomes (handed-back jobs included) get to be written
/// after the grace period.
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
    handler: Arc<dyn TaskHandler>,
    /// The handler's pipeline, for a reload's new embedder endpoints.
    pipeline: Arc<Pipeline>,
    outages: Arc<Outages>,
    health: Arc<Health>,
    /// What a reload may change while jobs run.
    concurrency: watch::Sender<usize>,
    retry: watch::Sender<RetryPolicy>,
    /// Stops the heartbeat, notifier, maintenance and HTTP listener at the
    /// very end.
    background: CancellationToken,
}

impl Core {
    /// `None` when shutdown began before the database could be reached.
    async fn start(settings: &Settings, shutdown: &Shutdown) -> Result<Option<Core>> {
        let worker_id: Arc<str> = new_worker_id().into();
        let pool = db::pool(&settings.database, &format!("docworker {worker_id}"))?;
        if !wait_for_database(&pool, shutdown).await? {
            return Ok(None);
        }
        {
            let client = pool.get().await?;
            schema::ensure_current(&client).await?;
        }
        let running = Arc::new(RunningJobs::default());
        let cancels = Arc::new(Notify::new());
        let background = CancellationToken::new();
        let w = &settings.worker;
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
        let pipeline = Arc::new(Pipeline::new(settings)?);
        let handler: Arc<dyn TaskHandler> = Arc::new(DocumentTasks {
            pipeline: pipeline.clone(),
        });
        tokio::spawn({
            let handler = handler.clone();
            async move { handler.check_at_start().await }
        });
        let wake = Arc::new(Notify::new());
        let outages = Outages::new(
            handler.clone(),
            w.max_outage,
            wake.clone(),
            background.clone(),
        );
        let executor = Arc::new(Executor {
            pool: pool.clone(),
            worker_id: worker_id.clone(),
            running: running.clone(),
            job_timeout: w.job_timeout,
            lease: w.lease_duration,
            handler: handler.clone(),
            outages: outages.clone(),
        });
        tracing::info!(worker_id = %worker_id, database = %db::redacted(&db::pg_config(&settings.database, "")?), "worker started");
        Ok(Some(Core {
            pool,
            worker_id,
            running,
            wake,
            cancels,
            executor,
            handler,
            pipeline,
            outages,
            health: Health::new(w.listen),
            concurrency: watch::channel(w.concurrency).0,
            retry: watch::channel(RetryPolicy::from_settings(&settings.retry)).0,
            background,
        }))
    }

    fn completer(&self, settings: &Settings) -> Completer {
        Completer::new(
            &self.worker_id,
            self.retry.subscribe(),
            settings.worker.lease_duration,
            self.handler.unkeyed_task_types(),
        )
    }
}

/// Retries the first connection until it works (true) or shutdown begins
/// (false), so a worker started alongside its database (Compose, boot)
/// simply waits. A refusal that waiting cannot fix (no such database, bad
/// credentials) is an error at once.
async fn wait_for_database(pool: &Pool, shutdown: &Shutdown) -> Result<bool> {
    let mut delay = Duration::from_millis(200);
    loop {
        let e = match pool.get().await {
            Ok(_) => return Ok(true),
            Err(e) => anyhow::Error::new(e),
        };
        if let Some(code) = refusal_code(&e) {
            return Err(e).context(format!(
                "the database refused the connection (SQLSTATE {code}): check database.url / DATABASE_URL"
            ));
        }
        tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "database not reachable yet");
        tokio::select! {
            _ = shutdown.begun() => return Ok(false),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// The SQLSTATE of a refusal no retry can fix: invalid authorization
/// (class 28) or a database that does not exist (3D000).
fn refusal_code(e: &anyhow::Error) -> Option<String> {
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<tokio_postgres::Error>())
        .filter_map(|pg| pg.as_db_error())
        .map(|db| db.code().code().to_owned())
        .find(|code| code.starts_with("28") || code == "3D000")
}

/// The daemon. Returns when a graceful shutdown has completed. `source`
/// is read again on SIGHUP.
pub async fn run(settings: &Settings, source: ConfigSource, shutdown: Shutdown) -> Result<()> {
    // Before the handler is built, so that the gauges it sets are kept.
    let metrics = settings.http.enabled.then(metrics::install).transpose()?;
    let Some(core) = Core::start(settings, &shutdown).await? else {
        tracing::info!("shut down before the database was reachable");
        return Ok(());
    };
    let w = &settings.worker;
    let dashboard_token = watch::channel(settings.http.dashboard_token.clone()).0;
    if let Some(metrics) = metrics {
        let dashboard = settings.http.dashboard.then(|| {
            Arc::new(Dashboard {
                pool: core.pool.clone(),
                health: core.health.clone(),
                handler: core.handler.clone(),
                outages: core.outages.clone(),
                pipeline: core.pipeline.clone(),
                token: dashboard_token.subscribe(),
                csrf: Dashboard::new_csrf(),
                stop: core.background.clone(),
                counts: Default::default(),
            })
        });
        StatusServer {
            health: core.health.clone(),
            pool: core.pool.clone(),
            handler: core.handler.clone(),
            outages: core.outages.clone(),
            running: core.running.clone(),
            concurrency: core.concurrency.subscribe(),
            metrics,
            dashboard,
        }
        .start(settings.http.address, core.background.clone())
        .await?;
        for dependency in core.outages.dependencies() {
            metrics::dependency_up(dependency, true);
        }
    }
    if w.listen {
        tokio::spawn(
            Notifier {
                db: settings.database.clone(),
                application_name: format!("docworker-listener {}", core.worker_id),
                jobs: core.wake.clone(),
                cancels: core.cancels.clone(),
                health: core.health.clone(),
            }
            .run(core.background.clone()),
        );
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

    Reloader {
        source,
        current: settings.clone(),
        live: Live {
            concurrency: core.concurrency.clone(),
            retry: core.retry.clone(),
            pipeline: core.pipeline.clone(),
            dashboard_token,
        },
    }
    .on_sighup(core.background.clone())?;

    let abandon = CancellationToken::new();
    let mut producer = tokio::spawn(
        Producer {
            pool: core.pool.clone(),
            concurrency: core.concurrency.subscribe(),
            executor: core.executor.clone(),
            running: core.running.clone(),
            completer: core.completer(settings),
            outages: core.outages.clone(),
            wake: core.wake.clone(),
            poll_interval: w.poll_interval,
            health: core.health.clone(),
        }
        .run(shutdown.token(), abandon.clone()),
    );
    // Ready once the LISTEN connection is up too: until then new jobs wait
    // for the poll.
    tokio::select! {
        _ = shutdown.begun() => {}
        _ = core.health.listening_up() => {
            tracing::info!(concurrency = w.concurrency, "ready");
            systemd::ready();
            systemd::feed_watchdog(core.health.clone(), core.background.clone());
        }
    }

    shutdown.begun().await;
    systemd::stopping();
    // Phase two: the producer stops claiming and returns once every running
    // job's outcome is written. Running jobs get the grace period, then are
    // stopped, which hands them back.
    let running = core.running.len();
    if running > 0 {
        tracing::info!(running, grace = ?w.shutdown_grace, "waiting for running jobs");
    }
    if tokio::time::timeout(w.shutdown_grace, &mut producer)
        .await
        .is_err()
    {
        tracing::info!(
            running = core.running.len(),
            "grace period over: stopping running jobs and handing them back"
        );
        core.running.stop_all(StopReason::Shutdown);
        if tokio::time::timeout(FINAL_WRITE_TIMEOUT, &mut producer)
            .await
            .is_err()
        {
            tracing::warn!("some jobs did not stop or could not be recorded in time; they run again after their leases expire");
            abandon.cancel();
            let _ = producer.await;
        }
    }
    core.background.cancel();
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
    let Some(core) = Core::start(settings, &shutdown).await? else {
        bail!("stopped before the database was reachable");
    };
    let completer = core.completer(settings);
    let result = once(&core, &completer, settings, job_id, &shutdown).await;
    core.background.cancel();
    result
}

async fn once(
    core: &Core,
    completer: &Completer,
    settings: &Settings,
    job_id: Option<Uuid>,
    shutdown: &Shutdown,
) -> Result<OnceResult> {
    let claimed = match job_id {
        Some(id) => {
            claim_one(
                &core.pool,
                &core.worker_id,
                settings.worker.lease_duration,
                id,
            )
            .await?
        }
        None => {
            let cycle = completer
                .write(&core.pool, &[], 1, &core.outages.paused())
                .await?;
            let claimed_at = cycle.claimed_at;
            cycle
                .claimed
                .into_iter()
                .next()
                .map(|job| (job, claimed_at))
        }
    };
    let Some((job, claimed_at)) = claimed else {
        return Ok(OnceResult::NothingToDo);
    };
    tracing::info!(job = %job.key.id, attempt = job.key.attempt, task_type = %job.task_type, filename = %job.filename, "claimed");

    // A signal during the job hands it back, like the daemon would.
    let watcher = tokio::spawn({
        let shutdown = shutdown.clone();
        let running = core.running.clone();
        async move {
            shutdown.begun().await;
            running.stop_all(StopReason::Shutdown);
        }
    });
    let finished = core.executor.execute(job.clone(), claimed_at).await;
    watcher.abort();
    let Some(finished) = finished else {
        return Ok(OnceResult::Stopped { job });
    };
    let key = finished.key;
    let written = write_one(completer, &core.pool, finished).await;
    core.running.remove(key);
    Ok(OnceResult::Finished {
        job,
        written: written?,
    })
}

/// Writes one outcome, retrying for a while if the database is unreachable.
async fn write_one(completer: &Completer, pool: &Pool, finished: Finished) -> Result<Written> {
    let deadline = Instant::now() + FINAL_WRITE_TIMEOUT * 3;
    let mut delay = Duration::from_millis(100);
    loop {
        let result = completer
            .write(pool, std::slice::from_ref(&finished), 0, &[])
            .await;
        match result.map(|mut cycle| cycle.written.pop()) {
            Ok(Some(Written::Deferred)) if Instant::now() < deadline => {
                tracing::info!(
                    "the job's row is locked by another transaction; waiting to record the outcome"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(Some(Written::Deferred)) => {
                bail!("the job's row stayed locked by another transaction; its outcome was not recorded")
            }
            Ok(Some(written)) => {
                finished.after_written(&written).await;
                return Ok(written);
            }
            Ok(None) => bail!("the outcome was not written"),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %format!("{e:#}"), "could not record the outcome; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).context("recording the job's outcome"),
        }
    }
}
