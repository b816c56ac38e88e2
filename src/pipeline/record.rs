//! The chunk record: what docworker writes to ChromaDB for each chunk, and
//! which metadata keys a job may add. This is the contract with whoever
//! queries the collection (the app's retriever, `examples/query.py`); the
//! keys are listed in README.md.

use serde_json::{json, Map, Value};

use super::chroma::Record;
use super::chunk::Chunk;
use crate::queue::JobError;

/// Metadata keys docworker writes on every chunk; a job's own metadata may
/// not use them.
pub(crate) const RESERVED_KEYS: &[&str] = &[
    "document_id",
    "doc_id",
    "ref_doc_id",
    "file_name",
    "file_type",
    "file_hash",
    "file_size_bytes",
    "chunk_index",
    "chunk_count",
    "page",
    "page_start",
    "page_end",
    "start_byte",
    "end_byte",
    "generation",
    "pipeline",
    "embedding_model",
    "indexed_at",
];

/// What every chunk of one run carries.
pub(crate) struct ChunkMeta {
    pub(crate) document_id: String,
    pub(crate) file_name: String,
    pub(crate) file_type: &'static str,
    pub(crate) file_hash: String,
    pub(crate) file_size: usize,
    pub(crate) generation: String,
    pub(crate) fingerprint: String,
    pub(crate) model: String,
    pub(crate) indexed_at: String,
    pub(crate) user: Map<String, Value>,
}

impl ChunkMeta {
    pub(crate) fn record(
        &self,
        index: usize,
        total: usize,
        chunk: Chunk,
        embedding: Vec<f32>,
    ) -> Record {
        let mut m = self.user.clone();
        for key in ["document_id", "doc_id", "ref_doc_id"] {
            m.insert(key.into(), json!(self.document_id));
        }
        m.insert("file_name".into(), json!(self.file_name));
        m.insert("file_type".into(), json!(self.file_type));
        m.insert("file_hash".into(), json!(self.file_hash));
        m.insert("file_size_bytes".into(), json!(self.file_size));
        m.insert("chunk_index".into(), json!(index));
        m.insert("chunk_count".into(), json!(total));
        if let Some(page) = chunk.page {
            m.insert("page".into(), json!(page));
            m.insert("page_start".into(), json!(page));
            m.insert("page_end".into(), json!(chunk.page_end.unwrap_or(page)));
        }
        m.insert("start_byte".into(), json!(chunk.start));
        m.insert("end_byte".into(), json!(chunk.end));
        m.insert("generation".into(), json!(self.generation));
        m.insert("pipeline".into(), json!(self.fingerprint));
        m.insert("embedding_model".into(), json!(self.model));
        m.insert("indexed_at".into(), json!(self.indexed_at));
        Record {
            id: format!("{}-{index}", self.document_id),
            embedding,
            document: chunk.text,
            metadata: m,
        }
    }
}

/// The job's own chunk metadata: `options.metadata`, flat scalars only
/// (Chroma refuses nested values), under keys docworker does not use.
pub(crate) fn user_metadata(options: &Map<String, Value>) -> Result<Map<String, Value>, JobError> {
    let Some(given) = options.get("metadata") else {
        return Ok(Map::new());
    };
    let Value::Object(given) = given else {
        return Err(JobError::permanent(
            "options.metadata must be a JSON object of flat values, e.g. {\"project\": \"x\"}.",
        ));
    };
    let mut out = Map::new();
    for (key, value) in given {
        if RESERVED_KEYS.contains(&key.as_str())
            || key.is_empty()
            || key.starts_with('#')
            || key.starts_with('$')
            || key.starts_with("chroma:")
        {
            return Err(JobError::permanent(format!(
                "options.metadata key {key:?} is reserved (docworker or ChromaDB uses it): rename it."
            )));
        }
        match value {
            Value::Null => {}
            Value::Bool(_) | Value::Number(_) | Value::String(_) => {
                out.insert(key.clone(), value.clone());
            }
            _ => {
                return Err(JobError::permanent(format!(
                    "options.metadata.{key} is not a string, number or boolean: ChromaDB metadata must be flat. Flatten it, e.g. \"{key}_name\": \"...\"."
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_metadata_must_be_flat_and_unreserved() {
        let ok = json!({"metadata": {"project": "x", "year": 2024, "draft": false, "gone": null}});
        let m = user_metadata(ok.as_object().unwrap()).unwrap();
        assert_eq!(m.len(), 3);
        for bad in [
            json!({"metadata": {"nested": {"a": 1}}}),
            json!({"metadata": {"list": [1, 2]}}),
            json!({"metadata": {"document_id": "x"}}),
            json!({"metadata": {"$and": 1}}),
            json!({"metadata": "x"}),
        ] {
            let e = user_metadata(bad.as_object().unwrap()).unwrap_err();
            assert_eq!(e.kind, crate::store::ErrorKind::Permanent, "{bad}");
        }
    }
}
