//! SIGHUP reloads the configuration while jobs run (`src/ops/reload.rs`):
//! what may change is applied, a bad file changes nothing, and what needs a
//! restart is named and kept.

use std::time::Duration;

use serde_json::json;

use crate::harness::{self, WorkerProcess};

const PROCESSING: &str = "SELECT count(*) FROM job_tasks WHERE status = 'processing'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_raises_concurrency_under_load_and_a_bad_file_changes_nothing() {
    let _g = harness::timed().await;
    let db = harness::shared().database(true).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.toml");
    let write = |text: &str| std::fs::write(&file, text).unwrap();
    write("[worker]\nconcurrency = 2\n");
    let w = WorkerProcess::spawn_args(&db.url, &["--config", file.to_str().unwrap(), "run"], &[]);
    w.wait_log("ready", Duration::from_secs(20)).await;
    db.noop_jobs(60, json!({"sleep_ms": 2000})).await;
    db.wait_count(PROCESSING, 2, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        db.count(PROCESSING).await,
        2,
        "concurrency 2 before the reload"
    );

    // More slots, and JSON logs, at once.
    write("[worker]\nconcurrency = 8\n[log]\nformat = \"json\"\n");
    w.signal("HUP");
    db.wait_count(PROCESSING, 8, Duration::from_secs(10)).await;
    w.wait_log("configuration reloaded", Duration::from_secs(5))
        .await;
    assert!(
        w.logs().lines().any(|l| l.starts_with("{\"timestamp\"")),
        "the format changed to JSON:\n{}",
        w.logs()
    );

    // A bad value: nothing changes, and the log says so.
    write("[worker]\nconcurrency = 0\n[log]\nformat = \"json\"\n");
    w.signal("HUP");
    w.wait_log("configuration not reloaded", Duration::from_secs(5))
        .await;
    // The 2 s jobs turn over, and still 8 run at once.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(db.count(PROCESSING).await, 8, "{}", w.logs());

    // The listener's address needs a restart: named, kept; the rest applies.
    write(
        "[worker]\nconcurrency = 3\n[log]\nformat = \"json\"\n[http]\naddress = \"127.0.0.1:1\"\n",
    );
    w.signal("HUP");
    w.wait_log("changed setting not applied", Duration::from_secs(5))
        .await;
    let logs = w.logs();
    let kept = logs
        .lines()
        .find(|l| l.contains("changed setting not applied"))
        .unwrap();
    assert!(kept.contains("http.address"), "{kept}");
    // Fewer slots: no more claims until the running jobs are down to 3.
    db.wait_count(PROCESSING, 3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(db.count(PROCESSING).await, 3);

    // Spans opened under one format print under the other.
    assert!(!w.logs().contains("panicked"), "{}", w.logs());

    // Nothing was dropped or run twice.
    db.wait_count(
        "SELECT count(*) FROM job_tasks WHERE status = 'completed'",
        60,
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM job_tasks WHERE attempt <> 1")
            .await,
        0,
        "{}",
        w.logs()
    );
}
