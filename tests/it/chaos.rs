//! Chaos: workers killed, paused and stopped mid-job, connections cut, the
//! server restarted. Every test checks the rows (and an audit trail of every
//! status change) rather than the workers' own account of what happened.

use std::future::Future;
use std::time::{Duration, Instant};

use docworker::queue::completer::{Finished, Outcome};
use docworker::queue::job::{Attempt, JobError};
use docworker::queue::running::{StopReason, StopSignal};
use docworker::queue::JobContext;
use docworker::store::{Stage, Written};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{
    self, connect, exclusive, shared, timed, ActingWorker, Cluster, TestDb, WorkerProcess,
};
use crate::support::{install_audit, row_json, wait_row};

// Helpers --------------------------------------------------------------------

/// The audit trail of one job: (old status, new status, attempt, worker).
async fn audit_of(db: &TestDb, id: Uuid) -> Vec<(Option<String>, String, i32, Option<String>)> {
    db.client
        .query(
            "SELECT old_status, new_status, attempt, worker FROM job_audit WHERE id = $1 ORDER BY seq",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// The whole row as JSON text, minus the columns listed.
async fn snapshot(db: &TestDb, id: Uuid, minus: &[&str]) -> String {
    let mut expr = "to_jsonb(t)".to_string();
    for col in minus {
        expr.push_str(&format!(" - '{col}'"));
    }
    db.client
        .query_one(
            &format!("SELECT ({expr})::text FROM job_tasks t WHERE id = $1"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

/// Polls `probe` until it yields a value, or panics after `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("waited {timeout:?} for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `worker` runs attempt 1 of job `id` and `cond` (SQL over
/// `job_tasks t`) holds; returns that worker's id.
async fn wait_first_attempt_on(
    db: &TestDb,
    id: Uuid,
    worker: &WorkerProcess,
    stage: Option<&str>,
) -> String {
    let row = wait_row(&db.client, id, "running", Duration::from_secs(20), |r| {
        r["status"] == "processing"
            && !r["locked_by"].is_null()
            && stage.is_none_or(|s| r["stage"] == s)
    })
    .await;
    let (_, attempt, holder) = held(&row);
    let holder = holder.unwrap();
    assert_eq!(
        (attempt, pid_in(&holder)),
        (1, worker.pid()),
        "not attempt 1 on the expected worker ({holder})"
    );
    holder
}

/// (status, attempt, locked_by) of a row read by `row_json`.
fn held(row: &Value) -> (String, i32, Option<String>) {
    (
        row["status"].as_str().unwrap().to_owned(),
        row["attempt"].as_i64().unwrap() as i32,
        row["locked_by"].as_str().map(str::to_owned),
    )
}

/// The pid inside a worker id (`{host}-{pid}-{hex}`).
fn pid_in(worker_id: &str) -> u32 {
    let mut parts = worker_id.rsplitn(3, '-');
    let _suffix = parts.next();
    parts
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("worker id {worker_id:?} is not host-pid-suffix"))
}

/// Backend pids of this database's LISTEN connections.
async fn listener_pids(db: &TestDb) -> Vec<i32> {
    db.client
        .query(
            "SELECT pid FROM pg_stat_activity
              WHERE datname = current_database() AND application_name LIKE 'docworker-listener%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits for exactly one listener backend whose pid is not in `not`.
async fn wait_new_listener(db: &TestDb, not: &[i32], timeout: Duration) -> i32 {
    eventually("a new LISTEN connection", timeout, || async {
        match listener_pids(db).await.as_slice() {
            [pid] if !not.contains(pid) => Some(*pid),
            _ => None,
        }
    })
    .await
}

async fn wait_log_count(w: &WorkerProcess, needle: &str, n: usize, timeout: Duration) {
    let start = Instant::now();
    while w.logs().matches(needle).count() < n {
        if start.elapsed() > timeout {
            panic!(
                "worker never logged {needle:?} {n} times within {timeout:?}; log:\n{}",
                w.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts of jobs by status.
async fn status_counts(db: &TestDb) -> Vec<(String, i64)> {
    db.client
        .query(
            "SELECT status::text, count(*) FROM job_tasks GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until `total` jobs are completed; fails at once if one ends in `error`.
async fn wait_all_completed(db: &TestDb, total: i64, timeout: Duration) {
    let start = Instant::now();
    loop {
        let counts = status_counts(db).await;
        let get = |s: &str| counts.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
        assert_eq!(get("error"), 0, "jobs failed: {counts:?}");
        if get("completed") == total {
            return;
        }
        if start.elapsed() > timeout {
            panic!("waited {timeout:?} for {total} completed jobs; statuses: {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn started_at(db: &TestDb) -> String {
    db.client
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .unwrap()
        .get(0)
}

fn finished(id: Uuid, attempt: i32, outcome: Outcome) -> Finished {
    Finished::new(Attempt { id, attempt }, outcome)
}

/// `set_stage` as (id, attempt, worker): Err, and its stop signal says LeaseLost.
async fn assert_stage_write_fenced(
    pool: &deadpool_postgres::Pool,
    id: Uuid,
    attempt: i32,
    worker: &str,
) {
    let stop = StopSignal::default();
    let ctx = JobContext::new(
        pool.clone(),
        worker.into(),
        Attempt { id, attempt },
        stop.clone(),
        Default::default(),
        Duration::from_secs(30),
    );
    let result = ctx.set_stage(Stage::Parsing).await;
    assert!(
        result.is_err(),
        "a progress write as ({id}, attempt {attempt}, {worker}) was accepted"
    );
    assert_eq!(stop.reason(), Some(StopReason::LeaseLost));
}

/// What a worker logs when it learns that a job it ran is no longer its own.
const NOT_OURS: &[&str] = &[
    "job is no longer ours",
    "its lease could not be renewed in time",
    "job stopped; not ours to record",
    "outcome not recorded",
];

// Tests ----------------------------------------------------------------------

/// Three workers drain 3,000 jobs: each job is claimed once, completed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_claim_and_complete_every_job_exactly_once() {
    const JOBS: i64 = 3_000;
    let _gate = exclusive().await;
    let db = shared().database(true).await;
    install_audit(&db.client).await;
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::spawn(&db.url, &[("DOCWORKER__WORKER__CONCURRENCY", "8")]))
        .collect();
    for w in &workers {
        w.wait_log("listening for job notifications", Duration::from_secs(30))
            .await;
    }
    let pids: Vec<u32> = workers.iter().map(|w| w.pid()).collect();

    // Two thirds sleep 0-3 ms (and write a stage), so runs overlap.
    let started = Instant::now();
    db.client
        .execute(
            "INSERT INTO job_tasks (filename, task_type, options)
             SELECT 'chaos-' || g, 'noop',
                    CASE WHEN g % 3 = 0 THEN '{}'::jsonb
                         ELSE jsonb_build_object('sleep_ms', floor(random() * 4)::int) END
               FROM generate_series(1, $1::int) g",
            &[&(JOBS as i32)],
        )
        .await
        .unwrap();
    wait_all_completed(&db, JOBS, Duration::from_secs(150)).await;
    let drained_in = started.elapsed();

    // Stop every writer before judging: nothing can change the rows after this.
    for w in &workers {
        w.signal("TERM");
    }
    for w in &mut workers {
        assert_eq!(
            w.wait_exit(Duration::from_secs(20)),
            Some(0),
            "log:\n{}",
            w.logs()
        );
    }

    let clean = db
        .count(
            "SELECT count(*) FROM job_tasks WHERE status = 'completed' AND attempt = 1
                AND errors = '[]' AND locked_by IS NULL AND locked_until IS NULL
                AND finished_at IS NOT NULL AND stage = 'done'",
        )
        .await;
    assert_eq!(clean, JOBS, "statuses: {:?}", status_counts(&db).await);

    // Exactly one claim per job, all of attempt 1.
    let claims = db
        .count("SELECT count(*) FROM job_audit WHERE new_status = 'processing'")
        .await;
    let claimed_jobs = db
        .count("SELECT count(DISTINCT id) FROM job_audit WHERE new_status = 'processing'")
        .await;
    let max_claims = db
        .count(
            "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM job_audit
              WHERE new_status = 'processing' GROUP BY id) c",
        )
        .await;
    let not_first = db
        .count("SELECT count(*) FROM job_audit WHERE new_status = 'processing' AND attempt <> 1")
        .await;
    assert_eq!(
        (claims, claimed_jobs, max_claims, not_first),
        (JOBS, JOBS, 1, 0)
    );

    // Exactly one completion per job, by the worker that claimed it, after the
    // claim; and nothing else ever happened to any row (no hand-back, no rescue).
    let total_events = db.count("SELECT count(*) FROM job_audit").await;
    assert_eq!(total_events, 2 * JOBS, "unexpected status changes");
    let well_formed = db
        .count(
            "SELECT count(*) FROM job_audit c JOIN job_audit d ON d.id = c.id
              WHERE c.old_status = 'pending' AND c.new_status = 'processing'
                AND d.old_status = 'processing' AND d.new_status = 'completed'
                AND d.seq > c.seq AND d.at >= c.at AND d.worker = c.worker AND d.attempt = 1",
        )
        .await;
    assert_eq!(well_formed, JOBS);

    // The work was shared, and only by our three processes.
    let per_worker: Vec<(String, i64)> = db
        .client
        .query(
            "SELECT worker, count(*) FROM job_audit WHERE new_status = 'processing'
              GROUP BY worker ORDER BY 2 DESC",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    eprintln!("3 workers drained {JOBS} jobs in {drained_in:?}: {per_worker:?}");
    for (worker, _) in &per_worker {
        assert!(
            pids.contains(&pid_in(worker)),
            "{worker} is not one of {pids:?}"
        );
    }
    assert!(
        per_worker.len() > 1,
        "one worker did all the work: {per_worker:?}"
    );
}

/// A SIGKILLed worker's job is rescued after its lease and run again
/// elsewhere; the dead worker's late writes are refused by the fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_job_is_rescued_and_its_late_writes_are_fenced() {
    let db = shared().database(true).await;
    install_audit(&db.client).await;
    let mut a = WorkerProcess::spawn(&db.url, &[]);
    let id = db.noop_job(json!({"sleep_ms": 5000})).await;

    let a_id = wait_first_attempt_on(&db, id, &a, None).await;
    a.signal("KILL");
    assert_eq!(
        a.wait_exit(Duration::from_secs(10)),
        None,
        "A was not killed by the signal"
    );
    assert_eq!(
        db.status(id).await,
        "processing",
        "a dead worker's job changed by itself"
    );

    let b = WorkerProcess::spawn(&db.url, &[]);
    let row = wait_row(
        &db.client,
        id,
        "attempt 2 sleeping",
        Duration::from_secs(30),
        |r| r["status"] == "processing" && r["attempt"] == 2 && r["stage"] == "sleeping",
    )
    .await;
    let (_, _, b_id) = held(&row);
    let b_id = b_id.unwrap();
    assert_eq!(pid_in(&b_id), b.pid(), "attempt 2 was not claimed by B");

    // While B runs attempt 2, A's late writes (A's attempt, or B's attempt
    // under A's name) change nothing. B's heartbeat renews the lease meanwhile.
    let pool = harness::pool(&db.url);
    let late = ActingWorker::new(&db.url, &a_id);
    let before = snapshot(&db, id, &["locked_until", "heartbeat_at"]).await;
    for (attempt, outcome) in [
        (1, Outcome::Completed),
        (1, Outcome::Failed(JobError::permanent("late failure"))),
        (1, Outcome::HandBack),
        (2, Outcome::Completed),
    ] {
        let written = late.record(finished(id, attempt, outcome.clone())).await;
        assert_eq!(
            written,
            Some(Written::Rejected),
            "A's late {outcome:?} for attempt {attempt} was not refused"
        );
    }
    assert_stage_write_fenced(&pool, id, 1, &a_id).await;
    assert_stage_write_fenced(&pool, id, 2, &a_id).await;
    assert_stage_write_fenced(&pool, id, 1, &b_id).await;
    // Each part of the fence counts: B's own name with a stale attempt is refused too.
    let stale = ActingWorker::new(&db.url, &b_id);
    let written = stale.record(finished(id, 1, Outcome::Completed)).await;
    assert_eq!(
        written,
        Some(Written::Rejected),
        "a stale attempt was recorded"
    );
    let after = snapshot(&db, id, &["locked_until", "heartbeat_at"]).await;
    assert_eq!(
        before, after,
        "a fenced write changed the running job's row"
    );
    let (status, attempt, holder) = held(&row_json(&db.client, id).await);
    assert_eq!(
        (status.as_str(), attempt, holder.as_deref()),
        ("processing", 2, Some(b_id.as_str()))
    );

    // The same kind of write as the true owner does land (so the refusals
    // above come from the fence, not from a broken pool).
    let ctx = JobContext::new(
        pool.clone(),
        b_id.as_str().into(),
        Attempt { id, attempt: 2 },
        StopSignal::default(),
        Default::default(),
        Duration::from_secs(30),
    );
    ctx.set_stage(Stage::Storing).await.unwrap();
    let stage: String = db
        .client
        .query_one("SELECT stage FROM job_tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stage, "storing");

    db.wait_status(id, "completed", Duration::from_secs(30))
        .await;
    let row = db
        .client
        .query_one(
            "SELECT attempt, jsonb_array_length(errors), errors->0->>'kind', errors->0->>'worker',
                    (errors->0->>'attempt')::int, locked_by
               FROM job_tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(row.get::<_, i32>(1), 1, "expected exactly one error entry");
    assert_eq!(
        row.get::<_, Option<String>>(2).as_deref(),
        Some("lease_expired")
    );
    assert_eq!(
        row.get::<_, Option<String>>(3).as_deref(),
        Some(a_id.as_str())
    );
    assert_eq!(row.get::<_, Option<i32>>(4), Some(1));
    assert_eq!(row.get::<_, Option<String>>(5), None);

    // Claimed by A, put back by the sweep only once A's lease had run out,
    // claimed by B, completed by B.
    let trail = audit_of(&db, id).await;
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        trail,
        vec![
            (s("pending"), "processing".into(), 1, s(&a_id)),
            (s("processing"), "pending".into(), 1, s(&a_id)),
            (s("pending"), "processing".into(), 2, s(&b_id)),
            (s("processing"), "completed".into(), 2, s(&b_id)),
        ]
    );
    let rescued_late = db
        .count("SELECT count(*) FROM job_audit WHERE new_status = 'pending' AND at > old_lease")
        .await;
    assert_eq!(
        rescued_late, 1,
        "the job was taken from A before its lease expired"
    );

    // After completion A's late outcome is still refused and changes nothing.
    let before = snapshot(&db, id, &[]).await;
    let written = late.record(finished(id, 1, Outcome::Completed)).await;
    assert_eq!(written, Some(Written::Rejected));
    assert_stage_write_fenced(&pool, id, 1, &a_id).await;
    assert_eq!(snapshot(&db, id, &[]).await, before);
}

/// A SIGKILLed worker's job with no attempts left is not run again: once
/// its lease expires the sweep (on another worker) ends it in `error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_with_no_attempts_left_ends_in_error() {
    let db = shared().database(true).await;
    install_audit(&db.client).await;
    let mut a = WorkerProcess::spawn(&db.url, &[]);
    let id: Uuid = db
        .client
        .query_one(
            "INSERT INTO job_tasks (filename, task_type, options, max_attempts)
             VALUES ('last-chance', 'noop', '{\"sleep_ms\": 60000}', 1) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let a_id = wait_first_attempt_on(&db, id, &a, Some("sleeping")).await;
    a.signal("KILL");
    assert_eq!(
        a.wait_exit(Duration::from_secs(10)),
        None,
        "A was not killed by the signal"
    );

    let b = WorkerProcess::spawn(&db.url, &[]);
    b.wait_log("ready", Duration::from_secs(15)).await;
    wait_row(&db.client, id, "error", Duration::from_secs(30), |r| {
        r["status"] == "error"
    })
    .await;
    b.wait_log(
        "reclaimed a job whose lease expired",
        Duration::from_secs(5),
    )
    .await;
    // Give B time to run it again if it were going to (polls every 1s).
    tokio::time::sleep(Duration::from_secs(3)).await;

    let row = db
        .client
        .query_one(
            "SELECT status::text, attempt, error_message, jsonb_array_length(errors),
                    errors->0->>'kind', (errors->0->>'attempt')::int, errors->0->>'worker',
                    locked_by, locked_until IS NULL, finished_at IS NOT NULL
               FROM job_tasks WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "error");
    assert_eq!(row.get::<_, i32>(1), 1, "the job ran again");
    let message: String = row.get(2);
    assert!(message.starts_with("Gave up after 1 attempts"), "{message}");
    assert_eq!(row.get::<_, i32>(3), 1, "expected exactly one error entry");
    assert_eq!(
        row.get::<_, Option<String>>(4).as_deref(),
        Some("lease_expired")
    );
    assert_eq!(row.get::<_, Option<i32>>(5), Some(1));
    assert_eq!(
        row.get::<_, Option<String>>(6).as_deref(),
        Some(a_id.as_str())
    );
    assert_eq!(row.get::<_, Option<String>>(7), None);
    assert!(row.get::<_, bool>(8), "the lease is still set");
    assert!(row.get::<_, bool>(9), "finished_at is not set");
    // Claimed once by A, failed by the sweep after A's lease ran out; nothing else.
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        audit_of(&db, id).await,
        vec![
            (s("pending"), "processing".into(), 1, s(&a_id)),
            (s("processing"), "error".into(), 1, s(&a_id)),
        ]
    );
    assert_eq!(
        db.count("SELECT count(*) FROM job_audit WHERE new_status = 'error' AND at > old_lease")
            .await,
        1,
        "the job was failed before A's lease expired"
    );
}

/// A worker paused (SIGSTOP) past its lease wakes up to find its job taken
/// over and finished; its late write is refused and it shuts down cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_worker_late_write_is_refused() {
    let db = shared().database(true).await;
    install_audit(&db.client).await;
    let mut a = WorkerProcess::spawn(&db.url, &[]);
    let id = db.noop_job(json!({"sleep_ms": 4000})).await;
    // Paused inside the body's sleep, so that on waking the body has finished
    // and A tries to record its outcome.
    let a_id = wait_first_attempt_on(&db, id, &a, Some("sleeping")).await;
    a.signal("STOP");

    let b = WorkerProcess::spawn(&db.url, &[]);
    let row = wait_row(
        &db.client,
        id,
        "attempt 2 running",
        Duration::from_secs(30),
        |r| r["status"] == "processing" && r["attempt"] == 2,
    )
    .await;
    let (_, _, b_id) = held(&row);
    let b_id = b_id.unwrap();
    assert_eq!(pid_in(&b_id), b.pid());
    db.wait_status(id, "completed", Duration::from_secs(30))
        .await;
    let before = snapshot(&db, id, &[]).await;
    assert!(
        !NOT_OURS.iter().any(|m| a.logs().contains(m)),
        "A logged while stopped?\n{}",
        a.logs()
    );

    // A wakes with its body's sleep long over and its lease long gone.
    a.signal("CONT");
    eventually("A's body to end", Duration::from_secs(20), || async {
        let logs = a.logs();
        (logs.contains("job completed") || logs.contains("not ours to record")).then_some(())
    })
    .await;
    // Give anything else A might still write time to land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        snapshot(&db, id, &[]).await,
        before,
        "A's late write changed the row"
    );
    let s = |x: &str| Some(x.to_string());
    assert_eq!(
        audit_of(&db, id).await,
        vec![
            (s("pending"), "processing".into(), 1, s(&a_id)),
            (s("processing"), "pending".into(), 1, s(&a_id)),
            (s("pending"), "processing".into(), 2, s(&b_id)),
            (s("processing"), "completed".into(), 2, s(&b_id)),
        ]
    );
    let (status, attempt, _) = held(&row_json(&db.client, id).await);
    assert_eq!((status.as_str(), attempt), ("completed", 2));
    // A learnt that the job was not its own: either its body ended first
    // and the fence refused the outcome, or its heartbeat ran first after
    // SIGCONT and stopped the body before it ended (which of the two timers
    // tokio runs first is not ordered). Either way the row is untouched,
    // as checked above.
    let logs = a.logs();
    let noticed: Vec<&str> = NOT_OURS
        .iter()
        .copied()
        .filter(|m| logs.contains(m))
        .collect();
    eprintln!("paused worker logged: {noticed:?}");
    assert!(
        logs.contains("outcome not recorded") || logs.contains("not ours to record"),
        "A never learnt that the job was not its own:\n{logs}"
    );

    a.signal("TERM");
    assert_eq!(
        a.wait_exit(Duration::from_secs(15)),
        Some(0),
        "log:\n{}",
        a.logs()
    );
}

/// The LISTEN connection is killed twice: the worker reconnects, looks for
/// work at once, and notifications work again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_listen_connection_is_reestablished_and_refetches() {
    const KILL_SQL: &str = "SELECT pg_terminate_backend($1, 10000)";
    // With a 30s poll (at least 22.5s with jitter) only a NOTIFY or the
    // re-fetch after reconnecting can start a job within seconds.
    let quick = Duration::from_secs(8);
    let _gate = timed().await;
    let db = shared().database(true).await;
    let w = WorkerProcess::spawn(&db.url, &[("DOCWORKER__WORKER__POLL_INTERVAL", "30s")]);
    w.wait_log("listening for job notifications", Duration::from_secs(30))
        .await;
    let first = wait_new_listener(&db, &[], Duration::from_secs(10)).await;

    // Baseline: a notification starts a job at once.
    let job = db.noop_job(json!({})).await;
    let took = db
        .wait_status(job, "completed", Duration::from_secs(10))
        .await;
    assert!(
        took < Duration::from_secs(5),
        "baseline pickup took {took:?} (the poll is 30s)"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A job inserted without any NOTIFY (triggers off) is not noticed...
    let silent = Uuid::new_v4();
    db.client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica;
             INSERT INTO job_tasks (id, filename, task_type) VALUES ('{silent}', 'silent', 'noop');
             COMMIT;"
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        db.status(silent).await,
        "pending",
        "something but a reconnect started the job"
    );

    // ...until the LISTEN connection dies: the reconnect looks at once.
    let killed: bool = db
        .client
        .query_one(KILL_SQL, &[&first])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    let t0 = Instant::now();
    db.wait_status(silent, "completed", Duration::from_secs(20))
        .await;
    let took = t0.elapsed();
    assert!(took < quick, "re-fetch after reconnect took {took:?}");
    let second = wait_new_listener(&db, &[first], Duration::from_secs(10)).await;
    wait_log_count(
        &w,
        "listening for job notifications",
        2,
        Duration::from_secs(10),
    )
    .await;

    // Killed again, with a job inserted right after (its NOTIFY is lost).
    let killed: bool = db
        .client
        .query_one(KILL_SQL, &[&second])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    let t0 = Instant::now();
    let job = db.noop_job(json!({})).await;
    db.wait_status(job, "completed", Duration::from_secs(20))
        .await;
    let took = t0.elapsed();
    assert!(took < quick, "pickup after the second kill took {took:?}");
    let third = wait_new_listener(&db, &[first, second], Duration::from_secs(10)).await;
    wait_log_count(
        &w,
        "listening for job notifications",
        3,
        Duration::from_secs(10),
    )
    .await;
    assert!(w.logs().contains("LISTEN connection lost"), "{}", w.logs());

    // Notifications work on the new connection: one job at a time, each quick.
    for i in 0..5 {
        let job = db.noop_job(json!({})).await;
        let took = db
            .wait_status(job, "completed", Duration::from_secs(20))
            .await;
        assert!(
            took < Duration::from_secs(5),
            "job {i} after reconnecting took {took:?} (the poll is 30s)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listener_pids(&db).await, vec![third]);
}

/// PostgreSQL restarts under a running daemon, once quickly and once with
/// the database unreachable for longer than a lease: no job is lost or stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart_loses_no_jobs() {
    const FIRST: i64 = 400;
    const SECOND: i64 = 200;
    const LAST: i64 = 100;
    const LONG: i64 = 2;
    let cluster = Cluster::start_throwaway(false);
    let mut db = cluster.database(true).await;
    let dbname: String = db
        .client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let insert = "INSERT INTO job_tasks (filename, task_type, options)
                  SELECT 'restart-' || g, 'noop', jsonb_build_object('sleep_ms', floor(random() * 40)::int)
                    FROM generate_series(1, $1::int) g";
    db.client.execute(insert, &[&(FIRST as i32)]).await.unwrap();
    let mut w = WorkerProcess::spawn(&db.url, &[("DOCWORKER__WORKER__CONCURRENCY", "4")]);

    // 1. A plain restart while the queue drains.
    db.wait_count(
        "SELECT least(count(*), 40) FROM job_tasks WHERE status = 'completed'",
        40,
        Duration::from_secs(30),
    )
    .await;
    let first_start = started_at(&db).await;
    let unfinished = db
        .count("SELECT count(*) FROM job_tasks WHERE status <> 'completed'")
        .await;
    assert!(
        unfinished > 0,
        "the queue drained before the restart; make the jobs longer"
    );
    tokio::task::block_in_place(|| cluster.restart());
    db.client = connect(&db.url).await;
    let second_start = started_at(&db).await;
    assert_ne!(second_start, first_start, "the server did not restart");
    eprintln!("restarted PostgreSQL with {unfinished} of {FIRST} jobs unfinished");

    // 2. A restart after which the database stays unreachable for longer
    // than a lease (3s), while two long jobs run: their leases run out.
    db.client
        .execute(
            "INSERT INTO job_tasks (filename, task_type, options, priority)
             SELECT 'long-' || g, 'noop', '{\"sleep_ms\": 6000}', -1 FROM generate_series(1, $1::int) g",
            &[&(LONG as i32)],
        )
        .await
        .unwrap();
    db.client
        .execute(insert, &[&(SECOND as i32)])
        .await
        .unwrap();
    db.wait_count(
        "SELECT count(*) FROM job_tasks WHERE priority = -1 AND status = 'processing' AND stage = 'sleeping'",
        LONG,
        Duration::from_secs(30),
    )
    .await;
    let admin = connect(cluster.admin_url()).await;
    admin
        .batch_execute(&format!("ALTER DATABASE {dbname} ALLOW_CONNECTIONS false"))
        .await
        .unwrap();
    tokio::task::block_in_place(|| cluster.restart());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let admin = connect(cluster.admin_url()).await;
    admin
        .batch_execute(&format!("ALTER DATABASE {dbname} ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    db.client = connect(&db.url).await;
    assert_ne!(
        started_at(&db).await,
        second_start,
        "the server did not restart"
    );

    // 3. More work after the restarts.
    db.client.execute(insert, &[&(LAST as i32)]).await.unwrap();
    let total = FIRST + SECOND + LAST + LONG;
    wait_all_completed(&db, total, Duration::from_secs(90)).await;
    assert_eq!(
        db.count("SELECT count(*) FROM job_tasks").await,
        total,
        "jobs appeared or vanished"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM job_tasks WHERE locked_by IS NOT NULL OR locked_until IS NOT NULL
                OR finished_at IS NULL"
        )
        .await,
        0,
        "{:#?}",
        db.client
            .query(
                "SELECT to_jsonb(t)::text FROM job_tasks t WHERE locked_by IS NOT NULL
                    OR locked_until IS NOT NULL OR finished_at IS NULL",
                &[]
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    );
    // The long jobs lost their leases during the outage and ran again; every
    // job that ran twice says why.
    let long_rerun = db
        .count(
            "SELECT count(*) FROM job_tasks WHERE priority = -1 AND attempt = 2
                AND jsonb_array_length(errors) = 1 AND errors->0->>'kind' = 'lease_expired'",
        )
        .await;
    assert_eq!(long_rerun, LONG);
    let unexplained = db
        .count(
            "SELECT count(*) FROM job_tasks
              WHERE jsonb_array_length(errors) <> attempt - 1
                 OR EXISTS (SELECT 1 FROM jsonb_array_elements(errors) e
                             WHERE e->>'kind' <> 'lease_expired')",
        )
        .await;
    assert_eq!(
        unexplained, 0,
        "jobs ran again without a lease_expired entry"
    );
    let reruns = db
        .count("SELECT count(*) FROM job_tasks WHERE attempt > 1")
        .await;
    eprintln!("jobs run again because their lease expired: {reruns} of {total}");

    // The daemon saw the outages, lived through them, listens again, and
    // still shuts down cleanly.
    let logs = w.logs();
    assert!(logs.contains("LISTEN connection lost"), "{logs}");
    // It stopped each long job itself once the lease it had last renewed
    // could have run out: a worker that kept running them while the sweep
    // handed them to someone else would run them twice.
    let long_ids: Vec<Uuid> = db
        .client
        .query("SELECT id FROM job_tasks WHERE priority = -1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(long_ids.len() as i64, LONG);
    for id in &long_ids {
        let id = id.to_string();
        assert!(
            logs.lines()
                .any(|l| l.contains("its lease could not be renewed in time") && l.contains(&id)),
            "the worker did not stop long job {id} when its lease could not be renewed:\n{logs}"
        );
    }
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "the worker died:\n{logs}"
    );
    wait_new_listener(&db, &[], Duration::from_secs(20)).await;
    w.signal("TERM");
    assert_eq!(
        w.wait_exit(Duration::from_secs(15)),
        Some(0),
        "log:\n{}",
        w.logs()
    );
}

/// SIGTERM lets short jobs finish and hands long ones back without using an
/// attempt; a second signal exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_short_jobs_and_hands_back_long_ones() {
    let grace = Duration::from_secs(2); // FAST
    let _gate = timed().await;
    let db = shared().database(true).await;
    let mut w = WorkerProcess::spawn(&db.url, &[("DOCWORKER__WORKER__CONCURRENCY", "2")]);
    let ids: Vec<Uuid> = db
        .client
        .query(
            "INSERT INTO job_tasks (filename, task_type, options)
             VALUES ('short', 'noop', '{\"sleep_ms\": 1200}'), ('long', 'noop', '{\"sleep_ms\": 60000}')
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (short, long) = (ids[0], ids[1]);
    db.wait_count(
        "SELECT count(*) FROM job_tasks WHERE status = 'processing'",
        2,
        Duration::from_secs(20),
    )
    .await;

    let signalled_at: chrono::DateTime<chrono::Utc> = db
        .client
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0);
    let t0 = Instant::now();
    w.signal("TERM");
    // A job inserted during the grace period, while the short job still
    // holds its slot: the slot it frees must not be used to claim it.
    w.wait_log("shutting down", Duration::from_secs(5)).await;
    let late = db.noop_job(json!({})).await;
    let code = w.wait_exit(grace + Duration::from_secs(10));
    let took = t0.elapsed();
    assert_eq!(code, Some(0), "log:\n{}", w.logs());
    assert!(
        took >= grace - Duration::from_millis(500) && took < grace + Duration::from_secs(5),
        "exit took {took:?} with a grace of {grace:?}"
    );

    // The short job finished during the grace period.
    let row = db
        .client
        .query_one(
            "SELECT status::text, attempt, finished_at > $2 FROM job_tasks WHERE id = $1",
            &[&short, &signalled_at],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0).as_str(),
            row.get::<_, i32>(1),
            row.get::<_, bool>(2)
        ),
        ("completed", 1, true)
    );
    // The long one is back, due now, with its attempt not counted.
    let row = db
        .client
        .query_one(
            "SELECT status::text, attempt, locked_by, locked_until IS NULL, errors = '[]',
                    finished_at IS NULL, run_at <= now()
               FROM job_tasks WHERE id = $1",
            &[&long],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0).as_str(),
            row.get::<_, i32>(1),
            row.get::<_, Option<String>>(2),
            row.get::<_, bool>(3),
            row.get::<_, bool>(4),
            row.get::<_, bool>(5),
            row.get::<_, bool>(6)
        ),
        ("pending", 0, None, true, true, true, true)
    );
    assert!(w.logs().contains("handing it back"), "{}", w.logs());
    // No claims after SIGTERM: the job inserted during the grace period was
    // never touched, although a slot came free after it was inserted.
    let row = db
        .client
        .query_one(
            "SELECT status::text, attempt, locked_by, started_at IS NULL,
                    created_at < (SELECT finished_at FROM job_tasks WHERE id = $2)
               FROM job_tasks WHERE id = $1",
            &[&late, &short],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(4),
        "the job was inserted only after the short job had finished; the test proves nothing"
    );
    assert_eq!(
        (
            row.get::<_, String>(0).as_str(),
            row.get::<_, i32>(1),
            row.get::<_, Option<String>>(2),
            row.get::<_, bool>(3)
        ),
        ("pending", 0, None, true),
        "a job was claimed after SIGTERM; log:\n{}",
        w.logs()
    );

    // A second worker with a long grace takes the long job (attempt 1 again)...
    let mut w2 = WorkerProcess::spawn(&db.url, &[("DOCWORKER__WORKER__SHUTDOWN_GRACE", "60s")]);
    let row = wait_row(&db.client, long, "running", Duration::from_secs(20), |r| {
        r["status"] == "processing"
    })
    .await;
    let (_, attempt, holder) = held(&row);
    assert_eq!(attempt, 1, "the hand-back used up an attempt");
    let holder = holder.unwrap();
    assert_eq!(pid_in(&holder), w2.pid());
    // ...and two signals make it exit at once, grace or not.
    w2.signal("TERM");
    w2.wait_log("shutting down", Duration::from_secs(10)).await;
    let t0 = Instant::now();
    w2.signal("TERM");
    let code = w2.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    assert_eq!(
        code,
        Some(128 + 15),
        "expected exit code 128 + SIGTERM; log:\n{}",
        w2.logs()
    );
    assert!(
        took < Duration::from_secs(3),
        "the second signal took {took:?} to end the process"
    );
    // Exiting at once hands nothing back: the row is exactly as w2 held it
    // (it comes back only by lease expiry).
    let (status, attempt, locked_by) = held(&row_json(&db.client, long).await);
    assert_eq!(
        (status.as_str(), attempt, locked_by.as_deref()),
        ("processing", 1, Some(holder.as_str())),
        "the interrupted job changed after an immediate exit"
    );
}
