//! The claim: what taking a job writes to its row and what it reads back.
//!
//! One column list ([`CLAIM_COLUMNS`]) is both the `RETURNING` of every
//! claim statement and what [`ClaimedJob::from_row`] reads, by name, so a
//! column is added in one place. The claim of the write cycle lives in
//! `cycle`; the claim of one named job (`worker --once --job`) is here.

use std::time::{Duration, Instant};

use anyhow::Result;
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio_postgres::Row;
use uuid::Uuid;

/// Identifies one attempt of one job: the fencing token of every write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attempt {
    pub id: Uuid,
    pub attempt: i32,
}

/// A row as claimed, before validation: decoded leniently, since anything
/// the app could have written must decode.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub key: Attempt,
    pub max_attempts: i32,
    pub task_type: String,
    pub filename: String,
    pub file_path: Option<String>,
    /// The job's exclusivity key: `document_id`, or its own id without one.
    pub document_id: Uuid,
    pub options: Value,
    pub batch_id: Option<Uuid>,
    /// How long it had been due when it was claimed (its pickup latency).
    pub waited: Duration,
}

/// (name, expression over `t`) of what a claim returns.
pub(crate) const CLAIM_COLUMNS: &[(&str, &str)] = &[
    ("id", "t.id"),
    ("attempt", "t.attempt"),
    ("max_attempts", "t.max_attempts"),
    ("task_type", "t.task_type"),
    ("filename", "t.filename::text"),
    ("file_path", "t.file_path"),
    ("document_id", "coalesce(t.document_id, t.id)"),
    ("options", "t.options"),
    ("batch_id", "t.batch_id"),
    (
        "waited_s",
        "greatest(extract(epoch FROM now() - t.run_at), 0)::float8",
    ),
];

/// `expr AS name, ...` of [`CLAIM_COLUMNS`], for a `RETURNING`.
pub(crate) fn returning() -> String {
    CLAIM_COLUMNS
        .iter()
        .map(|(name, expr)| format!("{expr} AS {name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a claim writes: a new attempt, the lease, the progress columns
/// reset. `worker` and `lease` name the parameters holding the worker id and
/// the lease in seconds.
pub(crate) fn claim_set(worker: &str, lease: &str) -> String {
    format!(
        "status = 'processing', attempt = t.attempt + 1, locked_by = {worker},
         locked_until = now() + make_interval(secs => {lease}::float8), heartbeat_at = now(),
         started_at = now(), finished_at = NULL, stage = 'started',
         total_chunks = 0, completed_chunks = 0, result = NULL, updated_at = now()"
    )
}

impl ClaimedJob {
    /// Reads the columns of [`CLAIM_COLUMNS`] by name.
    pub(crate) fn from_row(row: &Row) -> ClaimedJob {
        ClaimedJob {
            key: Attempt {
                id: row.get("id"),
                attempt: row.get("attempt"),
            },
            max_attempts: row.get("max_attempts"),
            task_type: row.get("task_type"),
            filename: row.get("filename"),
            file_path: row.get("file_path"),
            document_id: row.get("document_id"),
            options: row.get("options"),
            batch_id: row.get("batch_id"),
            waited: Duration::from_secs_f64(row.get("waited_s")),
        }
    }
}

/// Claims the job `id` whatever its state, unless another worker holds a
/// live lease on it. For `worker --once --job`. Returns the job and when
/// the claim was sent (its lease runs from there).
pub async fn claim_one(
    pool: &Pool,
    worker_id: &str,
    lease: Duration,
    id: Uuid,
) -> Result<Option<(ClaimedJob, Instant)>> {
    let sql = format!(
        "WITH c AS MATERIALIZED (
             SELECT id FROM job_tasks
              WHERE id = $1 AND (status <> 'processing' OR locked_until < now())
              FOR UPDATE SKIP LOCKED)
         UPDATE job_tasks t
            SET {}
           FROM c WHERE t.id = c.id
         RETURNING {}",
        claim_set("$2", "$3"),
        returning()
    );
    let client = pool.get().await?;
    let claimed_at = Instant::now();
    let row = client
        .query_opt(&sql, &[&id, &worker_id, &lease.as_secs_f64()])
        .await?;
    Ok(row.map(|r| (ClaimedJob::from_row(&r), claimed_at)))
}
