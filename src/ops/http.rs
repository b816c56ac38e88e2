//! The optional HTTP listener (`[http]`): probes and metrics for whoever
//! runs the worker, never an API for the app (the app talks SQL).
//!
//! - `/healthz`: 200 while the process's main loop turns; 503 once it has
//!   stalled (liveness, `worker health`: restarting fixes a stall).
//!   `/healthz?with=database` also needs PostgreSQL to answer: the image's
//!   HEALTHCHECK (`worker health --database`), because a worker without
//!   its database does no work, while an embedder or Chroma outage only
//!   pauses the jobs that need them and is `/readyz`'s to report.
//! - `/readyz`: 200 when the database, the LISTEN connection, the embedding
//!   server and Chroma all answer; 503 with the failing checks otherwise.
//!   Not ready is not unhealthy: jobs just wait with backoff.
//! - `/metrics`: Prometheus text; the queue gauges are read from the
//!   database at each scrape.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::observe::metrics;
use crate::ops::dashboard::{self, Dashboard};
use crate::queue::health::{self, Health};
use crate::queue::outage::Outages;
use crate::queue::running::RunningJobs;
use crate::queue::{Check, TaskHandler};
use crate::store::stats::QueueSnapshot;

/// A scrape waits this long for the queue numbers at most.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3);
/// Histograms are folded this often, so memory stays flat between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct StatusServer {
    pub health: Arc<Health>,
    pub pool: Pool,
    /// Adds its readiness checks to the queue's.
    pub handler: Arc<dyn TaskHandler>,
    /// Dependencies this process found down, which override a fresh check.
    pub outages: Arc<Outages>,
    pub running: Arc<RunningJobs>,
    /// The slots; a reload may change them.
    pub concurrency: tokio::sync::watch::Receiver<usize>,
    pub metrics: PrometheusHandle,
    /// The web dashboard under `/ui/`, when `http.dashboard` is on.
    pub dashboard: Option<Arc<Dashboard>>,
}

impl StatusServer {
    /// Binds now, so that a taken port fails the start; serves in the
    /// background until `stop`.
    pub async fn start(self, address: SocketAddr, stop: CancellationToken) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on http.address {address}"))?;
        let upkeep = self.metrics.clone();
        let dashboard = self.dashboard.clone();
        let mut router = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(scrape))
            .with_state(self);
        if let Some(d) = dashboard {
            router = router.merge(dashboard::routes(d));
            tracing::info!(%address, "HTTP listener up: /healthz /readyz /metrics, dashboard at /ui/");
        } else {
            tracing::info!(%address, "HTTP listener up: /healthz /readyz /metrics");
        }
        tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut every = tokio::time::interval(UPKEEP_EVERY);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = every.tick() => upkeep.run_upkeep(),
                    }
                }
            }
        });
        tokio::spawn(async move {
            // The dashboard logs who asked for an action.
            let app = router.into_make_service_with_connect_info::<SocketAddr>();
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the HTTP listener failed");
            }
        });
        Ok(())
    }
}

async fn healthz(State(s): State<StatusServer>, RawQuery(query): RawQuery) -> Response {
    let since = s.health.since_beat();
    if !s.health.is_live() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("main loop stalled: last turn {since:?} ago\n"),
        );
    }
    match query.as_deref() {
        None | Some("") => text(StatusCode::OK, "ok\n".into()),
        Some("with=database") => {
            let check = health::database(&s.pool).await;
            let status = if check.ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(
                status,
                format!("main loop: ok\ndatabase: {}\n", check.detail),
            )
        }
        Some(other) => text(
            StatusCode::BAD_REQUEST,
            format!("unknown query {other:?}: /healthz?with=database is the one there is\n"),
        ),
    }
}

/// The readiness checks, with the dependencies this process found down
/// overriding a fresh check: a service whose probe has not yet answered
/// keeps its jobs paused whatever a fresh check says, so it is not ready
/// until the worker resumes them. `/readyz` and the dashboard show these.
pub async fn readiness(
    health: &Health,
    pool: &Pool,
    handler: &dyn TaskHandler,
    outages: &Outages,
) -> Vec<Check> {
    let mut checks = health.readiness(pool, handler).await;
    for (name, detail) in outages.describe() {
        match checks.iter_mut().find(|c| c.name == name) {
            Some(c) => *c = Check::new(c.name, Err(detail)),
            None => checks.push(Check::new(name, Err(detail))),
        }
    }
    checks
}

async fn readyz(State(s): State<StatusServer>) -> Response {
    let checks = readiness(&s.health, &s.pool, s.handler.as_ref(), &s.outages).await;
    let mut body = String::new();
    for c in &checks {
        let _ = writeln!(body, "{}: {}", c.name, c.detail);
    }
    let status = if checks.iter().all(|c| c.ok) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(status, body)
}

async fn scrape(State(s): State<StatusServer>) -> Response {
    let snapshot = tokio::time::timeout(SNAPSHOT_TIMEOUT, async {
        let client = s.pool.get().await?;
        QueueSnapshot::read(&client).await
    })
    .await;
    match snapshot {
        Ok(Ok(snapshot)) => metrics::set_queue(Some(&snapshot)),
        Ok(Err(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "metrics: could not read the queue");
            metrics::set_queue(None);
        }
        Err(_) => metrics::set_queue(None),
    }
    metrics::set_slots(s.running.len(), *s.concurrency.borrow());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}
