//! Ordinary production conditions the other tests do not set up: tables
//! whose statistics are missing or stale, rows and batches locked by
//! another transaction, and rows that wait between attempts.

use std::time::{Duration, Instant};

use docworker::queue::completer::{Finished, Outcome};
use docworker::queue::job::JobError;
use docworker::queue::maintenance::Maintenance;
use docworker::queue::running::StopSignal;
use docworker::queue::JobContext;
use docworker::store::{Stage, Written};
use serde_json::{json, Value};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::harness::{
    connect, exclusive, pool, shared, timed, ActingWorker, TestDb, WorkerProcess,
};
use crate::services;
use crate::stack::{Stack, JOB_DEADLINE};
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
    Finished::new(job.key, Outcome::Completed)
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
/// job_tasks_claim_idx in order and stop, never read or sort the backlog,
/// and never be JIT-compiled.
fn assert_claim_walks_the_index(plans: &[Value], backlog: i64, what: &str) {
    let (_outer, nested) = plans.split_last().expect("plans");
    for plan in nested {
        assert!(
            plan.get("JIT").is_none(),
            "{what}: the claim's walk is JIT-compiled: {plan:#}"
        );
    }
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
/// (or after it analyzed the table empty, or full of finished rows): the
/// claim still takes the few rows it needs from the index, whatever the
/// statistics say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_plan_does_not_depend_on_table_statistics() {
    let _gate = exclusive().await;
    const BACKLOG: i64 = 20_000;
    for stats in [
        "never analyzed",
        "analyzed while empty",
        "analyzed while every row was finished",
        "analyzed",
    ] {
        let db = shared().database(true).await;
        let c = &db.client;
        c.batch_execute("ALTER TABLE job_tasks SET (autovacuum_enabled = false)")
            .await
            .unwrap();
        assert!(
            c.query_one("SELECT pg_jit_available()", &[])
                .await
                .unwrap()
                .get::<_, bool>(0),
            "this check needs a server with JIT (Debian's postgresql packages have it)"
        );
        if stats == "analyzed while empty" {
            c.batch_execute("ANALYZE job_tasks").await.unwrap();
        }
        if stats == "analyzed while every row was finished" {
            // Stale: the planner then expects almost no pending row, and
            // costs the walk as the whole index (JIT territory at 1M rows).
            c.batch_execute(
                "INSERT INTO job_tasks (filename, task_type, status, finished_at)
                 SELECT 'old-' || g, 'ingest', 'completed', now()
                   FROM generate_series(1, 20000) g;
                 ANALYZE job_tasks",
            )
            .await
            .unwrap();
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
            let watcher = connect(&url).await;
            let start = Instant::now();
            let mut done = 0;
            loop {
                let claimed = worker.claim(3).await;
                if claimed.is_empty() {
                    let open: i64 = watcher
                        .query_one(
                            "SELECT count(*) FROM job_tasks WHERE status <> 'completed'",
                            &[],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    if open == 0 {
                        break;
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "{open} jobs left"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                for job in claimed {
                    // Another worker's claim may hold the row for a moment
                    // (it locks rows it re-checks): try again, as the
                    // producer does.
                    loop {
                        let written = worker
                            .record(Finished::new(job.key, Outcome::Completed))
                            .await;
                        match written {
                            Some(Written::Applied { .. }) => break,
                            Some(Written::Deferred) => {
                                tokio::time::sleep(Duration::from_millis(1)).await
                            }
                            other => panic!("{other:?}"),
                        }
                    }
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

async fn completed(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM job_tasks WHERE status = 'completed'")
        .await
}

/// The app's documented cancel, left open in a transaction (the rollup
/// trigger then holds the batch row), and then a `SELECT ... FOR UPDATE` on
/// the batch: the rest of the batch keeps completing meanwhile, nothing runs
/// twice, and the rollup is exact once the locks are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_locked_by_the_app_delays_only_itself() {
    let _gate = timed().await;
    let db = shared().database(true).await;
    const N: i64 = 1500;
    let tasks: Vec<Value> = (0..N)
        .map(|i| json!({"filename": format!("b{i}"), "task_type": "noop", "options": {"sleep_ms": 50}}))
        .collect();
    let rows = db
        .client
        .query(
            "SELECT batch_id, task_id FROM docworker_enqueue_batch($1)",
            &[&Value::Array(tasks)],
        )
        .await
        .unwrap();
    let batch: Uuid = rows[0].get(0);
    let worker = WorkerProcess::spawn(&db.url, &[("DOCWORKER__WORKER__CONCURRENCY", "8")]);
    let start = Instant::now();
    while completed(&db).await < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pending: Uuid = db
        .client
        .query_one(
            "SELECT id FROM job_tasks WHERE status = 'pending' ORDER BY priority, run_at, id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // 1. A pending task cancelled in a transaction left open; 2. the batch
    // row itself locked.
    let app = connect(&db.url).await;
    for (what, sql, id) in [
        (
            "the app's open cancel",
            "UPDATE job_tasks SET status = 'cancelled' WHERE id = $1",
            pending,
        ),
        (
            "a lock on the batch row",
            "SELECT 1 FROM job_batches WHERE id = $1 FOR UPDATE",
            batch,
        ),
    ] {
        app.batch_execute("BEGIN").await.unwrap();
        app.execute(sql, &[&id]).await.unwrap();
        let before = completed(&db).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let during = completed(&db).await - before;
        app.batch_execute("COMMIT").await.unwrap();
        assert!(
            during >= 30 || completed(&db).await == N - 1,
            "only {during} jobs completed during 3 s of {what}; log:\n{}",
            worker.logs()
        );
    }

    db.wait_count(
        "SELECT count(*) FROM job_tasks WHERE status = 'completed'",
        N - 1,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM job_tasks WHERE attempt > 1")
            .await,
        0,
        "a finished job ran again while its outcome waited"
    );
    // Exact once the locks are gone (the workers recount about once a second).
    let start = Instant::now();
    loop {
        let row = db
            .client
            .query_one(
                "SELECT status::text, completed_tasks, failed_tasks FROM job_batches WHERE id = $1",
                &[&batch],
            )
            .await
            .unwrap();
        let state: (String, i32, i32) = (row.get(0), row.get(1), row.get(2));
        if state == ("completed_with_errors".to_string(), N as i32 - 1, 1) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the batch rollup stayed {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Another session holds one running job's row locked for longer than a
/// lease: the heartbeat keeps renewing the others, which finish at their
/// first attempt; only the locked job may have to run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_running_row_delays_only_its_own_job() {
    let _gate = timed().await;
    let db = shared().database(true).await;
    let ids = db.noop_jobs(8, json!({"sleep_ms": 9000})).await;
    let worker = WorkerProcess::spawn(&db.url, &[("DOCWORKER__WORKER__CONCURRENCY", "8")]);
    db.wait_count(
        "SELECT count(*) FROM job_tasks WHERE status = 'processing' AND stage = 'sleeping'",
        8,
        Duration::from_secs(20),
    )
    .await;
    let app = connect(&db.url).await;
    app.batch_execute("BEGIN").await.unwrap();
    app.execute(
        "SELECT 1 FROM job_tasks WHERE id = $1 FOR UPDATE",
        &[&ids[0]],
    )
    .await
    .unwrap();
    // Longer than the 3 s lease (harness::FAST).
    tokio::time::sleep(Duration::from_secs(5)).await;
    app.batch_execute("COMMIT").await.unwrap();
    db.wait_count(
        "SELECT count(*) FROM job_tasks WHERE status = 'completed'",
        8,
        Duration::from_secs(40),
    )
    .await;
    let rerun = db
        .count("SELECT count(*) FROM job_tasks WHERE attempt > 1")
        .await;
    let others_rerun: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM job_tasks WHERE attempt > 1 AND id <> $1",
            &[&ids[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        others_rerun,
        0,
        "{rerun} jobs ran again, the locked one aside; log:\n{}",
        worker.logs()
    );
}

/// Someone who can write inside the upload root swaps a directory for a
/// symlink to one outside it, over and over, while a few hundred jobs read
/// a file through that directory: nothing from outside reaches Chroma.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_swap_race_never_indexes_a_byte_from_outside_the_root() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let _gate = timed().await;
    let mut stack = Stack::new().await;
    stack
        .set("DOCWORKER__WORKER__CONCURRENCY", "4")
        .set("DOCWORKER__FILES__AFTER_SUCCESS", "keep");
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(outside.path().join("docs")).unwrap();
    std::fs::write(
        outside.path().join("docs/page.txt"),
        "SECRETOUTSIDE root password hunter2 lives outside the upload directory.",
    )
    .unwrap();
    stack.write(
        "docs/page.txt",
        "Inside the upload root: a plain page about lighthouses and their keepers.",
    );
    let files: Vec<(&str, &std::path::Path)> =
        vec![("page.txt", std::path::Path::new("docs/page.txt")); 300];
    let (_, ids) = stack.enqueue_batch(&files).await;

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = std::thread::spawn({
        let root = stack.uploads.path().to_path_buf();
        let target = outside.path().join("docs");
        let stop = stop.clone();
        move || {
            let (docs, real, link) = (
                root.join("docs"),
                root.join("docs.real"),
                root.join("docs.link"),
            );
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                std::fs::rename(&docs, &real).unwrap();
                std::fs::rename(&link, &docs).unwrap();
                std::thread::sleep(Duration::from_micros(200));
                std::fs::rename(&docs, &link).unwrap();
                std::fs::rename(&real, &docs).unwrap();
                std::thread::sleep(Duration::from_micros(200));
                swaps += 1;
            }
            swaps
        }
    });
    let worker = stack.worker();
    let start = Instant::now();
    for id in &ids {
        let left = JOB_DEADLINE.saturating_sub(start.elapsed()) + Duration::from_secs(60);
        stack.wait_finished(*id, left).await;
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    let completed = stack
        .db
        .count("SELECT count(*) FROM job_tasks WHERE status = 'completed'")
        .await;
    let records = services::get_where(&stack.chroma_url, &stack.collection, json!({})).await;
    let leaked = records["documents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d.as_str().unwrap_or("").contains("SECRETOUTSIDE"))
        .count();
    eprintln!("{completed} of 300 jobs completed during {swaps} swaps; {leaked} leaked");
    assert_eq!(leaked, 0, "text from outside the upload root was indexed");
    assert!(
        completed > 0,
        "no job read the file at all; log:\n{}",
        worker.logs()
    );
    assert!(swaps > 100, "the swap loop barely ran ({swaps})");
}

/// What the file alone can fail on (empty, whitespace only, not a document)
/// fails at once as permanent, even while the embedder is down: it is found
/// before any service is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_fails_at_once_while_the_embedder_is_down() {
    let _gate = timed().await;
    let mut stack = Stack::new().await;
    // Nothing listens on the discard port: every embedder request is refused.
    stack.set("DOCWORKER__EMBED__URL", "http://127.0.0.1:9");
    let cases = [
        ("empty.txt", b"".to_vec(), "empty"),
        ("blank.md", b"  \n\t \n".to_vec(), "text"),
        (
            "photo.txt",
            b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01".to_vec(),
            "not a text document",
        ),
    ];
    let mut ids = Vec::new();
    for (name, bytes, _) in &cases {
        let path = stack.write(name, bytes);
        ids.push(
            stack
                .ingest(name, path.to_str().unwrap(), None, json!({}))
                .await,
        );
    }
    let worker = stack.worker();
    for (id, (name, _, needle)) in ids.iter().zip(&cases) {
        let row = stack.wait_finished(*id, Duration::from_secs(30)).await;
        let message = row.error_message.clone().unwrap_or_default();
        assert_eq!(
            (row.status.as_str(), row.attempt),
            ("error", 1),
            "{name}: {row:?}\n{}",
            worker.logs()
        );
        assert!(message.contains(needle), "{name}: {message}");
        assert!(!message.contains("embedding server"), "{name}: {message}");
    }
}

/// `/readyz` and the dependency gauge of the worker listening at `base`.
async fn readiness_of(base: &str) -> (u16, String, String) {
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    let status = ready.status().as_u16();
    let body = ready.text().await.unwrap();
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (status, body, metrics)
}

/// How a dependency's outage is ridden out, checked from outside: the
/// outage is logged once when found and once when over; meanwhile no job
/// that needs the service is claimed or spends an attempt, `/readyz` and
/// the gauge say so, and a job that does not need it (`other`, the INSERT
/// returning its id) runs; once the service is back every waiting job
/// completes.
async fn rides_out_an_outage(
    stack: &mut Stack,
    dependency: &str,
    down_for: Duration,
    stop: impl FnOnce(),
    start: impl FnOnce(),
    other: &str,
) {
    let address = format!("127.0.0.1:{}", crate::harness::free_port());
    stack
        .set("DOCWORKER__HTTP__ENABLED", "true")
        .set("DOCWORKER__HTTP__ADDRESS", &address)
        .set("DOCWORKER__CHUNK__SIZE", "64")
        .set("DOCWORKER__CHUNK__OVERLAP", "0");
    let base = format!("http://{address}");
    let worker = stack.worker();
    worker.wait_log("ready", Duration::from_secs(30)).await;
    let mut jobs = Vec::new();
    for i in 0..20 {
        let name = format!("doc-{i}.txt");
        let text = format!(
            "Document {i}. The harbour lights were lit at dusk, one by one, along the quay. \
             Fishing boats came in on the evening tide and tied up in rows.\n"
        )
        .repeat(8);
        let path = stack.write(&name, text);
        jobs.push((name, path));
    }

    let went_down = Instant::now();
    stop();
    let mut ids = Vec::new();
    for (name, path) in &jobs {
        ids.push(
            stack
                .ingest(name, path.to_str().unwrap(), None, json!({}))
                .await,
        );
    }
    worker
        .wait_log("dependency unavailable", Duration::from_secs(60))
        .await;
    let (status, body, metrics) = readiness_of(&base).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("{dependency}: down since")),
        "{body}"
    );
    let gauge = format!("docworker_dependency_up{{dependency=\"{dependency}\"}} 0");
    assert!(metrics.contains(&gauge), "{gauge} in:\n{metrics}");

    // Work that does not need the service goes on.
    let other: Uuid = stack.db.client.query_one(other, &[]).await.unwrap().get(0);
    let row = stack.wait_finished(other, Duration::from_secs(30)).await;
    assert_eq!(row.status, "completed", "{row:?}\n{}", worker.logs());

    // Halfway through the outage: every ingest waits, no attempt spent.
    tokio::time::sleep((down_for / 2).saturating_sub(went_down.elapsed())).await;
    for id in &ids {
        let row = row_json(&stack.db.client, *id).await;
        assert_eq!(row["status"], "pending", "{row:#}\n{}", worker.logs());
        assert_eq!(row["attempt"], 0, "{row:#}");
        assert_eq!(row["errors"], json!([]), "{row:#}");
    }
    tokio::time::sleep(down_for.saturating_sub(went_down.elapsed())).await;
    start();

    for (id, (name, _)) in ids.iter().zip(&jobs) {
        let row = stack.wait_finished(*id, JOB_DEADLINE).await;
        assert_eq!(
            row.status,
            "completed",
            "{name}: {row:?}\n{}",
            worker.logs()
        );
        assert!(row.attempt <= 2, "{name}: {row:?}");
        assert_eq!(row.error_message, None, "{name}");
        assert!(row.total_chunks > 0, "{name}: {row:?}");
    }
    let logs = worker.logs();
    assert_eq!(
        logs.matches("dependency unavailable").count(),
        1,
        "logged once:\n{logs}"
    );
    assert_eq!(logs.matches("dependency back").count(), 1, "{logs}");
    let (status, body, _) = readiness_of(&base).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        services::count(&stack.chroma_url, &stack.collection).await,
        {
            let mut n = 0;
            for id in &ids {
                n += stack.row(*id).await.total_chunks as usize;
            }
            n
        }
    );
}

/// Chroma down for 90 s with 20 ingest jobs queued: they wait, their
/// attempts unspent (before, the 5-attempt budget was gone in about a
/// minute and the jobs ended in `error`), while a `noop` job runs; all 20
/// complete once Chroma is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chroma_down_for_90_s_pauses_ingest_and_every_job_completes_after() {
    let _gate = timed().await;
    let chroma = services::Chroma::start_new();
    let mut stack = Stack::on(&chroma.url(), &services::shared_embedder().url()).await;
    rides_out_an_outage(
        &mut stack,
        "chroma",
        Duration::from_secs(90),
        || chroma.stop(),
        || chroma.start(),
        "INSERT INTO job_tasks (filename, task_type) VALUES ('other', 'noop') RETURNING id",
    )
    .await;
}

/// The embedder down for 60 s: ingest jobs wait and then complete, while a
/// `delete` (which needs only Chroma) runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedder_down_for_60_s_pauses_ingest_but_not_delete() {
    let _gate = timed().await;
    let embedder = services::EmbedServer::start_new(&[]);
    let mut stack = Stack::on(&services::shared_chroma().url(), &embedder.url()).await;
    rides_out_an_outage(
        &mut stack,
        "embedder",
        Duration::from_secs(60),
        || embedder.stop(),
        || embedder.start(),
        "INSERT INTO job_tasks (filename, task_type, document_id)
         VALUES ('gone', 'delete', gen_random_uuid()) RETURNING id",
    )
    .await;
}

/// Dead row versions and manual vacuums of `job_tasks`, from the
/// cumulative statistics.
async fn dead_rows_and_vacuums(db: &TestDb) -> (i64, i64, i64) {
    let row = db
        .client
        .query_one(
            "SELECT n_live_tup, n_dead_tup, vacuum_count FROM pg_stat_user_tables
              WHERE relid = 'job_tasks'::regclass",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Every job leaves two dead row versions. With autovacuum off (here for
/// the table; on this project's CI host for the whole cluster) nobody
/// vacuumed them, and a 20-minute soak at 300 jobs/s grew the table to
/// 72 MB and a million dead rows for 18,000 live ones. The worker now
/// vacuums the queue's tables itself when autovacuum does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_autovacuum_off_the_worker_vacuums_the_queue_tables_itself() {
    let db = shared().database(true).await;
    db.client
        .batch_execute("ALTER TABLE job_tasks SET (autovacuum_enabled = false)")
        .await
        .unwrap();
    db.noop_jobs(3_000, json!({})).await;
    let worker = WorkerProcess::spawn(&db.url, &[]);
    db.wait_count(
        "SELECT count(*) FROM job_tasks WHERE status = 'completed'",
        3_000,
        Duration::from_secs(60),
    )
    .await;

    let start = Instant::now();
    loop {
        let (live, dead, vacuums) = dead_rows_and_vacuums(&db).await;
        if vacuums > 0 && dead <= 50 + live / 50 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not vacuumed: {live} live, {dead} dead rows, {vacuums} vacuums\n{}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        worker
            .logs()
            .matches("autovacuum is off for this table")
            .count(),
        1,
        "said once:\n{}",
        worker.logs()
    );
}

/// An upload root that is not there (a volume not mounted yet) used to fail
/// every ingest attempt until the job gave up. It is an outage like
/// Chroma's: ingest waits, other jobs run, and the jobs complete once it
/// appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_upload_root_pauses_ingest_until_it_appears() {
    let mut stack = Stack::new().await;
    let root = stack.uploads.path().join("not-mounted-yet");
    let root_text = root.display().to_string();
    stack
        .set("DOCWORKER__FILES__UPLOAD_ROOT", &root_text)
        .set("DOCWORKER__HTTP__ENABLED", "true")
        .set("DOCWORKER__HTTP__ADDRESS", "127.0.0.1:0");
    let worker = stack.worker();
    let file = root.join("tides.txt");
    let job = stack
        .ingest("tides.txt", &file.display().to_string(), None, json!({}))
        .await;

    let start = Instant::now();
    loop {
        let row = stack.row(job).await;
        let message = row.error_message.clone().unwrap_or_default();
        if message.starts_with("Paused: uploads has been unavailable since") {
            assert_eq!(row.status, "pending", "{row:?}");
            assert_eq!(row.attempt, 0, "the attempt is not spent: {row:?}");
            assert!(message.contains("does not exist"), "{message}");
            break;
        }
        assert!(
            start.elapsed() < JOB_DEADLINE,
            "not paused: {row:?}\n{}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Other work goes on meanwhile.
    let noop = stack.db.noop_job(json!({})).await;
    stack.db.wait_status(noop, "completed", JOB_DEADLINE).await;

    std::fs::create_dir(&root).unwrap();
    std::fs::write(
        &file,
        "Tides are caused by the gravitational pull of the moon and the sun.",
    )
    .unwrap();
    let row = stack.wait_finished(job, JOB_DEADLINE).await;
    assert_eq!(row.status, "completed", "{row:?}\n{}", worker.logs());
    assert!(row.attempt <= 1, "{row:?}");
    assert_eq!(
        worker.logs().matches("dependency unavailable").count(),
        1,
        "{}",
        worker.logs()
    );
}
