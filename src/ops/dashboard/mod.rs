//! The web dashboard under `/ui/` (`http.dashboard = true`), served by the
//! HTTP listener with everything embedded in the binary: server-rendered
//! pages (`pages.rs`, maud, which escapes every value), one stylesheet and
//! one script (`assets/`), no CDN and no build step.
//!
//! - Pages: the overview, batches, a job list filtered and paged by keyset
//!   (`store::dashboard`), and a job's page. They read the database at each
//!   request; nothing is cached in the process.
//! - Live: `/ui/events` sends the progress of what the page shows every
//!   [`LIVE_EVERY`] as server-sent events (a poll of those rows by id), and
//!   the counts by status, read at most every [`COUNTS_FRESH`] for all pages
//!   together; the stream ends when the listener shuts down.
//! - Actions: retry a finished job, cancel a pending or running one, retry
//!   a batch's failed jobs, through the same store functions as `worker
//!   retry`/`cancel`. Each needs `Authorization: Bearer <http.dashboard_token>`
//!   (401 without it, 403 with a wrong one; none at all when the token is
//!   empty) and `X-CSRF-Token` with this process's token from the page
//!   (403 otherwise), and a browser's `Sec-Fetch-Site` must say
//!   same-origin. Each is logged with the client's address and agent.
//! - Headers: a Content-Security-Policy allowing only this origin's script
//!   and style (no inline script, so a value that slipped through escaping
//!   still could not run), no framing, no referrer, no caching.

mod pages;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::ops::http::readiness;
use crate::pipeline::Pipeline;
use crate::queue::health::Health;
use crate::queue::outage::Outages;
use crate::queue::TaskHandler;
use crate::store;
use crate::store::dashboard::{self as sql, Cursor, JobFilter};
use crate::store::stats::QueueSnapshot;

/// How often `/ui/events` sends an update.
pub const LIVE_EVERY: Duration = Duration::from_secs(1);
/// The counts by status in the live updates are this fresh: counting a
/// table of a million rows takes a few hundred milliseconds, once for
/// every open page together.
const COUNTS_FRESH: Duration = Duration::from_secs(5);
/// Ids a page may ask live updates for.
const LIVE_IDS: usize = 100;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub struct Dashboard {
    pub pool: Pool,
    pub health: Arc<Health>,
    pub handler: Arc<dyn TaskHandler>,
    pub outages: Arc<Outages>,
    /// For a job's record count in Chroma.
    pub pipeline: Arc<Pipeline>,
    /// `http.dashboard_token`; a reload may change it.
    pub token: watch::Receiver<String>,
    /// This process's CSRF token, in every page.
    pub csrf: String,
    /// Ends the live streams when the listener shuts down.
    pub stop: CancellationToken,
    /// The last counts the live updates read, and when.
    pub counts: tokio::sync::Mutex<Option<(std::time::Instant, QueueSnapshot)>>,
}

type Shared = Arc<Dashboard>;

impl Dashboard {
    /// A CSRF token of 128 random bits.
    pub fn new_csrf() -> String {
        format!("{:032x}", rand::random::<u128>())
    }
}

/// The dashboard's routes, to merge into the listener's.
pub fn routes(dashboard: Shared) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(overview))
        .route("/ui/batches", get(batches))
        .route("/ui/jobs", get(jobs))
        .route("/ui/jobs/{id}", get(job))
        .route("/ui/events", get(events))
        .route("/ui/assets/app.js", get(script))
        .route("/ui/assets/style.css", get(style))
        .route("/ui/api/jobs/{id}/retry", post(retry_job))
        .route("/ui/api/jobs/{id}/cancel", post(cancel_job))
        .route("/ui/api/batches/{id}/retry", post(retry_batch))
        .layer(middleware::from_fn(security_headers))
        .with_state(dashboard)
}

async fn security_headers(request: axum::extract::Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A page that could not be read: the reason, plainly.
fn unavailable(e: anyhow::Error) -> Response {
    tracing::warn!(error = %format!("{e:#}"), "dashboard: a page could not be read");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Html(pages::error(&format!("The database did not answer: {e:#}"))),
    )
        .into_response()
}

async fn overview(State(d): State<Shared>) -> Response {
    // The two counts each read the whole table: on two connections at once.
    let counts = async {
        let client = d.pool.get().await?;
        QueueSnapshot::read(&client).await
    };
    let rest = async {
        let client = d.pool.get().await?;
        let by_type = sql::counts_by_type(&client).await?;
        let hour = sql::last_hour(&client).await?;
        let leases = sql::lease_holders(&client).await?;
        let batches = sql::recent_batches(&client, 8).await?;
        anyhow::Ok((by_type, hour, leases, batches))
    };
    let read = async {
        let (snapshot, rest) = tokio::try_join!(counts, rest)?;
        let (by_type, hour, leases, batches) = rest;
        anyhow::Ok((snapshot, by_type, hour, leases, batches))
    };
    let (checks, read) = tokio::join!(
        readiness(&d.health, &d.pool, d.handler.as_ref(), &d.outages),
        read
    );
    match read {
        Ok((snapshot, by_type, hour, leases, batches)) => Html(pages::overview(
            &d.csrf,
            &pages::Overview {
                snapshot,
                by_type,
                hour,
                checks,
                leases,
                batches,
            },
        ))
        .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn batches(State(d): State<Shared>) -> Response {
    let read = async {
        let client = d.pool.get().await?;
        sql::recent_batches(&client, 100).await
    };
    match read.await {
        Ok(batches) => Html(pages::batches(&d.csrf, &batches)).into_response(),
        Err(e) => unavailable(e),
    }
}

/// The job list's query string: the filters and where the page starts.
#[derive(Debug, Default, Deserialize)]
pub struct JobsQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    task_type: String,
    #[serde(default)]
    batch: String,
    #[serde(default)]
    q: String,
    #[serde(default)]
    after: String,
}

fn some(text: &str) -> Option<String> {
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_string())
}

async fn jobs(State(d): State<Shared>, Query(query): Query<JobsQuery>) -> Response {
    let batch = match some(&query.batch).map(|b| Uuid::parse_str(&b)) {
        Some(Err(_)) => {
            return (
                StatusCode::BAD_REQUEST,
                Html(pages::error(
                    "The batch filter must be a batch id (a UUID).",
                )),
            )
                .into_response()
        }
        Some(Ok(b)) => Some(b),
        None => None,
    };
    let filter = JobFilter {
        status: some(&query.status),
        task_type: some(&query.task_type),
        batch,
        filename: some(&query.q),
    };
    let after = Cursor::decode(&query.after);
    let read = async {
        let client = d.pool.get().await?;
        sql::jobs_page(&client, &filter, after).await
    };
    match read.await {
        Ok((lines, next)) => Html(pages::jobs(
            &d.csrf,
            &pages::JobList {
                filter: &filter,
                lines: &lines,
                next,
                first_page: after.is_none(),
            },
        ))
        .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn job(State(d): State<Shared>, Path(id): Path<Uuid>) -> Response {
    let read = async {
        let client = d.pool.get().await?;
        sql::job(&client, id).await
    };
    match read.await {
        Ok(Some(detail)) => {
            let records = match tokio::time::timeout(
                Duration::from_secs(3),
                d.pipeline.records_of(detail.document_id),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err("Chroma did not answer within 3 s".into()),
            };
            Html(pages::job(&d.csrf, &detail, &records)).into_response()
        }
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Html(pages::error(&format!("No job {id}."))),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    )
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/style.css"))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// `/ui/events?batches=..&jobs=..`: the ids whose progress the page shows.
#[derive(Debug, Default, Deserialize)]
struct LiveQuery {
    #[serde(default)]
    batches: String,
    #[serde(default)]
    jobs: String,
}

fn ids(list: &str) -> Vec<Uuid> {
    list.split(',')
        .filter_map(|s| Uuid::parse_str(s.trim()).ok())
        .take(LIVE_IDS)
        .collect()
}

async fn events(
    State(d): State<Shared>,
    Query(query): Query<LiveQuery>,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    let (batches, jobs) = (ids(&query.batches), ids(&query.jobs));
    let stop = d.stop.clone();
    let updates = stream::unfold(
        (d, batches, jobs, true),
        |(d, batches, jobs, first)| async move {
            if !first {
                tokio::select! {
                    _ = d.stop.cancelled() => return None,
                    _ = tokio::time::sleep(LIVE_EVERY) => {}
                }
            }
            let event = match live_update(&d, &batches, &jobs).await {
                Ok(data) => Event::default().event("update").data(data.to_string()),
                Err(e) => Event::default()
                    .event("trouble")
                    .data(format!("the database did not answer: {e:#}")),
            };
            Some((Ok(event), (d, batches, jobs, false)))
        },
    );
    let updates = futures_util::StreamExt::take_until(updates, stop.cancelled_owned());
    Sse::new(updates).keep_alive(KeepAlive::default())
}

async fn live_update(
    d: &Dashboard,
    batches: &[Uuid],
    jobs: &[Uuid],
) -> anyhow::Result<serde_json::Value> {
    let client = d.pool.get().await?;
    let snapshot = {
        let mut cached = d.counts.lock().await;
        match &*cached {
            Some((at, s)) if at.elapsed() < COUNTS_FRESH => s.clone(),
            _ => {
                let s = QueueSnapshot::read(&client).await?;
                *cached = Some((std::time::Instant::now(), s.clone()));
                s
            }
        }
    };
    let batches = sql::batches(&client, batches).await?;
    let jobs = sql::jobs(&client, jobs).await?;
    let counts: serde_json::Map<String, serde_json::Value> = snapshot
        .by_status
        .iter()
        .map(|(status, n)| (status.as_str().to_string(), json!(n)))
        .collect();
    Ok(json!({
        "counts": counts,
        "due": snapshot.due,
        "oldest": sql::human(snapshot.oldest_due_age),
        "batches": batches.iter().map(|b| json!({
            "id": b.id, "status": b.status, "total": b.total,
            "completed": b.completed, "failed": b.failed,
        })).collect::<Vec<_>>(),
        "jobs": jobs.iter().map(|j| json!({
            "id": j.id, "status": j.status, "stage": j.stage,
            "completed": j.completed_chunks, "total": j.total_chunks, "attempt": j.attempt,
        })).collect::<Vec<_>>(),
    }))
}

// --- actions ---------------------------------------------------------------

/// Who asked, for the log.
fn client(addr: &SocketAddr, headers: &HeaderMap) -> String {
    let agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    format!("{addr} ({})", agent.chars().take(80).collect::<String>())
}

/// Equal without telling how much of it matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "ok": false, "message": message }))).into_response()
}

/// The token, the CSRF token and the browser's own word on where the
/// request comes from; `None` when all three hold.
fn authorize(d: &Dashboard, headers: &HeaderMap) -> Option<Response> {
    let token = d.token.borrow().clone();
    if token.is_empty() {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "actions are off: set http.dashboard_token to turn them on",
        ));
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => {
            return Some(refuse(
                StatusCode::UNAUTHORIZED,
                "this needs the dashboard token: enter it at the top of the page",
            ))
        }
        Some(given) if !same(given.trim().as_bytes(), token.trim().as_bytes()) => {
            return Some(refuse(StatusCode::FORBIDDEN, "wrong dashboard token"))
        }
        Some(_) => {}
    }
    let csrf_ok = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| same(v.as_bytes(), d.csrf.as_bytes()));
    let site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("same-origin");
    if !csrf_ok || site != "same-origin" {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "refused: the request did not come from this dashboard's page (reload the page)",
        ));
    }
    None
}

/// Runs an authorized action and logs it, whatever came of it.
async fn act<F, Fut>(
    d: &Dashboard,
    headers: &HeaderMap,
    addr: SocketAddr,
    action: &'static str,
    target: Uuid,
    run: F,
) -> Response
where
    F: FnOnce(deadpool_postgres::Object) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(bool, String)>>,
{
    let who = client(&addr, headers);
    if let Some(refusal) = authorize(d, headers) {
        tracing::warn!(action, %target, client = %who, status = refusal.status().as_u16(), "dashboard action refused");
        return refusal;
    }
    let outcome = async { run(d.pool.get().await?).await }.await;
    match outcome {
        Ok((done, message)) => {
            tracing::info!(action, %target, client = %who, done, "dashboard action");
            let status = if done {
                StatusCode::OK
            } else {
                StatusCode::CONFLICT
            };
            (status, Json(json!({ "ok": done, "message": message }))).into_response()
        }
        Err(e) => {
            tracing::warn!(action, %target, client = %who, error = %format!("{e:#}"), "dashboard action failed");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the database did not answer: {e:#}"),
            )
        }
    }
}

async fn retry_job(
    State(d): State<Shared>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
) -> Response {
    act(&d, &headers, addr, "retry", id, |client| async move {
        Ok(if store::admin::retry(&client, id).await? {
            (true, "pending again".to_string())
        } else {
            (
                false,
                "not retried: only a completed, failed or cancelled job can be".to_string(),
            )
        })
    })
    .await
}

async fn cancel_job(
    State(d): State<Shared>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
) -> Response {
    act(&d, &headers, addr, "cancel", id, |client| async move {
        Ok(if store::admin::cancel(&client, id).await? {
            (true, "cancelled".to_string())
        } else {
            (
                false,
                "not cancelled: the job has already finished".to_string(),
            )
        })
    })
    .await
}

async fn retry_batch(
    State(d): State<Shared>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
) -> Response {
    act(&d, &headers, addr, "retry-batch", id, |client| async move {
        let n = sql::retry_failed_in_batch(&client, id).await?;
        Ok((n > 0, format!("{n} failed jobs pending again")))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abcdef", b"abcdef"));
        assert!(!same(b"abcdef", b"abcdeg"));
        assert!(!same(b"abc", b"abcdef"));
    }

    #[test]
    fn live_ids_are_uuids_and_bounded() {
        let many: Vec<String> = (0..150).map(|i| Uuid::from_u128(i).to_string()).collect();
        assert_eq!(ids(&many.join(",")).len(), LIVE_IDS);
        assert_eq!(ids("x,<script>,").len(), 0);
    }
}
