//! The Python examples in `examples/`, run the way the app runs that code:
//! against a running `worker`, a migrated database, Chroma and the embedding
//! server. This is how CI runs them; each test also checks in the database
//! and in Chroma what the script says it did.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use crate::harness::run_command;
use crate::services::{self, EMBED_MODEL};
use crate::stack::{Stack, JOB_DEADLINE};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

/// How long one example script may run.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(300);

/// The sample documents in examples/docs.
const DOCS: &[&str] = &[
    "bicycle-care.txt",
    "honeybees.html",
    "lighthouses.pdf",
    "sourdough.md",
];

/// Runs `examples/<script> <args>` with the test venv's python and nothing
/// from this process's environment but PATH; returns (exit code, stdout, stderr).
fn python(script: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(services::venv().join("bin/python"));
    cmd.arg(Path::new(EXAMPLES).join(script))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    tokio::task::block_in_place(|| run_command(cmd, SCRIPT_DEADLINE))
}

/// Runs app_asyncpg.py or app_sqlalchemy.py against a worker and checks
/// what it claims: each step's outcome, in job_batches/job_tasks and Chroma.
async fn app_example(script: &str) {
    let stack = Stack::new().await;
    let worker = stack.worker();
    // The app saves uploads below the worker's upload root.
    let uploads = stack.uploads.path().join("app");
    let (code, out, err) = python(
        script,
        &[
            "--database-url",
            &stack.db.url,
            "--uploads",
            uploads.to_str().unwrap(),
        ],
    );
    assert_eq!(
        code,
        0,
        "{script} failed\nstdout:\n{out}\nstderr:\n{err}\nworker log:\n{}",
        worker.logs()
    );
    println!("{script}:\n{out}"); // shown with --nocapture, or when the test fails
    let doc: Uuid = out
        .lines()
        .find_map(|l| l.strip_prefix("OK  sourdough.md document_id="))
        .unwrap_or_else(|| panic!("{script} printed no OK line:\n{out}"))
        .parse()
        .unwrap();
    let c = &stack.db.client;

    // The three batches: the single upload, the batch whose missing file
    // was retried, and the one whose task was cancelled.
    let batches: Vec<(String, i32, i32, Vec<String>)> = c
        .query(
            "SELECT b.status::text, b.completed_tasks, b.total_tasks,
                    array_agg(t.filename::text ORDER BY t.filename)
               FROM job_batches b JOIN job_tasks t ON t.batch_id = b.id
              GROUP BY b.id ORDER BY min(t.created_at)",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        batches,
        vec![
            ("completed".into(), 1, 1, names(&["sourdough.md"])),
            (
                "completed".into(),
                3,
                3,
                names(&["honeybees.html", "lighthouses.pdf", "notes.txt"])
            ),
            (
                "completed_with_errors".into(),
                0,
                1,
                names(&["bicycle-care.txt"])
            ),
        ],
        "{out}"
    );

    // notes.txt failed once, permanently (its file was missing), and the
    // retry indexed it.
    let r = c
        .query_one(
            "SELECT id, status::text, attempt, errors FROM job_tasks WHERE filename = 'notes.txt'",
            &[],
        )
        .await
        .unwrap();
    let (notes, status, attempt, errors): (Uuid, String, i32, Value) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    assert_eq!((status.as_str(), attempt), ("completed", 2), "{errors}");
    let errors = errors.as_array().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["kind"], "permanent", "{errors:?}");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{errors:?}"
    );
    assert_eq!(stack.assert_whole(notes).await, 1);

    // The cancelled task never ran and stored nothing.
    let r = c
        .query_one(
            "SELECT id, status::text, attempt, error_message FROM job_tasks
              WHERE filename = 'bicycle-care.txt'",
            &[],
        )
        .await
        .unwrap();
    let bicycle: Uuid = r.get(0);
    assert_eq!(
        (r.get::<_, String>(1), r.get::<_, i32>(2)),
        ("cancelled".to_string(), 0)
    );
    assert_eq!(
        r.get::<_, Option<String>>(3).as_deref(),
        Some("Cancelled by request.")
    );
    assert!(stack.chunks_of(bicycle).await.is_empty());

    // The deleted document has no chunks left; the delete task says how
    // many went. The others are still there, the PDF's chunks with pages.
    assert!(stack.chunks_of(doc).await.is_empty());
    let r = c
        .query_one(
            "SELECT status::text, result FROM job_tasks
              WHERE task_type = 'delete' AND document_id = $1",
            &[&doc],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "completed");
    assert!(r.get::<_, Value>(1)["chunks_removed"].as_u64() >= Some(1));
    let pdf: Uuid = c
        .query_one(
            "SELECT id FROM job_tasks WHERE filename = 'lighthouses.pdf'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let pages: Vec<u64> = stack
        .chunks_of(pdf)
        .await
        .iter()
        .map(|(_, m)| m["page"].as_u64().expect("a PDF chunk has a page"))
        .collect();
    assert!(pages.iter().any(|&p| p > 1), "pages {pages:?}");
    let kept: i64 = c
        .query_one(
            "SELECT sum(total_chunks) FROM job_tasks
              WHERE task_type = 'ingest' AND status = 'completed' AND id <> $1",
            &[&doc],
        )
        .await
        .unwrap()
        .get(0);
    let total = services::count(&stack.chroma_url, &stack.collection).await;
    assert_eq!(total as i64, kept, "records in the collection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_asyncpg_example_runs_against_the_worker() {
    app_example("app_asyncpg.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_sqlalchemy_example_runs_against_the_worker() {
    app_example("app_sqlalchemy.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_example_answers_from_the_right_document_and_page() {
    let stack = Stack::new().await;
    let files: Vec<(&str, std::path::PathBuf)> = DOCS
        .iter()
        .map(|name| {
            let bytes = std::fs::read(Path::new(EXAMPLES).join("docs").join(name)).unwrap();
            (*name, stack.write(name, bytes))
        })
        .collect();
    let refs: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let (_, ids) = stack.enqueue_batch(&refs).await;
    let worker = stack.worker();
    for (name, id) in DOCS.iter().zip(&ids) {
        let row = stack.wait_finished(*id, JOB_DEADLINE).await;
        assert_eq!(
            row.status,
            "completed",
            "{name}: {row:?}\n{}",
            worker.logs()
        );
    }

    let settings = [
        "--ollama-url",
        &stack.embed_url,
        "--model",
        EMBED_MODEL,
        "--chroma-url",
        &stack.chroma_url,
        "--collection",
        &stack.collection,
    ];
    let ask = |question: &str, extra: &[&str]| {
        let mut args = vec![question];
        args.extend(settings);
        args.extend(extra);
        let (code, out, err) = python("query.py", &args);
        assert_eq!(
            code, 0,
            "query.py {question:?}\nstdout:\n{out}\nstderr:\n{err}"
        );
        out
    };

    // Each question has one right document; the PDF's answer is on page 2.
    let cases: &[(&str, &str, Option<u64>)] = &[
        (
            "Who built the Bell Rock Lighthouse, and when was it first lit?",
            "lighthouses.pdf",
            Some(2),
        ),
        (
            "How do honeybees tell each other where the flowers are?",
            "honeybees.html",
            None,
        ),
        (
            "How often should a sourdough starter be fed?",
            "sourdough.md",
            None,
        ),
        (
            "How often should I oil my bike chain?",
            "bicycle-care.txt",
            None,
        ),
    ];
    for (question, file, page) in cases {
        let hits: Value = serde_json::from_str(&ask(question, &["--json", "-n", "3"])).unwrap();
        let top = &hits[0];
        assert_eq!(top["metadata"]["file_name"], *file, "{question}: {hits:#}");
        if let Some(page) = page {
            assert_eq!(top["metadata"]["page"], *page, "{question}: {hits:#}");
        }
        assert!(top["distance"].as_f64().unwrap() < 0.6, "{hits:#}");
    }

    // What a person sees: the source, its page and the sentence that answers.
    let out = ask(cases[0].0, &[]);
    let first = out.lines().nth(1).unwrap_or_default();
    assert!(
        first.starts_with("1. lighthouses.pdf, page 2  (distance 0."),
        "{out}"
    );
    assert!(out.contains("Robert Stevenson"), "{out}");
}
