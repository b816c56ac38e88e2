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

/// Keeps autovacuum off `job_tasks` (or lets it back on): a benchmark of
/// cold statistics must not have them refreshed halfway through.
pub async fn set_autovacuum(client: &Client, on: bool) -> Result<()> {
    client
        .batch_execute(&format!(
            "ALTER TABLE job_tasks SET (autovacuum_enabled = {on})"
        ))
        .await?;
    Ok(())
}

/// Completed jobs, and first claim to last completion on the database
/// clock, among them.
pub async fn completed_span(client: &Client) -> Result<(i64, Duration)> {
    let row = client
        .query_one(
            "SELECT count(*) AS n,
                    coalesce(extract(epoch FROM max(finished_at) - min(started_at)), 0)::float8 AS span
               FROM job_tasks WHERE status = 'completed'",
            &[],
        )
        .await?;
    let span: f64 = row.get("span");
    Ok((row.get("n"), Duration::from_secs_f64(span.max(0.0))))
}

/// The database clock, in Unix seconds.
pub async fn clock(client: &Client) -> Result<f64> {
    Ok(client
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await?
        .get(0))
}

/// What one window of a soak run saw: the jobs enqueued in it, their pickup
/// latency (INSERT's transaction to claim, database clock), and the
/// table as the window ended.
#[derive(Debug, Clone)]
pub struct SoakWindow {
    pub enqueued: i64,
    pub claimed: i64,
    pub pickup_p50_ms: f64,
    pub pickup_p99_ms: f64,
    pub rows: i64,
    pub pending: i64,
    pub table_bytes: i64,
    pub index_bytes: i64,
    pub dead_rows: i64,
}

/// `from` and `to` in Unix seconds on the database clock.
pub async fn soak_window(client: &Client, from: f64, to: f64) -> Result<SoakWindow> {
    let row = client
        .query_one(
            "WITH w AS (
                 SELECT extract(epoch FROM started_at - created_at) * 1000 AS pickup_ms
                   FROM job_tasks
                  WHERE created_at >= to_timestamp($1) AND created_at < to_timestamp($2))
             SELECT (SELECT count(*) FROM w) AS enqueued,
                    (SELECT count(pickup_ms) FROM w) AS claimed,
                    (SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY pickup_ms), 0) FROM w)::float8 AS p50,
                    (SELECT coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY pickup_ms), 0) FROM w)::float8 AS p99,
                    (SELECT count(*) FROM job_tasks) AS rows,
                    (SELECT count(*) FROM job_tasks WHERE status = 'pending') AS pending,
                    pg_table_size('job_tasks') AS table_bytes,
                    pg_indexes_size('job_tasks') AS index_bytes,
                    (SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relname = 'job_tasks') AS dead",
            &[&from, &to],
        )
        .await?;
    Ok(SoakWindow {
        enqueued: row.get("enqueued"),
        claimed: row.get("claimed"),
        pickup_p50_ms: row.get("p50"),
        pickup_p99_ms: row.get("p99"),
        rows: row.get("rows"),
        pending: row.get("pending"),
        table_bytes: row.get("table_bytes"),
        index_bytes: row.get("index_bytes"),
        dead_rows: row.get("dead"),
    })
}

/// The cluster's `autovacuum` setting.
pub async fn autovacuum_setting(client: &Client) -> Result<String> {
    Ok(client
        .query_one("SELECT current_setting('autovacuum')", &[])
        .await?
        .get(0))
}
