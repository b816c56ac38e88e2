//! The embedding and vector-store configuration: `worker --once` on a real
//! file, the OpenAI-compatible provider and its key, Ollama models that are
//! missing or cannot embed, an embedder that is down, a collection made for
//! another model, the unchanged-file skip, and Chroma's auth header.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::inputs::{assert_permanent, errors_of};
use crate::services::{self, EmbedServer, COLLECTIONS, EMBED_DIMS, EMBED_MODEL};
use crate::stack::Stack;

/// The log without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `worker --once --job <id>` on the stack: (exit code, stdout, stderr
/// without colour codes).
fn once(stack: &Stack, id: Uuid) -> (i32, String, String) {
    let (code, out, err) = stack.run(&["--once", "--job", &id.to_string()]);
    (code, out, strip_ansi(&err))
}

/// Stack-style ingest of a file written into the stack's upload directory.
async fn ingest_file(stack: &Stack, name: &str, text: &str, document_id: Option<Uuid>) -> Uuid {
    let path = stack.write(name, text);
    stack
        .ingest(name, &path.display().to_string(), document_id, json!({}))
        .await
}

/// The stored embeddings of one document.
async fn embeddings_of(stack: &Stack, document_id: Uuid) -> Vec<Vec<f64>> {
    let id = services::collection_id(&stack.chroma_url, &stack.collection)
        .await
        .expect("the collection exists");
    let (status, body) = services::request(
        reqwest::Method::POST,
        &format!("{}{COLLECTIONS}/{id}/get", stack.chroma_url),
        Some(&json!({
            "where": {"document_id": document_id.to_string()},
            "include": ["embeddings"],
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body["embeddings"].clone()).expect("embeddings")
}

/// The metadata of the collection called `name`.
async fn collection_metadata(chroma: &str, name: &str) -> Value {
    let (status, body) = services::request(
        reqwest::Method::GET,
        &format!("{chroma}{COLLECTIONS}/{name}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "GET collection {name}: {body}");
    body["metadata"].clone()
}

const WHALES: &str = "Blue whales are the largest animals ever known to have lived. \
    They feed almost exclusively on krill, eating up to four tonnes a day in summer.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_logs_every_stage_in_order_and_the_completion() {
    let stack = Stack::new().await;
    let text = format!(
        "# Whales\n\n{}\n\n## Songs\n\n{}",
        WHALES.repeat(10),
        "Humpback whales sing long, complex songs that change from year to year. ".repeat(10)
    );
    let id = ingest_file(&stack, "whales.md", &text, None).await;
    let (code, out, err) = stack.run(&["--once"]);
    let log = strip_ansi(&err);
    assert_eq!(code, 0, "stdout:\n{out}\nlog:\n{log}");
    assert!(
        out.contains(&format!("job {id} attempt 1: completed")),
        "stdout: {out}"
    );

    let mut at = 0;
    let mut positions = Vec::new();
    for stage in ["parsing", "chunking", "embedding", "storing"] {
        let needle = format!("stage stage=\"{stage}\"");
        assert_eq!(
            log.matches(&needle).count(),
            1,
            "{stage}: logged once expected\n{log}"
        );
        let found = log[at..]
            .find(&needle)
            .map(|p| p + at)
            .unwrap_or_else(|| panic!("stage {stage} not logged after the previous one:\n{log}"));
        let line = log[..found].rsplit('\n').next().unwrap_or_default();
        assert!(
            line.contains(&id.to_string()),
            "stage line without the job id: {line}"
        );
        positions.push(found);
        at = found;
    }
    let completed = log
        .find("job completed")
        .unwrap_or_else(|| panic!("no completion in the log:\n{log}"));
    assert!(completed > at, "completion logged before storing:\n{log}");

    let row = stack.row(id).await;
    assert_eq!(row.status, "completed", "{row:?}");
    assert_eq!(row.stage.as_deref(), Some("done"));
    assert!(row.total_chunks > 1, "{row:?}");
    assert_eq!(row.completed_chunks, row.total_chunks);
    assert_eq!(stack.assert_whole(id).await, row.total_chunks as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_provider_with_its_key_and_a_wrong_key() {
    let embedder = EmbedServer::start_new(&["--api-key", "k"]);
    let chroma = services::shared_chroma().url();

    let mut good = Stack::on(&chroma, &embedder.url()).await;
    good.set("DOCWORKER__EMBED__PROVIDER", "openai")
        .set("DOCWORKER__EMBED__API_KEY", "k");
    let id = ingest_file(&good, "whales.txt", WHALES, None).await;
    let (code, out, log) = once(&good, id);
    assert_eq!(code, 0, "stdout:\n{out}\nlog:\n{log}");
    let row = good.row(id).await;
    assert_eq!(row.status, "completed", "{row:?}\n{log}");
    let vectors = embeddings_of(&good, id).await;
    assert!(!vectors.is_empty());
    assert!(
        vectors.iter().all(|v| v.len() == EMBED_DIMS),
        "dimensions: {:?}",
        vectors.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // The vectors are the model's: a question finds the chunk.
    let question = services::embed(&embedder.url(), &["What do blue whales eat?"]).await;
    let hits = services::query(&chroma, &good.collection, &question[0], 1).await;
    assert_eq!(
        hits["metadatas"][0][0]["document_id"],
        json!(id.to_string()),
        "{hits}"
    );
    assert!(
        hits["distances"][0][0].as_f64().unwrap() < 0.5,
        "the answer is far from the question: {hits}"
    );
    assert_eq!(
        collection_metadata(&chroma, &good.collection).await["embedding_dimension"],
        json!(EMBED_DIMS)
    );

    let mut wrong = Stack::on(&chroma, &embedder.url()).await;
    wrong
        .set("DOCWORKER__EMBED__PROVIDER", "openai")
        .set("DOCWORKER__EMBED__API_KEY", "not-the-key");
    let id = ingest_file(&wrong, "whales.txt", WHALES, None).await;
    let (code, out, log) = once(&wrong, id);
    assert_eq!(code, 3, "stdout:\n{out}\nlog:\n{log}");
    let logs = || log.clone();
    assert_permanent(
        &wrong,
        id,
        "wrong API key",
        &["refused the credentials", "embed.api_key"],
        &logs,
    )
    .await;
    assert!(wrong.chunks_of(id).await.is_empty());
}

/// An OpenAI-compatible server gives no model metadata: with
/// `embed.dimension` set, a probe is checked against it before any
/// collection is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dimension_other_than_configured_fails_permanently() {
    let mut stack = Stack::new().await;
    stack
        .set("DOCWORKER__EMBED__PROVIDER", "openai")
        .set("DOCWORKER__EMBED__DIMENSION", "768");
    let id = ingest_file(&stack, "whales.txt", WHALES, None).await;
    let (code, out, log) = once(&stack, id);
    assert_eq!(code, 3, "stdout:\n{out}\nlog:\n{log}");
    let logs = || log.clone();
    assert_permanent(
        &stack,
        id,
        "dimension mismatch",
        &["dimension mismatch", "384", "768"],
        &logs,
    )
    .await;
    assert_eq!(
        services::collection_id(&stack.chroma_url, &stack.collection).await,
        None,
        "no collection is made for a size the model does not produce"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_model_missing_or_not_for_embedding_fails_permanently() {
    let mut stack = Stack::new().await;
    stack.set("DOCWORKER__EMBED__MODEL", "nomodel");
    let id = ingest_file(&stack, "a.txt", WHALES, None).await;
    let (code, _, log) = once(&stack, id);
    assert_eq!(code, 3, "{log}");
    let logs = || log.clone();
    assert_permanent(
        &stack,
        id,
        "missing model",
        &["\"nomodel\"", "ollama pull nomodel"],
        &logs,
    )
    .await;

    stack.set("DOCWORKER__EMBED__MODEL", services::CHAT_MODEL);
    let id = ingest_file(&stack, "b.txt", WHALES, None).await;
    let (code, _, log) = once(&stack, id);
    assert_eq!(code, 3, "{log}");
    let logs = || log.clone();
    assert_permanent(
        &stack,
        id,
        "chat model",
        &["\"chat-model\"", "not an embedding model", "embed.model"],
        &logs,
    )
    .await;
    assert_eq!(
        services::count(&stack.chroma_url, &stack.collection).await,
        0
    );
}

/// An embedder nobody answers for (and whose probe fails too) is down: the
/// job goes back `pending` with its attempt unspent and a message saying
/// what it waits for; nothing is deleted or created meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_embedder_pauses_the_job_unspent() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let mut stack = Stack::on(&services::shared_chroma().url(), &url).await;
    stack.set("DOCWORKER__FILES__AFTER_SUCCESS", "delete");
    let id = ingest_file(&stack, "a.txt", WHALES, None).await;
    let (code, out, log) = once(&stack, id);
    assert_eq!(code, 3, "stdout:\n{out}\nlog:\n{log}");

    let row = stack.row(id).await;
    assert_eq!(row.status, "pending", "{row:?}\n{log}");
    assert_eq!(row.attempt, 0, "the attempt is not spent: {row:?}");
    let message = row.error_message.clone().unwrap_or_default();
    for needle in [
        "Paused: embedder has been unavailable since",
        "this attempt does not count",
        "could not be reached",
        &url,
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    assert_eq!(errors_of(&stack, id).await, json!([]));
    assert!(
        stack.uploads.path().join("a.txt").exists(),
        "the file of a job that waits was deleted"
    );
    assert!(
        services::collection_id(&stack.chroma_url, &stack.collection)
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_made_for_another_model_is_refused() {
    let stack = Stack::new().await;
    let (status, body) = services::request(
        reqwest::Method::POST,
        &format!("{}{COLLECTIONS}", stack.chroma_url),
        Some(&json!({
            "name": stack.collection,
            "metadata": {"embedding_model": "other-model", "embedding_dimension": 768},
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = ingest_file(&stack, "a.txt", WHALES, None).await;
    let (code, _, log) = once(&stack, id);
    assert_eq!(code, 3, "{log}");
    let logs = || log.clone();
    assert_permanent(
        &stack,
        id,
        "collection of another model",
        &[
            "\"other-model\"",
            &format!("\"{EMBED_MODEL}\""),
            &format!("\"{}\"", stack.collection),
            "chroma.collection",
        ],
        &logs,
    )
    .await;
    // The collection is left as it was: its metadata and no records.
    let meta = collection_metadata(&stack.chroma_url, &stack.collection).await;
    assert_eq!(meta["embedding_model"], json!("other-model"), "{meta}");
    assert_eq!(meta["embedding_dimension"], json!(768), "{meta}");
    assert_eq!(
        services::count(&stack.chroma_url, &stack.collection).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_file_is_not_embedded_again() {
    let embedder = EmbedServer::start_new(&[]);
    let stack = Stack::on(&services::shared_chroma().url(), &embedder.url()).await;
    let document = Uuid::new_v4();
    let text = WHALES.repeat(8);
    let first = ingest_file(&stack, "whales.txt", &text, Some(document)).await;
    let (code, _, log) = once(&stack, first);
    assert_eq!(code, 0, "{log}");
    let row = stack.row(first).await;
    let result = row.result.clone().unwrap_or(Value::Null);
    assert_eq!(result["unchanged"], json!(false), "{result}");
    let chunks = stack.assert_whole(document).await;
    let generation = stack.chunks_of(document).await[0].1["generation"].clone();
    let embedded = || async { embedder.stats().await["embed_requests"].as_u64().unwrap() };
    let after_first = embedded().await;
    assert!(after_first > 0, "the first run embedded nothing?");

    // The same file again, for the same document: skipped.
    let second = ingest_file(&stack, "whales.txt", &text, Some(document)).await;
    let (code, _, log) = once(&stack, second);
    assert_eq!(code, 0, "{log}");
    let row = stack.row(second).await;
    assert_eq!(row.status, "completed", "{row:?}");
    let result = row.result.clone().unwrap_or(Value::Null);
    assert_eq!(result["unchanged"], json!(true), "{result}\n{log}");
    assert_eq!(result["chunks"], json!(chunks), "{result}");
    assert_eq!(
        embedded().await,
        after_first,
        "the unchanged file was sent to the embedder\n{log}"
    );
    assert_eq!(stack.assert_whole(document).await, chunks);
    assert_eq!(
        stack.chunks_of(document).await[0].1["generation"],
        generation,
        "the chunks were rewritten"
    );

    // The same file with new metadata for its chunks: not skipped, or the
    // new metadata would never reach Chroma.
    let path = stack.write("whales.txt", &text);
    let third = stack
        .ingest(
            "whales.txt",
            &path.display().to_string(),
            Some(document),
            json!({"metadata": {"project": "oceans"}}),
        )
        .await;
    let (code, _, log) = once(&stack, third);
    assert_eq!(code, 0, "{log}");
    let result = stack.row(third).await.result.unwrap_or(Value::Null);
    assert_eq!(result["unchanged"], json!(false), "{result}");
    let after_third = embedded().await;
    assert!(
        after_third > after_first,
        "new metadata, but nothing was embedded"
    );
    assert_eq!(stack.assert_whole(document).await, chunks);
    let chunk_meta = stack.chunks_of(document).await;
    assert!(
        chunk_meta
            .iter()
            .all(|(_, m)| m["project"] == json!("oceans")),
        "{chunk_meta:?}"
    );
    let generation = chunk_meta[0].1["generation"].clone();

    // A changed file is embedded again and replaces the old chunks.
    let fourth = ingest_file(
        &stack,
        "whales.txt",
        &format!("{text} Sperm whales dive deeper than any other mammal."),
        Some(document),
    )
    .await;
    let (code, _, log) = once(&stack, fourth);
    assert_eq!(code, 0, "{log}");
    let result = stack.row(fourth).await.result.unwrap_or(Value::Null);
    assert_eq!(result["unchanged"], json!(false), "{result}");
    assert!(embedded().await > after_third);
    stack.assert_whole(document).await;
    assert_ne!(
        stack.chunks_of(document).await[0].1["generation"],
        generation
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chroma_token_is_sent_and_an_open_server_ignores_it() {
    let mut stack = Stack::new().await;
    stack.set("DOCWORKER__CHROMA__TOKEN", "secret");
    let id = ingest_file(&stack, "a.txt", WHALES, None).await;
    let (code, out, log) = once(&stack, id);
    assert_eq!(code, 0, "stdout:\n{out}\nlog:\n{log}");
    assert!(stack.assert_whole(id).await > 0);
}
