//! The `worker` command line, run as the real binary: `--once`, the operator
//! commands, configuration errors and the start-up schema check.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{
    run_command, shared, Cluster, TestDb, WorkerProcess, COMMAND_DEADLINE, WORKER,
};
use crate::support::worker;

/// The binary with exactly `env` (no FAST settings, no DATABASE_URL unless
/// given), optionally in `cwd`: for configuration files and relative paths.
async fn bare(args: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> (i32, String, String) {
    bare_within(args, env, cwd, COMMAND_DEADLINE).await
}

/// [`bare`] that fails the test if the command runs longer than `deadline`.
async fn bare_within(
    args: &[&str],
    env: &[(&str, &str)],
    cwd: Option<&Path>,
    deadline: Duration,
) -> (i32, String, String) {
    let mut cmd = Command::new(WORKER);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    tokio::task::spawn_blocking(move || run_command(cmd, deadline))
        .await
        .unwrap()
}

fn show(out: &str, err: &str) -> String {
    format!("stdout:\n{out}\nstderr:\n{err}")
}

async fn attempt(db: &TestDb, id: Uuid) -> i32 {
    db.client
        .query_one("SELECT attempt FROM job_tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Runs `worker --once --job ID`, expecting `code`.
async fn once_job(db: &TestDb, id: Uuid, code: i32) -> String {
    let (got, out, err) = worker(&db.url, &["--once", "--job", &id.to_string()], &[]).await;
    assert_eq!(got, code, "--once --job {id}\n{}", show(&out, &err));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_runs_one_job_and_exits_with_its_outcome() {
    let db = shared().database(true).await;

    // Nothing due.
    let (code, out, err) = worker(&db.url, &["--once"], &[]).await;
    assert_eq!(code, 4, "{}", show(&out, &err));
    assert!(out.contains("nothing to do"), "{}", show(&out, &err));

    // A due job that completes.
    let ok = db.noop_job(json!({})).await;
    let (code, out, err) = worker(&db.url, &["--once"], &[]).await;
    assert_eq!(code, 0, "{}", show(&out, &err));
    assert!(out.contains(&ok.to_string()), "{}", show(&out, &err));
    assert!(out.contains("completed"), "{}", show(&out, &err));
    assert_eq!(db.status(ok).await, "completed");

    // A due job that fails permanently (on its first attempt only).
    let failing = db
        .noop_job(json!({"fail": "permanent", "fail_attempts": 1}))
        .await;
    let (code, out, err) = worker(&db.url, &["--once"], &[]).await;
    assert_eq!(code, 3, "{}", show(&out, &err));
    assert!(out.contains(&failing.to_string()), "{}", show(&out, &err));
    assert!(out.contains("error"), "{}", show(&out, &err));
    assert!(
        out.contains("noop job asked to fail on attempt 1"),
        "the error message is printed\n{}",
        show(&out, &err)
    );
    assert_eq!(db.status(failing).await, "error");

    // `--job` runs that job even though another one is next in line.
    let next = db.noop_job(json!({})).await;
    db.client
        .execute(
            "UPDATE job_tasks SET priority = -10 WHERE id = $1",
            &[&next],
        )
        .await
        .unwrap();
    let out = once_job(&db, failing, 0).await;
    assert!(
        out.contains(&failing.to_string()) && out.contains("completed"),
        "{out}"
    );
    assert_eq!(db.status(failing).await, "completed");
    assert_eq!(attempt(&db, failing).await, 2);
    assert_eq!(db.status(next).await, "pending");

    // ... and exits 3 when that job fails.
    let fails_again = db.noop_job(json!({"fail": "permanent"})).await;
    let out = once_job(&db, fails_again, 3).await;
    assert!(
        out.contains(&fails_again.to_string()) && out.contains("error"),
        "{out}"
    );
    assert_eq!(db.status(next).await, "pending");

    // An unknown id: nothing to do.
    let unknown = Uuid::new_v4();
    let out = once_job(&db, unknown, 4).await;
    assert!(
        out.contains("nothing to do") && out.contains(&unknown.to_string()),
        "{out}"
    );

    // The next one in line was left for last.
    let (code, out, err) = worker(&db.url, &["--once"], &[]).await;
    assert_eq!(code, 0, "{}", show(&out, &err));
    assert!(out.contains(&next.to_string()), "{}", show(&out, &err));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_job_leaves_a_job_another_worker_holds_alone() {
    let db = shared().database(true).await;
    let id = db.noop_job(json!({})).await;
    db.client
        .execute(
            "UPDATE job_tasks SET status = 'processing', attempt = 1, locked_by = 'other',
                    locked_until = now() + interval '1 minute', started_at = now()
              WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let snapshot = || async {
        db.client
            .query_one(
                "SELECT to_jsonb(t)::text FROM job_tasks t WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let before = snapshot().await;
    let out = once_job(&db, id, 4).await;
    assert!(
        out.contains("nothing to do") && out.contains(&id.to_string()),
        "{out}"
    );
    assert_eq!(snapshot().await, before, "--once --job touched a held job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_creates_a_batch_with_absolute_paths() {
    let db = shared().database(true).await;
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.txt", "b.txt"] {
        std::fs::write(dir.path().join(name), format!("{name}\n")).unwrap();
    }
    let real_dir = dir.path().canonicalize().unwrap();

    // Relative paths, as typed in the upload directory.
    let (code, out, err) = bare(
        &["enqueue", "a.txt", "b.txt"],
        &[("DATABASE_URL", &db.url)],
        Some(dir.path()),
    )
    .await;
    assert_eq!(code, 0, "{}", show(&out, &err));
    let batches = db
        .client
        .query("SELECT id, total_tasks, status::text FROM job_batches", &[])
        .await
        .unwrap();
    assert_eq!(batches.len(), 1);
    let batch: Uuid = batches[0].get(0);
    assert_eq!(batches[0].get::<_, i32>(1), 2);
    assert_eq!(batches[0].get::<_, String>(2), "pending");
    assert!(out.contains(&format!("batch {batch}")), "{out}");

    let tasks = db
        .client
        .query(
            "SELECT id, batch_id, filename::text, file_path, task_type, status::text, options
               FROM job_tasks ORDER BY filename",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(tasks.len(), 2);
    for (t, name) in tasks.iter().zip(["a.txt", "b.txt"]) {
        let id: Uuid = t.get(0);
        assert!(out.contains(&id.to_string()), "{out}");
        assert_eq!(t.get::<_, Option<Uuid>>(1), Some(batch));
        assert_eq!(t.get::<_, String>(2), name);
        let path: String = t.get::<_, Option<String>>(3).unwrap();
        assert!(Path::new(&path).is_absolute(), "{path}");
        assert_eq!(Path::new(&path), real_dir.join(name));
        assert_eq!(t.get::<_, String>(4), "ingest");
        assert_eq!(t.get::<_, String>(5), "pending");
        assert_eq!(t.get::<_, Value>(6), json!({}));
    }

    // --type noop (absolute paths given), with options; the jobs then run
    // and close their batch.
    let a = real_dir.join("a.txt");
    let b = real_dir.join("b.txt");
    let (code, out, err) = worker(
        &db.url,
        &[
            "enqueue",
            "--type",
            "noop",
            "--options",
            r#"{"sleep_ms": 1}"#,
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{}", show(&out, &err));
    let rows = db
        .client
        .query(
            "SELECT id, batch_id, file_path, options FROM job_tasks
              WHERE task_type = 'noop' ORDER BY filename",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let noop_batch: Uuid = rows[0].get(1);
    assert_ne!(noop_batch, batch);
    assert_eq!(rows[1].get::<_, Uuid>(1), noop_batch);
    assert_eq!(rows[0].get::<_, Option<String>>(2).as_deref(), a.to_str());
    assert_eq!(rows[0].get::<_, Value>(3), json!({"sleep_ms": 1}));
    for r in &rows {
        once_job(&db, r.get(0), 0).await;
    }
    let status: String = db
        .client
        .query_one(
            "SELECT status::text FROM job_batches WHERE id = $1",
            &[&noop_batch],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "completed");

    // A bad --options is refused.
    let (code, out, err) = worker(
        &db.url,
        &["enqueue", "--options", "{nope", a.to_str().unwrap()],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{}", show(&out, &err));
    assert!(err.contains("--options"), "{}", show(&out, &err));
}

/// The `worker jobs` line of job `id`, split into columns.
fn jobs_line(out: &str, id: Uuid) -> Option<Vec<String>> {
    out.lines()
        .find(|l| l.starts_with(&id.to_string()))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_lists_jobs_and_filters_by_status() {
    let db = shared().database(true).await;
    let done = db.noop_job(json!({})).await;
    let failed = db.noop_job(json!({"fail": "permanent"})).await;
    let waiting = db.noop_job(json!({})).await;
    once_job(&db, done, 0).await;
    once_job(&db, failed, 3).await;

    let (code, out, err) = worker(&db.url, &["jobs"], &[]).await;
    assert_eq!(code, 0, "{}", show(&out, &err));
    let header = out.lines().next().unwrap_or_default();
    assert!(header.contains("id") && header.contains("status"), "{out}");
    for (id, status) in [(done, "completed"), (failed, "error"), (waiting, "pending")] {
        let cols = jobs_line(&out, id).unwrap_or_else(|| panic!("{id} not listed:\n{out}"));
        assert_eq!(cols[1], "noop", "{out}");
        assert_eq!(cols[2], status, "{out}");
    }
    assert!(
        out.contains("noop job asked to fail"),
        "the error is shown:\n{out}"
    );

    let (code, out, err) = worker(&db.url, &["jobs", "--status", "error"], &[]).await;
    assert_eq!(code, 0, "{}", show(&out, &err));
    assert!(jobs_line(&out, failed).is_some(), "{out}");
    assert!(jobs_line(&out, done).is_none(), "{out}");
    assert!(jobs_line(&out, waiting).is_none(), "{out}");

    let (code, out, err) = worker(&db.url, &["jobs", "--status", "cancelled"], &[]).await;
    assert_eq!(code, 0, "{}", show(&out, &err));
    assert!(out.contains("(no jobs)"), "{out}");

    let (code, out, err) = worker(&db.url, &["jobs", "--limit", "1"], &[]).await;
    assert_eq!(code, 0, "{}", show(&out, &err));
    assert_eq!(out.lines().count(), 2, "header and one job:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_and_cancel_change_only_the_jobs_they_may() {
    let db = shared().database(true).await;
    let failed = db
        .noop_job(json!({"fail": "permanent", "fail_attempts": 1}))
        .await;
    let done = db.noop_job(json!({})).await;
    let waiting = db.noop_job(json!({})).await;
    once_job(&db, failed, 3).await;
    once_job(&db, done, 0).await;
    assert_eq!(attempt(&db, failed).await, 1);

    // retry: an errored job is pending again, its attempt kept.
    let (code, out, err) = worker(&db.url, &["retry", &failed.to_string()], &[]).await;
    assert_eq!(code, 0, "{}", show(&out, &err));
    assert!(out.contains("pending again"), "{out}");
    assert_eq!(db.status(failed).await, "pending");
    assert_eq!(attempt(&db, failed).await, 1);
    // It runs again as attempt 2 (and now succeeds).
    let out = once_job(&db, failed, 0).await;
    assert!(out.contains("attempt 2: completed"), "{out}");

    // retry: a pending job is refused.
    let (code, out, err) = worker(&db.url, &["retry", &waiting.to_string()], &[]).await;
    assert_ne!(code, 0, "{}", show(&out, &err));
    assert!(
        err.contains(&waiting.to_string()) && err.contains("was not retried"),
        "{}",
        show(&out, &err)
    );
    assert_eq!(db.status(waiting).await, "pending");
    assert_eq!(attempt(&db, waiting).await, 0);

    // cancel: a pending job is cancelled.
    let (code, out, err) = worker(&db.url, &["cancel", &waiting.to_string()], &[]).await;
    assert_eq!(code, 0, "{}", show(&out, &err));
    assert!(out.contains("cancelled"), "{out}");
    assert_eq!(db.status(waiting).await, "cancelled");

    // cancel: a completed job is refused and stays completed.
    let (code, out, err) = worker(&db.url, &["cancel", &done.to_string()], &[]).await;
    assert_ne!(code, 0, "{}", show(&out, &err));
    assert!(
        err.contains(&done.to_string()) && err.contains("already finished"),
        "{}",
        show(&out, &err)
    );
    assert_eq!(db.status(done).await, "completed");

    // Unknown ids are refused too.
    let unknown = Uuid::new_v4().to_string();
    for command in ["retry", "cancel"] {
        let (code, out, err) = worker(&db.url, &[command, &unknown], &[]).await;
        assert_ne!(code, 0, "{command}: {}", show(&out, &err));
        assert!(
            err.contains("does not exist"),
            "{command}: {}",
            show(&out, &err)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_measures_a_running_worker_and_cleans_up_without_one() {
    let db = shared().database(true).await;

    // No worker: gives up after the timeout and leaves no pending job behind.
    let started = Instant::now();
    let (code, out, err) = worker(&db.url, &["ping", "--timeout", "1s"], &[]).await;
    let took = started.elapsed();
    assert_ne!(code, 0, "{}", show(&out, &err));
    assert!(
        err.contains("no worker completed the ping job within 1s"),
        "{}",
        show(&out, &err)
    );
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(
        db.count("SELECT count(*) FROM job_tasks WHERE status IN ('pending', 'processing')")
            .await,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM job_tasks WHERE filename = 'ping' AND status = 'cancelled'")
            .await,
        1
    );

    // A running worker answers.
    let w = WorkerProcess::spawn(&db.url, &[]);
    w.wait_log("ready", Duration::from_secs(10)).await;
    let (code, out, err) = worker(&db.url, &["ping"], &[]).await;
    assert_eq!(code, 0, "{}\nworker log:\n{}", show(&out, &err), w.logs());
    assert!(out.contains("pong") && out.contains(" ms"), "{out}");
    assert_eq!(
        db.count("SELECT count(*) FROM job_tasks WHERE filename = 'ping' AND status = 'completed'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_with_the_key_named() {
    // A migrated database, so that a value that is wrongly accepted shows up
    // as `--once` finding nothing to do (exit 4) instead of an error.
    let db = shared().database(true).await;
    let url = db.url.as_str();
    let cases: &[(&str, &str, &str)] = &[
        ("DOCWORKER__WORKER__CONCURRENCY", "0", "worker.concurrency"),
        (
            "DOCWORKER__WORKER__CONCURRENCY",
            "abc",
            "worker.concurrency",
        ),
        (
            "DOCWORKER__WORKER__POLL_INTERVAL",
            "soon",
            "worker.poll_interval",
        ),
        ("DOCWORKER__WORKER__BOGUS", "1", "worker.bogus"),
    ];
    for (key, value, named) in cases {
        let (code, out, err) =
            bare(&["--once"], &[("DATABASE_URL", url), (key, value)], None).await;
        assert_eq!(code, 1, "{key}={value}\n{}", show(&out, &err));
        assert!(
            err.contains(named),
            "{key}={value}: stderr must name {named}\n{}",
            show(&out, &err)
        );
    }

    // Values refused by validation, alone or in combination.
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("DOCWORKER__DATABASE__POOL_SIZE", "2")],
            "database.pool_size",
        ),
        (&[("DOCWORKER__LOG__LEVEL", "info,[")], "log.level"),
        (
            &[
                ("DOCWORKER__RETRY__BASE_DELAY", "10m"),
                ("DOCWORKER__RETRY__MAX_DELAY", "1m"),
            ],
            "retry.base_delay",
        ),
    ];
    for (vars, named) in cases {
        let mut env = vec![("DATABASE_URL", url)];
        env.extend_from_slice(vars);
        let (code, out, err) = bare(&["--once"], &env, None).await;
        assert_eq!(code, 1, "{vars:?}\n{}", show(&out, &err));
        assert!(
            err.contains(named),
            "{vars:?}: stderr must name {named}\n{}",
            show(&out, &err)
        );
    }

    // A --config file that does not exist.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let (code, out, err) = bare(
        &["--config", missing.to_str().unwrap(), "--once"],
        &[("DATABASE_URL", url)],
        None,
    )
    .await;
    assert_eq!(code, 1, "{}", show(&out, &err));
    assert!(
        err.contains(missing.to_str().unwrap()) && err.contains("does not exist"),
        "{}",
        show(&out, &err)
    );

    // A --config file that is not valid TOML.
    let malformed = dir.path().join("malformed.toml");
    std::fs::write(&malformed, "[worker\nconcurrency = 2\n").unwrap();
    let (code, out, err) = bare(
        &["--config", malformed.to_str().unwrap(), "--once"],
        &[("DATABASE_URL", url)],
        None,
    )
    .await;
    assert_eq!(code, 1, "{}", show(&out, &err));
    assert!(
        err.contains(malformed.to_str().unwrap()),
        "stderr must name the file\n{}",
        show(&out, &err)
    );

    // A heartbeat too slow for the lease.
    let slow = dir.path().join("slow.toml");
    std::fs::write(
        &slow,
        "[worker]\nlease_duration = \"3s\"\nheartbeat_interval = \"2s\"\n",
    )
    .unwrap();
    let (code, out, err) = bare(
        &["--config", slow.to_str().unwrap(), "--once"],
        &[("DATABASE_URL", url)],
        None,
    )
    .await;
    assert_eq!(code, 1, "{}", show(&out, &err));
    assert!(
        err.contains("worker.heartbeat_interval"),
        "{}",
        show(&out, &err)
    );

    // `run --concurrency 0`. Spawned so that a wrongly accepted value shows
    // as a timeout rather than a hang.
    let mut w = WorkerProcess::spawn_args(url, &["run", "--concurrency", "0"], &[]);
    let code = w.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{}", w.logs());
    assert!(w.logs().contains("worker.concurrency"), "{}", w.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_sets_values() {
    let db = shared().database(true).await;
    let job = db.noop_job(json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docworker.toml");
    // The database comes from the file alone (no DATABASE_URL), and the log
    // format it asks for is the one used.
    std::fs::write(
        &file,
        format!(
            "[database]\nurl = \"{}\"\npool_size = 5\n\n[worker]\nconcurrency = 2\nlease_duration = \"10s\"\nheartbeat_interval = \"2s\"\n\n[log]\nformat = \"json\"\n",
            db.url
        ),
    )
    .unwrap();
    let (code, out, err) = bare(&["--config", file.to_str().unwrap(), "--once"], &[], None).await;
    assert_completed_with_json_logs(&db, job, code, &out, &err).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_url_overrides_the_config_file() {
    let cluster: &Cluster = shared();
    let db = cluster.database(true).await;
    let job = db.noop_job(json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docworker.toml");
    // The file names a database that does not exist (a worker using it
    // would be refused); it also asks for JSON logs, to show it was read.
    let missing = cluster.url_for(&format!("dw_missing_{}", Uuid::new_v4().simple()));
    std::fs::write(
        &file,
        format!("[database]\nurl = \"{missing}\"\n\n[log]\nformat = \"json\"\n"),
    )
    .unwrap();
    let (code, out, err) = bare_within(
        &["--config", file.to_str().unwrap(), "--once"],
        &[("DATABASE_URL", &db.url)],
        None,
        Duration::from_secs(30),
    )
    .await;
    assert_completed_with_json_logs(&db, job, code, &out, &err).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmigrated_database_is_refused_with_a_hint() {
    let db = shared().database(false).await;
    let mut w = WorkerProcess::spawn(&db.url, &[]);
    let code = w.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{}", w.logs());
    assert!(w.logs().contains("run `worker migrate`"), "{}", w.logs());

    let (code, out, err) = worker(&db.url, &["--once"], &[]).await;
    assert_eq!(code, 1, "{}", show(&out, &err));
    assert!(err.contains("run `worker migrate`"), "{}", show(&out, &err));
    // Nothing was created behind the operator's back.
    let created: bool = db
        .client
        .query_one("SELECT to_regclass('job_tasks') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_does_not_exist_is_refused_at_once() {
    let db = shared().database(true).await;
    let missing = db.url.rsplit_once('/').unwrap().0.to_owned() + "/no_such_database";
    for args in [&["--once"][..], &["run"][..]] {
        let started = std::time::Instant::now();
        let (code, out, err) = bare_within(
            args,
            &[("DATABASE_URL", missing.as_str())],
            None,
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(code, 1, "{args:?}: {}", show(&out, &err));
        assert!(
            err.contains("no_such_database") && err.contains("does not exist"),
            "{args:?}: {}",
            show(&out, &err)
        );
        // Refused, not retried until some timeout.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
}

/// `--once` completed `job`, and every log line is JSON: the `log.format`
/// set in the config file was applied.
async fn assert_completed_with_json_logs(db: &TestDb, job: Uuid, code: i32, out: &str, err: &str) {
    assert_eq!(code, 0, "{}", show(out, err));
    assert!(
        out.contains(&job.to_string()) && out.contains("completed"),
        "{}",
        show(out, err)
    );
    assert_eq!(db.status(job).await, "completed");
    let log_lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!log_lines.is_empty(), "{}", show(out, err));
    for line in log_lines {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "log.format = \"json\" from the config file was not applied: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_for_the_database_is_a_clean_exit() {
    // Nothing listens on port 1: the worker keeps waiting for its database.
    let mut w = WorkerProcess::spawn(
        "postgres://postgres@127.0.0.1:1/docworker",
        &[("DOCWORKER__DATABASE__CONNECT_TIMEOUT", "1s")],
    );
    w.wait_log("database not reachable yet", Duration::from_secs(20))
        .await;
    w.signal("TERM");
    assert_eq!(
        w.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        w.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_off_a_terminal_are_plain_and_a_fatal_error_is_printed_once() {
    let db = shared().database(true).await;
    // stderr is a pipe here, as under journald: no colour codes.
    let (code, out, err) = bare(
        &["--once"],
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("DOCWORKER__FILES__UPLOAD_ROOT", "/tmp"),
        ],
        None,
    )
    .await;
    assert_eq!(code, 4, "{}", show(&out, &err));
    assert!(err.contains("INFO"), "--once logs: {}", show(&out, &err));
    assert!(!err.contains('\x1b'), "ANSI codes in a pipe: {err:?}");

    let missing = db.url.rsplit_once('/').unwrap().0.to_owned() + "/no_such_database";
    let (code, out, err) = bare(&["jobs"], &[("DATABASE_URL", missing.as_str())], None).await;
    assert_eq!(code, 1, "{}", show(&out, &err));
    assert_eq!(
        err.matches("does not exist").count(),
        1,
        "the error once: {}",
        show(&out, &err)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_written_with_single_underscores_is_refused_with_its_name() {
    let db = shared().database(true).await;
    let (code, out, err) = bare(
        &["--once"],
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("DOCWORKER__FILES__UPLOAD_ROOT", "/tmp"),
            ("DOCWORKER_WORKER_CONCURRENCY", "0"),
        ],
        None,
    )
    .await;
    assert_eq!(code, 1, "{}", show(&out, &err));
    assert!(
        err.contains("DOCWORKER_WORKER_CONCURRENCY is not read")
            && err.contains("did you mean DOCWORKER__WORKER__CONCURRENCY?"),
        "{}",
        show(&out, &err)
    );
}
