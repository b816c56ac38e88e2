//! Phase 1 of `worker bench-pipeline`: parse and chunk in this process on
//! one thread, per format, timed on the thread's own CPU clock.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{CHUNK_OVERLAP, CHUNK_SIZE};
use crate::bench::corpus::Prose;
use crate::bench::procfs::thread_cpu_ns;
use crate::pipeline::chunk::{Chunker, Sizer};
use crate::pipeline::parse::{self, Limits};
use crate::pipeline::parser_process::{ParserProcess, INLINE_BELOW};

pub(crate) struct ParseRow {
    pub(crate) format: &'static str,
    pub(crate) file_bytes: usize,
    pub(crate) text_bytes: usize,
    pub(crate) pages: usize,
    pub(crate) chunks: usize,
    pub(crate) parse_cpu: f64,
    pub(crate) chunk_cpu: f64,
    /// Wall over CPU time of both, to show how busy the machine was.
    pub(crate) wall_per_cpu: f64,
    /// With the tokenizer, on the start of the text: (text bytes chunked,
    /// chunks, CPU seconds).
    pub(crate) tokenizer: Option<(usize, usize, f64)>,
}

impl ParseRow {
    pub(crate) fn file_mb(&self) -> f64 {
        self.file_bytes as f64 / 1e6
    }
    pub(crate) fn parse_rate(&self) -> f64 {
        self.file_mb() / self.parse_cpu
    }
    pub(crate) fn chunk_rate(&self) -> f64 {
        self.file_mb() / self.chunk_cpu
    }
    pub(crate) fn both_rate(&self) -> f64 {
        self.file_mb() / (self.parse_cpu + self.chunk_cpu)
    }
    pub(crate) fn pages_rate(&self) -> Option<f64> {
        (self.pages > 0).then(|| self.pages as f64 / (self.parse_cpu + self.chunk_cpu))
    }
}

pub(crate) fn parse_and_chunk(
    mb: f64,
    pdf_pages: usize,
    repeat: usize,
    tokenizer: Option<&Path>,
    tokenizer_bytes: usize,
) -> Result<Vec<ParseRow>> {
    let size = (mb * 1e6) as usize;
    let mut gen = Prose::new(1);
    let corpus: Vec<(&'static str, &'static str, Vec<u8>, usize)> = vec![
        ("txt", "corpus.txt", gen.text(size).into_bytes(), 0),
        ("md", "corpus.md", gen.markdown(size).into_bytes(), 0),
        ("html", "corpus.html", gen.html(size).into_bytes(), 0),
        ("csv", "corpus.csv", gen.csv(size).into_bytes(), 0),
        ("json", "corpus.json", gen.json(size).into_bytes(), 0),
        ("docx", "corpus.docx", gen.docx(size), 0),
        ("pdf", "corpus.pdf", gen.pdf_pages(pdf_pages), pdf_pages),
    ];
    let chars = Chunker {
        sizer: Sizer::Estimate,
        size: CHUNK_SIZE,
        overlap: CHUNK_OVERLAP,
    };
    let tokens = match tokenizer {
        Some(path) => Some(Chunker {
            sizer: Sizer::load(path)?,
            size: CHUNK_SIZE,
            overlap: CHUNK_OVERLAP,
        }),
        None => None,
    };
    let limits = Limits::default();
    println!();
    println!(
        "Parse + chunk, in process on one thread (each step repeated for at least 1 s of CPU, mean); chunk size {CHUNK_SIZE}, overlap {CHUNK_OVERLAP}, \
         counting tokens with docworker's estimate (no tokenizer). Rates are of input file MB (10^6 bytes) per second of this thread's CPU time."
    );
    println!(
        "{:<6} {:>8} {:>8} {:>6} {:>7} {:>11} {:>11} {:>11} {:>8} {:>9}",
        "format",
        "file MB",
        "text MB",
        "pages",
        "chunks",
        "parse MB/s",
        "chunk MB/s",
        "p+c MB/s",
        "pages/s",
        "wall/cpu"
    );
    let mut rows = Vec::new();
    for (format, filename, bytes, pages) in corpus {
        let (parsed, parse_cpu, parse_wall) = measure(repeat, || {
            parse::parse(&bytes, filename, &limits)
                .with_context(|| format!("parsing the generated {format} document"))
        });
        let parsed = parsed?;
        let (chunks, chunk_cpu, chunk_wall) =
            measure(repeat, || chars.chunk(&parsed, usize::MAX).len());
        let tokenizer = tokens.as_ref().map(|t| {
            let prefix = prefix_of(&parsed, tokenizer_bytes);
            let (n, cpu, _) = measure(1, || t.chunk(&prefix, usize::MAX).len());
            (prefix.text.len(), n, cpu)
        });
        let row = ParseRow {
            format,
            file_bytes: bytes.len(),
            text_bytes: parsed.text.len(),
            pages,
            chunks,
            parse_cpu,
            chunk_cpu,
            wall_per_cpu: (parse_wall + chunk_wall) / (parse_cpu + chunk_cpu),
            tokenizer,
        };
        println!(
            "{:<6} {:>8.2} {:>8.2} {:>6} {:>7} {:>11.1} {:>11.1} {:>11.1} {:>8} {:>9.2}",
            row.format,
            row.file_mb(),
            row.text_bytes as f64 / 1e6,
            if pages > 0 {
                pages.to_string()
            } else {
                "-".into()
            },
            row.chunks,
            row.parse_rate(),
            row.chunk_rate(),
            row.both_rate(),
            row.pages_rate().map_or("-".into(), |r| format!("{r:.1}")),
            row.wall_per_cpu
        );
        rows.push(row);
    }
    if let Some(path) = tokenizer {
        println!();
        println!(
            "Chunked with the tokenizer {} instead (sizes in its tokens), on the first {:.1} MB of each text, once; \
             p+c and pages/s are for the whole document, chunking time scaled to its length:",
            path.display(),
            tokenizer_bytes as f64 / 1e6
        );
        println!(
            "{:<6} {:>8} {:>7} {:>12} {:>16} {:>11} {:>8}",
            "format", "text MB", "chunks", "bytes/chunk", "chunk text MB/s", "p+c MB/s", "pages/s"
        );
        for row in &rows {
            let (text, n, cpu) = row.tokenizer.expect("tokenizer given");
            let both = row.parse_cpu + cpu * row.text_bytes as f64 / text.max(1) as f64;
            println!(
                "{:<6} {:>8.2} {:>7} {:>12.0} {:>16.2} {:>11.2} {:>8}",
                row.format,
                text as f64 / 1e6,
                n,
                text as f64 / n.max(1) as f64,
                text as f64 / 1e6 / cpu,
                row.file_mb() / both,
                if row.pages > 0 {
                    format!("{:.1}", row.pages as f64 / both)
                } else {
                    "-".into()
                }
            );
        }
    }
    Ok(rows)
}

/// The start of a parsed text, up to `bytes` (cut after a paragraph
/// break when there is one), with its pages.
fn prefix_of(parsed: &parse::Parsed, bytes: usize) -> parse::Parsed {
    let mut cut = bytes.min(parsed.text.len());
    while !parsed.text.is_char_boundary(cut) {
        cut -= 1;
    }
    if cut < parsed.text.len() {
        if let Some(i) = parsed.text[..cut].rfind("\n\n") {
            cut = i + 2;
        }
    }
    parse::Parsed {
        format: parsed.format,
        text: parsed.text[..cut].to_string(),
        pages: parsed
            .pages
            .iter()
            .filter(|p| p.start < cut)
            .copied()
            .collect(),
        encoding: parsed.encoding,
    }
}

/// Runs `f` at least `runs` times and until it has used a second of CPU
/// time, and returns its last result and the mean CPU and wall seconds of
/// one run. The thread's CPU clock advances in scheduler ticks, so short
/// runs are only measured well in bulk.
fn measure<T>(runs: usize, mut f: impl FnMut() -> T) -> (T, f64, f64) {
    let cpu = thread_cpu_ns();
    let wall = Instant::now();
    let mut n = 0;
    loop {
        let value = f();
        n += 1;
        let used = thread_cpu_ns().saturating_sub(cpu) as f64 / 1e9;
        if n >= runs && used >= 1.0 {
            return (
                value,
                used / n as f64,
                wall.elapsed().as_secs_f64() / n as f64,
            );
        }
    }
}

/// What parsing in a child process (the worker's way for files of
/// [`INLINE_BELOW`] and more) costs per document against parsing in this
/// process: wall time, the median of several runs each.
pub(crate) async fn isolation_cost() -> Result<()> {
    let limits = Limits::default();
    let parser = ParserProcess {
        limits,
        timeout: Duration::from_secs(120),
        memory_bytes: 2_048_000_000,
    };
    let mut gen = Prose::new(2);
    let docs: Vec<(&str, &str, Vec<u8>)> = vec![
        ("txt, 1 line", "a.txt", b"Hello, world.".to_vec()),
        ("txt 64 KB", "a.txt", gen.text(64_000).into_bytes()),
        ("html 64 KB", "a.html", gen.html(64_000).into_bytes()),
        ("docx 64 KB", "a.docx", gen.docx(64_000)),
        ("pdf 5 pages", "a.pdf", gen.pdf_pages(5)),
        ("txt 1 MB", "a.txt", gen.text(1_000_000).into_bytes()),
        ("html 1 MB", "a.html", gen.html(1_000_000).into_bytes()),
        ("docx 1 MB", "a.docx", gen.docx(1_000_000)),
        ("pdf 100 pages", "a.pdf", gen.pdf_pages(100)),
    ];
    println!();
    println!(
        "Parser isolation: wall time per document parsed in this process and in a child process \
         (`worker {}`), median of 15 runs; the worker parses files under {} KB in process.",
        crate::pipeline::parser_process::CHILD_COMMAND,
        INLINE_BELOW / 1024
    );
    println!(
        "{:<14} {:>9} {:>13} {:>10} {:>9}",
        "document", "file KB", "in process ms", "child ms", "cost ms"
    );
    for (label, filename, bytes) in docs {
        let mut inline = Vec::new();
        let mut child = Vec::new();
        for _ in 0..15 {
            let started = Instant::now();
            parse::parse(&bytes, filename, &limits)
                .with_context(|| format!("parsing the generated {label}"))?;
            inline.push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            parser
                .parse_in_child(bytes.clone(), filename)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("parsing the generated {label} in a child: {}", e.message)
                })?;
            child.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let (inline, child) = (median(&mut inline), median(&mut child));
        println!(
            "{:<14} {:>9.1} {:>13.2} {:>10.2} {:>9.2}",
            label,
            bytes.len() as f64 / 1e3,
            inline,
            child,
            child - inline
        );
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
