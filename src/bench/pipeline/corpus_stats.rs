//! `worker bench-pipeline --corpus DIR`: what the chunker makes of real
//! documents. Every file under DIR is parsed and chunked in this process, as
//! the worker would with the default settings, and the chunks are measured
//! with the model's own tokenizer: how many, how many lie inside another
//! chunk of the same document, how many are fragments under the floor, and
//! how long they are in the model's tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{CHUNK_OVERLAP, CHUNK_SIZE};
use crate::pipeline::chunk::{Chunk, Chunker, Sizer, FLOOR};
use crate::pipeline::parse::{self, Limits};

/// The model's context: all-MiniLM and the other BERT-style embedders
/// take 512 tokens, two of which are the special tokens around the text.
const MODEL_TOKENS: usize = 510;

#[derive(Default)]
struct Tally {
    documents: usize,
    chunks: usize,
    inside: usize,
    fragments: usize,
    tokens: usize,
    longest: usize,
    over: usize,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.documents += other.documents;
        self.chunks += other.chunks;
        self.inside += other.inside;
        self.fragments += other.fragments;
        self.tokens += other.tokens;
        self.longest = self.longest.max(other.longest);
        self.over += other.over;
    }

    fn row(&self, label: &str) {
        println!(
            "{:<22} {:>5} {:>7} {:>9.2}% {:>10} {:>12.1} {:>8} {:>10}",
            label,
            self.documents,
            self.chunks,
            self.inside as f64 * 100.0 / self.chunks.max(1) as f64,
            self.fragments,
            self.tokens as f64 / self.chunks.max(1) as f64,
            self.longest,
            self.over
        );
    }
}

pub(crate) fn corpus_stats(dir: &Path, tokenizer: &Path) -> Result<()> {
    let model = Sizer::load(tokenizer)?;
    let mut files = Vec::new();
    walk(dir, &mut files).with_context(|| format!("reading {}", dir.display()))?;
    files.sort();
    let mut parsed = Vec::new();
    for path in &files {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        match parse::parse(&bytes, &name, &Limits::default()) {
            Ok(p) => parsed.push((path.clone(), p)),
            Err(e) => println!("  {}: not indexed: {}", path.display(), e.message),
        }
    }
    println!();
    println!(
        "Chunks of {} real documents under {} ({} could not be parsed), chunk size {CHUNK_SIZE}, overlap {CHUNK_OVERLAP}; \
         tokens counted with {} (without the 2 special tokens). \"inside\": chunks whose text lies wholly inside a \
         neighbouring chunk of the same document; \"fragments\": chunks under {FLOOR} tokens in documents of more than one chunk; \
         \"over\": chunks the model would refuse or truncate (more than {MODEL_TOKENS} tokens).",
        parsed.len(),
        dir.display(),
        files.len() - parsed.len(),
        tokenizer.display()
    );
    for (label, sizer) in [
        ("docworker's estimate", Sizer::Estimate),
        ("the model's tokenizer", model.clone()),
    ] {
        let chunker = Chunker {
            sizer,
            size: CHUNK_SIZE,
            overlap: CHUNK_OVERLAP,
        };
        println!();
        println!(
            "Chunked by {label} (chunk.tokenizer {}):",
            if label.contains("model") {
                "set"
            } else {
                "empty, the default"
            }
        );
        println!(
            "{:<22} {:>5} {:>7} {:>10} {:>10} {:>12} {:>8} {:>10}",
            "format", "docs", "chunks", "inside", "fragments", "mean tokens", "longest", "over"
        );
        let mut by_format: BTreeMap<&str, Tally> = BTreeMap::new();
        for (_, document) in &parsed {
            let chunks = chunker.chunk(document, usize::MAX);
            let tally = by_format.entry(document.format.as_str()).or_default();
            tally.add(&measure(&chunks, &model));
        }
        let mut all = Tally::default();
        for (format, tally) in &by_format {
            tally.row(format);
            all.add(tally);
        }
        all.row("all");
    }
    Ok(())
}

fn measure(chunks: &[Chunk], model: &Sizer) -> Tally {
    let mut tally = Tally {
        documents: 1,
        chunks: chunks.len(),
        ..Tally::default()
    };
    for (i, chunk) in chunks.iter().enumerate() {
        let tokens = model.count(&chunk.text);
        tally.tokens += tokens;
        tally.longest = tally.longest.max(tokens);
        tally.over += usize::from(tokens > MODEL_TOKENS);
        tally.fragments += usize::from(chunks.len() > 1 && tokens < FLOOR);
        let near = i.saturating_sub(3)..(i + 4).min(chunks.len());
        if near.filter(|&j| j != i).any(|j| {
            chunks[j].text.len() >= chunk.text.len() && chunks[j].text.contains(&chunk.text)
        }) {
            tally.inside += 1;
        }
    }
    tally
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), files)?;
        } else if kind.is_file() {
            files.push(entry.path());
        }
    }
    Ok(())
}
