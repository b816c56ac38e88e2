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

use crate::harness::{exclusive, pool, shared, ActingWorker, TestDb};
use crate::support::{claim_plans, plan_nodes, row_json};

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

/// The claim's nested plans: the candidate scan must walk
/// job_tasks_claim_idx in order and stop, never read or sort the backlog.
fn assert_claim_walks_the_index(plans: &[Value], backlog: i64, what: &str) {
    let mut nodes = Vec::new();
    for plan in plans {
        plan_nodes(&plan["Plan"], &mut nodes);
    }
    assert!(
        nodes
            .iter()
            .any(|n| n["Node Type"] == "Index Scan" && n["Index Name"] == "job_tasks_claim_idx"),
        "{what}: the claim does not walk job_tasks_claim_idx: {plans:#?}"
    );
    for n in &nodes {
        let rows = n["Actual Rows"].as_i64().unwrap_or(0);
        assert!(
            n["Node Type"] != "Sort" || rows <= 100,
            "{what}: the claim sorts {rows} rows: {plans:#?}"
        );
        assert!(
            n["Node Type"] != "Bitmap Heap Scan" && n["Node Type"] != "Seq Scan",
            "{what}: the claim reads job_tasks with a {}: {plans:#?}",
            n["Node Type"]
        );
        assert!(
            rows < backlog / 10,
            "{what}: a node of the claim handles {rows} of {backlog} rows: {plans:#?}"
        );
    }
}

/// The app's bulk upload lands before autovacuum has looked at the table
/// (or after it analyzed the table empty): the claim still takes the few
/// rows it needs from the index, whatever the statistics say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_plan_does_not_depend_on_table_statistics() {
    let _gate = exclusive().await;
    const BACKLOG: i64 = 20_000;
    for stats in ["never analyzed", "analyzed while empty", "analyzed"] {
        let db = shared().database(true).await;
        let c = &db.client;
        c.batch_execute("ALTER TABLE job_tasks SET (autovacuum_enabled = false)")
            .await
            .unwrap();
        if stats == "analyzed while empty" {
            c.batch_execute("ANALYZE job_tasks").await.unwrap();
        }
        // As docworker_enqueue_batch's callers and bulk loaders write them:
        // ingest jobs of distinct documents, with noop jobs among them.
        c.execute(
            "INSERT INTO job_tasks (filename, file_path, task_type)
             SELECT 'bulk-' || g, '/uploads/bulk-' || g,
                    CASE WHEN g % 10 = 0 THEN 'noop' ELSE 'ingest' END
               FROM generate_series(1, $1::int) g",
            &[&(BACKLOG as i32)],
        )
        .await
        .unwrap();
        if stats == "analyzed" {
            c.batch_execute("ANALYZE job_tasks").await.unwrap();
        }
        let plans = claim_plans(&db.url, 10).await;
        assert_claim_walks_the_index(&plans, BACKLOG, stats);
        assert_eq!(
            plans.last().unwrap()["Plan"]["Actual Rows"],
            10,
            "{stats}: {plans:#?}"
        );
    }
}

/// Several workers claim and finish many duplicate jobs of a few documents
/// as fast as they can: at no moment do two jobs of one document run. A
/// unique index on the running jobs' documents makes PostgreSQL itself
/// refuse the second claim if it ever happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_document_never_runs_twice_under_concurrent_claims() {
    let db = shared().database(true).await;
    db.client
        .batch_execute(
            "CREATE UNIQUE INDEX one_running_job_per_document
                 ON job_tasks ((coalesce(document_id, id))) WHERE status = 'processing';
             INSERT INTO job_tasks (filename, task_type, document_id)
             SELECT 'dup-' || g, 'delete', d.id
               FROM generate_series(1, 150) g,
                    (VALUES ('00000000-0000-0000-0000-00000000000a'::uuid),
                            ('00000000-0000-0000-0000-00000000000b'::uuid),
                            ('00000000-0000-0000-0000-00000000000c'::uuid)) d(id)",
        )
        .await
        .unwrap();
    let mut workers = Vec::new();
    for w in 0..4 {
        let url = db.url.clone();
        workers.push(tokio::spawn(async move {
            let id = format!("dup-worker-{w}");
            let worker = ActingWorker::new(&url, &id);
            let mut done = 0;
            let mut idle = 0;
            while idle < 50 {
                let claimed = worker.claim(3).await;
                if claimed.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                idle = 0;
                for job in claimed {
                    let written = worker
                        .record(Finished::new(job.key, job.batch_id, Outcome::Completed))
                        .await;
                    assert!(written.is_some());
                    done += 1;
                }
            }
            done
        }));
    }
    let mut total = 0;
    for w in workers {
        total += w
            .await
            .expect("a claim broke the one-job-per-document rule");
    }
    assert_eq!(total, 450);
    assert_eq!(
        db.count("SELECT count(*) FROM job_tasks WHERE status = 'completed' AND attempt = 1")
            .await,
        450
    );
}
