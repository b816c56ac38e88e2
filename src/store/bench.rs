//! The benchmarks' statements on their scratch databases: bulk enqueues,
//! drain checks and the figures read back from the rows. Here, not in the
//! benchmarks, so that every statement on the queue's tables lives in the
//! store.

use std::time::Duration;

use anyhow::Result;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

/// The server's version and the settings that decide commit cost.
pub async fn server_description(client: &Client) -> Result<String> {
    Ok(client
        .query_one(
            "SELECT current_setting('server_version') || ', synchronous_commit=' || current_setting('synchronous_commit') || ', fsync=' || current_setting('fsync')",
            &[],
        )
        .await?
        .get(0))
}

/// Empties the queue's tables.
pub async fn truncate(client: &Client) -> Result<()> {
    client.batch_execute("TRUNCATE job_tasks CASCADE").await?;
    Ok(())
}

/// `n` pending `noop` jobs in one statement, as the app's bulk upload makes them.
pub async fn insert_noops(client: &Client, n: i32) -> Result<()> {
    client
        .execute(
            "INSERT INTO job_tasks (filename, task_type) SELECT 'bench', 'noop' FROM generate_series(1, $1)",
            &[&n],
        )
        .await?;
    Ok(())
}

/// Refreshes the planner's statistics of `job_tasks`.
pub async fn analyze(client: &Client) -> Result<()> {
    client.batch_execute("ANALYZE job_tasks").await?;
    Ok(())
}

/// Inserts one pending `noop` job at a time, prepared once: a latency
/// measurement must not pay a parse round trip per insert.
pub struct NoopInsert(Statement);

impl NoopInsert {
    pub async fn prepare(client: &Client) -> Result<NoopInsert> {
        Ok(NoopInsert(
            client
                .prepare(
                    "INSERT INTO job_tasks (filename, task_type) VALUES ($1, 'noop') RETURNING id",
                )
                .await?,
        ))
    }

    /// A job named `filename`; returns its id.
    pub async fn insert(&self, client: &Client, filename: &str) -> Result<Uuid> {
        Ok(client.query_one(&self.0, &[&filename]).await?.get(0))
    }
}

/// One `ingest` job per name, its `file_path` the name itself.
pub async fn insert_ingests(client: &Client, names: &[String]) -> Result<()> {
    client
        .execute(
            "INSERT INTO job_tasks (filename, file_path, task_type)
             SELECT f, f, 'ingest' FROM unnest($1::text[]) AS f",
            &[&names],
        )
        .await?;
    Ok(())
}

/// Jobs not yet `completed`.
pub async fn not_completed(client: &Client) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM job_tasks WHERE status <> 'completed'",
            &[],
        )
        .await?
        .get(0))
}

/// Jobs not yet in a final status.
pub async fn open_jobs(client: &Client) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM job_tasks WHERE status NOT IN ('completed', 'error', 'cancelled')",
            &[],
        )
        .await?
        .get(0))
}

/// First claim to last completion on the database clock, and how many
/// jobs ran more than once.
pub async fn drain_span(client: &Client) -> Result<(Duration, i64)> {
    let row = client
        .query_one(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8 AS span,
                    count(*) FILTER (WHERE attempt <> 1) AS repeated
               FROM job_tasks",
            &[],
        )
        .await?;
    let span: f64 = row.get("span");
    Ok((Duration::from_secs_f64(span.max(0.0)), row.get("repeated")))
}

/// When the job was claimed and when it finished, in Unix seconds.
pub async fn claim_and_finish_epochs(client: &Client, id: Uuid) -> Result<(f64, f64)> {
    let row = client
        .query_one(
            "SELECT extract(epoch FROM started_at)::float8 AS started,
                    extract(epoch FROM finished_at)::float8 AS finished
               FROM job_tasks WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok((row.get("started"), row.get("finished")))
}

/// What an end-to-end run left in the table.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub not_completed: i64,
    pub retried: i64,
    pub chunks: i64,
    pub errors: Option<String>,
}

pub async fn run_summary(client: &Client) -> Result<RunSummary> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status <> 'completed') AS not_completed,
                    count(*) FILTER (WHERE attempt <> 1) AS retried,
                    coalesce(sum(total_chunks), 0)::int8 AS chunks,
                    string_agg(DISTINCT error_message, ' | ') AS errors
               FROM job_tasks",
            &[],
        )
        .await?;
    Ok(RunSummary {
        not_completed: row.get("not_completed"),
        retried: row.get("retried"),
        chunks: row.get("chunks"),
        errors: row.get("errors"),
    })
}
