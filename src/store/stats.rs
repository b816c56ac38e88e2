//! What the queue looks like right now, read from `job_tasks`: rows by
//! status, how many are due, how long the oldest due one has waited.
//!
//! One query serves both readers, `/metrics` (as gauges) and `worker stats`
//! (for a person), so the two never disagree. The numbers are the whole
//! table's, whichever worker asks.

use std::time::Duration;

use anyhow::Result;
use tokio_postgres::Client;

use super::state::JobStatus;

/// Rows by status come from the whole table (its size is bounded by
/// `maintenance.retention`); the due/scheduled figures read only pending
/// rows, through the partial claim index.
const SNAPSHOT_SQL: &str = "
SELECT s.status, coalesce(c.n, 0),
       p.due, p.scheduled, p.oldest_due_age
  FROM unnest($1::text[]) WITH ORDINALITY AS s(status, position)
  LEFT JOIN (SELECT status::text AS status, count(*) AS n FROM job_tasks GROUP BY 1) c
         ON c.status = s.status
 CROSS JOIN (
    SELECT count(*) FILTER (WHERE run_at <= now()) AS due,
           count(*) FILTER (WHERE run_at > now()) AS scheduled,
           coalesce(extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now())), 0)::float8
               AS oldest_due_age
      FROM job_tasks WHERE status = 'pending') p
 ORDER BY s.position";

#[derive(Debug, Clone, PartialEq)]
pub struct QueueSnapshot {
    /// Every status the worker writes, in lifecycle order, zeros included.
    pub by_status: Vec<(JobStatus, i64)>,
    /// Pending and due now.
    pub due: i64,
    /// Pending with a future `run_at` (waiting for a retry's backoff).
    pub scheduled: i64,
    /// How long the oldest due job has waited; zero when none is due.
    pub oldest_due_age: Duration,
}

impl QueueSnapshot {
    pub async fn read(client: &Client) -> Result<QueueSnapshot> {
        let statuses: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        let rows = client.query(SNAPSHOT_SQL, &[&statuses]).await?;
        let first = rows.first().expect("the status list is not empty");
        Ok(QueueSnapshot {
            by_status: JobStatus::ALL
                .into_iter()
                .zip(rows.iter().map(|r| r.get(1)))
                .collect(),
            due: first.get(2),
            scheduled: first.get(3),
            oldest_due_age: Duration::from_secs_f64(first.get::<_, f64>(4).max(0.0)),
        })
    }
}
