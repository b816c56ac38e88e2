//! What the dashboard reads (`ops/dashboard`), and its one write of its
//! own: retrying a batch's failed jobs (through `docworker_retry`, as
//! `worker retry` does for one).
//!
//! The job list pages by keyset, newest first, on
//! `(coalesce(created_at, '-infinity'), id)` with the index migration 8
//! adds, so page 1,000 costs what page 1 does; `created_at` is the app's
//! column and may be NULL in legacy rows, hence the coalesce.

use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::Client;
use uuid::Uuid;

/// Jobs per page of the job list.
pub const PAGE: i64 = 50;

/// Jobs of one task type in one status.
#[derive(Debug, Clone)]
pub struct TypeCount {
    pub task_type: String,
    pub status: String,
    pub count: i64,
}

/// One minute of the last hour.
#[derive(Debug, Clone, Copy, Default)]
pub struct Minute {
    /// Minutes ago, 0 for the current one.
    pub ago: i32,
    pub finished: i64,
    /// Mean seconds from due (`run_at`) to start, of the jobs started then
    /// and finished since (through the index on finished jobs: a job still
    /// running counts once it ends).
    pub pickup_secs: Option<f64>,
}

/// A worker holding leases now.
#[derive(Debug, Clone)]
pub struct LeaseHolder {
    pub worker: String,
    pub jobs: i64,
    /// Seconds until its soonest lease expires (negative: expired).
    pub soonest_expiry_secs: f64,
}

#[derive(Debug, Clone)]
pub struct BatchLine {
    pub id: Uuid,
    pub status: String,
    pub total: i32,
    pub completed: i32,
    pub failed: i32,
    pub created_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct JobLine {
    pub id: Uuid,
    pub batch_id: Option<Uuid>,
    pub filename: String,
    pub task_type: String,
    pub status: String,
    pub stage: Option<String>,
    pub completed_chunks: i32,
    pub total_chunks: i32,
    pub attempt: i32,
    pub created_at: Option<DateTime<Utc>>,
}

/// The job list's filters; empty means any.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<String>,
    pub task_type: Option<String>,
    pub batch: Option<Uuid>,
    /// A part of the file name, case-insensitive.
    pub filename: Option<String>,
}

/// Where a page of the job list starts: after this row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cursor {
    /// Microseconds since the epoch of the row's `created_at` (or of
    /// -infinity, as PostgreSQL's `i64::MIN`).
    pub created_micros: i64,
    pub id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}_{}", self.created_micros, self.id.simple())
    }

    pub fn decode(text: &str) -> Option<Cursor> {
        let (micros, id) = text.split_once('_')?;
        Some(Cursor {
            created_micros: micros.parse().ok()?,
            id: Uuid::parse_str(id).ok()?,
        })
    }
}

/// The job page's row.
#[derive(Debug, Clone)]
pub struct JobDetail {
    pub line: JobLine,
    pub document_id: Uuid,
    pub file_path: Option<String>,
    pub error_message: Option<String>,
    /// The error history: one object per failed attempt.
    pub errors: Vec<Value>,
    pub max_attempts: i32,
    pub locked_by: Option<String>,
    pub run_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub result: Option<Value>,
}

pub async fn counts_by_type(client: &Client) -> Result<Vec<TypeCount>> {
    let rows = client
        .query(
            "SELECT task_type, status::text, count(*) FROM job_tasks
              GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TypeCount {
            task_type: r.get(0),
            status: r.get(1),
            count: r.get(2),
        })
        .collect())
}

/// Jobs finished and mean pickup latency per minute over the last hour,
/// oldest first, every minute present.
pub async fn last_hour(client: &Client) -> Result<Vec<Minute>> {
    let rows = client
        .query(
            "WITH m AS (SELECT generate_series(0, 59) AS ago),
                  f AS (SELECT floor(extract(epoch FROM now() - finished_at) / 60)::int AS ago, count(*) AS n
                          FROM job_tasks
                         WHERE status IN ('completed', 'error', 'cancelled')
                           AND finished_at > now() - interval '1 hour'
                         GROUP BY 1),
                  p AS (SELECT floor(extract(epoch FROM now() - started_at) / 60)::int AS ago,
                               avg(greatest(extract(epoch FROM started_at - run_at), 0))::float8 AS pickup
                          FROM job_tasks
                         WHERE status IN ('completed', 'error', 'cancelled')
                           AND finished_at > now() - interval '1 hour'
                           AND started_at > now() - interval '1 hour'
                         GROUP BY 1)
             SELECT m.ago, coalesce(f.n, 0), p.pickup
               FROM m LEFT JOIN f USING (ago) LEFT JOIN p USING (ago)
              ORDER BY m.ago DESC",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Minute {
            ago: r.get(0),
            finished: r.get(1),
            pickup_secs: r.get(2),
        })
        .collect())
}

pub async fn lease_holders(client: &Client) -> Result<Vec<LeaseHolder>> {
    let rows = client
        .query(
            "SELECT locked_by, count(*), extract(epoch FROM min(locked_until) - now())::float8
               FROM job_tasks
              WHERE status = 'processing' AND locked_by IS NOT NULL
              GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| LeaseHolder {
            worker: r.get(0),
            jobs: r.get(1),
            soonest_expiry_secs: r.get::<_, Option<f64>>(2).unwrap_or(0.0),
        })
        .collect())
}

const BATCH_COLUMNS: &str = "id, coalesce(status, 'pending')::text, total_tasks,
    coalesce(completed_tasks, 0), coalesce(failed_tasks, 0), created_at";

fn batch_line(r: &tokio_postgres::Row) -> BatchLine {
    BatchLine {
        id: r.get(0),
        status: r.get(1),
        total: r.get(2),
        completed: r.get(3),
        failed: r.get(4),
        created_at: r.get(5),
    }
}

/// The newest batches.
pub async fn recent_batches(client: &Client, limit: i64) -> Result<Vec<BatchLine>> {
    let rows = client
        .query(
            &format!(
                "SELECT {BATCH_COLUMNS} FROM job_batches
                  ORDER BY created_at DESC NULLS LAST, id DESC LIMIT $1"
            ),
            &[&limit],
        )
        .await?;
    Ok(rows.iter().map(batch_line).collect())
}

pub async fn batches(client: &Client, ids: &[Uuid]) -> Result<Vec<BatchLine>> {
    let rows = client
        .query(
            &format!("SELECT {BATCH_COLUMNS} FROM job_batches WHERE id = ANY($1)"),
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(batch_line).collect())
}

const JOB_COLUMNS: &str = "id, batch_id, filename, task_type, status::text, stage,
    completed_chunks, total_chunks, attempt, created_at";

fn job_line(r: &tokio_postgres::Row) -> JobLine {
    JobLine {
        id: r.get(0),
        batch_id: r.get(1),
        filename: r.get(2),
        task_type: r.get(3),
        status: r.get(4),
        stage: r.get(5),
        completed_chunks: r.get(6),
        total_chunks: r.get(7),
        attempt: r.get(8),
        created_at: r.get(9),
    }
}

fn cursor_of(line: &JobLine) -> Cursor {
    Cursor {
        created_micros: line.created_at.map_or(i64::MIN, |t| t.timestamp_micros()),
        id: line.id,
    }
}

/// One page of jobs, newest first, after `after`; and the cursor of the
/// next page when there is one.
pub async fn jobs_page(
    client: &Client,
    filter: &JobFilter,
    after: Option<Cursor>,
) -> Result<(Vec<JobLine>, Option<Cursor>)> {
    let pattern = filter.filename.as_ref().map(|f| {
        let escaped = f
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        format!("%{escaped}%")
    });
    let after_id = after.map(|c| c.id);
    let after_null = after.is_some_and(|c| c.created_micros == i64::MIN);
    let after_ts = after
        .filter(|_| !after_null)
        .and_then(|c| DateTime::<Utc>::from_timestamp_micros(c.created_micros));
    let rows = client
        .query(
            &format!(
                "SELECT {JOB_COLUMNS} FROM job_tasks
                  WHERE ($1::text IS NULL OR status = $1)
                    AND ($2::text IS NULL OR task_type = $2)
                    AND ($3::uuid IS NULL OR batch_id = $3)
                    AND ($4::text IS NULL OR filename ILIKE $4)
                    AND ($6::uuid IS NULL
                         OR (coalesce(created_at, '-infinity'::timestamptz), id)
                            < (CASE WHEN $7 THEN '-infinity'::timestamptz ELSE $5::timestamptz END, $6))
                  ORDER BY coalesce(created_at, '-infinity'::timestamptz) DESC, id DESC
                  LIMIT $8"
            ),
            &[
                &filter.status,
                &filter.task_type,
                &filter.batch,
                &pattern,
                &after_ts,
                &after_id,
                &after_null,
                &(PAGE + 1),
            ],
        )
        .await?;
    let mut lines: Vec<JobLine> = rows.iter().map(job_line).collect();
    let next = (lines.len() as i64 > PAGE).then(|| {
        lines.truncate(PAGE as usize);
        cursor_of(&lines[PAGE as usize - 1])
    });
    Ok((lines, next))
}

pub async fn job(client: &Client, id: Uuid) -> Result<Option<JobDetail>> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {JOB_COLUMNS}, coalesce(document_id, id), file_path, error_message,
                        coalesce(errors, '[]'::jsonb), max_attempts, locked_by, run_at,
                        started_at, finished_at, result
                   FROM job_tasks WHERE id = $1"
            ),
            &[&id],
        )
        .await?;
    Ok(row.map(|r| {
        let errors: Value = r.get(13);
        JobDetail {
            line: job_line(&r),
            document_id: r.get(10),
            file_path: r.get(11),
            error_message: r.get(12),
            errors: errors.as_array().cloned().unwrap_or_default(),
            max_attempts: r.get(14),
            locked_by: r.get(15),
            run_at: r.get(16),
            started_at: r.get(17),
            finished_at: r.get(18),
            result: r.get(19),
        }
    }))
}

/// The jobs whose progress a page shows, for its live updates.
pub async fn jobs(client: &Client, ids: &[Uuid]) -> Result<Vec<JobLine>> {
    let rows = client
        .query(
            &format!("SELECT {JOB_COLUMNS} FROM job_tasks WHERE id = ANY($1)"),
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(job_line).collect())
}

/// Retries every failed (`error`) job of the batch, each through
/// `docworker_retry`; returns how many went back to pending.
pub async fn retry_failed_in_batch(client: &Client, batch: Uuid) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FILTER (WHERE docworker_retry(id))
               FROM job_tasks WHERE batch_id = $1 AND status = 'error'",
            &[&batch],
        )
        .await?
        .get(0))
}

/// How long ago, for the page: "12 s", "4 min", "3 h", "2 d".
pub fn age(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(at) = at else {
        return "-".into();
    };
    let secs = (now - at).num_seconds().max(0) as u64;
    human(Duration::from_secs(secs))
}

pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        7200..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_survives_the_round_trip_through_a_link() {
        let c = Cursor {
            created_micros: 1_764_763_200_123_456,
            id: Uuid::from_u128(7),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        let legacy = Cursor {
            created_micros: i64::MIN,
            id: Uuid::from_u128(9),
        };
        assert_eq!(Cursor::decode(&legacy.encode()), Some(legacy));
        assert_eq!(Cursor::decode("nonsense"), None);
        assert_eq!(Cursor::decode("12_not-a-uuid"), None);
    }

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(human(Duration::from_secs(5)), "5 s");
        assert_eq!(human(Duration::from_secs(600)), "10 min");
        assert_eq!(human(Duration::from_secs(3 * 3600)), "3 h");
        assert_eq!(human(Duration::from_secs(3 * 86_400)), "3 d");
    }
}
