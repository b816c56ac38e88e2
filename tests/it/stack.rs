//! The whole stack for pipeline tests: a test database, an upload directory,
//! a Chroma collection of the test's own, and the environment that points a
//! `worker` at all of them.
//!
//! By default the stack uses the shared Chroma and embed servers (see
//! `services`); a test that stops a server or injects faults passes its own.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;
use uuid::Uuid;

use crate::harness::{self, TestDb, WorkerProcess};
use crate::services::{self, EMBED_MODEL};

/// How long a pipeline job may take in tests (the real model embeds about
/// a hundred chunks a second on this machine; CI may be slower).
pub const JOB_DEADLINE: Duration = Duration::from_secs(120);

pub struct Stack {
    pub db: TestDb,
    pub uploads: TempDir,
    pub collection: String,
    pub chroma_url: String,
    pub embed_url: String,
    /// Extra settings, on top of the ones pointing at the services.
    pub extra_env: Vec<(String, String)>,
}

/// One row of `job_tasks`, as the app polls it.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub status: String,
    pub stage: Option<String>,
    pub total_chunks: i32,
    pub completed_chunks: i32,
    pub error_message: Option<String>,
    pub attempt: i32,
    pub result: Option<Value>,
}

impl Stack {
    /// A stack on the shared Chroma and embed servers.
    pub async fn new() -> Stack {
        let chroma = services::shared_chroma().url();
        let embed = services::shared_embedder().url();
        Stack::on(&chroma, &embed).await
    }

    /// A stack on the given servers.
    pub async fn on(chroma_url: &str, embed_url: &str) -> Stack {
        Stack {
            db: harness::shared().database(true).await,
            uploads: tempfile::tempdir().unwrap(),
            collection: services::unique_collection("t"),
            chroma_url: chroma_url.to_string(),
            embed_url: embed_url.to_string(),
            extra_env: Vec::new(),
        }
    }

    /// Adds a setting (e.g. `DOCWORKER__CHUNK__SIZE`).
    pub fn set(&mut self, key: &str, value: &str) -> &mut Stack {
        self.extra_env.push((key.to_string(), value.to_string()));
        self
    }

    /// The settings that point a worker at this stack.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "DOCWORKER__FILES__UPLOAD_ROOT".to_string(),
                self.uploads.path().display().to_string(),
            ),
            ("DOCWORKER__EMBED__URL".into(), self.embed_url.clone()),
            ("DOCWORKER__EMBED__MODEL".into(), EMBED_MODEL.into()),
            ("DOCWORKER__CHROMA__URL".into(), self.chroma_url.clone()),
            (
                "DOCWORKER__CHROMA__COLLECTION".into(),
                self.collection.clone(),
            ),
            ("DOCWORKER__EMBED__TIMEOUT".into(), "30s".into()),
        ];
        env.extend(self.extra_env.iter().cloned());
        env
    }

    fn env_refs(&self) -> Vec<(String, String)> {
        self.env()
    }

    /// Starts `worker run` on this stack.
    pub fn worker(&self) -> WorkerProcess {
        let env = self.env_refs();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        WorkerProcess::spawn(&self.db.url, &env)
    }

    /// Runs `worker <args>` to completion: (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let env = self.env_refs();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        tokio::task::block_in_place(|| harness::run_worker(&self.db.url, args, &env))
    }

    /// Writes an upload; returns its absolute path.
    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.uploads.path().join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Inserts a batch and one ingest task per (filename, path), as the app
    /// does; returns (batch id, task ids).
    pub async fn enqueue_batch(&self, files: &[(&str, &Path)]) -> (Uuid, Vec<Uuid>) {
        let batch: Uuid = self
            .db
            .client
            .query_one(
                "INSERT INTO job_batches (id, total_tasks) VALUES (gen_random_uuid(), $1) RETURNING id",
                &[&(files.len() as i32)],
            )
            .await
            .unwrap()
            .get(0);
        let mut ids = Vec::new();
        for (name, path) in files {
            let id: Uuid = self
                .db
                .client
                .query_one(
                    "INSERT INTO job_tasks (id, batch_id, filename, file_path) VALUES (gen_random_uuid(), $1, $2, $3) RETURNING id",
                    &[&batch, name, &path.display().to_string()],
                )
                .await
                .unwrap()
                .get(0);
            ids.push(id);
        }
        (batch, ids)
    }

    /// Inserts one ingest task; `document_id` defaults to the task id.
    pub async fn ingest(
        &self,
        filename: &str,
        file_path: &str,
        document_id: Option<Uuid>,
        options: Value,
    ) -> Uuid {
        self.db
            .client
            .query_one(
                "INSERT INTO job_tasks (id, filename, file_path, task_type, document_id, options)
                 VALUES (gen_random_uuid(), $1, $2, 'ingest', $3, $4) RETURNING id",
                &[&filename, &file_path, &document_id, &options],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Inserts a delete task for `document_id`.
    pub async fn delete(&self, document_id: Uuid) -> Uuid {
        self.db
            .client
            .query_one(
                "INSERT INTO job_tasks (id, filename, task_type, document_id)
                 VALUES (gen_random_uuid(), 'delete', 'delete', $1) RETURNING id",
                &[&document_id],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn row(&self, id: Uuid) -> TaskRow {
        let r = self
            .db
            .client
            .query_one(
                "SELECT status::text, stage, total_chunks, completed_chunks, error_message, attempt, result
                   FROM job_tasks WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        TaskRow {
            status: r.get(0),
            stage: r.get(1),
            total_chunks: r.get(2),
            completed_chunks: r.get(3),
            error_message: r.get(4),
            attempt: r.get(5),
            result: r.get(6),
        }
    }

    /// Waits until the job is completed or error (or cancelled); returns
    /// its row. Panics at the deadline with the row.
    pub async fn wait_finished(&self, id: Uuid, deadline: Duration) -> TaskRow {
        let start = Instant::now();
        loop {
            let row = self.row(id).await;
            if matches!(row.status.as_str(), "completed" | "error" | "cancelled") {
                return row;
            }
            if start.elapsed() > deadline {
                panic!("job {id} not finished after {deadline:?}: {row:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The collection's records of one document: (id, metadata), sorted by
    /// chunk_index.
    pub async fn chunks_of(&self, document_id: Uuid) -> Vec<(String, Value)> {
        let got = services::get_where(
            &self.chroma_url,
            &self.collection,
            json!({"document_id": document_id.to_string()}),
        )
        .await;
        let ids = got["ids"].as_array().cloned().unwrap_or_default();
        let metas = got["metadatas"].as_array().cloned().unwrap_or_default();
        let mut out: Vec<(String, Value)> = ids
            .into_iter()
            .zip(metas)
            .map(|(id, m)| (id.as_str().unwrap().to_string(), m))
            .collect();
        out.sort_by_key(|(_, m)| m["chunk_index"].as_u64());
        out
    }

    /// Checks that the store holds exactly one whole run of the document:
    /// ids `{doc}-0..n`, one generation, `n` records. Returns `n`.
    pub async fn assert_whole(&self, document_id: Uuid) -> usize {
        let chunks = self.chunks_of(document_id).await;
        let n = chunks.len();
        let generations: std::collections::BTreeSet<String> = chunks
            .iter()
            .map(|(_, m)| m["generation"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(
            generations.len(),
            1,
            "one generation expected: {generations:?}"
        );
        for (i, (id, m)) in chunks.iter().enumerate() {
            assert_eq!(id, &format!("{document_id}-{i}"));
            assert_eq!(m["chunk_index"].as_u64(), Some(i as u64));
        }
        n
    }
}
