//! Ordinary production conditions the other tests do not set up: tables
//! whose statistics are missing or stale, rows and batches locked by
//! another transaction, and rows that wait between attempts.

use std::time::Duration;

use docworker::queue::completer::{Finished, Outcome};
use docworker::queue::job::JobError;
use docworker::queue::maintenance::Maintenance;
use docworker::queue::running::StopSignal;
use docworker::queue::JobContext;
use docworker::store::Stage;
use serde_json::{json, Value};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::harness::{pool, shared, ActingWorker, TestDb};
use crate::support::row_json;

/// Claims `id` as `worker` and has its body report a stage, counts and a
/// result, as an ingest does halfway through.
async fn claim_with_progress(db: &TestDb, worker: &ActingWorker, worker_id: &str) -> Finished {
    let job = worker.claim(1).await.pop().expect("a job to claim");
    let ctx = JobContext::new(
        pool(&db.url),
        worker_id.into(),
        job.key,
        StopSignal::default(),
        Default::default(),
        Duration::from_secs(30),
    );
    ctx.set_stage(Stage::Embedding).await.unwrap();
    ctx.set_progress(12, 76).await.unwrap();
    ctx.set_result(json!({"partial": true})).await.unwrap();
    Finished::new(job.key, job.batch_id, Outcome::Completed)
}

fn progress_of(row: &Value) -> (Value, Value, Value, Value) {
    (
        row["stage"].clone(),
        row["completed_chunks"].clone(),
        row["total_chunks"].clone(),
        row["result"].clone(),
    )
}

/// A row waiting for its next attempt (a retry's backoff, a hand-back at
/// shutdown, a rescue after a lost lease) shows nothing of the attempt that
/// ended, as `docworker_retry` already does; a row that failed for good
/// keeps where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_waiting_for_its_next_attempt_shows_no_progress_of_the_last() {
    let db = shared().database(true).await;
    let worker = ActingWorker::new(&db.url, "conditions-worker");
    let fresh = (Value::Null, json!(0), json!(0), Value::Null);

    // A transient failure with attempts left: pending, waiting for the retry.
    let id: Uuid = db.noop_job(json!({})).await;
    let mut f = claim_with_progress(&db, &worker, "conditions-worker").await;
    f.outcome = Outcome::Failed(JobError::transient("the embedder is down"));
    worker.record(f).await.unwrap();
    let row = row_json(&db.client, id).await;
    assert_eq!(row["status"], "pending", "{row:#}");
    assert_eq!(progress_of(&row), fresh, "{row:#}");

    // Handed back at shutdown.
    db.client
        .execute("UPDATE job_tasks SET run_at = now() WHERE id = $1", &[&id])
        .await
        .unwrap();
    let mut f = claim_with_progress(&db, &worker, "conditions-worker").await;
    f.outcome = Outcome::HandBack;
    worker.record(f).await.unwrap();
    let row = row_json(&db.client, id).await;
    assert_eq!(row["status"], "pending", "{row:#}");
    assert_eq!(progress_of(&row), fresh, "{row:#}");

    // Rescued after the worker stopped renewing its lease.
    claim_with_progress(&db, &worker, "conditions-worker").await;
    db.client
        .execute(
            "UPDATE job_tasks SET locked_until = now() - interval '1 second' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let maintenance = Maintenance {
        pool: pool(&db.url),
        interval: Duration::from_secs(3600),
        retention: Duration::ZERO,
        prune_batch_size: 100,
        wake: std::sync::Arc::new(Notify::new()),
    };
    assert_eq!(maintenance.rescue_expired().await.unwrap(), 1);
    let row = row_json(&db.client, id).await;
    assert_eq!(row["status"], "pending", "{row:#}");
    assert_eq!(progress_of(&row), fresh, "{row:#}");

    // A permanent failure is final: the row keeps the stage it failed in.
    let mut f = claim_with_progress(&db, &worker, "conditions-worker").await;
    f.outcome = Outcome::Failed(JobError::permanent("the file is damaged"));
    worker.record(f).await.unwrap();
    let row = row_json(&db.client, id).await;
    assert_eq!(row["status"], "error", "{row:#}");
    assert_eq!(row["stage"], "embedding", "{row:#}");
    assert_eq!(row["completed_chunks"], 12, "{row:#}");
}
