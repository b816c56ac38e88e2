//! Faults around the document pipeline: the embedder failing, slow or
//! dropping connections, Chroma down, a worker killed mid-job, duplicate
//! and concurrent deliveries, re-uploads, deletes, progress reporting and
//! inputs over the model's context length.
//!
//! Every test checks what the app and a RAG query would see: the job's row
//! in PostgreSQL and the records in Chroma (and, on a private embed server,
//! its counters). Faults are only ever injected into private servers.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::harness::{self, WorkerProcess};
use crate::services::{self, Chroma, EmbedServer};
use crate::stack::{Stack, JOB_DEADLINE};
use crate::support::prose;

// Helpers --------------------------------------------------------------------

/// The job's row as the app polls it, plus what the queue keeps about it.
#[derive(Debug, Clone)]
struct Sample {
    status: String,
    stage: Option<String>,
    attempt: i32,
    total: i32,
    completed: i32,
    error_message: Option<String>,
    /// `run_at` is later than the database's `now()`.
    run_at_future: bool,
    /// Entries in the `errors` history.
    errors: i32,
    result: Option<Value>,
}

async fn sample(stack: &Stack, id: Uuid) -> Sample {
    let r = stack
        .db
        .client
        .query_one(
            "SELECT status::text, stage, attempt, total_chunks, completed_chunks,
                    error_message, run_at > now(), jsonb_array_length(errors), result
               FROM job_tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    Sample {
        status: r.get(0),
        stage: r.get(1),
        attempt: r.get(2),
        total: r.get(3),
        completed: r.get(4),
        error_message: r.get(5),
        run_at_future: r.get(6),
        errors: r.get(7),
        result: r.get(8),
    }
}

/// The job's `errors` history: one object per failed attempt.
async fn errors(stack: &Stack, id: Uuid) -> Vec<Value> {
    let v: Value = stack
        .db
        .client
        .query_one("SELECT errors FROM job_tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    v.as_array().cloned().unwrap_or_default()
}

/// Inserts an ingest task (its own document) with a budget of attempts a
/// test cannot use up, so that a long outage never ends it in `error`.
async fn ingest_patient(stack: &Stack, filename: &str, path: &std::path::Path) -> Uuid {
    stack
        .db
        .client
        .query_one(
            "INSERT INTO job_tasks (filename, file_path, task_type, max_attempts)
             VALUES ($1, $2, 'ingest', 50) RETURNING id",
            &[&filename, &path.display().to_string()],
        )
        .await
        .unwrap()
        .get(0)
}

fn logs(workers: &[&WorkerProcess]) -> String {
    workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            format!(
                "\n--- worker {} (pid {}) log:\n{}",
                i + 1,
                w.pid(),
                w.logs()
            )
        })
        .collect()
}

/// Polls the job until `pred` holds; returns that sample. Panics, with the
/// row and the workers' logs, at the deadline or when the job ends in
/// `error` or `cancelled` (no test here expects either).
async fn wait_for(
    stack: &Stack,
    id: Uuid,
    workers: &[&WorkerProcess],
    deadline: Duration,
    what: &str,
    pred: impl Fn(&Sample) -> bool,
) -> Sample {
    let start = Instant::now();
    loop {
        let s = sample(stack, id).await;
        if pred(&s) {
            return s;
        }
        if matches!(s.status.as_str(), "error" | "cancelled") {
            panic!(
                "job {id} ended in {} while waiting for {what}: {s:?}\nerrors: {:#?}{}",
                s.status,
                errors(stack, id).await,
                logs(workers)
            );
        }
        if start.elapsed() > deadline {
            panic!(
                "job {id}: waited {deadline:?} for {what}: {s:?}\nerrors: {:#?}{}",
                errors(stack, id).await,
                logs(workers)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_completed(stack: &Stack, id: Uuid, workers: &[&WorkerProcess]) -> Sample {
    wait_for(stack, id, workers, JOB_DEADLINE, "completed", |s| {
        s.status == "completed"
    })
    .await
}

/// Small chunks (`size` tokens, no overlap), so a short text makes many.
fn small_chunks(stack: &mut Stack, size: usize) {
    stack
        .set("DOCWORKER__CHUNK__SIZE", &size.to_string())
        .set("DOCWORKER__CHUNK__OVERLAP", "0");
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// (id, generation) of each of the document's records, by chunk index.
async fn ids_and_generations(stack: &Stack, doc: Uuid) -> Vec<(String, String)> {
    stack
        .chunks_of(doc)
        .await
        .into_iter()
        .map(|(id, m)| (id, m["generation"].as_str().unwrap_or("").to_string()))
        .collect()
}

/// How many times the worker logged that it would try an embed request again.
fn embed_retries_logged(worker: &WorkerProcess) -> usize {
    worker
        .logs()
        .matches("embedding request failed; trying again")
        .count()
}

fn stat(stats: &Value, key: &str) -> u64 {
    stats[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in the embed server's stats: {stats}"))
}

fn result_of(s: &Sample) -> &Value {
    s.result
        .as_ref()
        .unwrap_or_else(|| panic!("the row has no result: {s:?}"))
}

// 1. Embedder answering 503 -------------------------------------------------------

/// A private embed server with `fault` queued, a stack on it and the
/// shared Chroma, and one ingest job of twenty sentences.
async fn notes_on_a_faulty_embedder(fault: Value) -> (EmbedServer, Stack, Uuid) {
    let embedder = EmbedServer::start_new(&[]);
    let stack = Stack::on(&services::shared_chroma().url(), &embedder.url()).await;
    let path = stack.write("notes.txt", prose(20, ""));
    let id = stack
        .ingest("notes.txt", &path.display().to_string(), None, json!({}))
        .await;
    embedder.fault(fault).await;
    (embedder, stack, id)
}

/// Two 503s against embed.tries = 3: the third try in the same attempt
/// succeeds, and the row never shows a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedder_503s_fewer_than_the_tries_complete_in_the_first_attempt() {
    let _g = harness::timed().await;
    let (embedder, stack, id) = notes_on_a_faulty_embedder(
        json!({"mode": "status", "status": 503, "body": {"error": "server busy"}, "count": 2}),
    )
    .await;
    let worker = stack.worker();

    let done = wait_completed(&stack, id, &[&worker]).await;
    assert_eq!(done.attempt, 1, "{done:?}{}", logs(&[&worker]));
    assert_eq!(done.errors, 0, "{:#?}", errors(&stack, id).await);
    assert_eq!(done.error_message, None);
    assert_eq!(embed_retries_logged(&worker), 2, "{}", logs(&[&worker]));
    let stats = embedder.stats().await;
    assert_eq!(stat(&stats, "faulted_requests"), 2, "{stats}");
    // One batch: refused twice, answered the third time.
    assert_eq!(stat(&stats, "embed_requests"), 3, "{stats}");
    assert!(done.total > 0);
    assert_eq!(done.completed, done.total);
    assert_eq!(stack.assert_whole(id).await, done.total as usize);
}

/// Waits until the job is back `pending`, paused on `dependency` with its
/// attempt unspent and nothing in its error history; returns that sample.
async fn wait_paused_on(
    stack: &Stack,
    id: Uuid,
    worker: &WorkerProcess,
    dependency: &str,
    cause: &str,
) -> Sample {
    let prefix = format!("Paused: {dependency} has been unavailable since");
    let paused = wait_for(
        stack,
        id,
        &[worker],
        JOB_DEADLINE,
        "paused on an unavailable dependency",
        |s| {
            s.status == "pending"
                && s.error_message
                    .as_deref()
                    .is_some_and(|m| m.starts_with(&prefix))
        },
    )
    .await;
    let message = paused.error_message.clone().unwrap_or_default();
    assert!(message.contains(cause), "{paused:?}");
    assert_eq!(paused.attempt, 0, "the attempt is not spent: {paused:?}");
    assert_eq!(paused.errors, 0, "{:#?}", errors(stack, id).await);
    assert!(!paused.run_at_future, "due at once: {paused:?}");
    paused
}

/// Five 503s against embed.tries = 3: the first attempt's three tries and
/// the probe that follows are refused, so the embedder is down for
/// everyone: the job is handed back unspent and the embedder probed until
/// it answers; then the job completes in its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedder_503s_more_than_the_tries_pause_the_job_until_it_answers() {
    let _g = harness::timed().await;
    let (embedder, stack, id) = notes_on_a_faulty_embedder(
        json!({"mode": "status", "status": 503, "body": {"error": "server busy"}, "count": 5}),
    )
    .await;
    let worker = stack.worker();

    let paused = wait_paused_on(&stack, id, &worker, "embedder", "HTTP 503").await;
    assert!(
        paused
            .error_message
            .as_deref()
            .unwrap_or("")
            .contains("server busy"),
        "{paused:?}"
    );

    let done = wait_completed(&stack, id, &[&worker]).await;
    assert_eq!(done.attempt, 1, "{done:?}{}", logs(&[&worker]));
    assert_eq!(done.error_message, None, "cleared on completion");
    assert_eq!(errors(&stack, id).await, Vec::<Value>::new());
    let stats = embedder.stats().await;
    assert_eq!(stat(&stats, "faulted_requests"), 5, "{stats}");
    // Three tries, then probes until one is answered, then the job's one batch.
    assert_eq!(stat(&stats, "embed_requests"), 7, "{stats}");
    assert_eq!(embed_retries_logged(&worker), 2, "{}", logs(&[&worker]));
    let log = logs(&[&worker]);
    assert_eq!(log.matches("dependency unavailable").count(), 1, "{log}");
    assert_eq!(log.matches("dependency back").count(), 1, "{log}");
    assert_eq!(stack.assert_whole(id).await, done.total as usize);
    let generation = &stack.chunks_of(id).await[0].1["generation"];
    assert_eq!(generation, &json!(format!("{id}/1")));
}

/// A 500 on one request while the embedder answers its probe is this job's
/// failure, not an outage: the attempt is spent and retried with backoff,
/// so a request that fails every time cannot loop forever unspent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_the_probe_does_not_repeat_spends_the_attempt() {
    let _g = harness::timed().await;
    let (_embedder, stack, id) = notes_on_a_faulty_embedder(
        json!({"mode": "status", "status": 500, "body": {"error": "bad batch"}, "count": 3}),
    )
    .await;
    let worker = stack.worker();

    let done = wait_completed(&stack, id, &[&worker]).await;
    assert_eq!(done.attempt, 2, "{done:?}{}", logs(&[&worker]));
    let history = errors(&stack, id).await;
    assert_eq!(history.len(), 1, "{history:#?}");
    assert_eq!(history[0]["kind"], "transient");
    assert!(
        history[0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("HTTP 500"),
        "{history:#?}"
    );
    assert!(!logs(&[&worker]).contains("dependency unavailable"));
    assert_eq!(stack.assert_whole(id).await, done.total as usize);
}

// 2. Embedder slower than embed.timeout ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedder_slower_than_the_timeout_pauses_the_job_until_it_answers() {
    let _g = harness::timed().await;
    let embedder = EmbedServer::start_new(&[]);
    let mut stack = Stack::on(&services::shared_chroma().url(), &embedder.url()).await;
    stack.set("DOCWORKER__EMBED__TIMEOUT", "1s");
    let path = stack.write("notes.txt", prose(20, ""));
    let id = stack
        .ingest("notes.txt", &path.display().to_string(), None, json!({}))
        .await;
    // Four answers later than the timeout: three use up the first attempt's
    // tries, the fourth is the probe's.
    embedder
        .fault(json!({"mode": "delay", "seconds": 2.5, "count": 4}))
        .await;
    let worker = stack.worker();

    let done = wait_completed(&stack, id, &[&worker]).await;
    // Three tries and the probe after them time out: the embedder is down
    // and the job waits for it unspent. A healthy answer slower than the
    // 1 s timeout on a loaded machine, with the probe answered, would spend
    // an attempt.
    assert!(
        logs(&[&worker]).contains("dependency unavailable"),
        "{}",
        logs(&[&worker])
    );
    let history = errors(&stack, id).await;
    assert_eq!(history.len() as i32, done.attempt - 1, "{history:#?}");
    for e in &history {
        assert_eq!(e["kind"], "transient", "{history:#?}");
        assert!(
            e["message"]
                .as_str()
                .unwrap_or("")
                .contains("did not answer within embed.timeout"),
            "{history:#?}"
        );
    }
    let stats = embedder.stats().await;
    assert_eq!(stat(&stats, "faulted_requests"), 4, "{stats}");
    assert_eq!(stack.assert_whole(id).await, done.total as usize);
    assert_eq!(done.completed, done.total);
}

// 3. Embedder dropping connections --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedder_dropping_connections_pauses_the_job_until_it_answers() {
    let _g = harness::timed().await;
    let embedder = EmbedServer::start_new(&[]);
    let stack = Stack::on(&services::shared_chroma().url(), &embedder.url()).await;
    let path = stack.write("notes.txt", prose(20, ""));
    let id = ingest_patient(&stack, "notes.txt", &path).await;
    embedder.fault(json!({"mode": "drop", "count": -1})).await;
    let worker = stack.worker();

    // Every request, probes too, is cut off unanswered: the job waits,
    // its attempt unspent, however long that lasts.
    wait_paused_on(&stack, id, &worker, "embedder", "embedding server").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = sample(&stack, id).await;
    assert_eq!((still.attempt, still.errors), (0, 0), "{still:?}");
    embedder.fault(json!({"mode": "clear"})).await;

    let done = wait_completed(&stack, id, &[&worker]).await;
    assert_eq!(done.attempt, 1, "{done:?}");
    assert_eq!(errors(&stack, id).await, Vec::<Value>::new());
    let stats = embedder.stats().await;
    assert!(stat(&stats, "faulted_requests") >= 3, "{stats}");
    assert_eq!(stack.assert_whole(id).await, done.total as usize);
    assert_eq!(done.completed, done.total);
}

// 4. Chroma down --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chroma_down_makes_jobs_wait_unspent_and_complete_once_it_is_back() {
    let _g = harness::timed().await;
    let chroma = Chroma::start_new();
    chroma.stop();
    let stack = Stack::on(&chroma.url(), &services::shared_embedder().url()).await;

    // Down before the worker ever reached it: the collection is not even
    // created yet.
    let a_path = stack.write("a.txt", prose(40, "A: "));
    let a = ingest_patient(&stack, "a.txt", &a_path).await;
    let worker = stack.worker();
    wait_paused_on(&stack, a, &worker, "chroma", "ChromaDB at").await;
    chroma.start();
    let done_a = wait_completed(&stack, a, &[&worker]).await;
    assert_eq!(done_a.attempt, 1, "{done_a:?}");
    assert_eq!(errors(&stack, a).await, Vec::<Value>::new());
    let n_a = stack.assert_whole(a).await;
    assert_eq!(n_a, done_a.total as usize);
    assert_eq!(done_a.completed, done_a.total);
    let a_records = ids_and_generations(&stack, a).await;

    // Down again, after the worker has used the collection.
    chroma.stop();
    let b_path = stack.write("b.txt", prose(30, "B: "));
    let b = ingest_patient(&stack, "b.txt", &b_path).await;
    wait_paused_on(&stack, b, &worker, "chroma", "ChromaDB at").await;
    chroma.start();
    let done_b = wait_completed(&stack, b, &[&worker]).await;
    assert_eq!(stack.assert_whole(b).await, done_b.total as usize);
    assert_eq!(
        ids_and_generations(&stack, a).await,
        a_records,
        "document A is untouched"
    );
    assert_eq!(
        services::count(&stack.chroma_url, &stack.collection).await,
        n_a + done_b.total as usize
    );
}

/// A job of about sixty chunks, two per embedding request, each request
/// delayed a quarter of a second: it runs for several seconds, long enough
/// to kill or pause its worker mid-way. Clear the embedder's fault to let
/// it run at full speed.
async fn long_job_on_a_slow_embedder() -> (EmbedServer, Stack, Uuid) {
    let embedder = EmbedServer::start_new(&[]);
    let mut stack = Stack::on(&services::shared_chroma().url(), &embedder.url()).await;
    small_chunks(&mut stack, 40);
    stack.set("DOCWORKER__EMBED__BATCH_SIZE", "2");
    let path = stack.write("long.txt", prose(120, ""));
    let id = stack
        .ingest("long.txt", &path.display().to_string(), None, json!({}))
        .await;
    embedder
        .fault(json!({"mode": "delay", "seconds": 0.25, "count": -1}))
        .await;
    (embedder, stack, id)
}

// 5. Worker killed mid-job ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_leaves_no_partial_or_stale_chunks() {
    let _g = harness::timed().await;
    let (embedder, stack, id) = long_job_on_a_slow_embedder().await;
    let mut first = stack.worker();

    let mid = wait_for(
        &stack,
        id,
        &[&first],
        JOB_DEADLINE,
        "progress mid-job",
        |s| s.status == "processing" && s.completed > 0 && s.completed < s.total,
    )
    .await;
    first.signal("KILL");
    assert_eq!(
        first.wait_exit(Duration::from_secs(10)),
        None,
        "killed by a signal"
    );
    let total = mid.total as usize;
    let partial = stack.chunks_of(id).await.len();
    assert!(
        partial >= mid.completed as usize && partial < total,
        "the killed attempt left part of the document: {partial} of {total}"
    );
    embedder.fault(json!({"mode": "clear"})).await;

    let second = stack.worker();
    let done = wait_completed(&stack, id, &[&first, &second]).await;
    assert_eq!(done.attempt, 2, "{done:?}");
    assert_eq!(
        done.total as usize, total,
        "the same chunks as the first attempt"
    );
    assert_eq!(done.completed, done.total);
    let history = errors(&stack, id).await;
    assert_eq!(history.len(), 1, "{history:#?}");
    assert_eq!(history[0]["kind"], "lease_expired", "{history:#?}");

    assert_eq!(stack.assert_whole(id).await, total);
    let records = stack.chunks_of(id).await;
    for (rid, m) in &records {
        assert_eq!(m["generation"], json!(format!("{id}/2")), "{rid}: {m}");
        assert_eq!(m["chunk_count"], json!(total), "{rid}: {m}");
    }
    assert_eq!(
        services::count(&stack.chroma_url, &stack.collection).await,
        total,
        "nothing else in the collection"
    );
    // Every record the killed attempt wrote was overwritten in place.
    assert_eq!(result_of(&done)["stale_chunks_removed"], 0, "{done:?}");
}

/// A worker paused past its lease (a frozen VM, a stalled host) wakes up
/// after another worker has run its job to the end. Its writes to
/// PostgreSQL are fenced; its writes to Chroma must not land either, or the
/// document ends up with records of an attempt that no longer counts (and,
/// had the file been re-uploaded meanwhile, with the old file's text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_that_lost_its_job_leaves_the_document_whole() {
    let _g = harness::timed().await;
    let (embedder, stack, id) = long_job_on_a_slow_embedder().await;
    let first = stack.worker();
    let mid = wait_for(
        &stack,
        id,
        &[&first],
        JOB_DEADLINE,
        "progress mid-job",
        |s| s.status == "processing" && s.completed > 0 && s.completed < s.total,
    )
    .await;
    // Paused outside any transaction of its own: stopped inside one (its
    // maintenance sweep, say) it would hold locks that the LOCK TABLE below
    // waits for, while the test waits for the lock before waking it.
    let own = format!("docworker %-{}-%", first.pid());
    loop {
        first.signal("STOP");
        let open: i64 = stack
            .db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name LIKE $1 AND state IN ('active', 'idle in transaction')",
                &[&own],
            )
            .await
            .unwrap()
            .get(0);
        if open == 0 {
            break;
        }
        first.signal("CONT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    embedder.fault(json!({"mode": "clear"})).await;

    let second = stack.worker();
    let done = wait_for(
        &stack,
        id,
        &[&first, &second],
        JOB_DEADLINE,
        "attempt 2 completed",
        |s| s.status == "completed",
    )
    .await;
    assert_eq!(done.attempt, 2, "{done:?}");
    assert_eq!(done.total, mid.total);
    assert_eq!(stack.assert_whole(id).await, done.total as usize);

    // The paused worker wakes up while the database does not answer it at
    // once (the table is locked, as by a migration or a stalled server):
    // it cannot renew a lease that it knows ran out long ago, and must not
    // act on the job any more.
    let mut locker = harness::connect(&stack.db.url).await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE job_tasks IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    first.signal("CONT");
    first
        .wait_log("not ours to record", Duration::from_secs(30))
        .await;
    lock.rollback().await.unwrap();
    // Give anything still in flight time to land.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = sample(&stack, id).await;
    assert_eq!((after.status.as_str(), after.attempt), ("completed", 2));
    let records = stack.chunks_of(id).await;
    let stale: Vec<&String> = records
        .iter()
        .filter(|(_, m)| m["generation"] != json!(format!("{id}/2")))
        .map(|(rid, _)| rid)
        .collect();
    assert!(
        stale.is_empty(),
        "the paused worker wrote to Chroma after losing the job: records {stale:?} \
         carry its attempt's generation ({id}/1) although attempt 2 completed{}",
        logs(&[&first, &second])
    );
    assert_eq!(stack.assert_whole(id).await, done.total as usize);
}

// 6. Duplicate delivery -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_deliveries_are_skipped_and_changed_settings_reembed() {
    let _g = harness::timed().await;
    let mut stack = Stack::new().await;
    small_chunks(&mut stack, 60);
    let path = stack.write("report.txt", prose(40, ""));
    let file_path = path.display().to_string();
    let doc = Uuid::new_v4();
    let first_id = stack
        .ingest("report.txt", &file_path, Some(doc), json!({}))
        .await;
    let worker = stack.worker();

    let first = wait_completed(&stack, first_id, &[&worker]).await;
    assert_eq!(result_of(&first)["unchanged"], false, "{first:?}");
    let n = stack.assert_whole(doc).await;
    assert!(n >= 5, "{n} chunks");
    assert_eq!(n, first.total as usize);
    let indexed = ids_and_generations(&stack, doc).await;
    assert!(indexed.iter().all(|(_, g)| *g == format!("{first_id}/1")));

    // The same job run again.
    let retried: bool = stack
        .db
        .client
        .query_one("SELECT docworker_retry($1)", &[&first_id])
        .await
        .unwrap()
        .get(0);
    assert!(retried);
    let again = wait_for(
        &stack,
        first_id,
        &[&worker],
        JOB_DEADLINE,
        "the retried job",
        |s| s.attempt == 2 && s.status == "completed",
    )
    .await;
    assert_eq!(result_of(&again)["unchanged"], true, "{again:?}");
    assert_eq!(result_of(&again)["chunks"], json!(n), "{again:?}");
    assert_eq!((again.total, again.completed), (n as i32, n as i32));
    assert_eq!(
        ids_and_generations(&stack, doc).await,
        indexed,
        "nothing rewritten"
    );

    // A new row for the same document and file.
    let dup_id = stack
        .ingest("report.txt", &file_path, Some(doc), json!({}))
        .await;
    let dup = wait_completed(&stack, dup_id, &[&worker]).await;
    assert_eq!(result_of(&dup)["unchanged"], true, "{dup:?}");
    assert_eq!((dup.total, dup.completed), (n as i32, n as i32));
    assert_eq!(
        ids_and_generations(&stack, doc).await,
        indexed,
        "nothing rewritten"
    );

    // The same file under another chunk size turns into other chunks.
    drop(worker);
    small_chunks(&mut stack, 120);
    let worker = stack.worker();
    let resized_id = stack
        .ingest("report.txt", &file_path, Some(doc), json!({}))
        .await;
    let resized = wait_completed(&stack, resized_id, &[&worker]).await;
    let result = result_of(&resized);
    assert_eq!(result["unchanged"], false, "{resized:?}");
    let m = stack.assert_whole(doc).await;
    assert!(m < n, "bigger chunks, fewer of them: {m} vs {n}");
    assert_eq!(m, resized.total as usize);
    assert_eq!(result["chunks"], json!(m));
    assert_eq!(result["stale_chunks_removed"], json!(n - m), "{result}");
    let records = ids_and_generations(&stack, doc).await;
    assert!(
        records.iter().all(|(_, g)| *g == format!("{resized_id}/1")),
        "{records:?}"
    );
}

/// Two rows for the same document and file, due together, with a worker
/// that has free slots for both: they must run one after the other (run
/// together, each would delete the other's chunks as stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_deliveries_leave_one_whole_document() {
    let _g = harness::timed().await;
    let embedder = EmbedServer::start_new(&[]);
    let mut stack = Stack::on(&services::shared_chroma().url(), &embedder.url()).await;
    small_chunks(&mut stack, 40);
    stack.set("DOCWORKER__EMBED__BATCH_SIZE", "2");
    let path = stack.write("report.txt", prose(60, ""));
    let file_path = path.display().to_string();
    let doc = Uuid::new_v4();
    let ids: Vec<Uuid> = stack
        .db
        .client
        .query(
            "INSERT INTO job_tasks (filename, file_path, task_type, document_id)
             SELECT 'report.txt', $1, 'ingest', $2 FROM generate_series(1, 2)
             RETURNING id",
            &[&file_path, &doc],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    embedder
        .fault(json!({"mode": "delay", "seconds": 0.2, "count": -1}))
        .await;
    let worker = stack.worker();

    let mut done = Vec::new();
    for id in &ids {
        done.push(wait_completed(&stack, *id, &[&worker]).await);
    }
    // They were claimed by one worker with free slots, yet ran one after
    // the other: a document's jobs never overlap.
    let spans = stack
        .db
        .client
        .query(
            "SELECT started_at, finished_at FROM job_tasks WHERE id = ANY($1) ORDER BY started_at",
            &[&ids],
        )
        .await
        .unwrap();
    let first_end: chrono::DateTime<chrono::Utc> = spans[0].get(1);
    let second_start: chrono::DateTime<chrono::Utc> = spans[1].get(0);
    assert!(
        second_start >= first_end,
        "the two jobs of one document overlapped: {first_end} > {second_start}"
    );
    let total = done[0].total as usize;
    assert!(total >= 10, "{done:?}");
    let chunks = stack.chunks_of(doc).await;
    let generations: BTreeSet<&str> = chunks
        .iter()
        .map(|(_, m)| m["generation"].as_str().unwrap_or(""))
        .collect();
    let indices: Vec<u64> = chunks
        .iter()
        .filter_map(|(_, m)| m["chunk_index"].as_u64())
        .collect();
    assert_eq!(
        chunks.len(),
        total,
        "both jobs completed with {total} chunks, but Chroma holds {} records of the document \
         (chunk indices {indices:?}, generations {generations:?}); results: {:?} / {:?}",
        chunks.len(),
        done[0].result,
        done[1].result
    );
    assert_eq!(stack.assert_whole(doc).await, total);
}

// 7. Re-upload ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_reupload_replaces_every_chunk_and_removes_the_rest() {
    let _g = harness::timed().await;
    let mut stack = Stack::new().await;
    small_chunks(&mut stack, 40);
    let v1 = prose(60, "First draft: ");
    let path = stack.write("essay.txt", &v1);
    let file_path = path.display().to_string();
    let doc = Uuid::new_v4();
    let first_id = stack
        .ingest("essay.txt", &file_path, Some(doc), json!({}))
        .await;
    let worker = stack.worker();
    let first = wait_completed(&stack, first_id, &[&worker]).await;
    let n1 = stack.assert_whole(doc).await;
    assert_eq!(n1, first.total as usize);

    let v2 = prose(12, "Final text: ");
    stack.write("essay.txt", &v2);
    let second_id = stack
        .ingest("essay.txt", &file_path, Some(doc), json!({}))
        .await;
    let second = wait_completed(&stack, second_id, &[&worker]).await;
    let n2 = stack.assert_whole(doc).await;
    assert!(n2 >= 2 && n2 < n1, "{n2} vs {n1}");
    assert_eq!(n2, second.total as usize);
    let result = result_of(&second);
    assert_eq!(result["unchanged"], false, "{result}");
    assert_eq!(result["chunks"], json!(n2), "{result}");
    assert_eq!(result["stale_chunks_removed"], json!(n1 - n2), "{result}");
    let hash = sha256_hex(v2.as_bytes());
    assert_eq!(result["file_hash"], json!(hash));

    let got = services::get_where(
        &stack.chroma_url,
        &stack.collection,
        json!({"document_id": doc.to_string()}),
    )
    .await;
    let metas = got["metadatas"].as_array().unwrap();
    let texts = got["documents"].as_array().unwrap();
    assert_eq!(metas.len(), n2);
    for (m, text) in metas.iter().zip(texts) {
        assert_eq!(m["file_hash"], json!(hash), "{m}");
        assert_eq!(m["generation"], json!(format!("{second_id}/1")), "{m}");
        assert_eq!(m["chunk_count"], json!(n2), "{m}");
        let text = text.as_str().unwrap();
        assert!(v2.contains(text), "a chunk not from the new file: {text:?}");
    }
    assert_eq!(
        services::count(&stack.chroma_url, &stack.collection).await,
        n2,
        "no stale chunks left"
    );
}

// 8. Delete -------------------------------------------------------------------------

/// A delete needs only Chroma: it works while the embedder is down, and a
/// collection that was never created has nothing to delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_works_without_the_embedder_and_without_a_collection() {
    let _g = harness::timed().await;
    let stack = Stack::new().await;
    let path = stack.write("a.txt", prose(20, "alpha"));
    let doc = Uuid::new_v4();
    let ingest = stack
        .ingest("a.txt", &path.display().to_string(), Some(doc), json!({}))
        .await;
    {
        let worker = stack.worker();
        wait_completed(&stack, ingest, &[&worker]).await;
    }
    let n = stack.assert_whole(doc).await;
    assert!(n > 0);

    // The embedder now points at a closed port.
    let mut down = Stack::on(&stack.chroma_url, "http://127.0.0.1:9").await;
    down.collection = stack.collection.clone();
    let missing = Stack::on(&stack.chroma_url, "http://127.0.0.1:9").await;
    for (s, document, want) in [(&down, doc, n), (&missing, Uuid::new_v4(), 0)] {
        let id = s.delete(document).await;
        let worker = s.worker();
        let row = s.wait_finished(id, JOB_DEADLINE).await;
        assert_eq!(row.status, "completed", "{row:?}\n{}", worker.logs());
        assert_eq!(
            row.result.as_ref().map(|r| r["chunks_removed"].clone()),
            Some(json!(want)),
            "{row:?}"
        );
    }
    assert!(stack.chunks_of(doc).await.is_empty());
    assert_eq!(
        services::collection_id(&missing.chroma_url, &missing.collection).await,
        None,
        "a delete must not create the collection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_every_chunk_of_its_document_and_nothing_else() {
    let _g = harness::timed().await;
    let mut stack = Stack::new().await;
    small_chunks(&mut stack, 60);
    let a_path = stack.write("a.txt", prose(30, "A: "));
    let b_path = stack.write("b.txt", prose(20, "B: "));
    let a = stack
        .ingest("a.txt", &a_path.display().to_string(), None, json!({}))
        .await;
    let b = stack
        .ingest("b.txt", &b_path.display().to_string(), None, json!({}))
        .await;
    let worker = stack.worker();
    wait_completed(&stack, a, &[&worker]).await;
    wait_completed(&stack, b, &[&worker]).await;
    let n_a = stack.assert_whole(a).await;
    let n_b = stack.assert_whole(b).await;
    assert!(n_a > 1 && n_b > 1);
    let b_records = ids_and_generations(&stack, b).await;

    let del = stack.delete(a).await;
    let deleted = wait_completed(&stack, del, &[&worker]).await;
    assert_eq!(
        result_of(&deleted)["chunks_removed"],
        json!(n_a),
        "{deleted:?}"
    );
    assert_eq!(deleted.stage.as_deref(), Some("done"));
    assert!(stack.chunks_of(a).await.is_empty());
    assert_eq!(
        ids_and_generations(&stack, b).await,
        b_records,
        "B untouched"
    );
    assert_eq!(
        services::count(&stack.chroma_url, &stack.collection).await,
        n_b
    );

    // Nothing to delete: the document is gone already, or never existed.
    for doc in [a, Uuid::new_v4()] {
        let del = stack.delete(doc).await;
        let deleted = wait_completed(&stack, del, &[&worker]).await;
        assert_eq!(result_of(&deleted)["chunks_removed"], 0, "{deleted:?}");
    }
    assert_eq!(
        ids_and_generations(&stack, b).await,
        b_records,
        "B untouched"
    );
}

// 9. Progress -----------------------------------------------------------------------

const STAGES: [&str; 6] = [
    "started",
    "parsing",
    "chunking",
    "embedding",
    "storing",
    "done",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_moves_forward_through_the_stages_and_counts() {
    let _g = harness::timed().await;
    let embedder = EmbedServer::start_new(&[]);
    let mut stack = Stack::on(&services::shared_chroma().url(), &embedder.url()).await;
    small_chunks(&mut stack, 40);
    stack.set("DOCWORKER__EMBED__BATCH_SIZE", "2");
    let path = stack.write("long.txt", prose(80, ""));
    let id = stack
        .ingest("long.txt", &path.display().to_string(), None, json!({}))
        .await;
    embedder
        .fault(json!({"mode": "delay", "seconds": 0.2, "count": -1}))
        .await;
    let worker = stack.worker();

    let mut samples = Vec::new();
    let start = Instant::now();
    loop {
        let s = sample(&stack, id).await;
        let finished = matches!(s.status.as_str(), "completed" | "error" | "cancelled");
        samples.push(s);
        if finished {
            break;
        }
        assert!(
            start.elapsed() < JOB_DEADLINE,
            "{:?}{}",
            samples.last(),
            logs(&[&worker])
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last = samples.last().unwrap().clone();
    assert_eq!(last.status, "completed", "{last:?}{}", logs(&[&worker]));
    assert_eq!(last.stage.as_deref(), Some("done"));
    assert!(last.total > 0);
    assert_eq!(last.completed, last.total);
    assert_eq!(stack.assert_whole(id).await, last.total as usize);

    // Stages in the order first seen: in pipeline order, the slow one seen.
    let mut seen: Vec<&str> = Vec::new();
    for s in &samples {
        if let Some(stage) = s.stage.as_deref() {
            if seen.last() != Some(&stage) {
                seen.push(stage);
            }
        }
    }
    let positions: Vec<Option<usize>> = seen
        .iter()
        .map(|st| STAGES.iter().position(|x| x == st))
        .collect();
    assert!(
        positions.iter().all(Option::is_some) && positions.windows(2).all(|w| w[0] < w[1]),
        "stages out of order: {seen:?}"
    );
    assert!(seen.contains(&"embedding"), "{seen:?}");

    let running: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.status == "processing")
        .collect();
    assert!(
        running.iter().any(|s| s.total > 0),
        "total_chunks is known before completion"
    );
    let mut intermediate = BTreeSet::new();
    let mut previous = 0;
    for s in &samples {
        assert_eq!(s.attempt.max(1), 1, "{s:?}");
        assert!(s.completed <= s.total, "completed over total: {s:?}");
        assert!(
            s.completed >= previous,
            "completed went back: {previous} -> {s:?}"
        );
        previous = s.completed;
        if s.status == "processing" && s.completed > 0 && s.completed < s.total {
            intermediate.insert(s.completed);
        }
    }
    assert!(
        intermediate.len() >= 2,
        "progress reported as it goes, not only at the end: {intermediate:?}"
    );
}

/// A retry starts its counts afresh: the claim resets them, and the attempt
/// that finally runs counts from zero to the total again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_job_counts_its_progress_afresh() {
    let _g = harness::timed().await;
    let embedder = EmbedServer::start_new(&[]);
    let chroma = Chroma::start_new();
    let mut stack = Stack::on(&chroma.url(), &embedder.url()).await;
    small_chunks(&mut stack, 40);
    stack.set("DOCWORKER__EMBED__BATCH_SIZE", "2");
    let path = stack.write("long.txt", prose(80, ""));
    let id = ingest_patient(&stack, "long.txt", &path).await;
    embedder
        .fault(json!({"mode": "delay", "seconds": 0.2, "count": -1}))
        .await;
    let worker = stack.worker();

    let mid = wait_for(
        &stack,
        id,
        &[&worker],
        JOB_DEADLINE,
        "progress in attempt 1",
        |s| s.status == "processing" && s.attempt == 1 && s.completed > 0,
    )
    .await;
    // The embedder's runner crashes on every request for two attempts (it
    // still answers, so this is the job's failure, not an outage): a later
    // attempt claimed and failed, and the claim cleared the first
    // attempt's counts.
    embedder.fault(json!({"mode": "clear"})).await;
    embedder
        .fault(json!({"mode": "status", "status": 400, "count": 6,
            "body": {"error": "llama runner process has terminated: signal: killed"}}))
        .await;
    let later = wait_for(
        &stack,
        id,
        &[&worker],
        JOB_DEADLINE,
        "a later attempt to fail",
        |s| s.status == "pending" && s.attempt >= 2,
    )
    .await;
    assert_eq!(
        (later.total, later.completed),
        (0, 0),
        "attempt {} shows attempt 1's counts ({}/{}): {later:?}",
        later.attempt,
        mid.completed,
        mid.total
    );
    embedder.fault(json!({"mode": "clear"})).await;
    embedder
        .fault(json!({"mode": "delay", "seconds": 0.2, "count": -1}))
        .await;

    let mut samples = Vec::new();
    let start = Instant::now();
    loop {
        let s = sample(&stack, id).await;
        let finished = s.status == "completed";
        samples.push(s);
        if finished {
            break;
        }
        assert!(
            start.elapsed() < JOB_DEADLINE,
            "{:?}\nerrors: {:#?}{}",
            samples.last(),
            errors(&stack, id).await,
            logs(&[&worker])
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = samples.last().unwrap().clone();
    assert!(done.attempt >= 3, "{done:?}");
    assert_eq!(
        (done.total, done.completed),
        (mid.total, mid.total),
        "{done:?}"
    );
    let last_run: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.attempt == done.attempt && s.status == "processing")
        .collect();
    assert!(
        !last_run.is_empty(),
        "the final attempt was never seen running"
    );
    assert_eq!(
        last_run[0].completed, 0,
        "the final attempt starts from 0: {:?}",
        last_run[0]
    );
    assert!(
        last_run
            .windows(2)
            .all(|w| w[0].completed <= w[1].completed),
        "{last_run:?}"
    );
    assert!(
        last_run
            .iter()
            .any(|s| s.completed > 0 && s.completed < s.total),
        "the final attempt's progress was never seen between 0 and the total: {last_run:?}"
    );
    assert_eq!(stack.assert_whole(id).await, done.total as usize);
    assert_eq!(
        services::count(&stack.chroma_url, &stack.collection).await,
        done.total as usize
    );
}

// 10. Inputs over the model's context length ------------------------------------------

/// A realistic technical document: prose, fenced code, a table of
/// numbers, a list of measurements.
fn technical_markdown() -> String {
    let mut md = String::from("# Pump station 7: maintenance report\n\n");
    for section in 1..=6 {
        md.push_str(&format!("## {section}. Findings\n\n"));
        md.push_str(&prose(6, &format!("Section {section}: ")));
        md.push_str("\n\n```rust\nfn flow_rate(litres: f64, seconds: f64) -> f64 {\n    if seconds <= 0.0 { return 0.0; }\n    litres / seconds * 3600.0 // m3/h x 1000\n}\n```\n\n");
        md.push_str("| sensor | reading | unit | checked |\n| --- | ---: | --- | --- |\n");
        for row in 0..12 {
            md.push_str(&format!(
                "| PT-{section}{row:02} | {}.{:03} | bar | 2024-0{}-1{} |\n",
                (section * 37 + row * 11) % 97,
                (row * 271) % 1000,
                1 + row % 9,
                row % 10
            ));
        }
        md.push_str(&format!(
            "\nVibration {section}: 4.7 mm/s RMS at 1,480 rpm; 0x{:04X} fault code; 3.14159e-2 rad.\n\n",
            section * 4099
        ));
    }
    md
}

/// A model whose real context is smaller than it says (here 100 tokens
/// where /api/show says 512): its refusals make the whole document chunk
/// again, smaller, until it takes every chunk. The chunks are final before
/// any is embedded, so the stored ones are one clean set: indices 0..n-1,
/// `chunk_count` n on every record, none inside another, none under the
/// floor, the refused passes' records gone. Before, each refused chunk was
/// split on its own: pieces repeating the overlap, fragments, and counts
/// that disagreed with the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_the_model_refuses_make_the_whole_document_chunk_again() {
    let _g = harness::timed().await;
    let embedder = EmbedServer::start_new(&[]);
    let mut stack = Stack::on(&services::shared_chroma().url(), &embedder.url()).await;
    stack
        .set(
            "DOCWORKER__CHUNK__TOKENIZER",
            services::model_tokenizer().to_str().unwrap(),
        )
        .set("DOCWORKER__CHUNK__SIZE", "300")
        .set("DOCWORKER__CHUNK__OVERLAP", "30");
    let text = technical_markdown();
    let path = stack.write("report.md", &text);
    let id = stack
        .ingest("report.md", &path.display().to_string(), None, json!({}))
        .await;
    embedder
        .fault(json!({"mode": "context", "tokens": 100}))
        .await;
    let worker = stack.worker();

    let done = wait_completed(&stack, id, &[&worker]).await;
    assert_eq!(done.attempt, 1, "{done:?}");
    assert!(
        worker
            .logs()
            .contains("chunking the whole document again smaller"),
        "{}",
        logs(&[&worker])
    );
    assert_clean_chunks(&stack, id, &done, &text, 100).await;
    let stats = embedder.stats().await;
    assert_eq!(stat(&stats, "faulted_requests"), 0, "{stats}");
}

/// The same document with no tokenizer configured and the model's real
/// context: docworker's estimate (calibrated not to undercount code,
/// tables and numbers) makes chunks the model takes at the first try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_technical_document_fits_the_model_on_the_estimate_alone() {
    let _g = harness::timed().await;
    let stack = Stack::new().await;
    let text = technical_markdown();
    let path = stack.write("report.md", &text);
    let id = stack
        .ingest("report.md", &path.display().to_string(), None, json!({}))
        .await;
    let worker = stack.worker();
    let done = wait_completed(&stack, id, &[&worker]).await;
    assert!(
        !worker.logs().contains("chunking the whole document again"),
        "{}",
        logs(&[&worker])
    );
    assert_clean_chunks(&stack, id, &done, &text, 512).await;
}

/// The stored chunks of `id` are one clean set over `text`: indices
/// 0..n-1, `chunk_count` n and one generation on every record, each
/// chunk's text at its byte range and at most `max_tokens` by the model's
/// tokenizer, none a fragment under the floor, none inside another, and
/// together every visible byte of the text. Returns n.
async fn assert_clean_chunks(
    stack: &Stack,
    id: Uuid,
    done: &Sample,
    text: &str,
    max_tokens: usize,
) -> usize {
    let n = stack.assert_whole(id).await;
    assert_eq!(n, done.total as usize);
    assert_eq!(result_of(done)["chunks"], json!(n));
    let sizer = docworker::pipeline::chunk::Sizer::load(&services::model_tokenizer()).unwrap();
    let got = services::get_where(
        &stack.chroma_url,
        &stack.collection,
        json!({"document_id": id.to_string()}),
    )
    .await;
    let texts = got["documents"].as_array().unwrap();
    let metas = got["metadatas"].as_array().unwrap();
    assert_eq!(texts.len(), n, "the refused passes' records are gone");
    let mut chunks: Vec<(u64, usize, usize, &str)> = Vec::new();
    for (t, m) in texts.iter().zip(metas) {
        assert_eq!(m["chunk_count"], json!(n), "{m}");
        assert_eq!(m["generation"], metas[0]["generation"], "{m}");
        let (start, end) = (
            m["start_byte"].as_u64().unwrap() as usize,
            m["end_byte"].as_u64().unwrap() as usize,
        );
        let t = t.as_str().unwrap();
        assert_eq!(&text[start..end], t, "chunk text vs its byte range: {m}");
        chunks.push((m["chunk_index"].as_u64().unwrap(), start, end, t));
    }
    chunks.sort();
    let indices: Vec<u64> = chunks.iter().map(|c| c.0).collect();
    assert_eq!(indices, (0..n as u64).collect::<Vec<_>>());
    let mut covered = vec![false; text.len()];
    for (i, (_, start, end, t)) in chunks.iter().enumerate() {
        let tokens = sizer.count(t);
        assert!(tokens <= max_tokens, "chunk {i} has {tokens} tokens");
        assert!(
            tokens >= docworker::pipeline::chunk::FLOOR || n == 1,
            "chunk {i} is a {tokens}-token fragment: {t:?}"
        );
        for (j, (_, s2, e2, _)) in chunks.iter().enumerate() {
            assert!(
                i == j || !(s2 <= start && end <= e2),
                "chunk {i} ({start}..{end}) lies inside chunk {j} ({s2}..{e2})"
            );
        }
        covered[*start..*end].iter_mut().for_each(|c| *c = true);
    }
    let missing = (0..text.len())
        .filter(|&i| !covered[i] && !text.as_bytes()[i].is_ascii_whitespace())
        .count();
    assert_eq!(missing, 0, "bytes of the file in no chunk");
    n
}
