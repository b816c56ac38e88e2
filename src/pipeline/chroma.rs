//! The vector-store client: ChromaDB's v2 HTTP API over reqwest.
//!
//! It finds or creates the tenant, database and collection once (cosine
//! distance, the embedding model and dimension recorded in the collection's
//! metadata, and refuses a collection made for another model), then upserts,
//! reads and deletes records. Every failure comes back as a [`JobError`]:
//! unreachable, 429 and 5xx are transient; anything the server refuses as
//! invalid is permanent.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use super::embed::source_chain;
use super::CHROMA;
use crate::config::ChromaSettings;
use crate::observe::metrics;
use crate::queue::JobError;

/// Metadata keys on the collection that say which vectors it holds.
const MODEL_KEY: &str = "embedding_model";
const DIMENSION_KEY: &str = "embedding_dimension";

#[derive(Debug, Clone)]
pub struct Collection {
    pub id: String,
    /// Records per write: the configured cap, lowered to the server's
    /// `max_batch_size` (which the server itself does not enforce).
    pub batch_size: usize,
}

/// One record to write.
pub struct Record {
    pub id: String,
    pub embedding: Vec<f32>,
    pub document: String,
    pub metadata: Map<String, Value>,
}

pub struct ChromaStore {
    http: reqwest::Client,
    settings: ChromaSettings,
    collection: Mutex<Option<Collection>>,
}

/// The metadata keys of a stored chunk that the pipeline reads back (for
/// the unchanged check and to find stale chunks); others are not kept.
#[derive(Debug, Default, Deserialize)]
pub struct RecordMeta {
    pub generation: Option<Value>,
    pub file_hash: Option<Value>,
    pub pipeline: Option<Value>,
    pub chunk_index: Option<Value>,
    pub chunk_count: Option<Value>,
}

#[derive(Deserialize)]
struct GetAnswer {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    metadatas: Vec<Option<RecordMeta>>,
}

impl ChromaStore {
    pub fn new(settings: &ChromaSettings) -> anyhow::Result<ChromaStore> {
        let mut headers = reqwest::header::HeaderMap::new();
        if !settings.token.is_empty() {
            let name = HeaderName::from_bytes(settings.auth_header.trim().as_bytes())
                .map_err(|e| anyhow::anyhow!("invalid value for chroma.auth_header: {e}"))?;
            let mut value = HeaderValue::from_str(&settings.token)
                .map_err(|e| anyhow::anyhow!("invalid value for chroma.token: {e}"))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(settings.timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(ChromaStore {
            http,
            settings: settings.clone(),
            collection: Mutex::new(None),
        })
    }

    /// Whether the server answers its heartbeat: for readiness probes.
    pub async fn reachable(&self) -> Result<(), String> {
        self.call(reqwest::Method::GET, "/api/v2/heartbeat", None)
            .await
            .map(|_| ())
            .map_err(|e| e.message)
    }

    pub fn url(&self) -> &str {
        &self.settings.url
    }

    /// The collection, found or created on first use and remembered.
    pub async fn collection(&self, model: &str, dimension: usize) -> Result<Collection, JobError> {
        let mut cached = self.collection.lock().await;
        if let Some(c) = &*cached {
            return Ok(c.clone());
        }
        let checks = self
            .call(reqwest::Method::GET, "/api/v2/pre-flight-checks", None)
            .await?;
        let server_max = checks
            .get("max_batch_size")
            .and_then(Value::as_u64)
            .map_or(usize::MAX, |n| n as usize);
        let s = &self.settings;
        self.ensure(
            &format!("/api/v2/tenants/{}", s.tenant),
            "/api/v2/tenants",
            &s.tenant,
        )
        .await?;
        self.ensure(
            &format!("/api/v2/tenants/{}/databases/{}", s.tenant, s.database),
            &format!("/api/v2/tenants/{}/databases", s.tenant),
            &s.database,
        )
        .await?;
        let body = json!({
            "name": s.collection,
            "metadata": { MODEL_KEY: model, DIMENSION_KEY: dimension, "created_by": "docworker" },
            "configuration": { "hnsw": { "space": "cosine" } },
            "get_or_create": true,
        });
        let found = self
            .call(reqwest::Method::POST, &self.collections_path(), Some(&body))
            .await?;
        self.check_collection(&found, model, dimension)?;
        let id = found
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                JobError::transient(format!(
                    "ChromaDB at {} answered a collection without an id: {found}",
                    s.url
                ))
            })?
            .to_string();
        let collection = Collection {
            id,
            batch_size: s.batch_size.min(server_max).max(1),
        };
        tracing::info!(collection = %s.collection, id = %collection.id, batch_size = collection.batch_size, "using Chroma collection");
        *cached = Some(collection.clone());
        Ok(collection)
    }

    /// The collection if it exists, looked up by name without creating
    /// anything or checking the model: what a delete needs, so that
    /// deleting works while the embedder is down, and deleting from a
    /// collection that was never created is simply done.
    pub async fn existing_collection(&self) -> Result<Option<Collection>, JobError> {
        if let Some(c) = &*self.collection.lock().await {
            return Ok(Some(c.clone()));
        }
        let path = format!("{}/{}", self.collections_path(), self.settings.collection);
        let found = match self.call(reqwest::Method::GET, &path, None).await {
            Ok(found) => found,
            Err(e) if e.message.contains("HTTP 404") => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(id) = found.get("id").and_then(Value::as_str) else {
            return Ok(None);
        };
        Ok(Some(Collection {
            id: id.to_string(),
            batch_size: self.settings.batch_size,
        }))
    }

    /// A collection made for another model would mix vectors from two
    /// spaces, and every query against it would quietly return nonsense.
    fn check_collection(
        &self,
        found: &Value,
        model: &str,
        dimension: usize,
    ) -> Result<(), JobError> {
        let name = &self.settings.collection;
        let meta = found.get("metadata").cloned().unwrap_or(Value::Null);
        let stored_model = meta.get(MODEL_KEY).and_then(Value::as_str);
        let stored_dim = meta
            .get(DIMENSION_KEY)
            .and_then(Value::as_u64)
            .or_else(|| found.get("dimension").and_then(Value::as_u64));
        if let Some(m) = stored_model.filter(|m| *m != model) {
            return Err(JobError::permanent(format!(
                "Chroma collection {name:?} holds embeddings of model {m:?}, but docworker is configured with {model:?}. Set chroma.collection to a new collection, or embed.model back to {m:?}."
            )));
        }
        if let Some(d) = stored_dim.filter(|d| *d as usize != dimension) {
            return Err(JobError::permanent(format!(
                "Chroma collection {name:?} holds {d}-dimensional embeddings, but model {model:?} makes {dimension}-dimensional ones. Set chroma.collection to a new collection."
            )));
        }
        Ok(())
    }

    /// Writes records, in requests of at most the collection's batch size.
    pub async fn upsert(&self, c: &Collection, records: &[Record]) -> Result<(), JobError> {
        for part in records.chunks(c.batch_size) {
            let body = json!({
                "ids": part.iter().map(|r| &r.id).collect::<Vec<_>>(),
                "embeddings": part.iter().map(|r| &r.embedding).collect::<Vec<_>>(),
                "documents": part.iter().map(|r| &r.document).collect::<Vec<_>>(),
                "metadatas": part.iter().map(|r| &r.metadata).collect::<Vec<_>>(),
            });
            self.record_call(c, "upsert", &body).await?;
        }
        Ok(())
    }

    /// The ids and metadata of every record matching `filter`.
    pub async fn get(
        &self,
        c: &Collection,
        filter: &Value,
    ) -> Result<Vec<(String, RecordMeta)>, JobError> {
        let body = json!({ "where": filter, "include": ["metadatas"] });
        let text = self.record_call_text(c, "get", &body).await?;
        // Typed, so that only the keys the pipeline reads are kept: a
        // document's records as a JSON tree took 7 MB per 1,000 chunks, and
        // four 10 MB PDFs finishing at once added 56 MB to the worker's peak.
        let answer: GetAnswer = serde_json::from_str(&text).map_err(|e| {
            JobError::transient(format!("ChromaDB's answer to get was not understood: {e}"))
        })?;
        drop(text);
        Ok(answer
            .ids
            .into_iter()
            .zip(
                answer
                    .metadatas
                    .into_iter()
                    .map(Option::unwrap_or_default)
                    .chain(std::iter::repeat_with(RecordMeta::default)),
            )
            .collect())
    }

    /// Deletes the records with these ids, in requests of at most the
    /// collection's batch size.
    pub async fn delete_ids(&self, c: &Collection, ids: &[String]) -> Result<u64, JobError> {
        let mut deleted = 0;
        for part in ids.chunks(c.batch_size) {
            let answer = self
                .record_call(c, "delete", &json!({ "ids": part }))
                .await?;
            deleted += answer
                .get("deleted")
                .and_then(Value::as_u64)
                .unwrap_or(part.len() as u64);
        }
        Ok(deleted)
    }

    /// Deletes every record matching `filter`; deleting nothing succeeds.
    pub async fn delete(&self, c: &Collection, filter: &Value) -> Result<u64, JobError> {
        let answer = self
            .record_call(c, "delete", &json!({ "where": filter }))
            .await?;
        Ok(answer.get("deleted").and_then(Value::as_u64).unwrap_or(0))
    }

    async fn record_call(&self, c: &Collection, op: &str, body: &Value) -> Result<Value, JobError> {
        let text = self.record_call_text(c, op, body).await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn record_call_text(
        &self,
        c: &Collection,
        op: &str,
        body: &Value,
    ) -> Result<String, JobError> {
        let path = format!("{}/{}/{op}", self.collections_path(), c.id);
        match self
            .call_text(reqwest::Method::POST, &path, Some(body))
            .await
        {
            Err(e) if e.message.contains("HTTP 404") => {
                // The collection was deleted behind our back: forget it, so
                // the retry finds or creates it again.
                *self.collection.lock().await = None;
                Err(JobError::transient(format!(
                    "Chroma collection {:?} disappeared while in use; it will be created again.",
                    self.settings.collection
                )))
            }
            other => other,
        }
    }

    fn collections_path(&self) -> String {
        format!(
            "/api/v2/tenants/{}/databases/{}/collections",
            self.settings.tenant, self.settings.database
        )
    }

    /// GETs `get_path`; if it is not there, POSTs `{"name"}` to `create_path`
    /// (409 "already exists" is fine: another worker was first).
    async fn ensure(&self, get_path: &str, create_path: &str, name: &str) -> Result<(), JobError> {
        match self.call(reqwest::Method::GET, get_path, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.message.contains("HTTP 404") => {
                match self
                    .call(
                        reqwest::Method::POST,
                        create_path,
                        Some(&json!({ "name": name })),
                    )
                    .await
                {
                    Err(e) if !e.message.contains("HTTP 409") => Err(e),
                    _ => Ok(()),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, JobError> {
        let text = self.call_text(method, path, body).await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A request's answer (2xx) as text.
    async fn call_text(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<String, JobError> {
        let url = format!("{}{path}", self.settings.url.trim_end_matches('/'));
        let mut request = self.http.request(method, &url);
        if let Some(b) = body {
            request = request.json(b);
        }
        let unreachable = |e: reqwest::Error| {
            let what = if e.is_timeout() {
                format!(
                    "did not answer within chroma.timeout ({:?})",
                    self.settings.timeout
                )
            } else {
                "could not be reached".into()
            };
            JobError::unavailable(
                CHROMA,
                format!(
                    "ChromaDB at {} {what}: {}",
                    self.settings.url,
                    source_chain(&e)
                ),
            )
        };
        let started = Instant::now();
        let answer = async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            Ok::<_, reqwest::Error>((status, response.text().await?))
        }
        .await;
        metrics::request(
            "chroma",
            operation(path),
            matches!(&answer, Ok((status, _)) if (200..300).contains(status)),
            started.elapsed(),
        );
        let (status, text) = answer.map_err(unreachable)?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        let parsed: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let message = parsed
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| text.trim().chars().take(300).collect(), str::to_string);
        let error = format!(
            "ChromaDB at {} answered HTTP {status} to {path}: {message}",
            self.settings.url
        );
        Err(match status {
            // Overloaded or failing: down for every job alike.
            429 | 500..=599 => JobError::unavailable(CHROMA, error),
            // A collection or database that is not there (yet): this
            // job's retry finds or creates it.
            404 | 409 => JobError::transient(error),
            401 | 403 => JobError::permanent(format!(
                "{error}. Check chroma.auth_header and chroma.token."
            )),
            _ => JobError::permanent(error),
        })
    }
}

/// The metrics label for a request path.
fn operation(path: &str) -> &'static str {
    match path.rsplit('/').next() {
        Some("upsert") => "upsert",
        Some("get") => "get",
        Some("delete") => "delete",
        Some("query") => "query",
        Some("heartbeat") => "heartbeat",
        _ => "setup",
    }
}
