//! Writes a worker makes to rows it holds while their jobs run: progress
//! (stage, counts, result) and lease renewal. Each is fenced by (id, attempt,
//! worker id, `processing`), written once below, so a worker that lost a job
//! (cancelled, or taken over after its lease expired) changes nothing and
//! learns so from the count of rows changed.

use std::time::Duration;

use anyhow::Result;
use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::claim::Attempt;
use super::state::{JobStatus, Stage};

/// The fence: the row `t` is still held by this attempt of this worker.
/// `id`, `attempt` and `worker` are SQL expressions (parameters, columns).
pub(crate) fn fence(id: &str, attempt: &str, worker: &str) -> String {
    format!("t.id = {id} AND t.attempt = {attempt} AND t.locked_by = {worker} AND t.status = 'processing'")
}

/// One held attempt's fenced writes.
pub struct Fence<'a> {
    pub pool: &'a Pool,
    pub worker_id: &'a str,
    pub key: Attempt,
}

impl Fence<'_> {
    /// Returns whether the row was still ours.
    pub async fn set_stage(&self, stage: Stage) -> Result<bool> {
        self.write("stage = $4", &[&stage.as_str()]).await
    }

    pub async fn set_progress(&self, completed: i32, total: i32) -> Result<bool> {
        self.write(
            "completed_chunks = $4, total_chunks = $5",
            &[&completed, &total],
        )
        .await
    }

    pub async fn set_result(&self, result: &serde_json::Value) -> Result<bool> {
        self.write("result = $4", &[result]).await
    }

    async fn write(&self, set: &str, extra: &[&(dyn ToSql + Sync)]) -> Result<bool> {
        let sql = format!(
            "UPDATE job_tasks t SET {set}, updated_at = now() WHERE {}",
            fence("$1", "$2", "$3")
        );
        let mut params: Vec<&(dyn ToSql + Sync)> =
            vec![&self.key.id, &self.key.attempt, &self.worker_id];
        params.extend_from_slice(extra);
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(&sql).await?;
        Ok(client.execute(&stmt, &params).await? > 0)
    }
}

/// An attempt whose lease could not be renewed, and the row's status now
/// (`None` when the row is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotRenewed {
    pub key: Attempt,
    pub status: Option<JobStatus>,
    /// Still ours, but another transaction holds the row's lock: skipped
    /// this time rather than waited for, so one locked row cannot hold up
    /// the renewal of the others.
    pub busy: bool,
}

/// Renews the leases of `held` by `lease` in one statement; returns those
/// it could not renew. Rows locked by another transaction are skipped.
pub async fn renew_leases(
    pool: &Pool,
    worker_id: &str,
    held: &[Attempt],
    lease: Duration,
) -> Result<Vec<NotRenewed>> {
    let sql = format!(
        "WITH mine AS (
             SELECT * FROM unnest($1::uuid[], $2::int[]) AS m(id, attempt)
         ), ours AS MATERIALIZED (
             SELECT t.id FROM job_tasks t JOIN mine ON t.id = mine.id WHERE {0}
         ), locked AS MATERIALIZED (
             -- The fence again: a row changed since this statement's
             -- snapshot (completed by our own write cycle a moment ago) is
             -- re-checked as it is now.
             SELECT t.id FROM job_tasks t JOIN mine ON t.id = mine.id WHERE {0}
                FOR NO KEY UPDATE OF t SKIP LOCKED
         ), renewed AS (
             UPDATE job_tasks t
                SET locked_until = now() + make_interval(secs => $4::float8), heartbeat_at = now()
               FROM locked JOIN mine ON mine.id = locked.id
              WHERE {0}
             RETURNING t.id
         )
         SELECT m.id, m.attempt, t.status::text AS status,
                m.id IN (SELECT id FROM ours) AS busy
           FROM mine m LEFT JOIN job_tasks t ON t.id = m.id
          WHERE m.id NOT IN (SELECT id FROM renewed)",
        fence("mine.id", "mine.attempt", "$3")
    );
    let ids: Vec<Uuid> = held.iter().map(|k| k.id).collect();
    let attempts: Vec<i32> = held.iter().map(|k| k.attempt).collect();
    let client = pool.get().await?;
    let stmt = client.prepare_cached(&sql).await?;
    let rows = client
        .query(&stmt, &[&ids, &attempts, &worker_id, &lease.as_secs_f64()])
        .await?;
    rows.iter()
        .map(|row| {
            let status: Option<String> = row.get("status");
            Ok(NotRenewed {
                key: Attempt {
                    id: row.get("id"),
                    attempt: row.get("attempt"),
                },
                status: status.map(|s| s.parse()).transpose()?,
                busy: row.get("busy"),
            })
        })
        .collect()
}
