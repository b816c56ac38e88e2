//! The schema: `worker migrate`, adopting the app's legacy tables, batch
//! rollup under every finishing order and under concurrency, the enqueue
//! function, and the claim query's plan on a big table.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use docworker::queue::completer::{Finished, Outcome};
use docworker::queue::job::JobError;
use docworker::store::{ClaimedJob, JobStatus, Written};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::harness::{connect, exclusive, run_worker, shared, ActingWorker, TestDb, WorkerProcess};
use crate::support::{claim_plans, plan_nodes, worker};

/// One value from a query that must return one row.
async fn one<T>(client: &Client, sql: &str) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

async fn exists(client: &Client, regclass: &str) -> bool {
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&regclass])
        .await
        .unwrap()
        .get(0)
}

/// Everything migration 1 creates.
async fn assert_schema_complete(client: &Client) {
    for relation in [
        "job_batches",
        "job_tasks",
        "docworker_migrations",
        "job_tasks_claim_idx",
        "job_tasks_lease_idx",
        "job_tasks_batch_idx",
        "job_tasks_finished_idx",
    ] {
        assert!(exists(client, relation).await, "{relation} is missing");
    }
    for function in [
        "docworker_enqueue_batch",
        "docworker_retry",
        "docworker_cancel",
        "docworker_refresh_batch",
        "docworker_claimable",
        "docworker_rollup_batch",
        "docworker_notify_insert",
        "docworker_notify_cancel",
    ] {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_proc WHERE proname = $1",
                &[&function],
            )
            .await
            .unwrap()
            .get(0);
        // The claim has a form for this version and one for the last
        // (a rolling upgrade), sql/0006.
        let forms = if function == "docworker_claimable" {
            2
        } else {
            1
        };
        assert_eq!(n, forms, "function {function}");
    }
    for trigger in [
        "docworker_notify_insert",
        "docworker_notify_cancel",
        "docworker_rollup_batch",
    ] {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_trigger WHERE tgname = $1 AND tgrelid = 'job_tasks'::regclass",
                &[&trigger],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "trigger {trigger}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_everything_then_says_up_to_date() {
    let db = shared().database(false).await;
    assert!(!exists(&db.client, "job_tasks").await);

    let (code, out, err) = worker(&db.url, &["migrate"], &[]).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("applied migrations [1, 2, 3, 4, 5, 6, 7, 8]"),
        "{out}"
    );
    assert_schema_complete(&db.client).await;

    let (code, out, err) = worker(&db.url, &["migrate"], &[]).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("schema is up to date (version 8)"), "{out}");

    let rows = db
        .client
        .query(
            "SELECT version, name FROM docworker_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let applied: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        applied,
        [
            (1, "queue".to_string()),
            (2, "pipeline".to_string()),
            (3, "retry_resets_progress".to_string()),
            (4, "claim".to_string()),
            (5, "rollup_never_waits".to_string()),
            (6, "claim_skips_paused".to_string()),
            (7, "filename_text".to_string()),
            (8, "job_list_index".to_string())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_the_schema_once() {
    let db = shared().database(false).await;
    let start = Arc::new(Barrier::new(4));
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            let start = start.clone();
            tokio::task::spawn_blocking(move || {
                start.wait();
                run_worker(&url, &["migrate"], &[])
            })
        })
        .collect();
    let mut applied = 0;
    let mut up_to_date = 0;
    for run in runs {
        let (code, out, err) = run.await.unwrap();
        assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
        if out.contains("applied migrations [1, 2, 3, 4, 5, 6, 7, 8]") {
            applied += 1;
        } else if out.contains("schema is up to date") {
            up_to_date += 1;
        } else {
            panic!("unexpected output: {out}\nstderr: {err}");
        }
    }
    assert_eq!((applied, up_to_date), (1, 3));
    assert_eq!(
        db.count("SELECT count(*) FROM docworker_migrations").await,
        8
    );
    assert_schema_complete(&db.client).await;
    // Applied once: one claim index, one rollup trigger.
    assert_eq!(
        db.count("SELECT count(*) FROM pg_indexes WHERE tablename = 'job_tasks'")
            .await,
        7,
        "pkey + claim + lease + batch + finished + running document + listing"
    );
}

/// The app's tables exactly as it creates them today (the-app.md).
const LEGACY_DDL: &str = "
CREATE TABLE job_batches (id uuid primary key, total_tasks int not null, completed_tasks int default 0,
    status varchar(30) default 'pending', created_at timestamptz default now());
CREATE TABLE job_tasks (id uuid primary key,
    batch_id uuid not null references job_batches(id) on delete cascade,
    filename varchar(255) not null, status varchar(30) default 'pending',
    total_chunks int default 0, completed_chunks int default 0, error_message text,
    file_path text not null, attempt int default 0,
    created_at timestamptz default now(), started_at timestamptz);
create index idx_tasks_claimable on job_tasks(created_at) where status = 'pending';
CREATE TABLE documents (id uuid primary key, file_name text, file_type text, file_path text,
    file_size_bytes bigint, file_hash varchar(64) unique, uploaded_at timestamptz, metadata jsonb);
";

/// The legacy columns of every row, as one JSON text, to compare before and after.
async fn legacy_snapshot(client: &Client) -> (String, String, String) {
    let tasks = one(
        client,
        "SELECT json_agg(x ORDER BY x.id)::text FROM (
             SELECT id, batch_id, filename, status, total_chunks, completed_chunks,
                    error_message, file_path, attempt, created_at, started_at
               FROM job_tasks) x",
    )
    .await;
    let batches = one(
        client,
        "SELECT json_agg(x ORDER BY x.id)::text FROM (
             SELECT id, total_tasks, completed_tasks, status, created_at FROM job_batches) x",
    )
    .await;
    let documents = one(
        client,
        "SELECT json_agg(d ORDER BY d.id)::text FROM documents d",
    )
    .await;
    (tasks, batches, documents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_adopts_the_legacy_tables_and_keeps_every_row() {
    let db = shared().database(false).await;
    let c = &db.client;
    c.batch_execute(LEGACY_DDL).await.unwrap();

    let batch_a = Uuid::new_v4(); // still running: a pending and a processing task
    let batch_b = Uuid::new_v4(); // finished: one completed, one error
    let pending = Uuid::new_v4();
    let processing = Uuid::new_v4();
    let completed = Uuid::new_v4();
    let error = Uuid::new_v4();
    let doc = Uuid::new_v4();
    c.execute(
        "INSERT INTO job_batches (id, total_tasks, completed_tasks, status, created_at) VALUES
             ($1, 2, 0, 'pending', now() - interval '2 hours'),
             ($2, 2, 1, 'completed_with_errors', now() - interval '3 hours')",
        &[&batch_a, &batch_b],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO job_tasks (id, batch_id, filename, status, total_chunks, completed_chunks,
                                error_message, file_path, attempt, created_at, started_at) VALUES
             ($1, $5, 'a.txt', 'pending',    0, 0, NULL, '/uploads/a.txt', 0,
              now() - interval '2 hours', NULL),
             ($2, $5, 'b.pdf', 'processing', 10, 4, NULL, '/uploads/b.pdf', 1,
              now() - interval '2 hours', now() - interval '1 hour'),
             ($3, $6, 'c.md',  'completed',  5, 5, NULL, '/uploads/c.md', 1,
              now() - interval '3 hours', now() - interval '3 hours'),
             ($4, $6, 'd.docx', 'error',     7, 2, 'Ollama is not reachable', '/uploads/d.docx', 3,
              now() - interval '3 hours', now() - interval '170 minutes')",
        &[
            &pending,
            &processing,
            &completed,
            &error,
            &batch_a,
            &batch_b,
        ],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO documents VALUES ($1, 'c.md', 'md', '/uploads/c.md', 1234,
                 repeat('ab', 32), now() - interval '3 hours', '{\"k\": \"v\"}')",
        &[&doc],
    )
    .await
    .unwrap();
    let before = legacy_snapshot(c).await;

    let (code, out, err) = worker(&db.url, &["migrate"], &[]).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("applied migrations [1, 2, 3, 4, 5, 6, 7, 8]"),
        "{out}"
    );
    assert_schema_complete(c).await;

    // Every row kept with its values, the app's other table untouched.
    assert_eq!(legacy_snapshot(c).await, before);
    assert_eq!(db.count("SELECT count(*) FROM job_tasks").await, 4);
    assert_eq!(db.count("SELECT count(*) FROM job_batches").await, 2);
    assert_eq!(db.count("SELECT count(*) FROM documents").await, 1);

    // The new columns exist with their defaults; attempts are preserved.
    let rows = c
        .query(
            "SELECT id, task_type, options, errors, priority, max_attempts, attempt,
                    locked_until IS NOT NULL AND locked_until <= now(), finished_at IS NOT NULL,
                    run_at IS NOT NULL, document_id IS NULL
               FROM job_tasks",
            &[],
        )
        .await
        .unwrap();
    for r in &rows {
        let id: Uuid = r.get(0);
        assert_eq!(r.get::<_, String>(1), "ingest", "{id}");
        assert_eq!(r.get::<_, Value>(2), json!({}), "{id}");
        assert_eq!(r.get::<_, Value>(3), json!([]), "{id}");
        assert_eq!(r.get::<_, i16>(4), 0, "{id}");
        assert_eq!(r.get::<_, i32>(5), 5, "{id}");
        let attempt: i32 = r.get(6);
        let want_attempt = match id {
            i if i == pending => 0,
            i if i == error => 3,
            _ => 1,
        };
        assert_eq!(attempt, want_attempt, "attempt of {id}");
        // The legacy `processing` row gets an already expired lease.
        assert_eq!(r.get::<_, bool>(7), id == processing, "lease of {id}");
        assert_eq!(
            r.get::<_, bool>(8),
            id == completed || id == error,
            "finished_at of {id}"
        );
        assert!(r.get::<_, bool>(9));
        assert!(r.get::<_, bool>(10));
    }

    // Existing batches are rolled up by the migration: the finished one
    // counts its failure and gets a finish time (so pruning can age it),
    // the running one stays pending.
    let row = c
        .query_one(
            "SELECT status::text, completed_tasks, failed_tasks, finished_at IS NOT NULL
               FROM job_batches WHERE id = $1",
            &[&batch_b],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, i32>(2),
            row.get::<_, bool>(3)
        ),
        ("completed_with_errors".into(), 1, 1, true)
    );
    let row = c
        .query_one(
            "SELECT status::text, failed_tasks, finished_at IS NULL FROM job_batches WHERE id = $1",
            &[&batch_a],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, bool>(2)
        ),
        ("pending".into(), 0, true)
    );

    // The legacy index is replaced by the claim index.
    assert!(!exists(c, "idx_tasks_claimable").await);
    assert!(exists(c, "job_tasks_claim_idx").await);
    let def: String = one(c, "SELECT pg_get_indexdef('job_tasks_claim_idx'::regclass)").await;
    assert!(
        def.contains("(priority, run_at, id)") && def.contains("'pending'"),
        "{def}"
    );

    // A plain INSERT with only the app's two fields works.
    let row = c
        .query_one(
            "INSERT INTO job_tasks (filename, file_path) VALUES ('new.txt', '/uploads/new.txt')
             RETURNING id, batch_id, status::text, task_type, attempt",
            &[],
        )
        .await
        .unwrap();
    let plain: Uuid = row.get(0);
    assert_eq!(row.get::<_, Option<Uuid>>(1), None);
    assert_eq!(row.get::<_, String>(2), "pending");
    assert_eq!(row.get::<_, String>(3), "ingest");
    assert_eq!(row.get::<_, i32>(4), 0);

    // A running worker's sweep gives the legacy `processing` row back; it
    // then runs, and fails because its file was never uploaded here.
    let uploads = tempfile::tempdir().unwrap();
    let root = uploads.path().display().to_string();
    let w = WorkerProcess::spawn(&db.url, &[("DOCWORKER__FILES__UPLOAD_ROOT", &root)]);
    for id in [processing, pending, plain] {
        db.wait_status(id, "error", Duration::from_secs(20)).await;
        let message: String = c
            .query_one("SELECT error_message FROM job_tasks WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        // Its absolute path lies outside this test's upload root: refused as
        // outside, whether or not such a file exists (no oracle).
        assert!(
            message.contains("does not exist") || message.contains("outside the upload directory"),
            "{id}: {message}"
        );
    }
    let row = c
        .query_one(
            "SELECT attempt, errors FROM job_tasks WHERE id = $1",
            &[&processing],
        )
        .await
        .unwrap();
    // Attempt 1 was interrupted (counted), attempt 2 ran here.
    assert_eq!(row.get::<_, i32>(0), 2);
    let errors: Value = row.get(1);
    assert_eq!(errors[0]["kind"], "lease_expired", "{errors}");
    assert_eq!(errors[0]["attempt"], 1, "{errors}");
    assert!(
        w.logs().contains("reclaimed a job whose lease expired"),
        "{}",
        w.logs()
    );

    // The finished legacy rows were left alone, and batch A rolled up.
    assert_eq!(db.status(completed).await, "completed");
    assert_eq!(db.status(error).await, "error");
    let row = c
        .query_one(
            "SELECT status::text, completed_tasks, failed_tasks FROM job_batches WHERE id = $1",
            &[&batch_a],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "completed_with_errors");
    assert_eq!(row.get::<_, Option<i32>>(1), Some(0));
    assert_eq!(row.get::<_, i32>(2), 2);
}

// Batch rollup ------------------------------------------------------------------

const FAKE_WORKER: &str = "fake-worker-rollup";

/// Enqueues a batch of `n` noop tasks; returns (batch, task ids in order).
async fn enqueue_noops(client: &Client, n: usize) -> (Uuid, Vec<Uuid>) {
    let tasks: Vec<Value> = (0..n)
        .map(|i| json!({"filename": format!("f{i}.txt"), "task_type": "noop"}))
        .collect();
    let rows = client
        .query(
            "SELECT batch_id, task_id FROM docworker_enqueue_batch($1)",
            &[&Value::Array(tasks)],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), n);
    (rows[0].get(0), rows.iter().map(|r| r.get(1)).collect())
}

/// Claims up to `limit` due jobs for [`FAKE_WORKER`] with the daemon's statement.
async fn claim_all(url: &str, limit: i64) -> Vec<ClaimedJob> {
    ActingWorker::new(url, FAKE_WORKER).claim(limit).await
}

async fn batch_state(client: &Client, batch: Uuid) -> (String, i32, i32, bool) {
    let row = client
        .query_one(
            "SELECT status::text, completed_tasks, failed_tasks, finished_at IS NOT NULL
               FROM job_batches WHERE id = $1",
            &[&batch],
        )
        .await
        .unwrap();
    (
        row.get(0),
        row.get::<_, Option<i32>>(1).unwrap(),
        row.get(2),
        row.get(3),
    )
}

fn permutations3() -> Vec<[usize; 3]> {
    vec![
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_rollup_is_right_in_every_finishing_order() {
    let db = shared().database(true).await;
    let completer = ActingWorker::new(&db.url, FAKE_WORKER);
    let c = &db.client;

    // Task i finishes as planned[i]; true = completed, false = permanent error.
    let cases: Vec<([bool; 3], &str, i32, i32)> = vec![
        ([true, false, true], "completed_with_errors", 2, 1),
        ([true, true, true], "completed", 3, 0),
    ];
    for (planned, final_status, done, failed) in cases {
        for order in permutations3() {
            let (batch, ids) = enqueue_noops(c, 3).await;
            let claimed = claim_all(&db.url, 10).await;
            assert_eq!(claimed.len(), 3);
            assert_eq!(batch_state(c, batch).await, ("pending".into(), 0, 0, false));
            for (step, &i) in order.iter().enumerate() {
                let job = claimed.iter().find(|j| j.key.id == ids[i]).unwrap();
                assert_eq!(job.batch_id, Some(batch));
                let outcome = if planned[i] {
                    Outcome::Completed
                } else {
                    Outcome::Failed(JobError::permanent("planned failure"))
                };
                let written = completer.record(Finished::new(job.key, outcome)).await;
                let want = if planned[i] { "completed" } else { "error" };
                assert_eq!(
                    written,
                    Some(Written::Applied {
                        status: want.parse().unwrap(),
                        retry_in: None
                    })
                );
                let (status, n_done, n_failed, finished) = batch_state(c, batch).await;
                let (want_done, want_failed) = order[..=step].iter().fold((0, 0), |(d, f), &k| {
                    if planned[k] {
                        (d + 1, f)
                    } else {
                        (d, f + 1)
                    }
                });
                assert_eq!(
                    (n_done, n_failed),
                    (want_done, want_failed),
                    "order {order:?} step {step}"
                );
                if step < 2 {
                    assert_eq!(status, "pending", "order {order:?} step {step}");
                    assert!(!finished, "order {order:?} step {step}");
                } else {
                    assert_eq!(status, final_status, "order {order:?}");
                    assert!(finished, "order {order:?}");
                    assert_eq!((n_done, n_failed), (done, failed), "order {order:?}");
                }
            }
        }
    }

    // Retrying a finished task reopens its (finished) batch.
    let (batch, ids) = enqueue_noops(c, 2).await;
    for job in claim_all(&db.url, 10).await {
        let written = completer
            .record(Finished::new(job.key, Outcome::Completed))
            .await;
        assert!(matches!(written, Some(Written::Applied { .. })));
    }
    assert_eq!(
        batch_state(c, batch).await,
        ("completed".into(), 2, 0, true)
    );
    // As an ingest would have left it.
    c.execute(
        "UPDATE job_tasks SET total_chunks = 4, completed_chunks = 4, result = '{\"chunks\": 4}'
          WHERE id = $1",
        &[&ids[1]],
    )
    .await
    .unwrap();
    let ok: bool = c
        .query_one("SELECT docworker_retry($1)", &[&ids[1]])
        .await
        .unwrap()
        .get(0);
    assert!(ok);
    assert_eq!(batch_state(c, batch).await, ("pending".into(), 1, 0, false));
    // The retried row shows no progress of the run before.
    let row = c
        .query_one(
            "SELECT status::text, stage, total_chunks, completed_chunks, result IS NULL
               FROM job_tasks WHERE id = $1",
            &[&ids[1]],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, Option<String>>(1),
            row.get::<_, i32>(2),
            row.get::<_, i32>(3),
            row.get::<_, bool>(4)
        ),
        ("pending".into(), None, 0, 0, true)
    );
    // ... and finishing it again closes the batch again.
    let claimed = claim_all(&db.url, 10).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].key.id, ids[1]);
    completer
        .record(Finished::new(claimed[0].key, Outcome::Completed))
        .await
        .unwrap();
    assert_eq!(
        batch_state(c, batch).await,
        ("completed".into(), 2, 0, true)
    );
}

/// Writes `outcome` for `job` with the daemon's completer; returns the new status.
async fn finish(completer: &ActingWorker, job: &ClaimedJob, outcome: Outcome) -> Written {
    completer
        .record(Finished::new(job.key, outcome))
        .await
        .expect("one outcome written")
}

fn applied(status: &str) -> Written {
    Written::Applied {
        status: status.parse().unwrap(),
        retry_in: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_task_counts_as_failed_in_its_batch() {
    let db = shared().database(true).await;
    let completer = ActingWorker::new(&db.url, FAKE_WORKER);
    let c = &db.client;
    let (batch, ids) = enqueue_noops(c, 3).await;

    // Cancelled while pending, as the app or an operator would.
    let ok: bool = c
        .query_one("SELECT docworker_cancel($1)", &[&ids[0]])
        .await
        .unwrap()
        .get(0);
    assert!(ok);
    assert_eq!(db.status(ids[0]).await, "cancelled");
    assert_eq!(batch_state(c, batch).await, ("pending".into(), 0, 1, false));

    // The cancelled task is not claimed; the other two complete.
    let claimed = claim_all(&db.url, 10).await;
    let mut claimed_ids: Vec<Uuid> = claimed.iter().map(|j| j.key.id).collect();
    claimed_ids.sort();
    let mut rest = ids[1..].to_vec();
    rest.sort();
    assert_eq!(claimed_ids, rest);
    assert_eq!(
        finish(&completer, &claimed[0], Outcome::Completed).await,
        applied("completed")
    );
    assert_eq!(batch_state(c, batch).await, ("pending".into(), 1, 1, false));
    assert_eq!(
        finish(&completer, &claimed[1], Outcome::Completed).await,
        applied("completed")
    );
    assert_eq!(
        batch_state(c, batch).await,
        ("completed_with_errors".into(), 2, 1, true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waiting_for_its_retry_keeps_its_batch_pending() {
    let db = shared().database(true).await;
    let completer = ActingWorker::new(&db.url, FAKE_WORKER);
    let c = &db.client;
    let (batch, ids) = enqueue_noops(c, 2).await;
    let claimed = claim_all(&db.url, 10).await;
    assert_eq!(claimed.len(), 2);
    let first = claimed.iter().find(|j| j.key.id == ids[0]).unwrap();
    let second = claimed.iter().find(|j| j.key.id == ids[1]).unwrap();

    assert_eq!(
        finish(&completer, first, Outcome::Completed).await,
        applied("completed")
    );
    // A transient failure with attempts left: back to pending, due later.
    let written = finish(
        &completer,
        second,
        Outcome::Failed(JobError::transient("dependency down")),
    )
    .await;
    assert!(
        matches!(&written, Written::Applied { status, retry_in: Some(_) } if *status == JobStatus::Pending),
        "{written:?}"
    );
    let row = c
        .query_one(
            "SELECT status::text, run_at > now(), finished_at IS NULL FROM job_tasks WHERE id = $1",
            &[&ids[1]],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0).as_str(),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2)
        ),
        ("pending", true, true)
    );
    // The batch has not finished: one task is still to run.
    assert_eq!(batch_state(c, batch).await, ("pending".into(), 1, 0, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_for_every_announced_task() {
    let db = shared().database(true).await;
    let completer = ActingWorker::new(&db.url, FAKE_WORKER);
    let c = &db.client;
    // The app announced three tasks but has inserted only two so far.
    let batch: Uuid = c
        .query_one(
            "INSERT INTO job_batches (total_tasks) VALUES (3) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    c.execute(
        "INSERT INTO job_tasks (batch_id, filename, task_type)
         VALUES ($1, 'one', 'noop'), ($1, 'two', 'noop')",
        &[&batch],
    )
    .await
    .unwrap();
    let claimed = claim_all(&db.url, 10).await;
    assert_eq!(claimed.len(), 2);
    for job in &claimed {
        assert_eq!(job.batch_id, Some(batch));
        assert_eq!(
            finish(&completer, job, Outcome::Completed).await,
            applied("completed")
        );
    }
    assert_eq!(batch_state(c, batch).await, ("pending".into(), 2, 0, false));

    // The third task arrives and completes: now the batch is done.
    c.execute(
        "INSERT INTO job_tasks (batch_id, filename, task_type) VALUES ($1, 'three', 'noop')",
        &[&batch],
    )
    .await
    .unwrap();
    let claimed = claim_all(&db.url, 10).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        finish(&completer, &claimed[0], Outcome::Completed).await,
        applied("completed")
    );
    assert_eq!(
        batch_state(c, batch).await,
        ("completed".into(), 3, 0, true)
    );
}

/// Waits until backend `pid` waits on a lock.
/// Two tasks of one batch finish in two concurrent transactions. The second
/// does not wait for the batch the first holds (sql/0005): its rollup is
/// noted instead, and the workers' refresh makes the batch exact.
async fn finish_concurrently(db: &TestDb, first: &str, second: &str) -> (String, i32, i32, bool) {
    let (batch, ids) = enqueue_noops(&db.client, 2).await;
    assert_eq!(claim_all(&db.url, 10).await.len(), 2);

    let c1 = connect(&db.url).await;
    let c2 = connect(&db.url).await;

    c1.batch_execute("BEGIN").await.unwrap();
    c1.execute(
        "UPDATE job_tasks SET status = $2 WHERE id = $1",
        &[&ids[0], &first],
    )
    .await
    .unwrap();
    // Inside transaction 1 the batch is not finished yet: task 2 is running.
    assert_eq!(batch_state(&c1, batch).await.0, "pending");

    c2.batch_execute("BEGIN").await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        c2.execute(
            "UPDATE job_tasks SET status = $2 WHERE id = $1",
            &[&ids[1], &second],
        ),
    )
    .await
    .expect("transaction 2 waited for the batch transaction 1 holds")
    .unwrap();
    c2.batch_execute("COMMIT").await.unwrap();
    c1.batch_execute("COMMIT").await.unwrap();
    // What the maintenance loop does about once a second.
    let refreshed: i32 = one(&db.client, "SELECT docworker_refresh_dirty_batches(100)").await;
    assert_eq!(refreshed, 1);
    batch_state(&db.client, batch).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_finishes_never_leave_a_batch_pending() {
    let db = shared().database(true).await;
    for (first, second, want) in [
        ("completed", "completed", ("completed", 2, 0)),
        ("error", "completed", ("completed_with_errors", 1, 1)),
        ("completed", "error", ("completed_with_errors", 1, 1)),
        ("error", "error", ("completed_with_errors", 0, 2)),
    ] {
        let got = finish_concurrently(&db, first, second).await;
        assert_eq!(
            got,
            (want.0.to_owned(), want.1, want.2, true),
            "{first} then {second}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_batch_creates_one_batch_and_its_tasks() {
    let db = shared().database(true).await;
    let c = &db.client;
    let rows = c
        .query(
            "SELECT batch_id, task_id, filename FROM docworker_enqueue_batch($1)",
            &[&json!([
                {"filename": "a.pdf", "file_path": "/uploads/a.pdf"},
                {"filename": "b.txt", "file_path": "/uploads/b.txt"},
                {"filename": "c.md", "file_path": "/uploads/c.md", "task_type": "noop", "priority": 3},
            ])],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    let batch: Uuid = rows[0].get(0);
    assert!(rows.iter().all(|r| r.get::<_, Uuid>(0) == batch));
    let names: Vec<String> = rows.iter().map(|r| r.get(2)).collect();
    assert_eq!(names, ["a.pdf", "b.txt", "c.md"]);
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(1)).collect();

    let row = c
        .query_one(
            "SELECT total_tasks, status::text FROM job_batches WHERE id = $1",
            &[&batch],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 3);
    assert_eq!(row.get::<_, String>(1), "pending");
    assert_eq!(db.count("SELECT count(*) FROM job_batches").await, 1);

    let tasks = c
        .query(
            "SELECT id, batch_id, filename::text, file_path, task_type, status::text, priority
               FROM job_tasks ORDER BY filename",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(tasks.len(), 3);
    for (t, (name, id)) in tasks.iter().zip(names.iter().zip(&ids)) {
        assert_eq!(t.get::<_, Uuid>(0), *id);
        assert_eq!(t.get::<_, Option<Uuid>>(1), Some(batch));
        assert_eq!(&t.get::<_, String>(2), name);
        assert_eq!(
            t.get::<_, Option<String>>(3),
            Some(format!("/uploads/{name}"))
        );
        assert_eq!(t.get::<_, String>(5), "pending");
    }
    assert_eq!(tasks[0].get::<_, String>(4), "ingest");
    assert_eq!(tasks[2].get::<_, String>(4), "noop");
    assert_eq!(tasks[2].get::<_, i16>(6), 3);

    for bad in [json!([]), json!({"filename": "a"}), json!("a.pdf")] {
        let err = c
            .query("SELECT * FROM docworker_enqueue_batch($1)", &[&bad])
            .await
            .expect_err("an empty or non-array task list must be refused");
        let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
        assert!(
            message.contains("expects a non-empty JSON array of tasks"),
            "{bad}: {err:?}"
        );
    }
    assert_eq!(db.count("SELECT count(*) FROM job_batches").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM job_tasks").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_reads_only_the_partial_index_among_a_million_finished_rows() {
    let _gate = exclusive().await;
    let db = shared().database(true).await;
    let c = &db.client;
    let started = Instant::now();
    c.batch_execute(
        // Ascending ids (instead of the random default) append to the primary
        // key instead of touching a random page per row: a third faster.
        "INSERT INTO job_tasks (id, filename, task_type, status, attempt, started_at, finished_at, stage)
         SELECT lpad(to_hex(g), 32, '0')::uuid, 'done-' || g, 'noop', 'completed', 1, now(), now(), 'done'
           FROM generate_series(1, 1000000) g",
    )
    .await
    .unwrap();
    let inserted = started.elapsed();
    let pending = db.noop_jobs(5, json!({})).await;
    c.batch_execute("ANALYZE job_tasks").await.unwrap();
    println!(
        "inserted 1,000,000 finished rows in {:.1}s (analyze included: {:.1}s)",
        inserted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // The daemon's write cycle with nothing to record and one job to claim,
    // with the plans of the statements nested in docworker_claimable.
    let plans = claim_plans(&db.url, 1).await;
    let mut nodes = Vec::new();
    for plan in &plans {
        plan_nodes(&plan["Plan"], &mut nodes);
    }
    let uses_claim_index = nodes
        .iter()
        .any(|n| n["Index Name"] == "job_tasks_claim_idx");
    let seq_scans: Vec<_> = nodes
        .iter()
        .filter(|n| n["Node Type"] == "Seq Scan" && n["Relation Name"] == "job_tasks")
        .collect();
    assert!(
        uses_claim_index,
        "the claim does not use job_tasks_claim_idx: {plans:#?}"
    );
    assert!(
        seq_scans.is_empty(),
        "the claim scans job_tasks sequentially: {plans:#?}"
    );
    let plan = plans.last().unwrap();
    // It really claimed one of the pending jobs (then rolled back).
    assert_eq!(plan["Plan"]["Actual Rows"], 1, "{plan:#}");
    assert_eq!(
        db.count("SELECT count(*) FROM job_tasks WHERE status = 'pending'")
            .await,
        pending.len() as i64
    );
}

/// A 300-character UTF-8 file name, as some uploads carry.
fn long_name() -> String {
    format!("{}.pdf", "Überblick über die Jahresberichte ".repeat(9))
}

/// The app's INSERT and `docworker_enqueue_batch` both store `name` whole.
async fn assert_stores_long_names(c: &Client, name: &str) {
    let id: Uuid = c
        .query_one(
            "INSERT INTO job_tasks (filename, file_path) VALUES ($1, '/uploads/x.pdf') RETURNING id",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    let stored: String = c
        .query_one("SELECT filename FROM job_tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, name);
    let files = json!([{ "filename": name, "file_path": "/uploads/y.pdf" }]);
    let row = c
        .query_one(
            "SELECT filename FROM docworker_enqueue_batch($1::text::jsonb)",
            &[&files.to_string()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), name);
}

/// `filename varchar(255)` made the app's own INSERT fail for a longer
/// name, aborting its upload transaction. A fresh install and an adopted
/// legacy table both take any length now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_utf8_file_names_fit_on_fresh_and_adopted_tables() {
    let name = long_name();
    assert_eq!(name.chars().count(), 310);

    let fresh = shared().database(true).await;
    assert_stores_long_names(&fresh.client, &name).await;

    let legacy = shared().database(false).await;
    legacy.client.batch_execute(LEGACY_DDL).await.unwrap();
    let (code, out, err) = worker(&legacy.url, &["migrate"], &[]).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert_stores_long_names(&legacy.client, &name).await;
}

/// A view of the app's own on the column forbids widening it: the upgrade
/// still goes through, and says what to do by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_on_filename_keeps_it_narrow_and_the_migration_says_why() {
    let legacy = shared().database(false).await;
    legacy.client.batch_execute(LEGACY_DDL).await.unwrap();
    legacy
        .client
        .batch_execute("CREATE VIEW upload_names AS SELECT id, filename FROM job_tasks")
        .await
        .unwrap();
    let (code, out, err) = worker(&legacy.url, &["migrate"], &[]).await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("job_tasks.filename stays character varying(255)")
            && err.contains("ALTER TABLE job_tasks ALTER COLUMN filename TYPE text"),
        "stdout: {out}\nstderr: {err}"
    );
}

/// The README's runtime role: rows of job_tasks and job_batches, SELECT on
/// docworker_migrations, nothing else. Returns its URL for `db`.
async fn runtime_role(db: &TestDb) -> String {
    let role = format!("dw_rt_{}", &Uuid::new_v4().simple().to_string()[..12]);
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
             GRANT USAGE ON SCHEMA public TO {role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON job_tasks, job_batches TO {role};
             GRANT SELECT ON docworker_migrations TO {role};"
        ))
        .await
        .unwrap();
    let (_, rest) = db.url.split_once('@').unwrap();
    format!("postgres://{role}@{rest}")
}

/// A role without DDL rights runs the worker as shipped: `migrate` (with
/// nothing to apply, as Compose and the unit run it before every start), a
/// full ingest and a delete. While a migration is pending it says which
/// grant is missing instead of PostgreSQL's bare "permission denied".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_with_row_rights_only_migrates_ingests_and_deletes() {
    let mut stack = crate::stack::Stack::new().await;
    let url = runtime_role(&stack.db).await;

    let (code, out, err) = run_worker(&url, &["migrate"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("schema is up to date"), "{out}\n{err}");

    stack.set("DATABASE_URL", &url);
    let worker = stack.worker();
    let file = stack.write(
        "tides.txt",
        "Tides are caused by the gravitational pull of the moon and the sun. ".repeat(40),
    );
    let document = Uuid::new_v4();
    let ingest = stack
        .ingest(
            "tides.txt",
            &file.display().to_string(),
            Some(document),
            json!({}),
        )
        .await;
    let row = stack
        .wait_finished(ingest, crate::stack::JOB_DEADLINE)
        .await;
    assert_eq!(row.status, "completed", "{row:?}\n{}", worker.logs());
    assert!(stack.assert_whole(document).await > 0);
    let delete = stack.delete(document).await;
    let row = stack
        .wait_finished(delete, crate::stack::JOB_DEADLINE)
        .await;
    assert_eq!(row.status, "completed", "{row:?}\n{}", worker.logs());
    assert!(stack.chunks_of(document).await.is_empty());
    assert!(
        !worker.logs().contains("permission denied"),
        "{}",
        worker.logs()
    );

    // A database that still needs migrating: the runtime role cannot, and
    // is told what to grant.
    let fresh = shared().database(false).await;
    let (_, rest) = url.split_once('@').unwrap();
    let role = url
        .trim_start_matches("postgres://")
        .split('@')
        .next()
        .unwrap();
    let fresh_url = format!(
        "postgres://{role}@{}/{}",
        rest.split('/').next().unwrap(),
        fresh.url.rsplit('/').next().unwrap()
    );
    let (code, out, err) = run_worker(&fresh_url, &["migrate"], &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("permission denied for schema public")
            && err.contains(&format!("GRANT CREATE ON SCHEMA public TO {role}")),
        "{err}"
    );
}

/// Compose's init script (config/postgres-init/), run as the postgres image
/// runs it on a new volume: the owner migrates, and the role it creates for
/// the worker reads and writes rows and can do nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_init_script_makes_a_runtime_role_without_ddl() {
    let cluster = crate::harness::Cluster::start_throwaway(false);
    let db = cluster.database(false).await;
    let name = db.url.rsplit('/').next().unwrap().to_string();
    let (_, host_port) = db.url.split_once('@').unwrap();
    let host_port = host_port.split('/').next().unwrap();
    let (host, port) = host_port.split_once(':').unwrap();
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "s3cret\n").unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/postgres-init/10-docworker-runtime-role.sh"
    );
    let out = std::process::Command::new("sh")
        .arg(script)
        .env("PGHOST", host)
        .env("PGPORT", port)
        .env("POSTGRES_USER", "postgres")
        .env("POSTGRES_DB", &name)
        .env("WORKER_DB_PASSWORD_FILE", secret.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (code, out, err) = run_worker(&db.url, &["migrate"], &[]);
    assert_eq!(code, 0, "the owner migrates: {out}\n{err}");
    let runtime = format!("postgres://docworker_worker:s3cret@{host_port}/{name}");
    let (code, out, err) = run_worker(&runtime, &["migrate"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("schema is up to date"), "{out}");

    let worker = WorkerProcess::spawn(&runtime, &[]);
    let job = db.noop_job(json!({})).await;
    db.wait_status(job, "completed", Duration::from_secs(30))
        .await;
    drop(worker);

    let client = connect(&runtime).await;
    let err = client
        .batch_execute("CREATE TABLE intruder (a int)")
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("permission denied for schema public")),
        "{err:?}"
    );
    let err = client
        .batch_execute("ALTER TABLE job_tasks ADD COLUMN intruder int")
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("must be owner")),
        "{err:?}"
    );
}
