//! The web dashboard (`src/ops/dashboard/`): its headers and refusals over
//! plain HTTP here, and the pages in a real browser (headless chromium
//! through chromedriver, driven by `tests/browser/dashboard.py`), with
//! screenshots under `target/dashboard-screenshots/`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::harness::{self, WorkerProcess};
use crate::services;
use crate::stack::{Stack, JOB_DEADLINE};

const TOKEN: &str = "dashboard-test-token-0123456789";
const HOSTILE: &str = "<img src=x onerror=alert(1)>.pdf";

fn with_dashboard(stack: &mut Stack) -> String {
    let address = format!("127.0.0.1:{}", harness::free_port());
    stack
        .set("DOCWORKER__HTTP__ENABLED", "true")
        .set("DOCWORKER__HTTP__ADDRESS", &address)
        .set("DOCWORKER__HTTP__DASHBOARD", "true")
        .set("DOCWORKER__HTTP__DASHBOARD_TOKEN", TOKEN)
        .set("DOCWORKER__WORKER__CONCURRENCY", "2");
    format!("http://{address}")
}

/// A worker on `stack` with the dashboard on, once it serves.
async fn dashboard_worker(stack: &mut Stack) -> (String, WorkerProcess) {
    let base = with_dashboard(stack);
    let worker = stack.worker();
    worker
        .wait_log("dashboard at /ui/", Duration::from_secs(30))
        .await;
    (base, worker)
}

/// Needs Debian's chromium and chromium-driver (`.ci/run` installs them).
fn browser_present() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: apt-get install chromium chromium-driver (as .ci/run does)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    browser_present();
    // Chromium takes both cores for seconds: nothing with tight timing
    // (leases of 3 s) may run beside it.
    let _g = harness::exclusive().await;
    let mut stack = Stack::new().await;
    let (base, worker) = dashboard_worker(&mut stack).await;

    // An ingest job whose file is missing fails for good; the file then
    // arrives, so a retry can complete.
    let late = stack.uploads.path().join("late.txt");
    let errored = stack
        .ingest("late.txt", &late.display().to_string(), None, json!({}))
        .await;
    let hostile = stack
        .ingest(HOSTILE, "/nowhere/x.pdf", None, json!({}))
        .await;
    for id in [errored, hostile] {
        assert_eq!(stack.wait_finished(id, JOB_DEADLINE).await.status, "error");
    }
    stack.write(
        "late.txt",
        "Tide mills stored sea water behind a dam and ground corn as the tide went out.\n",
    );
    // A batch the page watches drain: not due until the browser has the
    // overview open (it says so through a file), then sixteen jobs of 0.6 s
    // on two slots.
    let batch: uuid::Uuid = stack
        .db
        .client
        .query_one(
            "WITH b AS (INSERT INTO job_batches (total_tasks) VALUES (16) RETURNING id),
                  t AS (INSERT INTO job_tasks (batch_id, filename, task_type, options, run_at)
                        SELECT b.id, 'step-' || g, 'noop', '{\"sleep_ms\": 600}', now() + interval '1 day'
                          FROM b, generate_series(1, 16) g)
             SELECT id FROM b",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    let scratch = tempfile::tempdir().unwrap();
    let ready = scratch.path().join("watching");
    let (out, err) = (scratch.path().join("out"), scratch.path().join("err"));
    let mut browser = Command::new(services::venv().join("bin/python"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.py"))
        .args(["--base", &base, "--token", TOKEN])
        .args(["--batch", &batch.to_string()])
        .args(["--errored", &errored.to_string()])
        .args(["--hostile", HOSTILE])
        .arg("--screenshots")
        .arg(&shots)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("starting tests/browser/dashboard.py");
    let start = std::time::Instant::now();
    let mut released = false;
    let status = loop {
        if let Some(status) = browser.try_wait().unwrap() {
            break status;
        }
        if !released && ready.exists() {
            stack
                .db
                .client
                .execute(
                    "UPDATE job_tasks SET run_at = now() WHERE batch_id = $1",
                    &[&batch],
                )
                .await
                .unwrap();
            released = true;
        }
        if start.elapsed() > Duration::from_secs(240) {
            let _ = browser.kill();
            panic!("the browser test took over 240 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (out, err) = (
        std::fs::read_to_string(out).unwrap_or_default(),
        std::fs::read_to_string(err).unwrap_or_default(),
    );
    eprintln!("{out}{err}");
    assert!(
        status.success(),
        "the browser test failed:\n{out}\n{err}\nworker log:\n{}",
        worker.logs()
    );
    for shot in [
        "overview.png",
        "batches.png",
        "jobs.png",
        "job-error.png",
        "job-completed.png",
    ] {
        assert!(shots.join(shot).exists(), "no screenshot {shot}");
    }
    let row = stack.row(errored).await;
    assert_eq!((row.status.as_str(), row.attempt), ("completed", 2));
    // The actions are logged with who asked.
    let logs = worker.logs();
    assert!(logs.contains("dashboard action refused"), "{logs}");
    assert!(
        logs.lines().any(|l| l.contains("dashboard action")
            && l.contains("retry")
            && l.contains("done=true")),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_forbid_inline_script_and_actions_need_token_and_page() {
    let mut stack = Stack::new().await;
    let (base, _worker) = dashboard_worker(&mut stack).await;
    let http = reqwest::Client::new();
    let page = http.get(format!("{base}/ui/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let body = page.text().await.unwrap();
    assert!(!body.contains(TOKEN), "the token must never be on a page");
    let csrf = body
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();

    let id = stack.db.noop_job(json!({})).await;
    stack.wait_finished(id, JOB_DEADLINE).await;
    let retry = |auth: Option<&str>, csrf: Option<&str>, site: Option<&str>| {
        let mut r = http.post(format!("{base}/ui/api/jobs/{id}/retry"));
        if let Some(a) = auth {
            r = r.bearer_auth(a);
        }
        if let Some(c) = csrf {
            r = r.header("x-csrf-token", c);
        }
        if let Some(s) = site {
            r = r.header("sec-fetch-site", s);
        }
        r.send()
    };
    assert_eq!(retry(None, Some(&csrf), None).await.unwrap().status(), 401);
    assert_eq!(
        retry(Some("wrong-token-wrong-token"), Some(&csrf), None)
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        retry(Some(TOKEN), None, None).await.unwrap().status(),
        403,
        "no CSRF token"
    );
    assert_eq!(
        retry(Some(TOKEN), Some(&csrf), Some("cross-site"))
            .await
            .unwrap()
            .status(),
        403,
        "from another site"
    );
    assert_eq!(
        stack.row(id).await.status,
        "completed",
        "nothing refused did anything"
    );
    let ok = retry(Some(TOKEN), Some(&csrf), Some("same-origin"))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    stack.wait_finished(id, JOB_DEADLINE).await;
    assert_eq!(stack.row(id).await.attempt, 2);

    // Without a configured token the dashboard is read-only.
    let mut ro = Stack::new().await;
    let base = with_dashboard(&mut ro);
    ro.set("DOCWORKER__HTTP__DASHBOARD_TOKEN", "");
    let w = ro.worker();
    w.wait_log("dashboard at /ui/", Duration::from_secs(30))
        .await;
    let r = http
        .post(format!("{base}/ui/api/jobs/{id}/retry"))
        .bearer_auth("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("actions are off"));
}

/// The job list's keyset pages cover every row once, also where many rows
/// share a `created_at` (one INSERT) and legacy rows have none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_list_pages_cover_every_row_once() {
    use docworker::store::dashboard::{jobs_page, JobFilter, PAGE};
    let db = harness::shared().database(true).await;
    db.client
        .batch_execute(
            "INSERT INTO job_tasks (filename, task_type, status, created_at)
             SELECT 'same-' || g, 'noop', 'completed', '2026-01-01 00:00:00+00' FROM generate_series(1, 120) g;
             INSERT INTO job_tasks (filename, task_type, status, created_at)
             SELECT 'legacy-' || g, 'noop', 'completed', NULL FROM generate_series(1, 7) g;
             INSERT INTO job_tasks (filename, task_type, status)
             SELECT 'new-' || g, 'noop', 'error' FROM generate_series(1, 3) g;",
        )
        .await
        .unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let (lines, next) = jobs_page(&db.client, &JobFilter::default(), after)
            .await
            .unwrap();
        pages += 1;
        assert!(lines.len() as i64 <= PAGE);
        for l in &lines {
            assert!(seen.insert(l.id), "{} twice", l.filename);
        }
        if pages == 1 {
            assert!(lines[0].filename.starts_with("new-"), "newest first");
        }
        match next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 130);
    assert_eq!(pages, 3);
    let errors = JobFilter {
        status: Some("error".into()),
        ..JobFilter::default()
    };
    let (lines, next) = jobs_page(&db.client, &errors, None).await.unwrap();
    assert_eq!((lines.len(), next), (3, None));
    let by_name = JobFilter {
        filename: Some("LEGACY-".into()),
        ..JobFilter::default()
    };
    assert_eq!(
        jobs_page(&db.client, &by_name, None).await.unwrap().0.len(),
        7
    );
    let wildcard = JobFilter {
        filename: Some("%".into()),
        ..JobFilter::default()
    };
    assert_eq!(
        jobs_page(&db.client, &wildcard, None)
            .await
            .unwrap()
            .0
            .len(),
        0,
        "% is a character, not a wildcard"
    );
}

/// A page's live stream ends when the worker shuts down: an open
/// dashboard does not hold the listener, or the process, open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_updates_flow_and_end_at_shutdown() {
    let mut stack = Stack::new().await;
    let (base, mut worker) = dashboard_worker(&mut stack).await;
    let id = stack.db.noop_job(json!({})).await;
    let mut stream = reqwest::get(format!("{base}/ui/events?jobs={id}"))
        .await
        .unwrap();
    assert_eq!(
        stream.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut seen = String::new();
    while !seen.contains(&id.to_string()) {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("an update within 10 s")
            .unwrap()
            .expect("the stream is open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.starts_with("event: update\ndata: {"), "{seen}");

    worker.signal("TERM");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived the shutdown");
    assert_eq!(
        worker.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        worker.logs()
    );
}
