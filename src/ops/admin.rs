//! Operator commands: enqueue, jobs, retry, cancel, ping. Each is a
//! store function plus what a person reads; none needs a running worker
//! except `ping`, which measures one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::store::admin::{self as store, NewTask};
use crate::store::JobStatus;

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
        tasks.push(NewTask {
            filename: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            file_path: path.to_string_lossy().into_owned(),
            task_type: task_type.to_owned(),
            options: options.clone(),
        });
    }
    let (batch, tasks) = store::enqueue_batch(client, &tasks).await?;
    if !tasks.is_empty() {
        println!("batch {batch}");
    }
    for (id, filename) in &tasks {
        println!("  task {id}  {filename}");
    }
    Ok(())
}

/// Prints the most recent jobs as a table.
pub async fn jobs(client: &Client, limit: i64, status: Option<&str>) -> Result<()> {
    let rows = store::recent_jobs(client, limit, status).await?;
    println!(
        "{:<36}  {:<6}  {:<10}  {:<9}  {:>9}  {:>7}  {:<28}  {:<14}  error",
        "id", "type", "status", "stage", "chunks", "attempt", "filename", "created (UTC)"
    );
    for r in &rows {
        let chunks = format!("{}/{}", r.completed_chunks, r.total_chunks);
        let attempt = format!("{}/{}", r.attempt, r.max_attempts);
        let filename: String = r.filename.chars().take(28).collect();
        let error: String = r.error_message.chars().take(100).collect();
        println!(
            "{:<36}  {:<6}  {:<10}  {:<9}  {:>9}  {:>7}  {:<28}  {:<14}  {}",
            r.id.to_string(),
            r.task_type,
            r.status,
            r.stage,
            chunks,
            attempt,
            filename,
            r.created,
            error
        );
    }
    if rows.is_empty() {
        println!("(no jobs)");
    }
    Ok(())
}

pub async fn retry(client: &Client, id: Uuid) -> Result<()> {
    if !store::retry(client, id).await? {
        bail!("job {id} was not retried: it does not exist or has not finished (only completed, error or cancelled jobs can be retried)");
    }
    println!("job {id} is pending again");
    Ok(())
}

pub async fn cancel(client: &Client, id: Uuid) -> Result<()> {
    if !store::cancel(client, id).await? {
        bail!("job {id} was not cancelled: it does not exist or has already finished");
    }
    println!("job {id} cancelled");
    Ok(())
}

/// Enqueues a noop job and waits for a worker to complete it.
pub async fn ping(client: &Client, timeout: Duration) -> Result<()> {
    let sent = Instant::now();
    let id = store::insert_ping(client).await?;
    loop {
        let (status, pickup) = store::pickup_of(client, id).await?;
        match status {
            JobStatus::Completed => {
                let rtt = sent.elapsed();
                println!(
                    "pong: job {id} completed in {:.1} ms (picked up {:.1} ms after insert)",
                    rtt.as_secs_f64() * 1000.0,
                    pickup.unwrap_or_default().as_secs_f64() * 1000.0
                );
                return Ok(());
            }
            JobStatus::Error | JobStatus::Cancelled => {
                bail!("ping job {id} ended as {status}")
            }
            JobStatus::Pending | JobStatus::Processing => {}
        }
        if sent.elapsed() > timeout {
            store::cancel(client, id).await?;
            bail!(
                "no worker completed the ping job within {}: is a worker running against this database?",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
