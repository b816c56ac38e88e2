//! The operator's statements: enqueue as the app does, list, retry, cancel,
//! a ping job, and one job's state. The CLI (and anything else that acts on
//! an operator's behalf) goes through these, so there is one way to retry a
//! job: the app's own `docworker_retry`.

use std::time::Duration;

use anyhow::Result;
use tokio_postgres::Client;
use uuid::Uuid;

use super::state::JobStatus;

/// One task as `docworker_enqueue_batch` takes it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewTask {
    pub filename: String,
    pub file_path: String,
    pub task_type: String,
    pub options: serde_json::Value,
}

/// One batch with one task per entry, as the app's upload makes it: the
/// batch id and each task's (id, filename), in order.
pub async fn enqueue_batch(
    client: &Client,
    tasks: &[NewTask],
) -> Result<(Uuid, Vec<(Uuid, String)>)> {
    let rows = client
        .query(
            "SELECT batch_id, task_id, filename FROM docworker_enqueue_batch($1)",
            &[&serde_json::to_value(tasks)?],
        )
        .await?;
    let batch = rows.first().map(|r| r.get("batch_id")).unwrap_or_default();
    let tasks = rows
        .iter()
        .map(|r| (r.get("task_id"), r.get("filename")))
        .collect();
    Ok((batch, tasks))
}

/// A job as `worker jobs` lists it.
#[derive(Debug, Clone)]
pub struct JobLine {
    pub id: Uuid,
    pub task_type: String,
    pub status: String,
    pub stage: String,
    pub completed_chunks: i32,
    pub total_chunks: i32,
    pub attempt: i32,
    pub max_attempts: i32,
    pub filename: String,
    /// `MM-DD HH24:MI:SS`, UTC.
    pub created: String,
    pub error_message: String,
}

/// The most recent `limit` jobs, newest first, optionally of one status.
pub async fn recent_jobs(
    client: &Client,
    limit: i64,
    status: Option<&str>,
) -> Result<Vec<JobLine>> {
    let rows = client
        .query(
            "SELECT id, task_type, status::text AS status, coalesce(stage, '') AS stage,
                    completed_chunks, total_chunks, attempt, max_attempts,
                    filename::text AS filename,
                    to_char(created_at AT TIME ZONE 'UTC', 'MM-DD HH24:MI:SS') AS created,
                    coalesce(error_message, '') AS error_message
               FROM job_tasks
              WHERE $2::text IS NULL OR status = $2
              ORDER BY created_at DESC, id
              LIMIT $1",
            &[&limit, &status],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| JobLine {
            id: r.get("id"),
            task_type: r.get("task_type"),
            status: r.get("status"),
            stage: r.get("stage"),
            completed_chunks: r.get("completed_chunks"),
            total_chunks: r.get("total_chunks"),
            attempt: r.get("attempt"),
            max_attempts: r.get("max_attempts"),
            filename: r.get("filename"),
            created: r.get("created"),
            error_message: r.get("error_message"),
        })
        .collect())
}

/// `docworker_retry`: whether the job was finished and is pending again.
pub async fn retry(client: &Client, id: Uuid) -> Result<bool> {
    Ok(client
        .query_one("SELECT docworker_retry($1)", &[&id])
        .await?
        .get(0))
}

/// `docworker_cancel`: whether the job was pending or running and is now cancelled.
pub async fn cancel(client: &Client, id: Uuid) -> Result<bool> {
    Ok(client
        .query_one("SELECT docworker_cancel($1)", &[&id])
        .await?
        .get(0))
}

/// Enqueues a ping: a `noop` job ahead of everything, tried once.
pub async fn insert_ping(client: &Client) -> Result<Uuid> {
    Ok(client
        .query_one(
            "INSERT INTO job_tasks (filename, task_type, priority, max_attempts)
             VALUES ('ping', 'noop', -100, 1) RETURNING id",
            &[],
        )
        .await?
        .get(0))
}

/// A job's status and, once claimed, how long after its insert that was.
pub async fn pickup_of(client: &Client, id: Uuid) -> Result<(JobStatus, Option<Duration>)> {
    let row = client
        .query_one(
            "SELECT status::text AS status,
                    extract(epoch FROM started_at - created_at)::float8 AS pickup
               FROM job_tasks WHERE id = $1",
            &[&id],
        )
        .await?;
    let status: String = row.get("status");
    let pickup: Option<f64> = row.get("pickup");
    Ok((
        status.parse()?,
        pickup.map(|s| Duration::from_secs_f64(s.max(0.0))),
    ))
}

/// A job's status and its error message ("" when none).
pub async fn outcome_of(client: &Client, id: Uuid) -> Result<(JobStatus, String)> {
    let row = client
        .query_one(
            "SELECT status::text AS status, coalesce(error_message, '') AS error_message
               FROM job_tasks WHERE id = $1",
            &[&id],
        )
        .await?;
    let status: String = row.get("status");
    Ok((status.parse()?, row.get("error_message")))
}
