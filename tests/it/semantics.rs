//! Queue semantics seen from the table: retries and their timing, failure
//! kinds, timeouts, cancellation, bad rows, the concurrency bound, future
//! rows, priority, pruning and progress fields.
//!
//! Times are read from the database clock (as float8 epoch seconds), never
//! from the test's clock: the worker's own timestamps are compared with each
//! other, so scheduling delays of the test process do not skew them.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};
use uuid::Uuid;

use crate::harness::{shared, timed, TestDb, WorkerProcess};
use crate::support::{install_audit, row_json, wait_row};

use docworker::queue::retry::RetryPolicy;

// Helpers ------------------------------------------------------------------------

/// One recorded transition; times are epoch seconds.
#[derive(Debug, Clone)]
struct Transition {
    status: String,
    attempt: i32,
    run_at: f64,
    locked_by: Option<String>,
    tx_at: f64,
    at: f64,
}

async fn transitions(db: &TestDb, id: Uuid) -> Vec<Transition> {
    db.client
        .query(
            "SELECT new_status, attempt, extract(epoch FROM run_at)::float8, locked_by,
                    extract(epoch FROM tx_at)::float8, extract(epoch FROM at)::float8
               FROM job_audit
              WHERE id = $1 AND old_status IS DISTINCT FROM new_status
              ORDER BY seq",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Transition {
            status: r.get(0),
            attempt: r.get(1),
            run_at: r.get(2),
            locked_by: r.get(3),
            tx_at: r.get(4),
            at: r.get(5),
        })
        .collect()
}

/// One float8 from a query.
async fn f64_of(client: &Client, sql: &str, id: Uuid) -> f64 {
    client.query_one(sql, &[&id]).await.unwrap().get(0)
}

/// Epoch seconds of a timestamptz column of job `id` (panics when NULL).
async fn epoch(db: &TestDb, column: &str, id: Uuid) -> f64 {
    let v: Option<f64> = db
        .client
        .query_one(
            &format!("SELECT extract(epoch FROM {column})::float8 FROM job_tasks WHERE id = $1"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    v.unwrap_or_else(|| panic!("job {id} has no {column}"))
}

/// Inserts one job with the given task type, options and extra columns.
async fn insert_job(db: &TestDb, task_type: &str, options: Value, max_attempts: i32) -> Uuid {
    db.client
        .query_one(
            "INSERT INTO job_tasks (filename, task_type, options, max_attempts)
             VALUES ('semantics', $1, $2, $3) RETURNING id",
            &[&task_type, &options, &max_attempts],
        )
        .await
        .unwrap()
        .get(0)
}

fn assert_alive(w: &mut WorkerProcess) {
    if let Some(status) = w.child.try_wait().unwrap() {
        panic!("the worker exited ({status}); log:\n{}", w.logs());
    }
}

/// A session LISTENing on `channel`; notifications arrive on `rx`.
struct Listener {
    _client: Client,
    rx: mpsc::UnboundedReceiver<Notification>,
}

impl Listener {
    async fn start(url: &str, channel: &str) -> Listener {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    if tx.send(n).is_err() {
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .unwrap();
        Listener {
            _client: client,
            rx,
        }
    }

    /// The next notification within `timeout`, if any.
    async fn next(&mut self, timeout: Duration) -> Option<Notification> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

// 1. Retry and backoff timing ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_wait_within_the_backoff_bounds_without_holding_a_slot() {
    let _gate = timed().await;
    let db = shared().database(true).await;
    install_audit(&db.client).await;
    // Waits of 1.5-2s after attempt 1 and 3-4s after attempt 2: the second
    // wait leaves the test two seconds or more to see it and enqueue into it.
    let policy = RetryPolicy {
        base_delay: Duration::from_secs(2),
        max_delay: Duration::from_secs(8),
    };
    // A 30s poll: a retry claimed on time was woken by the completer's
    // timer, not found by the poll.
    let w = WorkerProcess::spawn(
        &db.url,
        &[
            ("DOCWORKER__RETRY__BASE_DELAY", "2s"),
            ("DOCWORKER__RETRY__MAX_DELAY", "8s"),
            ("DOCWORKER__WORKER__CONCURRENCY", "1"),
            ("DOCWORKER__WORKER__POLL_INTERVAL", "30s"),
        ],
    );
    w.wait_log("listening for job notifications", Duration::from_secs(15))
        .await;
    let id = insert_job(
        &db,
        "noop",
        json!({"fail": "transient", "fail_attempts": 2}),
        5,
    )
    .await;

    // Watch the row while it waits for each retry.
    let mut seen_waiting: Vec<(i32, f64)> = Vec::new(); // (attempt, run_at)
    let mut second: Option<Uuid> = None;
    let start = Instant::now();
    loop {
        let r = db
            .client
            .query_one(
                "SELECT status::text, attempt, locked_by, locked_until IS NULL,
                        extract(epoch FROM run_at)::float8
                   FROM job_tasks WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        let (status, attempt): (String, i32) = (r.get(0), r.get(1));
        if status == "completed" {
            break;
        }
        if status == "pending" && attempt > 0 {
            let locked_by: Option<String> = r.get(2);
            assert_eq!(
                locked_by, None,
                "a job waiting for its retry must not be locked"
            );
            assert!(
                r.get::<_, bool>(3),
                "a job waiting for its retry must hold no lease"
            );
            if seen_waiting.last().map(|s| s.0) != Some(attempt) {
                seen_waiting.push((attempt, r.get(4)));
            }
            if attempt == 2 && second.is_none() {
                // Enqueue a second job while at least a second of the wait
                // remains: with one slot it can only run now if the waiting
                // job holds no slot.
                let row = db
                    .client
                    .query_opt(
                        "INSERT INTO job_tasks (filename, task_type)
                         SELECT 'second', 'noop'
                          WHERE EXISTS (SELECT 1 FROM job_tasks WHERE id = $1
                                         AND status = 'pending' AND run_at > now() + interval '1 second')
                         RETURNING id",
                        &[&id],
                    )
                    .await
                    .unwrap();
                let row = row.unwrap_or_else(|| {
                    panic!("the test saw the second wait too late to enqueue into it (machine overloaded?)")
                });
                second = Some(row.get(0));
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "job did not complete in time; row: {:#}\nlog:\n{}",
            row_json(&db.client, id).await,
            w.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let row = row_json(&db.client, id).await;
    assert_eq!(row["attempt"], 3, "{row:#}");
    assert_eq!(row["error_message"], Value::Null, "{row:#}");
    let errors = row["errors"]
        .as_array()
        .expect("errors is an array")
        .clone();
    assert_eq!(errors.len(), 2, "{row:#}");

    let t = transitions(&db, id).await;
    let shape: Vec<(&str, i32)> = t.iter().map(|t| (t.status.as_str(), t.attempt)).collect();
    assert_eq!(
        shape,
        [
            ("processing", 1),
            ("pending", 1),
            ("processing", 2),
            ("pending", 2),
            ("processing", 3),
            ("completed", 3)
        ],
        "{t:#?}"
    );
    assert_eq!(
        seen_waiting.iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 2],
        "the test should have seen both waits"
    );

    for (i, failure) in [1usize, 3].into_iter().enumerate() {
        let attempt = i as i32 + 1;
        let e = &errors[i];
        assert_eq!(e["attempt"], attempt, "{e}");
        assert_eq!(e["kind"], "transient", "{e}");
        let failed_at = f64_of(
            &db.client,
            &format!("SELECT extract(epoch FROM (errors->{i}->>'at')::timestamptz)::float8 FROM job_tasks WHERE id = $1"),
            id,
        )
        .await;
        let waiting = &t[failure];
        assert_eq!(waiting.locked_by, None);
        assert!(
            (waiting.tx_at - failed_at).abs() < 1e-5,
            "errors[{i}].at is the failure's write time"
        );
        assert!(
            (waiting.run_at - seen_waiting[i].1).abs() < 1e-5,
            "the polled run_at is the one written"
        );
        assert!(
            waiting.run_at > waiting.at,
            "run_at is in the future when written"
        );
        let delay = waiting.run_at - failed_at;
        let (lo, hi) = policy.delay_bounds(attempt);
        let eps = 0.002;
        assert!(
            delay >= lo.as_secs_f64() - eps && delay <= hi.as_secs_f64() + eps,
            "attempt {attempt}: run_at - errors[{i}].at = {delay:.4}s, outside the policy's [{lo:?}, {hi:?}]"
        );
        // The next attempt is claimed once due, and not much later.
        let claim = &t[failure + 1];
        let late = claim.tx_at - waiting.run_at;
        assert!(
            late >= 0.0,
            "attempt {} was claimed {:.3}s before its run_at",
            attempt + 1,
            -late
        );
        assert!(
            late < 1.5,
            "attempt {} was claimed {late:.3}s after its run_at: the retry timer did not wake the producer",
            attempt + 1
        );
    }

    // The second job ran during the wait, before the retry was claimed.
    let second = second.expect("a second job was enqueued");
    db.wait_status(second, "completed", Duration::from_secs(10))
        .await;
    let second_done = epoch(&db, "finished_at", second).await;
    let third_claim = t[4].tx_at;
    assert!(
        second_done < third_claim,
        "the second job finished {:.3}s after the waiting job was claimed again: the wait held the only slot",
        second_done - third_claim
    );
}

// 2. Permanent versus transient ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_body_fails_its_job_and_the_daemon_keeps_serving() {
    let db = shared().database(true).await;
    let mut w = WorkerProcess::spawn(&db.url, &[("DOCWORKER__WORKER__CONCURRENCY", "1")]);
    let panicking = insert_job(&db, "noop", json!({"fail": "panic"}), 5).await;
    db.wait_status(panicking, "error", Duration::from_secs(20))
        .await;
    let row = db
        .client
        .query_one(
            "SELECT attempt, error_message, errors->0->>'kind' FROM job_tasks WHERE id = $1",
            &[&panicking],
        )
        .await
        .unwrap();
    // A bug is not retried: it would only panic again.
    assert_eq!(row.get::<_, i32>(0), 1);
    let message: String = row.get(1);
    assert!(
        message.contains("internal error") && message.contains("noop job asked to fail"),
        "{message}"
    );
    assert_eq!(row.get::<_, String>(2), "permanent");
    // The same process, with its only slot, still runs the next job.
    let next = insert_job(&db, "noop", json!({}), 5).await;
    db.wait_status(next, "completed", Duration::from_secs(20))
        .await;
    assert_eq!(w.child.try_wait().unwrap(), None, "the worker exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_final_and_transient_ones_give_up_after_max_attempts() {
    let db = shared().database(true).await;
    let _w = WorkerProcess::spawn(&db.url, &[]);
    let permanent = insert_job(&db, "noop", json!({"fail": "permanent"}), 5).await;
    let transient = insert_job(&db, "noop", json!({"fail": "transient"}), 2).await;
    db.wait_status(permanent, "error", Duration::from_secs(15))
        .await;
    db.wait_status(transient, "error", Duration::from_secs(15))
        .await;

    let p = row_json(&db.client, permanent).await;
    assert_eq!(p["attempt"], 1, "a permanent failure is not retried: {p:#}");
    assert_eq!(
        p["error_message"], "noop job asked to fail on attempt 1 (options.fail).",
        "{p:#}"
    );
    let errors = p["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{p:#}");
    assert_eq!(errors[0]["kind"], "permanent");
    assert_eq!(errors[0]["attempt"], 1);
    assert_eq!(errors[0]["message"], p["error_message"]);
    assert!(
        !p["finished_at"].is_null() && p["locked_by"].is_null(),
        "{p:#}"
    );

    let t = row_json(&db.client, transient).await;
    assert_eq!(t["attempt"], 2, "{t:#}");
    let message = t["error_message"].as_str().unwrap();
    assert!(message.starts_with("Gave up after 2 attempts"), "{message}");
    assert!(
        message.contains("noop job asked to fail on attempt 2 (options.fail)."),
        "the last error is quoted: {message}"
    );
    let errors = t["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{t:#}");
    for (i, e) in errors.iter().enumerate() {
        assert_eq!(e["kind"], "transient", "{e}");
        assert_eq!(e["attempt"], i + 1, "{e}");
    }
    assert!(
        !t["finished_at"].is_null() && t["locked_by"].is_null(),
        "{t:#}"
    );

    // Final means final: nothing runs them again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(db.status(permanent).await, "error");
    assert_eq!(row_json(&db.client, permanent).await["attempt"], 1);
    assert_eq!(db.status(transient).await, "error");
    assert_eq!(row_json(&db.client, transient).await["attempt"], 2);
}

// 3. Timeouts -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_timeout_is_stopped_and_frees_its_slot() {
    let _gate = timed().await;
    let db = shared().database(true).await;
    let w = WorkerProcess::spawn(
        &db.url,
        &[
            ("DOCWORKER__WORKER__JOB_TIMEOUT", "1s"),
            ("DOCWORKER__WORKER__CONCURRENCY", "1"),
        ],
    );
    let slow = insert_job(&db, "noop", json!({"sleep_ms": 60000}), 1).await;
    db.wait_status(slow, "processing", Duration::from_secs(15))
        .await;
    let behind = db.noop_job(json!({})).await;

    db.wait_status(slow, "error", Duration::from_secs(10)).await;
    let row = row_json(&db.client, slow).await;
    let message = row["error_message"].as_str().unwrap();
    assert!(message.contains("worker.job_timeout"), "{message}");
    assert!(message.starts_with("Gave up after 1 attempts"), "{message}");
    assert_eq!(row["errors"][0]["kind"], "transient", "{row:#}");
    let ran = epoch(&db, "finished_at", slow).await - epoch(&db, "started_at", slow).await;
    assert!(
        (0.9..4.0).contains(&ran),
        "the 60s body should have been stopped after the 1s timeout; it ran {ran:.3}s"
    );

    db.wait_status(behind, "completed", Duration::from_secs(5))
        .await;
    let gap = epoch(&db, "started_at", behind).await - epoch(&db, "finished_at", slow).await;
    assert!(
        gap < 1.5,
        "the job queued behind started {gap:.3}s after the timeout: the slot was not freed"
    );
    w.wait_log("job failed", Duration::from_secs(1)).await;
}

// 4. Cancelling from SQL ------------------------------------------------------------

/// Cancels a running 60s job twice (docworker_cancel, then a plain UPDATE)
/// and checks how soon the job queued behind each starts.
///
/// With `listen` the heartbeat runs every 5s (lease 20s), so only the cancel
/// NOTIFY can explain a stop within `limit`; without it the heartbeat (every
/// 500ms, FAST) is what catches the cancellation.
async fn cancel_stops_the_body(listen: bool, limit: f64) {
    let _gate = timed().await;
    let db = shared().database(true).await;
    let mut env = vec![("DOCWORKER__WORKER__CONCURRENCY", "1")];
    if listen {
        env.extend([
            ("DOCWORKER__WORKER__LISTEN", "true"),
            ("DOCWORKER__WORKER__HEARTBEAT_INTERVAL", "5s"),
            ("DOCWORKER__WORKER__LEASE_DURATION", "20s"),
        ]);
    } else {
        env.push(("DOCWORKER__WORKER__LISTEN", "false"));
    }
    let mut w = WorkerProcess::spawn(&db.url, &env);
    let first = db.noop_job(json!({"sleep_ms": 60000})).await;
    wait_row(
        &db.client,
        first,
        "sleeping",
        Duration::from_secs(15),
        |r| r["status"] == "processing" && r["stage"] == "sleeping",
    )
    .await;
    let second = db.noop_job(json!({"sleep_ms": 60000})).await;

    // docworker_cancel: the function operators use. The row is read in the
    // cancelling transaction, so any later write by the worker shows.
    db.client.batch_execute("BEGIN").await.unwrap();
    let r = db
        .client
        .query_one(
            "SELECT docworker_cancel($1), extract(epoch FROM now())::float8",
            &[&first],
        )
        .await
        .unwrap();
    let first_row = row_json(&db.client, first).await;
    db.client.batch_execute("COMMIT").await.unwrap();
    assert!(
        r.get::<_, bool>(0),
        "docworker_cancel found the running job"
    );
    let cancelled_at: f64 = r.get(1);
    let started = wait_row(
        &db.client,
        second,
        "started",
        Duration::from_secs(10),
        |r| r["status"] == "processing",
    )
    .await;
    let latency = epoch(&db, "started_at", second).await - cancelled_at;
    assert!(
        latency < limit,
        "listen={listen}: the next job started {latency:.3}s after docworker_cancel (limit {limit}s); {started:#}"
    );
    wait_row(
        &db.client,
        second,
        "sleeping",
        Duration::from_secs(5),
        |r| r["stage"] == "sleeping",
    )
    .await;
    let third = db.noop_job(json!({})).await;

    // A plain UPDATE, as an app would write it.
    let r = db
        .client
        .query_one(
            "UPDATE job_tasks t SET status = 'cancelled' WHERE id = $1
             RETURNING extract(epoch FROM now())::float8, to_jsonb(t)",
            &[&second],
        )
        .await
        .unwrap();
    let cancelled_at: f64 = r.get(0);
    let second_row: Value = r.get(1);
    db.wait_status(third, "completed", Duration::from_secs(10))
        .await;
    let latency = epoch(&db, "started_at", third).await - cancelled_at;
    assert!(
        latency < limit,
        "listen={listen}: the next job started {latency:.3}s after UPDATE ... 'cancelled' (limit {limit}s)"
    );

    // The worker writes nothing over a cancelled row, not even later.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        row_json(&db.client, first).await,
        first_row,
        "the cancelled row was written to"
    );
    assert_eq!(
        row_json(&db.client, second).await,
        second_row,
        "the cancelled row was written to"
    );
    assert_eq!(first_row["status"], "cancelled");
    assert_eq!(first_row["error_message"], "Cancelled by request.");
    assert_eq!(second_row["status"], "cancelled");
    assert_eq!(second_row["errors"], json!([]));
    assert_alive(&mut w);
    let logs = w.logs();
    assert!(
        logs.matches("job was cancelled; stopping it").count() >= 2
            && !logs.contains("no longer ours"),
        "both bodies should have been stopped as cancelled; log:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_cancel_stops_the_running_body_within_a_second() {
    cancel_stops_the_body(true, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_cancel_is_caught_by_the_heartbeat_in_poll_only_mode() {
    cancel_stops_the_body(false, 2.0).await;
}

// 5. Bad rows -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_end_in_error_with_a_clear_message_and_the_daemon_keeps_serving() {
    let db = shared().database(true).await;
    let mut w = WorkerProcess::spawn(&db.url, &[]);
    // (task_type, options, file_path, words the message must contain)
    let cases: &[(&str, Value, Option<&str>, &[&str])] = &[
        (
            "resize",
            json!({}),
            None,
            &["task_type", "\"resize\"", "ingest", "delete", "noop"],
        ),
        (
            "noop",
            json!([1, 2]),
            None,
            &["options", "JSON object", "an array"],
        ),
        (
            "noop",
            json!("fast"),
            None,
            &["options", "JSON object", "a string"],
        ),
        (
            "noop",
            json!({"sleep_ms": "soon"}),
            None,
            &["options.sleep_ms", "whole number", "\"soon\""],
        ),
        (
            "noop",
            json!({"sleep_ms": -5}),
            None,
            &["options.sleep_ms", "whole number", "-5"],
        ),
        (
            "noop",
            json!({"fail": "sometimes"}),
            None,
            &[
                "options.fail",
                "transient",
                "permanent",
                "panic",
                "sometimes",
            ],
        ),
        ("ingest", json!({}), None, &["ingest", "file_path"]),
        ("ingest", json!({}), Some("   "), &["ingest", "file_path"]),
    ];
    let mut ids = Vec::new();
    for (task_type, options, file_path, _) in cases {
        let id: Uuid = db
            .client
            .query_one(
                "INSERT INTO job_tasks (filename, task_type, options, file_path)
                 VALUES ('bad', $1, $2, $3) RETURNING id",
                &[task_type, options, file_path],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(id);
    }
    for ((task_type, options, file_path, words), id) in cases.iter().zip(&ids) {
        let what = format!("task_type={task_type} options={options} file_path={file_path:?}");
        let start = Instant::now();
        while db.status(*id).await != "error" {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{what}: not in error; row: {:#}",
                row_json(&db.client, *id).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let row = row_json(&db.client, *id).await;
        let message = row["error_message"].as_str().unwrap_or_default();
        for word in *words {
            assert!(
                message.contains(word),
                "{what}: the message should mention {word}: {message:?}"
            );
        }
        assert_eq!(
            row["attempt"], 1,
            "{what}: a bad row is not retried: {row:#}"
        );
        assert_eq!(row["errors"][0]["kind"], "permanent", "{what}: {row:#}");
        assert!(!row["finished_at"].is_null(), "{what}: {row:#}");
    }
    assert_alive(&mut w);
    let good = db.noop_job(json!({})).await;
    db.wait_status(good, "completed", Duration::from_secs(10))
        .await;
    assert_alive(&mut w);
}

// 6. The concurrency bound ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_never_holds_more_jobs_than_its_slots() {
    let _gate = timed().await;
    let db = shared().database(true).await;
    let ids = db.noop_jobs(15, json!({"sleep_ms": 300})).await;
    let w = WorkerProcess::spawn(&db.url, &[("DOCWORKER__WORKER__CONCURRENCY", "3")]);
    let mut max = 0i64;
    let mut samples = 0;
    let start = Instant::now();
    loop {
        let r = db
            .client
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'processing' AND locked_by IS NOT NULL),
                        count(*) FILTER (WHERE status = 'completed'),
                        count(DISTINCT locked_by)
                   FROM job_tasks",
                &[],
            )
            .await
            .unwrap();
        let (running, done, holders): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
        assert!(holders <= 1, "only one worker runs here");
        max = max.max(running);
        samples += 1;
        assert!(
            running <= 3,
            "{running} jobs were processing at once with concurrency 3 (sample {samples})"
        );
        if done == ids.len() as i64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(25),
            "jobs did not drain; {done} completed; log:\n{}",
            w.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        max, 3,
        "the worker should fill all 3 slots ({samples} samples)"
    );
    // Exactly, not by sampling: a claim (started_at, its transaction's now())
    // must come after the write that ended the job whose slot it took
    // (finished_at). So no job may start while 3 others are between their
    // started_at and finished_at.
    assert_eq!(
        max_overlap(&db).await,
        3,
        "a claim overlapped the unwritten outcomes of the jobs holding the slots"
    );
}

/// The largest number of jobs between started_at and finished_at at the
/// moment one of them started (itself included).
async fn max_overlap(db: &TestDb) -> i64 {
    db.count(
        "SELECT coalesce(max(n), 0) FROM (
             SELECT count(*) AS n FROM job_tasks a JOIN job_tasks b
                 ON b.started_at <= a.started_at AND a.started_at < b.finished_at
              GROUP BY a.id) x",
    )
    .await
}

// 7. Rows due later -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_due_later_wake_nobody_and_are_not_claimed_early() {
    let _gate = timed().await;
    let db = shared().database(true).await;
    let mut listener = Listener::start(&db.url, "docworker_jobs").await;

    // Not due: no wake-up, whether inserted directly or through the batch API.
    db.client
        .execute(
            "INSERT INTO job_tasks (filename, task_type, run_at)
             VALUES ('later', 'noop', now() + interval '2 seconds')",
            &[],
        )
        .await
        .unwrap();
    db.client
        .query(
            "SELECT * FROM docworker_enqueue_batch(jsonb_build_array(jsonb_build_object(
                 'filename', 'later', 'task_type', 'noop', 'run_at', now() + interval '2 seconds')))",
            &[],
        )
        .await
        .unwrap();
    if let Some(n) = listener.next(Duration::from_millis(500)).await {
        panic!("a row due in 2s sent a notification: {:?}", n.channel());
    }

    // Due now: a wake-up.
    db.noop_job(json!({})).await;
    let n = listener
        .next(Duration::from_secs(5))
        .await
        .expect("a due row sends a notification");
    assert_eq!(n.channel(), "docworker_jobs");

    // A worker does not start a row before its run_at, and does start it after.
    let w = WorkerProcess::spawn(&db.url, &[]);
    w.wait_log("ready", Duration::from_secs(15)).await;
    let later: Uuid = db
        .client
        .query_one(
            "INSERT INTO job_tasks (filename, task_type, run_at)
             VALUES ('later', 'noop', now() + interval '2 seconds') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let start = Instant::now();
    let mut samples_before = 0;
    loop {
        let r = db
            .client
            .query_one(
                "SELECT status::text, now() < run_at FROM job_tasks WHERE id = $1",
                &[&later],
            )
            .await
            .unwrap();
        let (status, early): (String, bool) = (r.get(0), r.get(1));
        if early {
            samples_before += 1;
            assert_eq!(status, "pending", "the row was taken before its run_at");
        }
        if status == "completed" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the row due in 2s was not completed; row: {:#}",
            row_json(&db.client, later).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        samples_before > 10,
        "the test should have watched the row before it was due"
    );
    db.wait_count(
        "SELECT count(*) FROM job_tasks WHERE status = 'completed'",
        4,
        Duration::from_secs(10),
    )
    .await;
    let rows = db
        .client
        .query(
            "SELECT id, started_at >= run_at, finished_at >= run_at,
                    extract(epoch FROM started_at - run_at)::float8
               FROM job_tasks WHERE filename = 'later' OR id = $1",
            &[&later],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let id: Uuid = r.get(0);
        let started_after: Option<bool> = r.get(1);
        let finished_after: Option<bool> = r.get(2);
        assert_eq!(
            started_after,
            Some(true),
            "job {id} was started before its run_at"
        );
        assert_eq!(
            finished_after,
            Some(true),
            "job {id} was finished before its run_at"
        );
        if id == later {
            let late: f64 = r.get(3);
            assert!(
                late < 3.0,
                "the row was started {late:.3}s after its run_at (poll is 1s)"
            );
        }
    }
}

// 8. Priority -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_priority_values_run_first_then_earlier_run_at() {
    let db = shared().database(true).await;
    // (name, priority, run_at offset in seconds), in insertion order.
    let jobs: &[(&str, i16, f64)] = &[
        ("p5", 5, 0.0),
        ("p0-now", 0, 0.0),
        ("p-1", -1, 0.0),
        ("p0-earlier", 0, -60.0),
        ("p5-earlier", 5, -120.0),
    ];
    for (name, priority, offset) in jobs {
        db.client
            .execute(
                "INSERT INTO job_tasks (filename, task_type, priority, run_at, options)
                 VALUES ($1, 'noop', $2, now() + make_interval(secs => $3), '{\"sleep_ms\": 50}')",
                &[name, priority, offset],
            )
            .await
            .unwrap();
    }
    let _w = WorkerProcess::spawn(&db.url, &[("DOCWORKER__WORKER__CONCURRENCY", "1")]);
    db.wait_count(
        "SELECT count(*) FROM job_tasks WHERE status = 'completed'",
        jobs.len() as i64,
        Duration::from_secs(15),
    )
    .await;
    let order: Vec<String> = db
        .client
        .query(
            "SELECT filename::text FROM job_tasks ORDER BY started_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(order, ["p-1", "p0-earlier", "p0-now", "p5-earlier", "p5"]);
    // One at a time: each was claimed after the previous one's outcome was written.
    assert_eq!(
        max_overlap(&db).await,
        1,
        "concurrency 1 held two jobs at once"
    );
}

// 9. Pruning ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_finished_rows_and_batches_are_pruned_and_the_rest_kept() {
    let db = shared().database(true).await;
    db.client
        .batch_execute(
            "-- Old and finished, no batch: pruned.
             INSERT INTO job_tasks (filename, task_type, status, finished_at)
             VALUES ('prune', 'noop', 'completed', now() - interval '2 hours'),
                    ('prune', 'noop', 'error',     now() - interval '2 hours'),
                    ('prune', 'noop', 'cancelled', now() - interval '2 hours');
             -- A batch that finished long ago: its tasks and then itself are pruned.
             INSERT INTO job_batches (id, total_tasks, completed_tasks, status, finished_at)
             VALUES ('00000000-0000-0000-0000-00000000000a', 2, 2, 'completed', now() - interval '2 hours');
             INSERT INTO job_tasks (filename, task_type, status, finished_at, batch_id)
             VALUES ('prune', 'noop', 'completed', now() - interval '3 hours', '00000000-0000-0000-0000-00000000000a'),
                    ('prune', 'noop', 'completed', now() - interval '2 hours', '00000000-0000-0000-0000-00000000000a');
             -- An old empty finished batch: pruned.
             INSERT INTO job_batches (id, total_tasks, status, finished_at)
             VALUES ('00000000-0000-0000-0000-00000000000b', 0, 'completed', now() - interval '2 hours');
             -- A batch that finished recently: its old tasks are kept with it.
             INSERT INTO job_batches (id, total_tasks, completed_tasks, status, finished_at)
             VALUES ('00000000-0000-0000-0000-00000000000c', 1, 1, 'completed', now() - interval '10 minutes');
             INSERT INTO job_tasks (filename, task_type, status, finished_at, batch_id)
             VALUES ('keep', 'noop', 'completed', now() - interval '2 hours', '00000000-0000-0000-0000-00000000000c');
             -- A batch still running: its old finished task is kept.
             INSERT INTO job_batches (id, total_tasks, completed_tasks, status)
             VALUES ('00000000-0000-0000-0000-00000000000d', 2, 1, 'pending');
             INSERT INTO job_tasks (filename, task_type, status, finished_at, batch_id, run_at)
             VALUES ('keep', 'noop', 'completed', now() - interval '2 hours', '00000000-0000-0000-0000-00000000000d', now()),
                    ('keep', 'noop', 'pending', NULL, '00000000-0000-0000-0000-00000000000d', now() + interval '1 day');
             -- Recent finished rows and pending rows: kept.
             INSERT INTO job_tasks (filename, task_type, status, finished_at, run_at)
             VALUES ('keep', 'noop', 'completed', now() - interval '10 minutes', now()),
                    ('keep', 'noop', 'error',     now() - interval '59 minutes', now()),
                    ('keep', 'noop', 'pending',   NULL, now() + interval '1 day'),
                    ('keep', 'noop', 'pending',   NULL, now() + interval '1 day');",
        )
        .await
        .unwrap();
    let keep_before = db
        .count("SELECT count(*) FROM job_tasks WHERE filename = 'keep'")
        .await;
    assert_eq!(keep_before, 7);

    let w = WorkerProcess::spawn(&db.url, &[("DOCWORKER__MAINTENANCE__RETENTION", "1h")]);
    db.wait_count(
        "SELECT count(*) FROM job_tasks WHERE filename = 'prune'",
        0,
        Duration::from_secs(15),
    )
    .await;
    db.wait_count(
        "SELECT count(*) FROM job_batches
          WHERE id IN ('00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-00000000000b')",
        0,
        Duration::from_secs(10),
    )
    .await;
    // A few more sweeps (500ms apart) change nothing else.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        db.count("SELECT count(*) FROM job_tasks WHERE filename = 'keep'")
            .await,
        keep_before,
        "rows that must be kept were pruned; log:\n{}",
        w.logs()
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM job_batches
              WHERE id IN ('00000000-0000-0000-0000-00000000000c', '00000000-0000-0000-0000-00000000000d')"
        )
        .await,
        2,
        "batches that must be kept were pruned"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM job_tasks WHERE status = 'pending'")
            .await,
        3,
        "pending rows are never pruned"
    );
    w.wait_log("pruned finished jobs", Duration::from_secs(1))
        .await;
}

// 10. Progress fields ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_shows_its_stage_and_times() {
    let db = shared().database(true).await;
    let id = db.noop_job(json!({"sleep_ms": 1500})).await;
    let before = row_json(&db.client, id).await;
    assert_eq!(before["status"], "pending");
    for field in [
        "started_at",
        "finished_at",
        "stage",
        "locked_by",
        "heartbeat_at",
    ] {
        assert!(
            before[field].is_null(),
            "{field} is set before any claim: {before:#}"
        );
    }

    let _w = WorkerProcess::spawn(&db.url, &[]);
    let running = wait_row(&db.client, id, "sleeping", Duration::from_secs(15), |r| {
        r["status"] == "processing" && r["stage"] == "sleeping"
    })
    .await;
    assert!(!running["started_at"].is_null(), "{running:#}");
    assert!(running["finished_at"].is_null(), "{running:#}");
    assert!(!running["locked_by"].is_null(), "{running:#}");
    assert!(!running["heartbeat_at"].is_null(), "{running:#}");
    assert_eq!(running["attempt"], 1);
    let started_while_running = epoch(&db, "started_at", id).await;

    db.wait_status(id, "completed", Duration::from_secs(10))
        .await;
    let done = row_json(&db.client, id).await;
    assert_eq!(done["stage"], "done", "{done:#}");
    assert!(
        done["locked_by"].is_null() && done["locked_until"].is_null(),
        "{done:#}"
    );
    let started = epoch(&db, "started_at", id).await;
    assert_eq!(
        started, started_while_running,
        "started_at is set once, at the claim"
    );
    let ran = epoch(&db, "finished_at", id).await - started;
    assert!(
        (1.5..5.0).contains(&ran),
        "finished_at - started_at = {ran:.3}s for a 1.5s body"
    );
    let created = epoch(&db, "created_at", id).await;
    assert!(started >= created);
}
