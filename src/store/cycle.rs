//! The write cycle: one statement that records how many job attempts ended
//! and claims the jobs that take over their slots.
//!
//! Recording an outcome and refilling the slot it frees are one round trip
//! and one commit: a busy worker spends one statement per batch of finished
//! jobs, not two per job. Every write is fenced by (id, attempt, worker id),
//! so a worker that lost a job changes nothing. Outcomes become row states
//! in SQL, from the row itself: whether a transient failure is retried
//! depends on `attempt < max_attempts`, and the retry time comes from the
//! database clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use deadpool_postgres::Pool;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::claim::{claim_set, returning, Attempt, ClaimedJob};
use super::fence::fence;
use super::state::{ErrorKind, JobStatus};

/// The largest share of a retry delay that jitter may take off.
pub const BACKOFF_JITTER: f64 = 0.25;

/// How an attempt ended, as the row records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending<'a> {
    Completed,
    /// Transient failures are retried while attempts remain.
    Failed {
        kind: ErrorKind,
        message: &'a str,
    },
    /// Back to `pending`, the attempt not counted (shutdown, a dependency
    /// down). `note`, when given, becomes the row's `error_message` while
    /// it waits; the error history is left alone.
    HandBack {
        note: Option<&'a str>,
    },
}

/// One outcome to record.
#[derive(Debug, Clone, Copy)]
pub struct Ended<'a> {
    pub key: Attempt,
    pub ending: Ending<'a>,
}

/// The row's state after an outcome was written.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// `status` is the new status; `retry_in` is set when it waits for a retry.
    Applied {
        status: JobStatus,
        retry_in: Option<Duration>,
    },
    /// The fence refused the write: the job is no longer ours.
    Rejected,
    /// Another transaction holds the row's lock: nothing was written, and
    /// the outcome is to be written again later.
    Deferred,
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

/// Capped exponential backoff with jitter, in seconds: the n-th failed
/// attempt waits `min(max, base * 2^(n-1))`, shortened by up to
/// [`BACKOFF_JITTER`] at random.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base_secs: f64,
    pub max_secs: f64,
}

/// The write cycle of one worker.
pub struct WriteCycle {
    worker_id: String,
    lease_secs: f64,
    sql: String,
}

impl WriteCycle {
    /// `unkeyed` names the task types exempt from one-per-key exclusivity.
    pub fn new(worker_id: &str, lease: Duration, unkeyed: &[&str]) -> WriteCycle {
        WriteCycle {
            worker_id: worker_id.to_owned(),
            lease_secs: lease.as_secs_f64(),
            sql: statement("{limit}", unkeyed),
        }
    }

    /// Records `ended` (failures to retry after `backoff`) and claims up to
    /// `claim` due jobs, atomically, none of a task type in `paused`.
    pub async fn run(
        &self,
        pool: &Pool,
        ended: &[Ended<'_>],
        backoff: Backoff,
        claim: i64,
        paused: &[&str],
    ) -> Result<Cycle> {
        let mut ids = Vec::with_capacity(ended.len());
        let mut attempts = Vec::with_capacity(ended.len());
        let mut outcomes = Vec::with_capacity(ended.len());
        let mut kinds: Vec<Option<&str>> = Vec::with_capacity(ended.len());
        let mut messages: Vec<Option<&str>> = Vec::with_capacity(ended.len());
        for e in ended {
            ids.push(e.key.id);
            attempts.push(e.key.attempt);
            let (outcome, kind, message) = match e.ending {
                Ending::Completed => ("completed", None, None),
                Ending::Failed { kind, message } => ("failed", Some(kind.as_str()), Some(message)),
                Ending::HandBack { note } => ("handback", None, note),
            };
            outcomes.push(outcome);
            kinds.push(kind);
            messages.push(message);
        }
        let handed_back = outcomes.contains(&"handback");
        let worker_id: &str = &self.worker_id;
        let params: [&(dyn ToSql + Sync); 10] = [
            &ids,
            &attempts,
            &outcomes,
            &kinds,
            &messages,
            &backoff.base_secs,
            &backoff.max_secs,
            &worker_id,
            &self.lease_secs,
            &paused,
        ];
        // The claim size is written into the text, not bound: with a known
        // LIMIT the server can reuse one generic plan per size instead of
        // planning every cycle afresh.
        let sql = self.sql.replace("{limit}", &claim.to_string());

        let mut client = pool.get().await?;
        let claimed_at = Instant::now();
        let rows = if !handed_back {
            // The common case is one autocommit statement: one round trip.
            let stmt = client.prepare_cached(&sql).await?;
            client.query(&stmt, &params).await?
        } else {
            let tx = client.transaction().await?;
            let stmt = tx.prepare_cached(&sql).await?;
            let rows = tx.query(&stmt, &params).await?;
            // Handed-back jobs are due now: wake the other workers.
            tx.execute("SELECT pg_notify('docworker_jobs', '')", &[])
                .await?;
            tx.commit().await?;
            rows
        };

        let mut written = HashMap::with_capacity(ended.len());
        let mut claimed = Vec::new();
        for row in &rows {
            if let Some(id) = row.get::<_, Option<Uuid>>("deferred_id") {
                written.insert(id, Written::Deferred);
                continue;
            }
            match row.get::<_, Option<Uuid>>("written_id") {
                Some(id) => {
                    let status: String = row.get("written_status");
                    let retry_in: Option<f64> = row.get("retry_in");
                    written.insert(
                        id,
                        Written::Applied {
                            status: status.parse()?,
                            retry_in: retry_in.map(|s| Duration::from_secs_f64(s.max(0.0))),
                        },
                    );
                }
                None => claimed.push(ClaimedJob::from_row(row)),
            }
        }
        let written = ended
            .iter()
            .map(|e| written.remove(&e.key.id).unwrap_or(Written::Rejected))
            .collect();
        Ok(Cycle {
            written,
            claimed,
            claimed_at,
        })
    }
}

/// The write-cycle statement. $1..$5 the outcomes (id, attempt, outcome,
/// kind, message), $6/$7 backoff base/max seconds, $8 worker id, $9 lease
/// seconds, $10 the task types not to claim (their dependencies are down);
/// `limit` is the text of the claim's LIMIT.
///
/// The jobs to claim are chosen by `docworker_claimable` (sql/0004): in
/// the claim index's order whatever the table's statistics, and never a
/// job whose exclusivity key (`coalesce(document_id, id)`) another job
/// holds, task types in `unkeyed` excepted. Those are fixed for a worker's
/// life and written into the text as constants, like the LIMIT.
///
/// The jobs whose outcomes are recorded ($1) are excluded from the claim,
/// so a job handed back here is never claimed again by the same statement
/// (and one scheduled for a retry is not due).
/// An outcome whose row another transaction has locked (the app's open
/// cancel, a `SELECT ... FOR UPDATE`) is skipped, not waited for, and
/// reported as deferred: one locked row delays only its own job.
///
/// The halves' rows come out side by side (`FULL JOIN ... ON false`): a row
/// is a deferred outcome when `deferred_id` is set, a written one when
/// `written_id` is, a claim otherwise.
pub fn statement(limit: &str, unkeyed: &[&str]) -> String {
    let unkeyed = format!(
        "ARRAY[{}]::text[]",
        unkeyed
            .iter()
            .map(|t| quote(t))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let retry_at = format!(
        "now() + make_interval(secs => least($7::float8, $6::float8 * 2 ^ least(t.attempt - 1, 62)) * (1 - {BACKOFF_JITTER} * random()))"
    );
    let claim_set = claim_set("$8", "$9");
    let returning = returning();
    let fenced = fence("p.id", "p.attempt", "$8");
    let fenced_o = fence("o.id", "o.attempt", "$8");
    format!(
        r#"
WITH o AS (
    SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::text[])
        AS o(id, attempt, outcome, kind, message)
), ours AS MATERIALIZED (
    SELECT t.id FROM job_tasks t JOIN o ON t.id = o.id WHERE {fenced_o}
), locked AS MATERIALIZED (
    SELECT t.id, t.attempt, t.max_attempts
      FROM job_tasks t JOIN o ON t.id = o.id WHERE {fenced_o}
       FOR NO KEY UPDATE OF t SKIP LOCKED
), p AS (
    SELECT o.*,
           (o.outcome = 'failed' AND o.kind = 'transient' AND t.attempt < t.max_attempts) AS will_retry,
           {retry_at} AS retry_at
      FROM o JOIN locked t ON t.id = o.id
), deferred AS (
    SELECT id AS deferred_id FROM ours WHERE id NOT IN (SELECT id FROM locked)
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
        -- A row that waits to run again shows nothing of the attempt that
        -- ended (as docworker_retry does); a final row keeps where it stopped.
        stage = CASE
            WHEN p.outcome = 'completed' THEN 'done'
            WHEN p.outcome = 'handback' OR p.will_retry THEN NULL
            ELSE t.stage END,
        total_chunks = CASE WHEN p.outcome = 'handback' OR p.will_retry THEN 0 ELSE t.total_chunks END,
        completed_chunks = CASE WHEN p.outcome = 'handback' OR p.will_retry THEN 0 ELSE t.completed_chunks END,
        result = CASE WHEN p.outcome = 'handback' OR p.will_retry THEN NULL ELSE t.result END,
        error_message = CASE
            WHEN p.outcome = 'completed' THEN NULL
            WHEN p.outcome = 'handback' THEN coalesce(p.message, t.error_message)
            WHEN p.will_retry THEN format('Attempt %s of %s failed: %s Retrying at %s.',
                t.attempt, t.max_attempts, p.message,
                to_char(p.retry_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'))
            WHEN p.kind = 'transient' THEN format('Gave up after %s attempts. Last error: %s',
                t.attempt, p.message)
            ELSE p.message END,
        errors = CASE WHEN p.message IS NULL OR p.outcome = 'handback' THEN t.errors
            ELSE t.errors || jsonb_build_array(jsonb_build_object(
                'attempt', t.attempt, 'at', now(), 'kind', p.kind,
                'message', p.message, 'worker', $8::text)) END,
        locked_by = NULL,
        locked_until = NULL,
        updated_at = now()
    FROM p
    WHERE {fenced}
    RETURNING t.id AS written_id, t.status::text AS written_status,
        CASE WHEN p.will_retry THEN extract(epoch FROM p.retry_at - now())::float8 END AS retry_in
), c AS MATERIALIZED (
    -- A deferred outcome keeps its slot: claim that many fewer.
    SELECT id FROM docworker_claimable(
        {limit} - (SELECT count(*)::int FROM deferred), {unkeyed}, $1::uuid[], $10::text[])
), claimed AS (
    UPDATE job_tasks t SET {claim_set}
      FROM c WHERE t.id = c.id
    RETURNING {returning}
)
SELECT * FROM claimed FULL JOIN done ON false FULL JOIN deferred ON false
"#
    )
}

/// A string as an SQL literal.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unkeyed_task_types_are_quoted_literals() {
        let sql = statement("1", &["noop", "it's"]);
        assert!(sql.contains("ARRAY['noop', 'it''s']::text[]"), "{sql}");
        assert!(statement("1", &[]).contains("ARRAY[]::text[]"));
    }
}
