//! Bad input: every kind of file a user can get wrong ends its job in
//! `error` at once (permanent, never retried) with a message that says what
//! is wrong, loses nothing (the file stays where it was, nothing half-written
//! in Chroma), and the daemon carries on with the next job.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use docworker::bench::procfs::{children_of, process_cpu_seconds};
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::fixtures;
use crate::harness::WorkerProcess;
use crate::services;
use crate::stack::{Stack, TaskRow, JOB_DEADLINE};

/// The row's `errors` column: one entry per failed attempt.
pub async fn errors_of(stack: &Stack, id: Uuid) -> Value {
    stack
        .db
        .client
        .query_one("SELECT errors FROM job_tasks WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0)
}

/// Checks that the job ended in `error` on its first attempt with one
/// permanent failure recorded, and that its message contains every one of
/// `needles`. Returns the message. `logs` is shown when
/// an assertion fails.
pub async fn assert_permanent(
    stack: &Stack,
    id: Uuid,
    what: &str,
    needles: &[&str],
    logs: &dyn Fn() -> String,
) -> String {
    let row = stack.wait_finished(id, JOB_DEADLINE).await;
    assert_eq!(row.status, "error", "{what}: {row:?}\n{}", logs());
    assert_eq!(row.attempt, 1, "{what}: retried? {row:?}\n{}", logs());
    let errors = errors_of(stack, id).await;
    let list = errors.as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 1, "{what}: one failure expected: {errors}");
    assert_eq!(list[0]["kind"], json!("permanent"), "{what}: {errors}");
    assert_eq!(list[0]["attempt"], json!(1), "{what}: {errors}");
    assert_eq!(row.result, None, "{what}: a failed job has no result");
    let message = row.error_message.clone().unwrap_or_default();
    assert_eq!(
        list[0]["message"].as_str(),
        Some(message.as_str()),
        "{what}: error_message and errors[0].message differ"
    );
    for needle in needles {
        assert!(
            message.contains(needle),
            "{what}: the message should mention {needle:?}: {message:?}"
        );
    }
    message
}

/// Waits for the job and checks that it completed; returns the row.
pub async fn assert_completed(
    stack: &Stack,
    id: Uuid,
    what: &str,
    logs: &dyn Fn() -> String,
) -> TaskRow {
    let row = stack.wait_finished(id, JOB_DEADLINE).await;
    assert_eq!(row.status, "completed", "{what}: {row:?}\n{}", logs());
    row
}

/// The documents (chunk texts) stored for `document_id`, in chunk order.
pub async fn documents_of(stack: &Stack, document_id: Uuid) -> Vec<String> {
    let got = services::get_where(
        &stack.chroma_url,
        &stack.collection,
        json!({"document_id": document_id.to_string()}),
    )
    .await;
    let docs = got["documents"].as_array().cloned().unwrap_or_default();
    let metas = got["metadatas"].as_array().cloned().unwrap_or_default();
    let mut pairs: Vec<(u64, String)> = metas
        .iter()
        .zip(docs)
        .map(|(m, d)| {
            (
                m["chunk_index"].as_u64().unwrap_or(u64::MAX),
                d.as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    pairs.sort();
    pairs.into_iter().map(|(_, d)| d).collect()
}

/// Whether the worker process is still running.
pub fn alive(worker: &mut WorkerProcess) -> bool {
    matches!(worker.child.try_wait(), Ok(None))
}

/// `n` bytes of noise, the same on every run (`seed`), starting with bytes
/// no file signature starts with.
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    bytes[..2].copy_from_slice(&[0x01, 0x00]);
    bytes
}

fn png_with_noise() -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    bytes.extend(random_bytes(4096, 1));
    bytes
}

fn zip_of(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, data) in entries {
        zip.start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(data.as_bytes()).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// A .docx whose ZIP directory is intact but whose `word/document.xml`
/// data is overwritten with junk: it opens, and fails to inflate.
fn docx_with_damaged_entry() -> Vec<u8> {
    let paragraph = "The quarterly report covers revenue, costs and hiring plans. ".repeat(40);
    let mut bytes = fixtures::docx(&[&paragraph]);
    let name = b"word/document.xml";
    let header = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("the local header names word/document.xml")
        - 30;
    assert_eq!(&bytes[header..header + 4], b"PK\x03\x04");
    let le16 = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
    let le32 = |at: usize| {
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
    };
    let compressed = le32(header + 18);
    let data = header + 30 + le16(header + 26) + le16(header + 28);
    assert!(
        compressed > 40,
        "the entry is compressed to {compressed} bytes"
    );
    for b in &mut bytes[data + 4..data + compressed - 4] {
        *b = 0xFF;
    }
    bytes
}

const GOOD_TEXT: &str = "Lighthouses guide ships along dangerous coasts. \
    The Fresnel lens, invented in 1822, made their beams visible for more than twenty miles.";

/// A bad upload and what its error message must say.
struct Bad {
    what: &'static str,
    filename: String,
    file_path: String,
    needles: &'static [&'static str],
    /// A file that must still exist when the test ends.
    keep: Option<PathBuf>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_fail_permanently_with_clear_messages_and_the_daemon_keeps_going() {
    let mut stack = Stack::new().await;
    stack
        .set("DOCWORKER__FILES__MAX_FILE_MB", "1")
        .set("DOCWORKER__FILES__MAX_UNPACKED_MB", "5")
        .set("DOCWORKER__FILES__AFTER_SUCCESS", "delete");
    // Files outside the upload root, next to it (the upload root is a
    // temporary directory, so its parent is the temporary directory too).
    let outside_dir = stack
        .uploads
        .path()
        .parent()
        .expect("the upload root has a parent")
        .to_path_buf();
    let outside_rel = tempfile::Builder::new()
        .prefix("docworker-outside-")
        .suffix(".txt")
        .tempfile_in(&outside_dir)
        .unwrap();
    std::fs::write(outside_rel.path(), "a secret outside the upload root").unwrap();
    let outside_abs = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(outside_abs.path(), "another secret outside the upload root").unwrap();
    let outside_link_target = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(outside_link_target.path(), "a third secret").unwrap();

    let mut bads: Vec<Bad> = Vec::new();
    let mut bad = |what: &'static str,
                   filename: &str,
                   bytes: Option<Vec<u8>>,
                   needles: &'static [&'static str]| {
        let (file_path, keep) = match bytes {
            Some(bytes) => {
                let path = stack.write(filename, bytes);
                (path.display().to_string(), Some(path))
            }
            None => (filename.to_string(), None),
        };
        bads.push(Bad {
            what,
            filename: filename.to_string(),
            file_path,
            needles,
            keep,
        });
    };

    let mut corrupt_pdf = b"%PDF-1.4\n".to_vec();
    corrupt_pdf.extend(random_bytes(3000, 2));
    bad(
        "corrupt PDF",
        "corrupt.pdf",
        Some(corrupt_pdf),
        &["PDF", "damaged", "upload it again"],
    );
    let long_page =
        "Tides are caused by the gravitational pull of the moon and the sun.\n".repeat(30);
    let whole = fixtures::pdf(&[&long_page, &long_page, &long_page]);
    bad(
        "truncated PDF",
        "truncated.pdf",
        Some(whole[..whole.len() / 2].to_vec()),
        &["PDF", "damaged"],
    );
    bad(
        "scanned PDF",
        "scan.pdf",
        Some(fixtures::pdf_without_text(2)),
        &["no extractable text (scanned PDF? needs OCR)"],
    );
    bad("empty file", "empty.txt", Some(Vec::new()), &["empty"]);
    bad(
        "whitespace-only file",
        "blank.txt",
        Some(b"   \n\n\t  \r\n   ".to_vec()),
        &["whitespace"],
    );
    bad(
        "PNG named .txt",
        "picture.txt",
        Some(png_with_noise()),
        &["PNG image", "not a text document"],
    );
    bad(
        "random bytes named .txt",
        "noise.txt",
        Some(random_bytes(8192, 3)),
        &["binary file", "not a text document"],
    );
    bad(
        "file over files.max_file_mb",
        "huge.txt",
        Some(
            GOOD_TEXT
                .repeat(2_000_000 / GOOD_TEXT.len() + 1)
                .into_bytes(),
        ),
        &["over the 1 MB limit", "files.max_file_mb"],
    );
    bad(
        "zip bomb",
        "bomb.docx",
        Some(fixtures::docx_bomb(50_000_000)),
        &["more than 5 MB", "zip bomb", "refused"],
    );
    bad(
        "zip bomb whose headers lie about its size",
        "liar.docx",
        Some(fixtures::docx_bomb_declaring(50_000_000, Some(1_000))),
        &["more than 5 MB", "zip bomb", "refused"],
    );
    bad(
        "HTML without visible text",
        "tracking.html",
        Some(
            b"<!doctype html><html><head><script>var t = 1;</script></head><body><nav>Home</nav></body></html>"
                .to_vec(),
        ),
        &["HTML", "no visible text"],
    );
    bad(
        "JSON without values",
        "empty.json",
        Some(br#"{"a": {}, "b": [], "c": null, "d": ""}"#.to_vec()),
        &["JSON", "no values"],
    );
    bad(
        "CSV with a header only",
        "header.csv",
        Some(b"name,email,phone\n".to_vec()),
        &["CSV", "no data rows"],
    );
    bad(
        "PNG named .pdf",
        "report.pdf",
        Some(png_with_noise()),
        &["PNG image"],
    );
    bad(
        "xlsx",
        "budget.xlsx",
        Some(zip_of(&[
            ("[Content_Types].xml", "<Types/>"),
            ("xl/workbook.xml", "<workbook/>"),
            ("xl/worksheets/sheet1.xml", "<worksheet/>"),
        ])),
        &["Excel spreadsheet", "not supported", "CSV"],
    );
    bad(
        "invalid JSON named .json",
        "config.json",
        Some(b"{\n  \"name\": \"docworker\",\n  \"tags\": [\"a\", \"b\",, ]\n}\n".to_vec()),
        &["not valid JSON", "line 3", "column"],
    );
    let docx = fixtures::docx(&["A perfectly good paragraph about gardening."]);
    bad(
        "truncated docx",
        "cut.docx",
        Some(docx[..docx.len() / 2].to_vec()),
        &["Word document", "damaged"],
    );
    bad(
        "docx with a damaged entry",
        "damaged.docx",
        Some(docx_with_damaged_entry()),
        &["Word document", "damaged"],
    );
    let name = outside_rel.path().file_name().unwrap().to_str().unwrap();
    bad(
        "../ out of the upload root",
        &format!("../{name}"),
        None,
        &["outside the upload directory"],
    );
    bad(
        "absolute path outside the upload root",
        &outside_abs.path().display().to_string(),
        None,
        &["outside the upload directory"],
    );
    bad(
        "file that does not exist",
        "never-uploaded.txt",
        None,
        &["does not exist", "never-uploaded.txt"],
    );
    bad("an empty file_path", "", None, &["no file_path"]);
    std::fs::create_dir(stack.uploads.path().join("folder.txt")).unwrap();
    bad("a directory", "folder.txt", None, &["not a regular file"]);
    let link = stack.uploads.path().join("innocent.txt");
    std::os::unix::fs::symlink(outside_link_target.path(), &link).unwrap();
    bads.push(Bad {
        what: "symlink pointing out of the upload root",
        filename: "innocent.txt".into(),
        file_path: link.display().to_string(),
        needles: &["outside the upload directory"],
        keep: Some(link.clone()),
    });

    // Good files around the bad ones.
    let goods: Vec<(&str, PathBuf, &str)> = vec![
        (
            "lighthouses.txt",
            stack.write("lighthouses.txt", GOOD_TEXT),
            "txt",
        ),
        (
            "notes.pdf",
            stack.write(
                "notes.pdf",
                "Plain text notes, saved with the wrong extension by a confused mail client.",
            ),
            "txt",
        ),
        (
            "guide.md",
            stack.write(
                "guide.md",
                "# Sourdough\n\nFeed the starter daily with equal weights of flour and water.",
            ),
            "md",
        ),
        (
            "minutes.pdf",
            stack.write(
                "minutes.pdf",
                fixtures::pdf(&["Meeting minutes: the board approved the new budget."]),
            ),
            "pdf",
        ),
    ];

    let mut files: Vec<(&str, &Path)> = Vec::new();
    for b in &bads {
        files.push((&b.filename, Path::new(&b.file_path)));
    }
    for (name, path, _) in &goods {
        files.push((name, path));
    }
    let (batch, ids) = stack.enqueue_batch(&files).await;
    let mut worker = stack.worker();
    let logs = || worker.logs();

    for (b, id) in bads.iter().zip(&ids) {
        assert_permanent(&stack, *id, b.what, b.needles, &logs).await;
        assert_eq!(
            services::count_where(
                &stack.chroma_url,
                &stack.collection,
                json!({"document_id": id.to_string()})
            )
            .await,
            0,
            "{}: nothing of a failed file may be in Chroma",
            b.what
        );
    }
    for ((name, path, file_type), id) in goods.iter().zip(&ids[bads.len()..]) {
        let row = assert_completed(&stack, *id, name, &logs).await;
        let result = row.result.clone().unwrap_or_default();
        assert_eq!(result["file_type"], json!(file_type), "{name}: {result}");
        let chunks = stack.chunks_of(*id).await;
        assert!(!chunks.is_empty(), "{name}: no chunks in Chroma");
        assert_eq!(chunks[0].1["file_type"], json!(file_type), "{name}");
        // after_success = delete: a completed job's file goes, but only
        // after its completion is recorded, which it now is.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while path.exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !path.exists(),
            "{name}: completed, but its file was not deleted"
        );
    }

    // A failed job's file is never deleted (nor is anything outside the root).
    for b in &bads {
        if let Some(path) = &b.keep {
            assert!(
                path.symlink_metadata().is_ok(),
                "{}: the failed job's file {} is gone",
                b.what,
                path.display()
            );
        }
    }
    for outside in [
        outside_rel.path(),
        outside_abs.path(),
        outside_link_target.path(),
    ] {
        assert!(outside.exists(), "{} is gone", outside.display());
    }

    let (done, failed): (i32, i32) = {
        let r = stack
            .db
            .client
            .query_one(
                "SELECT completed_tasks, failed_tasks FROM job_batches WHERE id = $1",
                &[&batch],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (done, failed),
        (goods.len() as i32, bads.len() as i32),
        "batch counts"
    );

    // The daemon is still up, and still working.
    assert!(alive(&mut worker), "the worker died\n{}", worker.logs());
    let later = stack.write(
        "later.txt",
        "Otters hold hands while they sleep so they do not drift apart.",
    );
    let id = stack
        .ingest("later.txt", &later.display().to_string(), None, json!({}))
        .await;
    let logs = || worker.logs();
    assert_completed(&stack, id, "a job after the bad ones", &logs).await;
    assert!(alive(&mut worker), "the worker died\n{}", worker.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_success_move_moves_completed_files_only() {
    let mut stack = Stack::new().await;
    let done_dir = tempfile::tempdir().unwrap();
    let move_to = done_dir.path().join("done");
    stack
        .set("DOCWORKER__FILES__AFTER_SUCCESS", "move")
        .set("DOCWORKER__FILES__MOVE_TO", &move_to.display().to_string());
    let good = stack.write(
        "sub/tea.txt",
        "Green tea and black tea come from the same plant, Camellia sinensis.",
    );
    let bad = stack.write("sub/blank.txt", "  \n\n  ");
    let good_id = stack
        .ingest("tea.txt", &good.display().to_string(), None, json!({}))
        .await;
    let bad_id = stack
        .ingest("blank.txt", &bad.display().to_string(), None, json!({}))
        .await;
    let worker = stack.worker();
    let logs = || worker.logs();

    assert_completed(&stack, good_id, "tea.txt", &logs).await;
    assert_permanent(&stack, bad_id, "blank.txt", &["whitespace"], &logs).await;

    let moved = move_to.join("tea.txt");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !moved.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        moved.exists(),
        "tea.txt was not moved to {}\n{}",
        move_to.display(),
        logs()
    );
    assert!(!good.exists(), "tea.txt is still in the upload directory");
    assert_eq!(
        std::fs::read_to_string(&moved).unwrap(),
        "Green tea and black tea come from the same plant, Camellia sinensis."
    );
    assert!(bad.exists(), "the failed job's file was moved or deleted");
    assert!(!move_to.join("blank.txt").exists());
}

/// Two uploads of the same name from different folders (two users' "report.txt")
/// both complete under after_success = move: neither file may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_success_move_never_overwrites_an_earlier_file() {
    let mut stack = Stack::new().await;
    let done_dir = tempfile::tempdir().unwrap();
    let move_to = done_dir.path().join("done");
    stack
        .set("DOCWORKER__FILES__AFTER_SUCCESS", "move")
        .set("DOCWORKER__FILES__MOVE_TO", &move_to.display().to_string());
    let texts = [
        "Alice's report: the river flooded the lower fields twice this spring.",
        "Bob's report: the orchard yielded more apples than in any year before.",
    ];
    let mut ids = Vec::new();
    for (who, text) in ["alice", "bob"].iter().zip(texts) {
        let path = stack.write(&format!("{who}/report.txt"), text);
        ids.push(
            stack
                .ingest("report.txt", &path.display().to_string(), None, json!({}))
                .await,
        );
    }
    let worker = stack.worker();
    let logs = || worker.logs();
    for id in &ids {
        assert_completed(&stack, *id, "report.txt", &logs).await;
    }
    // Both completions are recorded; give the moves a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let kept = loop {
        let gone_from_uploads = ["alice", "bob"]
            .iter()
            .all(|who| !stack.uploads.path().join(who).join("report.txt").exists());
        let kept = std::fs::read_dir(&move_to)
            .map(|d| {
                d.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if gone_from_uploads || std::time::Instant::now() > deadline {
            break kept;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for text in texts {
        let anywhere = kept.iter().any(|k| k == text)
            || ["alice", "bob"].iter().any(|who| {
                std::fs::read_to_string(stack.uploads.path().join(who).join("report.txt"))
                    .is_ok_and(|k| k == text)
            });
        assert!(
            anywhere,
            "an uploaded file was lost by after_success = move: {text:?} is neither in {} \
             (which holds {kept:?}) nor in the upload directory\n{}",
            move_to.display(),
            logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_metadata_reaches_chroma_and_bad_keys_fail_permanently() {
    let stack = Stack::new().await;
    let path = stack.write(
        "bees.txt",
        "Honey bees communicate the direction of flowers with a waggle dance.",
    );
    let path = path.display().to_string();
    let good = stack
        .ingest(
            "bees.txt",
            &path,
            None,
            json!({"metadata": {"project": "apollo", "year": 2024, "draft": false, "score": 0.5, "gone": null}}),
        )
        .await;
    let nested = stack
        .ingest(
            "bees.txt",
            &path,
            None,
            json!({"metadata": {"project": "apollo", "owner": {"name": "ann"}}}),
        )
        .await;
    let listed = stack
        .ingest(
            "bees.txt",
            &path,
            None,
            json!({"metadata": {"tags": ["a", "b"]}}),
        )
        .await;
    let reserved = stack
        .ingest(
            "bees.txt",
            &path,
            None,
            json!({"metadata": {"document_id": "mine"}}),
        )
        .await;
    let not_object = stack
        .ingest("bees.txt", &path, None, json!({"metadata": "apollo"}))
        .await;
    let worker = stack.worker();
    let logs = || worker.logs();

    assert_completed(&stack, good, "flat metadata", &logs).await;
    let chunks = stack.chunks_of(good).await;
    assert!(!chunks.is_empty());
    for (id, m) in &chunks {
        assert_eq!(m["project"], json!("apollo"), "{id}: {m}");
        assert_eq!(m["year"], json!(2024), "{id}: {m}");
        assert_eq!(m["draft"], json!(false), "{id}: {m}");
        assert_eq!(m["score"], json!(0.5), "{id}: {m}");
        assert!(
            m.get("gone").is_none(),
            "{id}: a null value is left out: {m}"
        );
        assert_eq!(m["document_id"], json!(good.to_string()), "{id}: {m}");
    }
    // Chroma can filter on it.
    assert_eq!(
        services::count_where(
            &stack.chroma_url,
            &stack.collection,
            json!({"project": "apollo"})
        )
        .await,
        chunks.len()
    );

    assert_permanent(&stack, nested, "nested metadata", &["owner", "flat"], &logs).await;
    assert_permanent(&stack, listed, "list metadata", &["tags", "flat"], &logs).await;
    assert_permanent(
        &stack,
        reserved,
        "reserved key",
        &["\"document_id\"", "reserved"],
        &logs,
    )
    .await;
    assert_permanent(
        &stack,
        not_object,
        "metadata not an object",
        &["options.metadata", "object"],
        &logs,
    )
    .await;
    for id in [nested, listed, reserved, not_object] {
        assert!(stack.chunks_of(id).await.is_empty(), "{id} left chunks");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_encodings_are_stored_as_utf8() {
    let stack = Stack::new().await;
    let french = "Le menu du dîner de Noël : café crème brûlée, pâté de campagne, \
        salade niçoise et gâteau à la crème fraîche. Le chef a préparé une sauce \
        béarnaise très appréciée ; les invités ont trouvé le repas délicieux, \
        surtout la crème brûlée servie après le fromage affiné.";
    let (cp1252, _, unmappable) = encoding_rs::WINDOWS_1252.encode(french);
    assert!(!unmappable);
    assert!(
        std::str::from_utf8(&cp1252).is_err(),
        "the sample must not be UTF-8"
    );
    let utf16le: Vec<u8> = [0xFF, 0xFE]
        .into_iter()
        .chain(french.encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    let utf16be: Vec<u8> = [0xFE, 0xFF]
        .into_iter()
        .chain(french.encode_utf16().flat_map(u16::to_be_bytes))
        .collect();
    let utf16le_without_bom: Vec<u8> = french.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let short = "Dessert : café crème brûlée.\n";
    let (short_cp1252, _, _) = encoding_rs::WINDOWS_1252.encode(short);
    let cases = [
        ("menu-1252.txt", cp1252.into_owned(), french),
        ("dessert-1252.txt", short_cp1252.into_owned(), short),
        ("menu-utf16le.txt", utf16le, french),
        ("menu-utf16be.txt", utf16be, french),
        ("menu-utf16le-nobom.txt", utf16le_without_bom, french),
    ];
    let mut ids = Vec::new();
    for (name, bytes, _) in &cases {
        let path = stack.write(name, bytes);
        ids.push(
            stack
                .ingest(name, &path.display().to_string(), None, json!({}))
                .await,
        );
    }
    let worker = stack.worker();
    let logs = || worker.logs();
    for ((name, _, original), id) in cases.iter().zip(&ids) {
        let row = assert_completed(&stack, *id, name, &logs).await;
        assert_eq!(row.result.as_ref().unwrap()["file_type"], json!("txt"));
        let text = documents_of(&stack, *id).await.join(" ");
        assert!(
            text.contains("café crème brûlée"),
            "{name}: stored text is {text:?}"
        );
        assert_eq!(text.trim(), original.trim(), "{name}");
        assert!(
            !text.contains('\u{FFFD}'),
            "{name}: replacement characters: {text:?}"
        );
        assert!(
            !text.contains('\u{FEFF}'),
            "{name}: the BOM was indexed: {text:?}"
        );
    }
}

/// The parser processes the worker `pid` has running.
fn parser_children(pid: u32) -> Vec<u32> {
    children_of(pid)
        .into_iter()
        .filter(|child| {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains("__parse-child")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runaway_parser_is_killed_at_its_timeout_and_other_jobs_never_notice() {
    let mut stack = Stack::new().await;
    stack
        .set("DOCWORKER__FILES__PARSE_TIMEOUT", "4s")
        .set("DOCWORKER__WORKER__CONCURRENCY", "2");
    // html5ever is quadratic in nesting depth: 2 MB of unclosed <div>s
    // would keep a core busy for hours.
    let hostile = stack.write("deep.html", "<div>".repeat(400_000) + "text");
    let good = stack.write("good.txt", GOOD_TEXT);
    let worker = stack.worker();
    let pid = worker.pid();

    let hostile_id = stack
        .ingest("deep.html", &hostile.display().to_string(), None, json!({}))
        .await;
    let started = std::time::Instant::now();
    let mut children = Vec::new();
    while children.is_empty() && started.elapsed() < Duration::from_secs(10) {
        children = parser_children(pid);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(children.len(), 1, "the HTML is parsed in a child process");

    // While the parser spins, another job runs as usual.
    let good_id = stack
        .ingest("good.txt", &good.display().to_string(), None, json!({}))
        .await;
    let good_row = stack.wait_finished(good_id, JOB_DEADLINE).await;
    assert_eq!(good_row.status, "completed", "{good_row:?}");

    let row = stack.wait_finished(hostile_id, JOB_DEADLINE).await;
    assert_eq!(row.status, "error", "{row:?}");
    let message = row.error_message.unwrap_or_default();
    assert!(
        message.contains("Parsing took longer than files.parse_timeout (4s)"),
        "{message}"
    );
    assert_eq!(row.attempt, 1, "a timeout is permanent: no retry");

    // The child is gone and the worker is idle again.
    assert_eq!(parser_children(pid), Vec::<u32>::new());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = process_cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = process_cpu_seconds(pid) - before;
    assert!(
        used < 0.5,
        "the worker used {used:.2} s of CPU in 3 s after the job failed"
    );
    let logs = worker.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parser_over_its_memory_limit_fails_its_job_alone() {
    let mut stack = Stack::new().await;
    stack
        .set("DOCWORKER__FILES__PARSE_MEMORY_MB", "256")
        .set("DOCWORKER__FILES__MAX_UNPACKED_MB", "1000")
        .set("DOCWORKER__FILES__MAX_TEXT_MB", "1000");
    // Within the unpacking limit, far beyond the parser's memory.
    let bomb = stack.write("big.docx", fixtures::docx_bomb(600_000_000));
    let good = stack.write("good.txt", GOOD_TEXT);
    let mut worker = stack.worker();
    let bomb_id = stack
        .ingest("big.docx", &bomb.display().to_string(), None, json!({}))
        .await;
    let good_id = stack
        .ingest("good.txt", &good.display().to_string(), None, json!({}))
        .await;
    let row = stack.wait_finished(bomb_id, JOB_DEADLINE).await;
    assert_eq!(row.status, "error", "{row:?}");
    let message = row.error_message.unwrap_or_default();
    // Whichever allocation fails first: one that reports it (unpacking),
    // or one that aborts the parser process.
    assert!(
        message.contains("more memory than the parser may use (files.parse_memory_mb)")
            || message.contains("needed more than files.parse_memory_mb (256 MB)"),
        "{message}\n{}",
        worker.logs()
    );
    let good_row = stack.wait_finished(good_id, JOB_DEADLINE).await;
    assert_eq!(good_row.status, "completed", "{good_row:?}");
    assert!(alive(&mut worker), "{}", worker.logs());
}
