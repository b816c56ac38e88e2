//! Running the worker as an operator does: the HTTP listener (`/healthz`,
//! `/readyz`, `/metrics`), `worker health` and `worker stats`, and the
//! systemd protocol (READY=1, WATCHDOG=1, RELOADING=1, STOPPING=1).

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{self, WorkerProcess};
use crate::services::{self, Chroma};
use crate::stack::{Stack, JOB_DEADLINE};

const UP: Duration = Duration::from_secs(30);

/// Turns the HTTP listener on, on a port of this test's own.
fn with_listener(stack: &mut Stack) -> String {
    let address = format!("127.0.0.1:{}", harness::free_port());
    stack
        .set("DOCWORKER__HTTP__ENABLED", "true")
        .set("DOCWORKER__HTTP__ADDRESS", &address);
    format!("http://{address}")
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Asks `/readyz` until `done(status, body)`; fails the test after [`UP`].
async fn readyz_until(base: &str, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
    get_until(base, "/readyz", done).await
}

/// Asks `{base}{path}` until `done(status, body)`; fails the test after [`UP`].
async fn get_until(base: &str, path: &str, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let start = Instant::now();
    loop {
        let (status, body) = get(&format!("{base}{path}")).await;
        if done(status, &body) {
            return (status, body);
        }
        assert!(start.elapsed() < UP, "{path} stuck at {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of one series in a Prometheus text exposition.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_worker_did_and_what_the_table_holds() {
    let mut stack = Stack::new().await;
    let base = with_listener(&mut stack);
    let worker = stack.worker();
    worker.wait_log("ready", UP).await;

    let file = stack.write(
        "notes.md",
        "# Tides\n\nThe moon's pull raises two bulges of water on opposite sides of the earth.\n",
    );
    let ingest = stack
        .ingest("notes.md", &file.display().to_string(), None, json!({}))
        .await;
    // Fails once, transiently, then succeeds: one retry.
    let flaky = stack
        .db
        .noop_job(json!({"fail": "transient", "fail_attempts": 1}))
        .await;
    let bad = stack.db.noop_job(json!({"fail": "permanent"})).await;
    // A crashed worker's job: its lease ran out; the sweep puts it back.
    let orphan: uuid::Uuid = stack
        .db
        .client
        .query_one(
            "INSERT INTO job_tasks (filename, task_type, status, attempt, locked_by, locked_until)
             VALUES ('orphan', 'noop', 'processing', 1, 'a-dead-worker', now() - interval '1 second')
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for id in [ingest, flaky, bad, orphan] {
        stack.wait_finished(id, JOB_DEADLINE).await;
    }

    let (status, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    let value =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    assert_eq!(
        value(r#"docworker_jobs_finished_total{task_type="ingest",outcome="completed"}"#),
        1.0
    );
    assert_eq!(
        value(r#"docworker_jobs_finished_total{task_type="noop",outcome="transient_error"}"#),
        1.0
    );
    assert_eq!(
        value(r#"docworker_jobs_finished_total{task_type="noop",outcome="permanent_error"}"#),
        1.0
    );
    assert_eq!(value("docworker_retries_total"), 1.0);
    assert_eq!(
        value(r#"docworker_lease_reclaims_total{outcome="retry"}"#),
        1.0
    );
    assert_eq!(
        value(r#"docworker_lease_reclaims_total{outcome="failed"}"#),
        0.0
    );
    assert_eq!(value(r#"docworker_jobs{status="completed"}"#), 3.0);
    assert_eq!(value(r#"docworker_jobs{status="error"}"#), 1.0);
    assert_eq!(value("docworker_queue_depth"), 0.0);
    assert_eq!(value("docworker_database_up"), 1.0);
    assert_eq!(value("docworker_concurrency"), 4.0);
    // Five attempts were claimed (the flaky job twice).
    assert_eq!(value("docworker_pickup_latency_seconds_count"), 5.0);
    assert!(value(r#"docworker_stage_duration_seconds_count{stage="embedding"}"#) >= 1.0);
    assert!(value(r#"docworker_stage_duration_seconds_count{stage="storing"}"#) >= 1.0);
    assert!(value(r#"docworker_requests_total{service="embedder",op="embed"}"#) >= 1.0);
    assert!(value(r#"docworker_requests_total{service="chroma",op="upsert"}"#) >= 1.0);
    assert!(
        value(r#"docworker_request_duration_seconds_count{service="chroma",op="upsert"}"#) >= 1.0
    );
    assert_eq!(value("docworker_listener_reconnects_total"), 0.0);

    // A due job nobody can take shows as depth and age: its document is
    // held by another worker's live lease (one job per document at a time).
    stack
        .db
        .client
        .batch_execute(
            "INSERT INTO job_tasks (filename, task_type, document_id, status, attempt,
                                    locked_by, locked_until, run_at)
             VALUES ('held', 'ingest', '00000000-0000-0000-0000-00000000000d', 'processing', 1,
                     'another-worker', now() + interval '1 hour', now());
             INSERT INTO job_tasks (filename, file_path, task_type, document_id, run_at)
             VALUES ('waiting', 'waiting.txt', 'ingest', '00000000-0000-0000-0000-00000000000d',
                     now() - interval '90 seconds');
             INSERT INTO job_tasks (filename, task_type, run_at)
             VALUES ('later', 'noop', now() + interval '1 hour');",
        )
        .await
        .unwrap();
    let (_, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(sample(&text, "docworker_queue_depth"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "docworker_jobs_scheduled"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"docworker_jobs{status="processing"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"docworker_jobs{status="pending"}"#),
        Some(2.0)
    );
    let age = sample(&text, "docworker_oldest_pending_age_seconds").unwrap();
    assert!((90.0..120.0).contains(&age), "oldest due job waited {age}s");
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_without_chroma_yet_alive_and_health_commands_say_so() {
    let chroma = Chroma::start_new();
    let mut stack = Stack::on(&chroma.url(), &services::shared_embedder().url()).await;
    let base = with_listener(&mut stack);
    let worker = stack.worker();
    worker.wait_log("ready", UP).await;

    // Checks have 3 s each; on a loaded machine a first one may miss.
    let (_, body) = readyz_until(&base, |status, _| status == 200).await;
    for check in ["database: ok", "listener: ok", "embedder: ok", "chroma: ok"] {
        assert!(body.contains(check), "{body}");
    }
    let (code, out, _) = stack.run(&["health", "--ready"]);
    assert_eq!(code, 0, "{out}");

    chroma.stop();
    let (_, body) = readyz_until(&base, |status, body| {
        status == 503 && body.contains("chroma: ChromaDB at")
    })
    .await;
    assert!(body.contains("database: ok"), "{body}");
    // Not ready is not dead: jobs wait with backoff, nothing to restart.
    let (status, body) = get(&format!("{base}/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    assert_eq!(stack.run(&["health"]).0, 0);
    let (code, out, _) = stack.run(&["health", "--ready"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("chroma: ChromaDB at"), "{out}");

    let (code, out, err) = stack.run(&["stats"]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "queue (whole table):",
        "pending",
        "NOT READY",
        "since it started:",
    ] {
        assert!(out.contains(line), "{out}");
    }
}

/// The image's HEALTHCHECK, `worker health --database`: the main loop turns
/// and PostgreSQL answers. A database that refuses connections fails it
/// while plain liveness holds (restarting would not help); it passes again
/// once the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_with_the_database_follows_the_database() {
    let mut stack = Stack::new().await;
    let base = with_listener(&mut stack);
    let worker = stack.worker();
    worker.wait_log("ready", UP).await;
    let (status, body) = get_until(&base, "/healthz?with=database", |s, _| s == 200).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "main loop: ok\ndatabase: ok\n")
    );
    let (code, out, _) = stack.run(&["health", "--database"]);
    assert_eq!(code, 0, "{out}");
    let (status, body) = get(&format!("{base}/healthz?with=chroma")).await;
    assert_eq!(status, 400, "{body}");

    let dbname: String = stack
        .db
        .client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    let admin = harness::connect(harness::shared().admin_url()).await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{dbname}\" ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = '{dbname}' AND pid <> pg_backend_pid();"
        ))
        .await
        .unwrap();
    let (_, body) = get_until(&base, "/healthz?with=database", |s, _| s == 503).await;
    assert!(body.starts_with("main loop: ok\ndatabase: "), "{body}");
    let (status, body) = get(&format!("{base}/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"), "liveness holds");
    let (code, out, _) = stack.run(&["health", "--database"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(stack.run(&["health"]).0, 0);

    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{dbname}\" ALLOW_CONNECTIONS true"
        ))
        .await
        .unwrap();
    get_until(&base, "/healthz?with=database", |s, _| s == 200).await;
    assert_eq!(stack.run(&["health", "--database"]).0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_plainly_without_a_listener_or_a_worker() {
    let mut stack = Stack::new().await;
    let (code, _, err) = stack.run(&["health"]);
    assert_eq!(code, 1);
    assert!(err.contains("http.enabled = false"), "{err}");

    with_listener(&mut stack);
    let (code, _, err) = stack.run(&["health"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no worker answered at http://127.0.0.1:"),
        "{err}"
    );

    // `stats` still reads the queue from the database.
    stack.db.noop_job(json!({})).await;
    let (code, out, err) = stack.run(&["stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().eq(["pending", "1"])),
        "{out}"
    );
    assert!(
        out.contains("this host's worker: no worker answered"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_listen_connection_is_counted_and_readiness_follows_it() {
    let mut stack = Stack::new().await;
    let base = with_listener(&mut stack);
    let worker = stack.worker();
    worker.wait_log("listening for job notifications", UP).await;

    let killed = stack
        .db
        .count(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name LIKE 'docworker-listener%' AND datname = current_database()) k",
        )
        .await;
    assert_eq!(killed, 1);
    // The counter records the reconnect; readiness follows the new
    // connection. The counter is read first: it moves after the notifier
    // has marked itself down, so an "ok" after it is the new connection's.
    let start = Instant::now();
    loop {
        let (_, metrics) = get(&format!("{base}/metrics")).await;
        let (_, body) = get(&format!("{base}/readyz")).await;
        let reconnects = sample(&metrics, "docworker_listener_reconnects_total").unwrap();
        if reconnects == 1.0 && body.contains("listener: ok") {
            break;
        }
        assert!(
            start.elapsed() < UP,
            "no reconnect seen: {body}\n{}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        worker
            .logs()
            .matches("listening for job notifications")
            .count(),
        2,
        "{}",
        worker.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_it_reports_ready_feeds_the_watchdog_reloads_and_says_stopping() {
    let stack = Stack::new().await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let socket_env = socket_path.display().to_string();
    let mut env = stack.env();
    env.push(("NOTIFY_SOCKET".into(), socket_env));
    env.push(("WATCHDOG_USEC".into(), "2000000".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut worker = WorkerProcess::spawn(&stack.db.url, &env);

    let messages = tokio::task::block_in_place(|| {
        let mut seen = Vec::new();
        let mut buf = [0u8; 512];
        // READY, then at least three watchdog pings (every second).
        while seen
            .iter()
            .filter(|m: &&String| m.contains("WATCHDOG=1"))
            .count()
            < 3
        {
            let n = socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("{e}; got {seen:?}; log:\n{}", worker.logs()));
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        // A reload (ExecReload's SIGHUP): RELOADING=1, then READY=1 again.
        worker.signal("HUP");
        let mut reloaded = Vec::new();
        while !reloaded.iter().any(|m: &String| m.contains("READY=1")) {
            let n = socket.recv(&mut buf).unwrap();
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if !message.contains("WATCHDOG=1") {
                reloaded.push(message);
            }
        }
        assert!(reloaded[0].starts_with("RELOADING=1\n"), "{reloaded:?}");
        worker.signal("TERM");
        loop {
            let n = socket.recv(&mut buf).unwrap();
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let stopping = message.contains("STOPPING=1");
            seen.push(message);
            if stopping {
                return seen;
            }
        }
    });
    assert!(messages[0].starts_with("READY=1\n"), "{messages:?}");
    assert!(
        messages.iter().skip(1).all(|m| !m.contains("READY=1")),
        "{messages:?}"
    );
    assert_eq!(worker.wait_exit(Duration::from_secs(20)), Some(0));
    // The watchdog is fed only because the main loop turns, which the log
    // cannot show; that it is fed at all needs WATCHDOG_USEC.
    assert!(worker.logs().contains("systemd watchdog enabled"));
}
