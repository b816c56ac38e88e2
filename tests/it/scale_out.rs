//! Several embedding servers behind `embed.url`: requests spread over them,
//! one that dies mid-ingest leaves the rotation without failing a job, and
//! it comes back once it embeds again (`src/pipeline/endpoints.rs`).

use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::harness;
use crate::services::{self, EmbedServer};
use crate::stack::{Stack, JOB_DEADLINE};
use crate::support::prose;

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn embed_requests(server: &EmbedServer) -> u64 {
    server.stats().await["embed_requests"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embed_server_stopped_mid_ingest_fails_nothing_and_is_probed_back() {
    let _g = harness::timed().await;
    let (a, b) = (EmbedServer::start_new(&[]), EmbedServer::start_new(&[]));
    let mut stack = Stack::on(
        &services::shared_chroma().url(),
        &format!("{}, {}/", a.url(), b.url()),
    )
    .await;
    let address = format!("127.0.0.1:{}", harness::free_port());
    stack
        .set("DOCWORKER__HTTP__ENABLED", "true")
        .set("DOCWORKER__HTTP__ADDRESS", &address)
        .set("DOCWORKER__WORKER__CONCURRENCY", "4")
        // Small batches and chunks: many requests, so the stop lands mid-job.
        .set("DOCWORKER__EMBED__BATCH_SIZE", "2")
        .set("DOCWORKER__CHUNK__SIZE", "32")
        .set("DOCWORKER__CHUNK__OVERLAP", "0");
    let base = format!("http://{address}");
    let files: Vec<(String, std::path::PathBuf)> = (0..8)
        .map(|i| {
            let name = format!("notes-{i}.txt");
            let path = stack.write(&name, prose(120, &format!("[{i}] ")));
            (name, path)
        })
        .collect();
    let refs: Vec<(&str, &std::path::Path)> = files
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    let worker = stack.worker();
    let (_batch, ids) = stack.enqueue_batch(&refs).await;

    // Both take requests; stop b once the ingest is well under way.
    let start = Instant::now();
    loop {
        let done: i64 = stack
            .db
            .client
            .query_one(
                "SELECT coalesce(sum(completed_chunks), 0) FROM job_tasks WHERE id = ANY($1)",
                &[&ids],
            )
            .await
            .unwrap()
            .get(0);
        if done >= 40 {
            break;
        }
        assert!(
            start.elapsed() < JOB_DEADLINE,
            "no progress; log:\n{}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (before_a, before_b) = (embed_requests(&a).await, embed_requests(&b).await);
    assert!(
        before_a > 0 && before_b > 0,
        "requests spread over both: a {before_a}, b {before_b}"
    );
    b.stop();

    for id in &ids {
        let row = stack.wait_finished(*id, JOB_DEADLINE).await;
        assert_eq!(
            (
                row.status.as_str(),
                row.attempt,
                row.error_message.as_deref()
            ),
            ("completed", 1, None),
            "{row:?}\n{}",
            worker.logs()
        );
        stack.assert_whole(*id).await;
    }
    let errors: i64 = stack
        .db
        .client
        .query_one(
            "SELECT count(*) FROM job_tasks, jsonb_array_elements(errors) WHERE id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(errors, 0, "no attempt failed");
    assert!(embed_requests(&a).await > before_a, "a took over the rest");
    let logs = worker.logs();
    assert!(
        logs.contains("embedding endpoint out of rotation"),
        "{logs}"
    );

    // Out of rotation, shown per endpoint; still ready (a embeds).
    let (status, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    let line = body.lines().find(|l| l.starts_with("embedder:")).unwrap();
    assert!(line.contains("1 of 2 endpoints in use"), "{line}");
    assert!(
        line.contains(&format!("{} out of rotation since", b.url())),
        "{line}"
    );
    let (_, metrics) = get(&format!("{base}/metrics")).await;
    let gauge = |url: &str| {
        let series = format!("docworker_embed_endpoint_up{{endpoint=\"{url}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series).map(str::to_string))
    };
    assert_eq!(gauge(&a.url()).as_deref(), Some("1"), "{metrics}");
    assert_eq!(gauge(&b.url()).as_deref(), Some("0"), "{metrics}");

    // b back: the probe puts it back in rotation and it takes work again.
    b.start();
    let start = Instant::now();
    loop {
        let (_, body) = get(&format!("{base}/readyz")).await;
        if body.contains("2 of 2 endpoints in use") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "b not back in rotation: {body}\n{}",
            worker.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(worker
        .logs()
        .contains("embedding endpoint back in rotation"));
    let more: Vec<Uuid> = {
        let mut ids = Vec::new();
        for i in 0..4 {
            let path = stack.write(&format!("more-{i}.txt"), prose(60, &format!("<{i}> ")));
            ids.push(
                stack
                    .ingest(
                        &format!("more-{i}.txt"),
                        &path.display().to_string(),
                        None,
                        json!({}),
                    )
                    .await,
            );
        }
        ids
    };
    for id in more {
        assert_eq!(
            stack.wait_finished(id, JOB_DEADLINE).await.status,
            "completed"
        );
    }
    assert!(embed_requests(&b).await > 0, "b takes jobs' requests again");
}
