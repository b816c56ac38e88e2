//! Waiting out a dependency's outage instead of failing jobs on it.
//!
//! A job whose body fails because a service did not answer
//! ([`JobError::dependency`]) is not necessarily a failed job: when the
//! service is down for everyone, the attempt is handed back unspent and the
//! producer stops claiming the task types that need the service, while the
//! rest of the queue goes on. One probe decides which case it is: a service
//! that answers its probe at once failed only this job, which is retried
//! with backoff like any transient error (a request that fails every time
//! must not loop forever unspent). A service found down is probed with
//! capped backoff until it answers; the outage is logged once when it
//! begins and once when it ends, and shows in `/readyz` and the metrics.
//!
//! An outage longer than `worker.max_outage` stops the waiting: the paused
//! task types are claimed again and their jobs fail for good, naming the
//! service, so the app's users see an answer rather than a job pending
//! forever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::completer::Outcome;
use super::handler::TaskHandler;
use super::job::JobError;
use super::notifier::jittered;
use crate::observe::metrics;

/// The first probe after an outage begins, doubling up to [`PROBE_EVERY_MAX`].
const PROBE_FIRST: Duration = Duration::from_secs(1);
const PROBE_EVERY_MAX: Duration = Duration::from_secs(15);
/// A probe gets this long; a model may have to load first.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

struct Down {
    since: Instant,
    /// Wall-clock start, as the row's message shows it.
    since_utc: String,
    last_error: String,
    /// Whether the end of waiting (`max_outage`) has been logged.
    gave_up: bool,
}

pub struct Outages {
    handler: Arc<dyn TaskHandler>,
    max_outage: Duration,
    /// The producer's wake-up: claims resume when a service is back.
    wake: Arc<Notify>,
    stop: CancellationToken,
    down: Mutex<HashMap<&'static str, Down>>,
}

impl Outages {
    /// Probers stop with `stop`.
    pub fn new(
        handler: Arc<dyn TaskHandler>,
        max_outage: Duration,
        wake: Arc<Notify>,
        stop: CancellationToken,
    ) -> Arc<Outages> {
        Arc::new(Outages {
            handler,
            max_outage,
            wake,
            stop,
            down: Mutex::new(HashMap::new()),
        })
    }

    /// What to record for a job that failed with `error`. Only an error
    /// naming a dependency is looked at; the others are returned as they are.
    pub async fn judge(self: &Arc<Self>, error: JobError) -> Outcome {
        let Some(dependency) = error.dependency else {
            return Outcome::Failed(error);
        };
        if let Some(outcome) = self.while_down(dependency, &error) {
            return outcome;
        }
        match self.probe(dependency).await {
            // It works for others: this job's own failure.
            Ok(()) => Outcome::Failed(error),
            Err(why) => {
                self.went_down(dependency, &error.message, &why);
                self.while_down(dependency, &error)
                    .unwrap_or(Outcome::Failed(error))
            }
        }
    }

    /// The task types not to claim now: those needing a service that is
    /// down, unless it has been down longer than `max_outage`.
    pub fn paused(&self) -> Vec<&'static str> {
        let down = self.down.lock().unwrap();
        if down.is_empty() {
            return Vec::new();
        }
        self.handler
            .task_types()
            .iter()
            .filter(|t| {
                self.handler.dependencies(t).iter().any(|d| {
                    down.get(d)
                        .is_some_and(|o| o.since.elapsed() < self.max_outage)
                })
            })
            .copied()
            .collect()
    }

    /// Every service some task type needs, for the metrics to list from
    /// the start.
    pub fn dependencies(&self) -> Vec<&'static str> {
        let mut all: Vec<&'static str> = self
            .handler
            .task_types()
            .iter()
            .flat_map(|t| self.handler.dependencies(t).iter().copied())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// For `/readyz`: each service that is down, with what it means.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let down = self.down.lock().unwrap();
        let mut lines: Vec<_> = down
            .iter()
            .map(|(name, o)| {
                let waiting = if o.since.elapsed() < self.max_outage {
                    "jobs that need it wait"
                } else {
                    "past worker.max_outage: jobs that need it fail"
                };
                (
                    *name,
                    format!(
                        "down since {} UTC ({:.0}s), {waiting}; last error: {}",
                        o.since_utc,
                        o.since.elapsed().as_secs_f64(),
                        o.last_error
                    ),
                )
            })
            .collect();
        lines.sort();
        lines
    }

    fn while_down(&self, dependency: &'static str, error: &JobError) -> Option<Outcome> {
        let down = self.down.lock().unwrap();
        let o = down.get(dependency)?;
        let elapsed = o.since.elapsed();
        Some(if elapsed < self.max_outage {
            Outcome::DependencyDown(format!(
                "Paused: {dependency} has been unavailable since {} UTC. The job runs again once it is back; this attempt does not count. Last error: {}",
                o.since_utc, error.message
            ))
        } else {
            Outcome::Failed(JobError::permanent(format!(
                "{dependency} has been unavailable since {} UTC, longer than worker.max_outage ({}), so docworker stopped waiting for it. Retry the job once it is back. Last error: {}",
                o.since_utc,
                humantime::format_duration(self.max_outage),
                error.message
            )))
        })
    }

    fn went_down(self: &Arc<Self>, dependency: &'static str, error: &str, probe: &str) {
        let mut down = self.down.lock().unwrap();
        if down.contains_key(dependency) {
            return;
        }
        down.insert(
            dependency,
            Down {
                since: Instant::now(),
                since_utc: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string()
                    .replace('T', " ")
                    .trim_end_matches('Z')
                    .to_string(),
                last_error: probe.to_owned(),
                gave_up: false,
            },
        );
        drop(down);
        tracing::warn!(
            dependency,
            error,
            probe,
            paused = ?self.paused(),
            max_outage = %humantime::format_duration(self.max_outage),
            "dependency unavailable: pausing the jobs that need it until it is back"
        );
        metrics::dependency_up(dependency, false);
        let this = self.clone();
        tokio::spawn(async move { this.probe_until_back(dependency).await });
    }

    async fn probe_until_back(&self, dependency: &'static str) {
        let mut delay = PROBE_FIRST;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(jittered(delay)) => {}
            }
            let probed = self.probe(dependency).await;
            let mut down = self.down.lock().unwrap();
            let Some(o) = down.get_mut(dependency) else {
                return;
            };
            match probed {
                Ok(()) => {
                    let lasted = o.since.elapsed();
                    down.remove(dependency);
                    drop(down);
                    tracing::info!(
                        dependency,
                        down_for_s = lasted.as_secs(),
                        "dependency back: resuming the jobs that need it"
                    );
                    metrics::dependency_up(dependency, true);
                    self.wake.notify_one();
                    return;
                }
                Err(why) => {
                    o.last_error = why;
                    if !o.gave_up && o.since.elapsed() >= self.max_outage {
                        o.gave_up = true;
                        tracing::error!(
                            dependency,
                            max_outage = %humantime::format_duration(self.max_outage),
                            error = %o.last_error,
                            "dependency unavailable for longer than worker.max_outage: failing the jobs that need it until it is back"
                        );
                        self.wake.notify_one();
                    }
                }
            }
            delay = (delay * 2).min(PROBE_EVERY_MAX);
        }
    }

    async fn probe(&self, dependency: &'static str) -> Result<(), String> {
        tokio::time::timeout(PROBE_TIMEOUT, self.handler.probe(dependency))
            .await
            .unwrap_or_else(|_| Err(format!("no answer to the probe within {PROBE_TIMEOUT:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::job::{ErrorKind, JobSpec};
    use crate::queue::progress::JobContext;
    use futures_util::future::BoxFuture;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// `ingest` needs `store` and `model`, `delete` only `store`, `noop` nothing.
    #[derive(Default)]
    struct Services {
        store_up: AtomicBool,
    }

    impl TaskHandler for Services {
        fn task_types(&self) -> &[&'static str] {
            &["ingest", "delete", "noop"]
        }
        fn dependencies(&self, task_type: &str) -> &'static [&'static str] {
            match task_type {
                "ingest" => &["model", "store"],
                "delete" => &["store"],
                _ => &[],
            }
        }
        fn probe(&self, dependency: &'static str) -> BoxFuture<'_, Result<(), String>> {
            let up = dependency != "store" || self.store_up.load(Ordering::SeqCst);
            Box::pin(async move {
                if up {
                    Ok(())
                } else {
                    Err("refused".into())
                }
            })
        }
        fn run<'a>(
            &'a self,
            _: &'a JobSpec,
            _: &'a JobContext,
        ) -> BoxFuture<'a, Result<(), JobError>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn outages(services: Arc<Services>, max_outage: Duration) -> (Arc<Outages>, Arc<Notify>) {
        let wake = Arc::new(Notify::new());
        let o = Outages::new(services, max_outage, wake.clone(), CancellationToken::new());
        (o, wake)
    }

    #[tokio::test]
    async fn a_service_that_answers_its_probe_failed_only_this_job() {
        let services = Arc::new(Services::default());
        services.store_up.store(true, Ordering::SeqCst);
        let (o, _) = outages(services, Duration::from_secs(60));
        let error = JobError::unavailable("store", "HTTP 500 on this batch");
        assert_eq!(o.judge(error.clone()).await, Outcome::Failed(error));
        assert!(o.paused().is_empty());
        let plain = JobError::transient("odd answer");
        assert_eq!(o.judge(plain.clone()).await, Outcome::Failed(plain));
    }

    #[tokio::test]
    async fn a_service_down_pauses_what_needs_it_until_its_probe_answers() {
        let services = Arc::new(Services::default());
        let (o, wake) = outages(services.clone(), Duration::from_secs(60));
        let outcome = o
            .judge(JobError::unavailable("store", "connection refused"))
            .await;
        let Outcome::DependencyDown(note) = outcome else {
            panic!("{outcome:?}")
        };
        assert!(note.contains("store has been unavailable since"), "{note}");
        assert!(note.contains("connection refused"), "{note}");
        assert_eq!(o.paused(), ["ingest", "delete"]);
        assert_eq!(o.describe().len(), 1);

        services.store_up.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), wake.notified())
            .await
            .expect("woken once the service is back");
        assert!(o.paused().is_empty());
        assert!(o.describe().is_empty());
    }

    #[tokio::test]
    async fn past_max_outage_jobs_fail_for_good_naming_the_service() {
        let services = Arc::new(Services::default());
        let (o, _) = outages(services, Duration::from_millis(100));
        let error = JobError::unavailable("store", "connection refused");
        assert!(matches!(
            o.judge(error.clone()).await,
            Outcome::DependencyDown(_)
        ));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(o.paused().is_empty(), "claimed again, to fail");
        let Outcome::Failed(e) = o.judge(error).await else {
            panic!()
        };
        assert_eq!(e.kind, ErrorKind::Permanent);
        assert!(
            e.message.starts_with("store has been unavailable since")
                && e.message.contains("worker.max_outage (100ms)"),
            "{}",
            e.message
        );
    }
}
