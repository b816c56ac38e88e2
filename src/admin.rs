//! Operator commands: enqueue, jobs, retry, cancel, ping. Each is a few
//! statements against the same tables the app uses; none needs a running
//! worker except `ping`, which measures one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio_postgres::Client;
use uuid::Uuid;

/// Does what the app's upload does: one batch, one task per file.
pub async fn enqueue(
    client: &Client,
    files: &[PathBuf],
    task_type: &str,
    options: &serde_json::Value,
) -> Result<()> {
    let mut tasks = Vec::with_capacity(files.len());
    for file in files {
        let path =
            std::path::absolute(file).with_context(|| format!("resolving {}", file.display()))?;
        let filename = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        tasks.push(json!({
            "filename": filename,
            "file_path": path.to_string_lossy(),
            "task_type": task_type,
            "options": options,
        }));
    }
    let rows = client
        .query(
            "SELECT batch_id, task_id, filename FROM docworker_enqueue_batch($1)",
            &[&serde_json::Value::Array(tasks)],
        )
        .await?;
    if let Some(first) = rows.first() {
        println!("batch {}", first.get::<_, Uuid>(0));
    }
    for row in &rows {
        println!(
            "  task {}  {}",
            row.get::<_, Uuid>(1),
            row.get::<_, String>(2)
        );
    }
    Ok(())
}

/// Prints the most recent jobs as a table.
pub async fn jobs(client: &Client, limit: i64, status: Option<&str>) -> Result<()> {
    let rows = client
        .query(
            "SELECT id::text, task_type, status::text, coalesce(stage, ''),
                    completed_chunks, total_chunks, attempt, max_attempts,
                    left(filename, 28),
                    to_char(created_at AT TIME ZONE 'UTC', 'MM-DD HH24:MI:SS'),
                    coalesce(error_message, '')
               FROM job_tasks
              WHERE $2::text IS NULL OR status = $2
              ORDER BY created_at DESC, id
              LIMIT $1",
            &[&limit, &status],
        )
        .await?;
    println!(
        "{:<36}  {:<6}  {:<10}  {:<9}  {:>9}  {:>7}  {:<28}  {:<14}  error",
        "id", "type", "status", "stage", "chunks", "attempt", "filename", "created (UTC)"
    );
    for r in &rows {
        let chunks = format!("{}/{}", r.get::<_, i32>(4), r.get::<_, i32>(5));
        let attempt = format!("{}/{}", r.get::<_, i32>(6), r.get::<_, i32>(7));
        let error: String = r.get(10);
        let error: String = error.chars().take(100).collect();
        println!(
            "{:<36}  {:<6}  {:<10}  {:<9}  {:>9}  {:>7}  {:<28}  {:<14}  {}",
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            chunks,
            attempt,
            r.get::<_, String>(8),
            r.get::<_, String>(9),
            error
        );
    }
    if rows.is_empty() {
        println!("(no jobs)");
    }
    Ok(())
}

pub async fn retry(client: &Client, id: Uuid) -> Result<()> {
    let ok: bool = client
        .query_one("SELECT docworker_retry($1)", &[&id])
        .await?
        .get(0);
    if !ok {
        bail!("job {id} was not retried: it does not exist or has not finished (only completed, error or cancelled jobs can be retried)");
    }
    println!("job {id} is pending again");
    Ok(())
}

pub async fn cancel(client: &Client, id: Uuid) -> Result<()> {
    let ok: bool = client
        .query_one("SELECT docworker_cancel($1)", &[&id])
        .await?
        .get(0);
    if !ok {
        bail!("job {id} was not cancelled: it does not exist or has already finished");
    }
    println!("job {id} cancelled");
    Ok(())
}

/// Enqueues a noop job and waits for a worker to complete it.
pub async fn ping(client: &Client, timeout: Duration) -> Result<()> {
    let sent = Instant::now();
    let id: Uuid = client
        .query_one(
            "INSERT INTO job_tasks (filename, task_type, priority, max_attempts)
             VALUES ('ping', 'noop', -100, 1) RETURNING id",
            &[],
        )
        .await?
        .get(0);
    loop {
        let row = client
            .query_one(
                "SELECT status::text, extract(epoch FROM started_at - created_at)::float8
                   FROM job_tasks WHERE id = $1",
                &[&id],
            )
            .await?;
        let status: String = row.get(0);
        if status == "completed" {
            let rtt = sent.elapsed();
            let pickup: Option<f64> = row.get(1);
            println!(
                "pong: job {id} completed in {:.1} ms (picked up {:.1} ms after insert)",
                rtt.as_secs_f64() * 1000.0,
                pickup.unwrap_or(0.0) * 1000.0
            );
            return Ok(());
        }
        if status == "error" || status == "cancelled" {
            bail!("ping job {id} ended as {status}");
        }
        if sent.elapsed() > timeout {
            client
                .execute("SELECT docworker_cancel($1)", &[&id])
                .await?;
            bail!(
                "no worker completed the ping job within {}: is a worker running against this database?",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
