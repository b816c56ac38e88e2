//! The completer: records how job attempts ended, many per statement, and in
//! the same statement claims the jobs that take over their slots.
//!
//! Recording an outcome and refilling the slot it frees are one round trip
//! and one commit: a busy worker spends one statement per batch of finished
//! jobs, not two per job, and the table never shows more `processing` rows
//! for a worker than it has slots. Every write is fenced by
//! (id, attempt, worker id), so a worker that lost a job changes nothing.
//!
//! Outcomes become row states in SQL, from the row itself: whether a
//! transient failure is retried depends on `attempt < max_attempts`, and the
//! retry time comes from the database clock (see `retry`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::job::{Attempt, ClaimedJob, JobError};
use crate::pipeline::source::Disposal;
use crate::producer::{claim_columns, claim_set};
use crate::retry::RetryPolicy;

/// Locks the batches $1 in id order. Every writer that may finish tasks of
/// several batches in one statement takes this first, so that the rollup
/// trigger, which locks a batch per finished task, never finds them locked
/// crosswise by another writer.
pub const LOCK_BATCHES_SQL: &str =
    "SELECT 1 FROM job_batches WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE";

/// How a job attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Transient errors are retried while attempts remain; permanent ones are final.
    Failed(JobError),
    /// Stopped by shutdown: back to `pending`, the attempt not counted.
    HandBack,
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub key: Attempt,
    pub batch_id: Option<Uuid>,
    pub outcome: Outcome,
    /// Done to the uploaded file once the completion is recorded, and only then.
    pub after_success: Option<Disposal>,
}

impl Finished {
    /// Carries out `after_success` if `written` says the job completed.
    pub async fn after_written(&self, written: &Written) {
        if let (Some(d), Written::Applied { status, .. }) = (&self.after_success, written) {
            if status == "completed" {
                let d = d.clone();
                let _ = tokio::task::spawn_blocking(move || d.apply()).await;
            }
        }
    }
}

/// The row's state after an outcome was written.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// `status` is the new status; `retry_in` is set when it waits for a retry.
    Applied {
        status: String,
        retry_in: Option<Duration>,
    },
    /// The fence refused the write: the job is no longer ours.
    Rejected,
}

/// What one write cycle did.
#[derive(Debug)]
pub struct Cycle {
    /// One entry per outcome given, in order.
    pub written: Vec<Written>,
    pub claimed: Vec<ClaimedJob>,
    /// When the claim was sent: the leases of `claimed` run from here.
    pub claimed_at: Instant,
}

pub struct Completer {
    worker_id: Arc<str>,
    policy: RetryPolicy,
    lease: Duration,
    sql: String,
}

impl Completer {
    pub fn new(worker_id: Arc<str>, policy: RetryPolicy, lease: Duration) -> Completer {
        Completer {
            worker_id,
            policy,
            lease,
            sql: complete_and_claim_sql("{limit}"),
        }
    }

    /// Records `finished` and claims up to `claim` due jobs, atomically.
    pub async fn write(&self, pool: &Pool, finished: &[Finished], claim: i64) -> Result<Cycle> {
        let mut ids = Vec::with_capacity(finished.len());
        let mut attempts = Vec::with_capacity(finished.len());
        let mut outcomes = Vec::with_capacity(finished.len());
        let mut kinds: Vec<Option<&str>> = Vec::with_capacity(finished.len());
        let mut messages: Vec<Option<&str>> = Vec::with_capacity(finished.len());
        let mut batches = BTreeSet::new();
        for f in finished {
            ids.push(f.key.id);
            attempts.push(f.key.attempt);
            let (outcome, kind, message) = match &f.outcome {
                Outcome::Completed => ("completed", None, None),
                Outcome::Failed(e) => ("failed", Some(e.kind.as_str()), Some(e.message.as_str())),
                Outcome::HandBack => ("handback", None, None),
            };
            outcomes.push(outcome);
            kinds.push(kind);
            messages.push(message);
            batches.extend(f.batch_id);
        }
        let (base, max) = self.policy.params();
        let worker_id: &str = &self.worker_id;
        let lease = self.lease.as_secs_f64();
        let handed_back = outcomes.contains(&"handback");
        let params: [&(dyn ToSql + Sync); 9] = [
            &ids, &attempts, &outcomes, &kinds, &messages, &base, &max, &worker_id, &lease,
        ];
        // The claim size is written into the text, not bound: with a known
        // LIMIT the server can reuse one generic plan per size instead of
        // planning every cycle afresh.
        let sql = self.sql.replace("{limit}", &claim.to_string());

        let mut client = pool.get().await?;
        let claimed_at = Instant::now();
        let rows = if batches.is_empty() && !handed_back {
            // The common case is one autocommit statement: one round trip.
            let stmt = client.prepare_cached(&sql).await?;
            client.query(&stmt, &params).await?
        } else {
            let tx = client.transaction().await?;
            if !batches.is_empty() {
                let batches: Vec<Uuid> = batches.into_iter().collect();
                let lock = tx.prepare_cached(LOCK_BATCHES_SQL).await?;
                tx.execute(&lock, &[&batches]).await?;
            }
            let stmt = tx.prepare_cached(&sql).await?;
            let rows = tx.query(&stmt, &params).await?;
            if handed_back {
                // Handed-back jobs are due now: wake the other workers.
                tx.execute("SELECT pg_notify('docworker_jobs', '')", &[])
                    .await?;
            }
            tx.commit().await?;
            rows
        };

        let mut written = HashMap::with_capacity(finished.len());
        let mut claimed = Vec::new();
        for row in &rows {
            if row.get::<_, bool>(0) {
                claimed.push(ClaimedJob::from_row_at(row, 1));
            } else {
                let id: Uuid = row.get(1);
                let status: String = row.get(11);
                let retry_in: Option<f64> = row.get(12);
                let retry_in = retry_in.map(|s| Duration::from_secs_f64(s.max(0.0)));
                written.insert(id, Written::Applied { status, retry_in });
            }
        }
        let written = finished
            .iter()
            .map(|f| match written.remove(&f.key.id) {
                Some(w) => w,
                None => {
                    tracing::warn!(job = %f.key.id, attempt = f.key.attempt,
                        "outcome not recorded: the job was cancelled, or taken over by another worker after its lease expired");
                    Written::Rejected
                }
            })
            .collect();
        Ok(Cycle {
            written,
            claimed,
            claimed_at,
        })
    }
}

/// A document's jobs run one at a time: two ingests of one document (a
/// re-upload while the first still runs, a duplicate delivery) or an ingest
/// beside a delete would each delete the other's chunks as stale. So a
/// job whose document has a job `processing` is not claimed, and one claim
/// takes at most one job per document (the rest wait for the next claim).
/// `noop` jobs are exempt: they touch no document. The check reads
/// `job_tasks_running_document_idx`.
pub const ONE_PER_DOCUMENT: &str = "(t.task_type = 'noop' OR NOT EXISTS (
            SELECT 1 FROM job_tasks r
             WHERE r.status = 'processing'
               AND coalesce(r.document_id, r.id) = coalesce(t.document_id, t.id)))";

/// $1..$5 the outcomes (id, attempt, outcome, kind, message), $6/$7 retry
/// base/max seconds, $8 worker id, $9 lease seconds; `limit` is the text of
/// the claim's LIMIT.
///
/// Both halves see the statement's snapshot, so a job handed back or
/// scheduled for retry here is never claimed again by the same statement.
pub fn complete_and_claim_sql(limit: &str) -> String {
    let retry_at = RetryPolicy::retry_at_sql("t.attempt", "$6", "$7");
    let claim_set = claim_set("$8", "$9");
    let claim_columns = claim_columns();
    let one_per_document = ONE_PER_DOCUMENT;
    format!(
        r#"
WITH o AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[])
        AS o(id, attempt, outcome, kind, message)
), p AS (
    SELECT o.*,
           (o.outcome = 'failed' AND o.kind = 'transient' AND t.attempt < t.max_attempts) AS will_retry,
           {retry_at} AS retry_at
      FROM o JOIN job_tasks t ON t.id = o.id
), done AS (
    UPDATE job_tasks t SET
        status = CASE
            WHEN p.outcome = 'completed' THEN 'completed'
            WHEN p.outcome = 'handback' OR p.will_retry THEN 'pending'
            ELSE 'error' END,
        attempt = CASE WHEN p.outcome = 'handback' THEN t.attempt - 1 ELSE t.attempt END,
        run_at = CASE
            WHEN p.will_retry THEN p.retry_at
            WHEN p.outcome = 'handback' THEN now()
            ELSE t.run_at END,
        finished_at = CASE WHEN p.outcome = 'handback' OR p.will_retry THEN NULL ELSE now() END,
        stage = CASE WHEN p.outcome = 'completed' THEN 'done' ELSE t.stage END,
        error_message = CASE
            WHEN p.outcome = 'completed' THEN NULL
            WHEN p.outcome = 'handback' THEN t.error_message
            WHEN p.will_retry THEN format('Attempt %s of %s failed: %s Retrying at %s.',
                t.attempt, t.max_attempts, p.message,
                to_char(p.retry_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'))
            WHEN p.kind = 'transient' THEN format('Gave up after %s attempts. Last error: %s',
                t.attempt, p.message)
            ELSE p.message END,
        errors = CASE WHEN p.message IS NULL THEN t.errors
            ELSE t.errors || jsonb_build_array(jsonb_build_object(
                'attempt', t.attempt, 'at', now(), 'kind', p.kind,
                'message', p.message, 'worker', $8::text)) END,
        locked_by = NULL,
        locked_until = NULL,
        updated_at = now()
    FROM p
    WHERE t.id = p.id AND t.attempt = p.attempt AND t.locked_by = $8 AND t.status = 'processing'
    RETURNING t.id, t.status::text AS status,
        CASE WHEN p.will_retry THEN extract(epoch FROM p.retry_at - now())::float8 END AS retry_in
), c AS MATERIALIZED (
    SELECT id, coalesce(document_id, id) AS document, priority, run_at FROM job_tasks t
     WHERE status = 'pending' AND run_at <= now()
       AND {one_per_document}
     ORDER BY priority, run_at, id
     LIMIT {limit}
     FOR UPDATE SKIP LOCKED
), first AS (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY document ORDER BY priority, run_at, id) AS n
          FROM c) ranked
     WHERE n = 1
), claimed AS (
    UPDATE job_tasks t SET {claim_set}
      FROM first WHERE t.id = first.id
    RETURNING {claim_columns}
)
SELECT true, claimed.*, NULL::text, NULL::float8 FROM claimed
UNION ALL
SELECT false, done.id, NULL::int, NULL::int, NULL::text, NULL::text, NULL::text,
       NULL::uuid, NULL::jsonb, NULL::uuid, NULL::float8, done.status, done.retry_in
  FROM done
"#
    )
}
