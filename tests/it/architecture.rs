//! The shape ARCHITECTURE.md promises, checked on the source itself: SQL on
//! the queue's tables only in the store, a queue that knows nothing of
//! documents, imports between wings that point one way, and files short
//! enough to read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            (rel, text)
        })
        .collect()
}

/// The code of a file without its comments (line comments and doc
/// comments), so that prose naming a table or a module does not count.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.trim_start().starts_with("//") {
            true => "",
            false => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level module (wing) a file belongs to: `src/queue/x.rs` ->
/// `queue`, `src/db.rs` -> `db`.
fn wing(rel: &str) -> String {
    let inner = rel.trim_start_matches("src/");
    let first = inner.split('/').next().unwrap();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn sql_on_the_queue_tables_is_written_only_in_the_store() {
    let sql = [
        "FROM job_tasks",
        "JOIN job_tasks",
        "UPDATE job_tasks",
        "INTO job_tasks",
        "TRUNCATE job_tasks",
        "ANALYZE job_tasks",
        "FROM job_batches",
        "UPDATE job_batches",
        "INTO job_batches",
        "docworker_migrations",
        "docworker_enqueue_batch",
        "docworker_retry(",
        "docworker_cancel(",
    ];
    let mut offenders = Vec::new();
    for (rel, text) in sources() {
        if rel.starts_with("src/store/") {
            continue;
        }
        let code = code_of(&text);
        for needle in &sql {
            if code.contains(needle) {
                offenders.push(format!("{rel}: {needle}"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "SQL outside src/store/: {offenders:#?}"
    );
}

#[test]
fn the_queue_and_the_store_know_nothing_of_documents() {
    for (rel, text) in sources() {
        if !(rel.starts_with("src/queue/") || rel.starts_with("src/store/")) {
            continue;
        }
        let code = code_of(&text);
        for needle in ["crate::pipeline", "crate::tasks", "Pipeline"] {
            assert!(!code.contains(needle), "{rel} names {needle}");
        }
    }
}

#[test]
fn imports_between_wings_point_one_way() {
    let wings: BTreeSet<String> = sources().iter().map(|(rel, _)| wing(rel)).collect();
    let mut arrows: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in sources() {
        let from = wing(&rel);
        if from == "main" || from == "lib" {
            continue;
        }
        let code = code_of(&text);
        for to in &wings {
            if *to != from && code.contains(&format!("crate::{to}")) {
                arrows.entry(from.clone()).or_default().insert(to.clone());
            }
        }
    }
    // Depth-first search for a cycle.
    fn visit(
        node: &str,
        arrows: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(at) = path.iter().position(|n| n == node) {
            panic!("import cycle: {} -> {node}", path[at..].join(" -> "));
        }
        if done.contains(node) {
            return;
        }
        path.push(node.to_string());
        for next in arrows.get(node).into_iter().flatten() {
            visit(next, arrows, path, done);
        }
        path.pop();
        done.insert(node.to_string());
    }
    let mut done = BTreeSet::new();
    for node in arrows.keys() {
        visit(node, &arrows, &mut Vec::new(), &mut done);
    }
    // The arrows ARCHITECTURE.md draws: nothing below reaches up into the
    // wiring or the benchmarks, and the daemon's path never uses `samples`.
    for (from, tos) in &arrows {
        for to in tos {
            assert!(
                to != "worker" && to != "bench",
                "{from} imports {to}: only main.rs may"
            );
        }
    }
    for daemon in [
        "queue", "store", "pipeline", "tasks", "ops", "observe", "worker",
    ] {
        let uses_samples = sources().iter().any(|(rel, text)| {
            wing(rel) == daemon
                && code_of(text)
                    .split("#[cfg(test)]")
                    .next()
                    .unwrap()
                    .contains("crate::samples")
        });
        assert!(!uses_samples, "{daemon} uses samples outside its tests");
    }
    eprintln!("wing imports: {arrows:#?}");
}

#[test]
fn no_source_file_is_longer_than_800_lines() {
    for (rel, text) in sources() {
        let n = text.lines().count();
        assert!(n <= 800, "{rel} has {n} lines");
    }
}
