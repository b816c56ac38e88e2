//! The document pipeline: an `ingest` job's file becomes chunks in ChromaDB;
//! a `delete` job removes a document's chunks.
//!
//! One ingest runs: resolve and read the file (within the upload root and
//! the size limit), skip the work if the same file was already indexed with
//! the same settings, parse and chunk off the async runtime, then embed and
//! store batch by batch (the next batch is embedded while the last one is
//! written), and finally delete the document's chunks of earlier runs. New
//! chunks are written before old ones are deleted, and chunk ids are
//! `{document_id}-{index}`, so a retry, a duplicate delivery or a re-upload
//! overwrites in place and never leaves the document missing or doubled.

pub mod chroma;
pub mod chunk;
pub mod embed;
pub mod endpoints;
pub mod parse;
pub mod parser_process;
pub mod record;
pub mod source;

use std::panic::AssertUnwindSafe;

use anyhow::Result;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::{FileSettings, Settings};
use crate::queue::completer::AfterCommit;
use crate::queue::{Check, JobContext, JobError, JobSpec};
use crate::store::Stage;
use chroma::{ChromaStore, Collection, Record};
use chunk::{Chunk, Chunker, Sizer};
use embed::{EmbedError, Embedder, EndpointHealth};
use parser_process::ParserProcess;
use record::{user_metadata, ChunkMeta};
use source::Disposal;
use text_splitter::ChunkSizer;

/// The services the pipeline depends on, by the names the queue's outage
/// tracking, `/readyz` and the metrics use.
pub const EMBEDDER: &str = "embedder";
pub const CHROMA: &str = "chroma";
/// `files.upload_root`: a volume not mounted (yet) is an outage too, not
/// every upload's own failure.
pub const UPLOADS: &str = "uploads";

/// Bumped when parsing or chunking changes what a file turns into, so that
/// files indexed by an older version are not skipped as unchanged.
const PIPELINE_VERSION: u32 = 3;

/// How many times a document is chunked again, each time smaller, after
/// the model refused one of its chunks as too long.
const MAX_RECHUNKS: usize = 8;

pub struct Pipeline {
    files: FileSettings,
    /// Parses files; its limits are the parse limits everywhere.
    parser: ParserProcess,
    chunker: Chunker,
    embed_batch_size: usize,
    embed_batch_bytes: usize,
    embedder: Embedder,
    store: ChromaStore,
    /// Identifies the settings that decide what a file turns into.
    settings_fingerprint: String,
}

impl Pipeline {
    pub fn new(settings: &Settings) -> Result<Pipeline> {
        let sizer = Sizer::load(&settings.chunk.tokenizer)?;
        let embedder = Embedder::new(&settings.embed)?;
        let settings_fingerprint = format!(
            "v{PIPELINE_VERSION};{};{};{}/{}",
            embedder.describe(),
            sizer.describe(),
            settings.chunk.size,
            settings.chunk.overlap
        );
        let limits = parse::Limits {
            max_unpacked_bytes: settings.files.max_unpacked_mb * 1_000_000,
            max_text_bytes: settings.files.max_text_mb * 1_000_000,
        };
        Ok(Pipeline {
            files: settings.files.clone(),
            parser: ParserProcess {
                limits,
                timeout: settings.files.parse_timeout,
                memory_bytes: settings.files.parse_memory_mb * 1_000_000,
            },
            chunker: Chunker {
                sizer,
                size: settings.chunk.size,
                overlap: settings.chunk.overlap,
            },
            embed_batch_size: settings.embed.batch_size,
            embed_batch_bytes: settings.embed.batch_bytes,
            embedder,
            store: ChromaStore::new(&settings.chroma)?,
            settings_fingerprint,
        })
    }

    /// Checks the model and the collection at start, so that a wrong
    /// setting shows in the log at once rather than in the first job's row.
    /// Only logs: the services may simply not be up yet.
    pub async fn check(&self) {
        if let Err(e) = self.upload_root_present() {
            tracing::error!(error = %e, "ingest jobs will wait for the upload root");
        }
        match self.embedder.model().await {
            Ok(info) => {
                tracing::info!(model = self.embedder.model_name(), dimension = info.dimension, context_length = ?info.context_length, "embedding model ready");
                match self
                    .store
                    .collection(self.embedder.model_name(), info.dimension)
                    .await
                {
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e.message, "vector store not ready"),
                }
            }
            Err(EmbedError::Permanent(e)) => {
                tracing::error!(error = %e, "embedding model unusable")
            }
            Err(EmbedError::Unavailable(e) | EmbedError::Transient(e) | EmbedError::TooLong(e)) => {
                tracing::warn!(error = %e, "embedding server not ready")
            }
        }
    }

    /// For readiness: do the embedding servers answer? Ready while one in
    /// rotation does; with several, the detail names each.
    pub async fn embedder_reachable(&self) -> Check {
        let endpoints = self.embedder.reachable().await;
        let usable = |e: &EndpointHealth| e.out.is_none() && e.answer.is_ok();
        let ok = endpoints.iter().any(usable);
        if let [only] = endpoints.as_slice() {
            let result = match (&only.answer, &only.out) {
                (Err(e), _) => Err(e.clone()),
                (Ok(()), Some(out)) => Err(out_of_rotation(out)),
                (Ok(()), None) => Ok(()),
            };
            return Check::new(EMBEDDER, result);
        }
        let each: Vec<String> = endpoints
            .iter()
            .map(|e| match (&e.answer, &e.out) {
                (_, Some(out)) => format!("{} {}", e.url, out_of_rotation(out)),
                (Err(why), None) => format!("{} {why}", e.url),
                (Ok(()), None) => format!("{} ok", e.url),
            })
            .collect();
        let detail = format!(
            "{} of {} endpoints in use; {}",
            endpoints.iter().filter(|e| usable(e)).count(),
            endpoints.len(),
            each.join("; ")
        );
        Check {
            name: EMBEDDER,
            ok,
            detail,
        }
    }

    /// A reload's new `embed.url` (see [`Embedder::set_urls`]).
    pub fn set_embed_urls(&self, urls: Vec<String>) {
        self.embedder.set_urls(urls);
    }

    /// After an outage: does the embedder embed again?
    pub async fn embedder_probe(&self) -> Result<(), String> {
        self.embedder.probe().await
    }

    /// For readiness and after an outage: is the upload root there?
    pub fn upload_root_present(&self) -> Result<(), String> {
        let root = &self.files.upload_root;
        if root.is_dir() {
            return Ok(());
        }
        Err(format!(
            "files.upload_root {} {}; create it, mount the uploads volume there, or set files.upload_root",
            root.display(),
            if root.exists() {
                "is not a directory"
            } else {
                "does not exist"
            }
        ))
    }

    /// For readiness: does Chroma answer its heartbeat?
    pub async fn chroma_reachable(&self) -> Result<(), String> {
        self.store.reachable().await
    }

    pub async fn ingest(&self, job: &JobSpec, ctx: &JobContext) -> Result<(), JobError> {
        ctx.set_stage(Stage::Parsing).await?;
        self.upload_root_present()
            .map_err(|e| JobError::unavailable(UPLOADS, e))?;
        let file_path = job.file_path.as_deref().unwrap_or_default();
        let user_metadata = user_metadata(&job.options)?;
        let max_bytes = self.files.max_file_mb * 1_000_000;
        let (files, path) = (self.files.clone(), file_path.to_owned());
        let (filename, limits) = (job.filename.clone(), self.parser.limits);
        // Everything the file alone can fail on fails here, before the
        // embedder or Chroma is asked.
        let (named, mut file) = blocking("reading the file", self.files.parse_timeout, move || {
            let upload = source::open(&files, &path)?;
            let file = source::read(upload.file, max_bytes)?;
            parse::precheck(&file.bytes, &filename, &limits)
                .map_err(|e| JobError::permanent(e.message))?;
            Ok((upload.named, file))
        })
        .await?;

        let model = self.embedder.model().await.map_err(embed_error)?;
        let collection = self
            .store
            .collection(self.embedder.model_name(), model.dimension)
            .await?;
        let document_id = job.document_id.to_string();
        let fingerprint = self.fingerprint(job, &user_metadata);
        if let Some(n) = self
            .already_indexed(&collection, &document_id, &file.sha256, &fingerprint)
            .await?
        {
            ctx.set_progress(n as i32, n as i32).await?;
            ctx.set_result(json!({
                "chunks": n, "unchanged": true, "file_hash": file.sha256,
                "note": "same file and settings as already indexed; not embedded again",
            }))
            .await?;
            ctx.after_commit(dispose(&self.files, &named));
            return Ok(());
        }

        let file_size = file.bytes.len();
        let bytes = std::mem::take(&mut file.bytes);
        let parsed = self.parser.parse(bytes, job.filename.clone()).await?;

        // Chunks are final before any is embedded. A chunk the model still
        // refuses as too long (a model or server that counts differently)
        // makes the whole document chunk again at a smaller size, with
        // indices, overlaps and counts recomputed; the records of the
        // refused pass are overwritten or, past the new count, removed
        // with the other stale ones below.
        // The extracted text is not kept while the chunks are embedded (it
        // would hold each document's text twice): a re-chunk reads and
        // parses the file again.
        let file_type = parsed.format.as_str();
        let mut parsed = Some(parsed);
        let mut limit = model.context_length.unwrap_or(usize::MAX);
        let mut pass = 0;
        let (meta, stored) = loop {
            let text = match parsed.take() {
                Some(text) => text,
                None => self.parse_again(job, &file.sha256).await?,
            };
            ctx.set_stage(Stage::Chunking).await?;
            let chunker = self.chunker.clone();
            let chunks = blocking("chunking", self.files.parse_timeout, move || {
                Ok(chunker.chunk(&text, limit))
            })
            .await?;
            if chunks.is_empty() {
                return Err(JobError::permanent(
                    "No text was found in this file to index.",
                ));
            }
            let generation = match pass {
                0 => format!("{}/{}", job.key.id, job.key.attempt),
                n => format!("{}/{}/{n}", job.key.id, job.key.attempt),
            };
            let meta = ChunkMeta {
                document_id: document_id.clone(),
                file_name: job.filename.clone(),
                file_type,
                file_hash: file.sha256.clone(),
                file_size,
                generation,
                fingerprint: fingerprint.clone(),
                model: self.embedder.model_name().to_string(),
                indexed_at: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                user: user_metadata.clone(),
            };
            match self.embed_and_store(ctx, &collection, chunks, &meta).await? {
                Stored::All(n) => break (meta, n),
                Stored::Refused { tokens, message } if pass < MAX_RECHUNKS => {
                    let smaller = (tokens.min(limit) * 2 / 3).max(chunk::FLOOR);
                    tracing::info!(tokens, smaller, reason = %message, "the model refused a chunk as too long; chunking the whole document again smaller");
                    limit = smaller;
                    pass += 1;
                }
                Stored::Refused { tokens, message } => {
                    return Err(JobError::permanent(format!(
                        "The embedding model refused chunks of this file as too long even after chunking it {MAX_RECHUNKS} times smaller (the last refused one: {tokens} tokens by docworker's count; {message}). Set chunk.tokenizer to the model's tokenizer.json or lower chunk.size."
                    )))
                }
            }
        };

        ctx.set_stage(Stage::Storing).await?;
        let removed = self
            .remove_stale(ctx, &collection, &document_id, &meta.generation)
            .await?;
        ctx.set_progress(stored as i32, stored as i32).await?;
        ctx.set_result(json!({
            "chunks": stored, "unchanged": false, "file_hash": meta.file_hash,
            "file_type": meta.file_type, "stale_chunks_removed": removed,
            "generation": meta.generation,
        }))
        .await?;
        ctx.after_commit(dispose(&self.files, &named));
        Ok(())
    }

    /// Reads and parses the job's file again, for a re-chunk; the file
    /// must still be the one whose hash is `sha256`.
    async fn parse_again(&self, job: &JobSpec, sha256: &str) -> Result<parse::Parsed, JobError> {
        let files = self.files.clone();
        let path = job.file_path.clone().unwrap_or_default();
        let sha256 = sha256.to_owned();
        let max_bytes = self.files.max_file_mb * 1_000_000;
        let bytes = blocking("reading the file", self.files.parse_timeout, move || {
            let upload = source::open(&files, &path)?;
            let file = source::read(upload.file, max_bytes)?;
            if file.sha256 != sha256 {
                return Err(JobError::transient(
                    "The file changed while it was being indexed; it will be indexed again.",
                ));
            }
            Ok(file.bytes)
        })
        .await?;
        self.parser.parse(bytes, job.filename.clone()).await
    }

    /// How many records of the document Chroma holds (the dashboard's job
    /// page): zero when the collection does not exist yet.
    pub async fn records_of(&self, document_id: uuid::Uuid) -> Result<usize, String> {
        let Some(collection) = self
            .store
            .existing_collection()
            .await
            .map_err(|e| e.message)?
        else {
            return Ok(0);
        };
        let filter = json!({"document_id": document_id.to_string()});
        self.store
            .get(&collection, &filter)
            .await
            .map(|records| records.len())
            .map_err(|e| e.message)
    }

    pub async fn delete(&self, job: &JobSpec, ctx: &JobContext) -> Result<(), JobError> {
        ctx.set_stage(Stage::Deleting).await?;
        let Some(collection) = self.store.existing_collection().await? else {
            ctx.set_result(json!({ "chunks_removed": 0 })).await?;
            return Ok(());
        };
        ctx.ensure_lease()?;
        let removed = self
            .store
            .delete(
                &collection,
                &json!({"document_id": job.document_id.to_string()}),
            )
            .await?;
        ctx.set_result(json!({ "chunks_removed": removed })).await?;
        Ok(())
    }

    /// Deletes the document's records of every generation but this one;
    /// called once this one is wholly written. Returns how many went.
    async fn remove_stale(
        &self,
        ctx: &JobContext,
        collection: &Collection,
        document_id: &str,
        generation: &str,
    ) -> Result<u64, JobError> {
        // Chosen here rather than with a `$ne` filter: Chroma's filters skip
        // records that lack the key, and chunks written by other tools (the
        // app's old worker) have no generation.
        let stale: Vec<String> = self
            .store
            .get(collection, &json!({"document_id": document_id}))
            .await?
            .into_iter()
            .filter(|(_, m)| m.generation.as_ref().and_then(Value::as_str) != Some(generation))
            .map(|(id, _)| id)
            .collect();
        ctx.ensure_lease()?;
        self.store.delete_ids(collection, &stale).await
    }

    /// The settings fingerprint plus what the job itself adds to each chunk.
    fn fingerprint(&self, job: &JobSpec, user: &Map<String, Value>) -> String {
        let mut h = Sha256::new();
        h.update(self.settings_fingerprint.as_bytes());
        h.update([0]);
        h.update(job.filename.as_bytes());
        h.update([0]);
        h.update(Value::Object(user.clone()).to_string().as_bytes());
        hex::encode(&h.finalize()[..8])
    }

    /// `Some(count)` when the document's chunks in the store are one whole
    /// run over this very file with these very settings. A run is whole
    /// when its indices are 0..n and its last chunk knew it was the last
    /// (`chunk_count` is the total as known when each chunk was written).
    async fn already_indexed(
        &self,
        c: &Collection,
        document_id: &str,
        sha256: &str,
        fingerprint: &str,
    ) -> Result<Option<usize>, JobError> {
        let records = self
            .store
            .get(c, &json!({"document_id": document_id}))
            .await?;
        let n = records.len();
        let Some((_, first)) = records.first() else {
            return Ok(None);
        };
        let generation = first.generation.as_ref();
        let mut seen = vec![false; n];
        let mut last_count = None;
        for (_, m) in &records {
            let same = m.generation.as_ref() == generation
                && m.file_hash.as_ref().and_then(Value::as_str) == Some(sha256)
                && m.pipeline.as_ref().and_then(Value::as_str) == Some(fingerprint);
            let index = m
                .chunk_index
                .as_ref()
                .and_then(Value::as_u64)
                .map(|i| i as usize);
            match index {
                Some(i) if same && i < n && !seen[i] => seen[i] = true,
                _ => return Ok(None),
            }
            if index == Some(n - 1) {
                last_count = m.chunk_count.as_ref().and_then(Value::as_u64);
            }
        }
        Ok((last_count == Some(n as u64)).then_some(n))
    }

    /// Embeds and stores every chunk, the two overlapping: while one batch
    /// is written to Chroma the next is embedded, so the embedder is never
    /// kept waiting on the store. Stops at a chunk the model refuses as too
    /// long, for the caller to chunk the document again.
    async fn embed_and_store(
        &self,
        ctx: &JobContext,
        collection: &Collection,
        chunks: Vec<Chunk>,
        meta: &ChunkMeta,
    ) -> Result<Stored, JobError> {
        let total = chunks.len();
        // The total first, so that no poll sees `embedding` with 0/0.
        ctx.set_progress(0, total as i32).await?;
        ctx.set_stage(Stage::Embedding).await?;
        let batches = batches(chunks, self.embed_batch_size, self.embed_batch_bytes);
        let (tx, mut rx) = mpsc::channel::<Vec<Embedded>>(1);
        let embedding = async {
            for batch in batches {
                let embedded = match self.embed_batch(batch).await? {
                    Ok(embedded) => embedded,
                    Err(refused) => return Ok(Some(refused)),
                };
                if tx.send(embedded).await.is_err() {
                    break;
                }
            }
            drop(tx);
            Ok::<Option<Stored>, JobError>(None)
        };
        let storing = async {
            let mut stored = 0usize;
            while let Some(embedded) = rx.recv().await {
                let records: Vec<Record> = embedded
                    .into_iter()
                    .enumerate()
                    .map(|(k, (chunk, embedding))| meta.record(stored + k, total, chunk, embedding))
                    .collect();
                ctx.ensure_lease()?;
                self.store.upsert(collection, &records).await?;
                stored += records.len();
                ctx.set_progress(stored as i32, total as i32).await?;
            }
            Ok::<usize, JobError>(stored)
        };
        let (refused, stored) = tokio::try_join!(embedding, storing)?;
        Ok(refused.unwrap_or(Stored::All(stored)))
    }

    /// Embeds one batch; the inner error is a chunk the model refused as
    /// too long. A batch refused as a whole is tried chunk by chunk, to
    /// tell a request too large from a chunk too long.
    async fn embed_batch(
        &self,
        batch: Vec<Chunk>,
    ) -> Result<Result<Vec<Embedded>, Stored>, JobError> {
        let texts: Vec<&str> = batch.iter().map(|c| c.text.as_str()).collect();
        match self.embedder.embed(&texts).await {
            Ok(vectors) => return Ok(Ok(batch.into_iter().zip(vectors).collect())),
            Err(EmbedError::TooLong(_)) if batch.len() > 1 => {}
            Err(EmbedError::TooLong(message)) => {
                return Ok(Err(self.refused(&batch[0], message)));
            }
            Err(e) => return Err(embed_error(e)),
        }
        let mut out = Vec::with_capacity(batch.len());
        for chunk in batch {
            match self.embedder.embed(&[chunk.text.as_str()]).await {
                Ok(mut v) => out.push((chunk, v.remove(0))),
                Err(EmbedError::TooLong(message)) => return Ok(Err(self.refused(&chunk, message))),
                Err(e) => return Err(embed_error(e)),
            }
        }
        Ok(Ok(out))
    }

    fn refused(&self, chunk: &Chunk, message: String) -> Stored {
        Stored::Refused {
            tokens: self.chunker.sizer.size(&chunk.text),
            message,
        }
    }
}

/// How far one pass of embedding and storing went.
enum Stored {
    /// Every chunk, this many.
    All(usize),
    /// The model refused a chunk of `tokens` (by the chunker's count) as too long.
    Refused { tokens: usize, message: String },
}

/// A chunk and its vector.
type Embedded = (Chunk, Vec<f32>);

/// Groups chunks into embedding requests bounded by count and total bytes.
fn batches(chunks: Vec<Chunk>, max_count: usize, max_bytes: usize) -> Vec<Vec<Chunk>> {
    let mut out = Vec::new();
    let mut current: Vec<Chunk> = Vec::new();
    let mut bytes = 0;
    for c in chunks {
        if !current.is_empty() && (current.len() >= max_count || bytes + c.text.len() > max_bytes) {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += c.text.len();
        current.push(c);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// What `files.after_success` asks to be done with the upload, as an
/// action the queue runs once the completion is committed.
fn dispose(files: &FileSettings, named: &std::path::Path) -> Option<AfterCommit> {
    Disposal::for_settings(files, named).map(|d| AfterCommit::new(move || d.apply()))
}

fn embed_error(e: EmbedError) -> JobError {
    match e {
        EmbedError::Unavailable(m) => JobError::unavailable(EMBEDDER, m),
        EmbedError::Transient(m) => JobError::transient(m),
        EmbedError::Permanent(m) | EmbedError::TooLong(m) => JobError::permanent(m),
    }
}

/// Runs CPU-bound or blocking work off the async runtime, with a time limit
/// and with a panic turned into this job's failure. A timed-out thread
/// cannot be killed; it is abandoned and its result dropped.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    limit: std::time::Duration,
    work: impl FnOnce() -> Result<T, JobError> + Send + 'static,
) -> Result<T, JobError> {
    let task =
        tokio::task::spawn_blocking(move || std::panic::catch_unwind(AssertUnwindSafe(work)));
    match tokio::time::timeout(limit, task).await {
        Err(_) => Err(JobError::permanent(format!(
            "{} took longer than files.parse_timeout ({}); the file is too large or too complex.",
            capitalise(what),
            humantime::format_duration(limit)
        ))),
        Ok(Err(join)) => Err(JobError::transient(format!(
            "{what} was interrupted: {join}"
        ))),
        Ok(Ok(Err(panic))) => {
            let why = panic_text(&*panic);
            tracing::warn!(stage = what, panic = %why, "parser panicked");
            Err(JobError::permanent(format!(
                "This file could not be read: the parser failed while {what} ({why}). The file is probably damaged or in an unusual variant of its format."
            )))
        }
        Ok(Ok(Ok(result))) => result,
    }
}

/// What a panic said, for a job's error message.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".into())
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// "out of rotation since … UTC (Ns): error", for `/readyz`.
fn out_of_rotation(out: &endpoints::Out) -> String {
    let since = humantime::format_rfc3339_seconds(out.since).to_string();
    let age = out.since.elapsed().unwrap_or_default().as_secs();
    format!(
        "out of rotation since {} UTC ({age}s), probed until it embeds; last error: {}",
        since.trim_end_matches('Z').replace('T', " "),
        out.error
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(text: &str) -> Chunk {
        Chunk {
            text: text.into(),
            start: 0,
            end: text.len(),
            page: None,
            page_end: None,
        }
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let chunks: Vec<Chunk> = (0..10).map(|_| chunk("0123456789")).collect();
        let b = batches(chunks.clone(), 4, 1000);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        let b = batches(chunks, 100, 25);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 2, 2, 2]);
        let b = batches(vec![chunk(&"x".repeat(100))], 4, 10);
        assert_eq!(b.len(), 1, "an oversized chunk still goes, alone");
    }
}
