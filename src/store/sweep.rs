//! The periodic sweeps' statements: rescuing jobs whose lease expired and
//! pruning old finished rows. SKIP LOCKED keeps replicas that sweep at the
//! same moment out of each other's way.

use anyhow::Result;
use deadpool_postgres::Pool;
use uuid::Uuid;

use super::state::JobStatus;

const RESCUE_SQL: &str = "
WITH expired AS MATERIALIZED (
    SELECT id FROM job_tasks
     WHERE status = 'processing' AND locked_until < now()
     ORDER BY locked_until
     LIMIT $1
     FOR UPDATE SKIP LOCKED
), p AS (
    SELECT t.id, t.attempt < t.max_attempts AS will_retry,
           format('Attempt %s of %s was interrupted: worker %s stopped renewing its lease (it crashed, hung or lost its database connection)',
                  t.attempt, t.max_attempts, coalesce(t.locked_by, '?')) AS message
      FROM job_tasks t JOIN expired e ON e.id = t.id
)
UPDATE job_tasks t SET
    status = CASE WHEN p.will_retry THEN 'pending' ELSE 'error' END,
    run_at = now(),
    finished_at = CASE WHEN p.will_retry THEN NULL ELSE now() END,
    stage = CASE WHEN p.will_retry THEN NULL ELSE t.stage END,
    total_chunks = CASE WHEN p.will_retry THEN 0 ELSE t.total_chunks END,
    completed_chunks = CASE WHEN p.will_retry THEN 0 ELSE t.completed_chunks END,
    result = CASE WHEN p.will_retry THEN NULL ELSE t.result END,
    error_message = CASE WHEN p.will_retry
        THEN p.message || '. Retrying now.'
        ELSE format('Gave up after %s attempts. Last error: %s.', t.attempt, p.message) END,
    errors = t.errors || jsonb_build_array(jsonb_build_object(
        'attempt', t.attempt, 'at', now(), 'kind', 'lease_expired',
        'message', p.message, 'worker', t.locked_by)),
    locked_by = NULL,
    locked_until = NULL,
    updated_at = now()
FROM p
WHERE t.id = p.id
RETURNING t.id, t.status::text AS status";

const PRUNE_TASKS_SQL: &str = "
DELETE FROM job_tasks WHERE id IN (
    SELECT t.id FROM job_tasks t LEFT JOIN job_batches b ON b.id = t.batch_id
     WHERE t.status IN ('completed', 'error', 'cancelled')
       AND t.finished_at < now() - make_interval(secs => $1::float8)
       AND (t.batch_id IS NULL
            OR (b.status <> 'pending' AND b.finished_at < now() - make_interval(secs => $1::float8)))
     LIMIT $2
     FOR UPDATE OF t SKIP LOCKED)";

const PRUNE_BATCHES_SQL: &str = "
DELETE FROM job_batches WHERE id IN (
    SELECT b.id FROM job_batches b
     WHERE b.status <> 'pending'
       AND b.finished_at < now() - make_interval(secs => $1::float8)
       AND NOT EXISTS (SELECT 1 FROM job_tasks t WHERE t.batch_id = b.id)
     LIMIT $2
     FOR UPDATE SKIP LOCKED)";

/// One round of the rescue: up to `limit` jobs whose lease expired go back
/// to `pending` (the lost attempt counted) or to `error` when no attempts
/// remain; returns each with its new status. When any is due again, the
/// same transaction sends `NOTIFY docworker_jobs`.
pub async fn rescue_expired(pool: &Pool, limit: i64) -> Result<Vec<(Uuid, JobStatus)>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut rescued = Vec::new();
    for row in tx.query(RESCUE_SQL, &[&limit]).await? {
        let status: String = row.get("status");
        rescued.push((row.get("id"), status.parse()?));
    }
    if rescued.iter().any(|(_, s)| *s == JobStatus::Pending) {
        tx.execute("SELECT pg_notify('docworker_jobs', '')", &[])
            .await?;
    }
    tx.commit().await?;
    Ok(rescued)
}

/// Deletes up to `limit` finished tasks older than `retention_secs` (and
/// whose batch, if any, finished that long ago too); returns how many.
pub async fn prune_tasks(pool: &Pool, retention_secs: f64, limit: i64) -> Result<u64> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(PRUNE_TASKS_SQL).await?;
    Ok(client.execute(&stmt, &[&retention_secs, &limit]).await?)
}

/// Deletes up to `limit` finished batches older than `retention_secs` that
/// have no tasks left; returns how many.
pub async fn prune_batches(pool: &Pool, retention_secs: f64, limit: i64) -> Result<u64> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(PRUNE_BATCHES_SQL).await?;
    Ok(client.execute(&stmt, &[&retention_secs, &limit]).await?)
}

/// Recounts up to `limit` batches whose rollup was skipped because another
/// transaction held them (sql/0005), those that can be locked now; returns
/// how many.
pub async fn refresh_dirty_batches(pool: &Pool, limit: i32) -> Result<i32> {
    let client = pool.get().await?;
    let stmt = client
        .prepare_cached("SELECT docworker_refresh_dirty_batches($1)")
        .await?;
    Ok(client.query_one(&stmt, &[&limit]).await?.get(0))
}

/// The queue's tables, as vacuumed when autovacuum cannot.
pub const QUEUE_TABLES: [&str; 3] = ["job_tasks", "job_batches", "docworker_dirty_batches"];

/// Whether autovacuum keeps `table` clean, and how many dead rows it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VacuumState {
    /// Autovacuum is on for the cluster and not turned off for the table.
    pub autovacuum: bool,
    /// This role may vacuum it (it owns the table, or is superuser).
    pub may_vacuum: bool,
    pub live_rows: i64,
    pub dead_rows: i64,
}

impl VacuumState {
    /// Dead rows past what autovacuum would tolerate with the per-table
    /// settings of migration 1 (50 + 2% of the live rows).
    pub fn needs_vacuum(&self) -> bool {
        self.dead_rows > 50 + self.live_rows / 50
    }
}

pub async fn vacuum_state(pool: &Pool, table: &str) -> Result<VacuumState> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT current_setting('autovacuum')::bool
                    AND coalesce((SELECT o.option_value::bool
                                    FROM pg_options_to_table(c.reloptions) o
                                   WHERE o.option_name = 'autovacuum_enabled'), true) AS autovacuum,
                    pg_has_role(current_user, c.relowner, 'USAGE')
                    OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS may_vacuum,
                    coalesce(s.n_live_tup, 0) AS live, coalesce(s.n_dead_tup, 0) AS dead
               FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
              WHERE c.oid = $1::text::regclass",
            &[&table],
        )
        .await?;
    Ok(VacuumState {
        autovacuum: row.get("autovacuum"),
        may_vacuum: row.get("may_vacuum"),
        live_rows: row.get("live"),
        dead_rows: row.get("dead"),
    })
}

/// `VACUUM (ANALYZE)` of one of [`QUEUE_TABLES`], by one worker at a time
/// (a session advisory lock; false when another worker holds it). It takes
/// no lock that blocks the queue's reads or writes.
pub async fn vacuum(pool: &Pool, table: &str) -> Result<bool> {
    // 1685021473: docworker's key space ('docu') + 1, for maintenance.
    const VACUUM_LOCK: i64 = 1_685_021_473;
    anyhow::ensure!(QUEUE_TABLES.contains(&table), "not a queue table: {table}");
    let client = pool.get().await?;
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&VACUUM_LOCK])
        .await?
        .get(0);
    if !locked {
        return Ok(false);
    }
    let vacuumed = client
        .batch_execute(&format!("VACUUM (ANALYZE) {table}"))
        .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&VACUUM_LOCK])
        .await?;
    vacuumed?;
    Ok(true)
}
