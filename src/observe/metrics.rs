//! Prometheus metrics: every name the worker exports, in one place, and the
//! recorder behind `/metrics`.
//!
//! The rest of the code reports through the small functions here, never
//! through metric names of its own, so the list below is the whole contract
//! with dashboards. Without an installed recorder (the HTTP listener off,
//! `--once`, the CLI commands) every call is a no-op costing an atomic load.
//!
//! Two kinds of numbers: what this process did (counters and histograms,
//! recorded as it happens) and what the table holds (gauges, read from the
//! database at each scrape by [`crate::store::stats`], so they are the same on
//! every replica).

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::stats::QueueSnapshot;
use crate::store::Stage;

/// Gauge, by `status`: rows of `job_tasks`.
pub const JOBS: &str = "docworker_jobs";
/// Gauge: pending jobs that are due now.
pub const QUEUE_DEPTH: &str = "docworker_queue_depth";
/// Gauge: pending jobs waiting for a retry or a future `run_at`.
pub const SCHEDULED: &str = "docworker_jobs_scheduled";
/// Gauge: seconds the oldest due job has waited (0 when none is due).
pub const OLDEST_PENDING_AGE: &str = "docworker_oldest_pending_age_seconds";
/// Gauge: 1 when the last scrape could read the table.
pub const DATABASE_UP: &str = "docworker_database_up";
/// Gauge: jobs this process runs now, and the slots it has.
pub const RUNNING: &str = "docworker_running_jobs";
pub const CONCURRENCY: &str = "docworker_concurrency";
/// Histogram: seconds from a job being due to its claim.
pub const PICKUP_LATENCY: &str = "docworker_pickup_latency_seconds";
/// Histogram, by `task_type` and `outcome`: seconds from claim to outcome.
pub const JOB_DURATION: &str = "docworker_job_duration_seconds";
/// Histogram, by `stage`: seconds spent in each stage (`started` runs from
/// the claim to the body's first stage).
pub const STAGE_DURATION: &str = "docworker_stage_duration_seconds";
/// Counter, by `task_type` and `outcome` (completed, transient_error,
/// permanent_error, handed_back, dependency_down, stopped): attempts this
/// process finished.
pub const JOBS_FINISHED: &str = "docworker_jobs_finished_total";
/// Counter: failed attempts scheduled to run again (a transient error with
/// attempts left).
pub const RETRIES: &str = "docworker_retries_total";
/// Counter, by `outcome` (retry, failed): expired leases this process reclaimed.
pub const LEASE_RECLAIMS: &str = "docworker_lease_reclaims_total";
/// Gauge, by `dependency` (embedder, chroma): 0 while this process finds it
/// down and pauses the jobs that need it, 1 otherwise.
pub const DEPENDENCY_UP: &str = "docworker_dependency_up";
/// Gauge, by `endpoint` (a URL of embed.url): 1 while it is in rotation, 0
/// while it is out and being probed.
pub const EMBED_ENDPOINT_UP: &str = "docworker_embed_endpoint_up";
/// Counter: times the LISTEN connection was re-established.
pub const LISTENER_RECONNECTS: &str = "docworker_listener_reconnects_total";
/// Counter, by `service` (embedder, chroma) and `op`: HTTP requests made.
pub const REQUESTS: &str = "docworker_requests_total";
/// Counter, by `service` and `op`: requests that failed (no answer, or an
/// error status).
pub const REQUEST_ERRORS: &str = "docworker_request_errors_total";
/// Histogram, by `service` and `op`: request latency in seconds.
pub const REQUEST_DURATION: &str = "docworker_request_duration_seconds";

/// Installs the process-wide recorder. Call once, before anything reports.
pub fn install() -> Result<PrometheusHandle> {
    let fast = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    let slow = [
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(PICKUP_LATENCY.into()), &fast)?
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &fast)?
        .set_buckets_for_metric(Matcher::Full(JOB_DURATION.into()), &slow)?
        .set_buckets_for_metric(Matcher::Full(STAGE_DURATION.into()), &slow)?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe();
    // Series that exist from the start read 0 rather than missing, so a
    // rate() over their first increment is right: registering the per-job
    // handles does that for theirs.
    per_job();
    ::metrics::counter!(LISTENER_RECONNECTS).absolute(0);
    for outcome in ["retry", "failed"] {
        ::metrics::counter!(LEASE_RECLAIMS, "outcome" => outcome).absolute(0);
    }
    Ok(handle)
}

fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(JOBS, "Rows of job_tasks by status (the whole table).");
    describe_gauge!(QUEUE_DEPTH, "Pending jobs that are due now.");
    describe_gauge!(
        SCHEDULED,
        "Pending jobs waiting for a retry or a future run_at."
    );
    describe_gauge!(
        OLDEST_PENDING_AGE,
        Unit::Seconds,
        "How long the oldest due job has waited."
    );
    describe_gauge!(DATABASE_UP, "1 when the last scrape could read job_tasks.");
    describe_gauge!(RUNNING, "Jobs this process is running.");
    describe_gauge!(
        CONCURRENCY,
        "Job slots of this process (worker.concurrency)."
    );
    describe_histogram!(
        PICKUP_LATENCY,
        Unit::Seconds,
        "From a job being due to its claim."
    );
    describe_histogram!(
        JOB_DURATION,
        Unit::Seconds,
        "From claim to outcome, by task type and outcome."
    );
    describe_histogram!(
        STAGE_DURATION,
        Unit::Seconds,
        "Time in each stage of a job."
    );
    describe_counter!(
        JOBS_FINISHED,
        "Attempts this process finished, by task type and outcome."
    );
    describe_counter!(RETRIES, "Failed attempts scheduled to run again.");
    describe_counter!(
        LEASE_RECLAIMS,
        "Jobs with an expired lease put back (retry) or failed by this process."
    );
    describe_gauge!(
        DEPENDENCY_UP,
        "0 while this process finds the dependency down and pauses the jobs that need it."
    );
    describe_gauge!(
        EMBED_ENDPOINT_UP,
        "1 while the embedding endpoint is in rotation, 0 while it is out and probed."
    );
    describe_counter!(
        LISTENER_RECONNECTS,
        "Times the LISTEN connection was re-established."
    );
    describe_counter!(
        REQUESTS,
        "HTTP requests to the embedding server and Chroma."
    );
    describe_counter!(
        REQUEST_ERRORS,
        "Of those, the ones without an answer or with an error status."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Latency of requests to the embedding server and Chroma."
    );
}

/// The table's numbers, as read at a scrape.
pub fn set_queue(snapshot: Option<&QueueSnapshot>) {
    let Some(s) = snapshot else {
        ::metrics::gauge!(DATABASE_UP).set(0.0);
        return;
    };
    ::metrics::gauge!(DATABASE_UP).set(1.0);
    for (status, count) in &s.by_status {
        ::metrics::gauge!(JOBS, "status" => status.as_str()).set(*count as f64);
    }
    ::metrics::gauge!(QUEUE_DEPTH).set(s.due as f64);
    ::metrics::gauge!(SCHEDULED).set(s.scheduled as f64);
    ::metrics::gauge!(OLDEST_PENDING_AGE).set(s.oldest_due_age.as_secs_f64());
}

/// Whether an embedding endpoint is in rotation (by its URL).
pub fn embed_endpoint_up(endpoint: &str, up: bool) {
    ::metrics::gauge!(EMBED_ENDPOINT_UP, "endpoint" => endpoint.to_string()).set(if up {
        1.0
    } else {
        0.0
    });
}

pub fn dependency_up(dependency: &'static str, up: bool) {
    ::metrics::gauge!(DEPENDENCY_UP, "dependency" => dependency).set(if up { 1.0 } else { 0.0 });
}

pub fn set_slots(running: usize, concurrency: usize) {
    ::metrics::gauge!(RUNNING).set(running as f64);
    ::metrics::gauge!(CONCURRENCY).set(concurrency as f64);
}

pub fn job_claimed(waited: Duration) {
    per_job().pickup.record(waited.as_secs_f64());
}

pub fn stage_finished(stage: Stage, took: Duration) {
    if let Some((_, histogram)) = per_job().stages.iter().find(|(s, _)| *s == stage) {
        histogram.record(took.as_secs_f64());
    }
}

/// `outcome` is one of [`OUTCOMES`]; a `task_type` not in [`TASK_TYPES`]
/// counts as `unknown`.
pub fn job_finished(task_type: &str, outcome: &'static str, took: Duration) {
    let t = TASK_TYPES
        .iter()
        .position(|t| *t == task_type)
        .or(TASK_TYPES.iter().position(|t| *t == "unknown"));
    let o = OUTCOMES.iter().position(|o| *o == outcome);
    match (t, o) {
        (Some(t), Some(o)) => {
            let (count, duration) = &per_job().finished[t * OUTCOMES.len() + o];
            count.increment(1);
            duration.record(took.as_secs_f64());
        }
        _ => debug_assert!(false, "unlisted label {task_type}/{outcome}"),
    }
}

pub fn retry_scheduled() {
    per_job().retries.increment(1);
}

/// The label values of the per-job series.
pub const TASK_TYPES: [&str; 4] = ["ingest", "delete", "noop", "unknown"];
pub const OUTCOMES: [&str; 6] = [
    "completed",
    "transient_error",
    "permanent_error",
    "handed_back",
    "dependency_down",
    "stopped",
];

/// Handles of the series every job touches, registered once: looking a
/// series up by name and labels on each job cost a busy worker about a
/// tenth of its noop throughput (BENCHMARKS.md).
struct PerJob {
    pickup: Histogram,
    /// By task type, then outcome (see [`TASK_TYPES`], [`OUTCOMES`]).
    finished: Vec<(Counter, Histogram)>,
    stages: Vec<(Stage, Histogram)>,
    retries: Counter,
}

static PER_JOB: OnceLock<PerJob> = OnceLock::new();

/// Registered with whatever recorder is installed at first use: [`install`]
/// makes that first use, so a process that installs none keeps no-ops.
fn per_job() -> &'static PerJob {
    PER_JOB.get_or_init(|| PerJob {
        pickup: ::metrics::histogram!(PICKUP_LATENCY),
        finished: TASK_TYPES
            .iter()
            .flat_map(|t| OUTCOMES.iter().map(move |o| (*t, *o)))
            .map(|(t, o)| {
                (
                    ::metrics::counter!(JOBS_FINISHED, "task_type" => t, "outcome" => o),
                    ::metrics::histogram!(JOB_DURATION, "task_type" => t, "outcome" => o),
                )
            })
            .collect(),
        // `done` is where a job ends, never a stage it spends time in.
        stages: Stage::ALL
            .into_iter()
            .filter(|s| *s != Stage::Done)
            .map(|s| {
                (
                    s,
                    ::metrics::histogram!(STAGE_DURATION, "stage" => s.as_str()),
                )
            })
            .collect(),
        retries: ::metrics::counter!(RETRIES),
    })
}

pub fn lease_reclaimed(outcome: &'static str) {
    ::metrics::counter!(LEASE_RECLAIMS, "outcome" => outcome).increment(1);
}

pub fn listener_reconnected() {
    ::metrics::counter!(LISTENER_RECONNECTS).increment(1);
}

/// One HTTP request to a dependency (`service` is `embedder` or `chroma`).
pub fn request(service: &'static str, op: &'static str, ok: bool, took: Duration) {
    ::metrics::counter!(REQUESTS, "service" => service, "op" => op).increment(1);
    if !ok {
        ::metrics::counter!(REQUEST_ERRORS, "service" => service, "op" => op).increment(1);
    }
    ::metrics::histogram!(REQUEST_DURATION, "service" => service, "op" => op)
        .record(took.as_secs_f64());
}
